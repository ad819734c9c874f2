"""FindRebirthSites on hand-written Relax and small real ONNX models."""

import json

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from tvm_rebirth.frontend.loader import load_model
from tvm_rebirth.passes import FindRebirthSites, find_rebirth_sites

from onnx_models import chain_model, inception_model, GraphMaker


def bind(mod, **arrays):
    rng = np.random.default_rng(0)
    params = {}
    for name, shape in arrays.items():
        params[name] = tvm.runtime.tensor(rng.standard_normal(shape).astype("float32"))
    return relax.transform.BindParams("main", params)(mod)


@I.ir_module
class ConvBiasReluPool:
    @R.function
    def main(x: R.Tensor((1, 4, 16, 16), "float32"), w: R.Tensor((8, 4, 3, 3), "float32"),
             b: R.Tensor((1, 8, 1, 1), "float32")):
        with R.dataflow():
            c = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
            cb = R.add(c, b)
            r = R.nn.relu(cb)
            p = R.nn.max_pool2d(r, pool_size=[3, 3], strides=[2, 2])
            R.output(p)
        return p


@I.ir_module
class FanOutBeforePool:
    @R.function
    def main(x: R.Tensor((1, 4, 16, 16), "float32"), w: R.Tensor((8, 4, 3, 3), "float32")):
        with R.dataflow():
            c = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
            r = R.nn.relu(c)
            p = R.nn.max_pool2d(r, pool_size=[2, 2], strides=[2, 2])
            s = R.sum(r, axis=[2, 3])  # a second reader of the relu output
            R.output(p, s)
        return (p, s)


@I.ir_module
class ConvReluConv:
    @R.function
    def main(x: R.Tensor((1, 4, 16, 16), "float32"), w: R.Tensor((8, 4, 3, 3), "float32"),
             w2: R.Tensor((8, 8, 3, 3), "float32")):
        with R.dataflow():
            c = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
            r = R.nn.relu(c)
            c2 = R.nn.conv2d(r, w2, padding=[1, 1, 1, 1])
            R.output(c2)
        return c2


def test_analysis_leaves_the_module_unchanged_and_records_the_site():
    before = bind(ConvBiasReluPool, w=(8, 4, 3, 3), b=(1, 8, 1, 1))
    after = FindRebirthSites()(before)
    tvm.ir.assert_structural_equal(after["main"], before["main"])
    (site,) = json.loads(str(after.attrs["rebirth_sites"]))
    assert site["id"] == "conv2d_0+max_pool2d_0"  # no source names: positions
    assert site["ops"] == ["conv2d", "relu", "max_pool2d"]
    assert site["exact"] is False
    (new,) = site["new_conv"]
    assert (new["kernel"], new["stride"], new["padding"]) == ([3, 3], [2, 2], [0, 0, 0, 0])
    assert site["input_hw"] == [16, 16] and site["output_hw"] == [7, 7]


@pytest.mark.parametrize("module, params", [
    (FanOutBeforePool, {"w": (8, 4, 3, 3)}),
    (ConvReluConv, {"w": (8, 4, 3, 3), "w2": (8, 8, 3, 3)}),
])
def test_chains_that_must_not_match(module, params):
    assert find_rebirth_sites(bind(module, **params)) == []


def test_weights_that_are_not_constants_are_not_sites():
    assert find_rebirth_sites(ConvBiasReluPool) == []  # w and b still function inputs


CHAINS = [
    # ops after conv1                    expected ops (after "conv2d")      exact
    (["relu", "max_pool2d", "lrn"], ["relu", "max_pool2d", "lrn"], False),
    (["relu", "lrn", "max_pool2d"], ["relu", "lrn", "max_pool2d"], False),
    (["lrn", "relu", "max_pool2d"], ["lrn", "relu", "max_pool2d"], False),
    (["batch_norm", "relu", "max_pool2d"], ["batch_norm", "relu", "max_pool2d"], False),
    (["max_pool2d", "max_pool2d"], ["max_pool2d", "max_pool2d"], False),
    (["batch_norm"], ["batch_norm"], True),
    (["batch_norm", "relu"], ["batch_norm", "relu"], True),
    (["avg_pool2d"], ["avg_pool2d"], True),
    (["batch_norm", "avg_pool2d"], ["batch_norm", "avg_pool2d"], True),
    (["avg_pool2d", "relu"], ["avg_pool2d", "relu"], True),
    (["relu", "avg_pool2d"], ["relu", "avg_pool2d"], False),
]


def _check_new_conv_shape(site, in_channels=4):
    """Relax's own shape inference must give the block's output shape for the new conv."""
    for new in site.new_conv:
        x = relax.Var("x", relax.TensorType([1, new.in_channels, *site.input_hw], "float32"))
        w = relax.Var("w", relax.TensorType(
            [new.out_channels, new.in_channels // new.groups, *new.kernel], "float32"))
        bb = relax.BlockBuilder()
        with bb.function("f", [x, w]):
            y = bb.emit(relax.op.nn.conv2d(x, w, strides=new.stride, padding=new.padding,
                                           groups=new.groups))
            bb.emit_func_output(y)
        shape = [int(v) for v in y.ty.shape.values]
        assert shape[2:] == list(site.output_hw), (site.id, new.describe())


@pytest.mark.parametrize("ops, expected, exact", CHAINS, ids=["-".join(c[0]) for c in CHAINS])
def test_streamline_chain_shapes_and_orders(tmp_path, ops, expected, exact):
    model = load_model(chain_model(tmp_path / "m.onnx", ops))
    (site,) = find_rebirth_sites(model.mod)
    assert site.kind == "streamline"
    assert site.ops == ["conv2d"] + expected
    assert site.exact is exact
    named = [f"{n}{i + 1}" for i, op in enumerate(ops) for n in
             {"max_pool2d": ["pool"], "avg_pool2d": ["ave"], "lrn": ["norm"],
              "batch_norm": ["bn"]}.get(op, [])]
    assert site.id == "+".join(["conv1"] + named)
    _check_new_conv_shape(site)
    if exact and "avg_pool2d" in ops:
        # closed form: a 3x3 conv followed by a 2x2/s2 average is one 4x4/s2 conv
        assert site.new_conv[0].kernel == [4, 4] and site.new_conv[0].stride == [2, 2]
        assert site.new_conv[0].padding == [1, 1, 1, 1]
    if ops == ["batch_norm"]:
        assert site.new_conv[0].to_dict() == site.old_conv[0].to_dict()


def test_grouped_conv_chain(tmp_path):
    model = load_model(chain_model(tmp_path / "g.onnx", ["relu", "lrn", "max_pool2d"], group=2))
    (site,) = find_rebirth_sites(model.mod)
    assert site.new_conv[0].groups == 2 and site.old_conv[0].groups == 2
    assert site.new_conv[0].in_channels == 4 and site.new_conv[0].out_channels == 8
    _check_new_conv_shape(site)


def test_ceil_mode_pool_gets_bottom_padding(tmp_path):
    g = GraphMaker((1, 4, 14, 14))
    x = g.maxpool(g.relu(g.conv("data", "conv1", 8, k=3), "relu1"), "pool1", k=3, s=2, ceil=1)
    path = g.save(tmp_path / "ceil.onnx", [g.conv(x, "tail", 4, k=1)])
    (site,) = find_rebirth_sites(load_model(path).mod)
    assert site.output_hw == [7, 7]  # floor mode would give 6
    assert site.new_conv[0].padding == [0, 0, 1, 1]
    _check_new_conv_shape(site)


def test_fan_out_inside_a_chain_stops_it(tmp_path):
    g = GraphMaker((1, 4, 16, 16))
    pool = g.maxpool(g.relu(g.conv("data", "conv1", 8), "relu1"), "pool1")
    norm = g.lrn(pool, "norm1")
    side = g.conv(pool, "side", 4, k=1)  # the pool output has two readers
    path = g.save(tmp_path / "fan.onnx", [g.conv(norm, "tail", 4, k=1), side])
    (site,) = find_rebirth_sites(load_model(path).mod)
    assert site.id == "conv1+pool1" and site.ops == ["conv2d", "relu", "max_pool2d"]


def test_inception_module_gives_a_branch_site_and_a_pool_after_concat(tmp_path):
    model = load_model(inception_model(tmp_path / "inc.onnx"))
    sites = {s.id: s for s in find_rebirth_sites(model.mod)}
    assert set(sites) == {"inc/output", "inc/output+pool3/3x3_s2"}
    pool = sites["inc/output+pool3/3x3_s2"]
    assert pool.kind == "streamline" and pool.ops == ["concat", "max_pool2d"]
    assert [c.replaces for c in pool.new_conv] == ["inc/1x1", "inc/3x3", "inc/5x5",
                                                   "inc/pool_proj"]
    assert all(c.stride == [2, 2] for c in pool.new_conv)
    _check_new_conv_shape(pool)
    branch = sites["inc/output"]
    assert branch.kind == "branch"
    assert branch.absorb.to_dict() == {"pool_branch": "inc/pool_proj", "pool_into": "inc/5x5",
                             "one_by_one": "inc/1x1", "one_by_one_into": "inc/3x3"}
    # receivers: 3x3 takes the 1x1 branch; 5x5 takes the pool branch, its reducer carrying
    # the pool branch's width; channels in concat order
    assert [(c.replaces, c.in_channels, c.out_channels) for c in branch.new_conv] == [
        ("inc/3x3_reduce", 24, 12), ("inc/3x3", 12, 8 + 16),
        ("inc/5x5_reduce", 24, 4 + 6), ("inc/5x5", 4 + 6, 6 + 6)]
    assert branch.note == "4 branches -> 2"


def test_kinds_filter(tmp_path):
    model = load_model(inception_model(tmp_path / "inc.onnx"))
    assert {s.kind for s in find_rebirth_sites(model.mod, kinds=["branch"])} == {"branch"}
    assert {s.kind for s in find_rebirth_sites(model.mod, kinds=["streamline"])} == {"streamline"}
    with pytest.raises(ValueError, match="unknown site kind"):
        FindRebirthSites(kinds=["vertical"])


def test_googlenet_sites():
    sites = find_rebirth_sites(load_model("googlenet").mod)
    streamline = [s for s in sites if s.kind == "streamline"]
    assert [s.id for s in streamline] == [
        "conv1/7x7_s2+pool1/3x3_s2+pool1/norm1", "conv2/3x3+conv2/norm2+pool2/3x3_s2",
        "inception_3b/output+pool3/3x3_s2", "inception_4e/output+pool4/3x3_s2"]
    assert streamline[0].ops == ["conv2d", "relu", "max_pool2d", "lrn"]
    assert streamline[1].ops == ["conv2d", "relu", "lrn", "max_pool2d"]
    # the paper's rebirth layers: conv1 7x7/s2 -> 7x7/s4, conv2 3x3/s1 -> 3x3/s2
    assert streamline[0].new_conv[0].kernel == [7, 7] and streamline[0].new_conv[0].stride == [4, 4]
    assert streamline[1].new_conv[0].kernel == [3, 3] and streamline[1].new_conv[0].stride == [2, 2]
    branch = [s for s in sites if s.kind == "branch"]
    assert [s.id for s in branch] == [f"inception_{m}/output" for m in
                                      ["3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b"]]
    assert all(s.absorb.pool_into.endswith("/5x5") for s in branch)
    for s in streamline:
        _check_new_conv_shape(s)


def test_googlenet_receptive_field_policy():
    sites = find_rebirth_sites(load_model("googlenet").mod, policy="keep-receptive-field",
                               kinds=["streamline"])
    assert sites[0].new_conv[0].kernel == [11, 11]  # 7 + (3 - 1) * 2
    assert sites[1].new_conv[0].kernel == [5, 5]
    assert [s.enabled for s in sites] == [True, True, False, False]  # pool3/pool4 opt-in


def test_alexnet_sites():
    sites = find_rebirth_sites(load_model("alexnet").mod)
    assert [(s.id, s.ops) for s in sites] == [
        ("conv1+norm1+pool1", ["conv2d", "relu", "lrn", "max_pool2d"]),
        ("conv2+norm2+pool2", ["conv2d", "relu", "lrn", "max_pool2d"]),
        ("conv5+pool5", ["conv2d", "relu", "max_pool2d"]),
    ]
    assert sites[1].new_conv[0].groups == 2 and sites[2].new_conv[0].groups == 2
    for s in sites:
        _check_new_conv_shape(s)
