"""GoogLeNet with streamline sites only: fine-tune time, latency, planned memory, GFLOPs.

    python benchmarks/streamline_googlenet.py [--model googlenet] [--images 256] [--rounds 9]

writes benchmarks/results/<model>_streamline.{json,md}
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

from _common import table, write  # noqa: E402

from tvm_rebirth import RebirthPlan, load_model  # noqa: E402
from tvm_rebirth.calib import calibration_images  # noqa: E402
from tvm_rebirth.finetune import finetune  # noqa: E402
from tvm_rebirth.measure import bench_pair  # noqa: E402
from tvm_rebirth.passes import StreamlineSlimming  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="googlenet")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--policy", default="keep-kernel")
    args = ap.parse_args()
    model = load_model(args.model)
    plan = RebirthPlan.from_model(model, policy=args.policy, kinds=["streamline"])
    images, description = calibration_images(model, count=args.images)
    t = time.time()
    weights, fit = finetune(model, plan, images, description)
    finetune_seconds = time.time() - t
    rebirth = StreamlineSlimming(plan, weights)(model.mod)
    bench = bench_pair(model.mod, rebirth, images[:1], rounds=args.rounds)
    payload = {"model": args.model, "policy": args.policy, "calibration": description,
               "sites": [s.id for s in plan.sites], "finetune_seconds": round(finetune_seconds, 1),
               "fit": fit["sites"], **bench}
    o, r = bench["original"], bench["rebirth"]
    md = (f"# {args.model}: streamline slimming ({args.policy})\n\n"
          + table([["latency (ms, median of interleaved rounds)", o["latency_ms"], r["latency_ms"],
                    f"{bench['speedup']}x"],
                   ["planned activation memory (MB)", o["memory_mb"], r["memory_mb"],
                    f"{bench['memory_ratio']}x"],
                   ["GFLOPs", o["gflops"], r["gflops"], f"{bench['gflops_ratio']}x"]],
                  ["", "original", "rebirth", "ratio"])
          + "\n\n" + table([[f["id"], f["rel_error"], f["seconds"]] for f in fit["sites"]],
                           ["site", "held-out rel. error", "fit seconds"])
          + f"\n\nFine-tune: {finetune_seconds:.0f} s on {description}. "
            f"Generic CPU schedule (no tuning), {bench['rounds']} rounds x {bench['number']}.")
    write(f"{args.model}_streamline", payload, md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
