"""Depthwise convs (compile/depthwise.py): PackConvWeights gives every depthwise conv with
constant weights its own TE function and nothing else, DepthwiseRule schedules exactly those
functions (None elsewhere), and every scheduled function computes what the unscheduled one
computes, every output written, the same way every run, for this host's vector width and
for NEON's 4 lanes."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax import op as R

from tvm_rebirth.compile.build import Runner, host_target
from tvm_rebirth.compile.depthwise import DepthwiseRule, plan_width_tile
from tvm_rebirth.compile.pack_convs import PackConvWeights

from kernel_check import assert_schedule_matches, conv_module, packed_prim_funcs

LLVM = host_target()
FOUR_LANES = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})


def _module(channels, k, stride, pad, hw, epilogue="bias_relu", dilation=1, multiplier=1):
    """A depthwise conv (``multiplier`` filters per channel) and its epilogue."""
    return conv_module(channels, channels * multiplier, k, stride, pad, hw, epilogue,
                       groups=channels, dilation=dilation)


CASES = {  # name: (channels, k, stride, pad, hw, epilogue[, dilation])
    "3x3_s1_w28": (24, 3, 1, 1, (28, 28), "bias_relu"),
    "3x3_s2_w56": (16, 3, 2, 1, (56, 56), "bias"),
    "3x3_s1_w7_relu6": (40, 3, 1, 1, (7, 7), "bias_relu6"),
    "3x3_s1_w112_two_tiles": (8, 3, 1, 1, (5, 112), "bias_relu"),
    "3x3_s2_odd_w": (8, 3, 2, 1, (9, 15), "bias_relu"),
    "5x5_s1_nopad": (8, 5, 1, 0, (11, 13), "bias_relu"),
    "3x3_s1_no_epilogue": (8, 3, 1, 1, (6, 6), "none"),
    "3x3_dilated": (8, 3, 1, 2, (10, 10), "bias_relu", 2),
    "3x3_s2_nopad": (8, 3, 2, 0, (9, 9), "bias"),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("target", [LLVM, FOUR_LANES], ids=["host", "4_lanes"])
def test_depthwise_rule_matches_unscheduled(name, target):
    funcs = packed_prim_funcs(_module(*CASES[name]), target)
    assert len(funcs) == 1 and "rebirth_depthwise" in funcs[0].script()
    assert_schedule_matches(funcs[0], DepthwiseRule(), target, atol=1e-4)


def test_only_depthwise_convs_are_rewritten():
    # channel multiplier 2: a grouped conv, not depthwise; keep it off this kernel
    script = PackConvWeights(LLVM)(_module(8, 3, 1, 1, (7, 7), multiplier=2)).script()
    assert "rebirth_depthwise" not in script


def test_rule_returns_none_for_other_functions():
    x = relax.Var("x", relax.TensorType((1, 8, 7, 7), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(R.nn.relu(R.nn.max_pool2d(x, pool_size=3, padding=1)))
            out = bb.emit_output(R.nn.conv2d(y, relax.const(np.ones((8, 8, 3, 3), "float32"))))
        bb.emit_func_output(out)
    funcs = packed_prim_funcs(bb.get(), LLVM)
    assert funcs
    assert all(DepthwiseRule().apply(f, LLVM, False) is None for f in funcs)


def test_width_tiles_divide_the_row_and_fit_the_registers():
    for lanes in (4, 8, 16):
        for width in (1, 7, 14, 28, 56, 112, 97):
            tile = plan_width_tile(width, lanes)
            assert width % tile == 0 and tile <= 4 * lanes


def test_built_module_matches_the_build_without_kernels(monkeypatch):
    mod = _module(32, 3, 2, 1, (30, 30))
    x = np.random.default_rng(5).standard_normal((1, 32, 30, 30)).astype("float32")
    monkeypatch.setenv("TVM_REBIRTH_CONV_KERNELS", "0")
    want = Runner(mod, tuned=False)(x)[0]
    monkeypatch.setenv("TVM_REBIRTH_CONV_KERNELS", "1")
    np.testing.assert_allclose(Runner(mod, tuned=False)(x)[0], want, rtol=1e-5, atol=1e-5)
