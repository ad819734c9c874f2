"""PowerToRoots: LRN's power(., 0.75) as square roots, only where the base is non-negative."""

import numpy as np
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from tvm_rebirth.compile.build import Runner
from tvm_rebirth.compile.fast_math import PowerToRoots


def verify(before, expected):
    tvm.ir.assert_structural_equal(PowerToRoots()(before), expected)


@I.ir_module
class Lrn:
    @R.function
    def main(x: R.Tensor((1, 8, 4, 4), "float32")):
        with R.dataflow():
            sq = R.multiply(x, x)
            e = R.expand_dims(sq, axis=[1])
            p = R.nn.avg_pool3d(e, pool_size=[5, 1, 1], padding=[2, 0, 0, 2, 0, 0])
            s = R.squeeze(p, axis=[1])
            a = R.multiply(s, R.const(0.0001, "float32"))
            b = R.add(a, R.const(1.0, "float32"))
            pw = R.power(b, R.const(0.75, "float32"))
            out = R.divide(x, pw)
            R.output(out)
        return out


@I.ir_module
class LrnRoots:
    @R.function
    def main(x: R.Tensor((1, 8, 4, 4), "float32")):
        with R.dataflow():
            sq = R.multiply(x, x)
            e = R.expand_dims(sq, axis=[1])
            p = R.nn.avg_pool3d(e, pool_size=[5, 1, 1], padding=[2, 0, 0, 2, 0, 0])
            s = R.squeeze(p, axis=[1])
            a = R.multiply(s, R.const(0.0001, "float32"))
            b = R.add(a, R.const(1.0, "float32"))
            r = R.sqrt(b)
            q = R.sqrt(r)
            pw = R.multiply(r, q)
            out = R.divide(x, pw)
            R.output(out)
        return out


@I.ir_module
class SignedBase:  # x may be negative: x^0.75 is NaN there, sqrt would be too, but keep powf
    @R.function
    def main(x: R.Tensor((1, 8, 4, 4), "float32")):
        with R.dataflow():
            out = R.power(x, R.const(0.75, "float32"))
            R.output(out)
        return out


@I.ir_module
class OddExponent:
    @R.function
    def main(x: R.Tensor((1, 8, 4, 4), "float32")):
        with R.dataflow():
            sq = R.multiply(x, x)
            out = R.power(sq, R.const(0.3, "float32"))
            R.output(out)
        return out


def test_lrn_power_becomes_square_roots():
    verify(Lrn, LrnRoots)


def test_noop_when_the_base_may_be_negative():
    verify(SignedBase, SignedBase)


def test_noop_for_an_exponent_that_is_no_quarter():
    verify(OddExponent, OddExponent)


def test_square_roots_compute_the_power():
    x = np.random.default_rng(0).standard_normal((1, 8, 4, 4)).astype("float32") * 30
    want = Runner(Lrn, tuned=False)(x)[0]
    got = Runner(PowerToRoots()(Lrn), tuned=False)(x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
