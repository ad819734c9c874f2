"""What the planner predicts against what the fine-tuned model loses (fmnist-inception).

Two tables, each plan fine-tuned by the default fine-tune (2048 unlabeled images) and
evaluated on the 10 000 Fashion-MNIST test images:

1. every learned site variant that saves enough to be chosen, slimmed alone: its saving on
   this CPU and its accuracy cost (the held-out relative error of the logits, closed form on
   the 32 planning images) as `plan` measures them, and the top-1 change;
2. the default flow's plan (`plan --select paying`, this CPU) at each of ``--budgets``.

    python benchmarks/plan_accuracy.py [--budgets 0.35,0.5,0.75] [--no-variants] [--limit N]

writes benchmarks/results/plan_accuracy.{json,md}
"""

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

from _common import write  # noqa: E402
from run_all import plan_accuracy_text, plan_budgets_table, plan_variants_table  # noqa: E402

from tvm_rebirth import flow  # noqa: E402
from tvm_rebirth.compile.build import Runner  # noqa: E402
from tvm_rebirth.learn.calib import default_image_count  # noqa: E402
from tvm_rebirth.planning.selection import DEFAULT_BUDGET  # noqa: E402
from tvm_rebirth.plan import RebirthPlan  # noqa: E402
from tvm_rebirth.planning.variants import site_choices  # noqa: E402
from tvm_rebirth.report.measure import labeled_set, top_k  # noqa: E402

MODEL = "fmnist-inception"


def alone(model, choices, site_id, variant) -> RebirthPlan:
    """The plan with only ``variant`` of ``site_id`` enabled."""
    base = RebirthPlan.from_model(model)
    sites = [dataclasses.replace(choices.site(s.id, variant), enabled=True) if s.id == site_id
             else dataclasses.replace(s, enabled=False) for s in base.sites]
    return dataclasses.replace(base, sites=sites)


def chosen(plan) -> str:
    sites = plan.selection["sites"]
    picked = [f"{site_id} {entry['variant']}" for site_id, entry in sites.items()
              if entry["variant"] != "off"]
    return ", ".join(picked) or "none"


def markdown(data) -> str:
    parts = [f"# {data['model']}: the planner's predictions against the fine-tuned top-1\n"]
    if data["variants"]:
        parts += ["## Each variant alone\n", plan_variants_table(data), ""]
    parts += ["## The default flow's plan at each budget\n", plan_budgets_table(data), "",
              plan_accuracy_text(data)]
    return "\n".join(parts) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default=",".join(
        str(b) for b in sorted({DEFAULT_BUDGET, 0.5, 0.75})))
    ap.add_argument("--no-variants", action="store_true", help="skip the variants alone")
    ap.add_argument("--limit", type=int, help="evaluate on the first N test images")
    args = ap.parse_args()
    model = flow.load(MODEL)
    test_x, test_y, test_desc = labeled_set(model, args.limit)
    options = flow.RebirthOptions()
    runners, rows, plans = {"original": Runner(model.mod)}, [], []
    selections = {}
    for budget in sorted({float(b) for b in args.budgets.split(",")}):
        plan = flow.select_plan(model, flow.SelectOptions(budget=budget))
        selections[budget] = plan.selection
        start = time.time()
        runners[f"budget {budget}"] = Runner(flow.rebirth_model(model, options, plan=plan).mod)
        plans.append({"budget": budget, "sites": chosen(plan),
                      "predicted_speedup": plan.selection["predicted_speedup"],
                      "accuracy_cost": plan.selection["accuracy_cost"],
                      "seconds": round(time.time() - start, 1)})
        print(f"[plan_accuracy] budget {budget}: {plans[-1]['sites']}", file=sys.stderr)
    selection = next(iter(selections.values()))
    if not args.no_variants:
        choices = site_choices(model.mod)
        for site_id, entry in selection["sites"].items():
            for v in entry["variants"]:
                if v["pays"] != "yes" or v["accuracy_cost"] in (None, 0):
                    continue  # never chosen, or exact
                name = f"{site_id} {v['variant']}"
                start = time.time()
                runners[name] = Runner(flow.rebirth_model(
                    model, options, plan=alone(model, choices, site_id, v["variant"])).mod)
                rows.append({"site": site_id, "variant": v["variant"],
                             "saving_ms": v["saving"], "accuracy_cost": v["accuracy_cost"],
                             "seconds": round(time.time() - start, 1)})
                print(f"[plan_accuracy] {name} alone fine-tuned", file=sys.stderr)
    result = top_k(runners, test_x, test_y)
    for row in plans:
        row["top1"] = result[f"budget {row['budget']}"]["top1"]
    for row in rows:
        row["top1"] = result[f"{row['site']} {row['variant']}"]["top1"]
    payload = {"model": MODEL, "labeled_set": test_desc,
               "original_top1": result["original"]["top1"],
               "images": default_image_count(model),
               "planning_images": flow.SelectOptions().images,
               "target": selection["target"], "unit": selection["unit"],
               "default_budget": DEFAULT_BUDGET, "plans": plans, "variants": rows}
    md = markdown(payload)
    write("plan_accuracy", payload, md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
