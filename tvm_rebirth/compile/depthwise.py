"""Depthwise convolutions (one filter per channel, MobileNet/ShuffleNet's 3x3s) as a TE function
with a schedule rule, in NCHW.

A depthwise conv has no reduction over channels, so there is nothing to block channels for:
each output row is a sum of kh x kw shifted input rows, each scaled by one weight. TVM's
generic lowering reads every tap through the padding's predicate, one element at a time
(about 3 GFLOP/s on AVX-512). ``pack_convs.PackConvWeights`` rewrites each depthwise
``R.nn.conv2d`` (channel multiplier 1, constant weights) into ``depthwise_conv_te``:

* ``rebirth_dw_pad``: the input zero-padded once (when the conv pads or strides along the
  width), its columns split by phase: ``pad[n, c, h, p, j]`` is padded column ``j*s + p``,
  so that a strided conv reads each tap's columns as one contiguous vector;
* ``rebirth_depthwise``: ``out[n, c, oh, ow] = sum_{kh, kw} pad[n, c, oh*s + kh, ow*s + kw] *
  w[c, kh, kw]``, annotated with its width tile (``plan_width_tile``).

``DepthwiseRule`` schedules it with the epilogue after it (bias, ReLU, clip...)::

    parallel for (n, c):
      pad[c] = ...                               # this channel's padded image
      for oh, ow_chunk:
        acc[tile] = 0                            # registers
        for kh, kw:                              # unrolled
          acc[:] += pad[c, oh*s + kh, ow*s + kw + (0..tile)] * w[c, kh, kw]  # vectorised
        out[n, c, oh, ow_chunk] = epilogue(acc)  # vectorised

The tile divides the output width (no tail, no predicate) and holds at most a few vector
registers. The rule checks up front that the function has this shape and returns None
otherwise.
"""

from __future__ import annotations

from ..passes.dataflow import shape_of
from .conv_rules import LlvmScheduleRule, epilogue_chain, static_extents
from .layouts import static_constant_conv

DEPTHWISE_PAD = "rebirth_dw_pad"
DEPTHWISE = "rebirth_depthwise"
TILE_KEY = "rebirth.dw_width_tile"  # depthwise block annotation: output columns per tile
COLUMNS_KEY = "rebirth.dw_columns"  # pad block annotation (unit stride): [left, width] copied
MAX_TILE_REGISTERS = 4  # accumulator registers per tile (the taps need a few more)


def plan_width_tile(out_width: int, lanes: int) -> int:
    """Output columns per tile: the whole row when it fits MAX_TILE_REGISTERS registers,
    else its largest divisor that does (LLVM splits a tile of any width into registers)."""
    most = MAX_TILE_REGISTERS * lanes
    if out_width <= most:
        return out_width
    return max(d for d in range(1, most + 1) if out_width % d == 0)


def depthwise_applies(call) -> bool:
    """A conv this module rewrites: a ``layouts.static_constant_conv`` with weights
    [C, 1, kh, kw] and groups == C input channels == C output channels."""
    if not static_constant_conv(call):
        return False
    channels = shape_of(call.args[0])[1]
    groups = int(call.attrs.groups)
    return groups > 1 and groups == channels and \
        tuple(call.args[1].value.shape[:2]) == (channels, 1)


def depthwise_conv_te(x, weight, strides, padding, dilation, tile: int):
    """TE compute of the depthwise conv (see module doc); returns the NCHW output."""
    from tvm import te, tirx

    n, channels, height, width = (int(d) for d in x.shape)
    kh, kw = (int(d) for d in weight.shape[2:])
    sh, sw = strides
    dh, dw = dilation
    top, left, bottom, right = padding
    out_h = (height + top + bottom - (kh - 1) * dh - 1) // sh + 1
    out_w = (width + left + right - (kw - 1) * dw - 1) // sw + 1
    pad_h, pad_w = (out_h - 1) * sh + (kh - 1) * dh + 1, (out_w - 1) * sw + (kw - 1) * dw + 1
    phase_w = -(-pad_w // sw)  # columns per phase (rounded up)
    rh = te.reduce_axis((0, kh), name="kh")
    rw = te.reduce_axis((0, kw), name="kw")
    if (top, left) == (0, 0) and pad_h <= height and pad_w <= width and sw == 1:
        def tap(b, c, h, w):
            return x[b, c, h * sh + rh * dh, w + rw * dw]
    else:
        def pad(b, c, h, phase, j):  # padded column j * sw + phase
            col = j * sw + phase
            inside = tirx.all(h >= top, h < top + height, col >= left, col < left + width)
            return tirx.if_then_else(tirx.likely(inside), x[b, c, h - top, col - left],
                                     tirx.const(0.0, x.dtype))
        copied = {COLUMNS_KEY: [left, min(width, pad_w - left)]} if sw == 1 else {}
        data = te.compute((n, channels, pad_h, sw, phase_w), pad, name=DEPTHWISE_PAD,
                          attrs=copied)

        def tap(b, c, h, w):  # column w * sw + rw * dw of the padded image
            return data[b, c, h * sh + rh * dh, (rw * dw) % sw, w + (rw * dw) // sw]
    return te.compute(
        (n, channels, out_h, out_w),
        lambda b, c, h, w: te.sum(tap(b, c, h, w) * weight[c, 0, rh, rw], axis=[rh, rw]),
        name=DEPTHWISE, attrs={TILE_KEY: tile})


def rewrite_depthwise(builder, call, lanes: int):
    """The call of ``depthwise_conv_te`` replacing a conv ``depthwise_applies`` accepts."""
    attrs = call.attrs
    x, weight = call.args
    strides = [int(s) for s in attrs.strides]
    padding = [int(p) for p in attrs.padding]
    dilation = [int(d) for d in attrs.dilation]
    tile = plan_width_tile(int(call.ty.shape[3]), lanes)
    return builder.call_te(
        lambda data, kernel: depthwise_conv_te(data, kernel, strides, padding, dilation, tile),
        x, weight, primfunc_name_hint="rebirth_depthwise_conv2d")


def _is_epilogue(sch, conv_rv, chain) -> bool:
    """No blocks after the conv (it is the output), or an ``epilogue_chain`` over the conv's
    output shape."""
    from tvm.s_tir.schedule.analysis import is_output_block

    if not chain:
        return is_output_block(sch, conv_rv)
    shape = [int(iv.dom.extent) for iv in sch.get(conv_rv).iter_vars[:4]]
    return epilogue_chain(sch, conv_rv, chain) and \
        all([int(iv.dom.extent) for iv in sch.get(b).iter_vars] == shape for b in chain)


def _copy_interior_as_vectors(sch, pad):
    """A unit-stride pad's columns in three loops (left border, the input's columns, right
    border), the middle one vectorised: there the column test is always true, so each row
    is a vector copy (or zeros, for a border row)."""
    columns = sch.get(pad).annotations.get(COLUMNS_KEY)
    loop = sch.get_loops(pad)[-1]
    if columns is None:
        return
    left, width = (int(v) for v in columns)
    right = int(sch.get(loop).extent) - left - width
    sizes = [f for f in (left, width, right) if f > 0]
    # loop_partition takes the sizes of all parts but the last
    parts = sch.loop_partition(loop, sizes[:-1]) if len(sizes) > 1 else [loop]
    sch.vectorize(parts[1 if left else 0])


class DepthwiseRule(LlvmScheduleRule):
    """dlight rule for the functions ``depthwise_conv_te`` makes, with their epilogue (see
    module doc); None for any other function."""

    def schedule(self, sch):
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        names = [sch.get(b).name_hint for b in blocks]
        at = 1 if names[:1] == [DEPTHWISE_PAD] else 0
        if len(names) < at + 1 or names[at] != DEPTHWISE:
            return None
        conv = blocks[at]
        tile = sch.get(conv).annotations.get(TILE_KEY)
        extents = static_extents(sch, conv)
        chain = blocks[at + 1:]
        if tile is None or extents is None or len(extents) != 6 or extents[3] % int(tile) or \
                not _is_epilogue(sch, conv, chain):
            return None
        for block_rv in chain[:-1]:
            sch.compute_inline(block_rv)
        b, c, h, w, kh, kw = sch.get_loops(conv)
        channel = sch.fuse(b, c)
        sch.parallel(channel)
        wo, wi = sch.split(w, factors=[None, int(tile)])
        sch.reorder(wo, kh, kw, wi)
        if chain:  # accumulate in registers, the epilogue writes each tile
            sch.reverse_compute_at(chain[-1], wo)
            sch.set_scope(conv, 0, "local")
            sch.vectorize(sch.get_loops(chain[-1])[-1])
        sch.vectorize(wi)
        init = sch.decompose_reduction(conv, kh)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.unroll(kh)
        sch.unroll(kw)
        if at:
            pad = blocks[0]
            sch.compute_at(pad, channel)
            _copy_interior_as_vectors(sch, pad)
        return sch


__all__ = ["DepthwiseRule", "depthwise_applies", "depthwise_conv_te", "plan_width_tile",
           "rewrite_depthwise"]
