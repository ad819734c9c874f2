"""LiftClips: ONNX ``Clip`` (ReLU6 and friends) back into ``R.clip``, so chains see it.

TVM's ONNX importer emits ``Clip(x, lo, hi)`` as already-lowered PrimFuncs:
``call_tir(maximum, (x, lo))`` then ``call_tir(minimum, (., hi))`` with NaN-guarded scalar
constants. A chain cannot see an activation through ``call_tir``; this pass gives it back::

    lv5 = R.call_tir(maximum, (lv4, lv3), ...)      # lv3 = where(isnan(0.0), -inf, 0.0)
    lv8 = R.call_tir(minimum, (lv5, lv7), ...)      # lv7 = ... 6.0
  ->
    lv8 = R.clip(lv4, 0.0, 6.0)

Only elementwise max/min of a tensor with a constant scalar are lifted (a PrimFunc whose one
store is ``max(A[i], c[()])`` or ``min``); a max directly followed by a min becomes one clip.
"""

from __future__ import annotations

import functools
import math

import tvm
from tvm import relax, tirx

from .dataflow import Dataflow, RebindValues, op_name, shape_of, with_function


def _bound(graph: Dataflow, mod, value):
    """("max" | "min", tensor, scalar) of a call_tir computing max(x, c) / min(x, c) with a
    constant scalar c, else None."""
    if op_name(value) != "relax.call_tir" or not isinstance(value.args[0], tvm.ir.GlobalVar):
        return None
    func = mod[value.args[0]]
    args = graph.tuple_fields(value.args[1])
    if not isinstance(func, tirx.PrimFunc) or args is None or len(args) != 2:
        return None
    x, c = args
    if shape_of(x) is None or shape_of(x) != shape_of(value) or shape_of(c) != [] or \
            not graph.is_const(c):
        return None
    stores = []

    def visit(node):
        if isinstance(node, tirx.BufferStore):
            stores.append(node)
            return
        for attr in ("block", "body", "seq"):
            child = getattr(node, attr, None)
            if child is not None:
                for item in (child if not isinstance(child, tirx.Stmt) else [child]):
                    visit(item)

    visit(func.body)
    if len(stores) != 1 or type(stores[0].value).__name__ not in ("Max", "Min"):
        return None
    expr = stores[0].value
    if not hasattr(expr.a, "indices") or not hasattr(expr.b, "indices") or len(expr.b.indices):
        return None
    try:
        scalar = float(graph.constant(c))
    except ValueError:
        return None
    return ("max" if type(expr).__name__ == "Max" else "min"), x, scalar


def _clip(x, lo, hi, visit):
    return relax.op.clip(visit(x), lo, hi)


@tvm.transform.module_pass(opt_level=0, name="LiftClips")
class LiftClips:
    """Turn call_tir max/min with a constant scalar into ``R.clip`` (see module doc).

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
        clips = {}
        for binding in graph.bindings:
            found = _bound(graph, mod, binding.value)
            if found is None:
                continue
            kind, x, c = found
            lo, hi = (c, math.inf) if kind == "max" else (-math.inf, c)
            inner = clips.get(x)
            if inner is not None and len(graph.users_of(x)) == 1:
                x, lo, hi = inner[0], max(lo, inner[1]), min(hi, inner[2])
            clips[binding.var] = (x, lo, hi)
        if not clips:
            return mod
        rebind = {var: functools.partial(_clip, *entry) for var, entry in clips.items()}
        return with_function(mod, self.func_name, RebindValues(mod, rebind).visit_expr(func))
