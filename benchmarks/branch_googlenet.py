"""GoogLeNet: original vs streamline slimming vs streamline + branch slimming (both reducer
width presets), side by side in one interleaved run: latency, planned activation memory,
GFLOPs, fine-tune time.

    python benchmarks/branch_googlenet.py [--model googlenet] [--images 256] [--rounds 9]

writes benchmarks/results/<model>_branch.{json,md}
"""

import argparse
import os
import sys

os.environ.setdefault("TVM_NUM_THREADS", "2")

from _common import table, write  # noqa: E402

from tvm_rebirth import flow  # noqa: E402
from tvm_rebirth.report.measure import bench_variants  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="googlenet")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    model = flow.load(args.model)
    calib = flow.calibration(model, flow.RebirthOptions(images=args.images))
    images, description = calib
    variants = {
        "streamline": flow.RebirthOptions(kinds=("streamline",), select="all"),
        "all sites (carry widths)": flow.RebirthOptions(select="all"),
        "all sites (paper widths)": flow.RebirthOptions(branch_widths="paper", select="all"),
    }
    mods, fits = {"original": model.mod}, {}
    for name, options in variants.items():
        print(f"== fine-tuning: {name}", file=sys.stderr)
        rebirth = flow.rebirth_model(model, options, images=calib)
        fits[name] = {"seconds": round(rebirth.fit_seconds, 1), "sites": rebirth.fit["sites"]}
        mods[name] = rebirth.mod
    bench = bench_variants(mods, images[:1], rounds=args.rounds)
    payload = {"model": args.model, "calibration": description, "fit": fits, **bench}
    rows = []
    for name in mods:
        r = bench[name]
        rows.append([name, r["latency_ms"], r.get("speedup", "1.0"), r["memory_mb"],
                     r.get("memory_ratio", "1.0"), r["gflops"],
                     fits[name]["seconds"] if name in fits else "-"])
    worst = {name: max(s["rel_error"] or 0 for s in fit["sites"] if s["kind"] == "branch")
             for name, fit in fits.items() if any(s["kind"] == "branch" for s in fit["sites"])}
    md = (f"# {args.model}: streamline and branch slimming\n\n"
          + table(rows, ["variant", "latency (ms, median)", "speedup", "planned memory (MB)",
                         "memory ratio", "GFLOPs", "fine-tune (s)"])
          + "\n\nWorst held-out relative error of a branch site: "
          + ", ".join(f"{k}: {v:.3f}" for k, v in worst.items())
          + f"\n\nFine-tune on {description}. Generic CPU schedule (no tuning), "
            f"{bench['rounds']} interleaved rounds x {bench['number']} runs, "
            f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}.")
    write(f"{args.model}_branch", payload, md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
