"""FoldBatchNorm (compile/fold_batch_norm.py): an inference BatchNorm with constant parameters
is folded into the conv before it (through a constant bias add), any other one becomes a
per-channel multiply-add, and no-op cases are left as they are; the rewritten module computes
what the unmodified one computes, and a build runs no BatchNorm kernel."""

import numpy as np
import pytest
import tvm
from tvm import relax, tirx
from tvm.relax import op as R

from tvm_rebirth.compile.build import Runner, fused_module, host_target
from tvm_rebirth.compile.fold_batch_norm import FoldBatchNorm

CHANNELS = 6


def _norm_params(rng, channels=CHANNELS):
    return [relax.const(v.astype("float32")) for v in (
        rng.uniform(0.5, 2.0, channels), rng.standard_normal(channels),
        rng.standard_normal(channels), rng.uniform(0.1, 3.0, channels))]


def _module(before_norm: str, bias_shape=(1, CHANNELS, 1, 1), params=None, training=False,
            seed=0):
    """x -> [conv] [+ bias] [relu] -> batch_norm -> [0]. ``before_norm``: "conv",
    "conv_bias" or "relu" (a BatchNorm that follows no conv)."""
    rng = np.random.default_rng(seed)
    x = relax.Var("x", relax.TensorType((1, 4, 9, 9), "float32"))
    args = [x] + ([] if params is None else params)
    bb = relax.BlockBuilder()
    with bb.function("main", args):
        with bb.dataflow():
            weight = rng.standard_normal((CHANNELS, 4, 3, 3)).astype("float32")
            y = bb.emit(R.nn.conv2d(x, relax.const(weight), padding=1))
            if before_norm == "conv_bias":
                bias = rng.standard_normal(bias_shape).astype("float32")
                y = bb.emit(R.add(y, relax.const(bias)))
            if before_norm == "relu":
                y = bb.emit(R.nn.relu(y))
            norm = bb.emit(R.nn.batch_norm(y, *(params or _norm_params(rng)), axis=1,
                                           epsilon=1e-3, training=training))
            out = bb.emit_output(bb.emit(relax.TupleGetItem(norm, 0)))
        bb.emit_func_output(out)
    return bb.get()


def _ops(mod) -> list[str]:
    names = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            names.append(expr.op.name)

    relax.analysis.post_order_visit(mod["main"], visit)
    return names


def _reference(mod, x):
    """The module through TVM's own default pipeline (no pass of ours)."""
    with tvm.target.Target("llvm"):
        ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _folded(mod):
    return relax.transform.DeadCodeElimination()(FoldBatchNorm()(mod))


@pytest.mark.parametrize("before_norm", ["conv", "conv_bias"])
def test_batch_norm_after_a_conv_is_folded_into_its_weights(before_norm):
    mod = _module(before_norm)
    folded = _folded(mod)
    assert _ops(folded) == ["relax.nn.conv2d", "relax.add"]
    x = np.random.default_rng(1).standard_normal((1, 4, 9, 9)).astype("float32")
    np.testing.assert_allclose(_reference(folded, x), _reference(mod, x), rtol=1e-5, atol=1e-4)


def test_batch_norm_after_no_conv_becomes_a_multiply_add():
    mod = _module("relu")
    folded = _folded(mod)
    assert _ops(folded) == ["relax.nn.conv2d", "relax.nn.relu", "relax.multiply", "relax.add"]
    x = np.random.default_rng(2).standard_normal((1, 4, 9, 9)).astype("float32")
    np.testing.assert_allclose(_reference(folded, x), _reference(mod, x), rtol=1e-5, atol=1e-4)


def test_bias_along_the_width_is_not_folded_into_the_conv():
    # a [C] bias broadcasts along the last axis (W here, C == W would be needed): keep the
    # add, and the BatchNorm becomes a multiply-add after it
    mod = _module("conv_bias", bias_shape=(9,))
    folded = _folded(mod)
    assert _ops(folded) == ["relax.nn.conv2d", "relax.add", "relax.multiply", "relax.add"]
    x = np.random.default_rng(3).standard_normal((1, 4, 9, 9)).astype("float32")
    np.testing.assert_allclose(_reference(folded, x), _reference(mod, x), rtol=1e-5, atol=1e-4)


def test_noop_when_the_statistics_are_inputs():
    params = [relax.Var(n, relax.TensorType((CHANNELS,), "float32"))
              for n in ("gamma", "beta", "mean", "var")]
    mod = _module("conv", params=params)
    tvm.ir.assert_structural_equal(FoldBatchNorm()(mod), mod)


def test_noop_for_a_training_batch_norm():  # it normalises by the batch's statistics
    mod = _module("conv", training=True)
    tvm.ir.assert_structural_equal(FoldBatchNorm()(mod), mod)


def test_a_build_runs_no_batch_norm_kernel_and_matches_the_model():
    mod = _module("conv_bias")
    kernels = [gv.name_hint for gv, f in fused_module(mod, host_target()).functions.items()
               if isinstance(f, tirx.PrimFunc)]
    assert kernels and not any("batch_norm" in k for k in kernels), kernels
    assert any("rebirth_conv2d" in k for k in kernels), kernels  # the BN is the conv's epilogue
    x = np.random.default_rng(4).standard_normal((1, 4, 9, 9)).astype("float32")
    np.testing.assert_allclose(Runner(mod, tuned=False)(x)[0], _reference(mod, x),
                               rtol=1e-5, atol=1e-4)
