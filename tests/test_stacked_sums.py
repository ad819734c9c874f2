"""StackedSumsToAdds: the importer's ONNX Sum (copies, stack, sum over the stacked axis) as
additions of same-shaped tensors, in order; no-op cases kept; numerics unchanged."""

import numpy as np
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from tvm_rebirth.compile.build import Runner
from tvm_rebirth.compile.stacked_sums import StackedSumsToAdds


def verify(before, expected):
    tvm.ir.assert_structural_equal(StackedSumsToAdds()(before), expected)


@I.ir_module
class ResidualSum:
    @R.function
    def main(a: R.Tensor((1, 4, 3, 3), "float32"), b: R.Tensor((1, 4, 3, 3), "float32")):
        with R.dataflow():
            p = R.broadcast_to(a, R.shape([1, 4, 3, 3]))
            q = R.broadcast_to(b, R.shape([1, 4, 3, 3]))
            s = R.stack((p, q), axis=0)
            y = R.sum(s, axis=[0], keepdims=False)
            out = R.nn.relu(y)
            R.output(out)
        return out


@I.ir_module
class ResidualAdd:
    @R.function
    def main(a: R.Tensor((1, 4, 3, 3), "float32"), b: R.Tensor((1, 4, 3, 3), "float32")):
        with R.dataflow():
            y = R.add(a, b)
            out = R.nn.relu(y)
            R.output(out)
        return out


@I.ir_module
class ThreeTerms:
    @R.function
    def main(a: R.Tensor((2, 5), "float32"), b: R.Tensor((2, 5), "float32"),
             c: R.Tensor((2, 5), "float32")):
        with R.dataflow():
            s = R.stack((a, b, c), axis=0)
            out = R.sum(s, axis=[0], keepdims=False)
            R.output(out)
        return out


@I.ir_module
class ThreeAdds:
    @R.function
    def main(a: R.Tensor((2, 5), "float32"), b: R.Tensor((2, 5), "float32"),
             c: R.Tensor((2, 5), "float32")):
        with R.dataflow():
            lv = R.add(a, b)
            out = R.add(lv, c)
            R.output(out)
        return out


@I.ir_module
class SumOverAnotherAxis:
    @R.function
    def main(a: R.Tensor((2, 5), "float32"), b: R.Tensor((2, 5), "float32")):
        with R.dataflow():
            s = R.stack((a, b), axis=0)
            out = R.sum(s, axis=[1], keepdims=False)
            R.output(out)
        return out


@I.ir_module
class RealBroadcast:  # b really broadcasts: its broadcast_to stays, the stack goes
    @R.function
    def main(a: R.Tensor((2, 5), "float32"), b: R.Tensor((1, 5), "float32")):
        with R.dataflow():
            q = R.broadcast_to(b, R.shape([2, 5]))
            s = R.stack((a, q), axis=0)
            out = R.sum(s, axis=[0], keepdims=False)
            R.output(out)
        return out


@I.ir_module
class KeepDims:
    @R.function
    def main(a: R.Tensor((2, 5), "float32"), b: R.Tensor((2, 5), "float32")):
        with R.dataflow():
            s = R.stack((a, b), axis=0)
            out = R.sum(s, axis=[0], keepdims=True)
            R.output(out)
        return out


def test_residual_sum_becomes_an_add():
    verify(ResidualSum, ResidualAdd)


def test_three_terms_add_in_order():
    verify(ThreeTerms, ThreeAdds)


def test_noop_for_a_sum_over_another_axis():
    verify(SumOverAnotherAxis, SumOverAnotherAxis)


def test_noop_for_keepdims():
    verify(KeepDims, KeepDims)


@I.ir_module
class RealBroadcastAdd:
    @R.function
    def main(a: R.Tensor((2, 5), "float32"), b: R.Tensor((1, 5), "float32")):
        with R.dataflow():
            q = R.broadcast_to(b, R.shape([2, 5]))
            out = R.add(a, q)
            R.output(out)
        return out


def test_a_term_that_really_broadcasts_keeps_its_broadcast():
    verify(RealBroadcast, RealBroadcastAdd)


def test_numerics_unchanged():
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((1, 4, 3, 3)).astype("float32") for _ in range(2))
    want = np.maximum(a + b, 0)
    np.testing.assert_allclose(Runner(ResidualSum, tuned=False)(a, b)[0], want, rtol=1e-6)
