"""tvm-rebirth as a TVM user uses it: TVM's own ONNX importer, a plan from the module, the
fine-tune stage on a numpy array, ``tvm.compile`` with the registered pipeline, the Relax VM.

    mod = tvm_rebirth.from_onnx(onnx.load(path), shape_dict=...)   # TVM's importer + names
    plan = tvm_rebirth.RebirthPlan.from_module(mod)
    weights = tvm_rebirth.finetune(mod, plan, images)               # weights.meta: fit report
    ex = tvm.compile(mod, target, relax_pipeline=relax.get_pipeline(
        "rebirth", plan=plan, weights=weights))
    relax.VirtualMachine(ex, tvm.cpu())["main"](x)
"""

import numpy as np
import onnx
import pytest
import tvm
from tvm import relax

import tvm_rebirth
from tvm_rebirth.frontend import zoo

import onnx_models


def images(n, shape, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *shape[1:])).astype("float32")


def run(ex, x):
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return np.concatenate([vm["main"](tvm.runtime.tensor(x[i:i + 1])).numpy()
                           for i in range(len(x))])


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def user_flow(model_path, shape, n_images=16, keep=None, target="llvm"):
    """The whole flow as a TVM user writes it; returns (plan, weights, original output,
    rebirth output, the rebirth executable's module before build)."""
    mod = tvm_rebirth.from_onnx(onnx.load(str(model_path)), shape_dict={"data": list(shape)})
    plan = tvm_rebirth.RebirthPlan.from_module(mod)
    if keep is not None:
        plan = plan.with_enabled(keep)
    x = images(n_images, shape)
    weights = tvm_rebirth.finetune(mod, plan, x)
    assert weights.meta["sites"] and all(
        "rel_error" in s for s in weights.meta["sites"])  # the fit report travels along
    test = images(2, shape, seed=1)
    original = run(tvm.compile(mod, target), test)
    rebirth = run(tvm.compile(mod, target, relax_pipeline=relax.get_pipeline(
        "rebirth", plan=plan, weights=weights)), test)
    return plan, weights, original, rebirth


@pytest.mark.heavy
def test_googlenet_stock_import(tmp_path):
    """GoogLeNet from TVM's own importer: plan ids are the ONNX layer names, the plan is the
    one the CLI's loader makes, and its first sites (two streamline, one branch) slim and
    build."""
    path = zoo.zoo_path("googlenet")
    first = ["conv1/7x7_s2+pool1/3x3_s2+pool1/norm1", "conv2/3x3+conv2/norm2+pool2/3x3_s2",
             "inception_3a/output"]
    plan, weights, original, rebirth = user_flow(
        path, (1, 3, 224, 224), n_images=8, keep=lambda s: s.id in first)
    assert [s.id for s in plan.enabled_sites()] == first
    loaded = tvm_rebirth.RebirthPlan.from_model(tvm_rebirth.load_model("googlenet"))
    assert [s.id for s in loaded.sites] == [s.id for s in plan.sites]
    assert original.shape == rebirth.shape == (2, 1000)
    assert np.isfinite(rebirth).all()
    assert rel_err(rebirth, original) < 0.5


def test_cli_plan_applies_to_stock_import(tmp_path):
    """A plan written by the tool's loader (what `tvm-rebirth plan` saves) slims the module
    TVM's importer made, once the names are attached."""
    path = onnx_models.chain_model(tmp_path / "m.onnx", ["relu", "max_pool2d", "lrn"])
    loaded = tvm_rebirth.load_model(str(path))
    saved = tmp_path / "m.plan.yaml"
    tvm_rebirth.RebirthPlan.from_model(loaded).save(saved)
    plan = tvm_rebirth.RebirthPlan.load(saved)
    mod = tvm_rebirth.from_onnx(onnx.load(str(path)), shape_dict={"data": [1, 4, 32, 32]})
    assert [s.id for s in plan.sites] == ["conv1+pool2+norm3"]
    weights = tvm_rebirth.finetune(mod, plan, images(16, (1, 4, 32, 32)))
    slim = tvm_rebirth.transform.Rebirth(plan, weights)(mod)
    ops = {c.op.name for c in _calls(slim["main"])}
    assert "relax.nn.max_pool2d" not in ops


def _calls(func):
    found = []
    relax.analysis.post_order_visit(func, lambda e: found.append(e) if isinstance(
        e, relax.Call) and isinstance(e.op, tvm.ir.Op) else None)
    return found


def test_if_network(tmp_path):
    """An ONNX If (bindings outside dataflow blocks) names, plans, slims and builds."""
    path = onnx_models.if_model(tmp_path / "if.onnx")
    plan, weights, original, rebirth = user_flow(path, (1, 3, 32, 32))
    assert [s.id for s in plan.sites] == ["conv1+pool1"]
    assert rel_err(rebirth, original) < 0.6
    # the exported pass on TVM's own import names the layers the same way
    from tvm.relax.frontend.onnx import from_onnx as tvm_from_onnx

    model = onnx.load(str(path))
    named = tvm_rebirth.AttachLayerNames(tvm_rebirth.onnx_layer_names(model))(
        tvm_from_onnx(model, shape_dict={"data": [1, 3, 32, 32]}))
    assert [s.id for s in tvm_rebirth.RebirthPlan.from_module(named).sites] == ["conv1+pool1"]


@pytest.mark.parametrize("leaky", [False, True], ids=["prelu", "leakyrelu"])
def test_prelu_network(tmp_path, leaky):
    """PReLU / LeakyReLU chains are sites; the activation is re-applied after the rebirth
    conv (R.nn.prelu with the block's slopes), and the slimmed model tracks the original."""
    path = onnx_models.prelu_model(tmp_path / "p.onnx", leaky=leaky)
    plan, weights, original, rebirth = user_flow(path, (1, 3, 32, 32), n_images=32)
    act = "leaky_relu" if leaky else "prelu"
    assert [(s.id, s.ops) for s in plan.sites] == [
        ("conv1+pool1", ["conv2d", act, "max_pool2d"]),
        ("conv2+pool2", ["conv2d", act, "avg_pool2d"])]
    assert rel_err(rebirth, original) < 0.6
    mod = tvm_rebirth.from_onnx(onnx.load(str(path)), shape_dict={"data": [1, 3, 32, 32]})
    slim = tvm_rebirth.transform.Rebirth(plan, weights)(mod)
    ops = [c.op.name for c in _calls(slim["main"])]
    assert ops.count("relax.nn.prelu" if not leaky else "relax.nn.leakyrelu") == 2
    assert "relax.nn.max_pool2d" not in ops and "relax.nn.avg_pool2d" not in ops


def test_reasons_when_nothing_is_found(tmp_path):
    """Weights left as parameters and legalized modules say why nothing is found; pass order
    (DecomposeOpsForInference before the analysis) keeps the chain."""
    path = onnx_models.chain_model(tmp_path / "bn.onnx", ["batch_norm", "avg_pool2d", "relu"])
    model = onnx.load(str(path))
    shape = {"data": [1, 4, 32, 32]}
    mod = tvm_rebirth.from_onnx(model, shape_dict=shape)
    assert [s.ops for s in tvm_rebirth.RebirthPlan.from_module(mod).sites] == [
        ["conv2d", "batch_norm", "avg_pool2d", "relu"]]
    decomposed = relax.transform.DecomposeOpsForInference()(mod)
    assert [s.ops for s in tvm_rebirth.RebirthPlan.from_module(decomposed).sites] == [
        ["conv2d", "scale", "avg_pool2d", "relu"]]
    legalized = tvm_rebirth.RebirthPlan.from_module(relax.transform.LegalizeOps()(mod))
    assert not legalized.sites and "already legalized" in legalized.rejected[0]["reason"]
    unbound = tvm_rebirth.RebirthPlan.from_module(
        tvm_rebirth.from_onnx(model, shape_dict=shape, keep_params_in_input=True))
    assert not unbound.sites
    assert "not bound constants" in unbound.rejected[0]["reason"]


def test_pad_network(tmp_path):
    """Explicit ONNX Pad nodes (call_tir of topi's pad after TVM's import) are absorbed into
    the conv and the max pool, so both chains are sites, slimmed and built."""
    path = onnx_models.pad_model(tmp_path / "pad.onnx")
    plan, weights, original, rebirth = user_flow(path, (1, 3, 32, 32), n_images=32)
    assert [(s.id, s.old_conv[0].padding) for s in plan.sites] == [
        ("conv1+pool1", [1, 1, 1, 1]), ("conv2+pool2", [1, 1, 1, 1])]
    assert rel_err(rebirth, original) < 0.6
    mod = tvm_rebirth.from_onnx(onnx.load(str(path)), shape_dict={"data": [1, 3, 32, 32]})
    slim = tvm_rebirth.transform.Rebirth(plan, weights)(mod)
    assert not [g for g, f in slim.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]


def test_targets_presets_tags_dicts_and_targets():
    """Presets stay aliases; a TVM tag, a dict, its JSON and a Target are taken as they are;
    anything else is a one-line error naming what is accepted."""
    from tvm_rebirth.compile.targets import resolve_target, target_label

    assert resolve_target("cortex-a72").attrs["mcpu"] == "cortex-a72"
    rk = resolve_target("arm/rk3399")
    assert rk.attrs["mtriple"] == "aarch64-linux-gnu" and rk.attrs["model"] == "rk3399"
    spec = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"}
    assert resolve_target(spec).attrs["mcpu"] == "cortex-a55"
    import json
    assert str(resolve_target(json.dumps(spec))) == str(resolve_target(spec))
    target = tvm.target.Target("llvm")
    assert resolve_target(target) is target
    assert target_label("arm/rk3399") == "arm-rk3399" and target_label(spec) == "cortex-a55"
    for bad in ("nope/tag", '{"kind": "llvm",', '{"kind": "nokind"}'):
        with pytest.raises(tvm_rebirth.RebirthError, match="target"):
            resolve_target(bad)


def test_pipeline_builds_for_a_tag_target(tmp_path):
    """The registered pipeline takes the target tvm.compile gives it: a cross build for a
    TVM tag (no device needed to compile)."""
    from tvm_rebirth.compile.targets import resolve_target

    path = onnx_models.chain_model(tmp_path / "m.onnx", ["relu", "max_pool2d"])
    mod = tvm_rebirth.from_onnx(onnx.load(str(path)), shape_dict={"data": [1, 4, 32, 32]})
    plan = tvm_rebirth.RebirthPlan.from_module(mod)
    weights = tvm_rebirth.finetune(mod, plan, images(16, (1, 4, 32, 32)))
    ex = tvm.compile(mod, resolve_target("arm/rk3399"), relax_pipeline=relax.get_pipeline(
        "rebirth", plan=plan, weights=weights))
    assert ex is not None


def test_bench_compares_logits(tmp_path):
    """bench's error is the relative error of the logits (the input of a final softmax)."""
    from onnx import helper

    from tvm_rebirth.report.measure import bench_pair, with_logits

    path = onnx_models.chain_model(tmp_path / "m.onnx", ["relu", "max_pool2d"])
    model = onnx.load(str(path))
    tail = model.graph.output[0].name
    model.graph.node.append(helper.make_node("Softmax", [tail], ["prob"], name="prob", axis=1))
    model.graph.output[0].name = "prob"
    mod = tvm_rebirth.from_onnx(model, shape_dict={"data": [1, 4, 32, 32]})
    no_softmax = tvm_rebirth.from_onnx(onnx.load(str(path)))
    assert with_logits(no_softmax) is no_softmax
    plan = tvm_rebirth.RebirthPlan.from_module(mod)
    weights = tvm_rebirth.finetune(mod, plan, images(16, (1, 4, 32, 32)))
    slim = tvm_rebirth.transform.Rebirth(plan, weights)(mod)
    x = images(1, (1, 4, 32, 32), seed=2)
    result = bench_pair(mod, slim, x, rounds=1, number=1)
    assert result["compared"] == "logits"
    ref = run(tvm.compile(mod, "llvm"), x)
    assert 0 < result["rel_err"] < 1 and result["max_abs_err"] <= np.abs(ref).max()
    assert "tuned_functions" in result["original"] and "rel_err" not in result["original"]


def test_relu6_clip_network(tmp_path):
    """ONNX Clip (ReLU6), which TVM imports as call_tir max/min, is a chain activation: the
    site is found, slimmed with R.clip at its end and built."""
    path = onnx_models.clip_model(tmp_path / "clip.onnx")
    plan, weights, original, rebirth = user_flow(path, (1, 3, 32, 32), n_images=32)
    assert [(s.id, s.ops) for s in plan.sites] == [("conv1+pool1", ["conv2d", "clip",
                                                                     "max_pool2d"])]
    assert rel_err(rebirth, original) < 0.6
    mod = tvm_rebirth.from_onnx(onnx.load(str(path)), shape_dict={"data": [1, 3, 32, 32]})
    slim = tvm_rebirth.transform.Rebirth(plan, weights)(mod)
    assert [c.op.name for c in _calls(slim["main"])].count("relax.clip") == 1


def test_constant_pad_subgraph_is_folded_before_import(tmp_path):
    """Pads computed by a constant subgraph stop TVM's importer; tvm_rebirth.from_onnx and
    the CLI's loader fold it first, and the pad is then absorbed into the conv."""
    from tvm.relax.frontend.onnx import from_onnx as tvm_from_onnx

    path = onnx_models.constant_pads_model(tmp_path / "cp.onnx")
    with pytest.raises(Exception):
        tvm_from_onnx(onnx.load(str(path)), shape_dict={"data": [1, 3, 16, 16]})
    mod = tvm_rebirth.from_onnx(onnx.load(str(path)), shape_dict={"data": [1, 3, 16, 16]})
    plan = tvm_rebirth.RebirthPlan.from_module(mod)
    assert [(s.id, s.old_conv[0].padding) for s in plan.sites] == [("conv1+pool1", [1, 1, 1, 1])]
    loaded = tvm_rebirth.RebirthPlan.from_model(tvm_rebirth.load_model(str(path)))
    assert [s.id for s in loaded.sites] == ["conv1+pool1"]


def test_pipeline_without_plan_builds_the_original(tmp_path):
    """get_pipeline("rebirth") with no plan is the tool's build of the module as it is (our
    schedules), numerically TVM's own build; a plan without weights is refused up front."""
    path = onnx_models.chain_model(tmp_path / "m.onnx", ["relu", "max_pool2d", "lrn"])
    mod = tvm_rebirth.from_onnx(onnx.load(str(path)), shape_dict={"data": [1, 4, 32, 32]})
    x = images(2, (1, 4, 32, 32))
    ours = run(tvm.compile(mod, "llvm", relax_pipeline=relax.get_pipeline("rebirth")), x)
    np.testing.assert_allclose(ours, run(tvm.compile(mod, "llvm"), x), rtol=1e-4, atol=1e-4)
    with pytest.raises(tvm_rebirth.RebirthError, match="needs its weights"):
        relax.get_pipeline("rebirth", plan=tvm_rebirth.RebirthPlan.from_module(mod))
    assert "rebirth_slim" in relax.pipeline.PIPELINE_MAP
