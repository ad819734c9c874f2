"""Accuracy of fmnist-inception as sites are slimmed one by one in network order (paper
Table 2 style: conv1, conv2, then each inception module): top-1/top-5 on the 10k
Fashion-MNIST test images with layer-wise fine-tuning; then the branch sites alone with
both reducer-width presets; then, when PyTorch (the optional extra) is installed, all sites
refined end to end two ways: distilling the original on unlabeled images, and retraining with
the Fashion-MNIST train labels and the original as teacher (the paper's recipe).

    python benchmarks/fmnist_accuracy.py [--images 256] [--limit N]     # ~1 h on 2 cores

writes benchmarks/results/fmnist_inception_accuracy.{json,md}
"""

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("TVM_NUM_THREADS", "2")

from _common import write  # noqa: E402
from run_all import accuracy_table, end_to_end_text  # noqa: E402

from tvm_rebirth import RebirthPlan, load_model  # noqa: E402
from tvm_rebirth.compile.build import Runner  # noqa: E402
from tvm_rebirth.learn.calib import calibration_images, labeled_training_images  # noqa: E402
from tvm_rebirth.learn.finetune import finetune  # noqa: E402
from tvm_rebirth.report.measure import labeled_set, top_k  # noqa: E402
from tvm_rebirth.passes import rebirth_pipeline  # noqa: E402


def markdown(payload):
    return ("# fmnist-inception: accuracy per slimming step\n\n" + accuracy_table(payload)
            + f"\n\n{payload['labeled_set']}; layer-wise calibration: "
              f"{payload['calibration']}." + end_to_end_text(payload))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--e2e-images", type=int, default=30000, help="unlabeled distillation")
    ap.add_argument("--e2e-epochs", type=int, default=10)
    ap.add_argument("--retrain-images", type=int, default=60000, help="labeled retraining")
    ap.add_argument("--retrain-epochs", type=int, default=8)
    args = ap.parse_args()
    model = load_model("fmnist-inception")
    full = RebirthPlan.from_model(model)
    images, description = calibration_images(model, count=args.images)
    test_x, test_y, test_desc = labeled_set(model, args.limit)
    steps, runners = [], {"original": Runner(model.mod)}
    for k in range(1, len(full.sites) + 1):  # cumulative, in network order
        ids = {s.id for s in full.sites[:k]}
        plan = dataclasses.replace(full, sites=[dataclasses.replace(s, enabled=s.id in ids)
                                                for s in full.sites])
        weights, _ = finetune(model, plan, images, description)
        runners[f"+ {full.sites[k - 1].id}"] = Runner(rebirth_pipeline(plan, weights)(model.mod))
    for widths in ("carry", "paper"):
        plan = RebirthPlan.from_model(model, kinds=["branch"], branch_widths=widths)
        weights, _ = finetune(model, plan, images, description)
        runners[f"branch sites only ({widths} widths)"] = Runner(
            rebirth_pipeline(plan, weights)(model.mod))
    e2e = {}
    try:
        import torch  # noqa: F401  (the optional extra)
    except ImportError:
        print("torch not installed: skipping the end-to-end rows", file=sys.stderr)
    else:
        e2e_x, _ = calibration_images(model, count=args.e2e_images, seed=1)
        weights, report = finetune(model, full, images, description, e2e_images=e2e_x,
                                   e2e_epochs=args.e2e_epochs)
        e2e["distillation"] = report["end_to_end"]
        runners["all sites + end-to-end distillation (unlabeled)"] = Runner(
            rebirth_pipeline(full, weights)(model.mod))
        x, y, _ = labeled_training_images(model, count=args.retrain_images, seed=1)
        weights, report = finetune(model, full, images, description, e2e_images=x,
                                   e2e_labels=y, e2e_flip=True, e2e_epochs=args.retrain_epochs)
        e2e["retraining"] = report["end_to_end"]
        runners["all sites + retraining with labels"] = Runner(
            rebirth_pipeline(full, weights)(model.mod))
    result = top_k(runners, test_x, test_y)
    base = result["original"]["top1"]
    for name in runners:
        steps.append({"step": name, **result[name],
                      "top1_change_points": round((result[name]["top1"] - base) * 100, 2)})
    payload = {"model": "fmnist-inception", "labeled_set": test_desc, "calibration": description,
               "steps": steps, "n": result["n"], "end_to_end": e2e}
    md = markdown(payload)
    write("fmnist_inception_accuracy", payload, md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
