"""A generic CPU schedule for every fused PrimFunc that has no tuned record.

Stock TVM 0.27 applies no schedule on CPU (GoogLeNet ~2 s per image) and dlight's CPU
Reduction rule is pathological on conv2d. This rule does what a careful hand schedule of a
direct NCHW convolution does, for any reduction or injective PrimFunc:

* inline injective producers (padding, bias broadcast) into their consumer;
* main (last reduction) block: spatial loops outside, then the reduction loops, then the
  innermost spatial loop (output width) vectorised; the output channels are split by a small
  factor inside the reduction so one input load feeds several accumulators;
* outer spatial loops fused and parallel;
* when a (channel tile x width tile) of outputs can be accumulated in registers (see
  ``_register_plan``), the epilogue (bias, ReLU, ...) or a plain write-back runs per tile right
  after the tile's reduction; otherwise the epilogue blocks are computed at the parallel loop;
  either way they are vectorised;
* purely injective functions: all loops fused, parallel outside, vectorised inside.

Every strategy is checked for applicability before the schedule is touched (like dlight's own
rules); a PrimFunc no strategy fits gets ``None``, i.e. TVM's default.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import SBlockInfo, normalize_prim_func
from tvm.s_tir.dlight.base import get_extent, try_inline_contiguous_spatial
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.s_tir.schedule.analysis import is_output_block

VECTOR_LANES = 8      # fp32 lanes of a 256-bit register; LLVM legalises for 128-bit NEON
CHANNEL_TILE = 4      # output channels sharing each input load
ACCUMULATORS = 8      # vector registers of accumulators (x86 AVX2 has 16, NEON 32)
PARALLEL_WORK = 64    # fuse outer spatial loops until they give this many parallel iterations


# --------------------------------------------------------------------------- loop arithmetic

def _static_extent(sch, loop) -> int | None:
    """The loop's extent when it is a constant, else None (symbolic shapes)."""
    extent = get_extent(sch, loop)
    return extent if isinstance(extent, int) else None


def _vector_factor(extent):
    """Vector width for an axis: a divisor in [4, 32] (prefer multiples of 8), the whole
    axis when short, else 16 with a tail. 0 means: do not vectorise."""
    if extent <= 32:
        return extent if extent >= 2 else 0
    divisors = [d for d in range(4, 33) if extent % d == 0]
    eights = [d for d in divisors if d % 8 == 0]
    if eights:
        return max(eights)
    if divisors:
        return max(divisors)
    return 16


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


# --------------------------------------------------------------------------- block relations

def _producer_blocks(sch, block_rv) -> set:
    return {sch.get(p) for p in sch.get_producers(block_rv)}


def _dependents(sch, main: SBlockInfo, later: list[SBlockInfo]) -> list[SBlockInfo]:
    """The blocks after ``main`` that read its result, directly or through each other (in
    order); independent blocks (a second output such as dropout's mask) are left out."""
    attached, chain = {sch.get(main.block_rv)}, []
    for info in later:
        if _producer_blocks(sch, info.block_rv) & attached:
            chain.append(info)
            attached.add(sch.get(info.block_rv))
    return chain


def _reads_one_buffer_of(sch, block_rv, producer_rv) -> bool:
    """reverse_compute_inline's shape: the block reads its producer's result through exactly
    one access and depends on no other block."""
    producer, block = sch.get(producer_rv), sch.get(block_rv)
    if _producer_blocks(sch, block_rv) != {producer} or len(producer.writes) != 1:
        return False
    written = producer.writes[0].source  # TVM 0.27 access regions name their buffer .source
    return sum(1 for region in block.reads if region.source.same_as(written)) == 1


# --------------------------------------------------------------------------- plans

@dataclass
class _MainPlan:
    """How the main reduction block's loops are split: ``width_factor`` is the vector tile of
    the innermost spatial loop (``width`` long; 0: not split, not vectorised),
    ``channel_tile`` the output channels per input load (1: not split)."""

    registers: bool
    n_spatial: int
    width: int
    width_factor: int
    channel_tile: int
    chain: tuple = ()  # register plan: the epilogue blocks computed per tile

    def spatial_loops_outside(self) -> int:
        """Spatial loops outside the reduction after the splits (the width's outer part
        counts when the width is split)."""
        return self.n_spatial - 1 + (1 if 0 < self.width_factor < self.width else 0)


def _plan_main(sch, main: SBlockInfo, registers: bool) -> _MainPlan:
    kinds = main.dom_kind()
    loops = sch.get_loops(main.block_rv)
    spatial = [loop for loop, kind in zip(loops, kinds) if kind == "S"]
    width = _static_extent(sch, spatial[-1]) or 0
    factor = _register_vector(width) if registers else _vector_factor(width)
    tile = 1
    if "R" in kinds and len(spatial) >= 3:  # NCHW: the axis before the rows is the channel
        tile = _channel_tile(_static_extent(sch, spatial[-3]) or 0, factor, registers)
    return _MainPlan(registers, len(spatial), width, factor, tile)


def _register_plan(sch, main: SBlockInfo, later: list[SBlockInfo]) -> _MainPlan | None:
    """The register-accumulating plan when it applies, else None. It needs:

    * reduction loops, and a spatial loop left outside them to hold one tile per iteration;
    * when the main block has an epilogue: a main result that is an intermediate (its buffer
      becomes ``local``), an epilogue that is injective and depends on nothing but ``main``
      and itself (it is computed per tile under the tile loop), merged into one block
      (each further block reads the previous one exactly once and nothing else).
    """
    if "R" not in main.dom_kind():
        return None
    plan = _plan_main(sch, main, registers=True)
    if plan.spatial_loops_outside() == 0:
        return None
    chain = _dependents(sch, main, later)
    plan.chain = tuple(chain)
    if not chain:
        return plan  # a cache_write block does the write-back per tile
    if is_output_block(sch, main.block_rv):
        return None
    if not all(info.is_injective() for info in chain):
        return None
    for previous, info in pairwise(chain):
        if is_output_block(sch, previous.block_rv) or \
                not _reads_one_buffer_of(sch, info.block_rv, previous.block_rv):
            return None
    inside = {sch.get(main.block_rv)} | {sch.get(info.block_rv) for info in chain}
    if not _producer_blocks(sch, chain[0].block_rv) <= inside:
        return None
    return plan


# --------------------------------------------------------------------------- schedules

def _vectorize_own(sch, loop):
    extent = _static_extent(sch, loop) or 0
    factor = _vector_factor(extent)
    if not factor:
        return
    if factor < extent:
        _, loop = sch.split(loop, factors=[None, factor])
    sch.vectorize(loop)


def _parallel_outer(sch, block, n_spatial):
    """Fuse leading spatial loops until there is enough parallel work; return that loop and
    how many loops were fused into it (besides the first)."""
    loops = sch.get_loops(block)[:n_spatial]
    take, work = 0, 1
    for loop in loops:
        take += 1
        work *= _static_extent(sch, loop) or 1
        if work >= PARALLEL_WORK:
            break
    fused = sch.fuse(*loops[:take]) if take > 1 else loops[0]
    sch.parallel(fused)
    return fused, take - 1


def _injective_applicable(sch, blocks: list[SBlockInfo]) -> bool:
    """Every block has a loop to fuse, and a block whose fused loop is long enough to be
    parallelised and vectorised is data parallel."""
    for info in blocks:
        loops = sch.get_loops(info.block_rv)
        if not loops:
            return False
        total = 1
        for loop in loops:
            extent = _static_extent(sch, loop)
            total = None if extent is None or total is None else total * extent
        if total is not None and total > VECTOR_LANES and not info.is_injective():
            return False
    return True


def _schedule_injective(sch, blocks: list[SBlockInfo]):
    for info in blocks:
        loops = sch.get_loops(info.block_rv)
        if len(loops) > 1:
            sch.fuse(*loops)
        loop = sch.get_loops(info.block_rv)[0]
        if (_static_extent(sch, loop) or 0) > VECTOR_LANES:
            outer, inner = sch.split(loop, factors=[None, VECTOR_LANES])
            sch.parallel(outer)
            sch.vectorize(inner)
    return sch


def _tile_main(sch, main: SBlockInfo, plan: _MainPlan):
    """Split and reorder the main block's loops as [spatial..., reduce..., channel tile,
    width tile], parallelise the outer spatial loops and vectorise the width tile.

    Returns (number of spatial loops outside the reduction, the parallel loop or None, how
    many loops were fused into it, the first reduction loop or None, [channel tile loop])."""
    kinds = main.dom_kind()
    loops = sch.get_loops(main.block_rv)
    spatial = [loop for loop, kind in zip(loops, kinds) if kind == "S"]
    reduce = [loop for loop, kind in zip(loops, kinds) if kind == "R"]
    vec = spatial.pop()
    inner = []
    if plan.channel_tile > 1:
        co, ci = sch.split(spatial[-2], factors=[None, plan.channel_tile])
        spatial[-2] = co
        inner = [ci]
    if 0 < plan.width_factor < plan.width:
        vec_outer, vec = sch.split(vec, factors=[None, plan.width_factor])
        spatial.append(vec_outer)
    sch.reorder(*spatial, *reduce, *inner, vec)
    outer, fused = _parallel_outer(sch, main.block_rv, len(spatial)) if spatial else (None, 0)
    if plan.width >= 2:
        sch.vectorize(vec)
    return len(spatial), outer, fused, (reduce[0] if reduce else None), inner


def _accumulate_in_registers(sch, main, chain, tile_loop, first_reduce, inner):
    """The main block accumulates one (channel tile x width tile) of outputs in a local
    buffer that LLVM keeps in registers; the epilogue (bias, ReLU, ...) or a plain write-back
    runs per tile, right after the tile's reduction."""
    # epilogue blocks that could not be compute-inlined into each other merge into the first
    for info in chain[1:]:
        sch.reverse_compute_inline(info.block_rv)
    if chain:
        epilogue = chain[0].block_rv
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


def _attach_epilogues(sch, main, later: list[SBlockInfo], outer):
    """Epilogues (bias, ReLU, ...) computed per parallel chunk and vectorised. A block joins
    only when it is injective and everything it reads from other blocks is already computed
    in that chunk; the rest (independent outputs, softmax's normalisation that also needs an
    earlier reduction) stay at the root."""
    inside = {sch.get(main)}
    for info in later:
        producers = _producer_blocks(sch, info.block_rv)
        if not (info.is_injective() and producers & inside and producers <= inside):
            continue
        sch.reverse_compute_at(info.block_rv, outer)
        inside.add(sch.get(info.block_rv))
        own = sch.get_loops(info.block_rv)
        if len(own) > 1:
            _vectorize_own(sch, own[-1])


class GenericCpuSchedule(CPUScheduleRule):
    """Parallel, vectorised, epilogue-fused schedule for any CPU PrimFunc (see module doc)."""

    def is_target_available(self, target) -> bool:
        return target.kind.name in ("llvm", "c")

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        # dlight's helper inlines padding / broadcasts into their consumers; a block nobody
        # reads (an unused dropout mask, BatchNorm's running statistics) is dropped with it
        remaining = try_inline_contiguous_spatial(sch, infos)
        reductions = [i for i, info in enumerate(remaining) if info.is_reduction()]
        if not reductions:
            if not _injective_applicable(sch, remaining):
                return None
            return _schedule_injective(sch, remaining)
        main_index = reductions[-1]
        main, later = remaining[main_index], remaining[main_index + 1:]
        kinds = main.dom_kind()
        if "O" in kinds or "S" not in kinds:  # opaque iterators, or nothing to parallelise
            return None
        plan = _register_plan(sch, main, later) or _plan_main(sch, main, registers=False)
        n_spatial, outer, fused, first_reduce, inner = _tile_main(sch, main, plan)
        if plan.registers:
            tile_loop = sch.get_loops(main.block_rv)[n_spatial - fused - 1]
            _accumulate_in_registers(sch, main.block_rv, plan.chain, tile_loop, first_reduce,
                                     inner)
            return sch
        if first_reduce is not None:
            sch.decompose_reduction(main.block_rv, first_reduce)
        if outer is not None:
            _attach_epilogues(sch, main.block_rv, later, outer)
        # earlier reductions / producers that could not be inlined stay as they are
        return sch
