"""StreamlineSlimming: structural rewrite, closed-form exact sites, weights checks."""


import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from tvm_rebirth import RebirthError, RebirthPlan, load_model
from tvm_rebirth.compile.build import Runner
from tvm_rebirth.passes import StreamlineSlimming, analyze_sites, exact_site_weights
from tvm_rebirth.transform import Rebirth
from tvm_rebirth.learn.weights import RebirthWeights

from onnx_models import chain_model, inception_model

RNG = np.random.default_rng(0)
W = RNG.standard_normal((8, 4, 3, 3)).astype("float32")
B = RNG.standard_normal((1, 8, 1, 1)).astype("float32")
W_NEW = RNG.standard_normal((8, 4, 3, 3)).astype("float32")
B_NEW = RNG.standard_normal(8).astype("float32")


def bind(mod, **params):
    return relax.transform.BindParams("main", {k: tvm.runtime.tensor(v)
                                               for k, v in params.items()})(mod)


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, 4, 16, 16), "float32"), w: R.Tensor((8, 4, 3, 3), "float32"),
             b: R.Tensor((1, 8, 1, 1), "float32")):
        with R.dataflow():
            c = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
            cb = R.add(c, b)
            r = R.nn.relu(cb)
            p = R.nn.max_pool2d(r, pool_size=[3, 3], strides=[2, 2])
            out = R.sum(p, axis=[1])
            R.output(out)
        return out


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((1, 4, 16, 16), "float32"), w: R.Tensor((8, 4, 3, 3), "float32"),
             b: R.Tensor((1, 8, 1, 1), "float32")):
        with R.dataflow():
            c = R.nn.conv2d(x, w, strides=[2, 2], padding=[0, 0, 0, 0])
            cb = R.add(c, b)
            r = R.nn.relu(cb)
            out = R.sum(r, axis=[1])
            R.output(out)
        return out


class _Model:  # the minimum RebirthPlan.from_model needs
    def __init__(self, mod):
        self.mod, self.name, self.sha256, self.path = mod, "before", "0" * 64, "before"
        self.input_shapes = {"x": [1, 4, 16, 16]}


def test_structural_rewrite_of_a_conv_relu_pool_chain():
    before = bind(Before, w=W, b=B)
    plan = RebirthPlan.from_model(_Model(before))
    (site,) = plan.sites
    weights = {f"{site.id}/weight": W_NEW, f"{site.id}/bias": B_NEW}
    after = tvm.transform.Sequential([StreamlineSlimming(plan, weights)])(before)
    expected = bind(Expected, w=W_NEW, b=B_NEW.reshape(1, 8, 1, 1))
    tvm.ir.assert_structural_equal(after["main"], expected["main"])


def test_structure_only_slimming_uses_seeded_placeholders():
    """weights=None: the same slimmed graph with seeded He-scaled weights (for inspecting
    and timing; the same every run), exact sites still in closed form."""
    from tvm_rebirth.passes import site_conv_weights

    before = bind(Before, w=W, b=B)
    plan = RebirthPlan.from_model(_Model(before))
    (site,) = plan.sites
    after = StreamlineSlimming(plan, None)(before)
    ((weight, bias),) = site_conv_weights(site, None)
    expected = bind(Expected, w=weight, b=bias.reshape(1, 8, 1, 1))
    tvm.ir.assert_structural_equal(after["main"], expected["main"])
    assert weight.shape == (8, 4, 3, 3) and not bias.any()
    assert 0.1 < weight.std() < 1.0  # He scale: sqrt(2 / 36)
    np.testing.assert_array_equal(weight, site_conv_weights(site, None)[0][0])


@pytest.mark.parametrize("ops", [["batch_norm"], ["avg_pool2d"], ["batch_norm", "avg_pool2d"],
                                 ["batch_norm", "relu"], ["avg_pool2d", "relu"]])
def test_exact_sites_match_the_original(tmp_path, ops):
    model = load_model(chain_model(tmp_path / "m.onnx", ops))
    plan = RebirthPlan.from_model(model)
    (site,) = plan.sites
    assert site.exact
    slim = StreamlineSlimming(plan, {})(model.mod)  # weights computed in closed form
    x = np.random.default_rng(1).standard_normal((1, 4, 32, 32)).astype("float32")
    ref, got = Runner(model.mod)(x)[0], Runner(slim)(x)[0]
    assert np.abs(ref - got).max() < 1e-4
    weight, bias = exact_site_weights(analyze_sites(model.mod), site.id)
    assert list(weight.shape[2:]) == site.new_conv[0].kernel


def test_pool_after_concat_becomes_strided_branch_convs(tmp_path):
    model = load_model(inception_model(tmp_path / "inc.onnx"))
    plan = RebirthPlan.from_model(model, kinds=["streamline"])
    (site,) = plan.sites
    rng = np.random.default_rng(2)
    weights = {}
    for conv in site.new_conv:
        shape = (conv.out_channels, conv.in_channels, *conv.kernel)
        weights[f"{site.id}/{conv.replaces}/weight"] = rng.standard_normal(shape).astype("f")
        weights[f"{site.id}/{conv.replaces}/bias"] = rng.standard_normal(conv.out_channels).astype("f")
    slim = StreamlineSlimming(plan, weights)(model.mod)
    ops = [b.value.op.name for blk in slim["main"].body.blocks for b in blk.bindings
           if isinstance(b.value, relax.Call) and hasattr(b.value.op, "name")]
    assert ops.count("relax.nn.max_pool2d") == 1  # only the inception pool branch is left
    strided = [b.value for blk in slim["main"].body.blocks for b in blk.bindings
               if getattr(getattr(b.value, "op", None), "name", "") == "relax.nn.conv2d"
               and [int(s) for s in b.value.attrs.strides] == [2, 2]]
    assert len(strided) == 4
    x = np.random.default_rng(3).standard_normal((1, 16, 28, 28)).astype("float32")
    assert Runner(slim)(x)[0].shape == Runner(model.mod)(x)[0].shape


@pytest.fixture()
def chain(tmp_path):
    model = load_model(chain_model(tmp_path / "m.onnx", ["relu", "max_pool2d"]))
    plan = RebirthPlan.from_model(model)
    (site,) = plan.sites
    arrays = {f"{site.id}/weight": np.zeros((8, 4, 3, 3), "f"), f"{site.id}/bias": np.zeros(8, "f")}
    return model, plan, site, arrays


def test_weights_for_another_plan_are_refused(chain, tmp_path):
    model, plan, site, arrays = chain
    path = tmp_path / "w.npz"
    RebirthWeights(arrays, plan_sha256="f" * 64).save(path)
    with pytest.raises(RebirthError, match="learned for plan ffffffffffff"):
        RebirthWeights.load(path, plan)
    with pytest.raises(RebirthError, match="learned for plan"):
        Rebirth(plan, RebirthWeights(arrays, "f" * 64))(model.mod)


def test_wrong_weight_shape_names_the_site(chain, tmp_path):
    model, plan, site, arrays = chain
    arrays[f"{site.id}/weight"] = np.zeros((8, 4, 5, 5), "f")
    with pytest.raises(RebirthError, match=r"site 'conv1\+pool2': weight 'conv1\+pool2/weight' "
                                           r"has shape \[8, 4, 5, 5\], the plan needs \[8, 4, 3, 3\]"):
        StreamlineSlimming(plan, arrays)(model.mod)
    path = tmp_path / "w.npz"
    RebirthWeights(arrays, plan.sha256).save(path)
    with pytest.raises(RebirthError, match="has shape"):
        RebirthWeights.load(path, plan)


def test_missing_weights_name_the_key(chain):
    model, plan, site, arrays = chain
    del arrays[f"{site.id}/bias"]
    with pytest.raises(RebirthError, match=r"no 'conv1\+pool2/bias'"):
        StreamlineSlimming(plan, arrays)(model.mod)


def test_plan_site_missing_from_the_module(chain, tmp_path):
    """Slimming twice is a no-op (the module records its slimmed sites); a site that is
    neither in the module nor recorded as slimmed is an error naming it."""
    model, plan, site, arrays = chain
    slim = StreamlineSlimming(plan, arrays)(model.mod)
    assert StreamlineSlimming(plan, arrays)(slim).same_as(slim)
    with pytest.raises(RebirthError, match=r"site 'conv1\+pool2': not in the module"):
        StreamlineSlimming(plan, arrays)(slim.without_attr("rebirth_slimmed_sites"))


def test_corrupt_weights_file(tmp_path, chain):
    path = tmp_path / "w.npz"
    path.write_bytes(b"garbage")
    with pytest.raises(RebirthError, match="not a weights .npz file"):
        RebirthWeights.load(path, chain[1])


def test_refitted_consumer_weights_replace_the_layer(chain):
    model, plan, site, arrays = chain
    tail_w = np.full((4, 8, 1, 1), 0.5, "f")
    arrays[f"{site.id}/refit/tail/weight"] = tail_w
    arrays[f"{site.id}/refit/tail/bias"] = np.arange(4, dtype="f")
    slim = StreamlineSlimming(plan, arrays)(model.mod)
    convs = {str(b.var.name): b.value for blk in slim["main"].body.blocks for b in blk.bindings
             if getattr(getattr(b.value, "op", None), "name", "") == "relax.nn.conv2d"}
    np.testing.assert_array_equal(convs["tail"].args[1].value.numpy(), tail_w)
    x = np.random.default_rng(5).standard_normal((1, 4, 32, 32)).astype("float32")
    out = Runner(slim)(x)[0]
    # the rebirth conv has zero weights and bias, so the tail sees zeros: output = its bias
    np.testing.assert_allclose(out, np.broadcast_to(np.arange(4, dtype="f")[None, :, None, None],
                                                    out.shape), atol=1e-6)


def test_refit_of_the_wrong_shape_names_the_layer(chain):
    model, plan, site, arrays = chain
    arrays[f"{site.id}/refit/tail/weight"] = np.zeros((4, 8, 3, 3), "f")
    arrays[f"{site.id}/refit/tail/bias"] = np.zeros(4, "f")
    with pytest.raises(RebirthError, match=r"refit of 'tail' has shapes \[4, 8, 3, 3\]"):
        StreamlineSlimming(plan, arrays)(model.mod)


def test_constant_folding_follows_permute_and_squeeze_axes():
    from tvm_rebirth.passes import evaluate_constant

    a = np.arange(24, dtype="float32").reshape(1, 2, 3, 4)
    expr = relax.op.squeeze(relax.op.permute_dims(relax.const(a), [0, 3, 1, 2]), axis=[0])
    np.testing.assert_array_equal(evaluate_constant(expr, {}), a.transpose(0, 3, 1, 2)[0])
