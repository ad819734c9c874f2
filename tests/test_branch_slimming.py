"""BranchSlimming: structural rewrite, channel order, plan/weights checks, fine-tune."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from tvm_rebirth import RebirthError, RebirthPlan, load_model
from tvm_rebirth.compile.build import Runner
from tvm_rebirth.learn.finetune import finetune
from tvm_rebirth.passes import Absorb, BranchSlimming, StreamlineSlimming, rebirth_pipeline
from tvm_rebirth.passes.site import weight_keys

from onnx_models import inception_model

RNG = np.random.default_rng(0)


def _params(shapes):
    return {name: RNG.standard_normal(shape).astype("float32") for name, shape in shapes.items()}


BEFORE_SHAPES = {
    "w1": (2, 4, 1, 1), "b1": (1, 2, 1, 1), "w3r": (3, 4, 1, 1), "b3r": (1, 3, 1, 1),
    "w3": (4, 3, 3, 3), "b3": (1, 4, 1, 1), "w5r": (2, 4, 1, 1), "b5r": (1, 2, 1, 1),
    "w5": (2, 2, 5, 5), "b5": (1, 2, 1, 1), "wp": (2, 4, 1, 1), "bp": (1, 2, 1, 1)}


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, 4, 8, 8), "float32"),
             w1: R.Tensor((2, 4, 1, 1), "float32"), b1: R.Tensor((1, 2, 1, 1), "float32"),
             w3r: R.Tensor((3, 4, 1, 1), "float32"), b3r: R.Tensor((1, 3, 1, 1), "float32"),
             w3: R.Tensor((4, 3, 3, 3), "float32"), b3: R.Tensor((1, 4, 1, 1), "float32"),
             w5r: R.Tensor((2, 4, 1, 1), "float32"), b5r: R.Tensor((1, 2, 1, 1), "float32"),
             w5: R.Tensor((2, 2, 5, 5), "float32"), b5: R.Tensor((1, 2, 1, 1), "float32"),
             wp: R.Tensor((2, 4, 1, 1), "float32"), bp: R.Tensor((1, 2, 1, 1), "float32")):
        with R.dataflow():
            c1 = R.nn.conv2d(x, w1)
            a1 = R.add(c1, b1)
            y1 = R.nn.relu(a1)
            c3r = R.nn.conv2d(x, w3r)
            a3r = R.add(c3r, b3r)
            r3 = R.nn.relu(a3r)
            c3 = R.nn.conv2d(r3, w3, padding=[1, 1, 1, 1])
            a3 = R.add(c3, b3)
            y3 = R.nn.relu(a3)
            c5r = R.nn.conv2d(x, w5r)
            a5r = R.add(c5r, b5r)
            r5 = R.nn.relu(a5r)
            c5 = R.nn.conv2d(r5, w5, padding=[2, 2, 2, 2])
            a5 = R.add(c5, b5)
            y5 = R.nn.relu(a5)
            mp = R.nn.max_pool2d(x, pool_size=[3, 3], strides=[1, 1], padding=[1, 1, 1, 1])
            cp = R.nn.conv2d(mp, wp)
            ap = R.add(cp, bp)
            yp = R.nn.relu(ap)
            out = R.concat([y1, y3, y5, yp], axis=1)
            R.output(out)
        return out


@I.ir_module
class Expected:
    """The default plan: 1x1 branch into the 3x3 conv, pool branch into the 5x5 conv whose
    reducer grows by the pool projection's width (2 + 2)."""

    @R.function
    def main(x: R.Tensor((1, 4, 8, 8), "float32"),
             w3r: R.Tensor((3, 4, 1, 1), "float32"), b3r: R.Tensor((1, 3, 1, 1), "float32"),
             w3: R.Tensor((6, 3, 3, 3), "float32"), b3: R.Tensor((1, 6, 1, 1), "float32"),
             w5r: R.Tensor((4, 4, 1, 1), "float32"), b5r: R.Tensor((1, 4, 1, 1), "float32"),
             w5: R.Tensor((4, 4, 5, 5), "float32"), b5: R.Tensor((1, 4, 1, 1), "float32")):
        with R.dataflow():
            c3r = R.nn.conv2d(x, w3r)
            a3r = R.add(c3r, b3r)
            r3 = R.nn.relu(a3r)
            c3 = R.nn.conv2d(r3, w3, padding=[1, 1, 1, 1])
            a3 = R.add(c3, b3)
            y13 = R.nn.relu(a3)
            c5r = R.nn.conv2d(x, w5r)
            a5r = R.add(c5r, b5r)
            r5 = R.nn.relu(a5r)
            c5 = R.nn.conv2d(r5, w5, padding=[2, 2, 2, 2])
            a5 = R.add(c5, b5)
            y5p = R.nn.relu(a5)
            out = R.concat([y13, y5p], axis=1)
            R.output(out)
        return out


def bind(mod, params):
    return relax.transform.BindParams("main", {k: tvm.runtime.tensor(v)
                                               for k, v in params.items()})(mod)


class _Model:  # the minimum RebirthPlan.from_model needs
    def __init__(self, mod, shape):
        self.mod, self.name, self.sha256, self.path = mod, "before", "0" * 64, "before"
        self.input_shapes = {"x": list(shape)}


def _random_weights(site, rng):
    arrays = {}
    for (_, wkey, bkey), conv in zip(weight_keys(site), site.new_conv):
        arrays[wkey] = rng.standard_normal(
            (conv.out_channels, conv.in_channels, *conv.kernel)).astype("float32")
        arrays[bkey] = rng.standard_normal(conv.out_channels).astype("float32")
    return arrays


def test_structural_rewrite_of_an_inception_module():
    before = bind(Before, _params(BEFORE_SHAPES))
    plan = RebirthPlan.from_model(_Model(before, (1, 4, 8, 8)))
    (site,) = plan.sites
    assert site.kind == "branch" and site.note == "4 branches -> 2"
    arrays = _random_weights(site, np.random.default_rng(1))
    after = tvm.transform.Sequential([BranchSlimming(plan, arrays)])(before)
    expected = {}
    for layer, (w, b) in {"conv2d_1": ("w3r", "b3r"), "conv2d_2": ("w3", "b3"),
                          "conv2d_3": ("w5r", "b5r"), "conv2d_4": ("w5", "b5")}.items():
        expected[w] = arrays[f"{site.id}/{layer}/weight"]
        expected[b] = arrays[f"{site.id}/{layer}/bias"].reshape(1, -1, 1, 1)
    tvm.ir.assert_structural_equal(after["main"], bind(Expected, expected)["main"])


@pytest.mark.parametrize("fraction", ["0.5", "0.75"])
def test_reducer_widths_as_a_fraction_of_carry(fraction):
    """--branch-widths F: every reducer at round(F x its carry width), at least 1; the
    receivers' last convs keep the merged branches' widths."""
    model = _Model(bind(Before, _params(BEFORE_SHAPES)), (1, 4, 8, 8))
    (carry,) = RebirthPlan.from_model(model).sites
    (scaled,) = RebirthPlan.from_model(model, branch_widths=fraction).sites
    for old, new in zip(carry.new_conv, scaled.new_conv):
        if new.kernel == [1, 1]:  # a reducer
            assert new.out_channels == max(1, round(float(fraction) * old.out_channels))
        else:
            assert new.out_channels == old.out_channels
    assert scaled.new_conv != carry.new_conv
    for bad in ("1.5", "0", "wide"):
        with pytest.raises(RebirthError, match="fraction of carry"):
            RebirthPlan.from_model(model, branch_widths=bad)


def test_channel_order_is_kept_even_when_receivers_are_not_adjacent():
    """1x1 branch (channel 0-1) into the 5x5 conv, pool branch (8-9) into the 3x3 conv: each
    receiver's output is split and the pieces concatenated in the original order, so a
    consumer reads every kept branch's channels where it always did."""
    params = _params(BEFORE_SHAPES)
    before = bind(Before, params)
    plan = RebirthPlan.from_model(_Model(before, (1, 4, 8, 8)))
    (site,) = plan.sites
    site.absorb = Absorb(pool_branch="conv2d_5", pool_into="conv2d_2",
                         one_by_one="conv2d_0", one_by_one_into="conv2d_4")
    convs = {c.replaces: c for c in site.new_conv}
    convs["conv2d_2"].out_channels = 4 + 2  # 3x3 then pool-proj
    convs["conv2d_4"].out_channels = 2 + 2  # 1x1 then 5x5
    convs["conv2d_3"].out_channels, convs["conv2d_4"].in_channels = 2, 2  # no carry
    convs["conv2d_1"].out_channels, convs["conv2d_2"].in_channels = 3, 3
    arrays = {}
    # receivers reproduce their own branch exactly; absorbed channels get a marker bias
    for layer, (w, b, own) in {"conv2d_1": ("w3r", "b3r", slice(0, 3)),
                               "conv2d_2": ("w3", "b3", slice(0, 4)),
                               "conv2d_3": ("w5r", "b5r", slice(0, 2)),
                               "conv2d_4": ("w5", "b5", slice(2, 4))}.items():
        conv = convs[layer]
        weight = np.zeros((conv.out_channels, conv.in_channels, *conv.kernel), "float32")
        bias = np.full(conv.out_channels, 1000.0, "float32")
        weight[own], bias[own] = params[w], params[b].reshape(-1)
        arrays[f"{site.id}/{layer}/weight"], arrays[f"{site.id}/{layer}/bias"] = weight, bias
    after = BranchSlimming(plan, arrays)(before)
    ops = [b.value.op.name for blk in after["main"].body.blocks for b in blk.bindings
           if isinstance(b.value, relax.Call) and hasattr(b.value.op, "name")]
    assert ops.count("relax.split") == 2 and "relax.nn.max_pool2d" not in ops
    x = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype("float32")
    ref, got = Runner(before)(x)[0], Runner(after)(x)[0]
    assert got.shape == ref.shape == (1, 10, 8, 8)
    kept = [2, 3, 4, 5, 6, 7]  # the 3x3 branch (2-5) and the 5x5 branch (6-7)
    np.testing.assert_allclose(got[:, kept], ref[:, kept], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[:, [0, 1, 8, 9]], 1000.0)  # absorbed: marker only


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    path = inception_model(tmp_path_factory.mktemp("inc") / "inc.onnx", pool_after=False)
    model = load_model(path)
    return model, RebirthPlan.from_model(model)


def test_wrong_weight_shape_names_the_site_and_key(inception):
    model, plan = inception
    (site,) = plan.sites
    arrays = _random_weights(site, np.random.default_rng(3))
    arrays["inc/output/inc/5x5/weight"] = np.zeros((12, 4, 5, 5), "float32")
    with pytest.raises(RebirthError, match=r"site 'inc/output': weight 'inc/output/inc/5x5/"
                                           r"weight' has shape \[12, 4, 5, 5\].*needs "
                                           r"\[12, 10, 5, 5\]"):
        BranchSlimming(plan, arrays)(model.mod)
    del arrays["inc/output/inc/3x3/bias"]
    with pytest.raises(RebirthError, match=r"no 'inc/output/inc/3x3/bias'"):
        BranchSlimming(plan, arrays)(model.mod)


def test_slimmed_module_is_not_slimmed_twice(inception):
    model, plan = inception
    arrays = _random_weights(plan.sites[0], np.random.default_rng(4))
    slim = BranchSlimming(plan, arrays)(model.mod)
    assert BranchSlimming(plan, arrays)(slim).same_as(slim)  # a no-op, not a second slimming
    with pytest.raises(RebirthError, match="site 'inc/output': not in the module"):
        BranchSlimming(plan, arrays)(slim.without_attr("rebirth_slimmed_sites"))


def test_finetune_learns_a_module_that_tracks_the_original(inception):
    model, plan = inception
    x = np.random.default_rng(5).standard_normal((64, 16, 28, 28)).astype("float32")
    weights, report = finetune(model, plan, x, "seeded normal")
    (entry,) = report["sites"]
    assert entry["id"] == "inc/output" and entry["kind"] == "branch"
    assert 0 < entry["rel_error"] < 0.6, entry
    slim = rebirth_pipeline(plan, weights)(model.mod)
    test = np.random.default_rng(6).standard_normal((1, 16, 28, 28)).astype("float32")
    ref, got = Runner(model.mod)(test)[0], Runner(slim)(test)[0]
    assert got.shape == ref.shape
    assert np.linalg.norm(got - ref) < 0.6 * np.linalg.norm(ref)
    ops = [b.value.op.name for blk in slim["main"].body.blocks for b in blk.bindings
           if isinstance(b.value, relax.Call) and hasattr(b.value.op, "name")]
    assert ops.count("relax.nn.conv2d") == 1 + 4 + 1  # stem, two receivers, tail


def test_streamline_then_branch_on_one_module(tmp_path):
    """A pool after the module makes its convs strided first; the branch merge then keeps
    that geometry and the module's name."""
    model = load_model(inception_model(tmp_path / "inc.onnx"))
    plan = RebirthPlan.from_model(model)
    assert [s.kind for s in plan.sites] == ["streamline", "branch"]
    x = np.random.default_rng(7).standard_normal((48, 16, 28, 28)).astype("float32")
    weights, report = finetune(model, plan, x, "seeded normal")
    assert [r["id"] for r in report["sites"]] == ["inc/output+pool3/3x3_s2", "inc/output"]
    streamlined = StreamlineSlimming(plan, weights)(model.mod)
    slim = BranchSlimming(plan, weights)(streamlined)
    strided = [b.value for blk in slim["main"].body.blocks for b in blk.bindings
               if getattr(getattr(b.value, "op", None), "name", "") == "relax.nn.conv2d"
               and [int(s) for s in b.value.attrs.strides] == [2, 2]]
    assert len(strided) == 2  # the two receivers' last convs
    test = x[:1]
    assert Runner(slim)(test)[0].shape == Runner(model.mod)(test)[0].shape


def test_parallel_1x1_convs_merge_exactly(tmp_path):
    from tvm_rebirth.passes import MergeParallelConvs

    model = load_model(inception_model(tmp_path / "inc.onnx", pool_after=False))
    merged = MergeParallelConvs()(model.mod)
    convs = [b.value for blk in merged["main"].body.blocks for b in blk.bindings
             if getattr(getattr(b.value, "op", None), "name", "") == "relax.nn.conv2d"]
    # stem, one wide 1x1 (1x1 + 3x3_reduce + 5x5_reduce = 8 + 12 + 4), 3x3, 5x5, pool_proj, tail
    assert [int(c.args[1].ty.shape.values[0]) for c in convs] == [24, 24, 16, 6, 6, 4]
    x = np.random.default_rng(8).standard_normal((1, 16, 28, 28)).astype("float32")
    np.testing.assert_allclose(Runner(merged)(x)[0], Runner(model.mod)(x)[0],
                               rtol=1e-4, atol=1e-4)
