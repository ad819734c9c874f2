"""Winograd F(2x2, 3x3) for stride-1 3x3 convs, built from our channel-blocked conv kernel.

A 3x3 conv computes each 2x2 output tile with 36 multiply-adds per input/output channel
pair; Winograd's minimal filtering needs 16, at the price of a transform of every input tile
and of every output tile (adds only). With P tiles, C input and K output channels:

    V[g*C + c, p] = (B^T d_{c,p} B)[g]          # input transform, g = xi*4 + nu (16 of them)
    M[g*K + k, p] = sum_c U[g*K + k, c] V[g*C + c, p]   # 16 independent GEMMs
    Y[k, tile p]  = A^T M[., k, p] A             # output transform (+ bias/BN/ReLU fused)

The 16 GEMMs are a grouped 1x1 convolution (16 groups, the tiles as its width), so
``layouts.blocked_conv_te`` and ``conv_rules.ConvRule`` compute them with the same packed
weights (``U = G g G^T``, transformed and packed at compile time) and micro-kernel as any
1x1 conv. ``winograd_conv`` emits the three calls in place of one conv; the transforms are
TE functions with constant coefficients written out per (xi, nu) (no multiplications by
0 or 1), scheduled by ``WinogradRule``. The input transform is opaque to fusion (it must
stay out of the GEMM's function); the output transform fuses like a conv (its elementwise
epilogue, not a concat that follows).

``winograd_pays`` decides per conv from an instruction estimate (calibrated on the emulated
Cortex-A72): the transforms cost per tile and channel, so narrow convs stay direct.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from tvm.s_tir.dlight.base import ScheduleRule

logger = logging.getLogger(__name__)

WINO_INPUT = "rebirth_winograd_input"
WINO_PAD = "rebirth_winograd_pad"
WINO_OUTPUT = "rebirth_winograd_output"
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


def input_transform_te(x, padding, tiles_w, columns):
    """[N, C, H, W] -> V [N, 16 C, 1, columns]: each tile of the zero-padded input, B^T d B
    (``columns`` >= the tiles: the GEMM's width rounded to its register tile; the tiles past
    the image are zeros)."""
    from tvm import te, tirx

    n, channels, height, width = (int(d) for d in x.shape)
    top, left = padding[0], padding[1]
    pad_h, pad_w = -(-columns // tiles_w) * TILE + 2, tiles_w * TILE + 2

    def pad(b, c, h, w):
        inside = tirx.all(h >= top, h < top + height, w >= left, w < left + width)
        return tirx.if_then_else(inside, x[b, c, h - top, w - left], tirx.const(0.0, "float32"))
    data = te.compute((n, channels, pad_h, pad_w), pad, name=WINO_PAD)

    def transform(b, gc, o, p):
        g, c = gc // channels, gc % channels
        th, tw = p // tiles_w, p % tiles_w
        cases = []
        for xi in range(ALPHA):
            for nu in range(ALPHA):
                cases.append(_linear(
                    (B_T[xi, i] * B_T[nu, j], data[b, c, th * TILE + i, tw * TILE + j])
                    for i in range(ALPHA) for j in range(ALPHA)))
        return _select(g, cases)
    return te.compute((n, ALPHA * ALPHA * channels, 1, columns), transform, name=WINO_INPUT)


def output_transform_te(m, out_channels, out_h, out_w, tiles_w):
    """M [N, 16 K, 1, P] -> Y [N, K, out_h, out_w]: A^T M A of each tile, cropped."""
    from tvm import te

    def transform(b, k, h, w):
        p = (h // TILE) * tiles_w + w // TILE
        cases = []
        for i in range(TILE):
            for j in range(TILE):
                cases.append(_linear(
                    (A_T[i, xi] * A_T[j, nu], m[b, (xi * ALPHA + nu) * out_channels + k, 0, p])
                    for xi in range(ALPHA) for nu in range(ALPHA)))
        return _select((h % TILE) * TILE + w % TILE, cases)
    return te.compute((int(m.shape[0]), out_channels, out_h, out_w), transform,
                      name=WINO_OUTPUT)


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


def winograd_conv(builder, call, plan_gemm, pack, conv_te):
    """The three calls replacing ``call`` (see module doc), emitted with ``builder``; None
    when Winograd does not apply or pay, or the GEMM has no plan. ``plan_gemm(out_channels,
    width)``, ``pack(weight, block, groups)`` and ``conv_te`` are layouts' planner, packer
    and blocked conv, used for the GEMM."""
    from tvm import relax

    if not winograd_enabled() or not winograd_applies(call):
        return None
    x, weight = call.args
    conv_groups = int(call.attrs.groups)
    out_channels = int(weight.value.shape[0])
    in_channels = int(x.ty.shape[1])
    out_h, out_w = int(call.ty.shape[2]), int(call.ty.shape[3])
    tiles_h, tiles_w = -(-out_h // TILE), -(-out_w // TILE)
    tiles = tiles_h * tiles_w
    if not winograd_pays(in_channels, out_channels, tiles, out_h * out_w, conv_groups):
        return None
    plan = plan_gemm(out_channels // conv_groups, tiles)
    if plan is None:
        return None
    padding = [int(p) for p in call.attrs.padding]
    groups = ALPHA * ALPHA * conv_groups
    columns = -(-tiles // plan.tile) * plan.tile  # whole register tiles: the GEMM pads nothing
    packed = relax.const(pack(transform_weight(weight.value.numpy()), plan.block, groups),
                         "float32")
    v = builder.emit(builder.call_te(
        lambda data: input_transform_te(data, padding, tiles_w, columns), x,
        primfunc_name_hint="rebirth_winograd_input",
        primfunc_attrs={"op_pattern": 8}))  # opaque: never fused into the GEMM
    m = builder.emit(builder.call_te(
        lambda data, kernel: conv_te(data, kernel, ALPHA * ALPHA * out_channels, [1, 1],
                                     [0, 0, 0, 0], [1, 1], plan, groups),
        v, packed, primfunc_name_hint="rebirth_winograd_gemm"))
    return builder.call_te(
        lambda data: output_transform_te(data, out_channels, out_h, out_w, tiles_w), m,
        primfunc_name_hint="rebirth_winograd_output",
        primfunc_attrs={"op_pattern": 4})  # like a conv: takes elementwise epilogues only


def _blocks(sch) -> dict:
    return {sch.get(b).name_hint: b for b in sch.get_child_blocks(sch.get_sblock("root"))}


class WinogradRule(ScheduleRule):
    """dlight rule for the two transform functions of ``winograd_conv``: the input transform
    per channel (after the padded image, the 16 transforms of a tile together, their
    Selects folded by unrolling), the output transform per output channel and tile row
    (the 2x2 outputs of a tile together, the epilogue inlined). None for any other
    function."""

    def is_target_available(self, target) -> bool:
        return target.kind.name == "llvm"

    def apply(self, func, target, tunable):
        from tvm import s_tir, tirx

        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        blocks = _blocks(sch)
        if set(blocks) == {WINO_PAD, WINO_INPUT}:
            return self._input(sch, blocks)
        if WINO_OUTPUT in blocks and self._epilogue_inlinable(sch, blocks):
            return self._output(sch, blocks)
        return None

    @staticmethod
    def _epilogue_inlinable(sch, blocks) -> bool:
        """The output transform comes first and every block after it is spatial over the
        same domain (bias, BN, ReLU, clip: elementwise on its result)."""
        from tvm import tirx

        names = list(blocks)
        if names[0] != WINO_OUTPUT:
            return False
        extents = [int(iv.dom.extent) for iv in sch.get(blocks[WINO_OUTPUT]).iter_vars]
        return all(
            all(int(iv.iter_type) == tirx.IterVar.DataPar for iv in sch.get(rv).iter_vars)
            and [int(iv.dom.extent) for iv in sch.get(rv).iter_vars] == extents
            for rv in blocks.values())

    @staticmethod
    def _input(sch, blocks):
        block = blocks[WINO_INPUT]
        n, gc, o, p = sch.get_loops(block)
        channels = int(sch.get(gc).extent) // (ALPHA * ALPHA)
        g, c = sch.split(gc, [ALPHA * ALPHA, channels])
        sch.reorder(n, c, o, p, g)
        sch.parallel(sch.fuse(n, c))
        sch.unroll(g)
        # the padded image as a whole first: under the channel loop, region analysis would
        # see every channel (the folded Selects index the channel as gc and gc % C)
        pad_loops = sch.get_loops(blocks[WINO_PAD])
        sch.parallel(sch.fuse(*pad_loops[:2]))
        return sch

    @staticmethod
    def _output(sch, blocks):
        out = blocks[WINO_OUTPUT]
        for name in reversed(list(blocks)[1:]):
            sch.reverse_compute_inline(blocks[name])
        n, k, h, w = sch.get_loops(out)
        th, i = sch.split(h, [None, TILE])
        tw, j = sch.split(w, [None, TILE])
        sch.reorder(th, tw, i, j)
        channel = sch.fuse(n, k)
        sch.parallel(channel)
        sch.unroll(i)
        sch.unroll(j)
        return sch
