"""Side-by-side measurements of an original and a rebirth model: latency, planned memory,
GFLOPs, output error, and accuracy on a labeled set."""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np

from ..compile.build import Runner, host_target
from ..errors import RebirthError

logger = logging.getLogger(__name__)




def count_gflops(mod, func_name="main") -> float:
    """Multiply-adds x 2 of every conv2d and matmul in a Relax function (pre-legalization)."""
    from tvm import relax

    flops = 0

    def shape(expr):
        return [int(v) for v in expr.ty.shape.values]

    def visit(expr):
        nonlocal flops
        if not isinstance(expr, relax.Call) or not hasattr(expr.op, "name"):
            return
        if expr.op.name == "relax.nn.conv2d":
            out = shape(expr)
            w = shape(expr.args[1])
            flops += 2 * int(np.prod(out)) * w[1] * w[2] * w[3]
        elif expr.op.name == "relax.matmul":
            a, out = shape(expr.args[0]), shape(expr)
            flops += 2 * int(np.prod(out)) * a[-1]

    relax.analysis.post_order_visit(mod[func_name], visit)
    return flops / 1e9


def tvm_timer(runner, x, number):
    """A callable giving the mean ms of ``number`` runs of the runner's main on ``x``."""
    import tvm

    evaluator = runner.vm.time_evaluator("main", runner.device, number=number, repeat=1)
    arg = tvm.runtime.tensor(x, runner.device)
    return lambda: evaluator(arg).mean * 1000


def interleaved_rounds(timers, rounds, label) -> dict:
    """{name: [ms per round]}: every timer once per round, so machine noise hits all alike."""
    samples = {name: [] for name in timers}
    for r in range(rounds):
        for name, timer in timers.items():
            samples[name].append(timer())
        logger.info(f"[{label}] round {r + 1}/{rounds}: " + ", ".join(
            f"{name} {values[-1]:.2f} ms" for name, values in samples.items()))
    return samples


def with_logits(mod, func_name="main"):
    """``mod`` with ``main`` also returning the input of a final softmax (its logits), or
    ``mod`` itself when the output is not a softmax: compared outputs of saturated softmaxes
    say nothing (1e-34 apart while sites err by a third), their logits do."""
    import tvm
    from tvm import relax

    plain = relax.transform.ToNonDataflow()(tvm.IRModule({func_name: mod[func_name]}))
    plain = plain[func_name]
    graph = {b.var: b.value for blk in plain.body.blocks for b in blk.bindings}
    out = plain.body.body
    while isinstance(out, relax.Var) and isinstance(graph.get(out), relax.Var):
        out = graph[out]  # trivial rebindings (R.output)
    value = graph.get(out)
    if not (isinstance(value, relax.Call) and getattr(value.op, "name", "") in (
            "relax.nn.softmax", "relax.nn.log_softmax")):
        return mod
    body = relax.SeqExpr(plain.body.blocks, relax.Tuple([plain.body.body, value.args[0]]))
    new = relax.Function(plain.params, relax.BlockBuilder().normalize(body), attrs=plain.attrs)
    updated = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    updated[func_name] = new
    return updated


def bench_variants(mods, x, rounds=7, number=5, profile=False) -> dict:
    """Compile every module of ``mods`` ({name: IRModule}, the first is the baseline) with the
    same settings, run the same input and time them in interleaved rounds. Returns {name:
    {latency_ms, latency_ms_rounds, memory_mb, gflops, tuned_functions, functions,
    max_abs_err, rel_err}} plus ``speedup``, ``memory_ratio`` and ``gflops_ratio`` of every
    other variant against the baseline. ``rel_err`` is ||out - base|| / ||base|| of the logits
    (the input of a final softmax, ``compared`` says which). ``profile``: also
    ``time_by_layer_type`` per variant."""
    runners, outputs, compared, logits, built = {}, {}, {}, False, {}
    for name, mod in mods.items():
        logger.info(f"[bench] building {name}")
        both = built[name] = with_logits(mod)
        logits = both is not mod
        runners[name] = Runner(both)
        outs = runners[name](x)
        outputs[name], compared[name] = outs[0], outs[1 if logits else 0]
    base = next(iter(mods))
    samples = interleaved_rounds({n: tvm_timer(r, x, number) for n, r in runners.items()},
                                 rounds, "bench")
    result = {}
    for name, mod in mods.items():
        result[name] = {"latency_ms": round(statistics.median(samples[name]), 3),
                        "latency_ms_rounds": [round(v, 3) for v in samples[name]],
                        "memory_mb": round(runners[name].planned_bytes / 2 ** 20, 3),
                        "gflops": round(count_gflops(mod), 4),
                        "tuned_functions": runners[name].compiled.tuned,
                        "tuned_by_source": runners[name].compiled.tuned_by_source,
                        "functions": runners[name].compiled.functions,
                        "max_abs_err": float(np.abs(outputs[name] - outputs[base]).max()),
                        "rel_err": float(np.linalg.norm(compared[name] - compared[base]) /
                                         max(float(np.linalg.norm(compared[base])), 1e-30))}
        if profile:
            from .profile import conv_throughput, kernel_macs, time_by_layer_type

            logger.info(f"[bench] timing every kernel of {name} by layer type")
            timed = time_by_layer_type(runners[name], x, runs=rounds)
            result[name]["time_by_layer_type"] = timed
            threads = int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))
            result[name]["conv_throughput"] = conv_throughput(
                timed, kernel_macs(built[name], host_target()), threads)
    for name in list(mods)[1:]:
        o, r = result[base], result[name]
        r["speedup"] = round(o["latency_ms"] / r["latency_ms"], 3)
        r["memory_ratio"] = memory_ratio(runners[base].planned_bytes,
                                         runners[name].planned_bytes)
        r["gflops_ratio"] = round(o["gflops"] / r["gflops"], 3)
    result["max_abs_output"] = float(np.abs(outputs[base]).max())
    result["compared"] = "logits" if logits else "output"
    result["rounds"], result["number"] = rounds, number
    return result


def memory_ratio(original_bytes, rebirth_bytes):
    """original / rebirth planned memory (from bytes, not rounded MB): 1.0 when neither plans
    any (a model whose only tensors are its input and output), None ("n/a") when only the
    rebirth plans none."""
    if not rebirth_bytes:
        return 1.0 if not original_bytes else None
    return round(original_bytes / rebirth_bytes, 3)


def bench_pair(original_mod, rebirth_mod, x, rounds=7, number=5,
               profile=False) -> dict:
    """Original vs rebirth (see bench_variants), in the CLI's bench contract layout."""
    result = bench_variants({"original": original_mod, "rebirth": rebirth_mod}, x, rounds,
                            number, profile)
    return pair_layout(result)


def pair_layout(result) -> dict:
    """bench_variants' result for {"original", "rebirth"} with the ratios at the top level."""
    for key in ("speedup", "memory_ratio", "gflops_ratio", "max_abs_err", "rel_err",
                "instructions_ratio"):
        if key in result["rebirth"]:
            result[key] = result["rebirth"].pop(key)
    result["original"].pop("max_abs_err")
    result["original"].pop("rel_err", None)
    return result


def labeled_set(model, limit=None):
    """(images NCHW float32, labels int) of the model's labeled evaluation set."""
    from ..learn import calib
    from ..frontend.datasets import fashion_mnist

    entry = model.zoo_entry
    shape = model.input_shapes[model.input_name]
    if entry is None or not entry.labeled and entry.calibration != "imagenet-photos":
        raise RebirthError(f"{model.path}: no labeled set is known for this model")
    if entry.labeled == "fashion-mnist-test":
        images, labels = fashion_mnist("test")
        if limit:
            images, labels = images[:limit], labels[:limit]
        return calib.preprocess(images[..., None], entry, shape), labels.astype(np.int64), \
            f"Fashion-MNIST test ({len(labels)} images)"
    folder = calib.imagenet_photos_dir()
    files = sorted(folder.glob("imagenet_*.jpg"))[:limit or None]
    labels = np.array([int(Path(f).stem.split("_")[-1]) for f in files])
    images = np.concatenate([calib.images_from_folder_files([f], shape, entry) for f in files])
    return images, labels, f"foolbox ImageNet photos ({len(files)} images)"


def top_k(runners, images, labels) -> dict:
    """top-1/top-5 of several runners on the same images (one image at a time)."""
    hits = {name: [0, 0] for name in runners}
    agree = 0
    start = time.time()
    for i, (x, y) in enumerate(zip(images, labels)):
        preds = {}
        for name, runner in runners.items():
            logits = runner(x[None])[0].reshape(-1)
            order = np.argsort(-logits)
            preds[name] = order[0]
            hits[name][0] += int(order[0] == y)
            hits[name][1] += int(y in order[:5])
        agree += int(len(set(preds.values())) == 1)
        if (i + 1) % 1000 == 0:
            logger.info(f"[eval] {i + 1}/{len(labels)} images ({time.time() - start:.0f}s)")
    n = len(labels)
    result = {name: {"top1": round(h[0] / n, 5), "top5": round(h[1] / n, 5)}
              for name, h in hits.items()}
    result["n"] = n
    result["agreement"] = round(agree / n, 5)
    return result
