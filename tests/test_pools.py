"""Separable max pooling and LRN's channel-window sum (compile/pools.py): the pass rewrites
exactly the pools it should, PoolRule schedules exactly the PrimFuncs it makes (None
elsewhere), every scheduled PrimFunc computes what the unscheduled one computes (outputs
pre-filled with NaN, run twice) on this host's and on NEON's vector width, and whole
Relax modules built with the rewrite match TVM's own lowering of the original ops."""

import numpy as np
import pytest
import tvm
from tvm import relax, tirx
from tvm.relax import op as R

from tvm_rebirth.compile.build import host_target
from tvm_rebirth.compile.pools import PoolRule, SeparablePools
from tvm_rebirth.compile.schedules import GenericCpuSchedule

from kernel_check import assert_schedule_matches

LLVM = host_target()
FOUR_LANES = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})  # NEON's 4 fp32 lanes


def _module(op, shape):
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(op(x))
        bb.emit_func_output(out)
    return bb.get()


def _prim_funcs(mod, target=LLVM):
    with target:
        mod = tvm.transform.Sequential([
            SeparablePools(target), relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    return [func for _, func in mod.functions.items() if isinstance(func, tirx.PrimFunc)]


MAX_POOLS = {  # name: (input shape, pool, stride, padding, ceil_mode)
    "3x3_s1_pad1_w13": ((1, 16, 13, 13), 3, 1, 1, False),
    "3x3_s2_w55": ((1, 8, 111, 111), 3, 2, 0, False),
    "3x3_s2_ceil_w27": ((1, 8, 28, 27), 3, 2, 0, True),
    "3x3_s1_pad1_w1": ((1, 7, 1, 1), 3, 1, 1, False),
    "2x2_s2_even": ((1, 3, 8, 8), 2, 2, 0, False),
    "5x5_s1_pad2_w7": ((2, 3, 7, 7), 5, 1, 2, False),
    "3x3_s2_pad1_ceil_w14": ((1, 96, 14, 14), 3, 2, 1, True),
}


def _max_pool(shape, pool, stride, pad, ceil):
    return _module(lambda x: R.nn.max_pool2d(x, pool, stride, pad, ceil_mode=ceil), shape)


def _lrn_window(shape, window=5):
    return _module(lambda x: R.nn.avg_pool3d(
        x, [window, 1, 1], [1, 1, 1], [window // 2, 0, 0, window // 2, 0, 0],
        count_include_pad=True), shape)


@pytest.mark.parametrize("name", list(MAX_POOLS))
@pytest.mark.parametrize("target", [LLVM, FOUR_LANES], ids=["host", "4_lanes"])
def test_max_pool_rule_matches_unscheduled(name, target):
    funcs = _prim_funcs(_max_pool(*MAX_POOLS[name]), target)
    assert len(funcs) == 1 and "rebirth_pool_rows" in funcs[0].script()
    assert_schedule_matches(funcs[0], PoolRule(), target)


@pytest.mark.parametrize("shape", [(1, 1, 64, 55, 55), (1, 1, 3, 7, 13), (1, 1, 16, 1, 1)])
@pytest.mark.parametrize("target", [LLVM, FOUR_LANES], ids=["host", "4_lanes"])
def test_channel_window_rule_matches_unscheduled(shape, target):
    funcs = _prim_funcs(_lrn_window(shape), target)
    assert len(funcs) == 1 and "rebirth_channel_window" in funcs[0].script()
    assert_schedule_matches(funcs[0], PoolRule(), target)


@pytest.mark.parametrize("mod", [
    _max_pool((1, 16, 13, 13), 3, 1, 1, False),
    _lrn_window((1, 1, 16, 13, 13)),
    _module(lambda x: R.nn.avg_pool2d(x, 3, 1, 1), (1, 16, 13, 13)),
], ids=["max_pool", "lrn_window", "avg_pool2d"])
def test_rewritten_module_matches_tvm_lowering(mod):
    """SeparablePools + PoolRule (where it applies) against TVM's lowering of the op."""
    from tvm.s_tir import dlight

    x = np.random.default_rng(0).standard_normal(
        [int(d) for d in mod["main"].params[0].ty.shape]).astype("float32")

    def run(passes):
        with LLVM:
            built = tvm.compile(tvm.transform.Sequential(passes)(mod), LLVM)
        vm = relax.VirtualMachine(built, tvm.cpu())
        return vm["main"](tvm.runtime.tensor(x)).numpy()

    schedule = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                relax.transform.FuseOps(), relax.transform.FuseTIR(),
                dlight.ApplyDefaultSchedule(PoolRule(), GenericCpuSchedule())]
    np.testing.assert_allclose(run([SeparablePools(LLVM)] + schedule), run([]),
                               rtol=1e-5, atol=1e-6)


def test_what_is_not_rewritten_or_scheduled():
    """avg_pool2d, dilated or NHWC max pools, non-channel 3-D windows and LRN windows that
    exclude the padding from the count stay with TVM's lowering; PoolRule leaves every
    other function to the next rule."""
    cases = [
        _module(lambda x: R.nn.avg_pool2d(x, 3, 1, 1), (1, 4, 7, 7)),
        _module(lambda x: R.nn.max_pool2d(x, 3, 1, 2, dilation=2), (1, 4, 7, 7)),
        _module(lambda x: R.nn.max_pool2d(x, 3, 1, 1, layout="NHWC"), (1, 7, 7, 4)),
        _module(lambda x: R.nn.avg_pool3d(x, [3, 3, 1], [1, 1, 1], [1, 1, 0, 1, 1, 0]),
                (1, 1, 8, 7, 7)),
        _module(lambda x: R.nn.avg_pool3d(x, [5, 1, 1], [1, 1, 1], [2, 0, 0, 2, 0, 0],
                                          count_include_pad=False), (1, 1, 8, 7, 7)),
    ]
    for mod in cases:
        assert "rebirth" not in SeparablePools(LLVM)(mod).script()
        for func in _prim_funcs(mod):
            assert PoolRule().apply(func.with_attr("global_symbol", "main"), LLVM, False) \
                is None
    # no SIMD unit we know (a non-CPU target): the pass is a no-op
    mod = _max_pool((1, 4, 7, 7), 3, 1, 1, False)
    assert SeparablePools(tvm.target.Target("c"))(mod).script() == mod.script()
