"""The channel-blocked conv kernels (compile/layouts.py + compile/conv_rules.py): the packing
pass rewrites the convs it should, ConvRule schedules exactly the PrimFuncs it makes (None
elsewhere), and every scheduled PrimFunc computes what the unscheduled one computes, the same
way every run (outputs pre-filled with NaN), for this host's vector width and for NEON's
plan; a zoo model built with the kernels matches the build without them."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax import op as R

from tvm_rebirth.compile.build import host_target
from tvm_rebirth.compile.conv_rules import ConvRule
from tvm_rebirth.compile.layouts import VectorUnit, pack_weight, plan_conv
from tvm_rebirth.compile.pack_convs import PackConvWeights
from tvm_rebirth.compile.schedules import GenericCpuSchedule

from kernel_check import assert_schedule_matches, conv_module, packed_prim_funcs

LLVM = host_target()
# NEON's 4 fp32 lanes, built and run on this host: a plain x86-64 (SSE2) target
FOUR_LANES = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})


def _assert_same_numerics(func, target=LLVM):
    return assert_schedule_matches(func, ConvRule(), target, atol=1e-3)


CASES = {  # name: (cin, cout, k, stride, pad, hw, epilogue[, groups])
    "1x1_w1": (16, 96, 1, 1, 0, (1, 1), "bias_relu"),
    "1x1_c3_to10_w7": (3, 10, 1, 1, 0, (7, 7), "bias"),
    "1x1_192_to100_w13": (192, 100, 1, 1, 0, (13, 13), "bias_relu6"),
    "3x3_c3_w55": (3, 16, 3, 1, 1, (5, 55), "bias_relu"),
    "3x3_96_to_16_w13_bn": (96, 16, 3, 1, 1, (13, 13), "bn_relu"),
    "3x3_16_w1": (16, 16, 3, 1, 1, (13, 1), "bias_relu"),
    "3x3_s2_no_epilogue": (16, 96, 3, 2, 1, (7, 7), "none"),
    "3x3_16_to3_nopad": (16, 3, 3, 1, 0, (7, 13), "bias_relu"),
    "5x5_16_to32_w28": (16, 32, 5, 1, 2, (28, 28), "bias_relu"),
    "7x7_s2_c3": (3, 64, 7, 2, 3, (23, 23), "bias_relu"),
    "11x11_s4_c3_w55": (3, 16, 11, 4, 2, (27, 223), "bias_relu"),
    "2x2_s2_even": (16, 16, 2, 2, 0, (8, 8), "bias_relu"),
    "5x5_groups2_w27": (16, 32, 5, 1, 2, (27, 27), "bias_relu", 2),
    "3x3_groups2_w13": (16, 64, 3, 1, 1, (13, 13), "bias_relu", 2),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("target", [LLVM, FOUR_LANES], ids=["host", "4_lanes"])
def test_conv_rule_matches_unscheduled(name, target):
    funcs = packed_prim_funcs(conv_module(*CASES[name]), target)
    assert len(funcs) == 1  # conv and its epilogue are one function
    _assert_same_numerics(funcs[0], target)


def test_depthwise_and_dynamic_convs_are_not_blocked():
    x = relax.Var("x", relax.TensorType((1, 16, 7, 7), "float32"))
    w = relax.Var("w", relax.TensorType((16, 16, 3, 3), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        with bb.dataflow():
            a = bb.emit(R.nn.conv2d(x, relax.const(np.ones((16, 1, 3, 3), "float32")),
                                    groups=16, padding=1))
            # weights computed in the function (a parameter's are packed at run time: see
            # test_conv_with_parameter_weights_packs_them_at_run_time)
            computed = bb.emit(R.multiply(w, relax.const(1.0, "float32")))
            out = bb.emit_output(R.nn.conv2d(a, computed, padding=1))
        bb.emit_func_output(out)
    mod = PackConvWeights(LLVM)(bb.get())
    assert "rebirth_conv" not in mod.script()  # the depthwise conv has its own kernel
    assert "rebirth_depthwise_conv2d" in mod.script()
    # the generic rule still schedules what the conv rule leaves
    for func in packed_prim_funcs(bb.get(), LLVM):
        assert ConvRule().apply(func.with_attr("global_symbol", "main"), LLVM, False) is None
        assert GenericCpuSchedule().apply(func, LLVM, False) is not None


def test_weight_packing_and_plans():
    weight = np.arange(10 * 3 * 2 * 2, dtype="float32").reshape(10, 3, 2, 2)
    packed = pack_weight(weight, 4)
    assert packed.shape == (3, 3, 2, 2, 4)
    assert packed[1, 2, 1, 0, 3] == weight[7, 2, 1, 0]
    assert not packed[2, :, :, :, 2:].any()  # channels 10, 11 are zero padding
    for unit in (VectorUnit(4, 32), VectorUnit(8, 16), VectorUnit(16, 32, True)):
        for shape in ((192, 56, 3, 1), (64, 112, 7, 2), (128, 28, 1, 1), (3, 7, 1, 1)):
            plan = plan_conv(unit, *shape)
            assert plan.tile >= 1 and plan.tile * plan.vectors <= unit.registers


def test_zoo_model_matches_build_without_kernels(monkeypatch):
    from tvm_rebirth import load_model
    from tvm_rebirth.compile.build import Runner

    model = load_model("alexnet")
    x = np.random.default_rng(3).standard_normal(
        model.input_shapes[model.input_name]).astype("float32")
    monkeypatch.setenv("TVM_REBIRTH_CONV_KERNELS", "0")
    want = Runner(model.mod, tuned=False)(x)[0]
    monkeypatch.setenv("TVM_REBIRTH_CONV_KERNELS", "1")
    script = PackConvWeights(LLVM)(model.mod).script()
    # every conv is ours: direct, or Winograd (AlexNet's 3x3s at 13x13)
    assert script.count("call_tir(cls.rebirth_conv2d") + \
        script.count("call_tir(cls.rebirth_winograd") == 5
    got = Runner(model.mod, tuned=False)(x)[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


POINTWISE_CASES = ["1x1_w1", "1x1_c3_to10_w7", "1x1_192_to100_w13"]
TAP_ROW_CASES = ["3x3_c3_w55", "3x3_96_to_16_w13_bn", "3x3_16_w1", "3x3_s2_no_epilogue",
                 "3x3_16_to3_nopad", "5x5_16_to32_w28", "2x2_s2_even", "5x5_groups2_w27"]


@pytest.mark.parametrize("name", POINTWISE_CASES + TAP_ROW_CASES)
def test_vector_rows_match_unscheduled(name, monkeypatch):
    """Convs planned as on AArch64 (FMA by element: vector rows; a 1x1 one row per input
    channel with ic unrolled, a kxk one row per (ic, kh) shared by its taps), built and
    run on this host."""
    from tvm_rebirth.compile import pack_convs

    monkeypatch.setattr(pack_convs, "vector_unit",
                        lambda target: VectorUnit(4, 32, fma_by_element=True))
    funcs = packed_prim_funcs(conv_module(*CASES[name]), FOUR_LANES)
    assert len(funcs) == 1
    assert "rebirth.vector_rows" in funcs[0].script()
    sch = ConvRule().apply(funcs[0].with_attr("global_symbol", "main"), FOUR_LANES, False)
    assert "_local" in sch.mod.script().replace("rebirth_conv_local", "")  # the cached row
    _assert_same_numerics(funcs[0], FOUR_LANES)


def test_vector_rows_plans():
    neon = VectorUnit(4, 32, fma_by_element=True)
    plan = plan_conv(neon, 128, 28, 1, 1, pointwise=True)
    assert plan.rows and plan.tile * plan.vectors + plan.vectors + -(-plan.tile // 4) <= 32
    plan = plan_conv(neon, 192, 27, 3, 1)  # a row shared by 3 taps: (tile - 1) + 3 columns
    assert plan.rows and plan.tile * plan.vectors + plan.vectors + -(-(plan.tile + 2) // 4) <= 32
    assert not plan_conv(neon, 64, 55, 7, 4).rows  # 7 taps at stride 4: rows too long
    assert not plan_conv(VectorUnit(4, 16), 128, 28, 1, 1, pointwise=True).rows


@pytest.mark.parametrize("shape,weight,strides,padding", [
    ((1, 20, 17, 19), (24, 20, 3, 3), (2, 1), (1, 0, 1, 2)),  # 24: a partial last block
    ((1, 16, 14, 14), (32, 16, 1, 1), (1, 1), (0, 0, 0, 0)),
])
def test_conv_with_parameter_weights_packs_them_at_run_time(shape, weight, strides, padding):
    """A conv whose weights are a function parameter (learned weights: captures, training)
    gets our direct kernel, the weights packed by a kernel of their own, and computes what
    TVM's own build of the same function computes."""
    from tvm_rebirth.compile.build import compile_module

    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(shape), "float32"))
    w = relax.Var("w", relax.TensorType(list(weight), "float32"))
    with builder.function("main", [x, w]):
        with builder.dataflow():
            y = builder.emit(R.nn.conv2d(x, w, strides=list(strides), padding=list(padding)))
            out = builder.emit_output(R.nn.relu(y))
        builder.emit_func_output(out)
    mod = builder.get()
    with host_target():
        packed = PackConvWeights(host_target())(mod)
    names = [gv.name_hint for gv in packed.functions]
    assert any(n.startswith("rebirth_pack_weight") for n in names), names
    assert any(n.startswith("rebirth_conv2d") for n in names), names
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(shape, dtype=np.float32),
            rng.standard_normal(weight, dtype=np.float32)]

    def run(executable):
        vm = relax.VirtualMachine(executable, tvm.cpu())
        return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()

    np.testing.assert_allclose(run(compile_module(mod, tuned=False).executable),
                               run(relax.build(mod, "llvm")), rtol=1e-4, atol=1e-4)
