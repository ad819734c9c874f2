"""The default fine-tune's distillation against its alternatives, each from the same start:
fmnist-inception (or ``--model fmnist-vgg``) with every site slimmed (``plan --select
all``), fine-tuned on ``--images`` unlabeled calibration images up to the distillation
(closed forms and block reconstruction, seed 0), then distilled once per variant (its rate,
epochs, blends, batch, held-out images, targets or seed: ``learn.finetune.DistillSettings``)
and evaluated on the 10k Fashion-MNIST test images: top-1 change against the original, and
how many test images each variant classifies differently from the default (what a top-1
difference between the two can be told apart from: about sqrt(disagreements) / 10000).

    python benchmarks/fmnist_distillation.py [--model fmnist-inception] [--images 2048]
        [--variants default,seed-1,...] [--limit N]

~2 minutes per variant on 2 cores; writes benchmarks/results/<model>_distillation.{json,md}
"""

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
from _common import machine, write  # noqa: E402
from run_all import distillation_table, distillation_text  # noqa: E402

from tvm_rebirth import flow  # noqa: E402
from tvm_rebirth.errors import RebirthError  # noqa: E402
from tvm_rebirth.learn.finetune import (DISTILL_EPOCHS, DistillSettings, distill,  # noqa: E402
                                        finetune)
from tvm_rebirth.learn.train import BatchedForward, batched_runs  # noqa: E402
from tvm_rebirth.passes import rebirth_pipeline  # noqa: E402
from tvm_rebirth.report.measure import labeled_set  # noqa: E402

DEFAULT = DistillSettings()
LONGER = DEFAULT.macs * 2  # 48 epochs cost more than the default budget pays for
# (name, what changes, epochs, settings, seed)
VARIANTS = [
    ("default", "the default", DISTILL_EPOCHS, DEFAULT, 0),
    ("seed-1", "training seed 1 (batch order, blends)", DISTILL_EPOCHS, DEFAULT, 1),
    ("seed-2", "training seed 2", DISTILL_EPOCHS, DEFAULT, 2),
    ("epochs-16", "16 epochs", 16, DEFAULT, 0),
    ("epochs-48", "48 epochs", 48, dataclasses.replace(DEFAULT, macs=LONGER), 0),
    ("lr-3e-3", "peak rate 3e-3", DISTILL_EPOCHS, dataclasses.replace(DEFAULT, lr=3e-3), 0),
    ("lr-2e-2", "peak rate 2e-2", DISTILL_EPOCHS, dataclasses.replace(DEFAULT, lr=2e-2), 0),
    ("mix-0", "no blends", DISTILL_EPOCHS, dataclasses.replace(DEFAULT, mix=0.0), 0),
    ("mix-0.25", "a quarter of each batch blends", DISTILL_EPOCHS,
     dataclasses.replace(DEFAULT, mix=0.25), 0),
    ("mix-0.75", "three quarters of each batch blends", DISTILL_EPOCHS,
     dataclasses.replace(DEFAULT, mix=0.75), 0),
    ("batch-16", "batches of 16 (twice the steps)", DISTILL_EPOCHS,
     dataclasses.replace(DEFAULT, batch=16), 0),
    ("batch-64", "batches of 64 (half the steps)", DISTILL_EPOCHS,
     dataclasses.replace(DEFAULT, batch=64), 0),
    ("no-held-out", "no held-out images (every image fitted; the fitted loss keeps the epoch)",
     DISTILL_EPOCHS, dataclasses.replace(DEFAULT, hold_out=False), 0),
    ("output-only", "the original's output the only target (no site inputs)", DISTILL_EPOCHS,
     dataclasses.replace(DEFAULT, site_inputs=False), 0),
]


def predictions(mod, images, batch=64) -> np.ndarray:
    """The top class of ``mod`` for each of ``images``."""
    logits, = batched_runs(BatchedForward(mod["main"], batch).run, images, batch,
                           "test images")
    return np.argmax(logits.reshape(len(images), -1), axis=1)


def markdown(payload) -> str:
    return (f"# {payload['model']}, every site slimmed: the distillation's variants\n\n"
            + distillation_table(payload) + "\n\n" + distillation_text(payload))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fmnist-inception",
                    choices=["fmnist-inception", "fmnist-vgg"])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    ap.add_argument("--limit", type=int, help="evaluate on the first N test images")
    args = ap.parse_args()
    known = {v[0]: v for v in VARIANTS}
    wanted = args.variants.split(",")
    unknown = [name for name in wanted if name not in known]
    if unknown or "default" not in wanted:
        sys.exit(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(known)})"
                 if unknown else "--variants: the default is what the others are compared with")
    model = flow.load(args.model)
    plan = flow.find_plan(model)
    images, description = flow.calibration(model, flow.RebirthOptions(images=args.images), plan)
    test_x, test_y, test_desc = labeled_set(model, args.limit)
    original = predictions(model.mod, test_x)
    start = time.time()
    weights, _ = finetune(model, plan, images, description, distill_epochs=0, seed=0)
    start_seconds = round(time.time() - start, 1)
    start_predictions = predictions(rebirth_pipeline(plan, weights.arrays)(model.mod), test_x)
    original_top1 = float(np.mean(original == test_y))
    rows, predicted = [], {}
    for name in wanted:
        _, what, epochs, settings, seed = known[name]
        arrays = dict(weights.arrays)
        report = distill(model, plan, arrays, images, epochs, settings, mirror=True, seed=seed)
        if "skipped" in report:
            raise RebirthError(f"variant {name}: the distillation was skipped "
                               f"({report['skipped']})")
        predicted[name] = predictions(rebirth_pipeline(plan, arrays)(model.mod), test_x)
        top1 = round(float(np.mean(predicted[name] == test_y)), 5)
        rows.append({"name": name, "what": what, "epochs": report["epochs"],
                     "settings": dataclasses.asdict(settings), "seed": seed,
                     "kept_epoch": report["kept_epoch"], "lr": report["lr"],
                     "held_out_loss": report["held_out_loss_after"],
                     "seconds": report["seconds"], "top1": top1,
                     "change_pt": round((top1 - original_top1) * 100, 2)})
        print(f"{name}: top-1 {top1 * 100:.2f} % ({report['seconds']} s)", file=sys.stderr)
    for row in rows:  # the default may come last
        row["disagreements"] = int(np.sum(predicted[row["name"]] != predicted["default"]))
    payload = {"model": args.model, "labeled_set": test_desc, "test_images": len(test_y),
               "sites": len(plan.enabled_sites()), "images": args.images,
               "original_top1": round(original_top1, 5), "start_seconds": start_seconds,
               "start_change_pt": round(
                   (float(np.mean(start_predictions == test_y)) - original_top1) * 100, 2),
               "default": f"{DISTILL_EPOCHS} epochs at a peak rate of {DEFAULT.lr:g}, "
                          f"{DEFAULT.mix:.0%} of each batch blends of two images relabelled "
                          f"by the original, batches of {DEFAULT.batch}, every 8th image "
                          f"held out, the output and each learned site's input as targets",
               "rows": rows, "machine": machine()}  # for the page's text (write records it too)
    write(args.model.replace("-", "_") + "_distillation", payload, markdown(payload))


if __name__ == "__main__":
    try:
        main()
    except RebirthError as error:
        sys.exit(f"fmnist_distillation: {error}")
