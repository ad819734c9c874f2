"""Accuracy of fmnist-inception with every site slimmed (``plan --select all``) against the
number of unlabeled calibration images: closed-form fits alone, + block reconstruction with
TVM gradients, + the whole network distilled on the same images (the default fine-tune),
top-1 on the 10k Fashion-MNIST test images, with the fine-tune's seconds on this machine
(2 threads) and the stages that warned that more images would help; and the default
fine-tune of the same sites planned with ``--policy keep-receptive-field`` (streamline convs
whose kernel covers the whole block they replace).

    python benchmarks/fmnist_reconstruction.py [--counts 256,1024,2048,4096,8192] [--limit N]

writes benchmarks/results/fmnist_reconstruction.{json,md}
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

from _common import machine, write  # noqa: E402
from run_all import reconstruction_table, reconstruction_text  # noqa: E402

from tvm_rebirth import flow  # noqa: E402
from tvm_rebirth.compile.build import Runner  # noqa: E402
from tvm_rebirth.learn.finetune import (DISTILL_EPOCHS, DISTILL_MIX,  # noqa: E402
                                        RECONSTRUCT_EPOCHS, DistillSettings)
from tvm_rebirth.report.measure import labeled_set, top_k  # noqa: E402


def markdown(payload) -> str:
    return ("# fmnist-inception, every site slimmed: top-1 against unlabeled images\n\n"
            + reconstruction_table(payload) + "\n\n" + reconstruction_text(payload))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="256,1024,2048,4096,8192")  # ~1 hour on 2 cores
    ap.add_argument("--limit", type=int, help="evaluate on the first N test images")
    args = ap.parse_args()
    # distillation measured at every count (the default skips it below 512 images)
    distill_settings = DistillSettings(min_held_out=0)
    model = flow.load("fmnist-inception")
    plan = flow.find_plan(model)
    field_plan = flow.find_plan(model, policy="keep-receptive-field")
    test_x, test_y, test_desc = labeled_set(model, args.limit)
    rows, runners = [], {"original": Runner(model.mod)}
    for count in (int(c) for c in args.counts.split(",")):
        calib = flow.calibration(model, flow.RebirthOptions(images=count), plan)
        row = {"images": count}
        for key, epochs, distill_epochs, variant in (
                ("closed_form", 0, 0, plan),
                ("reconstruction", RECONSTRUCT_EPOCHS, 0, plan),
                ("distillation", RECONSTRUCT_EPOCHS, DISTILL_EPOCHS, plan),
                ("receptive_field", RECONSTRUCT_EPOCHS, DISTILL_EPOCHS, field_plan)):
            start = time.time()
            result = flow.rebirth_model(model, flow.RebirthOptions(
                images=count, reconstruct_epochs=epochs, distill_epochs=distill_epochs,
                distill=distill_settings), plan=variant, images=calib)
            row[key] = {"seconds": round(time.time() - start, 1),
                        # the stages that warned more images would help (none: {})
                        "diverging": flow.diverging_stages(result.fit)}
            runners[f"{key} {count}"] = Runner(result.mod)
        rows.append(row)
        print(f"{count} images done", file=sys.stderr)
    result = top_k(runners, test_x, test_y)
    for row in rows:
        for key in ("closed_form", "reconstruction", "distillation", "receptive_field"):
            row[key]["top1"] = result[f"{key} {row['images']}"]["top1"]
    payload = {"model": "fmnist-inception", "labeled_set": test_desc,
               "sites": len(plan.enabled_sites()),
               "field_sites": len(field_plan.enabled_sites()),
               "field_off": [s.id for s in field_plan.sites if not s.enabled],
               "mirror_images": flow.RebirthOptions().mirror,
               "epochs": RECONSTRUCT_EPOCHS, "distill_epochs": DISTILL_EPOCHS,
               "distill_mix": DISTILL_MIX,
               "original_top1": result["original"]["top1"],
               "rows": rows,
               "machine": machine()}  # for the page's text (write records it too)
    md = markdown(payload)
    write("fmnist_reconstruction", payload, md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
