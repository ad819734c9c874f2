"""The cost table: every site variant's block, compiled as the model build compiles it and
measured on the target, cached per target and model in the user cache.

    how = measurement_for("host")                         # latency on this CPU (ms)
    how = measurement_for("cortex-a72")                   # guest instructions, emulated A72
    how = measurement_for(tracker="h:9190", key="phone")  # latency on a tracker device (ms)
    table = measure_costs(model, choices, how)
    table.cost(group, combo), table.memory(group, combo), table.model_cost

One module holds the original model (``main``) and, per group of ``choices``, the group's
block once per joint variant (the all-"off" combo is the original block), slimmed with
seeded placeholder weights (weights do not change what a block costs). It is built once with
``compile.build.compile_module`` (the model build's layout, schedule rules and tuning
records) and every function measured in one run: interleaved rounds on this CPU or on the
device, or one qemu run counting each call's instructions. Memory is each function's planned
activation bytes. Entries are cached in ``<cache>/costs/`` by model, target and kernel
version, so planning the same model again costs seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import statistics
import tempfile
from pathlib import Path

import numpy as np

from ..errors import RebirthError
from ..passes import rebirth_pipeline
from ..passes.blocks import site_block

logger = logging.getLogger(__name__)

# bump when kernels or block extraction change what a block costs (invalidates caches)
COSTS_VERSION = 4  # 3: BatchNorm folded, depthwise kernel, ONNX Sums as adds; 4: NCHW[x]c


@dataclasses.dataclass
class Measurement:
    """Where and how costs are measured (see ``measurement_for``)."""

    kind: str  # "host" | "emulated" | "tracker"
    target: object  # tvm Target the blocks are built for
    label: str  # what the cache and reports call it
    unit: str  # "ms" | "instructions"
    tracker: str | None = None
    key: str | None = None


def measurement_for(target=None, tracker=None, key=None) -> Measurement:
    """Latency on this CPU (no target, or "host"), on a tracker device (``tracker`` and
    ``key``, checked together by ``flow.require_device``; ``target`` defaults to the key's), or exact guest instructions on the emulated
    Cortex-A72 (a Cortex-A target without a tracker: `tvm-rebirth device start` prepares it)."""
    import os

    from ..compile.build import host_target
    from ..compile.targets import is_cross, resolve_target, target_label

    if tracker and key:
        from ..deploy.remote import default_target_for, is_emulated
        from ..deploy.rpc import parse_tracker

        name = target or default_target_for(key)
        if is_emulated(*parse_tracker(tracker), key):  # qemu latency means nothing: count
            return Measurement("emulated", resolve_target(name),
                               f"emulated-{target_label(name)}", "instructions")
        return Measurement("tracker", resolve_target(name), f"tracker-{key}-"
                           f"{target_label(name)}", "ms", tracker, key)
    if target in (None, "host"):
        t = host_target()
        threads = os.environ.get("TVM_NUM_THREADS", "all")
        return Measurement("host", t, f"host-{t.attrs['mcpu']}-{threads}t", "ms")
    resolved = resolve_target(target)
    if not is_cross(resolved):
        return Measurement("host", resolved, f"host-{target_label(target)}", "ms")
    return Measurement("emulated", resolved, f"emulated-{target_label(target)}",
                       "instructions")


@dataclasses.dataclass
class CostTable:
    """Measured costs (``unit``) and planned activation bytes of every group's combos, and
    the original model's cost, on ``target``."""

    target: str
    unit: str
    model_cost: float
    entries: dict  # entry key -> {"cost": float, "memory": int}

    def cost(self, group, combo) -> float:
        return self.entries[entry_key(group, combo)]["cost"]

    def memory(self, group, combo) -> int:
        return self.entries[entry_key(group, combo)]["memory"]

    def saving(self, group, combo) -> float:
        """What ``combo`` saves against the original block (negative: it costs more)."""
        return self.cost(group, group.combos[0]) - self.cost(group, combo)


def entry_key(group, combo) -> str:
    """The cache key of ``combo``'s block: each site's variant and the hash of its convs."""
    return group.key + "::" + ",".join(
        f"{s}={combo[s]}@{group.conv_hashes.get(s, {}).get(combo[s], '')}" for s in group.sites)


MODEL_KEY = "<model>"


def cache_path(model, label: str, facts: list) -> Path:
    """``<cache>/costs/<model>-<label>-<hash of facts>.json``: the planner's cache file for
    whatever ``facts`` (JSON-able) the entries depend on besides the model's file."""
    from ..frontend.zoo import cache_dir

    tag = hashlib.sha256(json.dumps([COSTS_VERSION, model.sha256, *facts]).encode())
    return cache_dir() / "costs" / f"{model.name.replace('/', '_')}-{label}-" \
        f"{tag.hexdigest()[:16]}.json"


def _cost_cache_path(model, how: Measurement, tuned: bool) -> Path:
    from ..compile.build import conv_kernels_enabled
    from ..compile.database import database_signature
    from ..compile.winograd import winograd_enabled

    # what changes the kernels a block builds with: shapes, target, tuning records, switches
    return cache_path(model, how.label, [
        {k: list(v) for k, v in model.input_shapes.items()}, str(how.target),
        database_signature(how.target) if tuned else None, conv_kernels_enabled(),
        winograd_enabled()])


def read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data["entries"] if data.get("version") == COSTS_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # no cache, or a broken one: measure again


def write_cache(path: Path, entries: dict) -> None:
    from ..report.output import write_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"version": COSTS_VERSION, "entries": entries}, indent=1))
    except (OSError, RebirthError) as err:  # a read-only cache only costs a re-measurement
        logger.warning(f"[plan] cannot write the cache {path}: {err}")


def _block_functions(model, choices, missing) -> tuple:
    """({function name: Relax function}, {function name: entry key}) of the missing entries."""
    import tvm
    from tvm.relax.utils import copy_with_new_vars

    functions, keys = {}, {}
    if MODEL_KEY in missing:
        functions["main"], keys["main"] = model.mod["main"], MODEL_KEY
    for g, group in enumerate(choices.groups):
        todo = [(c, combo) for c, combo in enumerate(group.combos)
                if entry_key(group, combo) in missing]
        if not todo:
            continue
        block = site_block(choices.analysis, group.sites)
        for c, combo in todo:
            plan = choices.slimming_plan([combo])
            mod = rebirth_pipeline(plan, None)(block) if plan.sites else block
            name = f"block{g}_{c}"
            # fresh vars: functions of one module must not share a var (FuseOps)
            functions[name] = copy_with_new_vars(mod["main"]).with_attr("global_symbol", name)
            keys[name] = entry_key(group, combo)
    mod = tvm.IRModule(functions)
    for key, value in (model.mod.attrs or {}).items():
        mod = mod.with_attr(key, value)
    return mod, keys


def _inputs(mod) -> dict:
    """{function: [seeded inputs in 0..1]} (non-negative like the activations blocks see)."""
    from tvm import relax

    rng = np.random.default_rng(0)
    calls = {}
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            calls[gv.name_hint] = [rng.random([int(d) for d in p.ty.shape.values],
                                              dtype=np.float32) for p in func.params]
    return calls


def _time_on_host(executable, calls, rounds=5) -> dict:
    """{function: median ms}: every function once per round, each sample >= ~5 ms."""
    import tvm
    from tvm import relax

    from ..report.measure import interleaved_rounds

    device = tvm.cpu()
    vm = relax.VirtualMachine(executable, device)

    def timer(name):
        args = [tvm.runtime.tensor(x, device) for x in calls[name]]
        vm[name](*args)
        once = vm.time_evaluator(name, device, number=1, repeat=1)(*args).mean * 1000
        number = int(min(max(5.0 / max(once, 1e-3), 1), 200))
        evaluator = vm.time_evaluator(name, device, number=number, repeat=1)
        return lambda: evaluator(*args).mean * 1000

    samples = interleaved_rounds({n: timer(n) for n in calls}, rounds, "plan costs")
    return {n: statistics.median(v) for n, v in samples.items()}


def measure_costs(model, choices, how: Measurement, tuned=True) -> CostTable:
    """The cost table of every combo of ``choices`` (and the original model) on ``how``;
    cached entries are reused, the rest built and measured in one module."""
    from ..compile.build import compile_module, export_library

    path = _cost_cache_path(model, how, tuned)
    entries = read_cache(path)
    wanted = [MODEL_KEY] + [entry_key(g, c) for g in choices.groups for c in g.combos]
    missing = [k for k in wanted if k not in entries]
    if missing:
        mod, keys = _block_functions(model, choices, set(missing))
        logger.info(f"[plan] building {len(keys)} block variant(s) of {model.name} for "
                    f"{how.label}")
        compiled = compile_module(mod, how.target, tuned)
        calls = _inputs(mod)
        logger.info(f"[plan] measuring {len(keys)} block variant(s) on {how.label}")
        with tempfile.TemporaryDirectory(prefix="tvm-rebirth-costs-") as tmp:
            if how.kind == "host":
                costs = _time_on_host(compiled.executable, calls)
            else:
                lib = Path(tmp) / "blocks.so"
                export_library(compiled.executable, str(lib), how.target)
                if how.kind == "emulated":
                    from ..deploy.remote import count_instructions_per_function

                    logger.info("[plan] counting every call's instructions in one qemu run "
                                "(minutes for a large model; no output until it ends)")
                    costs = count_instructions_per_function(lib, calls, Path(tmp))
                else:
                    from ..deploy.remote import time_functions_on_device

                    costs = time_functions_on_device(lib, calls, how.tracker, how.key)
        for name, key in keys.items():
            entries[key] = {"cost": float(costs[name]),
                            "memory": int(compiled.planned_by_function.get(name, 0))}
        write_cache(path, entries)
    else:
        logger.info(f"[plan] every block cost of {model.name} on {how.label} is cached "
                    f"({path})")
    return CostTable(target=how.label, unit=how.unit, model_cost=entries[MODEL_KEY]["cost"],
                     entries={k: entries[k] for k in wanted if k != MODEL_KEY})
