"""Dense layers as blocked 1x1 convs (compile/dense.py): ONNX Gemm's matmul by a transposed
constant (and a plain constant) becomes our conv, its PrimFunc scheduled by ConvRule computes
what the unscheduled one computes (this host's width, 4 lanes, and AArch64's vector-row plan
run here), whole modules match TVM's own lowering, and what it must not touch stays."""

import numpy as np
import pytest
import tvm
from tvm import relax, tirx
from tvm.relax import op as R

from tvm_rebirth.compile.build import Runner, fused_module, host_target
from tvm_rebirth.compile.conv_rules import ConvRule
from tvm_rebirth.compile.layouts import VectorUnit
from tvm_rebirth.compile.pack_convs import PackConvWeights

from kernel_check import assert_schedule_matches

LLVM = host_target()
FOUR_LANES = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})


def _dense_module(k, n, transposed=True, batch=1, constant=True, seed=0):
    """x[batch, K] @ W (+ bias, ReLU); W as ONNX Gemm imports it (permute_dims of an [N, K]
    constant) or a [K, N] constant, or a parameter."""
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((n, k)) / np.sqrt(k)).astype("float32")
    bias = rng.standard_normal(n).astype("float32")
    x = relax.Var("x", relax.TensorType((batch, k), "float32"))
    params = [x] if constant else [x, relax.Var("w", relax.TensorType((k, n), "float32"))]
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            if not constant:
                w = params[1]
            elif transposed:
                w = bb.emit(R.permute_dims(relax.const(weight), [1, 0]))
            else:
                w = relax.const(np.ascontiguousarray(weight.T))
            y = bb.emit(R.matmul(x, w))
            out = bb.emit_output(R.nn.relu(R.add(y, relax.const(bias))))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("transposed", [True, False], ids=["gemm_import", "plain_constant"])
@pytest.mark.parametrize("shape", [(256, 100), (9, 4096), (1000, 3)])
def test_dense_module_matches_tvm_lowering(shape, transposed, monkeypatch):
    mod = _dense_module(*shape, transposed=transposed)
    rewritten = PackConvWeights(LLVM)(mod).script()
    assert "rebirth_dense" in rewritten and "R.matmul" not in rewritten
    assert "R.permute_dims" not in rewritten  # the transposed constant is not folded for nothing
    x = np.random.default_rng(1).standard_normal((1, shape[0])).astype("float32")
    got = Runner(mod, tuned=False)(x)[0]
    monkeypatch.setenv("TVM_REBIRTH_CONV_KERNELS", "0")
    want = Runner(mod, tuned=False)(x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", [LLVM, FOUR_LANES], ids=["host", "4_lanes"])
def test_dense_kernel_matches_unscheduled(target):
    (func,) = [f for gv, f in fused_module(_dense_module(96, 40), target).functions.items()
               if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith("rebirth_dense")]
    assert_schedule_matches(func, ConvRule(), target, atol=1e-4)


def test_dense_kernel_with_vector_rows_matches_unscheduled(monkeypatch):
    """The AArch64 plan (FMA by element, one-column rows) built and run on this host."""
    from tvm_rebirth.compile import pack_convs

    monkeypatch.setattr(pack_convs, "vector_unit",
                        lambda target: VectorUnit(4, 32, fma_by_element=True))
    (func,) = [f for gv, f in fused_module(_dense_module(96, 40), FOUR_LANES).functions.items()
               if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith("rebirth_dense")]
    assert '"rebirth.vector_rows": 1' in func.script()
    assert_schedule_matches(func, ConvRule(), FOUR_LANES, atol=1e-4)


def test_what_dense_leaves_alone():
    """Batches of rows and weights that are not constants stay matmuls."""
    for mod in (_dense_module(64, 32, batch=2), _dense_module(64, 32, constant=False)):
        assert "rebirth_dense" not in PackConvWeights(LLVM)(mod).script()
