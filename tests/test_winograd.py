"""Winograd F(2x2, 3x3) (compile/winograd.py): the transformed weights compute the conv
exactly (numpy), the rewrite replaces exactly the convs where it applies and pays, the
kernel's schedule (WinogradRule: a band of tile rows at a time, the GEMM on our blocked 1x1
micro-kernel) computes what its unscheduled PrimFunc computes (NaN-prefilled outputs, run
twice) with a band of intermediates, and whole modules built with Winograd match the
direct kernels' build."""

import re

import numpy as np
import pytest
import tvm
from tvm import relax, tirx
from tvm.relax import op as R

from tvm_rebirth.compile.build import Runner, fused_module, host_target, planned_memory
from tvm_rebirth.compile.winograd import (A_T, B_T, WinogradRule, transform_weight,
                                          winograd_pays)
from tvm_rebirth.report.profile import kernel_macs

from kernel_check import assert_schedule_matches

LLVM = host_target()
FOUR_LANES = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})  # NEON's 4 fp32 lanes


def _conv_module(cin, cout, hw, pad=1, epilogue="bias_relu", seed=0, stride=1, k=3,
                 groups=1, batch=1):
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((cout, cin // groups, k, k)) / np.sqrt(9 * cin)
              ).astype("float32")
    bias = rng.standard_normal((1, cout, 1, 1)).astype("float32")
    x = relax.Var("x", relax.TensorType((batch, cin, *hw), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(R.nn.conv2d(x, relax.const(weight), strides=stride, padding=pad,
                                    groups=groups))
            if epilogue == "bias_relu":
                y = bb.emit(R.nn.relu(R.add(y, relax.const(bias))))
            if epilogue == "concat":  # a concat after the conv (an inception output)
                y = bb.emit(R.concat([R.nn.relu(y), x], axis=1))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _funcs(mod, target=LLVM) -> dict:
    return {gv.name_hint: func for gv, func in fused_module(mod, target).functions.items()
            if isinstance(func, tirx.PrimFunc)}


def test_transformed_weights_compute_the_conv():
    """A^T [ (G g G^T) * (B^T d B) ] A is the 2x2 valid correlation of a 4x4 tile with g."""
    rng = np.random.default_rng(0)
    g = rng.standard_normal((5, 3, 3, 3)).astype("float32")          # K=5, C=3
    d = rng.standard_normal((3, 4, 4)).astype("float32")
    u = transform_weight(g).reshape(4, 4, 5, 3)                      # [xi, nu, K, C]
    v = np.einsum("xi,cij,nj->xnc", B_T, d, B_T)                     # [xi, nu, C]
    m = np.einsum("xnkc,xnc->xnk", u, v)
    y = np.einsum("ax,xnk,bn->kab", A_T, m, A_T)
    want = np.array([[[np.sum(g[k] * d[:, a:a + 3, b:b + 3]) for b in range(2)]
                      for a in range(2)] for k in range(5)])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


SHAPES = {  # name: (cin, cout, (h, w), pad[, groups])
    "64_to_64_w13": (64, 64, (13, 13), 1),
    "128_to_128_w7_nopad": (128, 128, (9, 9), 0),
    "16_to_16_w1": (16, 16, (5, 1), 1),
    "8_to_32_h1_w7": (8, 32, (1, 7), 1),
    "96_to_32_w6": (96, 32, (6, 6), 1),
    "groups2_64_to_64_w13": (64, 64, (13, 13), 1, 2),  # AlexNet's grouped 3x3s
    "48_to_160_w40": (48, 160, (40, 40), 1),  # bands of one row (two would not fit a cache)
}


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("target", [LLVM, FOUR_LANES], ids=["host", "4_lanes"])
def test_schedule_matches_unscheduled(name, target, monkeypatch):
    from tvm_rebirth.compile import winograd

    monkeypatch.setattr(winograd, "winograd_pays", lambda *shape: True)  # odd shapes too
    cin, cout, hw, pad, *groups = SHAPES[name]
    funcs = _funcs(_conv_module(cin, cout, hw, pad, groups=groups[0] if groups else 1), target)
    assert list(funcs) == ["fused_rebirth_winograd_add_relu"], list(funcs)
    assert_schedule_matches(funcs["fused_rebirth_winograd_add_relu"], WinogradRule(), target,
                            atol=1e-3)


@pytest.mark.parametrize("name", ["64_to_64_w13", "48_to_160_w40", "groups2_64_to_64_w13"])
def test_schedule_with_vector_rows_matches_unscheduled(name, monkeypatch):
    """The AArch64 plan (FMA by element: the GEMM reads each input channel's row of tiles as
    vectors) built and run on this host."""
    from tvm_rebirth.compile import pack_convs, winograd
    from tvm_rebirth.compile.layouts import VectorUnit

    monkeypatch.setattr(winograd, "winograd_pays", lambda *shape: True)
    monkeypatch.setattr(pack_convs, "vector_unit",
                        lambda target: VectorUnit(4, 32, fma_by_element=True))
    cin, cout, hw, pad, *groups = SHAPES[name]
    (func,) = _funcs(_conv_module(cin, cout, hw, pad, groups=groups[0] if groups else 1),
                     FOUR_LANES).values()
    assert "rebirth.vector_rows\": 1" in func.script()
    assert_schedule_matches(func, WinogradRule(), FOUR_LANES, atol=1e-3)


def _allocations(func, rule) -> dict:
    """{buffer name: shape} of the buffers ``rule``'s schedule of ``func`` allocates, each
    placed and compacted as TVM's lowering does."""
    from tvm import s_tir

    sch = rule.apply(func.with_attr("global_symbol", "main"), LLVM, False)
    mod = tvm.transform.Sequential([
        s_tir.transform.LowerInitBlock(), s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(), s_tir.transform.CompactBufferAllocation()
    ])(sch.mod)
    found = re.findall(r"(\w+) = T\.sblock_alloc_buffer\(\((.*?)\)\)", mod.script())
    return {name: [int(d) for d in re.findall(r"int64\((\d+)\)", shape)] for name, shape in found}


def test_intermediates_hold_one_band(monkeypatch):
    """The transformed input and the GEMM's output are a band of tile rows inside the
    kernel (GoogLeNet conv2: one of its 28 rows of 28 tiles), so a module plans the
    activations of the direct build: between two Winograd convs, the first one's output and
    nothing of Winograd's."""
    (func,) = _funcs(_conv_module(64, 192, (56, 56))).values()
    shapes = _allocations(func, WinogradRule())
    assert shapes["rebirth_winograd_input"][2] == 1  # [N, 16 C, 1 tile row, tiles]
    assert shapes["rebirth_conv"][2] == 1            # [N, 16 K / block, 1 row, tiles, block]
    assert shapes["rebirth_winograd_pad"][2] == 4    # the 4 input rows of a tile row
    # a late layer (GoogLeNet 5b, 7x7: 4 tile rows) in two bands of 2 rows
    (func,) = _funcs(_conv_module(192, 384, (7, 7))).values()
    shapes = _allocations(func, WinogradRule())
    assert shapes["rebirth_winograd_input"][2] == shapes["rebirth_conv"][2] == 2
    rng = np.random.default_rng(0)
    x = relax.Var("x", relax.TensorType((1, 64, 56, 56), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = x
            for cin, cout in ((64, 96), (96, 64)):
                weight = rng.standard_normal((cout, cin, 3, 3)).astype("float32")
                y = bb.emit(R.nn.relu(R.nn.conv2d(y, relax.const(weight), padding=1)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    assert sum("winograd" in n for n in _funcs(mod)) == 2
    winograd = planned_memory(mod)
    monkeypatch.setenv("TVM_REBIRTH_WINOGRAD", "0")
    assert winograd == planned_memory(mod) == 4 * 96 * 56 * 56


def test_kernel_macs_count_the_direct_conv():
    (macs,) = kernel_macs(_conv_module(64, 192, (56, 56), epilogue="none"), LLVM).values()
    assert macs == 64 * 192 * 9 * 56 * 56


@pytest.mark.parametrize("epilogue,groups,channels,batch", [
    ("bias_relu", 1, 64, 1), ("none", 1, 64, 1), ("concat", 1, 64, 1), ("bias_relu", 2, 128, 1),
    ("bias_relu", 1, 64, 3)])  # a batch of 3 (training batches, --input-shape)
def test_winograd_module_matches_direct_build(epilogue, groups, channels, batch, monkeypatch):
    mod = _conv_module(channels, channels, (13, 13), epilogue=epilogue, groups=groups,
                       batch=batch)
    x = np.random.default_rng(1).standard_normal((batch, channels, 13, 13)).astype("float32")
    got = Runner(mod, tuned=False)(x)[0]
    monkeypatch.setenv("TVM_REBIRTH_WINOGRAD", "0")
    assert not any("winograd" in n for n in _funcs(mod))
    want = Runner(mod, tuned=False)(x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    monkeypatch.setenv("TVM_REBIRTH_WINOGRAD", "1")
    names = list(_funcs(mod))
    # the kernel takes the elementwise epilogue, never the concat after it
    assert any(n.startswith("fused_rebirth_winograd") or n == "rebirth_winograd"
               for n in names) and not any("winograd" in n and "concat" in n for n in names)


def test_where_winograd_is_not_used():
    """Stride 2, 5x5, depthwise and narrow convs stay direct; the rule leaves other functions
    alone."""
    for mod in (_conv_module(64, 64, (13, 13), stride=2), _conv_module(64, 64, (13, 13), k=5,
                                                                        pad=2),
                _conv_module(8, 8, (13, 13)), _conv_module(64, 64, (13, 13), groups=64)):
        names = list(_funcs(mod))
        assert not any("winograd" in n for n in names), names
        for func in _funcs(mod).values():
            assert WinogradRule().apply(func.with_attr("global_symbol", "main"), LLVM,
                                        False) is None
    assert not winograd_pays(8, 8, 49, 169) and winograd_pays(64, 192, 784, 3025)
