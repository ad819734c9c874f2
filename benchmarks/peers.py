"""What a user would pick instead, side by side in one run on this CPU: ONNX Runtime on the
original model, TVM (our build) on the original, TVM on the rebirth model; both TVM builds
apply the committed tuning_logs (and report how many of their functions were tuned).

    python benchmarks/peers.py --model googlenet [--plan P --weights W] [--kinds streamline]
                               [--rounds 9] [--json]

Without --plan the default plan (every site) is fine-tuned on --images (64) calibration
images.

Medians of interleaved rounds, the same thread count for everyone (TVM_NUM_THREADS).
Writes benchmarks/results/peers_<model>.{json,md}.
"""

import argparse
import json
import os
import statistics
import sys

os.environ.setdefault("TVM_NUM_THREADS", "2")

from _common import machine, race, table, write  # noqa: E402

from tvm_rebirth import flow  # noqa: E402
from tvm_rebirth.compile.build import Runner  # noqa: E402
from tvm_rebirth.report.measure import count_gflops  # noqa: E402


def peak_gflops(threads: int) -> float:
    """fp32 peak: threads x clock x 32 FLOP/cycle (two 256-bit FMA units), a nominal bound."""
    mhz = 0.0
    for line in open("/proc/cpuinfo"):
        if line.startswith("cpu MHz"):
            mhz = max(mhz, float(line.split(":")[1]))
    return threads * mhz / 1000 * 32


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="googlenet")
    ap.add_argument("--plan")
    ap.add_argument("--weights")
    ap.add_argument("--kinds", default="streamline,branch", help="site kinds without --plan")
    ap.add_argument("--branch-widths", default="carry", help="branch widths without --plan")
    ap.add_argument("--images", type=int, default=64,
                    help="calibration images without --weights (speed does not depend on them)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--number", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    threads = int(os.environ["TVM_NUM_THREADS"])
    model = flow.load(args.model)
    options = flow.RebirthOptions(plan=args.plan, weights=args.weights, images=args.images,
                                  kinds=tuple(args.kinds.split(",")),
                                  branch_widths=args.branch_widths)
    calib = flow.calibration(model, options)  # always: its first image is the timed input
    result = flow.rebirth_model(model, options, images=calib)
    plan, rebirth = result.plan, result.mod
    x = calib[0][:1]
    runners = {"tvm_original": Runner(model.mod), "tvm_rebirth": Runner(rebirth)}
    samples = race(model, runners, x, threads, args.number, args.rounds, "peers",
                   "onnxruntime_original")
    ms = {f"{k}_ms": round(statistics.median(v), 3) for k, v in samples.items()}
    gflop = {"original": count_gflops(model.mod), "rebirth": count_gflops(rebirth)}
    peak = peak_gflops(threads)
    achieved = {
        "onnxruntime_original": gflop["original"] / ms["onnxruntime_original_ms"] * 1000,
        "tvm_original": gflop["original"] / ms["tvm_original_ms"] * 1000,
        "tvm_rebirth": gflop["rebirth"] / ms["tvm_rebirth_ms"] * 1000}
    payload = {"model": args.model, "threads": threads, **ms,
               "gflop": {k: round(v, 4) for k, v in gflop.items()},
               "achieved_gflops_per_s": {k: round(v, 2) for k, v in achieved.items()},
               "peak_gflops_per_s": round(peak, 1),
               "rounds": {k: [round(s, 3) for s in v] for k, v in samples.items()},
               "tuned_functions": {k: [r.compiled.tuned, r.compiled.functions]
                                   for k, r in runners.items()},
               "sites": [s.id for s in plan.enabled_sites()], "machine": machine()}
    rows = [[name.replace("_", " "), ms[f"{name}_ms"], f"{achieved[name]:.1f}",
             f"{achieved[name] / peak * 100:.1f} %"] for name in samples]
    md = (f"# Peers on {args.model} ({threads} threads)\n\n"
          + table(rows, ["runtime", "ms (median)", "GFLOP/s", "of nominal peak"])
          + f"\n\nNominal fp32 peak {peak:.0f} GFLOP/s ({threads} threads x 32 FLOP/cycle). "
            + "; ".join(f"{k.replace('_', ' ')}: {r.compiled.tuned}/{r.compiled.functions} "
                        "functions from tuning_logs" for k, r in runners.items())
            + f". Rebirth: {len(plan.enabled_sites())} sites "
              f"({', '.join(sorted({s.kind for s in plan.enabled_sites()}))})"
            + (f"; --plan/--weights made by `tvm-rebirth plan {args.model} -o P` and "
               f"`tvm-rebirth finetune {args.model} --plan P -o W` (the default flow)."
               if args.plan else "."))
    write(f"peers_{args.model}", payload, md)
    print(json.dumps(payload, indent=2) if args.json else md)


if __name__ == "__main__":
    sys.exit(main())
