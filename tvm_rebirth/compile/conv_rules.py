"""A register-blocked micro-kernel schedule for the channel-blocked convs of ``layouts``.

``ConvRule`` is a dlight rule for the PrimFuncs ``pack_convs.PackConvWeights`` makes (fused with
their epilogue: bias, BatchNorm scale/shift, ReLU, clip, a residual add). The conv block
``conv[n, oc_chunk, oh, ow, ob]`` is scheduled as

    parallel for (n, oc_chunk, oh):             # fused
      for ow_chunk:
        acc[tile, ob] = 0                       # registers
        for ic, kh:
          for kw:                               # unrolled when short
            for ow in tile:                     # unrolled
              acc[ow, :] += x[ic, ., .] * w[oc_chunk, ic, kh, kw, :]   # ob vectorised
        out[n, oc, oh, ow] = epilogue(acc)      # per tile, NCHW (or NCHW[x]c: whole
                                                # vectors; oc_chunk = vectors blocks)

with the tile (``ob`` = vector registers x lanes, width tile) chosen by the pass and read
from the conv block's annotations. A 1x1 conv of width stride 1 whose plan says ``rows``
(AArch64: FMLA by element) instead loads each input channel's tile row once as whole
vectors (a cached row, vectorised) and unrolls the ic loop, its only reduction loop:

        for ic_outer:
          for ic in UNROLL_IC_1X1:                # unrolled
            row[tile] = x[ic, oh, ow:ow + tile]   # vector loads
            for ow in tile, ob:                   # unrolled, ob vectorised
              acc[ow, :] += row[ow] * w[oc_chunk, ic, 0, 0, :]   # FMLA by element
 The rule checks up front that the function has exactly
this shape (an optional padding block, the conv, then a chain of injective blocks each
reading the one before) and returns None otherwise, leaving the function to the next rule.
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.s_tir.schedule.analysis import is_output_block

from .layouts import CONV_BLOCK, LANES_KEY, PAD_BLOCK, ROWS_KEY, TILE_KEY, VECTORS_KEY

logger = logging.getLogger(__name__)

UNROLL_KW_MAX = 11     # kw taps unrolled inside the ic, kh loop (all GoogLeNet/AlexNet kernels)
UNROLL_IC_1X1 = (8, 4, 2)  # input channels per step of a 1x1 conv with vector rows (first divisor)


def _int(value):
    return int(value) if isinstance(value, (int, tirx.IntImm)) else None


def _annotation(block, key):
    value = block.annotations.get(key)
    return _int(value) if value is not None else None


def _iter_kinds(block) -> str:
    kinds = {tirx.IterVar.DataPar: "S", tirx.IterVar.CommReduce: "R"}
    return "".join(kinds.get(int(iv.iter_type), "O") for iv in block.iter_vars)


def _is_spatial(block) -> bool:
    return all(int(iv.iter_type) == tirx.IterVar.DataPar for iv in block.iter_vars)


def static_extents(sch, block_rv) -> list | None:
    """The extents of the block's loops, or None when one is not a constant."""
    extents = [_int(sch.get(loop).extent) for loop in sch.get_loops(block_rv)]
    return None if any(e is None for e in extents) else extents


class _Shape:
    """The blocks of an applicable function: ``pad`` (or None), ``conv``, ``chain`` (the
    injective blocks after it, the last one the function's output), the tile numbers."""

    def __init__(self, pad, conv, chain, tile, vectors, lanes):
        self.pad, self.conv, self.chain = pad, conv, chain
        self.tile, self.vectors, self.lanes = tile, vectors, lanes


def _match(sch) -> _Shape | None:
    """The function's blocks when they have the shape the rule schedules, else None."""
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    stmts = [sch.get(b) for b in blocks]
    convs = [i for i, s in enumerate(stmts) if s.name_hint.startswith(CONV_BLOCK)
             and _annotation(s, TILE_KEY)]
    if len(convs) != 1:
        return None
    at = convs[0]
    conv = stmts[at]
    tile, vectors, lanes = (_annotation(conv, k) for k in (TILE_KEY, VECTORS_KEY, LANES_KEY))
    if not (tile and vectors and lanes) or _iter_kinds(conv) != "SSSSSRRR":
        return None
    extents = static_extents(sch, blocks[at])
    if extents is None or len(extents) != 8 or extents[3] % tile:
        return None
    # a chunk holds the tile's channels, or one register of them (NCHW[x]c output: then
    # ``vectors`` consecutive chunks form the tile)
    if extents[4] != vectors * lanes and (extents[4] != lanes or extents[1] % vectors):
        return None
    # before the conv: nothing, or its padding block (a spatial block the conv reads)
    pad = None
    if at == 1 and stmts[0].name_hint.startswith(PAD_BLOCK) and _is_spatial(stmts[0]):
        pad = blocks[0]
        if static_extents(sch, pad) is None or \
                {sch.get(p) for p in sch.get_consumers(pad)} != {conv}:
            return None
    elif at != 0:
        return None
    chain = blocks[at + 1:]
    if not epilogue_chain(sch, blocks[at], chain):
        return None
    out_shape = [_int(iv.dom.extent) for iv in sch.get(chain[0]).iter_vars]
    if len(out_shape) not in (4, 5) or \
            not all(_writes_own_element(sch.get(b), out_shape) for b in chain):
        return None
    return _Shape(pad, blocks[at], chain, tile, vectors, lanes)


def epilogue_chain(sch, conv_rv, chain) -> bool:
    """Whether the blocks ``chain`` are an epilogue of the block ``conv_rv``: at least one,
    each spatial with one write and static loops, reading the block before it (the first:
    the conv) and parameters only; the last one the function's output and no other."""
    if not chain or is_output_block(sch, conv_rv):
        return False
    previous = sch.get(conv_rv)
    for block_rv in chain:
        stmt = sch.get(block_rv)
        producers = {sch.get(p) for p in sch.get_producers(block_rv)}
        if not _is_spatial(stmt) or producers != {previous} or len(stmt.writes) != 1 or \
                static_extents(sch, block_rv) is None:
            return False
        previous = stmt
    return is_output_block(sch, chain[-1]) and \
        not any(is_output_block(sch, b) for b in chain[:-1])


def _schedule_pad(sch, pad):
    loops = sch.get_loops(pad)
    sch.parallel(sch.fuse(*loops[:-1]))


def _writes_own_element(stmt, out_shape) -> bool:
    """The block is elementwise over the conv's output (NCHW or NCHW[x]c): data-parallel
    iterators over its shape, writing the element of exactly those iterators."""
    if [_int(iv.dom.extent) for iv in stmt.iter_vars] != out_shape:
        return False
    region = stmt.writes[0].region
    return len(region) == len(out_shape) and all(
        _int(r.extent) == 1 and r.min.same_as(iv.var)
        for r, iv in zip(region, stmt.iter_vars))


def _loops_below(sch, block, loop) -> list:
    """The loops of ``block`` nested inside ``loop`` (one of its loops)."""
    loops = sch.get_loops(block)
    at = [i for i, rv in enumerate(loops) if sch.get(rv).same_as(sch.get(loop))][0]
    return loops[at + 1:]


def _schedule_epilogue(sch, block, tile_loop, channels: int, lanes: int):
    """The per-tile write-back, loops (c, w) over one tile (a loop of extent 1 is dropped):
    columns outside, channels vectorised inside, so it reads the accumulators as the
    reduction wrote them (whole registers: LLVM keeps the tile in registers instead of
    splitting it into lanes)."""
    inner = _loops_below(sch, block, tile_loop)
    if len(inner) == 2:
        sch.reorder(inner[1], inner[0])
        sch.unroll(inner[1])
        _vectorize_channels(sch, inner[0], channels, lanes)
    elif len(inner) == 1 and channels > 1:
        _vectorize_channels(sch, inner[0], channels, lanes)
    elif len(inner) == 1:
        sch.unroll(inner[0])


def _schedule_blocked_epilogue(sch, block, tile_loop):
    """The per-tile write-back to NCHW[x]c, loops (channel block, w, lane) over one tile (a
    loop of extent 1 is dropped): columns, then channel blocks unrolled, a block's lanes
    one vector store."""
    inner = _loops_below(sch, block, tile_loop)
    if len(inner) == 3:
        sch.reorder(inner[1], inner[0], inner[2])
        inner = [inner[1], inner[0], inner[2]]
    for loop in inner[:-1]:
        sch.unroll(loop)
    sch.vectorize(inner[-1])


def _vectorize_channels(sch, loop, channels, lanes):
    if channels > lanes and channels % lanes == 0:
        outer, loop = sch.split(loop, factors=[None, lanes])
        sch.unroll(outer)
    sch.vectorize(loop)


def _data_read(stmt) -> int | None:
    """Index of the conv block's read of its input (the one 4-D buffer it reads)."""
    found = [i for i, r in enumerate(stmt.reads) if len(r.region) == 4]
    return found[0] if len(found) == 1 else None


def _pointwise_unit_stride(sch, conv, kh, kw) -> bool:
    """A 1x1 conv reading consecutive input columns for consecutive outputs (width stride
    1): a tile row of its inputs is one contiguous run."""
    from tvm.sym import pattern

    if _int(sch.get(kh).extent) != 1 or _int(sch.get(kw).extent) != 1:
        return False
    stmt = sch.get(conv)
    at = _data_read(stmt)
    if at is None:
        return False
    coeffs = pattern.detect_linear_equation(stmt.reads[at].region[3].min,
                                            [stmt.iter_vars[3].var])
    return len(coeffs) == 2 and _int(coeffs[0]) == 1


def _vector_rows(sch, conv, ic):
    """1x1 convs with vector rows (module doc): the ic loop split by the first of
    UNROLL_IC_1X1 dividing it (inner part unrolled), each input channel's tile row read
    into a local row with vectorised loads; LLVM forwards the row's lanes into FMLAs by
    element. Returns the loop to decompose the reduction at."""
    extent = _int(sch.get(ic).extent) or 0
    factor = next((f for f in UNROLL_IC_1X1 if extent % f == 0 and extent > f), None)
    reduce_at = step = ic
    if factor:
        reduce_at, step = sch.split(ic, factors=[None, factor])
    _cache_row(sch, conv, step)
    if factor:
        sch.unroll(step)
    return reduce_at


def _tap_rows(sch, conv, kh):
    """kxk convs with vector rows: per (ic, kh) the input columns the tile's kw taps read,
    (tile - 1) x stride + kw of them, loaded once as whole vectors into a local row; the
    unrolled taps take their scalars as lanes (FMLA by element), so a few registers hold
    what took one register per column."""
    _cache_row(sch, conv, kh)


def _cache_row(sch, conv, loop):
    """The conv's input read under ``loop`` cached in a local row, loaded as vectors."""
    row = sch.cache_read(conv, _data_read(sch.get(conv)), "local")
    sch.compute_at(row, loop)
    inner = _loops_below(sch, row, loop)
    if inner:  # a row of one column has no loop left
        sch.vectorize(inner[-1])


def accumulate_in_registers(sch, conv, inner) -> None:
    """The tile's reduction on accumulators the conv block already keeps in local scope:
    the tile unrolled, a channel block vectorised, vector rows where the plan says so, the
    accumulators zeroed before the reduction, short kw loops unrolled."""
    ic, kh, kw, wi, ov, ol = inner
    sch.unroll(wi)
    sch.unroll(ov)
    sch.vectorize(ol)
    reduce_at = ic
    if _annotation(sch.get(conv), ROWS_KEY) and _pointwise_unit_stride(sch, conv, kh, kw):
        reduce_at = _vector_rows(sch, conv, ic)
    elif _annotation(sch.get(conv), ROWS_KEY) and _data_read(sch.get(conv)) is not None:
        _tap_rows(sch, conv, kh)
    init = sch.decompose_reduction(conv, reduce_at)
    init_loops = sch.get_loops(init)
    sch.unroll(init_loops[-3])
    sch.unroll(init_loops[-2])
    sch.vectorize(init_loops[-1])
    kw_extent = _int(sch.get(kw).extent) or 0
    if kw_extent <= UNROLL_KW_MAX:
        sch.unroll(kw)


class LlvmScheduleRule(ScheduleRule):
    """Base of the project's dlight rules: each PrimFunc, on a target the rule is available
    for, gets a fresh schedule; ``schedule(sch)`` returns it scheduled, or None when the
    function is not one the rule knows."""

    def is_target_available(self, target) -> bool:
        return target.kind.name == "llvm"

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        return self.schedule(s_tir.Schedule(func))

    def schedule(self, sch):
        raise NotImplementedError


class ConvRule(LlvmScheduleRule):
    """The register-blocked channel-blocked conv (see module doc); None for anything else."""

    def schedule(self, sch):
        shape = _match(sch)
        if shape is None:
            return None
        conv = shape.conv
        # epilogue: one block reading the conv result per tile
        for block_rv in shape.chain[:-1]:
            sch.compute_inline(block_rv)
        out = shape.chain[-1]
        b, oc, h, w, o, ic, kh, kw = sch.get_loops(conv)
        wo, wi = sch.split(w, factors=[None, shape.tile])
        if _int(sch.get(o).extent) == shape.vectors * shape.lanes:
            ov, ol = sch.split(o, factors=[None, shape.lanes])
        else:  # chunks of one register
            (oc, ov), ol = sch.split(oc, factors=[None, shape.vectors]), o
        sch.reorder(b, oc, h, wo, ic, kh, kw, wi, ov, ol)
        sch.parallel(sch.fuse(b, oc, h))
        sch.reverse_compute_at(out, wo)
        sch.set_scope(conv, 0, "local")
        accumulate_in_registers(sch, conv, (ic, kh, kw, wi, ov, ol))
        out_vars = sch.get(out).iter_vars
        if len(out_vars) == 5:
            _schedule_blocked_epilogue(sch, out, wo)
        else:
            _schedule_epilogue(sch, out, wo, min(_int(out_vars[1].dom.extent),
                                                 shape.vectors * shape.lanes), shape.lanes)
        if shape.pad is not None:
            _schedule_pad(sch, shape.pad)
        return sch
