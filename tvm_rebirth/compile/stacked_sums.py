"""ONNX ``Sum`` as additions, so that a residual add fuses into the conv before it.

TVM's ONNX importer lowers ``Sum(a, b, ...)`` (ResNet's and ShuffleNet's residual joins in
their Caffe2 exports) to a copy of each input, a stack and a reduction: a kernel of its own
that writes and reads the stacked copy, and the ReLU after it is one more kernel::

    Before:  p = R.broadcast_to(a, R.shape(S)); q = R.broadcast_to(b, R.shape(S))
             s = R.stack((p, q), axis=0)
             y = R.sum(s, axis=[0], keepdims=False)
    After:   y = R.add(a, b)

Rewritten only where every stacked input already has the output's shape (a ``broadcast_to``
to its own shape is a copy and is dropped) and the sum runs over the stacked axis alone;
the additions keep the stack's order.
"""

from __future__ import annotations

import tvm
from tvm import relax

from ..passes.dataflow import op_name, shape_of


@relax.expr_functor.mutator
class _SumRewriter(relax.PyExprMutator):
    """One module's rewrite (per-run state: the builder)."""

    def _value(self, expr):
        if isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            return bound if bound is not None else expr
        return expr

    def _addends(self, call) -> list | None:
        """The stacked tensors a ``sum`` adds up, each of the sum's shape, else None."""
        if op_name(call) != "relax.sum" or call.attrs.keepdims or call.attrs.axis is None or \
                len(call.attrs.axis) != 1:
            return None
        stacked = self._value(call.args[0])
        if op_name(stacked) != "relax.stack":
            return None
        rank = len(stacked.ty.shape) if shape_of(stacked) is not None else 0
        if not rank or int(call.attrs.axis[0]) % rank != int(stacked.attrs.axis) % rank:
            return None
        fields = self._value(stacked.args[0])
        if not isinstance(fields, relax.Tuple):
            return None
        shape = shape_of(call)
        addends = []
        for field in fields.fields:
            value = self._value(field)
            if op_name(value) == "relax.broadcast_to" and shape_of(value.args[0]) == shape:
                field = value.args[0]  # a copy to its own shape
            if shape_of(field) != shape:
                return None
            addends.append(field)
        return addends

    def visit_call_(self, call):  # noqa: N802 -- ExprMutator's hook
        call = self.visit_expr_post_order(call)
        addends = self._addends(call)
        if addends is None:
            return call
        total = addends[0]
        for addend in addends[1:-1]:
            total = self.builder_.emit(relax.op.add(total, addend))
        return relax.op.add(total, addends[-1]) if len(addends) > 1 else total


@tvm.transform.module_pass(opt_level=0, name="StackedSumsToAdds")
class StackedSumsToAdds:
    """Rewrite ``sum(stack(...))`` of same-shaped tensors into additions (see the module
    doc); the copies and stacks left unused are removed. Holds no settings."""

    def transform_module(self, mod: tvm.IRModule, _ctx=None) -> tvm.IRModule:
        rewriter = _SumRewriter(mod)
        for gvar, func in mod.functions.items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        return relax.transform.DeadCodeElimination()(rewriter.builder_.finalize())


__all__ = ["StackedSumsToAdds"]
