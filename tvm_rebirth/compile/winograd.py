"""Winograd F(2x2, 3x3) for stride-1 3x3 convs, built from our channel-blocked conv kernel.

A 3x3 conv computes each 2x2 output tile with 36 multiply-adds per input/output channel
pair; Winograd's minimal filtering needs 16, at the price of a transform of every input tile
and of every output tile (adds only). With P tiles, C input and K output channels:

    V[g*C + c, p] = (B^T d_{c,p} B)[g]          # input transform, g = xi*4 + nu (16 of them)
    M[g*K + k, p] = sum_c U[g*K + k, c] V[g*C + c, p]   # 16 independent GEMMs
    Y[k, tile p]  = A^T M[., k, p] A             # output transform (+ bias/BN/ReLU fused)

The 16 GEMMs are a grouped 1x1 convolution (16 groups, a row of tiles as its width), so
``layouts.blocked_conv_te`` and ``conv_rules``' micro-kernel compute them with the same packed
weights (``U = G g G^T``, transformed and packed at compile time) as any 1x1 conv.
``winograd_conv`` emits one function in place of the conv, fused like a conv (its
elementwise epilogue, not a concat that follows); the transforms are TE computations with
constant coefficients written out per (xi, nu) (no multiplications by 0 or 1).
``WinogradRule`` computes it a band of tile rows at a time (input transform, GEMM, output
transform; ``band_rows``: one row, or half the image where that fits a cache), so the
transformed input and the GEMM's output never exceed a band: the model plans no more memory
than with direct convs, and a band stays in cache between the three steps.

``winograd_pays`` decides per conv from an instruction estimate (calibrated on the emulated
Cortex-A72): the transforms cost per tile and channel, so narrow convs stay direct.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from .conv_rules import LlvmScheduleRule, accumulate_in_registers
from .layouts import CONV_BLOCK, LANES_KEY, TILE_KEY, UNPACK_BLOCK

logger = logging.getLogger(__name__)

WINO_INPUT = "rebirth_winograd_input"
WINO_PAD = "rebirth_winograd_pad"
WINO_OUTPUT = "rebirth_winograd_output"
BAND_KEY = "rebirth.band_rows"   # WINO_INPUT annotation: tile rows computed together
TILE = 2                       # outputs per tile side: F(2x2, 3x3)
ALPHA = TILE + 2               # input tile side
# F(2x2, 3x3) (Lavin & Gray, 2016)
B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype="float32")
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype="float32")
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype="float32")

# guest instructions (emulated Cortex-A72) of the estimate in winograd_pays
DIRECT_PER_MAC = 0.345         # a direct 3x3 conv's micro-kernel
GEMM_PER_MAC = 0.33            # the 1x1 micro-kernel over the tiles
INPUT_PER_TILE_CHANNEL = 100   # padding + 16 loads, 32 adds, 16 stores per input channel
OUTPUT_PER_TILE_CHANNEL = 60   # 16 loads, 32 adds, 4 stores + epilogue per output channel
REQUIRED_SAVING = 0.8          # Winograd only where it is estimated 20 % cheaper
# a band's transformed input and GEMM output at most (about one core's L2; measured on
# Intel AVX-512, 2 threads: two bands of GoogLeNet's/AlexNet's 7x7-14x14 convs 1.3-1.6x
# faster than single rows, single rows of conv2 at 56x56 1.1x faster than two bands)
BAND_BYTES = 2 << 20


def winograd_enabled() -> bool:
    """TVM_REBIRTH_WINOGRAD=0 keeps every 3x3 conv direct."""
    return os.environ.get("TVM_REBIRTH_WINOGRAD", "1") != "0"


def transform_weight(weight: np.ndarray) -> np.ndarray:
    """OIHW 3x3 weights [K, C/groups, 3, 3] -> the 16 GEMMs' weights as a grouped 1x1 conv's
    OIHW: [16 x K, C/groups, 1, 1], row g*K + k holding U[g][k, :] with U = G g G^T (a
    grouped conv's group r of the 16 GEMM g is then group g x groups + r of the 1x1 conv)."""
    k, c = weight.shape[:2]
    u = np.einsum("ai,kcij,bj->abkc", G, weight.astype("float64"), G)  # [4, 4, K, C]
    return np.ascontiguousarray(u.reshape(ALPHA * ALPHA * k, c, 1, 1).astype("float32"))


def _linear(terms):
    """sum of coefficient * value for the nonzero coefficients, +-1 as adds/subtracts."""
    from tvm import tirx

    expr = None
    for coef, value in terms:
        if coef == 0:
            continue
        term = value if coef in (1, -1) else value * tirx.const(float(coef), "float32")
        if expr is None:
            expr = -term if coef == -1 else term
        elif coef == -1:
            expr = expr - term
        else:
            expr = expr + term
    return expr if expr is not None else tirx.const(0.0, "float32")


def _select(index, cases):
    """cases[index] for a loop variable ``index`` the schedule unrolls (the Select folds)."""
    from tvm import tirx

    expr = cases[-1]
    for i in range(len(cases) - 2, -1, -1):
        expr = tirx.Select(index == i, cases[i], expr)
    return expr


def winograd_te(x, packed, out_channels, padding, out_h, out_w, plan, groups, conv_te,
                band: int = 1):
    """One function computing the conv ``x`` * 3x3 weights (``packed``: their transform,
    packed for ``plan``) by Winograd: [N, C, H, W] -> [N, K, out_h, out_w]. Its blocks:

    * ``WINO_PAD``: the input zero-padded to whole tiles;
    * ``WINO_INPUT``: V [N, 16 C, tiles_h, wide], each tile's B^T d B, one tile row of the
      image per row of V (``wide``: the tiles of a row rounded up to the GEMM's register
      tile; the tiles past the image are zeros);
    * the GEMM: ``conv_te``'s blocked grouped 1x1 conv of V (16 x ``groups`` groups), so a
      row of M is the GEMM of a row of V;
    * ``WINO_OUTPUT``: A^T M A of each tile, cropped.

    ``WinogradRule`` computes it a band of ``band`` tile rows at a time (the annotation
    BAND_KEY of WINO_INPUT), so V and M only ever hold a band."""
    from tvm import te, tirx

    n, channels, height, width = (int(d) for d in x.shape)
    top, left = padding[0], padding[1]
    tiles_h, tiles_w = -(-out_h // TILE), -(-out_w // TILE)
    wide = -(-tiles_w // plan.tile) * plan.tile

    def pad(b, c, h, w):
        inside = tirx.all(h >= top, h < top + height, w >= left, w < left + width)
        return tirx.if_then_else(inside, x[b, c, h - top, w - left], tirx.const(0.0, "float32"))
    data = te.compute((n, channels, tiles_h * TILE + 2, wide * TILE + 2), pad, name=WINO_PAD)

    def transform(b, gc, th, tw):
        g, c = gc // channels, gc % channels
        cases = []
        for xi in range(ALPHA):
            for nu in range(ALPHA):
                cases.append(_linear(
                    (B_T[xi, i] * B_T[nu, j], data[b, c, th * TILE + i, tw * TILE + j])
                    for i in range(ALPHA) for j in range(ALPHA)))
        return _select(g, cases)
    v = te.compute((n, ALPHA * ALPHA * channels, tiles_h, wide), transform, name=WINO_INPUT,
                   attrs={BAND_KEY: band})
    m = conv_te(v, packed, ALPHA * ALPHA * out_channels, [1, 1], [0, 0, 0, 0], [1, 1], plan,
                ALPHA * ALPHA * groups)

    def inverse(b, k, h, w):
        th, tw = h // TILE, w // TILE
        cases = []
        for i in range(TILE):
            for j in range(TILE):
                cases.append(_linear(
                    (A_T[i, xi] * A_T[j, nu], m[b, (xi * ALPHA + nu) * out_channels + k, th, tw])
                    for xi in range(ALPHA) for nu in range(ALPHA)))
        return _select((h % TILE) * TILE + w % TILE, cases)
    return te.compute((n, out_channels, out_h, out_w), inverse, name=WINO_OUTPUT)


def winograd_applies(call) -> bool:
    """A 3x3 conv of stride 1 without dilation (grouped too, not depthwise);
    layouts.conv_rewrite_applies has checked layouts, dtypes and constant weights."""
    attrs = call.attrs
    shape = [int(d) for d in call.args[1].value.shape]
    return shape[2:] == [3, 3] and shape[1] > 1 and \
        all(int(s) == 1 for s in attrs.strides) and all(int(d) == 1 for d in attrs.dilation)


def winograd_pays(in_channels: int, out_channels: int, tiles: int, out_pixels: int,
                  groups: int = 1) -> bool:
    """Whether the estimated instructions of Winograd are REQUIRED_SAVING of the direct
    conv's (see the constants)."""
    macs_per_pixel = in_channels // groups * out_channels
    direct = DIRECT_PER_MAC * 9 * macs_per_pixel * out_pixels
    winograd = tiles * (GEMM_PER_MAC * ALPHA * ALPHA * macs_per_pixel
                        + INPUT_PER_TILE_CHANNEL * in_channels
                        + OUTPUT_PER_TILE_CHANNEL * out_channels)
    return winograd <= REQUIRED_SAVING * direct


def winograd_takes(call) -> bool:
    """Whether ``winograd_conv`` computes this NCHW conv (``layouts.conv_rewrite_applies``
    has accepted it): Winograd enabled, applicable and paying."""
    if not winograd_enabled() or not winograd_applies(call) or \
            (call.attrs.data_layout, call.attrs.out_layout) != ("NCHW", "NCHW"):
        return False
    in_channels = int(call.args[0].ty.shape[1])
    out_channels = int(call.args[1].value.shape[0])
    out_h, out_w = int(call.ty.shape[2]), int(call.ty.shape[3])
    tiles = -(-out_h // TILE) * -(-out_w // TILE)
    return winograd_pays(in_channels, out_channels, tiles, out_h * out_w,
                         int(call.attrs.groups))


def band_rows(in_channels: int, out_channels: int, tiles_h: int, wide: int,
              cores: int = 2) -> int:
    """Tile rows ``WinogradRule`` computes together: one band per core (at least two) when
    such a band's transformed input and GEMM output fit BAND_BYTES (late layers: the GEMM's
    weights, larger than the tiles, are read once per band), else one row (early layers:
    the weights are small, the tiles many)."""
    row_bytes = 4 * ALPHA * ALPHA * (in_channels + out_channels) * wide
    per_core = -(-tiles_h // max(2, cores))
    return per_core if per_core * row_bytes <= BAND_BYTES else 1


def winograd_conv(builder, call, plan_gemm, pack, conv_te, cores: int = 2):
    """The call replacing ``call`` (see module doc), emitted with ``builder``; None
    when Winograd does not apply or pay, or the GEMM has no plan. ``plan_gemm(out_channels,
    width)``, ``pack(weight, block, groups)`` and ``conv_te`` are layouts' planner, packer
    and blocked conv, used for the GEMM; ``cores``: the target's (``band_rows``)."""
    from tvm import relax

    if not winograd_takes(call):
        return None
    x, weight = call.args
    conv_groups = int(call.attrs.groups)
    out_channels = int(weight.value.shape[0])
    in_channels = int(x.ty.shape[1])
    out_h, out_w = int(call.ty.shape[2]), int(call.ty.shape[3])
    tiles_h, tiles_w = -(-out_h // TILE), -(-out_w // TILE)
    plan = plan_gemm(out_channels // conv_groups, tiles_w)
    if plan is None:
        return None
    padding = [int(p) for p in call.attrs.padding]
    packed = relax.const(pack(transform_weight(weight.value.numpy()), plan.block,
                              ALPHA * ALPHA * conv_groups), "float32")
    band = band_rows(in_channels, out_channels, tiles_h, -(-tiles_w // plan.tile) * plan.tile,
                     cores)
    return builder.call_te(
        lambda data, kernel: winograd_te(data, kernel, out_channels, padding, out_h, out_w,
                                         plan, conv_groups, conv_te, band),
        x, packed, primfunc_name_hint="rebirth_winograd",
        primfunc_attrs={"op_pattern": 4})  # like a conv: takes elementwise epilogues only


def _blocks(sch) -> dict:
    return {sch.get(b).name_hint: b for b in sch.get_child_blocks(sch.get_sblock("root"))}


class WinogradRule(LlvmScheduleRule):
    """dlight rule for ``winograd_te``'s function, with the elementwise epilogue fused after
    it; None for any other function. Parallel over bands of tile rows (``band_rows``):

        parallel for (n, band):
          pad the band's input; V = its tiles' B^T d B     # per channel, 16 unrolled
          for oc_chunk, tile row, width tile:               # the blocked 1x1 micro-kernel
            acc = sum over 16 C of V x U;  M[row] = acc
          Y[band] = epilogue(A^T M A)     # per tile, a vector of output channels at a time

    so the transformed input and the GEMM's output are a band each (cache-sized), never the
    whole image's (a last, shorter band is predicated, not padded)."""

    def schedule(self, sch):
        blocks = _blocks(sch)
        names = list(blocks)
        if names[:5] != [WINO_PAD, WINO_INPUT, CONV_BLOCK, UNPACK_BLOCK, WINO_OUTPUT] or \
                not self._epilogue_inlinable(sch, names[4:], blocks):
            return None
        conv = blocks[CONV_BLOCK]
        numbers = [sch.get(conv).annotations.get(TILE_KEY),
                   sch.get(conv).annotations.get(LANES_KEY),
                   sch.get(blocks[WINO_INPUT]).annotations.get(BAND_KEY)]
        if any(n is None for n in numbers):
            return None
        tile, lanes, band = (int(n) for n in numbers)
        if int(sch.get(blocks[WINO_OUTPUT]).iter_vars[1].dom.extent) % lanes:
            return None  # the output transform reads whole vectors of output channels
        for name in reversed(names[5:]):
            sch.reverse_compute_inline(blocks[name])
        sch.compute_inline(blocks[UNPACK_BLOCK])
        b, oc, h, w, o, ic, kh, kw = sch.get_loops(conv)
        wo, wi = sch.split(w, factors=[None, tile])
        ov, ol = sch.split(o, factors=[None, lanes])
        bands, h = sch.split(h, factors=[None, band])
        # a channel chunk's weights serve the band's rows before the next chunk's are read
        sch.reorder(b, bands, oc, h, wo, ic, kh, kw, wi, ov, ol)
        # the output transform's bands, merged into the GEMM's: a band of M is used up by
        # the iteration that computes it
        out = blocks[WINO_OUTPUT]
        n, k, h, w = sch.get_loops(out)
        th, i = sch.split(h, [None, TILE])
        tw, j = sch.split(w, [None, TILE])
        out_bands, th = sch.split(th, [None, band])
        # channels as vectors (whole channel blocks: the GEMM's plan), so the 16 reads of a
        # tile's M are whole vectors of a block
        ko, ki = sch.split(k, [None, lanes])
        sch.reorder(n, out_bands, th, ko, tw, i, j, ki)
        sch.vectorize(ki)
        sch.unroll(i)
        sch.unroll(j)
        band_loop = sch.merge(sch.fuse(b, bands), sch.fuse(n, out_bands))
        sch.parallel(band_loop)
        write_back = sch.cache_write(conv, 0, "local")
        sch.reverse_compute_at(write_back, wo)
        accumulate_in_registers(sch, conv, (ic, kh, kw, wi, ov, ol))
        self._write_back(sch, write_back, lanes)
        sch.compute_at(blocks[WINO_INPUT], band_loop, preserve_unit_loops=True)
        sch.compute_at(blocks[WINO_PAD], band_loop, preserve_unit_loops=True)
        self._input(sch, blocks[WINO_INPUT])
        return sch

    @staticmethod
    def _epilogue_inlinable(sch, names, blocks) -> bool:
        """Every block after the output transform is spatial over its domain (bias, BN,
        ReLU, clip: elementwise on its result)."""
        from tvm import tirx

        extents = [int(iv.dom.extent) for iv in sch.get(blocks[names[0]]).iter_vars]
        return all(
            all(int(iv.iter_type) == tirx.IterVar.DataPar for iv in sch.get(blocks[n]).iter_vars)
            and [int(iv.dom.extent) for iv in sch.get(blocks[n]).iter_vars] == extents
            for n in names)

    @staticmethod
    def _write_back(sch, block, lanes):
        """A width tile of accumulators to M: columns unrolled, channels as whole vectors."""
        *_, columns, channels = sch.get_loops(block)
        sch.unroll(columns)
        outer, inner = sch.split(channels, factors=[None, lanes])
        sch.unroll(outer)
        sch.vectorize(inner)

    @staticmethod
    def _input(sch, block):
        """A band's transforms per input channel: the 16 of a tile together, their Selects
        folded by unrolling."""
        _, gc, th, tw = sch.get_loops(block)[-4:]
        channels = int(sch.get(gc).extent) // (ALPHA * ALPHA)
        g, c = sch.split(gc, [ALPHA * ALPHA, channels])
        sch.reorder(c, th, tw, g)
        sch.unroll(g)
