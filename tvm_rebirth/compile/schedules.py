"""A generic CPU schedule for every fused PrimFunc that has no tuned record.

Stock TVM 0.27 applies no schedule on CPU (GoogLeNet ~2 s per image) and dlight's CPU
Reduction rule is pathological on conv2d. This rule does what a careful hand schedule of a
direct NCHW convolution does, for any reduction or injective PrimFunc:

* inline injective producers (padding, bias broadcast) into their consumer;
* main (last reduction) block: spatial loops outside, then the reduction loops, then the
  innermost spatial loop (output width) vectorised; the output channels are split by a small
  factor inside the reduction so one input load feeds several accumulators;
* outer spatial loops fused and parallel; epilogue blocks (bias, ReLU, ...) computed at the
  parallel loop and vectorised;
* purely injective functions: all loops fused, parallel outside, vectorised inside.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule

VECTOR_LANES = 8      # fp32 lanes of a 256-bit register; LLVM legalises for 128-bit NEON
CHANNEL_TILE = 4      # output channels sharing each input load
MAX_PARALLEL = 2 ** 14


def _extent(sch, loop):
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _vectorize_innermost(sch, block):
    loops = sch.get_loops(block)
    if not loops:
        return
    extent = _extent(sch, loops[-1])
    if extent is None or extent < 2:
        return
    if extent > VECTOR_LANES:
        _, inner = sch.split(loops[-1], factors=[None, VECTOR_LANES])
        sch.vectorize(inner)
    else:
        sch.vectorize(loops[-1])


def _vector_factor(extent):
    """Vector width for an axis: a divisor in [4, 32] (prefer multiples of 8), the whole
    axis when short, else 16 with a tail."""
    if extent <= 32:
        return extent if extent >= 2 else 0
    divisors = [d for d in range(4, 33) if extent % d == 0]
    eights = [d for d in divisors if d % 8 == 0]
    if eights:
        return max(eights)
    if divisors:
        return max(divisors)
    return 16


def _vectorize_own(sch, loop):
    extent = _extent(sch, loop) or 0
    factor = _vector_factor(extent)
    if not factor:
        return
    if factor < extent:
        _, loop = sch.split(loop, factors=[None, factor])
    sch.vectorize(loop)


def _parallel_outer(sch, block, n_spatial):
    """Fuse leading spatial loops until there is enough parallel work; return that loop."""
    loops = sch.get_loops(block)[:n_spatial]
    take, work = 0, 1
    for loop in loops:
        extent = _extent(sch, loop) or 1
        take += 1
        work *= extent
        if work >= 64:
            break
    fused = sch.fuse(*loops[:take]) if take > 1 else loops[0]
    sch.parallel(fused)
    return fused, take - 1


ACCUMULATORS = 8  # vector registers of accumulators (x86 AVX2 has 16, NEON 32)


def _register_vector(extent):
    """Output-width tile kept in registers: at most 16 lanes and a divisor of the width (a
    tail would predicate every vector op, which LLVM scalarises: 55 columns run as 5 x 11)."""
    if extent <= 16:
        return extent if extent >= 2 else 0
    for d in (16, 8, *range(15, 3, -1)):
        if extent % d == 0:
            return d
    return 16


def _channel_tile(channels, lanes, registers):
    """Output channels sharing each input load: as many as the accumulators allow."""
    if not registers:
        return CHANNEL_TILE if channels % CHANNEL_TILE == 0 else 1
    per_channel = max(1, -(-max(lanes, 1) // VECTOR_LANES))
    for tile in range(max(1, ACCUMULATORS // per_channel), 1, -1):
        if channels % tile == 0:
            return tile
    return 1


def _accumulate_in_registers(sch, main, later, tile_loop, first_reduce, inner):
    """The main block accumulates one (channel tile x width tile) of outputs in a local
    buffer that LLVM keeps in registers; the epilogue (bias, ReLU, ...) or a plain write-back
    runs per tile, right after the tile's reduction."""
    producers_of = lambda b: {sch.get(p) for p in sch.get_producers(b)}
    chain, attached = [], {sch.get(main)}
    for info in later:
        if producers_of(info.block_rv) & attached:
            chain.append(info.block_rv)
            attached.add(sch.get(info.block_rv))
    for block in chain[1:]:  # bias-add then ReLU: one epilogue block
        sch.reverse_compute_inline(block)
    if chain:
        epilogue = chain[0]
        sch.reverse_compute_at(epilogue, tile_loop)
        sch.set_scope(main, 0, "local")
    else:
        epilogue = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(epilogue, tile_loop)
    _vectorize_own(sch, sch.get_loops(epilogue)[-1])
    init = sch.decompose_reduction(main, first_reduce)
    _vectorize_own(sch, sch.get_loops(init)[-1])
    for loop in inner:
        sch.unroll(loop)


class GenericCpuSchedule(ScheduleRule):
    """Parallel, vectorised, epilogue-fused schedule for any CPU PrimFunc (see module doc)."""

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name not in ("llvm", "c"):
            return None
        for registers in (True, False):
            try:
                return self._schedule(func, registers)
            except Exception:  # noqa: BLE001 -- try the simpler variant, then TVM's default
                continue
        return None

    def _schedule(self, func, registers=True):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        # inline injective producers (pad, broadcast) into consumers
        remaining = []
        for info in infos[:-1]:
            if info.is_injective():
                try:
                    sch.compute_inline(info.block_rv)
                    continue
                except Exception:
                    pass
            remaining.append(info)
        remaining.append(infos[-1])
        reductions = [i for i, info in enumerate(remaining) if info.is_reduction()]
        if not reductions:
            for info in remaining:
                loops = sch.get_loops(info.block_rv)
                if len(loops) > 1:
                    sch.fuse(*loops)
                loops = sch.get_loops(info.block_rv)
                extent = _extent(sch, loops[0]) or 0
                if extent > VECTOR_LANES:
                    outer, inner = sch.split(loops[0], factors=[None, VECTOR_LANES])
                    sch.parallel(outer)
                    sch.vectorize(inner)
            return sch
        main_index = reductions[-1]
        main = remaining[main_index]
        kinds = main.dom_kind()
        if "O" in kinds or "S" not in kinds:
            return None
        loops = sch.get_loops(main.block_rv)
        spatial = [l for l, k in zip(loops, kinds) if k == "S"]
        reduce = [l for l, k in zip(loops, kinds) if k == "R"]
        # the innermost spatial axis (output width / dense columns) becomes the vector axis
        vec = spatial.pop()
        inner = []
        extent = _extent(sch, vec) or 0
        factor = _register_vector(extent) if registers else _vector_factor(extent)
        # split output channels (NCHW: the axis before the rows) for register reuse
        tile = _channel_tile(_extent(sch, spatial[-2]) or 0, factor, registers) \
            if reduce and len(spatial) >= 2 else 1
        if tile > 1:
            co, ci = sch.split(spatial[-2], factors=[None, tile])
            spatial[-2] = co
            inner = [ci]
        if factor and factor < extent:
            vec_outer, vec = sch.split(vec, factors=[None, factor])
            spatial.append(vec_outer)
        sch.reorder(*spatial, *reduce, *inner, vec)
        n_spatial = len(spatial)
        outer, fused = _parallel_outer(sch, main.block_rv, n_spatial) if spatial else (None, 0)
        if extent >= 2:
            sch.vectorize(vec)
        if registers:
            if not (reduce and spatial):
                raise ValueError("nothing to keep in registers")
            tile_loop = sch.get_loops(main.block_rv)[n_spatial - fused - 1]
            _accumulate_in_registers(sch, main.block_rv, remaining[main_index + 1:], tile_loop,
                                     reduce[0], inner)
            return sch
        if reduce:
            sch.decompose_reduction(main.block_rv, reduce[0])
        # epilogues (bias, ReLU, ...): computed per parallel chunk, vectorised
        attached = {sch.get(main.block_rv)}
        for info in remaining[main_index + 1:]:
            if outer is None:
                break
            producers = {sch.get(b) for b in sch.get_producers(info.block_rv)}
            if not producers & attached:
                continue  # independent of the main block: leave it alone
            attached.add(sch.get(info.block_rv))
            try:
                sch.reverse_compute_at(info.block_rv, outer)
                own = sch.get_loops(info.block_rv)
                if len(own) > 1:
                    _vectorize_own(sch, own[-1])
            except Exception:
                pass
        # earlier reductions / producers that could not be inlined stay as they are
        return sch
