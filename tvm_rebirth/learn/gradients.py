"""Relax gradients for the ops our importer emits that apache-tvm 0.27 cannot differentiate.

``relax.transform.Gradient`` needs an ``FPrimalGradient`` for every op between a trainable
weight and the loss. TVM 0.27 registers none for the LRN subgraph's ``nn.avg_pool3d`` and
``squeeze``, for ``nn.batch_norm`` (inference form), ``nn.prelu``, ``nn.leakyrelu``, ``clip``,
``nn.adaptive_avg_pool2d`` (global), ``flatten``, ``nn.pad``, ``nn.dropout`` (as inference
runs it) and ``stack`` (ONNX ``Sum``). ``register()`` adds ours, once,
and never replaces a gradient TVM already has. ``untrainable_ops(func)`` names the ops of a
function that still have none, so a fine-tune can refuse before it fits anything.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.op import base
from tvm.relax.op.grad import no_grad

_REGISTERED = []


def _dims(expr) -> list:
    return [int(d) for d in expr.ty.shape]


def _dtype(expr) -> str:
    return expr.ty.dtype


def _zero(expr):
    return relax.const(0, _dtype(expr))


def _squeeze_grad(orig_var, orig_call, output_grad, ctx):
    """y = squeeze(x): dx = reshape(dy, x.shape)."""
    return [relax.op.reshape(output_grad, orig_call.args[0].ty.shape)]


def _avg_pool3d_grad(orig_var, orig_call, output_grad, ctx):
    """y = avg_pool3d(x) with stride 1, no dilation, padding counted: each x feeds the windows
    that cover it, each with weight 1/K, so dx is the same box filter over dy with the padding
    mirrored (k-1-p_before before, k-1-p_after after). ``untrainable_ops`` names the rest."""
    attrs = orig_call.attrs
    kernel = [int(k) for k in attrs.pool_size]
    pad = [int(p) for p in attrs.padding]
    before, after = pad[:3], pad[3:]
    padding = [k - 1 - p for k, p in zip(kernel, before)] + \
              [k - 1 - p for k, p in zip(kernel, after)]
    return [relax.op.nn.avg_pool3d(output_grad, kernel, strides=[1, 1, 1], padding=padding,
                                   count_include_pad=True, layout=attrs.layout)]


def _avg_pool3d_supported(call) -> str | None:
    attrs = call.attrs
    if any(int(s) != 1 for s in attrs.strides) or any(int(d) != 1 for d in attrs.dilation):
        return "only stride 1 and no dilation"
    if not attrs.count_include_pad and any(int(p) for p in attrs.padding):
        return "padding must be counted (count_include_pad)"
    if attrs.ceil_mode or str(attrs.layout) != "NCDHW":
        return "only NCDHW without ceil_mode"
    if any(int(k) - 1 < int(p) for k, p in zip(list(attrs.pool_size) * 2, attrs.padding)):
        return "padding wider than the window"
    return None


def _channel_view(expr, axis):
    """A (1, C, 1, ...) view shape for a per-channel vector against ``expr``'s rank."""
    shape = [1] * len(expr.ty.shape)
    shape[axis] = -1
    return shape


def _batch_norm_grad(orig_var, orig_call, output_grad, ctx):
    """Inference batch_norm, y = (x - mean) / sqrt(var + eps) * gamma + beta per channel:
    dx = dy * gamma / std; dgamma = sum(dy * xhat); dbeta = sum(dy); dmean = -sum(dy) * gamma
    / std; dvar = -sum(dy * (x - mean)) * gamma / (2 std^3), sums over the other axes."""
    x, gamma, beta, mean, var = orig_call.args
    axis = int(orig_call.attrs.axis)
    view = _channel_view(x, axis)
    others = [i for i in range(len(x.ty.shape)) if i != axis]
    eps = relax.const(float(orig_call.attrs.epsilon), _dtype(x))
    std = ctx.normalize(relax.op.sqrt(relax.op.add(var, eps)))
    scale = ctx.normalize(relax.op.divide(gamma, std))
    dy = ctx.normalize(relax.TupleGetItem(output_grad, 0))
    centred = ctx.normalize(relax.op.subtract(x, relax.op.reshape(mean, view)))
    sum_dy = ctx.normalize(relax.op.sum(dy, axis=others))
    sum_dy_centred = ctx.normalize(relax.op.sum(relax.op.multiply(dy, centred), axis=others))
    half = relax.const(-0.5, _dtype(x))
    return [relax.op.multiply(dy, relax.op.reshape(scale, view)),
            relax.op.divide(sum_dy_centred, std),
            sum_dy,
            relax.op.negative(relax.op.multiply(sum_dy, scale)),
            relax.op.multiply(relax.op.multiply(sum_dy_centred, half),
                              relax.op.divide(scale, relax.op.add(var, eps)))]


def _batch_norm_supported(call) -> str | None:
    return "only the inference form (training=False)" if call.attrs.training else None


def _prelu_grad(orig_var, orig_call, output_grad, ctx):
    """y = x if x >= 0 else alpha * x (alpha per channel on ``axis``)."""
    x, alpha = orig_call.args
    axis = int(orig_call.attrs.axis)
    alpha_b = relax.op.reshape(alpha, _channel_view(x, axis))
    negative = relax.op.less(x, _zero(x))
    dx = relax.op.where(negative, relax.op.multiply(output_grad, alpha_b), output_grad)
    reduce_axes = [i for i in range(len(x.ty.shape)) if i != axis]
    dalpha = relax.op.sum(relax.op.where(negative, relax.op.multiply(output_grad, x), _zero(x)),
                          axis=reduce_axes)
    return [dx, relax.op.reshape(dalpha, alpha.ty.shape)]


def _leakyrelu_grad(orig_var, orig_call, output_grad, ctx):
    """y = x if x >= 0 else alpha * x."""
    x = orig_call.args[0]
    alpha = relax.const(float(orig_call.attrs.alpha), _dtype(x))
    return [relax.op.where(relax.op.less(x, _zero(x)), relax.op.multiply(output_grad, alpha),
                           output_grad)]


def _clip_grad(orig_var, orig_call, output_grad, ctx):
    """y = min(max(x, lo), hi): dy passes where lo <= x <= hi."""
    x, low, high = orig_call.args
    lo = relax.const(float(low.value), _dtype(x))
    hi = relax.const(float(high.value), _dtype(x))
    outside = relax.op.logical_or(relax.op.less(x, lo), relax.op.greater(x, hi))
    return [relax.op.where(outside, _zero(x), output_grad), no_grad(low), no_grad(high)]


def _adaptive_avg_pool2d_grad(orig_var, orig_call, output_grad, ctx):
    """Global average pooling (output 1x1): dx = broadcast(dy) / (H * W)."""
    x = orig_call.args[0]
    n, c, h, w = _dims(x)
    scale = relax.const(1.0 / (h * w), _dtype(x))
    return [relax.op.broadcast_to(relax.op.multiply(output_grad, scale), x.ty.shape)]


def _adaptive_avg_pool2d_supported(call) -> str | None:
    size = call.attrs.output_size
    if str(call.attrs.layout) != "NCHW" or size is None or \
            [int(s) for s in size] not in ([1], [1, 1]):
        return "only global pooling (output size 1, NCHW)"
    return None


def _flatten_grad(orig_var, orig_call, output_grad, ctx):
    return [relax.op.reshape(output_grad, orig_call.args[0].ty.shape)]


def _pad_grad(orig_var, orig_call, output_grad, ctx):
    """Constant padding: dx is dy without the padded border."""
    x = orig_call.args[0]
    widths = [int(p) for p in orig_call.attrs.pad_width]
    dims = _dims(x)
    begin = [widths[2 * i] for i in range(len(dims))]
    end = [b + d for b, d in zip(begin, dims)]
    return [relax.op.strided_slice(output_grad, list(range(len(dims))), begin, end)]


def _pad_supported(call) -> str | None:
    if str(call.attrs.pad_mode) != "constant" or any(int(p) < 0 for p in call.attrs.pad_width):
        return "only constant, non-negative padding"
    return None


def _dropout_grad(orig_var, orig_call, output_grad, ctx):
    """Dropout as the build runs it (inference: the identity, and a mask of ones)."""
    return [ctx.normalize(relax.TupleGetItem(output_grad, 0))]


def _stack_grad(orig_var, orig_call, output_grad, ctx):
    """y = stack((x1, ..., xn), axis): each dx_i is slice i of dy along ``axis``."""
    axis = int(orig_call.attrs.axis)
    count = len(orig_call.args[0].ty.fields)
    parts = ctx.normalize(relax.op.split(output_grad, count, axis))
    return [relax.Tuple([ctx.normalize(relax.op.squeeze(relax.TupleGetItem(parts, i), [axis]))
                         for i in range(count)])]


# op name -> (gradient, None or a check returning why a call cannot be differentiated)
GRADIENTS = {
    "relax.squeeze": (_squeeze_grad, None),
    "relax.nn.avg_pool3d": (_avg_pool3d_grad, _avg_pool3d_supported),
    "relax.nn.batch_norm": (_batch_norm_grad, _batch_norm_supported),
    "relax.nn.prelu": (_prelu_grad, None),
    "relax.nn.leakyrelu": (_leakyrelu_grad, None),
    "relax.clip": (_clip_grad, None),
    "relax.nn.adaptive_avg_pool2d": (_adaptive_avg_pool2d_grad, _adaptive_avg_pool2d_supported),
    "relax.flatten": (_flatten_grad, None),
    "relax.nn.pad": (_pad_grad, _pad_supported),
    "relax.nn.dropout": (_dropout_grad, None),
    "relax.stack": (_stack_grad, None),
}


def _conv2d_supported(call) -> str | None:
    """TVM's own conv2d gradient: NCHW/OIHW only, and it sizes a dilated kernel's transposed
    conv as if undilated (it fails to build, or its data gradient is a row and a column too
    big)."""
    attrs = call.attrs
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return "only NCHW data with OIHW kernels"
    kernel = [int(d) for d in call.args[1].ty.shape][2:]
    if any(int(d) > 1 and k > 1 for d, k in zip(attrs.dilation, kernel)):
        return "TVM 0.27's gradient of a dilated conv is mis-sized"
    return None


# op name -> why TVM's own gradient cannot differentiate a call of it (None: it can)
TVM_GRADIENT_LIMITS = {"relax.nn.conv2d": _conv2d_supported}


def _has_gradient(op_name: str) -> bool:
    return tvm.ir.Op.get(op_name).get_attr("FPrimalGradient") is not None


def register() -> None:
    """Register the gradients of ``GRADIENTS`` that TVM does not have (idempotent)."""
    for name, (gradient, _) in GRADIENTS.items():
        if name in _REGISTERED or _has_gradient(name):
            continue
        base.register_gradient(name, gradient)
        _REGISTERED.append(name)


def untrainable_ops(func: relax.Function) -> dict:
    """{op name: why} for the calls of ``func`` that ``relax.transform.Gradient`` cannot
    differentiate (no gradient registered, or a form ours does not cover)."""
    register()
    problems = {}

    def visit(expr):
        if not isinstance(expr, relax.Call) or not isinstance(expr.op, tvm.ir.Op):
            return
        name = expr.op.name
        check = GRADIENTS[name][1] if name in GRADIENTS else TVM_GRADIENT_LIMITS.get(name)
        if check is not None:
            why = check(expr)
            if why:
                problems.setdefault(name, why)
        elif not _has_gradient(name):
            problems.setdefault(name, "no gradient registered")

    relax.analysis.post_order_visit(func.body, visit)
    return problems
