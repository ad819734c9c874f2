"""The gradients tvm_rebirth registers for ops TVM 0.27 cannot differentiate, each checked
against central finite differences of the compiled forward op (float64), and the check that
names an op a fine-tune cannot train."""

import numpy as np
import pytest
import tvm
from tvm import relax

from tvm_rebirth.learn import gradients

RNG = np.random.default_rng(0)


def _compile(mod, name):
    exe = tvm.compile(mod, target="llvm")
    return relax.VirtualMachine(exe, tvm.cpu())[name]


def check_gradient(make_call, shapes, atol=1e-6):
    """d/dx_i of sum(op(x...) * r) by TVM's Gradient (with our registrations) equals the
    central finite difference of the compiled forward op, for every input."""
    gradients.register()
    params = [relax.Var(f"x{i}", relax.TensorType(s, "float64")) for i, s in enumerate(shapes)]
    bb = relax.BlockBuilder()
    with bb.function("forward", params):
        with bb.dataflow():
            out = bb.emit_output(make_call(*params))
        bb.emit_func_output(out)
    forward_mod = bb.get()
    out_shape = [int(d) for d in forward_mod["forward"].ret_ty.shape]
    weights = RNG.standard_normal(out_shape)
    bb = relax.BlockBuilder()
    lparams = [relax.Var(f"x{i}", relax.TensorType(s, "float64")) for i, s in enumerate(shapes)]
    with bb.function("loss", lparams):
        with bb.dataflow():
            y = bb.emit(make_call(*lparams))
            weighted = relax.op.multiply(y, relax.const(weights, "float64"))
            loss = bb.emit_output(relax.op.sum(weighted))
        bb.emit_func_output(loss)
    grad_mod = relax.transform.Gradient("loss")(bb.get())
    adjoint = _compile(grad_mod, "loss_adjoint")
    forward = _compile(forward_mod, "forward")
    values = [RNG.standard_normal(s) + 0.05 for s in shapes]  # away from kinks at 0
    _, grads = adjoint(*[tvm.runtime.tensor(v) for v in values])
    eps = 1e-6
    for i, value in enumerate(values):
        numeric = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            for sign in (1, -1):
                shifted = [v.copy() for v in values]
                shifted[i][index] += sign * eps
                out = forward(*[tvm.runtime.tensor(v) for v in shifted]).numpy()
                numeric[index] += sign * float(np.sum(out * weights)) / (2 * eps)
        np.testing.assert_allclose(grads[i].numpy(), numeric, atol=atol, rtol=1e-5,
                                   err_msg=f"input {i}")


def test_squeeze():
    check_gradient(lambda x: relax.op.squeeze(x, [1]), [[2, 1, 3, 4]])


def test_flatten():
    check_gradient(lambda x: relax.op.flatten(x), [[2, 3, 2, 2]])


def test_avg_pool3d_the_lrn_window():
    """The LRN subgraph's channel window: 5 deep, padding 2 on each side, counted."""
    check_gradient(lambda x: relax.op.nn.avg_pool3d(x, [5, 1, 1], [1, 1, 1], [2, 0, 0, 2, 0, 0],
                                                    count_include_pad=True),
                   [[1, 1, 7, 3, 2]])


def test_avg_pool3d_uneven_padding():
    check_gradient(lambda x: relax.op.nn.avg_pool3d(x, [3, 2, 1], [1, 1, 1], [1, 0, 0, 2, 1, 0],
                                                    count_include_pad=True),
                   [[1, 2, 5, 3, 2]])


def test_batch_norm_inference():
    check_gradient(lambda x, g, b, m, v: relax.TupleGetItem(
        relax.op.nn.batch_norm(x, g, b, m, relax.op.abs(v), axis=1, training=False), 0),
        [[2, 3, 2, 2], [3], [3], [3], [3]])


def test_prelu():
    check_gradient(lambda x, a: relax.op.nn.prelu(x, a, axis=1), [[2, 3, 2, 2], [3]])


def test_leakyrelu():
    check_gradient(lambda x: relax.op.nn.leakyrelu(x, 0.2), [[2, 3, 4]])


def test_clip():
    check_gradient(lambda x: relax.op.clip(x, -0.5, 0.7), [[3, 4, 5]])


def test_global_adaptive_avg_pool2d():
    check_gradient(lambda x: relax.op.nn.adaptive_avg_pool2d(x, [1, 1]), [[2, 3, 4, 5]])


def test_pad():
    check_gradient(lambda x: relax.op.nn.pad(x, [0, 0, 0, 0, 1, 2, 0, 1]), [[1, 2, 3, 3]])


def test_dropout_as_inference_runs_it():
    check_gradient(lambda x: relax.TupleGetItem(relax.op.nn.dropout(x, 0.4), 0), [[2, 3, 2]])


def test_stack():
    check_gradient(lambda a, b: relax.op.stack(relax.Tuple([a, b]), axis=0), [[2, 3], [2, 3]])


def _function(make_call, shape):
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(make_call(x))
        bb.emit_func_output(out)
    return bb.get()["main"]


@pytest.mark.parametrize("make_call, why", [
    (lambda x: relax.op.nn.avg_pool3d(x, [3, 1, 1], [2, 1, 1], [1, 0, 0, 1, 0, 0]), "stride 1"),
    (lambda x: relax.op.nn.adaptive_avg_pool2d(relax.op.squeeze(x, [1]), [2, 2]), "global"),
    (lambda x: relax.op.cumprod(x, axis=2), "no gradient registered"),
    (lambda x: relax.op.nn.conv2d(relax.op.squeeze(x, [1]),
                                  relax.const(np.ones((2, 4, 3, 3), "float32")), padding=2,
                                  dilation=2), "dilated conv"),
])
def test_untrainable_ops_are_named(make_call, why):
    problems = gradients.untrainable_ops(_function(make_call, [1, 1, 4, 4, 4]))
    assert len(problems) == 1 and why in next(iter(problems.values()))


def test_trainable_function_has_no_problems():
    func = _function(lambda x: relax.op.nn.relu(relax.op.squeeze(x, [1])), [1, 1, 4, 4])
    assert gradients.untrainable_ops(func) == {}


@pytest.mark.heavy
def test_every_zoo_model_can_be_trained():
    """Block reconstruction and distillation pass through every op of every zoo model."""
    from tvm_rebirth import flow
    from tvm_rebirth.frontend.zoo import ZOO

    for name in ZOO:
        func = relax.transform.ToNonDataflow()(flow.load(name).mod)["main"]
        assert gradients.untrainable_ops(func) == {}, name
