"""AbsorbPads: an explicit constant pad before a conv or pool becomes that op's own padding.

PyTorch and TF exports often pad explicitly (an ONNX ``Pad`` node: TVM's importer emits it as
``call_tir`` of a ``topi.nn.pad`` PrimFunc; ``R.nn.pad`` when written in Relax). A streamline
chain cannot see through it, and the pad's copy costs time. Where every reader of the padded
tensor can take the padding itself, the pad goes::

    lv  = R.call_tir(pad, (x,), ...)             # H, W padded by 1 with 0.0
    lv1 = R.nn.conv2d(lv, W, padding=[0, 0, 0, 0])
  ->
    lv1 = R.nn.conv2d(x, W, padding=[1, 1, 1, 1])

Exact cases only: a zero pad into conv2d (any) or avg_pool2d with ``count_include_pad``; a
-inf (or lowest-float) pad into max_pool2d. Other pads, modes and layouts stay.
"""

from __future__ import annotations

import functools
import math

import tvm
from tvm import relax, tirx

from .dataflow import RETURN, Dataflow, RebindValues, ints, op_name, shape_of, with_function

_LOWEST = -3.0e38  # a pad value at or below this acts as -inf for a max pool


def pad_amounts(graph: Dataflow, mod: tvm.IRModule, value) -> tuple | None:
    """([top, left, bottom, right], pad value) of an NCHW constant pad of H and W only
    (``R.nn.pad`` or ``call_tir`` of a topi pad PrimFunc), else None."""
    op = op_name(value)
    if op == "relax.nn.pad":
        a = value.attrs
        widths = ints(a.pad_width)
        if str(a.pad_mode) != "constant" or len(widths) != 8 or any(widths[:4]):
            return None
        pad_value = getattr(a, "pad_value", None)
        pad_value = 0.0 if pad_value is None else float(pad_value)
        return [widths[4], widths[6], widths[5], widths[7]], pad_value
    if op != "relax.call_tir" or not isinstance(value.args[0], tvm.ir.GlobalVar):
        return None
    func = mod[value.args[0]]
    args = graph.tuple_fields(value.args[1]) if not isinstance(value.args[1], relax.Var) \
        else [value.args[1]]
    if not isinstance(func, tirx.PrimFunc) or args is None or len(args) != 1 or \
            len(func.params) != 2:
        return None
    in_shape, out_shape = shape_of(args[0]), shape_of(value)
    if in_shape is None or out_shape is None or len(in_shape) != 4:
        return None
    stores = _stores(func.body, [])
    if len(stores) != 1:
        return None
    store = stores[0]
    v = store.value
    if op_name_of(v) not in ("prim.if_then_else", "tirx.if_then_else", "tir.if_then_else"):
        return None
    load, fill = v.args[1], v.args[2]
    if not hasattr(load, "indices") or type(fill).__name__ != "FloatImm":
        return None
    before = []
    for index, out_index in zip(load.indices, store.indices):
        if index.same_as(out_index):
            before.append(0)
        elif type(index).__name__ == "Sub" and index.a.same_as(out_index) and \
                type(index.b).__name__ == "IntImm":
            before.append(int(index.b.value))
        else:
            return None
    after = [o - i - b for o, i, b in zip(out_shape, in_shape, before)]
    if before[:2] != [0, 0] or after[:2] != [0, 0] or min(before + after) < 0:
        return None
    return [before[2], before[3], after[2], after[3]], float(fill.value)


def op_name_of(expr) -> str:
    """The name of a TIR call's op ("" for anything else)."""
    return str(getattr(getattr(expr, "op", None), "name", ""))


def _stores(node, out: list) -> list:
    """Every BufferStore under a PrimFunc body (blocks, loops, sequences)."""
    if isinstance(node, tirx.BufferStore):
        out.append(node)
        return out
    for attr in ("block", "body", "seq"):
        child = getattr(node, attr, None)
        if child is None:
            continue
        for item in (child if not isinstance(child, tirx.Stmt) else [child]):
            _stores(item, out)
    return out


def _takes(value, pad_value: float) -> bool:
    """Whether the op ``value`` can take a ``pad_value`` pad as its own padding, exactly."""
    op = op_name(value)
    if op == "relax.nn.conv2d":
        return pad_value == 0.0 and value.attrs.data_layout == "NCHW"
    if op == "relax.nn.max_pool2d":
        return (math.isinf(pad_value) and pad_value < 0 or pad_value <= _LOWEST) and \
            value.attrs.layout == "NCHW"
    if op == "relax.nn.avg_pool2d":
        return pad_value == 0.0 and bool(value.attrs.count_include_pad) and \
            value.attrs.layout == "NCHW"
    return False


def _with_padding(value, data, pads):
    """``value`` (conv2d or pool) reading ``data`` with ``pads`` added to its padding."""
    a = value.attrs
    padding = [p + q for p, q in zip(ints(a.padding), pads)]
    if op_name(value) == "relax.nn.conv2d":
        return relax.op.nn.conv2d(data, value.args[1], strides=a.strides, padding=padding,
                                  dilation=a.dilation, groups=a.groups,
                                  data_layout=a.data_layout, kernel_layout=a.kernel_layout,
                                  out_layout=a.out_layout, out_dtype=a.out_dtype)
    pool = relax.op.nn.max_pool2d if op_name(value) == "relax.nn.max_pool2d" \
        else relax.op.nn.avg_pool2d
    return pool(data, a.pool_size, a.strides, padding, a.dilation, bool(a.ceil_mode),
                bool(a.count_include_pad), a.layout, a.out_layout)


def _absorbed(reader, data, pads, visit):
    return _with_padding(reader, visit(data), pads)


@tvm.transform.module_pass(opt_level=0, name="AbsorbPads")
class AbsorbPads:
    """Fold explicit constant pads into the convs and pools that read them (see module doc).

    Parameters
    ----------
    func_name : str
        The function to rewrite.
    """

    def __init__(self, func_name: str = "main"):
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, _ctx=None) -> tvm.IRModule:
        func = mod[self.func_name]
        if not isinstance(func, relax.Function):
            return mod
        graph = Dataflow(func)
        absorbed = {}
        for binding in graph.bindings:
            found = pad_amounts(graph, mod, binding.value)
            if found is None:
                continue
            pads, pad_value = found
            readers = graph.users_of(binding.var)
            if not readers or RETURN in readers or not all(
                    _takes(graph.value[r], pad_value) and
                    graph.value[r].args[0].same_as(binding.var) for r in readers):
                continue
            data = binding.value.args[0] if op_name(binding.value) == "relax.nn.pad" else \
                (graph.tuple_fields(binding.value.args[1]) or [binding.value.args[1]])[0]
            for reader in readers:  # the reader, re-emitted on the pad's input
                absorbed[reader] = functools.partial(_absorbed, graph.value[reader], data,
                                                     pads)
        if not absorbed:
            return mod
        return with_function(mod, self.func_name, RebindValues(mod, absorbed).visit_expr(func))
