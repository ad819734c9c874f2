"""The default fine-tune's spread over training seeds, every site slimmed (``plan --select
all``): for each model and ``--seeds`` (``finetune --seed``: batch order and blends; the
calibration images stay the same), top-1 change on the 10k Fashion-MNIST test images, the
distillation's kept epoch and rate, the stages that warned that more images would help, and
the fine-tune's seconds on this machine (2 threads).
Single runs of a setting closer than this spread do not rank it.

    python benchmarks/fmnist_seeds.py [--models fmnist-inception,fmnist-vgg] [--seeds 0,1,2]
                                      [--limit N]

writes benchmarks/results/fmnist_seeds.{json,md}
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

from _common import machine, write  # noqa: E402
from run_all import seeds_table, seeds_text  # noqa: E402

from tvm_rebirth import flow  # noqa: E402
from tvm_rebirth.compile.build import Runner  # noqa: E402
from tvm_rebirth.report.measure import labeled_set, top_k  # noqa: E402


def markdown(payload) -> str:
    return ("# Every site slimmed: the default fine-tune over training seeds\n\n"
            + seeds_table(payload) + "\n\n" + seeds_text(payload))


def model_rows(name, seeds, limit) -> dict:
    """{"model", "sites", "labeled_set", "calibration", "original_top1", "runs"} of one
    model: the default fine-tune of its every-site plan at each seed."""
    model = flow.load(name)
    plan = flow.find_plan(model)
    calib = flow.calibration(model, flow.RebirthOptions(), plan)
    test_x, test_y, test_desc = labeled_set(model, limit)
    runners, runs = {"original": Runner(model.mod)}, []
    for seed in seeds:
        start = time.time()
        result = flow.rebirth_model(model, flow.RebirthOptions(seed=seed), plan=plan,
                                    images=calib)
        distilled = result.fit.get("distillation", {})
        runs.append({"seed": seed, "seconds": round(time.time() - start, 1),
                     "kept_epoch": distilled.get("kept_epoch"),
                     "epochs": distilled.get("epochs"), "lr": distilled.get("lr"),
                     "skipped": distilled.get("skipped"),
                     "diverging": flow.diverging_stages(result.fit)})
        runners[f"seed {seed}"] = Runner(result.mod)
        print(f"{name} seed {seed} done", file=sys.stderr, flush=True)
    result = top_k(runners, test_x, test_y)
    base = result["original"]["top1"]
    for run in runs:
        run["top1"] = result[f"seed {run['seed']}"]["top1"]
        run["top1_change_points"] = round((run["top1"] - base) * 100, 2)
    changes = [r["top1_change_points"] for r in runs]
    return {"model": name, "sites": len(plan.enabled_sites()), "labeled_set": test_desc,
            "calibration": calib[1], "original_top1": base, "runs": runs,
            "mean_change_points": round(statistics.fmean(changes), 2),
            "spread_points": round(max(changes) - min(changes), 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="fmnist-inception,fmnist-vgg")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--limit", type=int, help="evaluate on the first N test images")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    payload = {"models": [model_rows(name, seeds, args.limit)
                          for name in args.models.split(",")],
               "machine": machine()}  # for the page's text (write records it too)
    md = markdown(payload)
    write("fmnist_seeds", payload, md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
