"""Plans that pay, predicted vs measured: the default plan (`plan --select paying`) of each
model for a target, its predicted whole-model speedup, and the speedup and planned memory
measured on that target with the same build on both sides (no tuning logs).

    python benchmarks/plans.py --models googlenet,alexnet [--target host|cortex-a72]
                               [--rounds 9] [--select paying|all]

host: latency on this CPU, original and rebirth in interleaved rounds, one process;
cortex-a72: exact guest instructions per inference on the emulated core (qemu-user, 1
thread; `tvm-rebirth device start` prepares its sysroot). The rebirth model carries seeded
placeholder weights: a fine-tuned one has the same graph and kernels, so the same speed and
memory (accuracy is the fine-tune's business, see fmnist_accuracy.py).
Writes benchmarks/results/plans_<target>.{json,md}.
"""

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import count_emulated, table, write  # noqa: E402

from tvm_rebirth import flow  # noqa: E402
from tvm_rebirth.compile.build import host_target  # noqa: E402
from tvm_rebirth.passes import rebirth_pipeline  # noqa: E402


def measure_host(mods, x, rounds):
    from tvm_rebirth.report.measure import bench_variants

    result = bench_variants(mods, x, rounds=rounds, number=5)
    return {name: {"cost": result[name]["latency_ms"], "memory_mb": result[name]["memory_mb"]}
            for name in mods}


def measure_emulated(mods, x, target_name):
    out = {}
    with tempfile.TemporaryDirectory(prefix="plans-") as tmp:
        for name, mod in mods.items():
            count, planned = count_emulated(mod, x, tmp, name, target_name)
            out[name] = {"cost": count, "memory_mb": round(planned / 2 ** 20, 3)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="googlenet,alexnet")
    ap.add_argument("--target", default="host")
    ap.add_argument("--select", choices=("paying", "all"), default="paying")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    entries = []
    for name in args.models.split(","):
        model = flow.load(name)
        start = time.time()
        if args.select == "paying":
            plan = flow.select_plan(model, flow.SelectOptions(
                target=None if args.target == "host" else args.target, tuned=False))
        else:
            plan = flow.find_plan(model)
        plan_seconds = round(time.time() - start, 1)
        from tvm_rebirth.learn.calib import bench_input

        x = bench_input(model)[0]
        mods = {"original": model.mod, "rebirth": rebirth_pipeline(plan, None)(model.mod)}
        measured = measure_host(mods, x, args.rounds) if args.target == "host" else \
            measure_emulated(mods, x, args.target)
        o, r = measured["original"], measured["rebirth"]
        selection = plan.selection or {}
        entry = {"model": name, "select": args.select, "plan_seconds": plan_seconds,
                 "sites_enabled": [s.id for s in plan.enabled_sites()],
                 "sites_found": len(plan.sites),
                 "variants": {s: e["variant"] for s, e in selection.get("sites", {}).items()},
                 "original": o, "rebirth": r,
                 "speedup": round(o["cost"] / r["cost"], 3),
                 "memory_ratio": round(o["memory_mb"] / r["memory_mb"], 3) if r["memory_mb"]
                 else None,
                 "predicted_speedup": selection.get("predicted_speedup"),
                 "accuracy_cost": selection.get("accuracy_cost")}
        if entry["predicted_speedup"]:
            entry["prediction_error"] = round(
                entry["predicted_speedup"] / entry["speedup"] - 1, 3)
        entries.append(entry)
    unit = "ms" if args.target == "host" else "instructions"
    rows = [[e["model"], f"{len(e['sites_enabled'])} of {e['sites_found']}",
             f"{e['original']['cost']:.4g} / {e['rebirth']['cost']:.4g}",
             f"{e['speedup']}x", f"{e['predicted_speedup']}x" if e["predicted_speedup"] else "-",
             f"{e['prediction_error']:+.1%}" if "prediction_error" in e else "-",
             f"{e['original']['memory_mb']} / {e['rebirth']['memory_mb']} "
             f"({e['memory_ratio']}x)", e["plan_seconds"]] for e in entries]
    where = (f"this CPU ({host_target().attrs['mcpu']}, {os.environ.get('TVM_NUM_THREADS')} threads), "
             f"medians of {args.rounds} interleaved rounds") if args.target == "host" else \
        f"the emulated {args.target} (qemu-user, 1 thread), exact guest instructions"
    md = (f"# Default plans ({args.select}) on {args.target}: predicted vs measured\n\n"
          + table(rows, ["model", "sites enabled", f"original / rebirth ({unit})", "measured",
                         "predicted", "prediction error", "planned memory MB (ratio)",
                         "plan s"])
          + f"\n\nMeasured on {where}; untuned builds on both sides, rebirth with seeded "
            "placeholder weights (same graph and kernels as fine-tuned ones). Variants chosen: "
          + "; ".join(f"{e['model']}: " + ", ".join(f"{s} {v}" for s, v in e["variants"].items())
                      for e in entries if e["variants"])
          + f"\n\nReproduce: `python benchmarks/plans.py {' '.join(sys.argv[1:])}`\n")
    label = args.target.replace("/", "-") + ("" if args.select == "paying" else "_all")
    write(f"plans_{label}", {"target": args.target, "models": entries}, md)
    print(json.dumps(entries, indent=1) if args.json else md)


if __name__ == "__main__":
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    sys.exit(main())
