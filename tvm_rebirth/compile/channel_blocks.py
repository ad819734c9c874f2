"""Channel-blocked activations between our convs: NCHW[x]c, x = the target's fp32 lanes.

A conv kernel of ``layouts`` keeps a tile of output columns x a block of channels in vector
registers. Written back to NCHW, each register is spread over as many rows (one scalar store
per lane), and a residual or any other epilogue operand is read the same way. In NCHW[x]c
the register is one contiguous store. ``BlockChannels(target)`` (a Relax pass, before
``pack_convs.PackConvWeights``) gives every conv we have a blocked kernel for a channel-blocked
output, and keeps its consumers in that layout as far as they can follow::

    Before:  y = R.nn.conv2d(x, W)                       # NCHW, 64 channels
             z = R.nn.relu(R.add(y, b))                  # b: [1, 64, 1, 1] constant
             p = R.nn.max_pool2d(z, [3, 3], [2, 2])
             q = R.nn.conv2d(p, W2)
             s = R.some_op(q)                            # an op that cannot follow
    After:   y = R.nn.conv2d(x, W, out_layout="NCHW16c")          # [1, 4, H, W, 16]
             z = R.nn.relu(R.add(y, b'))                 # b' = b as [1, 4, 1, 1, 16]
             p = R.nn.max_pool2d(z, [3, 3], [2, 2], layout="NCHW16c", out_layout="NCHW16c")
             q = R.nn.conv2d(p, W2, data_layout="NCHW16c", out_layout="NCHW16c")
             s = R.some_op(R.layout_transform(q, NCHW16c -> NCHW))

What follows the blocked layout: elementwise unary ops, binary ones between blocked tensors of
the same shape or with a per-channel or scalar constant, concatenation along channels, max
and average pooling, and convs (which read NCHW[x]c input when their input channels are
whole blocks, else NCHW). A blocked conv's weights stay OIHW: ``PackConvWeights`` packs them.
Everything else reads an NCHW copy, made once per tensor where first needed (also for the
function's outputs), and a plain tensor that meets a blocked one in a binary op is blocked.

Blocked: a conv ``PackConvWeights`` gives our direct kernel (``conv_blocks``: one group,
output channels a whole number of blocks; Winograd's and the depthwise kernel stay NCHW).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import tvm
from tvm import relax

from ..passes.dataflow import RETURN, Dataflow, op_name, shape_of
from .layouts import blocked_layout, conv_rewrite_applies, vector_unit
from .winograd import winograd_takes

logger = logging.getLogger(__name__)

UNARY_OPS = frozenset({"relax.nn.relu", "relax.clip", "relax.sigmoid", "relax.tanh",
                       "relax.nn.silu", "relax.nn.gelu", "relax.nn.leakyrelu", "relax.exp",
                       "relax.negative", "relax.sqrt", "relax.abs"})
BINARY_OPS = frozenset({"relax.add", "relax.subtract", "relax.multiply", "relax.divide",
                        "relax.maximum", "relax.minimum"})
POOL_OPS = frozenset({"relax.nn.max_pool2d", "relax.nn.avg_pool2d"})
FOLLOWERS = UNARY_OPS | BINARY_OPS | POOL_OPS | {"relax.concat"}  # convs: _reads_blocked


def channel_blocks_enabled() -> bool:
    """TVM_REBIRTH_CHANNEL_BLOCKS=0 keeps every activation NCHW (our convs then write NCHW)."""
    return os.environ.get("TVM_REBIRTH_CHANNEL_BLOCKS", "1") != "0"


def _direct_conv(call) -> bool:
    """A conv ``PackConvWeights`` gives our direct kernel, of one group: the convs that can
    read or write NCHW[x]c."""
    return op_name(call) == "relax.nn.conv2d" and conv_rewrite_applies(call) and \
        int(call.attrs.groups) == 1 and not winograd_takes(call)


def conv_blocks(call, lanes: int) -> bool:
    """Whether the conv ``call`` can write NCHW[x]c: a ``_direct_conv`` whose output
    channels are whole blocks of ``lanes``."""
    return _direct_conv(call) and int(call.args[1].value.shape[0]) % lanes == 0


def _channel_constant(expr, channels: int) -> np.ndarray | None:
    """A constant's values as a [1, C, 1, 1]-broadcast of ``channels`` values, None when it
    is not per-channel ([1, C, 1, 1] or [C, 1, 1])."""
    if not isinstance(expr, tvm.ir.expr.GenericConst) or shape_of(expr) not in (
            [1, channels, 1, 1], [channels, 1, 1]):
        return None
    return expr.value.numpy().reshape(channels)


def _conv_in_layouts(call, data, data_layout: str, out_layout: str):
    """The conv ``call`` (one group, OIHW weights) on ``data`` in ``data_layout``, writing
    ``out_layout``."""
    attrs = call.attrs
    return relax.op.nn.conv2d(data, call.args[1], strides=attrs.strides, padding=attrs.padding,
                              dilation=attrs.dilation, groups=1, data_layout=data_layout,
                              kernel_layout="OIHW", out_layout=out_layout)


def _scalar_constant(expr) -> bool:
    """A constant of one element (shape (), [1], [1, 1, 1, 1], ...): broadcasts over NCHW[x]c
    as over NCHW."""
    shape = shape_of(expr) if isinstance(expr, tvm.ir.expr.GenericConst) else None
    return shape is not None and len(shape) <= 4 and int(np.prod(shape)) == 1


@relax.expr_functor.mutator
class _Blocker(relax.PyExprMutator):
    """One module's rewrite. Per-run state: ``blocked`` (an original tensor variable -> its
    NCHW[x]c variable) and ``plain`` (an original variable whose NCHW copy was made)."""

    def __init__(self, mod, lanes: int):
        super().__init__(mod)
        self.lanes = lanes
        self.layout = blocked_layout(lanes)
        self.blocked: dict = {}
        self.plain: set = set()
        self.copies = 0
        self.graph: Dataflow | None = None  # the function's def-use edges, set per function
        self._pays_memo: dict = {}

    # -- which tensors are worth blocking ---------------------------------------------------
    def _reads_blocked(self, call) -> bool:
        """A conv whose input can be NCHW[x]c: our direct kernel, one group, input channels
        whole blocks."""
        return _direct_conv(call) and self._blockable(call.args[0])

    def _pays(self, var) -> bool:
        """Whether a blocked ``var`` reaches a conv that reads it blocked through ops that
        follow the layout (else its consumers would only copy it back to NCHW)."""
        if var not in self._pays_memo:
            self._pays_memo[var] = False  # no cycles in a dataflow block; guards recursion
            self._pays_memo[var] = any(
                self._reads_blocked(self.graph.value[reader]) or (
                    op_name(self.graph.value[reader]) in FOLLOWERS and
                    isinstance(reader, relax.DataflowVar) and self._pays(reader))
                for reader in self.graph.users_of(var) if reader is not RETURN)
        return self._pays_memo[var]

    # -- layout transforms -------------------------------------------------------------
    def _unblock(self, var):
        """The NCHW copy of a blocked tensor, made once, where first needed."""
        if var not in self.plain:
            lanes = self.lanes
            copy = self.builder_.emit(relax.op.layout_transform(
                self.blocked[var], index_map=lambda n, c, h, w, lane: (n, c * lanes + lane, h, w)))
            self.set_var_remap(var, copy)
            self.plain.add(var)
            self.copies += 1

    def _block(self, expr):
        lanes = self.lanes
        self.copies += 1
        return self.builder_.emit(relax.op.layout_transform(
            expr, index_map=lambda n, c, h, w: (n, c // lanes, h, w, c % lanes)))

    def _blockable(self, expr) -> bool:
        shape = shape_of(expr)
        return shape is not None and len(shape) == 4 and shape[1] % self.lanes == 0 and \
            str(expr.ty.dtype) == "float32"

    # -- the rewrite of one binding ------------------------------------------------------
    def _blocked_value(self, value):
        """The NCHW[x]c form of a binding's value, or None when it does not follow."""
        name = op_name(value)
        args = list(value.args) if name else []
        if name == "relax.nn.conv2d" and conv_blocks(value, self.lanes):
            data = args[0]
            if data in self.blocked:
                data, data_layout = self.blocked[data], self.layout
            else:
                data, data_layout = self.visit_expr(data), "NCHW"
            return _conv_in_layouts(value, data, data_layout, self.layout)
        if name in UNARY_OPS and args[0] in self.blocked:
            return relax.Call(value.op, [self.blocked[args[0]], *args[1:]], value.attrs)
        if name in BINARY_OPS:
            return self._blocked_binary(value, args)
        if name in POOL_OPS and args[0] in self.blocked:
            return self._blocked_pool(value, self.blocked[args[0]])
        if name == "relax.concat" and int(value.attrs.axis) in (1, -3) and \
                isinstance(args[0], relax.Tuple):
            return self._blocked_concat(args[0].fields)
        return None

    def _blocked_concat(self, fields):
        """Blocked when one of the tensors is, and every other one has whole blocks (it is
        blocked for the concat: one copy, instead of copying the blocked ones back)."""
        if not any(f in self.blocked for f in fields) or \
                not all(f in self.blocked or self._blockable(f) for f in fields):
            return None
        return relax.op.concat([self.blocked[f] if f in self.blocked
                                else self._block(self.visit_expr(f)) for f in fields], axis=1)

    def _blocked_binary(self, value, args):
        if not any(a in self.blocked for a in args) or not self._blockable(value):
            return None
        shape = shape_of(value)
        operands = []
        for arg in args:
            if arg in self.blocked:
                if shape_of(arg) != shape:
                    return None
                operands.append(self.blocked[arg])
                continue
            values = _channel_constant(arg, shape[1])
            if values is not None:
                blocks = values.reshape(1, shape[1] // self.lanes, 1, 1, self.lanes)
                operands.append(relax.const(np.ascontiguousarray(blocks), arg.ty.dtype))
            elif _scalar_constant(arg):
                operands.append(arg)
            elif shape_of(arg) == shape and self._blockable(arg):
                operands.append(self._block(self.visit_expr(arg)))
            else:
                return None
        return relax.Call(value.op, operands, value.attrs)

    def _blocked_pool(self, value, data):
        attrs = value.attrs
        if (attrs.layout, attrs.out_layout) != ("NCHW", "NCHW"):
            return None
        common = dict(pool_size=attrs.pool_size, strides=attrs.strides,
                      padding=attrs.padding, dilation=attrs.dilation,
                      ceil_mode=attrs.ceil_mode, layout=self.layout, out_layout=self.layout)
        if op_name(value) == "relax.nn.max_pool2d":
            return relax.op.nn.max_pool2d(data, **common)
        return relax.op.nn.avg_pool2d(data, count_include_pad=attrs.count_include_pad,
                                      **common)

    def _conv_of_blocked(self, value):
        """A conv reading a blocked tensor with NCHW output, or None."""
        if not self._reads_blocked(value) or value.args[0] not in self.blocked:
            return None
        return _conv_in_layouts(value, self.blocked[value.args[0]], self.layout, "NCHW")

    def visit_var_binding_(self, binding):  # noqa: N802 -- ExprMutator's hook
        var = binding.var
        if isinstance(var, relax.DataflowVar):
            blocked = self._blocked_value(binding.value) \
                if self._blockable(var) and self._pays(var) else None
            if blocked is not None:
                self.blocked[var] = self.builder_.emit(blocked)
                return
            plain = self._conv_of_blocked(binding.value)
            if plain is not None:
                self.set_var_remap(var, self.builder_.emit(plain))
                return
        for var in relax.analysis.free_vars(binding.value):
            if var in self.blocked:
                self._unblock(var)
        super().visit_var_binding_(binding)


@tvm.transform.module_pass(opt_level=0, name="BlockChannels")
class BlockChannels:
    """Put the convs we have a blocked kernel for, and what follows them, into NCHW[x]c
    (see the module doc). Settings: the target's vector lanes (none: the pass is a no-op)."""

    def __init__(self, target):
        unit = vector_unit(target)
        # AArch64's 1x1 kernel reads NCHW rows as vectors (FMLA by element): blocked input
        # would take that away, so NCHW[x]c is for targets that broadcast inputs
        self.lanes = unit.lanes if unit is not None and not unit.fma_by_element else None

    def transform_module(self, mod: tvm.IRModule, _ctx=None) -> tvm.IRModule:
        if self.lanes is None:
            return mod
        blocker = _Blocker(mod, self.lanes)
        for gvar, func in mod.functions.items():
            if isinstance(func, relax.Function):
                blocker.graph = Dataflow(func)
                blocker.builder_.update_func(gvar, blocker.visit_expr(func))
        if blocker.blocked:
            logger.debug(f"[BlockChannels] {len(blocker.blocked)} tensors in "
                         f"{blocker.layout}, {blocker.copies} layout copies")
        return blocker.builder_.finalize()


__all__ = ["BlockChannels", "channel_blocks_enabled", "conv_blocks"]
