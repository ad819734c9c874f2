"""The two convolutions of a conv's gradient on our blocked conv kernel.

``relax.transform.Gradient`` differentiates ``y = conv2d(x, W)`` (NCHW, OIHW) into

* the data gradient ``dx = conv2d_transpose(dy, W)`` (kernel layout IOHW), and
* the weight gradient ``dW = conv2d(x, dy)`` with data/output layout CNHW and kernel layout
  IOHW: the batch is the reduction and ``dy`` the (image-sized) kernel.

TVM lowers both to loops its generic schedule runs at 1.5-9 GMAC/s on this project's training
regions (the forward convs run on our kernel at several times that): they took 80-90 % of a
block-reconstruction step. ``pack_convs.PackConvWeights`` rewrites them with these functions:

* ``transposed_conv``: a transposed conv is a conv of ``dy``, padded by ``dilation x (k - 1)
  - padding``, with the kernel flipped and its in/out channels swapped; that conv runs on
  ``layouts.blocked_conv_te``, the flipped kernel packed at run time
  (``pack_flipped_weight_te``) or at compile time when it is a constant::

      dx[n, c, h, w] = sum_{k, i, j} dy_pad[n, k, h + i*d, w + j*d] * W[k, c, kh-1-i, kw-1-j]

  Strided, ``dy`` would be zero-inserted between its rows and columns, 3 in 4 multiply-adds
  by zeros at stride 2: instead each output phase (rows and columns modulo the strides) is a
  stride-1 conv of ``dy`` by the taps that reach it (``axis_phase``), the phases interleaved
  (``interleave_te``). (Dilated and strided, which TVM 0.27 mis-sizes, still dilates.)

* ``weight_gradient``: the weight gradient is one matrix product over the batch and the
  output positions, ``dW[o, (c, i, j)] = sum_{(n, y, x)} dy[n, o, y, x] *
  x_pad[n, c, i*d + y*s, j*d + x*s]``: the input unfolded (``unfold_te``, rows (n, y, x),
  columns (c, i, j)) is the image of a 1x1 conv whose weight is ``dy`` (packed at run time
  by ``pack_gradient_te``); ``UnfoldRule`` schedules the unfolding without a division per
  element.

fmnist-inception's every-site distillation step (``benchmarks/training_step.py``; batch 32,
Intel Xeon AVX-512, 2 threads) took 29.7 ms with ``dy`` dilated and TVM's generic schedule
of the unfolding, 21.5 ms by phases, 16.2 ms with ``UnfoldRule``.

Both return None (the call stays as it is) for what they do not cover: other layouts,
groups, non-float32 or dynamic shapes, a transposed conv whose padding exceeds its kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .conv_rules import LlvmScheduleRule
from .layouts import ConvPlan, blocked_conv_te, pack_weight, plan_conv

UNFOLD_BLOCK = "rebirth_unfold"
UNFOLD_ROWS_KEY = "rebirth.unfold_rows"        # unfold block annotation: [N, Y, X]
UNFOLD_COLUMNS_KEY = "rebirth.unfold_columns"  # unfold block annotation: [C, A, B]

FLOAT32 = ("", "float32", "void", "None")  # out_dtypes that keep a float32 conv float32


def _static_float32(*exprs) -> bool:
    from ..passes.dataflow import shape_of

    return all(shape_of(e) is not None and str(e.ty.dtype) == "float32" for e in exprs)


def _ints(values) -> list:
    return [int(v) for v in values]


def transposed_conv_applies(call) -> bool:
    """``R.nn.conv2d_transpose`` as ``Gradient`` emits it for a conv of one group: NCHW data
    and output, IOHW kernel, float32, static shapes, padding within the dilated kernel."""
    if getattr(call.op, "name", "") != "relax.nn.conv2d_transpose":
        return False
    attrs = call.attrs
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "IOHW", "NCHW") \
            or int(attrs.groups) != 1 or str(attrs.out_dtype) not in FLOAT32:
        return False
    if not _static_float32(call.args[0], call.args[1], call):
        return False
    kh, kw = _ints(call.args[1].ty.shape)[2:]
    dh, dw = _ints(attrs.dilation)
    top, left, bottom, right = _ints(attrs.padding)
    return max(top, bottom) <= dh * (kh - 1) and max(left, right) <= dw * (kw - 1)


def weight_gradient_applies(call) -> bool:
    """``R.nn.conv2d`` as ``Gradient`` emits a conv's weight gradient: CNHW data and output,
    IOHW kernel, one group, float32, static shapes."""
    if getattr(call.op, "name", "") != "relax.nn.conv2d":
        return False
    attrs = call.attrs
    return (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) == \
        ("CNHW", "IOHW", "CNHW") and int(attrs.groups) == 1 and \
        str(attrs.out_dtype) in FLOAT32 and \
        _static_float32(call.args[0], call.args[1], call)


def pack_flipped_weight_te(weight, block: int, phase=None):
    """TE compute of the packed kernel of a transposed conv's equivalent conv, at run time:
    ``weight`` [K, C, kh, kw] (IOHW) -> [C/block, K, th, tw, block] holding W[k, c, r + s x
    (th-1-i), q + t x (tw-1-j)] (the last chunk's missing channels zero): the taps of one
    ``phase`` ((r, q) first taps, (s, t) strides, (th, tw) counts; default every tap,
    W[k, c, kh-1-i, kw-1-j])."""
    from tvm import te, tirx

    in_channels, out_channels, kh, kw = (int(d) for d in weight.shape)
    (r, q), (s, t), (th, tw) = phase or ((0, 0), (1, 1), (kh, kw))
    return te.compute(
        (-(-out_channels // block), in_channels, th, tw, block),
        lambda c, k, i, j, b: tirx.if_then_else(
            c * block + b < out_channels,
            weight[k, c * block + b, r + s * (th - 1 - i), q + t * (tw - 1 - j)],
            tirx.const(0.0, weight.dtype)),
        name="pack_flipped_weight")


@dataclass(frozen=True)
class AxisPhase:
    """One phase of a transposed conv of stride ``s`` (dilation 1) along one axis: its
    outputs ``p``, ``p + s``, ... (``outputs`` of them) read the taps ``first``, ``first + s``,
    ... (``taps`` of them) of the kernel, and are the stride-1 conv of ``dy`` by those taps
    flipped, padded by ``before`` and ``after`` (negative: cropped)."""

    first: int
    taps: int
    outputs: int
    before: int
    after: int


def axis_phase(phase: int, stride: int, kernel: int, padding: int, in_size: int,
               out_size: int) -> AxisPhase | None:
    """``AxisPhase`` ``phase`` of a transposed conv along one axis (``padding``: the forward
    conv's, before the axis), or None when no tap reaches those outputs (they are zero).
    Output ``phase + stride x a`` sums dy[y] W[i] over y x stride - padding + i = phase +
    stride x a: the taps i = first + stride x u with first = (phase + padding) mod stride,
    and y = a + (phase + padding) // stride - u."""
    first = (phase + padding) % stride
    taps = -(-(kernel - first) // stride) if kernel > first else 0
    outputs = -(-(out_size - phase) // stride) if out_size > phase else 0
    if not taps or not outputs:
        return None
    before = taps - 1 - (phase + padding) // stride
    return AxisPhase(first, taps, outputs, before, outputs - 1 + taps - in_size - before)


def interleave_te(phases: dict, out_shape, strides):
    """TE compute of a transposed conv's output [N, C, H, W] from its phases' outputs:
    ``phases`` {(row phase, column phase): [N, C, rows, columns] tensor}; the outputs of a
    missing phase are zero."""
    from tvm import te, tirx

    sh, sw = strides

    def value(n, c, h, w):
        result = tirx.const(0.0, "float32")
        for (ph, pw), part in phases.items():
            result = tirx.if_then_else(tirx.all(h % sh == ph, w % sw == pw),
                                       part[n, c, h // sh, w // sw], result)
        return result

    return te.compute(tuple(out_shape), value, name="rebirth_interleave")


def transposed_conv(builder, call, unit):
    """The conv(s) computing ``R.nn.conv2d_transpose`` ``call`` on our blocked kernel (see
    the module doc), or None when no tile fits."""
    from tvm import topi

    attrs = call.attrs
    data = call.args[0]
    _, _, kh, kw = _ints(call.args[1].ty.shape)
    sh, sw = _ints(attrs.strides)
    dh, dw = _ints(attrs.dilation)
    if (sh, sw) != (1, 1) and (dh, dw) == (1, 1):
        return _phased_transposed_conv(builder, call, unit)
    top, left, bottom, right = _ints(attrs.padding)
    extra_h, extra_w = _ints(attrs.output_padding)
    padding = [dh * (kh - 1) - top, dw * (kw - 1) - left,
               dh * (kh - 1) - bottom + extra_h, dw * (kw - 1) - right + extra_w]
    if (sh, sw) != (1, 1):  # dilated and strided: zeros between the rows and columns of dy
        if _flipped_plan(call, unit, int(call.ty.shape[3]), (kh, kw), padding,
                         (dh, dw)) is None:
            return None
        data = builder.emit_te(topi.nn.dilate, data, [1, 1, sh, sw],
                               primfunc_name_hint="rebirth_dilate")
    return _flipped_conv(builder, call, unit, data, int(call.ty.shape[3]), padding, (dh, dw))


def _flipped_plan(call, unit, out_w, taps, padding, dilation=(1, 1)) -> ConvPlan | None:
    """The tile plan of a conv by (some ``taps`` of) the transposed conv ``call``'s kernel."""
    th, tw = taps
    _, out_channels, _, _ = _ints(call.args[1].ty.shape)  # IOHW: out_channels are dx's
    return plan_conv(unit, out_channels, out_w, tw, 1,
                     pointwise=(th, tw, *dilation) == (1, 1, 1, 1) and not any(padding))


def _flipped_conv(builder, call, unit, data, out_w, padding, dilation=(1, 1), phase=None):
    """The call of our blocked conv computing (a ``phase`` of, see pack_flipped_weight_te)
    the transposed conv ``call`` as a stride-1 conv of ``data`` (``out_w`` columns out) by
    its flipped kernel; None when no tile fits."""
    import tvm
    from tvm import relax

    weight = call.args[1]
    _, out_channels, kh, kw = _ints(weight.ty.shape)  # IOHW: out_channels are dx's
    (first_h, first_w), (sh, sw), (th, tw) = phase or ((0, 0), (1, 1), (kh, kw))
    plan = _flipped_plan(call, unit, out_w, (th, tw), padding, dilation)
    if plan is None:
        return None
    if isinstance(weight, tvm.ir.expr.GenericConst):
        taps = weight.value.numpy()[:, :, first_h::sh, first_w::sw][:, :, :th, :tw]
        flipped = taps[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
        packed = relax.const(pack_weight(np.ascontiguousarray(flipped), plan.block),
                             "float32")
    else:
        packed = builder.emit_te(pack_flipped_weight_te, weight, plan.block, phase,
                                 primfunc_name_hint="rebirth_pack_flipped_weight")
    return builder.call_te(
        lambda x, kernel: blocked_conv_te(x, kernel, out_channels, [1, 1], padding,
                                          list(dilation), plan),
        data, packed, primfunc_name_hint="rebirth_conv2d_transpose")


def _phased_transposed_conv(builder, call, unit):
    """A strided transposed conv as one stride-1 conv per phase (output rows and columns
    modulo the strides, see ``axis_phase``), interleaved: no multiply-add by the zeros
    that dilating dy would insert (3 in 4 of them at stride 2)."""
    data, weight = call.args
    _, _, in_h, in_w = _ints(data.ty.shape)
    _, _, kh, kw = _ints(weight.ty.shape)
    out_shape = _ints(call.ty.shape)
    sh, sw = _ints(call.attrs.strides)
    top, left, _, _ = _ints(call.attrs.padding)
    rows = [axis_phase(p, sh, kh, top, in_h, out_shape[2]) for p in range(sh)]
    columns = [axis_phase(p, sw, kw, left, in_w, out_shape[3]) for p in range(sw)]
    phases = {(ph, pw): (row, column) for ph, row in enumerate(rows)
              for pw, column in enumerate(columns) if row is not None and column is not None}
    paddings = {key: [row.before, column.before, row.after, column.after]
                for key, (row, column) in phases.items()}
    if any(_flipped_plan(call, unit, column.outputs, (row.taps, column.taps),
                         paddings[key]) is None for key, (row, column) in phases.items()):
        return None
    parts = {key: builder.emit(_flipped_conv(
                 builder, call, unit, data, column.outputs, paddings[key],
                 phase=((row.first, column.first), (sh, sw), (row.taps, column.taps))))
             for key, (row, column) in phases.items()}
    keys = list(parts)
    return builder.call_te(
        lambda *tensors: interleave_te(dict(zip(keys, tensors)), out_shape, (sh, sw)),
        *[parts[k] for k in keys], primfunc_name_hint="rebirth_interleave")


def unfold_te(x, out_shape, strides, padding, dilation):
    """TE compute of a weight gradient's unfolded input: ``x`` [N, C, H, W] -> [1, N*Y*X, 1,
    C*A*B] with row (n, y, x), column (c, a, b) = x[n, c, a*s + y*d - top, b*s + x*d - left]
    (zero in the padding), for the [A, B] gradient of a kernel swept over [Y, X] positions."""
    from tvm import te, tirx

    n, c, height, width = (int(d) for d in x.shape)
    (y_count, x_count), (a_count, b_count) = out_shape
    sa, sb = strides
    da, db = dilation
    top, left = padding
    positions, taps = y_count * x_count, a_count * b_count

    def value(_, row, __, column):
        image, pos = row // positions, row % positions
        channel, tap = column // taps, column % taps
        h = tap // b_count * sa + pos // x_count * da - top
        w = tap % b_count * sb + pos % x_count * db - left
        inside = tirx.all(h >= 0, h < height, w >= 0, w < width)
        return tirx.if_then_else(inside, x[image, channel, h, w], tirx.const(0.0, x.dtype))

    return te.compute((1, n * positions, 1, c * taps), value, name=UNFOLD_BLOCK,
                      attrs={UNFOLD_ROWS_KEY: [n, y_count, x_count],
                             UNFOLD_COLUMNS_KEY: [c, a_count, b_count]})


class UnfoldRule(LlvmScheduleRule):
    """dlight rule for the function ``unfold_te`` makes, alone: rows and columns split back
    into (n, y, x) and (c, a, b), so that their indices need no division (TVM's generic
    injective schedule fuses every loop and divides per element, in vector lanes: 5-8x
    slower), images and rows in parallel; None for any other function."""

    def schedule(self, sch):
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        if len(blocks) != 1 or sch.get(blocks[0]).name_hint != UNFOLD_BLOCK:
            return None
        annotations = sch.get(blocks[0]).annotations
        rows, columns = annotations.get(UNFOLD_ROWS_KEY), annotations.get(UNFOLD_COLUMNS_KEY)
        loops = sch.get_loops(blocks[0])
        if rows is None or columns is None or len(loops) != 4:
            return None
        one, row, _, column = loops
        n, y, _ = sch.split(row, factors=[int(d) for d in rows])
        sch.split(column, factors=[int(d) for d in columns])
        sch.parallel(sch.fuse(one, n, y))
        return sch


def pack_gradient_te(grad, block: int):
    """TE compute of ``grad`` [N, O, Y, X] as the packed weight of a 1x1 conv over its
    N*Y*X positions: [O/block, N*Y*X, 1, 1, block] (missing channels zero)."""
    from tvm import te, tirx

    n, channels, y_count, x_count = (int(d) for d in grad.shape)
    positions = y_count * x_count
    return te.compute(
        (-(-channels // block), n * positions, 1, 1, block),
        lambda o, row, _, __, b: tirx.if_then_else(
            o * block + b < channels,
            grad[row // positions, o * block + b, row % positions // x_count,
                 row % x_count], tirx.const(0.0, grad.dtype)),
        name="rebirth_pack_gradient")


def weight_gradient(builder, call, unit):
    """The weight-gradient conv ``call`` as a 1x1 conv of the unfolded input on our blocked
    kernel (see the module doc), or None when no tile fits."""
    from tvm import relax

    attrs = call.attrs
    x, grad = call.args
    _, channels, _, _ = _ints(x.ty.shape)
    _, out_channels, y_count, x_count = _ints(grad.ty.shape)
    out = _ints(call.ty.shape)  # [O, C, A, B] (CNHW: channel O, batch C)
    taps = out[2] * out[3]
    columns = channels * taps
    plan: ConvPlan | None = plan_conv(unit, out_channels, columns, 1, 1, pointwise=True)
    if plan is None:
        return None
    top, left, _, _ = _ints(attrs.padding)
    unfolded = builder.emit_te(unfold_te, x, ((y_count, x_count), (out[2], out[3])),
                               _ints(attrs.strides), [top, left], _ints(attrs.dilation),
                               primfunc_name_hint=UNFOLD_BLOCK)
    packed = builder.emit_te(pack_gradient_te, grad, plan.block,
                             primfunc_name_hint="rebirth_pack_gradient")
    product = builder.emit(builder.call_te(
        lambda data, kernel: blocked_conv_te(data, kernel, out_channels, [1, 1], [0, 0, 0, 0],
                                             [1, 1], plan),
        unfolded, packed, primfunc_name_hint="rebirth_weight_gradient"))
    return relax.op.reshape(product, out)
