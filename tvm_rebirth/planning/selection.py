"""Selection: one variant per site group, the largest predicted saving under an accuracy
budget, by dynamic programming over the groups (a multiple-choice knapsack).

    selection = select_variants(choices, table, errors, budget=DEFAULT_BUDGET)
    plan = selected_plan(model, choices, selection)

A group's combo is a candidate only when it is predicted to pay: it saves more than
``MIN_GAIN`` of its block's measured cost (latency is noisy; instruction counts are exact,
so any saving counts there); latency savings within ``SAVING_TIE`` of each other are a
tie, which the combo with the lower accuracy cost wins. A learned variant's accuracy cost is
the held-out relative error of the model's output with that variant alone slimmed
(``learn.finetune.variant_errors``); independent errors of one output add in squares, so
the chosen variants' predicted error together, the square root of their squares' sum, is at
most ``budget``. Memory is not additive (the static
planner reuses storage across blocks), so it is checked on the whole model: with
``model_memory`` (chosen combos -> the slimmed model's planned activation bytes), chosen
groups are dropped, the one whose block grew most first, until the model plans no more than
the original. Every site's reason (chosen, tied, slower, bigger, over budget) is kept for
the plan.
"""

from __future__ import annotations

import dataclasses
import math

from .variants import OFF

# a latency saving below this share of the block's cost is not predicted to pay (noise)
MIN_GAIN = 0.03
# latency savings within this share of each other are a tie (kernel timings on these VMs
# vary by up to ~30 % between processes): the combo with the lower accuracy cost wins. E.g.
# fmnist-inception's stem on znver3: keep-kernel saves 0.0296 ms, keep-receptive-field
# 0.027 ms at a lower error (0.42 vs 0.51) and +0.65 pt top-1; GoogLeNet's stem 1.36 vs
# 0.86 ms stays keep-kernel. Instruction counts are exact: no ties there.
SAVING_TIE = 0.10
# default accuracy budget: the chosen variants' predicted relative error of the output,
# together, before the fine-tune. Measured on znver5 (benchmarks/plan_accuracy.py): at 0.35
# fmnist-inception keeps conv2 and inception_3a (0.30) and loses 0.81 points after the
# default fine-tune; at 0.5 it took the stem too (0.49) and lost 1.29, as much as at 0.75
# (0.74). The predicted error does not rank sites: the fine-tune repairs later sites better
# (alone, the stem's keep-receptive-field variant, 0.40, loses 0.46 where conv2's
# keep-kernel, 0.27, loses 0.65). GoogLeNet keeps its 13 sites (0.21), AlexNet 2 of 3
# (0.28); fmnist-vgg none (0.44 or more, its stem alone loses 0.86).
DEFAULT_BUDGET = 0.35
_STEP = 1e-4  # squared errors are summed in steps of this size


@dataclasses.dataclass
class Selection:
    """What ``select_variants`` chose and why."""

    combos: dict  # group key -> chosen combo {site id: variant}
    sites: dict  # site id -> {"variant", "reason", "variants": [{name, saving, ...}]}
    target: str
    unit: str
    budget: float | None
    accuracy_cost: float  # the chosen variants' predicted relative error of the output
    model_cost: float  # the original model, measured
    predicted_cost: float  # model_cost minus the chosen savings (see _block_scale)

    @property
    def predicted_speedup(self) -> float:
        return self.model_cost / self.predicted_cost if self.predicted_cost > 0 else 0.0

    def to_dict(self) -> dict:
        return {"target": self.target, "unit": self.unit, "budget": self.budget,
                "accuracy_cost": round(self.accuracy_cost, 4),
                "model_cost": _round(self.model_cost),
                "predicted_cost": _round(self.predicted_cost),
                "predicted_speedup": round(self.predicted_speedup, 3),
                "sites": self.sites}


def _round(value: float) -> float:
    return float(f"{value:.5g}")


def _squared(combo: dict, errors: dict) -> float:
    """The sum of the squared accuracy costs of ``combo``'s variants."""
    return sum(errors.get(s, {}).get(v, 0.0) ** 2 for s, v in combo.items() if v != OFF)


def _too_slow(group, combo, table) -> str | None:
    """Why ``combo`` saves too little to pay, or None when it saves enough."""
    base = table.cost(group, group.combos[0])
    saving = table.saving(group, combo)
    margin = MIN_GAIN * base if table.unit == "ms" else 0.0
    if saving <= margin:
        return "slower" if saving < 0 else "no measurable gain"
    return None


def _why_not(group, combo, table, errors) -> str | None:
    """Why ``combo`` is not predicted to pay, or None when it is."""
    slow = _too_slow(group, combo, table)
    if slow is None and any(errors.get(s, {}).get(v) is None
                            for s, v in combo.items() if v != OFF):
        return "no accuracy estimate"
    return slow


def fast_variants(choices, table) -> set:
    """{(site id, variant)} of every variant in a combo that saves enough to pay: the only
    variants whose accuracy cost the selection reads (the others need no estimate)."""
    return {(s, v) for group in choices.groups for combo in group.combos[1:]
            if _too_slow(group, combo, table) is None for s, v in combo.items() if v != OFF}


def select_variants(choices, table, errors, budget=DEFAULT_BUDGET,
                    model_memory=None) -> Selection:
    """The combo per group that maximises the summed saving with the predicted error (the
    square root of the chosen accuracy costs' summed squares) at most ``budget`` (None: no
    limit); ties go to the lower accuracy cost; then groups turned off until
    ``model_memory(chosen combos)`` is no more than with none chosen."""
    candidates = []
    for group in choices.groups:
        options = [(0.0, 0, group.combos[0])]  # (saving, accuracy steps, combo)
        for combo in group.combos[1:]:
            if _why_not(group, combo, table, errors) is None:
                # rounded up: the chosen costs never sum past the budget
                steps = math.ceil(_squared(combo, errors) / _STEP - 1e-9)
                options.append((table.saving(group, combo), steps, combo))
        candidates.append(_untied(options) if table.unit == "ms" else options)
    limit = None if budget is None else math.floor(budget ** 2 / _STEP + 1e-9)
    picks = _knapsack(candidates, limit)
    chosen = {g.key: combo for g, combo in zip(choices.groups, picks)}
    bigger = set()
    if model_memory is not None:
        chosen, bigger = _fit_memory(choices, table, chosen, model_memory)
    sites = _site_report(choices, table, errors, chosen, budget, bigger)
    saving = sum(table.saving(g, chosen[g.key]) for g in choices.groups) * \
        _block_scale(choices, table)
    return Selection(combos=chosen, sites=sites, target=table.target, unit=table.unit,
                     budget=budget, accuracy_cost=math.sqrt(sum(_squared(c, errors)
                                                                for c in chosen.values())),
                     model_cost=table.model_cost, predicted_cost=table.model_cost - saving)


def _untied(options) -> list:
    """``options`` ([(saving, accuracy steps, combo)], "off" first) without those that
    another saves nearly as much as (within SAVING_TIE) at a lower accuracy cost."""
    return [options[0]] + [
        option for option in options[1:]
        if not any(other[1] < option[1] and other[0] >= (1 - SAVING_TIE) * option[0]
                   for other in options[1:])]


def _block_scale(choices, table) -> float:
    """Blocks are measured one at a time; when their original costs sum past the whole
    model's (timing noise, a loaded machine, caches that a block alone finds cold), their
    savings are scaled down in that proportion, so the prediction stays within the model."""
    blocks = sum(table.cost(g, g.combos[0]) for g in choices.groups)
    return min(1.0, table.model_cost / blocks) if blocks > 0 else 1.0


def _knapsack(candidates, limit) -> list:
    """One option per group, [(saving, steps, combo), ...] each, maximising the summed
    saving with the summed steps at most ``limit`` (None: any); ties: fewer steps. Dynamic
    programming over the groups, keyed by the steps used."""
    best = {0: (0.0, 0, [])}  # steps used -> (saving, -steps, picks)
    for options in candidates:
        layer = {}
        for used, (saving, neg_steps, picks) in best.items():
            for gain, steps, combo in options:
                total = used + steps
                if limit is not None and total > limit:
                    continue
                value = (saving + gain, neg_steps - steps, picks + [combo])
                if total not in layer or value[:2] > layer[total][:2]:
                    layer[total] = value
        best = layer
    return max(best.values(), key=lambda v: v[:2])[2]


def _fit_memory(choices, table, chosen, model_memory) -> tuple:
    """(chosen with groups turned off, their keys): the group whose block plans the most
    extra memory first, until the slimmed model plans no more than with no group chosen
    (the same measurement on both sides)."""
    chosen, dropped = dict(chosen), set()
    if all(v == OFF for combo in chosen.values() for v in combo.values()):
        return chosen, dropped
    original = model_memory([])
    while model_memory(list(chosen.values())) > original:
        on = [g for g in choices.groups if any(v != OFF for v in chosen[g.key].values())]
        worst = max(on, key=lambda g: (table.memory(g, chosen[g.key])
                                       - table.memory(g, g.combos[0]),
                                       -table.saving(g, chosen[g.key])))
        chosen[worst.key] = worst.combos[0]
        dropped.add(worst.key)
    return chosen, dropped


def _site_report(choices, table, errors, chosen, budget, bigger=()) -> dict:
    """Per site: the chosen variant, why, and every variant's saving (with the group's other
    sites as chosen... off) and accuracy cost."""
    report = {}
    for group in choices.groups:
        pick = chosen[group.key]
        for site_id in group.sites:
            variants = []
            for name in choices.names(site_id):
                if name == OFF:
                    continue
                alone = {s: (name if s == site_id else OFF) for s in group.sites}
                variants.append({"variant": name, "saving": _round(table.saving(group, alone)),
                                 "accuracy_cost": errors.get(site_id, {}).get(name),
                                 "pays": _why_not(group, alone, table, errors) or "yes"})
            variant = pick[site_id]
            partners = [s for s in group.sites if s != site_id and pick[s] != OFF]
            if variant != OFF:
                share = table.saving(group, pick) / max(table.cost(group, group.combos[0]),
                                                        1e-12)
                reason = f"saves {share:.0%} of its block" + (
                    f" (with {', '.join(partners)})" if partners else "")
                mine = next(v for v in variants if v["variant"] == variant)
                tied = [v["variant"] for v in variants if v["pays"] == "yes"
                        and v["saving"] > mine["saving"] >= (1 - SAVING_TIE) * v["saving"]]
                if table.unit == "ms" and tied:
                    reason += (f"; ties {', '.join(tied)} (within {SAVING_TIE:.0%} of its "
                               "saving) at a lower accuracy cost")
            elif group.key in bigger:
                reason = "the slimmed model would plan more memory than the original"
            elif all(v["pays"] != "yes" for v in variants):
                reason = "; ".join(f"{v['variant']}: {v['pays']}" for v in variants)
            elif partners:
                reason = f"its group saves more with {', '.join(partners)} alone"
            else:
                reason = f"over the accuracy budget ({budget})"
            report[site_id] = {"variant": variant, "reason": reason, "variants": variants}
    return report


def selected_plan(model, choices, selection, kinds, policy="keep-kernel"):
    """The RebirthPlan of ``selection``: every site of ``kinds`` found, the chosen variant's
    convs enabled, the others off (keep-kernel convs), and the selection recorded."""
    from ..plan import RebirthPlan

    base = RebirthPlan.from_model(model, policy=policy, kinds=kinds)
    chosen = {s: v for combo in selection.combos.values() for s, v in combo.items()}
    sites = []
    for site in base.sites:
        variant = chosen.get(site.id, OFF)
        if variant == OFF:
            sites.append(dataclasses.replace(site, enabled=False))
        else:
            sites.append(dataclasses.replace(choices.site(site.id, variant), enabled=True))
    return dataclasses.replace(base, sites=sites, selection=selection.to_dict())
