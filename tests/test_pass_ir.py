"""The passes on hand-written Relax, in apache/tvm's style: Before/Expected TVMScript per case.

Like ``tests/python/relax/test_transform_canonicalize_bindings.py``: ``verify`` applies a
pass and compares the result with ``Expected`` by ``tvm.ir.assert_structural_equal``;
``verify_noop`` checks a pass leaves a module as it was. Parameters are bound as constants
(``relax.transform.BindParams``), which is how the passes see an imported model. Only the
public API of ``tvm_rebirth.passes`` is used.
"""

import re

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from tvm_rebirth import RebirthError, RebirthPlan
from tvm_rebirth.passes import (AbsorbPads, AttachLayerNames, BranchSlimming, LiftClips,
                                 MergeParallelConvs, PrepareForSites,
                                 StreamlineSlimming, rebirth_pipeline, weight_keys)



# -- helpers ---------------------------------------------------------------------------------
def bind(mod, params):
    """``mod`` with the named parameters of ``main`` bound as constants."""
    return relax.transform.BindParams("main", {k: tvm.runtime.tensor(np.asarray(v, "float32"))
                                               for k, v in params.items()})(mod)


def random_params(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype("float32") for name, shape in shapes.items()}


def apply(pass_, mod):
    return tvm.transform.Sequential([pass_])(mod)


def verify(pass_, before, expected):
    """``pass_(before)`` is structurally ``expected``: functions and module attributes (var
    names are not compared: check them by hand where they matter)."""
    after = apply(pass_, before)
    tvm.ir.assert_structural_equal(after, expected)
    return after


def slimmed(expected, *site_ids):
    """``expected`` with the record the slimming passes add: the ids of the sites applied."""
    return expected.with_attr("rebirth_slimmed_sites", sorted(site_ids))


def verify_noop(pass_, before):
    """``pass_`` gives ``before`` back unchanged."""
    return verify(pass_, before, before)


def run(mod, *inputs):
    """``mod["main"](*inputs)`` built by TVM's own pipeline (no schedules of ours)."""
    executable = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(executable, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x) for x in inputs])
    return out.numpy()


def assert_close(got, ref, rtol=1e-4):
    """|got - ref| <= rtol * max|ref| elementwise (a relative error over the tensor)."""
    assert got.shape == ref.shape
    err = np.abs(got - ref).max()
    assert err <= rtol * max(np.abs(ref).max(), 1e-12), (err, np.abs(ref).max())


def names_of(mod, ops):
    """Var names of the bindings of ``main`` whose value calls one of ``ops``, in order."""
    return [str(b.var.name) for blk in mod["main"].body.blocks for b in blk.bindings
            if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)
            and b.value.op.name in ops]


class _Model:  # the minimum RebirthPlan.from_model needs
    def __init__(self, mod, shape):
        self.mod, self.name, self.sha256, self.path = mod, "before", "0" * 64, "before"
        self.input_shapes = {"x": list(shape)}


def plan_for(mod, **kwargs):
    shape = [int(v) for v in mod["main"].params[0].ty.shape.values]
    return RebirthPlan.from_model(_Model(mod, shape), **kwargs)


# -- MergeParallelConvs ----------------------------------------------------------------------
TWO_SHAPES = {"wa": (3, 4, 1, 1), "ba": (1, 3, 1, 1), "wb": (5, 4, 1, 1), "bb": (1, 5, 1, 1)}


class TestMergeParallelConvs:
    @I.ir_module
    class TwoConvs:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"),
                 wa: R.Tensor((3, 4, 1, 1), "float32"), ba: R.Tensor((1, 3, 1, 1), "float32"),
                 wb: R.Tensor((5, 4, 1, 1), "float32"), bb: R.Tensor((1, 5, 1, 1), "float32")):
            with R.dataflow():
                ca = R.nn.conv2d(x, wa)
                aa = R.add(ca, ba)
                ra = R.nn.relu(aa)
                cb = R.nn.conv2d(x, wb)
                ab = R.add(cb, bb)
                rb = R.nn.relu(ab)
                out = R.concat([ra, rb], axis=1)
                R.output(out)
            return out

    @I.ir_module
    class TwoConvsMerged:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"),
                 w: R.Tensor((8, 4, 1, 1), "float32"), b: R.Tensor((1, 8, 1, 1), "float32")):
            with R.dataflow():
                wide = R.nn.conv2d(x, w)
                wide_b = R.add(wide, b)
                parts = R.split(wide_b, indices_or_sections=[3], axis=1)
                aa = parts[0]
                ra = R.nn.relu(aa)
                ab = parts[1]
                rb = R.nn.relu(ab)
                out = R.concat([ra, rb], axis=1)
                R.output(out)
            return out

    def test_two_1x1_convs_become_one_wide_conv_and_a_split(self):
        p = random_params(TWO_SHAPES)
        before = bind(self.TwoConvs, p)
        expected = bind(self.TwoConvsMerged, {
            "w": np.concatenate([p["wa"], p["wb"]]),
            "b": np.concatenate([p["ba"], p["bb"]], axis=1)})
        verify(MergeParallelConvs(), before, expected)

    @I.ir_module
    class ThreeConvs:
        """Three 1x1 convs on one tensor, one without bias, read in a different order."""

        @R.function
        def main(x: R.Tensor((1, 4, 6, 6), "float32"),
                 wa: R.Tensor((2, 4, 1, 1), "float32"), ba: R.Tensor((1, 2, 1, 1), "float32"),
                 wb: R.Tensor((3, 4, 1, 1), "float32"),
                 wc: R.Tensor((4, 4, 1, 1), "float32"), bc: R.Tensor((1, 4, 1, 1), "float32")):
            with R.dataflow():
                r = R.nn.relu(x)
                ca = R.nn.conv2d(r, wa)
                aa = R.add(ca, ba)
                cb = R.nn.conv2d(r, wb)
                cc = R.nn.conv2d(r, wc)
                ac = R.add(cc, bc)
                out = R.concat([ac, aa, cb], axis=1)
                R.output(out)
            return out

    @I.ir_module
    class ThreeConvsMerged:
        @R.function
        def main(x: R.Tensor((1, 4, 6, 6), "float32"),
                 w: R.Tensor((9, 4, 1, 1), "float32"), b: R.Tensor((1, 9, 1, 1), "float32")):
            with R.dataflow():
                r = R.nn.relu(x)
                wide = R.nn.conv2d(r, w)
                wide_b = R.add(wide, b)
                parts = R.split(wide_b, indices_or_sections=[2, 5], axis=1)
                aa = parts[0]
                cb = parts[1]
                ac = parts[2]
                out = R.concat([ac, aa, cb], axis=1)
                R.output(out)
            return out

    THREE_SHAPES = {"wa": (2, 4, 1, 1), "ba": (1, 2, 1, 1), "wb": (3, 4, 1, 1),
                    "wc": (4, 4, 1, 1), "bc": (1, 4, 1, 1)}

    def test_three_1x1_convs_one_without_bias(self):
        p = random_params(self.THREE_SHAPES, seed=1)
        before = bind(self.ThreeConvs, p)
        expected = bind(self.ThreeConvsMerged, {
            "w": np.concatenate([p["wa"], p["wb"], p["wc"]]),
            # the bias-less conv gets a zero bias in the wide add
            "b": np.concatenate([p["ba"], np.zeros((1, 3, 1, 1), "float32"), p["bc"]], axis=1)})
        verify(MergeParallelConvs(), before, expected)

    @pytest.mark.parametrize("module, shapes", [("TwoConvs", TWO_SHAPES),
                                                ("ThreeConvs", THREE_SHAPES)])
    def test_merged_module_computes_the_same(self, module, shapes):
        before = bind(getattr(self, module), random_params(shapes, seed=2))
        after = MergeParallelConvs()(before)
        shape = [int(v) for v in before["main"].params[0].ty.shape.values]
        x = np.random.default_rng(3).standard_normal(shape).astype("float32")
        ref, got = run(before, x), run(after, x)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)

    # -- no-op cases ----------------------------------------------------------------------
    @I.ir_module
    class SingleConv:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"),
                 wa: R.Tensor((3, 4, 1, 1), "float32"), ba: R.Tensor((1, 3, 1, 1), "float32")):
            with R.dataflow():
                ca = R.nn.conv2d(x, wa)
                aa = R.add(ca, ba)
                out = R.nn.relu(aa)
                R.output(out)
            return out

    @I.ir_module
    class DifferentInputs:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"),
                 wa: R.Tensor((3, 4, 1, 1), "float32"), ba: R.Tensor((1, 3, 1, 1), "float32"),
                 wb: R.Tensor((5, 4, 1, 1), "float32"), bb: R.Tensor((1, 5, 1, 1), "float32")):
            with R.dataflow():
                r = R.nn.relu(x)
                ca = R.nn.conv2d(x, wa)
                aa = R.add(ca, ba)
                cb = R.nn.conv2d(r, wb)
                ab = R.add(cb, bb)
                out = R.concat([aa, ab], axis=1)
                R.output(out)
            return out

    @I.ir_module
    class ThreeByThreeNextToOneByOne:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"),
                 wa: R.Tensor((3, 4, 3, 3), "float32"), ba: R.Tensor((1, 3, 1, 1), "float32"),
                 wb: R.Tensor((5, 4, 1, 1), "float32"), bb: R.Tensor((1, 5, 1, 1), "float32")):
            with R.dataflow():
                ca = R.nn.conv2d(x, wa, padding=[1, 1, 1, 1])
                aa = R.add(ca, ba)
                cb = R.nn.conv2d(x, wb)
                ab = R.add(cb, bb)
                out = R.concat([aa, ab], axis=1)
                R.output(out)
            return out

    @I.ir_module
    class StridedOneByOne:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"),
                 wa: R.Tensor((3, 4, 1, 1), "float32"), ba: R.Tensor((1, 3, 1, 1), "float32"),
                 wb: R.Tensor((5, 4, 1, 1), "float32"), bb: R.Tensor((1, 5, 1, 1), "float32")):
            with R.dataflow():
                ca = R.nn.conv2d(x, wa, strides=[2, 2])
                aa = R.add(ca, ba)
                cb = R.nn.conv2d(x, wb)
                ab = R.add(cb, bb)
                s = R.nn.max_pool2d(ab, pool_size=[2, 2], strides=[2, 2])
                out = R.concat([aa, s], axis=1)
                R.output(out)
            return out

    @I.ir_module
    class ConvIsTheOutput:
        """Two 1x1 convs on x, but one's result leaves the dataflow block (a function output):
        only one candidate is left, so nothing merges."""

        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"),
                 wa: R.Tensor((3, 4, 1, 1), "float32"), ba: R.Tensor((1, 3, 1, 1), "float32"),
                 wb: R.Tensor((5, 4, 1, 1), "float32"), bb: R.Tensor((1, 5, 1, 1), "float32")):
            with R.dataflow():
                ca = R.nn.conv2d(x, wa)
                aa = R.add(ca, ba)
                cb = R.nn.conv2d(x, wb)
                ab = R.add(cb, bb)
                rb = R.nn.relu(ab)
                R.output(aa, rb)
            return (aa, rb)

    @pytest.mark.parametrize("module, shapes", [
        ("SingleConv", {"wa": (3, 4, 1, 1), "ba": (1, 3, 1, 1)}),
        ("DifferentInputs", TWO_SHAPES),
        ("ThreeByThreeNextToOneByOne", {**TWO_SHAPES, "wa": (3, 4, 3, 3)}),
        ("StridedOneByOne", TWO_SHAPES),
        ("ConvIsTheOutput", TWO_SHAPES),
    ])
    def test_noop(self, module, shapes):
        verify_noop(MergeParallelConvs(), bind(getattr(self, module), random_params(shapes)))

    @I.ir_module
    class ScalarBias:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"), wa: R.Tensor((3, 4, 1, 1), "float32"),
                 wb: R.Tensor((5, 4, 1, 1), "float32"), bb: R.Tensor((1, 5, 1, 1), "float32")):
            with R.dataflow():
                ca = R.nn.conv2d(x, wa)
                aa = R.add(ca, R.const(0.5, "float32"))  # one bias for every channel
                cb = R.nn.conv2d(x, wb)
                ab = R.add(cb, bb)
                out = R.concat([aa, ab], axis=1)
                R.output(out)
            return out

    @I.ir_module
    class ScalarBiasMerged:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((8, 4, 1, 1), "float32"),
                 b: R.Tensor((1, 8, 1, 1), "float32")):
            with R.dataflow():
                wide = R.nn.conv2d(x, w)
                wide_b = R.add(wide, b)
                parts = R.split(wide_b, indices_or_sections=[3], axis=1)
                aa = parts[0]
                ab = parts[1]
                out = R.concat((aa, ab), axis=1)
                R.output(out)
            return out

    def test_scalar_bias_is_broadcast_to_the_channels(self):
        p = random_params({"wa": (3, 4, 1, 1), "wb": (5, 4, 1, 1), "bb": (1, 5, 1, 1)})
        expected = bind(self.ScalarBiasMerged, {
            "w": np.concatenate([p["wa"], p["wb"]]),
            "b": np.concatenate([np.full((1, 3, 1, 1), 0.5, "float32"), p["bb"]], axis=1)})
        verify(MergeParallelConvs(), bind(self.ScalarBias, p), expected)

    def test_weights_that_are_parameters_are_not_merged(self):
        verify_noop(MergeParallelConvs(), self.TwoConvs)  # nothing bound: no constants


# -- AttachLayerNames ------------------------------------------------------------------------
@I.ir_module
class Unnamed:
    @R.function
    def main(x: R.Tensor((1, 4, 8, 8), "float32"), w1: R.Tensor((6, 4, 3, 3), "float32"),
             w2: R.Tensor((2, 6, 1, 1), "float32"), w3: R.Tensor((2, 6, 1, 1), "float32")):
        with R.dataflow():
            lv = R.nn.conv2d(x, w1, padding=[1, 1, 1, 1])
            lv1 = R.nn.relu(lv)
            lv2 = R.nn.max_pool2d(lv1, pool_size=[2, 2], strides=[2, 2])
            lv3 = R.nn.conv2d(lv2, w2)
            lv4 = R.nn.conv2d(lv2, w3)
            gv = R.concat([lv3, lv4], axis=1)
            R.output(gv)
        return gv


@I.ir_module
class Named:
    I.module_attrs({"rebirth_layer_names": ["b1", "b2", "conv1", "out", "pool1"]})

    @R.function
    def main(x: R.Tensor((1, 4, 8, 8), "float32"), w1: R.Tensor((6, 4, 3, 3), "float32"),
             w2: R.Tensor((2, 6, 1, 1), "float32"), w3: R.Tensor((2, 6, 1, 1), "float32")):
        with R.dataflow():
            conv1 = R.nn.conv2d(x, w1, padding=[1, 1, 1, 1])
            lv1 = R.nn.relu(conv1)
            pool1 = R.nn.max_pool2d(lv1, pool_size=[2, 2], strides=[2, 2])
            b1 = R.nn.conv2d(pool1, w2)
            b2 = R.nn.conv2d(pool1, w3)
            out = R.concat([b1, b2], axis=1)
            R.output(out)
        return out


LAYER_OPS = ("relax.nn.conv2d", "relax.nn.max_pool2d", "relax.concat")
NAMES = {"conv2d": ["conv1", "b1", "b2"], "max_pool2d": ["pool1"], "concat": ["out"]}


def test_attach_layer_names():
    after = verify(AttachLayerNames(NAMES), Unnamed, Named)
    # assert_structural_equal ignores var names: check them and the attribute by hand
    assert names_of(after, LAYER_OPS) == names_of(Named, LAYER_OPS) == [
        "conv1", "pool1", "b1", "b2", "out"]
    assert names_of(after, ("relax.nn.relu",)) == ["lv1"]  # not a layer: left alone
    assert [str(n) for n in after.attrs["rebirth_layer_names"]] == [
        "b1", "b2", "conv1", "out", "pool1"]
    assert isinstance(after["main"].body.body, relax.Var)
    assert str(after["main"].body.body.name) == "out"  # the output var is renamed too


def test_attach_layer_names_skips_a_kind_whose_count_differs():
    names = {"conv2d": ["conv1", "b1"], "max_pool2d": ["pool1"]}  # 2 names for 3 convs
    after = verify(AttachLayerNames(names), Unnamed,
                   Unnamed.with_attr("rebirth_layer_names", ["pool1"]))
    assert names_of(after, LAYER_OPS) == ["lv", "pool1", "lv3", "lv4", "gv"]


def test_attach_layer_names_with_no_match_renames_nothing():
    # the IR is unchanged; the attribute still says which names are attached: none
    after = verify(AttachLayerNames({"conv2d": ["only"], "lrn": ["norm1"]}), Unnamed,
                   Unnamed.with_attr("rebirth_layer_names", []))
    assert names_of(after, LAYER_OPS) == names_of(Unnamed, LAYER_OPS)


# -- a conv + relu + max-pool + LRN chain (the ONNX frontend's LRN decomposition) -----------
@I.ir_module
class ConvReluPoolLRN:
    @R.function
    def main(x: R.Tensor((1, 4, 16, 16), "float32"), w: R.Tensor((8, 4, 3, 3), "float32"),
             b: R.Tensor((1, 8, 1, 1), "float32")):
        with R.dataflow():
            lv = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
            lv1 = R.add(lv, b)
            lv2 = R.nn.relu(lv1)
            lv3 = R.nn.max_pool2d(lv2, pool_size=[3, 3], strides=[2, 2])
            # LRN(size=5, alpha=1e-4, beta=0.75, bias=1) as the ONNX importer emits it
            lv4 = R.multiply(lv3, lv3)
            lv5 = R.expand_dims(lv4, axis=[1])
            lv6 = R.nn.avg_pool3d(lv5, pool_size=[5, 1, 1], strides=[1, 1, 1],
                                  padding=[2, 0, 0, 2, 0, 0], count_include_pad=True)
            lv7 = R.squeeze(lv6, axis=[1])
            lv8 = R.multiply(lv7, R.const(1e-4, "float32"))
            lv9 = R.add(lv8, R.const(1.0, "float32"))
            lv10 = R.power(lv9, R.const(0.75, "float32"))
            lv11 = R.divide(lv3, lv10)
            gv = R.sum(lv11, axis=[1])
            R.output(gv)
        return gv


@I.ir_module
class ConvReluPoolLRNNamed:
    I.module_attrs({"rebirth_layer_names": ["conv1", "norm1", "pool1"]})

    @R.function
    def main(x: R.Tensor((1, 4, 16, 16), "float32"), w: R.Tensor((8, 4, 3, 3), "float32"),
             b: R.Tensor((1, 8, 1, 1), "float32")):
        with R.dataflow():
            conv1 = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
            lv1 = R.add(conv1, b)
            lv2 = R.nn.relu(lv1)
            pool1 = R.nn.max_pool2d(lv2, pool_size=[3, 3], strides=[2, 2])
            lv4 = R.multiply(pool1, pool1)
            lv5 = R.expand_dims(lv4, axis=[1])
            lv6 = R.nn.avg_pool3d(lv5, pool_size=[5, 1, 1], strides=[1, 1, 1],
                                  padding=[2, 0, 0, 2, 0, 0], count_include_pad=True)
            lv7 = R.squeeze(lv6, axis=[1])
            lv8 = R.multiply(lv7, R.const(1e-4, "float32"))
            lv9 = R.add(lv8, R.const(1.0, "float32"))
            lv10 = R.power(lv9, R.const(0.75, "float32"))
            norm1 = R.divide(pool1, lv10)
            gv = R.sum(norm1, axis=[1])
            R.output(gv)
        return gv


@I.ir_module
class ConvReluPoolLRNSlimmed:
    @R.function
    def main(x: R.Tensor((1, 4, 16, 16), "float32"), w: R.Tensor((8, 4, 3, 3), "float32"),
             b: R.Tensor((1, 8, 1, 1), "float32")):
        with R.dataflow():
            lv = R.nn.conv2d(x, w, strides=[2, 2], padding=[0, 0, 0, 0])
            lv1 = R.add(lv, b)
            lv2 = R.nn.relu(lv1)
            gv = R.sum(lv2, axis=[1])
            R.output(gv)
        return gv


LRN_SHAPES = {"w": (8, 4, 3, 3), "b": (1, 8, 1, 1)}


def test_attach_layer_names_finds_the_decomposed_lrn():
    before = bind(ConvReluPoolLRN, random_params(LRN_SHAPES))
    names = {"conv2d": ["conv1"], "max_pool2d": ["pool1"], "lrn": ["norm1"]}
    after = verify(AttachLayerNames(names), before,
                   bind(ConvReluPoolLRNNamed, random_params(LRN_SHAPES)))
    assert names_of(after, ("relax.nn.conv2d", "relax.nn.max_pool2d", "relax.divide")) == [
        "conv1", "pool1", "norm1"]
    assert [str(n) for n in after.attrs["rebirth_layer_names"]] == ["conv1", "norm1", "pool1"]
    # the names flow into the site id
    (site,) = plan_for(after).sites
    assert site.id == "conv1+pool1+norm1"


def test_lrn_decomposition_is_the_onnx_importers(tmp_path):
    """The hand-written LRN above is binding for binding what the ONNX frontend emits."""
    from onnx_models import chain_model

    from tvm_rebirth import load_model

    model = load_model(chain_model(tmp_path / "m.onnx", ["relu", "max_pool2d", "lrn"],
                                   shape=(1, 4, 16, 16)))

    def lrn_bindings(mod):
        bindings = [b for blk in mod["main"].body.blocks for b in blk.bindings]
        pool = next(i for i, b in enumerate(bindings) if isinstance(b.value, relax.Call)
                    and b.value.op.name == "relax.nn.max_pool2d")
        return bindings[pool + 1: pool + 9]

    ours, imported = lrn_bindings(ConvReluPoolLRN), lrn_bindings(model.mod)
    assert [b.value.op.name for b in imported][-1] == "relax.divide"
    for a, b in zip(ours, imported):
        tvm.ir.assert_structural_equal(a.value, b.value, map_free_vars=True)
    (site,) = plan_for(bind(ConvReluPoolLRN, random_params(LRN_SHAPES))).sites
    (real,) = RebirthPlan.from_model(model).sites
    assert site.ops == real.ops == ["conv2d", "relu", "max_pool2d", "lrn"]


# -- StreamlineSlimming ----------------------------------------------------------------------
class TestStreamlineSlimming:
    def test_conv_relu_pool_lrn_chain(self):
        before = bind(ConvReluPoolLRN, random_params(LRN_SHAPES))
        plan = plan_for(before)
        (site,) = plan.sites
        assert site.ops == ["conv2d", "relu", "max_pool2d", "lrn"] and not site.exact
        (new,) = site.new_conv
        assert (new.kernel, new.stride, new.padding) == ([3, 3], [2, 2], [0, 0, 0, 0])
        (_, wkey, bkey), = weight_keys(site)
        new_params = random_params({"w": (8, 4, 3, 3), "b": (8,)}, seed=7)
        weights = {wkey: new_params["w"], bkey: new_params["b"]}
        expected = bind(ConvReluPoolLRNSlimmed,
                        {"w": new_params["w"], "b": new_params["b"].reshape(1, 8, 1, 1)})
        verify(StreamlineSlimming(plan, weights), before, slimmed(expected, site.id))

    @I.ir_module
    class ConvBN:
        @R.function
        def main(x: R.Tensor((1, 3, 10, 10), "float32"), w: R.Tensor((6, 3, 3, 3), "float32"),
                 b: R.Tensor((1, 6, 1, 1), "float32"), gamma: R.Tensor((6,), "float32"),
                 beta: R.Tensor((6,), "float32"), mean: R.Tensor((6,), "float32"),
                 var: R.Tensor((6,), "float32")):
            with R.dataflow():
                c = R.nn.conv2d(x, w, strides=[2, 2], padding=[1, 1, 1, 1])
                cb = R.add(c, b)
                # inference BN, as the ONNX importer emits it (Relax's default is training=True)
                bn = R.nn.batch_norm(cb, gamma, beta, mean, var, axis=1, epsilon=1e-5,
                                     training=False)
                y = bn[0]
                r = R.nn.relu(y)
                gv = R.sum(r, axis=[1])
                R.output(gv)
            return gv

    @I.ir_module
    class ConvTrainingBN:
        @R.function
        def main(x: R.Tensor((1, 3, 10, 10), "float32"), w: R.Tensor((6, 3, 3, 3), "float32"),
                 b: R.Tensor((1, 6, 1, 1), "float32"), gamma: R.Tensor((6,), "float32"),
                 beta: R.Tensor((6,), "float32"), mean: R.Tensor((6,), "float32"),
                 var: R.Tensor((6,), "float32")):
            with R.dataflow():
                c = R.nn.conv2d(x, w, strides=[2, 2], padding=[1, 1, 1, 1])
                cb = R.add(c, b)
                bn = R.nn.batch_norm(cb, gamma, beta, mean, var, axis=1, epsilon=1e-5,
                                     training=True)  # normalises with the batch's statistics
                y = bn[0]
                r = R.nn.relu(y)
                gv = R.sum(r, axis=[1])
                R.output(gv)
            return gv

    @I.ir_module
    class ConvBNFolded:
        @R.function
        def main(x: R.Tensor((1, 3, 10, 10), "float32"), w: R.Tensor((6, 3, 3, 3), "float32"),
                 b: R.Tensor((1, 6, 1, 1), "float32")):
            with R.dataflow():
                c = R.nn.conv2d(x, w, strides=[2, 2], padding=[1, 1, 1, 1])
                cb = R.add(c, b)
                r = R.nn.relu(cb)
                gv = R.sum(r, axis=[1])
                R.output(gv)
            return gv

    BN_SHAPES = {"w": (6, 3, 3, 3), "b": (1, 6, 1, 1), "gamma": (6,), "beta": (6,),
                 "mean": (6,)}

    def _bn_params(self):
        p = random_params(self.BN_SHAPES, seed=4)
        p["var"] = np.random.default_rng(5).uniform(0.5, 1.5, 6).astype("float32")
        return p

    def test_batch_norm_folds_in_closed_form(self):
        p = self._bn_params()
        before = bind(self.ConvBN, p)
        plan = plan_for(before)
        (site,) = plan.sites
        assert site.ops == ["conv2d", "batch_norm", "relu"] and site.exact
        # BN(conv(x) + b) = conv(x) * s + (b - mean) * s + beta, s = gamma / sqrt(var + eps)
        f64 = {k: v.astype(np.float64) for k, v in p.items()}
        scale = f64["gamma"] / np.sqrt(f64["var"] + 1e-5)
        weight = (f64["w"] * scale[:, None, None, None]).astype("float32")
        bias = ((f64["b"].reshape(-1) - f64["mean"]) * scale + f64["beta"]).astype("float32")
        expected = bind(self.ConvBNFolded, {"w": weight, "b": bias.reshape(1, 6, 1, 1)})
        after = verify(StreamlineSlimming(plan, {}), before,
                       slimmed(expected, site.id))  # no weights: exact
        x = np.random.default_rng(6).standard_normal((1, 3, 10, 10)).astype("float32")
        assert_close(run(after, x), run(before, x))

    def test_training_mode_batch_norm_is_not_folded(self):
        p = self._bn_params()
        before = bind(self.ConvTrainingBN, p)
        plan = plan_for(before)
        verify_noop(StreamlineSlimming(plan, {}), before)  # or at least: not an exact site

    @I.ir_module
    class ConvAvgPool:
        @R.function
        def main(x: R.Tensor((1, 2, 8, 8), "float32"), w: R.Tensor((3, 2, 3, 3), "float32"),
                 b: R.Tensor((1, 3, 1, 1), "float32")):
            with R.dataflow():
                c = R.nn.conv2d(x, w)
                cb = R.add(c, b)
                p = R.nn.avg_pool2d(cb, pool_size=[2, 2], strides=[2, 2])
                gv = R.sum(p, axis=[1])
                R.output(gv)
            return gv

    @I.ir_module
    class ConvAvgPoolMerged:
        @R.function
        def main(x: R.Tensor((1, 2, 8, 8), "float32"), w: R.Tensor((3, 2, 4, 4), "float32"),
                 b: R.Tensor((1, 3, 1, 1), "float32")):
            with R.dataflow():
                c = R.nn.conv2d(x, w, strides=[2, 2], padding=[0, 0, 0, 0])
                cb = R.add(c, b)
                gv = R.sum(cb, axis=[1])
                R.output(gv)
            return gv

    def test_avg_pool_folds_in_closed_form(self):
        p = random_params({"w": (3, 2, 3, 3), "b": (1, 3, 1, 1)}, seed=8)
        before = bind(self.ConvAvgPool, p)
        plan = plan_for(before)
        (site,) = plan.sites
        assert site.ops == ["conv2d", "avg_pool2d"] and site.exact
        # a 2x2/2 average of a stride-1 3x3 conv: one 4x4/2 conv, the mean of 4 shifted copies
        w = p["w"].astype(np.float64)
        merged = np.zeros((3, 2, 4, 4))
        for dy in (0, 1):
            for dx in (0, 1):
                merged[:, :, dy:dy + 3, dx:dx + 3] += w
        expected = bind(self.ConvAvgPoolMerged, {"w": (merged / 4).astype("float32"),
                                                 "b": p["b"]})
        after = verify(StreamlineSlimming(plan, {}), before, slimmed(expected, site.id))
        x = np.random.default_rng(9).standard_normal((1, 2, 8, 8)).astype("float32")
        assert_close(run(after, x), run(before, x))

    # -- no-op cases ----------------------------------------------------------------------
    def test_noop_when_the_site_is_disabled(self):
        before = bind(ConvReluPoolLRN, random_params(LRN_SHAPES))
        plan = plan_for(before)
        plan.sites[0].enabled = False
        verify_noop(StreamlineSlimming(plan, {}), before)

    def test_noop_with_a_plan_without_sites(self):
        before = bind(ConvReluPoolLRN, random_params(LRN_SHAPES))
        plan = plan_for(before, kinds=["branch"])
        assert plan.sites == []
        verify_noop(StreamlineSlimming(plan, {}), before)

    @I.ir_module
    class ConvRelu:
        @R.function
        def main(x: R.Tensor((1, 4, 16, 16), "float32"), w: R.Tensor((8, 4, 3, 3), "float32"),
                 b: R.Tensor((1, 8, 1, 1), "float32")):
            with R.dataflow():
                c = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
                cb = R.add(c, b)
                r = R.nn.relu(cb)
                gv = R.sum(r, axis=[1])
                R.output(gv)
            return gv

    def test_noop_on_a_module_without_a_chain(self):
        before = bind(self.ConvRelu, random_params(LRN_SHAPES))
        plan = plan_for(before)
        assert plan.sites == []  # a conv and a relu only: nothing to slim
        verify_noop(StreamlineSlimming(plan, {}), before)

    def test_noop_on_branch_sites(self):
        before = bind(BranchModule, random_params(BRANCH_SHAPES))
        plan = plan_for(before)
        assert [s.kind for s in plan.sites] == ["branch"]
        verify_noop(StreamlineSlimming(plan, {}), before)


# -- BranchSlimming --------------------------------------------------------------------------
BRANCH_SHAPES = {
    "w1": (3, 6, 1, 1), "b1": (1, 3, 1, 1), "w3r": (4, 6, 1, 1), "b3r": (1, 4, 1, 1),
    "w3": (5, 4, 3, 3), "b3": (1, 5, 1, 1), "w5r": (2, 6, 1, 1), "b5r": (1, 2, 1, 1),
    "w5": (3, 2, 5, 5), "b5": (1, 3, 1, 1), "wp": (2, 6, 1, 1), "bp": (1, 2, 1, 1)}


@I.ir_module
class BranchModule:
    @R.function
    def main(x: R.Tensor((1, 6, 7, 7), "float32"),
             w1: R.Tensor((3, 6, 1, 1), "float32"), b1: R.Tensor((1, 3, 1, 1), "float32"),
             w3r: R.Tensor((4, 6, 1, 1), "float32"), b3r: R.Tensor((1, 4, 1, 1), "float32"),
             w3: R.Tensor((5, 4, 3, 3), "float32"), b3: R.Tensor((1, 5, 1, 1), "float32"),
             w5r: R.Tensor((2, 6, 1, 1), "float32"), b5r: R.Tensor((1, 2, 1, 1), "float32"),
             w5: R.Tensor((3, 2, 5, 5), "float32"), b5: R.Tensor((1, 3, 1, 1), "float32"),
             wp: R.Tensor((2, 6, 1, 1), "float32"), bp: R.Tensor((1, 2, 1, 1), "float32")):
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
            gv = R.sum(out, axis=[2, 3])
            R.output(gv)
        return gv


@I.ir_module
class BranchModuleSlimmed:
    """Default plan ("carry" widths): the 1x1 branch (3) folds into the 3x3 conv (3 + 5), the
    pool branch (2) into the 5x5 conv (3 + 2), whose reducer carries 2 + 2 channels."""

    @R.function
    def main(x: R.Tensor((1, 6, 7, 7), "float32"),
             w3r: R.Tensor((4, 6, 1, 1), "float32"), b3r: R.Tensor((1, 4, 1, 1), "float32"),
             w3: R.Tensor((8, 4, 3, 3), "float32"), b3: R.Tensor((1, 8, 1, 1), "float32"),
             w5r: R.Tensor((4, 6, 1, 1), "float32"), b5r: R.Tensor((1, 4, 1, 1), "float32"),
             w5: R.Tensor((5, 4, 5, 5), "float32"), b5: R.Tensor((1, 5, 1, 1), "float32")):
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
            gv = R.sum(out, axis=[2, 3])
            R.output(gv)
        return gv


class TestBranchSlimming:
    def _weights(self, site, seed=10):
        rng = np.random.default_rng(seed)
        arrays = {}
        for (_, wkey, bkey), conv in zip(weight_keys(site), site.new_conv):
            arrays[wkey] = rng.standard_normal(
                (conv.out_channels, conv.in_channels // conv.groups, *conv.kernel)).astype("f")
            arrays[bkey] = rng.standard_normal(conv.out_channels).astype("float32")
        return arrays

    def test_four_branches_become_two(self):
        before = bind(BranchModule, random_params(BRANCH_SHAPES))
        plan = plan_for(before)
        (site,) = plan.sites
        recorded = site.to_dict()  # the plan file's form of the site
        assert site.kind == "branch" and recorded["note"] == "4 branches -> 2"
        assert recorded["absorb"] == {"pool_branch": "conv2d_5", "pool_into": "conv2d_4",
                                      "one_by_one": "conv2d_0", "one_by_one_into": "conv2d_2"}
        arrays = self._weights(site)
        keys = {replaces: (wkey, bkey) for replaces, wkey, bkey in weight_keys(site)}
        assert list(keys) == ["conv2d_1", "conv2d_2", "conv2d_3", "conv2d_4"]
        expected = {}
        for layer, (w, b) in {"conv2d_1": ("w3r", "b3r"), "conv2d_2": ("w3", "b3"),
                              "conv2d_3": ("w5r", "b5r"), "conv2d_4": ("w5", "b5")}.items():
            wkey, bkey = keys[layer]
            expected[w], expected[b] = arrays[wkey], arrays[bkey].reshape(1, -1, 1, 1)
        verify(BranchSlimming(plan, arrays), before,
               slimmed(bind(BranchModuleSlimmed, expected), site.id))

    def test_noop_when_the_site_is_disabled(self):
        before = bind(BranchModule, random_params(BRANCH_SHAPES))
        plan = plan_for(before)
        arrays = self._weights(plan.sites[0])
        plan.sites[0].enabled = False
        verify_noop(BranchSlimming(plan, arrays), before)

    def test_noop_on_streamline_sites(self):
        before = bind(ConvReluPoolLRN, random_params(LRN_SHAPES))
        plan = plan_for(before)
        assert [s.kind for s in plan.sites] == ["streamline"]
        verify_noop(BranchSlimming(plan, {}), before)


# -- idempotence (issue 19 item 5) ----------------------------------------------------------
class TestIdempotence:
    """Slimming a slimmed module is a no-op (the passes record the sites they applied in the
    module attribute ``rebirth_slimmed_sites``); a site that is neither in the module nor
    recorded still raises RebirthError naming it, without command-line advice."""

    def test_streamline_slimming_twice_is_a_noop(self):
        before = bind(ConvReluPoolLRN, random_params(LRN_SHAPES))
        plan = plan_for(before)
        once = apply(StreamlineSlimming(plan, None), before)
        assert list(once.attrs["rebirth_slimmed_sites"]) == [plan.sites[0].id]
        assert not names_of(once, ["relax.nn.max_pool2d"])
        verify_noop(StreamlineSlimming(plan, None), once)
        verify_noop(StreamlineSlimming(plan_for(before), None), once)  # the same plan, reread

    def test_branch_slimming_twice_is_a_noop(self):
        before = bind(BranchModule, random_params(BRANCH_SHAPES))
        plan = plan_for(before)
        once = apply(BranchSlimming(plan, None), before)
        assert list(once.attrs["rebirth_slimmed_sites"]) == [plan.sites[0].id]
        verify_noop(BranchSlimming(plan, None), once)

    @pytest.mark.parametrize("module, shapes", [(ConvReluPoolLRN, LRN_SHAPES),
                                                (BranchModule, BRANCH_SHAPES)])
    def test_the_pipeline_twice_is_a_noop(self, module, shapes):
        before = bind(module, random_params(shapes))
        plan = plan_for(before)
        once = apply(rebirth_pipeline(plan, None), before)
        verify_noop(rebirth_pipeline(plan, None), once)
        twice = tvm.transform.Sequential([rebirth_pipeline(plan, None)] * 2)(before)
        tvm.ir.assert_structural_equal(twice, once)

    def test_a_site_the_module_never_had_still_raises(self):
        plan = plan_for(bind(ConvReluPoolLRN, random_params(LRN_SHAPES)))
        other = bind(TestStreamlineSlimming.ConvRelu, random_params(LRN_SHAPES))
        with pytest.raises(RebirthError, match=f"site '{re.escape(plan.sites[0].id)}': not "
                                               "in the module") as err:
            apply(StreamlineSlimming(plan, None), other)
        assert "tvm-rebirth" not in str(err.value)

    def test_a_site_not_recorded_on_a_slimmed_module_still_raises(self):
        before = bind(ConvReluPoolLRN, random_params(LRN_SHAPES))
        once = apply(StreamlineSlimming(plan_for(before), None), before)
        plan = plan_for(before)
        plan.sites[0].id = "conv9+pool9"  # a plan site this module never held
        with pytest.raises(RebirthError, match=r"site 'conv9\+pool9': not in the module"):
            apply(StreamlineSlimming(plan, None), once)


def test_pass_errors_carry_no_command_line_advice():
    """passes/ are TVM passes: their errors name the site, never a tvm-rebirth command."""
    import ast
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "passes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise):
                texts = [c.value for c in ast.walk(node)
                         if isinstance(c, ast.Constant) and isinstance(c.value, str)]
                assert not [t for t in texts if "tvm-rebirth" in t or "--" in t], path.name


# -- AbsorbPads / PrepareForSites (issue 19) --------------------------------------------------
class TestAbsorbPads:
    @I.ir_module
    class PadConv:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32")):
            with R.dataflow():
                p = R.nn.pad(x, [0, 0, 0, 0, 1, 2, 1, 0], pad_value=0.0)
                c = R.nn.conv2d(p, w, padding=[0, 0, 0, 0])
                R.output(c)
            return c

    @I.ir_module
    class PadConvAbsorbed:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32")):
            with R.dataflow():
                c = R.nn.conv2d(x, w, padding=[1, 1, 2, 0])
                R.output(c)
            return c

    def test_zero_pad_becomes_conv_padding(self):
        w = random_params({"w": (4, 3, 3, 3)})
        after = verify(AbsorbPads(), bind(self.PadConv, w), bind(self.PadConvAbsorbed, w))
        x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype("float32")
        assert_close(run(after, x), run(bind(self.PadConv, w), x))

    @I.ir_module
    class PadPool:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32")):
            with R.dataflow():
                p = R.nn.pad(x, [0, 0, 0, 0, 0, 1, 0, 1], pad_value=float("-inf"))
                m = R.nn.max_pool2d(p, [3, 3], strides=[2, 2])
                R.output(m)
            return m

    @I.ir_module
    class PadPoolAbsorbed:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32")):
            with R.dataflow():
                m = R.nn.max_pool2d(x, [3, 3], strides=[2, 2], padding=[0, 0, 1, 1])
                R.output(m)
            return m

    def test_minus_inf_pad_becomes_max_pool_padding(self):
        verify(AbsorbPads(), self.PadPool, self.PadPoolAbsorbed)

    @I.ir_module
    class ZeroPadPool:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32")):
            with R.dataflow():
                p = R.nn.pad(x, [0, 0, 0, 0, 1, 1, 1, 1], pad_value=0.0)
                m = R.nn.max_pool2d(p, [3, 3], strides=[2, 2])
                R.output(m)
            return m

    def test_zero_pad_before_max_pool_stays(self):
        verify_noop(AbsorbPads(), self.ZeroPadPool)


class TestPrepareForSites:
    @I.ir_module
    class DeadTuple:
        """What DecomposeOpsForInference leaves of a BatchNorm: arithmetic plus a tuple of
        which only field 0 is read, through a trivial rebinding."""

        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"), m: R.Tensor((4,), "float32")):
            with R.dataflow():
                a = R.add(x, x)
                t = (a, m, m)
                b = t[0]
                c = b
                p = R.nn.avg_pool2d(c, [2, 2], strides=[2, 2])
                R.output(p)
            return p

    @I.ir_module
    class DeadTuplePrepared:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"), m: R.Tensor((4,), "float32")):
            with R.dataflow():
                a = R.add(x, x)
                p = R.nn.avg_pool2d(a, [2, 2], strides=[2, 2])
                R.output(p)
            return p

    def test_dead_tuple_and_rebindings_go(self):
        verify(PrepareForSites(), self.DeadTuple, self.DeadTuplePrepared)

    def test_prepared_module_is_left_alone(self):
        verify_noop(PrepareForSites(), self.DeadTuplePrepared)


class TestActivations:
    @I.ir_module
    class PreluChain:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32"),
                 b: R.Tensor((1, 4, 1, 1), "float32"), alpha: R.Tensor((4,), "float32")):
            with R.dataflow():
                c = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
                cb = R.add(c, b)
                a = R.nn.prelu(cb, alpha, axis=1)
                p = R.nn.max_pool2d(a, [2, 2], strides=[2, 2])
                R.output(p)
            return p

    @I.ir_module
    class PreluSlimmed:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32"),
                 b: R.Tensor((1, 4, 1, 1), "float32"), alpha: R.Tensor((4,), "float32")):
            with R.dataflow():
                c = R.nn.conv2d(x, w, strides=[2, 2], padding=[1, 1, 0, 0])
                cb = R.add(c, b)
                p = R.nn.prelu(cb, alpha, axis=1)
                R.output(p)
            return p

    def test_prelu_is_kept_at_the_chain_end(self):
        shapes = {"w": (4, 3, 3, 3), "b": (1, 4, 1, 1), "alpha": (4,)}
        p = random_params(shapes)
        before = bind(self.PreluChain, p)
        plan = plan_for(before)
        assert [s.ops for s in plan.sites] == [["conv2d", "prelu", "max_pool2d"]]
        site = plan.sites[0]
        (_, wkey, bkey), = weight_keys(site)
        new_w = random_params({"w": (4, 3, 3, 3)}, seed=3)["w"]
        new_b = np.arange(4, dtype="float32")
        expected = bind(self.PreluSlimmed, {"w": new_w, "b": new_b.reshape(1, 4, 1, 1),
                                            "alpha": p["alpha"]})
        verify(StreamlineSlimming(plan, {wkey: new_w, bkey: new_b}), before,
               slimmed(expected, site.id))


class TestNonDataflowBindings:
    @I.ir_module
    class WithIf:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32"),
                 cond: R.Tensor((), "bool")):
            c = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
            p = R.nn.max_pool2d(c, [2, 2], strides=[2, 2])
            if cond:
                r = R.nn.relu(p)
            else:
                r = R.negative(p)
            return r

    def test_attach_layer_names_outside_dataflow_blocks(self):
        before = bind(self.WithIf, random_params({"w": (4, 3, 3, 3)}))
        after = AttachLayerNames({"conv2d": ["conv1"], "max_pool2d": ["pool1"]})(before)
        assert names_of(after, ["relax.nn.conv2d", "relax.nn.max_pool2d"]) == ["conv1", "pool1"]
        assert [s.id for s in plan_for(after).sites] == ["conv1+pool1"]


class TestRejectedReasons:
    @I.ir_module
    class SigmoidBeforePool:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32")):
            with R.dataflow():
                c = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
                s = R.sigmoid(c)
                p = R.nn.max_pool2d(s, [2, 2], strides=[2, 2])
                R.output(p)
            return p

    @I.ir_module
    class SharedBeforePool:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32")):
            with R.dataflow():
                c = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
                r = R.nn.relu(c)
                p = R.nn.max_pool2d(r, [2, 2], strides=[2, 2])
                q = R.nn.avg_pool2d(r, [2, 2], strides=[2, 2])
                out = R.add(p, q)
                R.output(out)
            return out

    def test_chains_that_are_not_sites_say_why(self):
        w = random_params({"w": (4, 3, 3, 3)})
        plan = plan_for(bind(self.SigmoidBeforePool, w))
        assert not plan.sites and "'sigmoid' between the conv" in plan.rejected[0]["reason"]
        plan = plan_for(bind(self.SharedBeforePool, w))
        assert not plan.sites and "shared tensor" in plan.rejected[0]["reason"]
        unbound = plan_for(self.SigmoidBeforePool)  # w left a parameter
        assert "not bound constants (function parameter 'w')" in unbound.rejected[0]["reason"]


class TestLiftClips:
    @I.ir_module
    class OnnxClip:
        """What TVM's ONNX importer emits for Clip(x, 0, 6): call_tir max, then min."""

        @T.prim_func(private=True, s_tir=True)
        def maximum(A: T.Buffer((T.int64(1), T.int64(4), T.int64(8), T.int64(8)), "float32"),
                    c: T.Buffer((), "float32"),
                    out: T.Buffer((T.int64(1), T.int64(4), T.int64(8), T.int64(8)), "float32")):
            for i0, i1, i2, i3 in T.grid(T.int64(1), T.int64(4), T.int64(8), T.int64(8)):
                with T.sblock("T_maximum"):
                    v0, v1, v2, v3 = T.axis.remap("SSSS", [i0, i1, i2, i3])
                    out[v0, v1, v2, v3] = T.max(A[v0, v1, v2, v3], c[()])

        @T.prim_func(private=True, s_tir=True)
        def minimum(A: T.Buffer((T.int64(1), T.int64(4), T.int64(8), T.int64(8)), "float32"),
                    c: T.Buffer((), "float32"),
                    out: T.Buffer((T.int64(1), T.int64(4), T.int64(8), T.int64(8)), "float32")):
            for i0, i1, i2, i3 in T.grid(T.int64(1), T.int64(4), T.int64(8), T.int64(8)):
                with T.sblock("T_minimum"):
                    v0, v1, v2, v3 = T.axis.remap("SSSS", [i0, i1, i2, i3])
                    out[v0, v1, v2, v3] = T.min(A[v0, v1, v2, v3], c[()])

        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32")):
            cls = OnnxClip
            with R.dataflow():
                lo = R.const(0.0, "float32")
                hi = R.const(6.0, "float32")
                a = R.call_tir(cls.maximum, (x, lo), out_ty=R.Tensor((1, 4, 8, 8), "float32"))
                b = R.call_tir(cls.minimum, (a, hi), out_ty=R.Tensor((1, 4, 8, 8), "float32"))
                R.output(b)
            return b

    @I.ir_module
    class Clipped:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32")):
            with R.dataflow():
                b = R.clip(x, R.prim_value(T.float64(0.0)), R.prim_value(T.float64(6.0)))
                R.output(b)
            return b

    def test_onnx_clip_becomes_r_clip(self):
        after = verify(LiftClips(), self.OnnxClip, self.Clipped)
        x = (np.random.default_rng(0).standard_normal((1, 4, 8, 8)) * 8).astype("float32")
        assert_close(run(after, x), np.clip(x, 0, 6))
