"""Dense layers with constant weights as 1x1 convolutions on the channel-blocked kernel.

``y[1, N] = x[1, K] @ W[K, N]`` (ONNX Gemm imports as ``R.matmul(x, R.permute_dims(W))``) is
a 1x1 conv of a 1x1 image with K input and N output channels. TVM's generic schedule reads
W a few columns at a time across all K rows (a new cache line per multiply-add group and
one accumulator chain: about 2 GFLOP/s on AlexNet's fc6 here); as a blocked conv the
weights are packed at compile time so each block of output channels streams its own
contiguous [K, block] slab through a row of accumulators, and ``conv_rules.ConvRule``
schedules it like any 1x1 conv.

``dense_as_conv`` emits ``reshape -> blocked conv -> reshape`` in place of the matmul; the
reshapes move no data that matters (K and N floats).
"""

from __future__ import annotations

import numpy as np


def constant_weight(call, lookup):
    """The [N, K] weight of ``R.matmul(x, W)`` when W is a constant [K, N] or
    ``permute_dims`` of a constant [N, K] (how ONNX's Gemm imports); else None.
    ``lookup(var)``: the value bound to a dataflow variable, or None."""
    import tvm
    from tvm import relax

    def resolve(expr):
        if isinstance(expr, relax.Var):
            bound = lookup(expr)
            return expr if bound is None else bound
        return expr

    weight = resolve(call.args[1])
    if isinstance(weight, tvm.ir.expr.GenericConst) and len(weight.value.shape) == 2:
        return weight.value.numpy().T
    if isinstance(weight, relax.Call) and getattr(weight.op, "name", "") == \
            "relax.permute_dims":
        source = resolve(weight.args[0])
        axes = weight.attrs.axes
        if isinstance(source, tvm.ir.expr.GenericConst) and len(source.value.shape) == 2 \
                and (axes is None or [int(a) for a in axes] == [1, 0]):
            return source.value.numpy()
    return None


def dense_applies(call) -> bool:
    """A float32 matmul of one row [1, K] by a [K, N] matrix, static shapes."""
    from tvm import relax

    x = call.args[0]
    if not isinstance(x.ty, relax.TensorType) or str(x.ty.dtype) != "float32" or \
            x.ty.shape is None or len(x.ty.shape) != 2:
        return False
    if str(call.attrs.out_dtype) not in ("", "float32", "void", "None"):
        return False
    try:
        return int(x.ty.shape[0]) == 1 and int(x.ty.shape[1]) > 0
    except TypeError:  # a symbolic dimension
        return False


def dense_as_conv(builder, call, lookup, plan_channels, pack, conv_te):
    """``reshape -> blocked 1x1 conv -> reshape`` for ``call`` (see module doc), emitted
    with ``builder``; None where it does not apply. ``plan_channels(N)``, ``pack(weight,
    block)`` and ``conv_te`` are layouts' planner, packer and blocked conv."""
    from tvm import relax
    from tvm.relax import op as R

    if not dense_applies(call):
        return None
    weight = constant_weight(call, lookup)
    if weight is None or weight.dtype != np.float32:
        return None
    out_channels, in_channels = weight.shape
    if int(call.args[0].ty.shape[1]) != in_channels:
        return None
    plan = plan_channels(out_channels)
    if plan is None:
        return None
    packed = relax.const(pack(weight.reshape(out_channels, in_channels, 1, 1), plan.block),
                         "float32")
    image = builder.emit(R.reshape(call.args[0], [1, in_channels, 1, 1]))
    conv = builder.emit(builder.call_te(
        lambda data, kernel: conv_te(data, kernel, out_channels, [1, 1], [0, 0, 0, 0], [1, 1],
                                     plan),
        image, packed, primfunc_name_hint="rebirth_dense"))
    return R.reshape(conv, [1, out_channels])
