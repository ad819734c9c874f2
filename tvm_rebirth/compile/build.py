"""Compiling a Relax module for a CPU target and running it."""

from __future__ import annotations

import os
import time

import numpy as np

from ..errors import RebirthError


def host_target():
    """The machine's own CPU as a dict target (flag strings are rejected by TVM 0.27)."""
    from .targets import resolve_target

    return resolve_target("host")


def conv_kernels_enabled() -> bool:
    """Whether builds use our kernels: the channel-blocked convs (layouts + conv_rules) and
    LRN's power as square roots (fast_math); TVM_REBIRTH_CONV_KERNELS=0 builds every conv
    with the generic schedule and keeps ``power`` instead."""
    return os.environ.get("TVM_REBIRTH_CONV_KERNELS", "1") != "0"


def _fusion_passes(target) -> list:
    """Up to fusion: BatchNorms folded (into the conv before them where there is one), ONNX
    Sums as additions (so residual adds fuse into the conv before them), our conv weight
    packing (before legalization, so epilogues fuse into it), then TVM's library dispatch
    and legalization + fusion."""
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    from .channel_blocks import BlockChannels, channel_blocks_enabled
    from .fast_math import PowerToRoots
    from .fold_batch_norm import FoldBatchNorm
    from .pack_convs import PackConvWeights
    from .pools import SeparablePools
    from .stacked_sums import StackedSumsToAdds

    # the importer reshapes conv biases: FoldConstant first, so FoldBatchNorm sees constants
    blocking = [BlockChannels(target)] if channel_blocks_enabled() else []
    packing = [relax.transform.FoldConstant(), FoldBatchNorm(), StackedSumsToAdds(),
               PowerToRoots(), *blocking, PackConvWeights(target), SeparablePools(target)] \
        if conv_kernels_enabled() else []
    return packing + cpu_generic.library_dispatch_passes(target) \
        + cpu_generic.legalize_passes(target)


def schedule_rules() -> list:
    """The dlight rules an untuned build applies, first match wins: our conv kernels, then
    the generic schedule for everything else."""
    from .conv_gradients import UnfoldRule
    from .conv_rules import ConvRule
    from .depthwise import DepthwiseRule
    from .pools import PoolRule
    from .schedules import GenericCpuSchedule
    from .winograd import WinogradRule

    ours = [ConvRule(), DepthwiseRule(), PoolRule(), WinogradRule(), UnfoldRule()] \
        if conv_kernels_enabled() else []
    return ours + [GenericCpuSchedule()]


def _stages(target, database):
    """TVM's CPU passes in three stages: up to fusion; scheduling (tuning_logs records where
    they exist, our conv kernel rule, our generic schedule everywhere else) up to memory
    planning; the rest."""
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.s_tir import dlight

    finalize = cpu_generic.finalize_passes(target)  # starts with StaticPlanBlockMemory
    fused = _fusion_passes(target)
    scheduled = ([relax.transform.MetaScheduleApplyDatabase()] if database is not None else []) \
        + [dlight.ApplyDefaultSchedule(*schedule_rules())] \
        + cpu_generic.dataflow_lower_passes(target) + finalize[:1]
    return fused, scheduled, finalize[1:]


def build_passes(target, tuned=True):
    """Every pass of a build after slimming, as one ``tvm.transform.Sequential``: our conv
    weight packing, TVM's CPU legalization and fusion, scheduling (the ``tuned`` database's
    records -- True: the target's tuning_logs --, then ``schedule_rules()``), TVM's lowering
    and memory planning. ``relax.build(mod, target, relax_pipeline=build_passes(target))``
    builds what ``compile_module`` builds."""
    import tvm

    from .database import load_database

    database = load_database(target) if tuned is True else (tuned or None)
    fused, scheduled, after = _stages(target, database)
    scheduling = tvm.transform.Sequential(scheduled, name="rebirth_schedule")
    if database is not None:
        plain = scheduling

        @tvm.transform.module_pass(opt_level=0, name="RebirthApplyTuningRecords")
        def scheduling(mod, _ctx):  # MetaScheduleApplyDatabase reads the current database
            with database:
                return plain(mod)
    return tvm.transform.Sequential(fused + [scheduling] + after, name="rebirth_build")


def planned_memory(mod, target=None) -> int:
    """The activation bytes a build of ``mod`` would plan (``Compiled.planned_bytes``),
    without scheduling or code generation: fusion, lowering and static memory planning only
    (schedules do not change what the Relax VM allocates)."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    target = target or host_target()
    with tvm.transform.PassContext(opt_level=3), target:
        passes = _fusion_passes(target) + cpu_generic.dataflow_lower_passes(target) \
            + cpu_generic.finalize_passes(target)[:1]
        return planned_activation_bytes(tvm.transform.Sequential(passes)(mod))


def planned_activation_bytes(planned_mod, func_name="main") -> int:
    """Bytes of the storage blocks TVM's static memory planner allocates for ``main``."""
    from tvm import relax

    total = 0

    def visit(expr):
        nonlocal total
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == \
                "relax.memory.alloc_storage":
            total += int(expr.args[0].values[0])

    relax.analysis.post_order_visit(planned_mod[func_name], visit)
    return total


def fused_module(mod, target):
    """The module as both build and tuning see it: legalized and fused, not yet scheduled."""
    import tvm

    with tvm.transform.PassContext(opt_level=3), target:
        return tvm.transform.Sequential(_fusion_passes(target))(mod)


class Compiled:
    """A built module: ``executable`` (Relax VM), ``planned_bytes`` (activation memory after
    static planning), ``functions`` (fused PrimFuncs), ``tuned`` (how many of them took
    their schedule from tuning_logs) and ``tuned_by_source`` (that count per database:
    ``database.tuned_by_source``)."""

    def __init__(self, executable, planned_bytes, functions, tuned_by_source,
                 planned_by_function=None):
        self.executable, self.planned_bytes = executable, planned_bytes
        self.functions, self.tuned_by_source = functions, tuned_by_source
        self.tuned = sum(tuned_by_source.values())
        # {Relax function: its planned activation bytes} (modules with several entries)
        self.planned_by_function = planned_by_function or {}


def compile_module(mod, target=None, tuned=True) -> Compiled:
    """Build ``mod`` for ``target`` (default: this host's CPU). ``tuned``: True applies the
    target's tuning_logs databases, False none, or a MetaSchedule Database to apply."""
    import tvm
    from tvm import relax, tirx

    from .database import count_records, load_database, tuned_by_source

    target = target or host_target()
    database = load_database(target) if tuned is True else (tuned or None)
    with tvm.transform.PassContext(opt_level=3), target:
        fused, scheduled, after = _stages(target, database)
        mod = tvm.transform.Sequential(fused)(mod)
        functions = sum(isinstance(f, tirx.PrimFunc) for _, f in mod.functions.items())
        if database is None:
            by_source = {}
        elif tuned is True:
            by_source = tuned_by_source(mod, target)
        else:
            by_source = count_records(mod, target, [("given database", database)])
        if database is not None:
            with database:
                mod = tvm.transform.Sequential(scheduled)(mod)
        else:
            mod = tvm.transform.Sequential(scheduled)(mod)
        planned = {gv.name_hint: planned_activation_bytes(mod, gv.name_hint)
                   for gv, f in mod.functions.items() if isinstance(f, relax.Function)}
        lowered = tvm.transform.Sequential(after)(mod)
        executable = relax.build(lowered, target=target, relax_pipeline=None)
    return Compiled(executable, planned.get("main", 0), functions, by_source, planned)


class Runner:
    """A built module on the local CPU: ``runner(x) -> list of numpy outputs``."""

    def __init__(self, mod, target=None, func_name="main", tuned=True):
        import tvm
        from tvm import relax

        t = time.time()
        self.compiled = compile_module(mod, target, tuned)
        self.executable, self.planned_bytes = self.compiled.executable, self.compiled.planned_bytes
        self.build_seconds = time.time() - t
        self.device = tvm.cpu()
        self.vm = relax.VirtualMachine(self.executable, self.device)
        self.func_name = func_name

    def __call__(self, *inputs):
        import tvm

        args = [tvm.runtime.tensor(np.ascontiguousarray(x), self.device) for x in inputs]
        out = self.vm[self.func_name](*args)
        return to_numpy(out)


def to_numpy(out) -> list:
    """A VM result (a tensor or nested tuples of them) as a flat list of numpy arrays."""
    if hasattr(out, "numpy"):
        return [out.numpy()]
    result = []
    for item in out:
        result.extend(to_numpy(item))
    return result


def export_library(executable, path, target) -> None:
    """Write a deployable shared library; aarch64 targets link with the cross compiler.
    Written to a temporary name first, so a failed build leaves no half-written file."""
    import shutil

    from .targets import CROSS_COMPILER, is_cross

    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}.so")
    kwargs = {}
    if is_cross(target):
        if shutil.which(CROSS_COMPILER) is None:
            raise RebirthError(f"{CROSS_COMPILER} not found: install it with "
                               "`apt-get install g++-aarch64-linux-gnu`")
        from tvm.support import cc

        kwargs["fcompile"] = cc.cross_compiler(CROSS_COMPILER)
    try:
        executable.export_library(tmp, **kwargs)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
