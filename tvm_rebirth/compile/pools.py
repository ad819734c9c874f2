"""Separable max pooling and LRN's channel-window sum, as TE functions with a schedule rule.

TVM lowers ``R.nn.max_pool2d`` to one block that reads every tap through the padding's
predicate, and its CPU schedules vectorise that predicate lane by lane: about six guest
instructions per tap on AArch64. ``SeparablePools(target)`` (a Relax pass, before
legalization like ``pack_convs.PackConvWeights``) rewrites

* ``R.nn.max_pool2d`` (NCHW, float32, static shapes, no dilation) into three stages: the input
  padded with -inf once (``rebirth_pool_pad``, only when the pool pads), the max over the
  window's rows (``rebirth_pool_rows``: whole input rows, contiguous), then over its columns
  (``rebirth_pool_cols``): kh + kw taps per output instead of kh x kw, none predicated;
* ``R.nn.avg_pool3d`` with a window along the channel axis only (``[k, 1, 1]``, how ONNX's
  LRN is imported) into a sum over neighbouring channels (``rebirth_channel_window``),
  whose out-of-range test depends on the channel only, so every image row is one vector.

``PoolRule`` schedules these functions: parallel over channels, the padded image and the
row maxima computed per channel and per output row, the reduction loops outside a
vectorised width loop (the accumulators stay in registers).
"""

from __future__ import annotations

from ..passes.dataflow import shape_of
from .conv_rules import LlvmScheduleRule
from .layouts import call_rewriting_pass, vector_unit

POOL_PAD = "rebirth_pool_pad"
POOL_ROWS = "rebirth_pool_rows"
POOL_COLS = "rebirth_pool_cols"
CHANNEL_WINDOW = "rebirth_channel_window"
CHANNEL_SCALE = "rebirth_channel_scale"
STRIDE_KEY = "rebirth.column_stride"  # column block annotation: the pool's width stride
MAX_VECTOR = 16  # lanes of one vectorised loop (LLVM splits it into the target's registers)


def separable_max_pool_te(x, pool, strides, padding, out_hw):
    """TE compute of the separable max pool (see module doc); returns the NCHW output."""
    from tvm import te, tirx

    n, channels, height, width = (int(d) for d in x.shape)
    kh, kw = pool
    sh, sw = strides
    top, left = padding[0], padding[1]
    out_h, out_w = out_hw
    # rows and columns the windows touch (ceil mode may reach past the bottom/right padding)
    pad_h, pad_w = (out_h - 1) * sh + kh, (out_w - 1) * sw + kw
    lowest = tirx.min_value("float32")
    if (top, left) == (0, 0) and pad_h <= height and pad_w <= width:
        data = x
    else:
        def pad(b, c, h, w):
            inside = tirx.all(h >= top, h < top + height, w >= left, w < left + width)
            return tirx.if_then_else(inside, x[b, c, h - top, w - left], lowest)
        data = te.compute((n, channels, pad_h, pad_w), pad, name=POOL_PAD)
    rh = te.reduce_axis((0, kh), name="rh")
    rows = te.compute((n, channels, out_h, pad_w),
                      lambda b, c, h, w: te.max(data[b, c, h * sh + rh, w], axis=rh),
                      name=POOL_ROWS)
    rw = te.reduce_axis((0, kw), name="rw")
    return te.compute((n, channels, out_h, out_w),
                      lambda b, c, h, w: te.max(rows[b, c, h, w * sw + rw], axis=rw),
                      name=POOL_COLS, attrs={STRIDE_KEY: sw})


def channel_window_te(x, window: int, before: int, divisor: int):
    """TE compute of an average over ``window`` neighbouring channels of [N, 1, C, H, W]
    (``before`` of them ahead of the channel, zeros outside, divided by ``divisor``)."""
    from tvm import te, tirx

    n, one, channels, height, width = (int(d) for d in x.shape)
    k = te.reduce_axis((0, window), name="k")

    def total(b, o, c, h, w):
        src = c + k - before
        inside = tirx.all(src >= 0, src < channels)
        return te.sum(tirx.if_then_else(inside, x[b, o, src, h, w], tirx.const(0.0, "float32")),
                      axis=k)
    summed = te.compute((n, one, channels, height, width), total, name=CHANNEL_WINDOW)
    scale = tirx.const(1.0 / divisor, "float32")
    return te.compute(summed.shape, lambda *i: summed(*i) * scale, name=CHANNEL_SCALE)


def _float32_static(call) -> bool:
    x = call.args[0]
    return str(x.ty.dtype) == "float32" and shape_of(x) is not None and \
        shape_of(call) is not None


def max_pool_rewrite_applies(call) -> bool:
    """A max_pool2d this pass rewrites: NCHW in and out, float32, static, no dilation."""
    attrs = call.attrs
    return (attrs.layout, attrs.out_layout) == ("NCHW", "NCHW") and _float32_static(call) \
        and all(int(d) == 1 for d in attrs.dilation)


def channel_window_applies(call) -> bool:
    """An avg_pool3d over channels only (LRN's): NCDHW with one 'C', window [k, 1, 1],
    unit strides, padding only along the channel axis, the output as large as the input."""
    attrs = call.attrs
    if (attrs.layout, attrs.out_layout) != ("NCDHW", "NCDHW") or not _float32_static(call):
        return False
    shape = shape_of(call.args[0])
    pool = [int(p) for p in attrs.pool_size]
    pad = [int(p) for p in attrs.padding]
    return shape[1] == 1 and pool[1:] == [1, 1] and \
        all(int(s) == 1 for s in attrs.strides) and all(int(d) == 1 for d in attrs.dilation) \
        and pad[1:3] == [0, 0] and pad[4:] == [0, 0] and pad[0] + pad[3] == pool[0] - 1 \
        and shape_of(call) == shape


def SeparablePools(target):  # noqa: N802 -- a pass, named like TVM's
    """The module pass (see module doc); a no-op where the target has no SIMD unit we know."""

    def rewrite(builder, call, _lookup_binding):
        name = getattr(call.op, "name", "")
        if name == "relax.nn.max_pool2d" and max_pool_rewrite_applies(call):
            attrs = call.attrs
            pool = [int(p) for p in attrs.pool_size]
            strides = [int(s) for s in attrs.strides]
            padding = [int(p) for p in attrs.padding]
            out_hw = shape_of(call)[2:]
            return builder.call_te(
                lambda x: separable_max_pool_te(x, pool, strides, padding, out_hw),
                call.args[0], primfunc_name_hint="rebirth_max_pool2d")
        if name == "relax.nn.avg_pool3d" and channel_window_applies(call):
            attrs = call.attrs
            window = int(attrs.pool_size[0])
            # count_include_pad=False divides by the channels inside the window, which
            # differs at the edges: only the padded count is a constant divisor
            if not bool(attrs.count_include_pad) and int(attrs.padding[0]) + \
                    int(attrs.padding[3]):
                return None
            return builder.call_te(
                lambda x: channel_window_te(x, window, int(attrs.padding[0]), window),
                call.args[0], primfunc_name_hint="rebirth_channel_window")
        return None

    return call_rewriting_pass("SeparablePools", vector_unit(target), rewrite,
                               "pools rewritten")


def _vector_chunk(extent: int) -> int:
    """Lanes of the vectorised width loop: the whole extent when short, else its largest
    divisor up to MAX_VECTOR (no tail, so no predicate)."""
    if extent <= MAX_VECTOR:
        return extent
    return max(d for d in range(1, MAX_VECTOR + 1) if extent % d == 0)


def _block(sch, name):
    blocks = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
              if sch.get(b).name_hint == name]
    return blocks[0] if len(blocks) == 1 else None


def _names(sch) -> list:
    return [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]


def _reduce_vectorized(sch, block, width_loop, reduce_loop):
    """Reduction outside, width inside in vector chunks: (..., w_outer, r, w_inner)."""
    outer, inner = sch.split(width_loop, [None, _vector_chunk(_extent(sch, width_loop))])
    sch.reorder(outer, reduce_loop, inner)
    sch.unroll(reduce_loop)
    sch.vectorize(inner)  # before decomposing: the init's copy of the loop keeps its kind
    sch.decompose_reduction(block, reduce_loop)


def _extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


class PoolRule(LlvmScheduleRule):
    """dlight rule for the functions ``SeparablePools`` makes (see module doc); None for
    any other function."""

    def is_target_available(self, target) -> bool:
        return vector_unit(target) is not None

    def schedule(self, sch):
        names = _names(sch)
        if names in ([POOL_ROWS, POOL_COLS], [POOL_PAD, POOL_ROWS, POOL_COLS]):
            return self._max_pool(sch, POOL_PAD in names)
        if names == [CHANNEL_WINDOW, CHANNEL_SCALE]:
            return self._channel_window(sch)
        return None

    @staticmethod
    def _max_pool(sch, padded: bool):
        cols, rows = _block(sch, POOL_COLS), _block(sch, POOL_ROWS)
        b, c, h, w, rw = sch.get_loops(cols)
        channel = sch.fuse(b, c)
        sch.parallel(channel)
        sch.compute_at(rows, h)
        if padded:
            sch.compute_at(_block(sch, POOL_PAD), channel)
        rows_loops = sch.get_loops(rows)
        # the row maxima first: a decomposed reduction is no longer one that compute_at or
        # decompose_reduction can reason about below it
        _reduce_vectorized(sch, rows, rows_loops[-2], rows_loops[-1])
        if int(sch.get(cols).annotations.get(STRIDE_KEY, 0)) == 1:
            _reduce_vectorized(sch, cols, w, rw)
        else:  # strided reads of the row maxima: scalar, the window unrolled
            sch.unroll(rw)
        return sch

    @staticmethod
    def _channel_window(sch):
        summed, scale = _block(sch, CHANNEL_WINDOW), _block(sch, CHANNEL_SCALE)
        b, o, c, h, w, k = sch.get_loops(summed)
        channel = sch.fuse(b, o, c)
        sch.parallel(channel)
        sch.reverse_compute_at(scale, h)
        width = sch.get_loops(scale)[-1]
        sch.vectorize(sch.split(width, [None, _vector_chunk(_extent(sch, width))])[1])
        _reduce_vectorized(sch, summed, w, k)
        return sch
