"""The Relax pass that puts every conv we have a kernel for on it: ``PackConvWeights(target)``
rewrites each ``R.nn.conv2d`` that ``layouts.conv_rewrite_applies`` accepts into a call of
our TE convolution reading weights packed at compile time (``layouts.blocked_conv_te``), or of
Winograd's kernel where it pays (``winograd.winograd_conv``), each depthwise conv into
``depthwise.depthwise_conv_te``, each dense layer with constant weights into a blocked
1x1 conv (``dense.dense_as_conv``), and the data and weight gradients of a conv (training
regions) into blocked convs (``conv_gradients``). It runs before
legalization, so bias / BatchNorm / ReLU / clip after the conv still fuse into the same
PrimFunc; the tile plan is chosen here, per conv and target (``layouts.plan_conv``).
"""

from __future__ import annotations

from .conv_gradients import (transposed_conv, transposed_conv_applies, weight_gradient,
                             weight_gradient_applies)
from .dense import dense_as_conv
from .depthwise import depthwise_applies, rewrite_depthwise
from .layouts import (GEMM_ACCUMULATORS, blocked_conv_te, call_rewriting_pass,
                      conv_rewrite_applies, pack_weight, pack_weight_te,
                      parameter_weight_conv, plan_conv, vector_unit)
from .winograd import winograd_conv


def PackConvWeights(target):  # noqa: N802 -- a pass, named like TVM's
    """The module pass (see module doc) for ``target``; a no-op where the target has no SIMD
    unit we know."""
    from tvm import relax

    unit = vector_unit(target)
    cores = int(target.attrs.get("num-cores", 2) or 2)

    def rewrite(builder, call, lookup_binding):
        if getattr(call.op, "name", "") == "relax.matmul":
            return dense_as_conv(
                builder, call, lookup_binding,
                lambda channels: plan_conv(unit, channels, 1, 1, 1, pointwise=True),
                pack_weight, blocked_conv_te)
        if transposed_conv_applies(call):  # the data and weight gradients of a conv
            return transposed_conv(builder, call, unit)
        if weight_gradient_applies(call):
            return weight_gradient(builder, call, unit)
        if depthwise_applies(call):
            return rewrite_depthwise(builder, call, unit.lanes)
        if parameter_weight_conv(call, lookup_binding):
            return _conv_packed_at_run_time(builder, call, unit)
        if not conv_rewrite_applies(call, unit.lanes):
            return None
        winograd = winograd_conv(
            builder, call,
            lambda channels, width: plan_conv(unit, channels, width, 1, 1,
                                              whole_blocks=True, pointwise=True,
                                              max_accumulators=GEMM_ACCUMULATORS),
            pack_weight, blocked_conv_te, cores)
        if winograd is not None:
            return winograd
        attrs = call.attrs
        weight = call.args[1]
        out_channels, _, kh, kw = (int(d) for d in weight.value.shape)
        groups = int(attrs.groups)
        out_w = int(call.ty.shape[3])
        stride_w = int(attrs.strides[1])
        # NCHW[x]c output: weights packed by one register, plan.vectors chunks per tile
        out_lanes = unit.lanes if attrs.out_layout != "NCHW" else None
        plan = plan_conv(unit, out_channels // groups, out_w, kw, stride_w,
                         whole_blocks=groups > 1 or out_lanes is not None,
                         pointwise=(kh, kw, stride_w) == (1, 1, 1))
        if plan is None:
            return None
        packed = relax.const(pack_weight(weight.value.numpy(), out_lanes or plan.block, groups),
                             "float32")
        return _blocked_conv(builder, call, packed, out_channels, plan, groups, out_lanes)

    # the transposes of dense weights the convs replaced would still be folded
    return call_rewriting_pass("PackConvWeights", unit, rewrite,
                               "convs and dense layers use packed weights",
                               after=relax.transform.DeadCodeElimination())


def _conv_packed_at_run_time(builder, call, unit):
    """Our direct kernel for a ``parameter_weight_conv``: its weights packed by a kernel of
    their own, then the same blocked conv as for constant weights (None: no tile fits)."""
    weight = call.args[1]
    out_channels, _, kh, kw = (int(d) for d in weight.ty.shape)
    stride_w = int(call.attrs.strides[1])
    plan = plan_conv(unit, out_channels, int(call.ty.shape[3]), kw, stride_w,
                     pointwise=(kh, kw, stride_w) == (1, 1, 1))
    if plan is None:
        return None
    packed = builder.emit_te(pack_weight_te, weight, plan.block,
                             primfunc_name_hint="rebirth_pack_weight")
    return _blocked_conv(builder, call, packed, out_channels, plan)


def _blocked_conv(builder, call, packed, out_channels, plan, groups=1, out_lanes=None):
    """The call of our blocked conv kernel computing the conv ``call`` from its data and
    ``packed`` weights (a constant, or packed at run time)."""
    attrs = call.attrs
    strides = [int(s) for s in attrs.strides]
    padding = [int(p) for p in attrs.padding]
    dilation = [int(d) for d in attrs.dilation]
    return builder.call_te(
        lambda data, kernel: blocked_conv_te(data, kernel, out_channels, strides, padding,
                                             dilation, plan, groups, out_lanes),
        call.args[0], packed, primfunc_name_hint="rebirth_conv2d")
