"""Accuracy of a Fashion-MNIST zoo model (fmnist-inception, or fmnist-vgg) as sites are
slimmed one by one in network order (paper Table 2 style: fmnist-inception's conv1, conv2,
then each inception module; fmnist-vgg's conv blocks): top-1/top-5 on the 10k Fashion-MNIST test images with the default fine-tune on
``--images`` unlabeled images (default: the model's default count); then the branch sites
alone with both reducer-width presets (when the model has any); then, unless ``--no-e2e``,
all sites refined end to end with TVM's gradients two ways: distilling the original on
unlabeled images, and retraining with the Fashion-MNIST train labels and the original as
teacher (the paper's recipe).

    python benchmarks/fmnist_accuracy.py [--model fmnist-inception] [--images N] [--limit N]
                                         [--no-e2e]

writes benchmarks/results/<model>_accuracy.{json,md} (fmnist_inception_accuracy, ...)
"""

import argparse
import os
import sys

os.environ.setdefault("TVM_NUM_THREADS", "2")

from _common import write  # noqa: E402
from run_all import accuracy_table, end_to_end_text, fine_tune_text  # noqa: E402

from tvm_rebirth import flow  # noqa: E402
from tvm_rebirth.compile.build import Runner  # noqa: E402
from tvm_rebirth.learn.finetune import (DISTILL_EPOCHS, DISTILL_MIX,  # noqa: E402
                                        RECONSTRUCT_EPOCHS)
from tvm_rebirth.report.measure import labeled_set, top_k  # noqa: E402


def markdown(payload):
    return (f"# {payload['model']}: accuracy per slimming step\n\n" + accuracy_table(payload)
            + f"\n\n{payload['labeled_set']}; {fine_tune_text(payload)}."
            + end_to_end_text(payload))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fmnist-inception", choices=("fmnist-inception", "fmnist-vgg"))
    ap.add_argument("--images", type=int, help="unlabeled calibration images (default: sized "
                    "for the model, learn.calib.default_image_count)")
    ap.add_argument("--no-e2e", action="store_true", help="leave the end-to-end rows out")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--e2e-images", type=int, default=30000, help="unlabeled distillation")
    ap.add_argument("--e2e-epochs", type=int, default=10)
    ap.add_argument("--retrain-images", type=int, default=60000, help="labeled retraining")
    ap.add_argument("--retrain-epochs", type=int, default=8)
    args = ap.parse_args()
    model = flow.load(args.model)
    full = flow.find_plan(model)
    calib = flow.calibration(model, flow.RebirthOptions(images=args.images))
    description = calib[1]
    test_x, test_y, test_desc = labeled_set(model, args.limit)
    steps, runners = [], {"original": Runner(model.mod)}

    def rebirth(name, options=None, plan=None):
        """Fine-tune (on the shared calibration images) and slim; a runner named ``name``."""
        result = flow.rebirth_model(model, options, plan=plan, images=calib)
        runners[name] = Runner(result.mod)
        return result

    for k in range(1, len(full.sites) + 1):  # cumulative, in network order
        ids = {s.id for s in full.sites[:k]}
        rebirth(f"+ {full.sites[k - 1].id}", plan=full.with_enabled(lambda s: s.id in ids))
    for widths in ("carry", "paper") if any(s.kind == "branch" for s in full.sites) else ():
        rebirth(f"branch sites only ({widths} widths)",
                flow.RebirthOptions(kinds=("branch",), branch_widths=widths, select="all"))
    e2e = {}
    if not args.no_e2e:
        e2e["distillation"] = rebirth(
            "all sites + end-to-end distillation (unlabeled)",
            flow.RebirthOptions(select="all", e2e=flow.E2EOptions(True, args.e2e_images, args.e2e_epochs)),
            plan=full).fit["end_to_end"]
        e2e["retraining"] = rebirth(
            "all sites + retraining with labels",
            flow.RebirthOptions(select="all", e2e=flow.E2EOptions(True, args.retrain_images,
                                                    args.retrain_epochs, "source", flip=True)),
            plan=full).fit["end_to_end"]
    result = top_k(runners, test_x, test_y)
    base = result["original"]["top1"]
    for name in runners:
        steps.append({"step": name, **result[name],
                      "top1_change_points": round((result[name]["top1"] - base) * 100, 2)})
    payload = {"model": args.model, "labeled_set": test_desc, "calibration": description,
               "fine_tune": f"default fine-tune (closed form through the activation + block "
                            f"reconstruction, {RECONSTRUCT_EPOCHS} epochs per site; each image "
                            f"with its mirror image; then the whole network distilled on the "
                            f"same images to the original's output and each learned site's "
                            f"input, {DISTILL_EPOCHS} epochs, {DISTILL_MIX:.0%} of each batch "
                            f"blends of two images relabelled by the original, when it affords "
                            f"them)",
               "steps": steps, "n": result["n"], "end_to_end": e2e}
    md = markdown(payload)
    write(f"{args.model.replace('-', '_')}_accuracy", payload, md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
