"""Channel-blocked convolutions: the target's vector unit, the register tile of each conv, its
weights packed at compile time, and the TE convolution that reads them.

``pack_convs.PackConvWeights(target)`` rewrites every ``R.nn.conv2d(x, W)`` with NCHW data,
OIHW constant weights and float32 (``conv_rewrite_applies``) into a call of
``blocked_conv_te`` reading the packed constant ``W[O/ob, I, kh, kw, ob]`` (``ob`` output
channels = one or a few vector registers of the target). The TE function computes:

* ``rebirth_pad``: the input padded (also on the right, so the last width tile is whole);
* ``rebirth_conv``: ``conv[n, oc_chunk, oh, ow, ob]`` over a zero-padded channel count and a
  width rounded up to the tile, so the reduction has no predicate;
* ``rebirth_unpack``: the NCHW result (output shape and layout unchanged for the rest of the
  graph), or the NCHW[x]c one where ``channel_blocks.BlockChannels`` gave the conv that
  layout (input too may then be NCHW[x]c).

The tile plan (``ob``, width tile) is chosen by ``plan_conv``, per conv and target, and
recorded in the conv block's annotations, where ``conv_rules.ConvRule`` reads it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

CONV_BLOCK = "rebirth_conv"
PAD_BLOCK = "rebirth_pad"
UNPACK_BLOCK = "rebirth_unpack"
TILE_KEY = "rebirth.width_tile"        # conv block annotation: width tile (outputs per row)
VECTORS_KEY = "rebirth.channel_vectors"  # conv block annotation: vector registers per block
LANES_KEY = "rebirth.lanes"            # conv block annotation: fp32 lanes per register
ROWS_KEY = "rebirth.vector_rows"       # conv block annotation: 1x1 inputs read as vectors


@dataclass(frozen=True)
class VectorUnit:
    """fp32 lanes per vector register, how many registers the ISA has, whether a
    broadcast of an input scalar folds into the multiply-add (AVX-512 embedded broadcast),
    and whether the multiply-add takes one lane of a register as its scalar (AArch64's FMLA
    by element: a row of inputs loaded as whole vectors feeds the FMAs directly)."""

    lanes: int
    registers: int
    free_broadcast: bool = False
    fma_by_element: bool = False


def vector_unit(target) -> VectorUnit | None:
    """The target's SIMD unit, read from its triple and CPU features (conservative: a
    feature the target does not say it has is not used); None when the target is no CPU."""
    from tvm.target import codegen

    if target.kind.name != "llvm":
        return None
    triple = str(target.attrs.get("mtriple", "") or codegen.llvm_get_system_triple())
    if triple.startswith(("aarch64", "arm64")):
        return VectorUnit(4, 32, fma_by_element=True)  # Advanced SIMD: mandatory on AArch64
    if not triple.startswith(("x86_64", "i686", "i386")):
        return None
    if codegen.llvm_cpu_has_features(["avx512f"], target):
        return VectorUnit(16, 32, free_broadcast=True)
    if codegen.llvm_cpu_has_features(["avx2"], target) or \
            codegen.llvm_cpu_has_features(["avx"], target):
        return VectorUnit(8, 16)
    return VectorUnit(4, 16)


@dataclass(frozen=True)
class ConvPlan:
    """Register blocking of one conv: ``vectors`` registers of output channels (``block`` =
    vectors x lanes channels, the packing block) times ``tile`` output columns; ``rows``:
    each input channel's tile row is loaded as whole vectors (1x1, width stride 1, FMA by
    element), the input channel loop unrolled."""

    lanes: int
    vectors: int
    tile: int
    rows: bool = False

    @property
    def block(self) -> int:
        return self.lanes * self.vectors


def _ceil(a, b):
    return -(-a // b)


ROW_STEP_OVERHEAD = 3 / 8   # loop overhead per input channel, the ic loop unrolled by 8
ROW_REGISTER_SLACK = 2      # registers left free with vector rows (measured: fuller tiles spill)
GEMM_ACCUMULATORS = 16     # Winograd's GEMMs (measured: 2x8 and 4x4 tiles 0.33 instr/MAC,
                            # 3x8 0.42, 2x12 0.50 on the emulated A72)
TAP_REGISTER_SLACK = 6      # ... with a row of input scalars for kw <= 3 taps (measured:
                            # 29-31 live registers cost 0.36-0.40 instr/MAC, 25-26 0.33-0.35)
MAX_ROW_COLUMNS = 16        # longer rows (strided 7x7, 1x13 tiles of stride 2) measured worse
                            # as vectors (0.45-0.50 instr/MAC) than as scalars (0.40)
TAP_ROW_REGISTER_SLACK = 5  # ... with a row shared by kw taps (measured on the emulated A72:
                            # 3x7 tiles of a stride-2 3x3 conv, 28 live registers, spill)


def _vector_pieces(columns: int, lanes: int) -> int:
    """Loads of a row of ``columns`` floats as vectors: whole registers, then halves..."""
    return columns // lanes + bin(columns % lanes).count("1")


def plan_conv(unit: VectorUnit, out_channels: int, out_width: int, kw: int, stride: int,
              whole_blocks: bool = False, pointwise: bool = False,
              max_accumulators: int | None = None) -> ConvPlan | None:
    """The tile minimising estimated instructions per useful multiply-add. Per (ic, kh) step
    a tile issues tile x vectors x kw FMAs, vectors x kw weight loads (paired), and loads
    the input columns it reads, (tile - 1) x stride + kw of them, plus loop overhead;
    zero-padded channels and columns are work for nothing. Accumulators, weights and the
    live inputs must fit the register file, or LLVM spills. How inputs are read:

    * with FMA by element (AArch64), as ``rows``: the columns loaded as whole vectors, the
      FMAs taking their scalars as lanes; a 1x1 conv of width stride 1 (``pointwise``) reads
      one row per input channel with the ic loop unrolled, any other conv one row of at most
      MAX_ROW_COLUMNS per (ic, kh) shared by its kw taps;
    * else as scalars: paired loads, or folded into the FMA as an AVX-512 embedded broadcast.

    ``whole_blocks``: only blocks dividing ``out_channels`` (None if there is none).
    ``max_accumulators``: at most that many accumulator registers (tile x vectors)."""
    best, best_cost = None, None
    for vectors in (1, 2, 3, 4):
        if whole_blocks and out_channels % (unit.lanes * vectors):
            continue
        for tile in range(1, 17):
            columns = min(tile * kw, (tile - 1) * stride + kw)
            rows = unit.fma_by_element and (pointwise or columns <= MAX_ROW_COLUMNS)
            if rows and pointwise:  # the row's registers, and slack: the fullest tiles spill
                live_inputs = _ceil(tile, unit.lanes) + ROW_REGISTER_SLACK
            elif rows:
                live_inputs = _ceil(columns, unit.lanes) + TAP_ROW_REGISTER_SLACK
            elif unit.lanes != 4 or kw == 1:
                live_inputs = 2
            else:  # a row of scalars shared by the kw taps
                live_inputs = tile + 2 + (TAP_REGISTER_SLACK if kw <= 3 else 0)
            if tile * vectors + vectors + live_inputs > unit.registers or \
                    (max_accumulators and tile * vectors > max_accumulators):
                continue
            fmas = tile * vectors * kw
            weights = vectors * kw / 2
            if rows and pointwise:
                step = fmas + weights + _vector_pieces(tile, unit.lanes) + ROW_STEP_OVERHEAD
            elif rows:
                step = fmas + weights + _vector_pieces(columns, unit.lanes) + 3
            else:
                inputs = columns / 4 if unit.free_broadcast else columns / 2
                step = fmas + weights + inputs + 3
            block = unit.lanes * vectors
            useful = (out_channels / (_ceil(out_channels, block) * block)) * \
                (out_width / (_ceil(out_width, tile) * tile))
            cost = step / (tile * block * kw * useful)
            if best_cost is None or cost < best_cost - 1e-9:
                best, best_cost = ConvPlan(unit.lanes, vectors, tile, rows), cost
    return best


def pack_weight(weight: np.ndarray, block: int, groups: int = 1) -> np.ndarray:
    """OIHW -> [groups x O_g/block, I_g, kh, kw, block], zero-padding each group's O_g output
    channels up to a multiple of block (I_g: input channels per group, weight.shape[1])."""
    per_group = weight.shape[0] // groups
    chunks = _ceil(per_group, block)
    padded = np.zeros((groups, chunks * block, *weight.shape[1:]), dtype=weight.dtype)
    padded[:, :per_group] = weight.reshape(groups, per_group, *weight.shape[1:])
    packed = padded.reshape(groups * chunks, block, *weight.shape[1:]).transpose(0, 2, 3, 4, 1)
    return np.ascontiguousarray(packed)


def pack_weight_te(weight, block: int):
    """TE compute of ``pack_weight`` for one group, at run time: OIHW -> [O/block, I, kh,
    kw, block], the last chunk's missing output channels zero (for weights that are not
    constants: learned weights passed in as parameters)."""
    from tvm import te, tirx

    out_channels, in_channels, kh, kw = (int(d) for d in weight.shape)
    return te.compute(
        (_ceil(out_channels, block), in_channels, kh, kw, block),
        lambda c, i, h, w, b: tirx.if_then_else(
            c * block + b < out_channels, weight[c * block + b, i, h, w],
            tirx.const(0.0, weight.dtype)),
        name="pack_weight")


def blocked_layout(lanes: int) -> str:
    """The channel-blocked activation layout of ``lanes`` channels per block: NCHW[x]c."""
    return f"NCHW{lanes}c"


def blocked_conv_te(x, packed, out_channels, strides, padding, dilation, plan: ConvPlan,
                    groups: int = 1, out_lanes: int | None = None):
    """TE compute of the channel-blocked conv (see module doc); returns the NCHW output, or
    with ``out_lanes`` the NCHW[out_lanes]c output (``out_channels`` a multiple of it, the
    weights packed by blocks of ``out_lanes``: the schedule puts ``plan.vectors``
    consecutive chunks in one register tile). ``x``
    is NCHW, or NCHW[x]c when 5-D (then ``groups`` is 1). Grouped (each group's output
    channels a whole number of blocks): chunk ``oc`` belongs to group oc // (chunks per
    group) and reads that group's input channels."""
    from tvm import te, tirx

    blocked_in = len(x.shape) == 5
    n, _, height, width = (int(d) for d in x.shape[:4])
    in_lanes = int(x.shape[4]) if blocked_in else 1
    chunks, group_in, kh, kw, block = (int(d) for d in packed.shape)
    per_group = chunks // groups          # chunks per group
    sh, sw = strides
    dh, dw = dilation
    top, left, bottom, right = padding
    out_h = (height + top + bottom - (kh - 1) * dh - 1) // sh + 1
    out_w = (width + left + right - (kw - 1) * dw - 1) // sw + 1
    wide = _ceil(out_w, plan.tile) * plan.tile
    pad_h = height + top + bottom
    pad_w = max(width + left + right, (wide - 1) * sw + (kw - 1) * dw + 1)
    if (top, left) == (0, 0) and pad_h == height and pad_w == width:
        data = x
    else:
        def pad(b, c, h, w, *lane):
            inside = tirx.all(h >= top, h < top + height, w >= left, w < left + width)
            return tirx.if_then_else(inside, x[(b, c, h - top, w - left, *lane)],
                                     tirx.const(0.0, x.dtype))
        data = te.compute((n, x.shape[1], pad_h, pad_w, *x.shape[4:]), pad, name=PAD_BLOCK)

    def read(b, channel, h, w):
        if blocked_in:
            return data[b, channel // in_lanes, h, w, channel % in_lanes]
        return data[b, channel, h, w]

    ic = te.reduce_axis((0, group_in), name="ic")
    rh = te.reduce_axis((0, kh), name="kh")
    rw = te.reduce_axis((0, kw), name="kw")
    conv = te.compute(
        (n, chunks, out_h, wide, block),
        lambda b, oc, h, w, o: te.sum(
            read(b, ic if groups == 1 else oc // per_group * group_in + ic,
                 h * sh + rh * dh, w * sw + rw * dw) * packed[oc, ic, rh, rw, o],
            axis=[ic, rh, rw]),
        name=CONV_BLOCK,
        attrs={TILE_KEY: plan.tile, VECTORS_KEY: plan.vectors, LANES_KEY: plan.lanes,
               ROWS_KEY: int(plan.rows)})
    if out_lanes:  # packed by blocks of out_lanes: chunk c is output block c
        return te.compute((n, out_channels // out_lanes, out_h, out_w, out_lanes),
                          lambda b, c, h, w, lane: conv[b, c, h, w, lane], name=UNPACK_BLOCK)
    # one group, or groups of whole blocks: chunk c // block holds output channel c
    return te.compute((n, out_channels, out_h, out_w),
                      lambda b, c, h, w: conv[b, c // block, h, w, c % block],
                      name=UNPACK_BLOCK)


def _float32_conv(call, activations) -> bool:
    """A Relax conv2d with data and output in one of ``activations``, OIHW weights, float32
    data, output and weights, static shapes (the weights constant or not)."""
    from tvm import relax

    from ..passes.dataflow import shape_of

    if not isinstance(call, relax.Call) or getattr(call.op, "name", "") != "relax.nn.conv2d":
        return False
    attrs = call.attrs
    if attrs.data_layout not in activations or attrs.out_layout not in activations or \
            attrs.kernel_layout != "OIHW":
        return False
    if str(attrs.out_dtype) not in ("", "float32", "void", "None"):
        return False
    x, weight = call.args
    return shape_of(x) is not None and str(x.ty.dtype) == "float32" and \
        shape_of(weight) is not None and str(weight.ty.dtype) == "float32"


def static_constant_conv(call, lanes: int | None = None) -> bool:
    """A Relax conv2d with NCHW data and output, OIHW constant weights, float32 data, output
    and weights, static shapes: what our conv kernels (blocked, Winograd, depthwise) read.
    With ``lanes``, data and output may also be NCHW[lanes]c (``blocked_layout``)."""
    import tvm

    activations = {"NCHW", blocked_layout(lanes)} if lanes else {"NCHW"}
    return _float32_conv(call, activations) and \
        isinstance(call.args[1], tvm.ir.expr.GenericConst)


def parameter_weight_conv(call, lookup_binding) -> bool:
    """A conv of one group, NCHW float32 data and output and static shapes whose OIHW float32
    weights are a parameter of the function (learned weights: captures, training): our
    direct kernel reads them packed at run time (``pack_weight_te``)."""
    from tvm import relax

    if not _float32_conv(call, {"NCHW"}) or int(call.attrs.groups) != 1:
        return False
    weight = call.args[1]
    return isinstance(weight, relax.Var) and lookup_binding(weight) is None


def conv_rewrite_applies(call, lanes: int | None = None) -> bool:
    """Whether a Relax call is a conv this pass rewrites: a ``static_constant_conv``
    (channel-blocked with ``lanes``: then of one group), grouped only with more than one
    output channel per group (depthwise convs have their own kernel: ``depthwise.py``)."""
    if not static_constant_conv(call, lanes):
        return False
    weight = call.args[1].value
    groups = int(call.attrs.groups)
    if (call.attrs.data_layout, call.attrs.out_layout) != ("NCHW", "NCHW"):
        return groups == 1
    return groups == 1 or (weight.shape[0] // groups >= 2 and weight.shape[1] >= 2)


def rewrite_relax_functions(mod, rewriter):
    """Every Relax function of ``mod`` through ``rewriter`` (a PyExprMutator built on it)."""
    from tvm import relax

    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
    return rewriter.builder_.finalize()


def call_rewriting_pass(name: str, unit, rewrite_call, what: str, after=None):
    """The module pass ``name`` that replaces every Relax call for which
    ``rewrite_call(builder, call, lookup_binding)`` returns an expression (None keeps the
    call), in every Relax function, then applies ``after`` (a pass), if given; a no-op
    where the target's SIMD ``unit`` (``vector_unit``) is None. Logs how many ``what`` it
    rewrote."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.rewritten = 0

        def visit_call_(self, call):  # noqa: N802 -- ExprMutator's hook
            call = self.visit_expr_post_order(call)
            new = rewrite_call(self.builder_, call, self.lookup_binding)
            if new is None:
                return call
            self.rewritten += 1
            return new

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod, _ctx):
        if unit is None:
            return mod
        rewriter = _Rewriter(mod)
        mod = rewrite_relax_functions(mod, rewriter)
        if rewriter.rewritten:
            logger.debug(f"[{name}] {rewriter.rewritten} {what}")
        return after(mod) if after is not None else mod

    return _pass
