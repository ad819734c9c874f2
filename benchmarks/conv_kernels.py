"""Conv kernels on the emulated Cortex-A72: guest instructions per multiply-add of single
conv (+bias+ReLU) modules with GoogLeNet's and AlexNet's heaviest shapes: the generic schedule,
our channel-blocked kernels with every conv direct (layouts + conv_rules), and the default
build (Winograd for the 3x3s where it pays; its instructions still per direct multiply-add);
optionally whole models (instructions per inference on the emulated A72, and latency on this
host).

Usage: python benchmarks/conv_kernels.py [--shapes NAME,...] [--variants generic,direct,blocked]
                                         [--models googlenet,alexnet] [--host-rounds N]
                                         [--name RESULT_FILE]
"""

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

# TVM's own default on x86 is half the cores (it assumes hyper-threading)
os.environ.setdefault("TVM_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import count_emulated, table, write  # noqa: E402

logger = logging.getLogger(__name__)

# name: (in channels, out channels, input size, kernel, stride, padding[, groups])
SHAPES = {
    "googlenet conv1 7x7/s2 3->64 @224": (3, 64, 224, 7, 2, 3),
    "googlenet conv2 3x3 64->192 @56": (64, 192, 56, 3, 1, 1),
    "googlenet 3a 3x3 96->128 @28": (96, 128, 28, 3, 1, 1),
    "googlenet 3a 5x5 16->32 @28": (16, 32, 28, 5, 1, 2),
    "googlenet 3b 1x1 256->128 @28": (256, 128, 28, 1, 1, 0),
    "googlenet 4a 1x1 480->192 @14": (480, 192, 14, 1, 1, 0),
    "googlenet 5b 3x3 192->384 @7": (192, 384, 7, 3, 1, 1),
    "alexnet conv1 11x11/s4 3->64 @224": (3, 64, 224, 11, 4, 2),
    "alexnet conv2 5x5 64->192 @27": (64, 192, 27, 5, 1, 2),
    "alexnet conv3 3x3 192->384 @13": (192, 384, 13, 3, 1, 1),
    "alexnet conv4 3x3 384->256 @13": (384, 256, 13, 3, 1, 1),
    "shufflenet depthwise 3x3 272 @14": (272, 272, 14, 3, 1, 1, 272),
    "shufflenet depthwise 3x3/s2 112 @56": (112, 112, 56, 3, 2, 1, 112),
}
DEFAULT_SHAPES = [n for n in SHAPES if not n.startswith("shufflenet")]  # the committed table
# the environment of each variant: the generic schedule only, our kernels with 3x3 convs kept
# direct, our kernels with Winograd where it pays (the default build)
VARIANTS = {"generic": {"TVM_REBIRTH_CONV_KERNELS": "0"},
            "direct": {"TVM_REBIRTH_CONV_KERNELS": "1", "TVM_REBIRTH_WINOGRAD": "0"},
            "blocked": {"TVM_REBIRTH_CONV_KERNELS": "1", "TVM_REBIRTH_WINOGRAD": "1"}}


def conv_module(cin, cout, size, k, stride, pad, groups=1, seed=0):
    """conv + bias + ReLU as a Relax module with constant weights, and its MAC count."""
    from tvm import relax
    from tvm.relax import op as R

    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((cout, cin // groups, k, k))
              / np.sqrt(cin // groups * k * k)).astype("float32")
    bias = rng.standard_normal((1, cout, 1, 1)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, cin, size, size), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(R.nn.conv2d(x, relax.const(weight), strides=stride, padding=pad,
                                    groups=groups))
            y = bb.emit_output(R.nn.relu(R.add(y, relax.const(bias))))
        bb.emit_func_output(y)
    out = (size + 2 * pad - k) // stride + 1
    return bb.get(), cout * out * out * cin // groups * k * k


def with_kernels(env: dict):
    class _Env:
        def __enter__(self):
            self.old = {k: os.environ.get(k) for k in env}
            os.environ.update(env)

        def __exit__(self, *exc):
            for key, value in self.old.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    return _Env()


def bench_shapes(names, variants, workdir):
    rows = {}
    for name in names:
        cin, cout, size, k, stride, pad, *groups = SHAPES[name]
        mod, macs = conv_module(cin, cout, size, k, stride, pad, *groups)
        x = np.random.default_rng(1).standard_normal((1, cin, size, size)).astype("float32")
        rows[name] = {"macs": macs}
        for variant in variants:
            with with_kernels(VARIANTS[variant]):
                count = count_emulated(mod, x, workdir, f"{variant}-{len(rows)}")[0]
            rows[name][variant] = {"instructions": count,
                                   "per_mac": round(count / macs, 4)}
            logger.info(f"{name}: {variant} {count:.3e} instructions, {count / macs:.3f}/MAC")
    return rows


def bench_models(models, variants, workdir, host_rounds):
    from tvm_rebirth import load_model
    from tvm_rebirth.learn.calib import bench_input
    from tvm_rebirth.report.measure import count_gflops

    result = {}
    for name in models:
        model = load_model(name)
        x = bench_input(model)[0]
        macs = count_gflops(model.mod) * 1e9 / 2
        result[name] = {"macs": macs}
        for variant in variants:
            with with_kernels(VARIANTS[variant]):
                count = count_emulated(model.mod, x, workdir, f"{name}-{variant}")[0]
            result[name][variant] = {"instructions": count, "per_mac": round(count / macs, 4)}
            logger.info(f"{name}: {variant} {count:.3e} instructions/inference")
        if host_rounds:
            result[name]["host"] = host_latency(model, x, variants, host_rounds)
    return result


def host_latency(model, x, variants, rounds):
    """Median ms over interleaved rounds on this host (untuned builds)."""
    import statistics

    from tvm_rebirth.compile.build import Runner
    from tvm_rebirth.report.measure import interleaved_rounds, tvm_timer

    runners, outputs = {}, {}
    for variant in variants:
        with with_kernels(VARIANTS[variant]):
            runners[variant] = Runner(model.mod, tuned=False)
        outputs[variant] = runners[variant](x)[0]
    timers = {v: tvm_timer(r, x, 5) for v, r in runners.items()}
    for timer in timers.values():
        timer()
    samples = interleaved_rounds(timers, rounds, "host " + model.name)
    base = outputs[variants[0]]
    return {v: {"median_ms": round(statistics.median(s), 2),
                "rel_err_vs_first": float(np.abs(outputs[v] - base).max()
                                          / np.abs(base).max())}
            for v, s in samples.items()}


def main():
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                        help=f"comma-separated names of {', '.join(SHAPES)}")
    parser.add_argument("--variants", default="generic,direct,blocked")
    parser.add_argument("--models", default="")
    parser.add_argument("--host-rounds", type=int, default=0)
    parser.add_argument("--name", default="conv_kernels")
    args = parser.parse_args()
    variants = args.variants.split(",")
    names = [n for n in args.shapes.split(",") if n]
    with tempfile.TemporaryDirectory(prefix="conv-kernels-") as tmp:
        shapes = bench_shapes(names, variants, Path(tmp))
        models = bench_models([m for m in args.models.split(",") if m], variants, Path(tmp),
                              args.host_rounds)
    lines = ["# Conv kernels: guest instructions per multiply-add (qemu cortex-a72, 1 thread)",
             "", "Single conv + bias + ReLU modules; the floor is 0.25 (one FMLA = 4 MACs). "
             "generic: TVM_REBIRTH_CONV_KERNELS=0 (TVM's legalization with our generic "
             "schedule: no kernel of ours, no BatchNorm fold); direct: our kernels, every conv "
             "direct; blocked: the default build (Winograd where it pays).", ""]
    lines.append(table([[n, f"{r['macs']:.3g}"] + [
        f"{r[v]['per_mac']:.3f}" for v in variants] for n, r in shapes.items()],
        ["conv", "MACs"] + [f"{v} instr/MAC" for v in variants]))
    if models:
        lines += ["", "## Whole models (instructions/inference, qemu cortex-a72, 1 thread)", ""]
        lines.append(table([[m, f"{r['macs']:.3g}"] + [
            f"{r[v]['instructions']:.3g} ({r[v]['per_mac']:.2f}/MAC)" for v in variants]
            for m, r in models.items()], ["model", "MACs"] + variants))
        host = {m: r["host"] for m, r in models.items() if "host" in r}
        if host:
            lines += ["", f"## This host, {os.environ['TVM_NUM_THREADS']} threads, untuned "
                      "(median ms, interleaved rounds)", ""]
            lines.append(table([[m] + [f"{h[v]['median_ms']}" for v in variants]
                                for m, h in host.items()], ["model"] + variants))
    write(args.name, {"shapes": shapes, "models": models, "variants": variants},
          "\n".join(lines))


if __name__ == "__main__":
    main()
