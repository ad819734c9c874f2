"""Every zoo model the passes apply to, original vs rebirth (default plan), in one table:
sites found, GFLOPs, latency and planned activation memory on this CPU (both TVM builds
apply the committed tuning_logs where they exist), ONNX Runtime on the original as the
peer, and guest instructions per inference on the emulated Cortex-A72 (--device-models).

    python benchmarks/zoo_models.py [--models a,b] [--images 64] [--rounds 7]
                                    [--device-models googlenet,alexnet,fmnist-inception]

Latencies are medians of interleaved rounds (ONNX Runtime, TVM original, TVM rebirth in
every round, the same thread count). Weights are fitted on --images calibration images:
their quality does not change speed or memory (accuracy is fmnist_accuracy.py's job).
Writes benchmarks/results/zoo_models.{json,md}.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")

from _common import git_revision, race, table, write  # noqa: E402

from tvm_rebirth import flow  # noqa: E402
from tvm_rebirth.compile.build import Runner  # noqa: E402
from tvm_rebirth.report.measure import count_gflops  # noqa: E402
from tvm_rebirth.frontend.zoo import ZOO  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "zoo_models.json"


def measure(name, args, threads):
    model = flow.load(name)
    options = flow.RebirthOptions(images=args.images)
    plan = flow.plan_for(model, options, "zoo")  # the default plan: what pays on this CPU
    counts = flow.site_counts(plan)
    if not plan.enabled_sites():
        return {"model": name, "sites": counts, "sites_enabled": 0,
                **({"selection": plan.selection} if plan.selection else {})}
    start = time.time()
    calib = flow.calibration(model, options)  # always: its first image is the timed input
    calib_seconds = time.time() - start
    result = flow.rebirth_model(model, options, plan=plan, images=calib)
    fit_seconds = round(calib_seconds + result.fit_seconds, 1)
    rebirth = result.mod
    x = calib[0][:1]
    runners = {"original": Runner(model.mod), "rebirth": Runner(rebirth)}
    samples = race(model, runners, x, threads, args.number, args.rounds, f"zoo {name}")
    ms = {k: round(statistics.median(v), 3) for k, v in samples.items()}
    out = runners["original"](x)[0]
    entry = {
        "model": name, "revision": git_revision(), "sites": counts,
        "sites_enabled": len(plan.enabled_sites()),
        "predicted_speedup": (plan.selection or {}).get("predicted_speedup"),
        "fit_images": args.images, "fit_seconds": fit_seconds,
        "gflops": {"original": round(count_gflops(model.mod), 4),
                   "rebirth": round(count_gflops(rebirth), 4)},
        "latency_ms": ms, "latency_ms_rounds": {k: [round(s, 3) for s in v]
                                                 for k, v in samples.items()},
        "memory_mb": {k: round(r.planned_bytes / 2 ** 20, 3) for k, r in runners.items()},
        "tuned_functions": {k: [r.compiled.tuned, r.compiled.functions]
                            for k, r in runners.items()},
        "max_abs_err": float(abs(runners["rebirth"](x)[0] - out).max()),
        "max_abs_output": float(abs(out).max()),
    }
    entry["speedup"] = round(ms["original"] / ms["rebirth"], 3)
    entry["memory_ratio"] = round(entry["memory_mb"]["original"] / entry["memory_mb"]["rebirth"], 3)
    if name in args.device_models:
        with tempfile.TemporaryDirectory(prefix="zoo-device-") as tmp:
            dev = flow.bench_emulated(model, rebirth, tmp, x=x)
        if "skipped" in dev:
            entry["instructions"] = {"skipped": dev["skipped"]}
        else:
            entry["instructions"] = {k: dev[k]["instructions"] for k in ("original", "rebirth")}
            entry["instructions"]["ratio"] = dev["instructions_ratio"]
            entry["instructions"]["device"] = dev["device"]
    return entry


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", help="comma-separated zoo names (default: every zoo model)")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--number", type=int, default=3)
    ap.add_argument("--device-models", default="googlenet,alexnet,fmnist-inception",
                    help="models also counted on the emulated Cortex-A72 ('' for none)")
    ap.add_argument("--update", action="store_true",
                    help="keep the other models' entries of results/zoo_models.json (re-measure "
                         "--models only)")
    args = ap.parse_args()
    args.device_models = [m for m in args.device_models.split(",") if m]
    threads = int(os.environ["TVM_NUM_THREADS"])
    names = args.models.split(",") if args.models else list(ZOO)
    entries = []
    for i, name in enumerate(names):
        print(f"[zoo] {i + 1}/{len(names)} {name}", file=sys.stderr, flush=True)
        entries.append(measure(name, args, threads))
    if args.update:
        kept = {e["model"]: e for e in json.loads(RESULTS.read_text())["models"]}
        kept.update({e["model"]: e for e in entries})
        entries = [kept[n] for n in ZOO if n in kept]
    rows, skipped = [], []
    for e in entries:
        if "latency_ms" not in e:
            skipped.append(e["model"])
            continue
        ms, mem, g = e["latency_ms"], e["memory_mb"], e["gflops"]
        ins = e.get("instructions", {})
        rows.append([
            e["model"], f"{e['sites_enabled']} of {e['sites']['streamline']} + "
                        f"{e['sites']['branch']}",
            f"{g['original']:.2f} -> {g['rebirth']:.2f}",
            f"{ms['original']:.2f} / {ms['rebirth']:.2f} ({e['speedup']}x)",
            f"{e['predicted_speedup']}x" if e.get("predicted_speedup") else "-",
            f"{mem['original']:.2f} / {mem['rebirth']:.2f} ({e['memory_ratio']}x)",
            f"{ms['onnxruntime']:.2f}",
            f"{ins['original'] / 1e9:.3g} / {ins['rebirth'] / 1e9:.3g} ({ins['ratio']}x)"
            if "ratio" in ins else "-",
            f"{e['tuned_functions']['original'][0]}/{e['tuned_functions']['original'][1]}, "
            f"{e['tuned_functions']['rebirth'][0]}/{e['tuned_functions']['rebirth'][1]}"])
    md = ("# Zoo models: original vs rebirth (default plan)\n\n"
          + table(rows, ["model", "sites enabled of (streamline + branch)", "GFLOPs",
                         "TVM ms orig / rebirth", "predicted",
                         "memory MB orig / rebirth", "ONNX Runtime ms (orig)",
                         "A72 instructions 1e9 orig / rebirth", "tuned functions"])
          + f"\n\nThis CPU, {threads} threads, medians of {args.rounds} interleaved rounds; "
            "instructions: exact guest counts per inference under qemu-user cortex-a72 (1 "
            "thread). 'tuned functions': how many of each build's functions "
            "came from the committed tuning_logs."
          + " The default plan enables only the site variants its cost table (measured on "
            "this CPU) predicts faster and no bigger; 'predicted' is its whole-model speedup."
          + (f" No site pays (the default plan is the original model): {', '.join(skipped)}."
             if skipped else ""))
    write("zoo_models", {"models": entries, "threads": threads, "rounds": args.rounds}, md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
