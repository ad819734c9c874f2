"""Where layer-wise fitting stops on fmnist-inception: top-1 with layer-wise fine-tuning
alone for the default plan and for the same plan without its stem site and/or its branch
sites. Shows how much of the loss is the stem (a 1-channel conv + max-pool + LRN that one
conv + ReLU cannot express) and how much the other sites' residuals add up to.

    python benchmarks/fmnist_layerwise_limits.py [--images 256] [--limit N]   # ~10 min

writes benchmarks/results/fmnist_layerwise_limits.{json,md}
"""

import argparse
import os
import sys

os.environ.setdefault("TVM_NUM_THREADS", "2")

from _common import write  # noqa: E402
from run_all import limits_table  # noqa: E402

from tvm_rebirth import flow  # noqa: E402
from tvm_rebirth.compile.build import Runner  # noqa: E402
from tvm_rebirth.report.measure import labeled_set, top_k  # noqa: E402

STEM = "conv1+pool1+norm1"
# variant -> which sites of the default plan stay enabled
VARIANTS = {
    "all sites (default plan)": lambda s: True,
    "all sites but the stem": lambda s: s.id != STEM,
    "streamline sites only": lambda s: s.kind == "streamline",
    "streamline sites but the stem": lambda s: s.kind == "streamline" and s.id != STEM,
}


def markdown(payload):
    return ("# fmnist-inception: layer-wise fine-tuning alone, by plan variant\n\n"
            + limits_table(payload)
            + f"\n\nOriginal top-1 {payload['original_top1'] * 100:.2f} %; "
              f"{payload['labeled_set']}; calibration: {payload['calibration']}. Errors are "
              "held-out relative reconstruction errors of each site's output.")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--limit", type=int)
    args = ap.parse_args()
    model = flow.load("fmnist-inception")
    full = flow.find_plan(model)
    calib = flow.calibration(model, flow.RebirthOptions(images=args.images))
    description = calib[1]
    test_x, test_y, test_desc = labeled_set(model, args.limit)
    runners, fits = {"original": Runner(model.mod)}, {}
    for name, keep in VARIANTS.items():
        print(f"[limits] {name}", file=sys.stderr, flush=True)
        rebirth = flow.rebirth_model(model, plan=full.with_enabled(keep), images=calib)
        fits[name] = rebirth.fit["sites"]
        runners[name] = Runner(rebirth.mod)
    result = top_k(runners, test_x, test_y)
    base = result["original"]["top1"]
    variants = []
    for name, sites in fits.items():
        stem = [s["rel_error"] for s in sites if s["id"] == STEM]
        variants.append({"variant": name, "sites": [s["id"] for s in sites],
                         **result[name],
                         "top1_change_points": round((result[name]["top1"] - base) * 100, 2),
                         "stem_rel_error": stem[0] if stem else None,
                         "worst_other_rel_error": max(s["rel_error"] for s in sites
                                                      if s["id"] != STEM)})
    payload = {"model": "fmnist-inception", "labeled_set": test_desc,
               "calibration": description, "original_top1": base, "n": result["n"],
               "variants": variants}
    md = markdown(payload)
    write("fmnist_layerwise_limits", payload, md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
