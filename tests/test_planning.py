"""Plans that pay: site blocks as modules of their own, the selection under a budget, and
`plan --select paying` end to end on real builds (this CPU and the emulated Cortex-A72)."""

import dataclasses
import itertools
import json
import random

import numpy as np
import pytest
import yaml

from tvm_rebirth import flow
from tvm_rebirth.compile.build import Runner
from tvm_rebirth.learn.finetune import capture, finetune, variant_errors
from tvm_rebirth.plan import RebirthPlan
from tvm_rebirth.passes import analyze_sites, block_difference, rebirth_pipeline
from tvm_rebirth.passes.blocks import site_block, site_groups
from tvm_rebirth.passes.dataflow import op_name
from tvm_rebirth.planning.costs import CostTable, entry_key
from tvm_rebirth.planning.selection import select_variants
from tvm_rebirth.planning.variants import OFF, Group, SiteChoices, site_choices

from onnx_models import GraphMaker, chain_model, inception_model
from test_cli import run

POOLED, BRANCH = "inc/output+pool3/3x3_s2", "inc/output"


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """An inception module with a stride-2 pool after it, and calibration images."""
    root = tmp_path_factory.mktemp("planning")
    path = inception_model(root / "inc.onnx")
    images = np.random.default_rng(0).random((16, 16, 28, 28), dtype=np.float32)
    np.save(root / "calib.npy", images)
    return {"root": root, "model": str(path), "calib": str(root / "calib.npy"),
            "images": images}


# ------------------------------------------------------------------------------ site blocks
def test_sites_sharing_a_conv_are_one_group_and_one_block(inception):
    model = flow.load(inception["model"])
    analysis = analyze_sites(model.mod)
    assert site_groups(analysis) == [[POOLED, BRANCH]]
    block = site_block(analysis, [POOLED, BRANCH])
    # the block holds the same sites (ids, ops, convs): the model's plan applies to it as is
    again = analyze_sites(block)
    assert [s.id for s in again.sites] == [POOLED, BRANCH]
    for site in again.sites:
        assert block_difference(analysis.site(site.id), site) is None
    params = block["main"].params
    assert len(params) == 1 and [int(d) for d in params[0].ty.shape.values] == [1, 24, 28, 28]
    # numerically the model's own slice: the fork's value in, the pooled concat's value out
    x = inception["images"][:2]
    values, _ = capture(model.mod, lambda a: {"fork": a.trace(BRANCH).fork,
                                              "out": a.trace(POOLED).end}, x, "slice")
    runner = Runner(block)
    for i in range(len(x)):
        np.testing.assert_allclose(runner(values["fork"][i:i + 1])[0], values["out"][i:i + 1],
                                   rtol=1e-5, atol=1e-5)


def test_a_streamline_block_is_exactly_its_chain(tmp_path):
    model = flow.load(str(chain_model(tmp_path / "c.onnx", ["relu", "max_pool2d", "lrn"])))
    analysis = analyze_sites(model.mod)
    (site,) = analysis.sites
    block = site_block(analysis, [site.id])
    ops = [op_name(b.value) for blk in block["main"].body.blocks for b in blk.bindings]
    layers = [o for o in ops if o in ("relax.nn.conv2d", "relax.nn.relu", "relax.nn.max_pool2d",
                                      "relax.nn.avg_pool3d")]
    # conv1, its ReLU, the pool, the LRN's window sum; not the model's tail conv
    assert layers == ["relax.nn.conv2d", "relax.nn.relu", "relax.nn.max_pool2d",
                      "relax.nn.avg_pool3d"]
    assert ops[-1] == "relax.divide"  # the LRN ends it
    assert [s.id for s in analyze_sites(block).sites] == [site.id]


def test_variants_are_distinct_and_costed_enabled(inception):
    choices = site_choices(flow.load(inception["model"]).mod)
    assert list(choices.variants[BRANCH]) == ["carry", "paper", "0.75"]
    assert list(choices.variants[POOLED]) == ["keep-kernel", "keep-receptive-field"]
    assert all(s.enabled for v in choices.variants.values() for s in v.values())
    (group,) = choices.groups
    assert group.combos[0] == {POOLED: OFF, BRANCH: OFF} and len(group.combos) == 12


# --------------------------------------------------------------------------- accuracy costs
def _assert_cost_is_the_output_error_alone(model, images, site_id, variant, monkeypatch,
                                           whole_network=False):
    """``variant_errors``' cost of ``variant`` of ``site_id`` is the held-out relative error
    of the model's output with only that variant slimmed, with the fine-tune's closed-form
    start (no block training, no mirror images), on a real build of that model; the whole
    slimmed network is built for it only when ``whole_network``."""
    from tvm_rebirth.learn import finetune as finetune_module

    built = []
    slimmed_alone = finetune_module._slimmed_alone
    monkeypatch.setattr(finetune_module, "_slimmed_alone",
                        lambda *args: built.append(args) or slimmed_alone(*args))
    choices = site_choices(model.mod)
    errors = variant_errors(model, choices, images)
    assert bool(built) == whole_network
    assert errors[site_id].keys() == choices.variants[site_id].keys()
    base = RebirthPlan.from_model(model)
    plan = dataclasses.replace(base, sites=[
        dataclasses.replace(choices.site(s.id, variant), enabled=True) if s.id == site_id
        else dataclasses.replace(s, enabled=False) for s in base.sites])
    weights, _ = finetune(model, plan, images, reconstruct_epochs=0, distill_epochs=0,
                          mirror=False)
    slimmed = Runner(rebirth_pipeline(plan, weights.arrays)(model.mod))
    original = Runner(model.mod)
    held = images[np.arange(len(images)) % 8 == 7]  # every 8th image, as the fits hold out
    got = np.concatenate([slimmed(x[None])[0] for x in held]).astype(np.float64)
    want = np.concatenate([original(x[None])[0] for x in held]).astype(np.float64)
    error = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert error > 1e-3  # a real approximation, not the original
    assert errors[site_id][variant] == pytest.approx(error, rel=1e-3)


@pytest.mark.parametrize("site_id, variant", [(POOLED, "keep-receptive-field"),
                                              (BRANCH, "paper")])
def test_a_variants_accuracy_cost_is_the_output_error_of_the_model_it_slims_alone(
        inception, site_id, variant, monkeypatch):
    """The layers after the site run from what the variant computes there (numpy)."""
    _assert_cost_is_the_output_error_alone(flow.load(inception["model"]), inception["images"],
                                           site_id, variant, monkeypatch)


def test_an_accuracy_cost_past_a_skip_connection_runs_the_slimmed_network(tmp_path,
                                                                          monkeypatch):
    """The layers after the site also read a var from before it (a residual add): the cost
    comes from the whole network with the variant slimmed."""
    g = GraphMaker((1, 4, 16, 16))
    t = g.relu(g.conv("data", "conv0", 8, k=1), "relu0")
    x = g.maxpool(g.relu(g.conv(t, "conv1", 8, k=3), "relu1"), "pool1", k=2, s=2)
    y = g.add(g.conv(x, "conv2", 8, k=1), g.avgpool(t, "skip", k=2, s=2), "sum")
    model = flow.load(g.save(tmp_path / "skip.onnx", [g.conv(y, "tail", 4, k=1)]))
    (site_id,) = site_choices(model.mod).variants
    images = np.random.default_rng(1).random((16, 4, 16, 16), dtype=np.float32)
    _assert_cost_is_the_output_error_alone(model, images, site_id, "keep-kernel", monkeypatch,
                                           whole_network=True)


# ------------------------------------------------------------------------------- selection
def _fake(groups, costs, memory=None, errors=None):
    """SiteChoices and CostTable from {group: [cost per combo]} (site variants named v1..)."""
    built, entries = [], {}
    for sites, combos in groups:
        group = Group(sites=sites, combos=combos)
        built.append(group)
        for i, combo in enumerate(combos):
            entries[entry_key(group, combo)] = {
                "cost": costs[group.key][i],
                "memory": (memory or {}).get(group.key, [0] * len(combos))[i]}
    variants = {s: {v: None for g in built for c in g.combos for s2, v in c.items()
                    if s2 == s and v != OFF} for g in built for s in g.sites}
    choices = SiteChoices(analysis=None, variants=variants, groups=built)
    table = CostTable(target="fake", unit="instructions", model_cost=100.0, entries=entries)
    zero = {s: {v: 0.0 for v in names} for s, names in variants.items()}
    return choices, table, errors or zero


def test_selection_never_picks_a_slower_or_bigger_variant():
    choices, table, errors = _fake(
        [(["a"], [{"a": OFF}, {"a": "v1"}, {"a": "v2"}]),
         (["b"], [{"b": OFF}, {"b": "v1"}]),
         (["c"], [{"c": OFF}, {"c": "v1"}])],
        {"a": [10, 12, 7], "b": [10, 11], "c": [10, 5]},
        memory={"c": [100, 101]})
    # the whole model's memory: the original's (0 here), plus what each chosen block adds
    def model_memory(combos):
        return sum(
            table.memory(g, c) - table.memory(g, g.combos[0])
            for g in choices.groups for c in combos if set(c) == set(g.sites))

    sel = select_variants(choices, table, errors, budget=None, model_memory=model_memory)
    assert sel.combos == {"a": {"a": "v2"}, "b": {"b": OFF}, "c": {"c": OFF}}
    assert sel.sites["b"]["reason"] == "v1: slower"
    assert sel.sites["c"]["reason"] == (
        "the slimmed model would plan more memory than the original")
    assert sel.sites["a"]["reason"].startswith("saves 30%")
    assert sel.predicted_cost == 97.0 and sel.predicted_speedup == pytest.approx(100 / 97)


def test_selection_spends_the_accuracy_budget_where_it_saves_most():
    choices, table, _ = _fake(
        [(["a"], [{"a": OFF}, {"a": "v1"}]), (["b"], [{"b": OFF}, {"b": "v1"}])],
        {"a": [10, 4], "b": [10, 6]})
    errors = {"a": {"v1": 0.5}, "b": {"v1": 0.2}}
    # errors of one output add in squares: 0.5 and 0.2 predict 0.539 together
    both = select_variants(choices, table, errors, budget=0.54)
    assert both.combos == {"a": {"a": "v1"}, "b": {"b": "v1"}}
    assert both.accuracy_cost == pytest.approx((0.5 ** 2 + 0.2 ** 2) ** 0.5)
    assert select_variants(choices, table, errors, budget=0.53).combos == {
        "a": {"a": "v1"}, "b": {"b": OFF}}
    sel = select_variants(choices, table, errors, budget=0.3)
    assert sel.combos == {"a": {"a": OFF}, "b": {"b": "v1"}}
    assert sel.sites["a"]["reason"] == "over the accuracy budget (0.3)"
    assert select_variants(choices, table, errors, budget=0.0).predicted_cost == 100.0


def test_latency_savings_within_the_tie_go_to_the_more_accurate_variant():
    """Timings of one block vary by ~10 % between runs: a variant saving nearly as much
    (within SAVING_TIE) at a lower accuracy cost wins; exact instruction counts never tie."""
    from tvm_rebirth.planning.selection import SAVING_TIE

    groups = [(["a"], [{"a": OFF}, {"a": "v1"}, {"a": "v2"}, {"a": "v3"}])]
    near, far = 10 - 6 * (1 - SAVING_TIE / 2), 10 - 6 * (1 - 2 * SAVING_TIE)
    errors = {"a": {"v1": 0.5, "v2": 0.3, "v3": 0.1}}
    choices, table, _ = _fake(groups, {"a": [10, 4, near, far]})
    assert select_variants(choices, table, errors, budget=None).combos["a"] == {"a": "v1"}
    latency = dataclasses.replace(table, unit="ms")
    sel = select_variants(choices, latency, errors, budget=None)
    assert sel.combos["a"] == {"a": "v2"}  # v3 saves 20 % less: no tie
    assert sel.sites["a"]["reason"].endswith("; ties v1 (within 10% of its saving) at a "
                                             "lower accuracy cost")
    # a budget v1 exceeds: the same choice
    assert select_variants(choices, latency, errors, budget=0.3).combos["a"] == {"a": "v2"}


def test_prediction_stays_within_the_model_when_blocks_sum_past_it():
    """Blocks timed one at a time may sum past the whole model (a loaded machine): their
    savings are scaled by model / blocks, never a negative predicted cost."""
    choices, table, errors = _fake(
        [(["a"], [{"a": OFF}, {"a": "v1"}]), (["b"], [{"b": OFF}, {"b": "v1"}])],
        {"a": [80, 20], "b": [120, 30]})  # blocks 200 of a model of 100
    sel = select_variants(choices, table, errors, budget=None)
    assert sel.combos == {"a": {"a": "v1"}, "b": {"b": "v1"}}
    assert sel.predicted_cost == pytest.approx(100 - 150 * 100 / 200)
    assert sel.predicted_speedup == pytest.approx(4.0)


def test_selection_is_the_exact_optimum():
    rng = random.Random(7)
    for _ in range(25):
        groups, costs, errors = [], {}, {}
        for g in range(rng.randint(1, 5)):
            name = f"s{g}"
            combos = [{name: OFF}] + [{name: f"v{i}"} for i in range(rng.randint(1, 3))]
            groups.append(([name], combos))
            costs[name] = [10.0] + [round(rng.uniform(4, 13), 2) for _ in combos[1:]]
            errors[name] = {c[name]: round(rng.uniform(0, 1), 2) for c in combos[1:]}
        budget = round(rng.uniform(0, 2), 2)
        choices, table, _ = _fake(groups, costs)
        sel = select_variants(choices, table, errors, budget=budget)
        best = 0.0
        names = [sites[0] for sites, _ in groups]
        for pick in itertools.product(*[range(len(c)) for _, c in groups]):
            picked = [(n, i, combos[i][n]) for n, (_, combos), i in zip(names, groups, pick)]
            if any(i and costs[n][i] >= 10 for n, i, _ in picked):
                continue  # slower (or no gain): never a candidate
            if sum(errors[n][v] ** 2 for n, i, v in picked if i) > budget ** 2 + 1e-9:
                continue
            best = max(best, sum(10 - costs[n][i] for n, i, _ in picked))
        assert 100 - sel.predicted_cost == pytest.approx(best)


# ------------------------------------------------------------------------------ end to end
def test_plan_select_paying_on_this_cpu(inception, tmp_path):
    plan_file = tmp_path / "p.yaml"
    code, out, err = run("plan", inception["model"], "--calib", inception["calib"],
                         "--images", "16", "-o", str(plan_file), "--json")
    assert code == 0, err
    selection = json.loads(out)["selection"]
    assert selection["unit"] == "ms" and selection["target"].startswith("host-")
    for site_id, entry in selection["sites"].items():
        assert {v["variant"] for v in entry["variants"]} == (
            {"carry", "paper", "0.75"} if site_id == BRANCH else {"keep-kernel",
                                                          "keep-receptive-field"})
        if entry["variant"] != OFF:
            assert entry["reason"].startswith("saves")
        for v in entry["variants"]:  # estimated where it can be chosen (slower ones need none)
            if v["pays"] == "yes":
                assert v["accuracy_cost"] is not None and v["accuracy_cost"] >= 0
    saved = sum(1 for e in selection["sites"].values() if e["variant"] != OFF)
    assert (selection["predicted_speedup"] > 1) == (saved > 0)
    # the file holds the chosen variants and validates against the model
    data = yaml.safe_load(plan_file.read_text())
    enabled = {s["id"] for s in data["sites"] if s["enabled"]}
    assert enabled == {s for s, e in selection["sites"].items() if e["variant"] != OFF}
    assert run("plan", inception["model"], "--check", str(plan_file))[0] == 0
    # planning again reads the cost table from the cache
    code, _, err = run("plan", inception["model"], "--calib", inception["calib"],
                       "--images", "16", "-o", str(tmp_path / "again.yaml"))
    assert code == 0 and "every block cost" in err and "every accuracy cost" in err, err
    # flags of the other selection mode are refused in one line
    code, _, err = run("plan", inception["model"], "--select", "all", "--target", "host")
    assert code == 2 and "only apply to --select paying" in err


def test_bench_reports_the_predicted_speedup(inception, tmp_path):
    plan_file, weights = tmp_path / "p.yaml", tmp_path / "w.npz"
    assert run("plan", inception["model"], "--calib", inception["calib"], "--images", "16",
               "-o", str(plan_file))[0] == 0
    selection = yaml.safe_load(plan_file.read_text())["selection"]
    if not any(e["variant"] != OFF for e in selection["sites"].values()):
        pytest.skip("no site pays on this CPU for this small module")
    code, _, err = run("finetune", inception["model"], "--plan", str(plan_file), "--calib",
                       inception["calib"], "-o", str(weights))
    assert code == 0, err
    code, out, err = run("bench", inception["model"], "--plan", str(plan_file), "--weights",
                         str(weights), "--calib", inception["calib"], "--rounds", "1", "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["predicted"] == {"speedup": selection["predicted_speedup"],
                                    "target": selection["target"], "unit": "ms"}


def test_exact_sites_are_planned_without_images_and_cost_no_accuracy(tmp_path):
    model = chain_model(tmp_path / "bn.onnx", ["batch_norm", "avg_pool2d"])  # exact folds
    code, out, err = run("plan", model, "--budget", "0", "-o", str(tmp_path / "p.yaml"),
                         "--json")
    assert code == 0, err  # no --calib needed: nothing is learned
    ((site_id, entry),) = json.loads(out)["selection"]["sites"].items()
    assert entry["variants"] == [{**entry["variants"][0], "variant": "exact",
                                  "accuracy_cost": 0.0}]
    pays = entry["variants"][0]["pays"]
    assert (entry["variant"] == "exact") == (pays == "yes"), entry  # budget 0 admits exact
    assert "accuracy" not in entry["reason"], entry


def test_build_rebirth_without_a_plan_plans_for_its_target(tmp_path):
    """build --rebirth: the sites measured to pay here, slimmed, compiled; the same as
    building with the plan `plan` writes."""
    model = chain_model(tmp_path / "bn.onnx", ["batch_norm", "avg_pool2d"])  # exact folds
    code, out, err = run("build", model, "--rebirth", "-o", str(tmp_path / "r.so"), "--json")
    assert code == 0, err
    assert json.loads(out)["variant"] == "rebirth" and "pay on this CPU" in err
    assert run("plan", model, "-o", str(tmp_path / "p.yaml"))[0] == 0
    code, out, err = run("build", model, "--plan", str(tmp_path / "p.yaml"), "-o",
                         str(tmp_path / "p.so"), "--json")
    assert code == 0, err
    assert (tmp_path / "r.so").stat().st_size == (tmp_path / "p.so").stat().st_size
    code, out, err = run("build", model, "--rebirth", "--plan", str(tmp_path / "p.yaml"))
    assert code == 2 and "--rebirth plans the model itself" in err
