"""Layer-wise fitting on real activations: the ReLU refinement as plain alternating least
squares (12 steps, the method before FIT_VERSION 2) against the over-relaxed default (6 steps).

The problems are GoogLeNet's: for every inception module, each branch that starts with a 1x1
reducer (3x3, 5x5, and pool projection) is merged into one conv fitted from the module's
input to the branch's output, as a branch site's receivers are. Calibration: the zoo's
seeded ImageNet crops; every 8th image held out.

    python benchmarks/fit_speed.py [--images 24]   # ~15 min on 2 cores

writes benchmarks/results/fit_speed.{json,md}
"""

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402

from _common import table, write  # noqa: E402

from tvm_rebirth import flow  # noqa: E402
from tvm_rebirth.learn.finetune import capture  # noqa: E402
from tvm_rebirth.learn.fit import (activate, conv_forward, fit_rebirth_conv,  # noqa: E402
                                   relative_error)

METHODS = {"plain, 12 steps": dict(steps=12, over_relaxation=1.0),
           "over-relaxed, 6 steps (default)": dict(steps=6)}


def merged_branches(analysis):
    """[(site id, branch's last conv block)] of every branch that does not read the fork."""
    found = []
    for site in analysis.sites:
        if site.kind != "branch":
            continue
        trace = analysis.trace(site.id)
        for branch in site.branches:
            block = trace.convs[branch.last_conv]
            if not block.data.same_as(trace.fork):
                found.append((site.id, block))
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=24)
    args = ap.parse_args()
    model = flow.load("googlenet")
    images, description = flow.calibration(model, flow.RebirthOptions(images=args.images))

    def ends(analysis):
        outs = {}
        for site_id, block in merged_branches(analysis):
            outs[("in", site_id)] = analysis.trace(site_id).fork
            outs[("out", block.name)] = block.out
        return outs

    columns, analysis = capture(model.mod, ends, images, "branch inputs and outputs",
                                kinds=("branch",))
    held = np.arange(len(images)) % 8 == 7
    rows, fits = [], []
    for site_id, block in merged_branches(analysis):
        x, y = columns[("in", site_id)], columns[("out", block.name)]
        spec = dataclasses.replace(analysis.conv_spec(block), in_channels=x.shape[1])
        entry = {"site": site_id, "conv": block.name, "unknowns": spec.in_channels
                 * spec.kernel[0] * spec.kernel[1] + 1, "outputs": spec.out_channels}
        for method, settings in METHODS.items():
            start = time.perf_counter()
            result = fit_rebirth_conv(x[~held], y[~held], spec, relu=block.relu, **settings)
            seconds = time.perf_counter() - start
            pred = activate(conv_forward(x[held], result.weight, result.bias, spec), block.relu)
            entry[method] = {"seconds": round(seconds, 3), "fit": round(result.rel_error, 5),
                             "closed_form": round(result.rel_error_closed_form, 5),
                             "held_out": round(relative_error(pred, y[held]), 5)}
        print(f"[fit_speed] {block.name}: " + ", ".join(
            f"{m} {entry[m]['seconds']} s, fit {entry[m]['fit']}" for m in METHODS),
              file=sys.stderr, flush=True)
        fits.append(entry)
    totals = {m: round(sum(f[m]["seconds"] for f in fits), 1) for m in METHODS}
    for f in fits:
        rows.append([f["conv"], f["unknowns"], f["outputs"],
                     *(f"{f[m]['fit']:.4f} / {f[m]['held_out']:.4f} ({f[m]['seconds']:.2f} s)"
                       for m in METHODS)])
    payload = {"model": "googlenet", "calibration": description,
               "held_out_images": int(held.sum()), "fits": fits, "total_seconds": totals}
    markdown = ("# Layer-wise fits: ReLU refinement, plain vs over-relaxed\n\n"
                "Relative error on the fitted images / on the held-out images (fit time). "
                f"GoogLeNet branch merges, {description}, {int(held.sum())} held out.\n\n"
                + table(rows, ["conv", "unknowns", "outputs", *METHODS])
                + "\n\nTotal fit time: " + ", ".join(f"{m} {s} s" for m, s in totals.items()))
    write("fit_speed", payload, markdown)


if __name__ == "__main__":
    main()
