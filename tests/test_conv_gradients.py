"""A conv's data and weight gradients on our blocked kernel (compile/conv_gradients.py): the
module ``relax.transform.Gradient`` makes keeps no conv2d_transpose and no CNHW conv2d after
PackConvWeights, the built gradients equal numpy's for strides, paddings, dilations, 1x1 to
7x7 kernels and a frozen (constant) conv in the path, strided data gradients run by phases
(a model's own strided ConvTranspose too, equal to TVM's lowering), the scheduled kernels
compute what their unscheduled PrimFuncs compute (this host, 4 lanes, AArch64's vector rows;
the unfolding without a division per element), and what the rewrite does not cover stays as
TVM emits it."""

import re

import numpy as np
import pytest
import tvm
from tvm import relax, tirx
from tvm.relax import op as R

from tvm_rebirth.compile.build import compile_module, fused_module, host_target
from tvm_rebirth.compile.conv_gradients import UnfoldRule
from tvm_rebirth.compile.conv_rules import ConvRule
from tvm_rebirth.compile.layouts import VectorUnit
from tvm_rebirth.compile.pack_convs import PackConvWeights

from kernel_check import assert_schedule_matches

LLVM = host_target()
FOUR_LANES = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})


def _loss_module(n, c, hw, o, k, stride, pad, dilation=1, frozen=False, seed=0):
    """(module with loss_adjoint, inputs, frozen weight or None): loss = sum(conv(x', W) * R)
    with x' = x, or (``frozen``) a conv of x by a constant 3x3 kernel; gradients for x
    and W. Returns the numpy arrays x, W, R and the frozen kernel."""
    rng = np.random.default_rng(seed)
    h, w = hw
    frozen_w = rng.standard_normal((c, c, 3, 3)).astype("float32") / 3 if frozen else None
    x = relax.Var("x", relax.TensorType((n, c, h, w), "float32"))
    weight = relax.Var("W", relax.TensorType((o, c, k, k), "float32"))
    top, left, bottom, right = pad if isinstance(pad, tuple) else (pad,) * 4
    probe = relax.Var("R", relax.TensorType(
        (n, o, (h + top + bottom - dilation * (k - 1) - 1) // stride + 1,
         (w + left + right - dilation * (k - 1) - 1) // stride + 1), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("loss", [x, weight, probe]):
        with bb.dataflow():
            src = bb.emit(R.nn.conv2d(x, relax.const(frozen_w), padding=1)) if frozen else x
            y = bb.emit(R.nn.conv2d(src, weight, strides=stride, padding=list(pad)
                                    if isinstance(pad, tuple) else pad,
                                    dilation=dilation))
            loss = bb.emit_output(R.sum(R.multiply(y, probe)))
        bb.emit_func_output(loss)
    mod = relax.transform.Gradient("loss", require_grads=[x, weight])(bb.get())
    arrays = [rng.standard_normal([int(d) for d in v.ty.shape]).astype("float32")
              for v in (x, weight, probe)]
    return mod, arrays, frozen_w


def _conv_and_grads(x, weight, probe, stride, pad, dilation):
    """numpy: (dL/dx, dL/dW) of L = sum(conv(x, W) * R), float64."""
    x, weight, probe = (a.astype(np.float64) for a in (x, weight, probe))
    n, c, h, w = x.shape
    o, _, k, _ = weight.shape
    top, left, bottom, right = pad if isinstance(pad, tuple) else (pad,) * 4
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    grad_padded = np.zeros_like(padded)
    grad_w = np.zeros_like(weight)
    oh, ow = probe.shape[2:]
    for i in range(k):
        for j in range(k):
            rows = slice(i * dilation, i * dilation + (oh - 1) * stride + 1, stride)
            cols = slice(j * dilation, j * dilation + (ow - 1) * stride + 1, stride)
            grad_w[:, :, i, j] = np.einsum("nchw,nohw->oc", padded[:, :, rows, cols], probe)
            grad_padded[:, :, rows, cols] += np.einsum("nohw,oc->nchw", probe, weight[:, :, i, j])
    return grad_padded[:, :, top:top + h, left:left + w], grad_w


def _frozen_transpose(grad, frozen_w):
    """numpy: the data gradient through a stride-1, pad-1 3x3 conv by ``frozen_w``."""
    n, c, h, w = grad.shape
    padded = np.zeros((n, c, h + 2, w + 2))
    for i in range(3):
        for j in range(3):
            padded[:, :, i:i + h, j:j + w] += np.einsum("nohw,oc->nchw", grad,
                                                         frozen_w[:, :, i, j].astype(np.float64))
    return padded[:, :, 1:1 + h, 1:1 + w]


CASES = {
    "3x3": dict(n=4, c=8, hw=(14, 14), o=16, k=3, stride=1, pad=1),
    "3x3_stride2": dict(n=4, c=8, hw=(15, 15), o=16, k=3, stride=2, pad=1),
    "5x5_uneven_width": dict(n=2, c=5, hw=(9, 11), o=7, k=5, stride=1, pad=2),
    "1x1": dict(n=2, c=8, hw=(14, 14), o=16, k=1, stride=1, pad=0),
    "7x7_stride2": dict(n=2, c=4, hw=(16, 16), o=8, k=7, stride=2, pad=3),
    "3x3_no_pad_stride2": dict(n=2, c=8, hw=(13, 13), o=12, k=3, stride=2, pad=0),
    # strided: one stride-1 conv per output phase; fmnist-inception's stem pads (1, 1, 0, 0)
    "3x3_stride2_top_left_pad": dict(n=2, c=8, hw=(14, 14), o=12, k=3, stride=2,
                                     pad=(1, 1, 0, 0)),
    "3x3_pad2_stride2": dict(n=2, c=4, hw=(12, 9), o=8, k=3, stride=2, pad=2),  # cropped phase
    "5x5_stride3": dict(n=2, c=4, hw=(13, 14), o=8, k=5, stride=3, pad=(2, 1, 1, 2)),
    "1x1_stride2": dict(n=2, c=8, hw=(9, 10), o=16, k=1, stride=2, pad=0),  # a zero phase
    # TVM 0.27's conv2d gradient ignores the dilation when it sizes the transposed conv: it
    # builds only where (dilation - 1) x (kernel - 1) < stride, and then its data gradient
    # is a row and a column too big (checked below); its weight gradient is right
    "2x2_dilated_stride2": dict(n=2, c=6, hw=(11, 11), o=10, k=2, stride=2, pad=1,
                                dilation=2),
    "behind_a_frozen_conv": dict(n=2, c=6, hw=(10, 10), o=8, k=3, stride=1, pad=1,
                                 frozen=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_run_on_our_kernels_and_equal_numpys(case):
    spec = CASES[case]
    mod, (x, weight, probe), frozen_w = _loss_module(**spec)
    rewritten = PackConvWeights(LLVM)(mod).script()
    assert "R.nn.conv2d_transpose(" not in rewritten and '"CNHW"' not in rewritten
    assert "rebirth_weight_gradient" in rewritten and "rebirth_conv2d_transpose" in rewritten
    stride, pad, dilation = spec["stride"], spec["pad"], spec.get("dilation", 1)
    # strided: by phases, interleaved, no multiply-adds by dilated zeros
    assert ("rebirth_interleave" in rewritten) == (stride > 1 and dilation == 1)
    assert ("rebirth_dilate" in rewritten) == (stride > 1 and dilation > 1)
    vm = relax.VirtualMachine(compile_module(mod, tuned=False).executable, tvm.cpu())
    _, (grad_x, grad_w) = vm["loss_adjoint"](*[tvm.runtime.tensor(a) for a in
                                               (x, weight, probe)])
    source = x
    if frozen_w is not None:  # the conv's input is the frozen conv's output
        padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
        h, w = x.shape[2:]
        source = sum(np.einsum("nchw,oc->nohw", padded[:, :, i:i + h, j:j + w],
                               frozen_w[:, :, i, j].astype(np.float64))
                     for i in range(3) for j in range(3))
    want_x, want_w = _conv_and_grads(source, weight, probe, stride, pad, dilation)
    if frozen_w is not None:
        want_x = _frozen_transpose(want_x, frozen_w)
    np.testing.assert_allclose(grad_w.numpy(), want_w, rtol=1e-4, atol=1e-3)
    if dilation > 1:  # TVM's own mis-sized data gradient (see CASES)
        assert grad_x.shape[2] == want_x.shape[2] + 1
        return
    np.testing.assert_allclose(grad_x.numpy(), want_x, rtol=1e-4, atol=1e-3)


def _gradient_funcs(target, prefix, case="3x3_stride2"):
    mod, _, _ = _loss_module(**CASES[case])
    return [f for gv, f in fused_module(mod, target).functions.items()
            if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith(prefix)]


@pytest.mark.parametrize("target", [LLVM, FOUR_LANES], ids=["host", "4_lanes"])
@pytest.mark.parametrize("prefix", ["rebirth_weight_gradient", "rebirth_conv2d_transpose"])
@pytest.mark.parametrize("case", ["3x3_stride2", "3x3_pad2_stride2"])  # the latter: cropped
def test_gradient_kernels_match_unscheduled(target, prefix, case):
    funcs = _gradient_funcs(target, prefix, case)
    assert funcs
    for func in funcs:
        assert_schedule_matches(func, ConvRule(), target, atol=1e-3)


@pytest.mark.parametrize("case", ["3x3_stride2", "3x3_stride2_top_left_pad", "1x1"])
def test_unfold_schedule_matches_unscheduled_and_needs_no_division(case):
    """UnfoldRule: the weight gradient's unfolded input, rows and columns split back into
    their (n, y, x) and (c, a, b) loops; it takes no other function."""
    mod, _, _ = _loss_module(**CASES[case])
    funcs = {gv.name_hint: f for gv, f in fused_module(mod, LLVM).functions.items()
             if isinstance(f, tirx.PrimFunc)}
    unfolds = [f for name, f in funcs.items() if name.startswith("rebirth_unfold")]
    assert unfolds
    for func in unfolds:
        sch = assert_schedule_matches(func, UnfoldRule(), LLVM)
        lowered = tvm.s_tir.transform.LowerOpaqueBlock()(
            tvm.s_tir.transform.ConvertBlocksToOpaque()(sch.mod))
        script = tvm.tirx.transform.StmtSimplify()(lowered).script()
        (parallel,) = re.findall(r"for (\w+) in T\.parallel", script)
        # only the parallel (image, row) loop is divided, once per row of the output
        assert set(re.findall(r"(\w+) (?://|%) ", script)) <= {parallel}
    assert all(UnfoldRule().apply(f, LLVM, False) is None
               for name, f in funcs.items() if not name.startswith("rebirth_unfold"))


def test_weight_gradient_with_vector_rows_matches_unscheduled(monkeypatch):
    """The AArch64 plan (FMA by element, vector rows) built and run on this host."""
    from tvm_rebirth.compile import pack_convs

    monkeypatch.setattr(pack_convs, "vector_unit",
                        lambda target: VectorUnit(4, 32, fma_by_element=True))
    (func,) = _gradient_funcs(FOUR_LANES, "rebirth_weight_gradient")
    assert '"rebirth.vector_rows": 1' in func.script()
    assert_schedule_matches(func, ConvRule(), FOUR_LANES, atol=1e-3)


@pytest.mark.parametrize("stride,padding,extra", [(2, 1, 1), (2, 0, 0), (3, 2, 1)])
def test_inference_conv_transpose_with_constant_weights_matches_tvms_lowering(
        stride, padding, extra, monkeypatch):
    """A model's own strided ConvTranspose (constant IOHW weights, output padding) runs by
    phases, each phase's taps packed at compile time, and equals TVM's own lowering."""
    rng = np.random.default_rng(stride + padding)
    weight = rng.standard_normal((8, 6, 4, 3)).astype("float32")
    x = relax.Var("x", relax.TensorType((2, 8, 7, 9), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(R.nn.relu(R.nn.conv2d_transpose(
                x, relax.const(weight), strides=stride, padding=padding,
                output_padding=extra)))
        bb.emit_func_output(out)
    mod = bb.get()
    assert "rebirth_interleave" in PackConvWeights(LLVM)(mod).script()
    data = tvm.runtime.tensor(rng.standard_normal((2, 8, 7, 9)).astype("float32"))
    ours = relax.VirtualMachine(compile_module(mod, tuned=False).executable, tvm.cpu())
    got = ours["main"](data).numpy()
    monkeypatch.setenv("TVM_REBIRTH_CONV_KERNELS", "0")
    tvms = relax.VirtualMachine(compile_module(mod, tuned=False).executable, tvm.cpu())
    np.testing.assert_allclose(got, tvms["main"](data).numpy(), rtol=1e-4, atol=1e-4)


def test_what_the_gradient_rewrite_leaves_alone():
    """Grouped convs' gradients, and a transposed conv padded beyond its kernel (no conv
    computes it without cropping), stay as TVM emits them."""
    x = relax.Var("x", relax.TensorType((2, 8, 10, 10), "float32"))
    weight = relax.Var("W", relax.TensorType((8, 4, 3, 3), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("loss", [x, weight]):
        with bb.dataflow():
            y = bb.emit(R.nn.conv2d(x, weight, padding=1, groups=2))
            loss = bb.emit_output(R.sum(R.multiply(y, y)))
        bb.emit_func_output(loss)
    grouped = relax.transform.Gradient("loss", require_grads=[x, weight])(bb.get())
    script = PackConvWeights(LLVM)(grouped).script()
    assert "R.nn.conv2d_transpose(" in script and "rebirth_weight_gradient" not in script

    dy = relax.Var("dy", relax.TensorType((1, 4, 10, 10), "float32"))
    kernel = relax.Var("K", relax.TensorType((4, 4, 1, 1), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [dy, kernel]):
        with bb.dataflow():
            out = bb.emit_output(R.nn.conv2d_transpose(dy, kernel, padding=1))
        bb.emit_func_output(out)
    assert "R.nn.conv2d_transpose(" in PackConvWeights(LLVM)(bb.get()).script()
