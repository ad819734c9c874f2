"""Powers with a quarter-integer constant exponent as square roots (LRN's ``power(., 0.75)``).

TVM's ONNX importer lowers LRN to ``x / power(bias + alpha * mean(x^2), beta)``; with the usual
beta = 0.75 that ``power`` becomes a scalar ``powf`` call per element, nearly all of LRN's cost.
For an exponent k/4 (0 < k <= 8) and a non-negative base, ``x^(k/4)`` is a product of
``sqrt(x)`` and ``sqrt(sqrt(x))`` factors, which vectorise (one ``fsqrt``/``vsqrtps``)::

    Before:  y = R.power(s, R.const(0.75, "float32"))
    After:   r = R.sqrt(s); q = R.sqrt(r); y = R.multiply(r, q)

Only rewritten where the base is provably non-negative: LRN's ``add(multiply(mean of
squares, alpha >= 0), bias >= 0)``, checked on the constants. Results agree with ``powf``
to a few float32 ulps.
"""

from __future__ import annotations

import tvm
from tvm import relax


def _scalar(expr) -> float | None:
    if isinstance(expr, tvm.ir.expr.Constant) and expr.value.numpy().size == 1:
        return float(expr.value.numpy().reshape(-1)[0])
    return None


@relax.expr_functor.mutator
class _RootRewriter(relax.PyExprMutator):
    """One function's rewrite; ``var2val`` of the function as it was before."""

    def __init__(self, mod, func):
        super().__init__(mod)
        self.var2val = relax.analysis.get_var2val(func)

    def _value(self, expr):
        return self.var2val.get(expr, expr) if isinstance(expr, relax.Var) else expr

    def _non_negative(self, expr, depth=0) -> bool:
        """Provably >= 0: a square, a mean/avg-pool/squeeze/expand_dims of one, or a sum /
        product of such terms with non-negative constants."""
        value = self._value(expr)
        constant = _scalar(value)
        if constant is not None:
            return constant >= 0
        if depth > 8 or not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            return False
        op, args = value.op.name, value.args
        if op == "relax.multiply" and args[0].same_as(args[1]):
            return True  # x * x
        if op in ("relax.multiply", "relax.add"):
            return all(self._non_negative(a, depth + 1) for a in args)
        if op in ("relax.nn.avg_pool3d", "relax.nn.avg_pool2d", "relax.squeeze",
                  "relax.expand_dims", "relax.mean", "relax.sqrt", "relax.nn.relu"):
            return op in ("relax.sqrt", "relax.nn.relu") or self._non_negative(args[0], depth + 1)
        return False

    def _quarters(self, call) -> int | None:
        """k of a ``power(x, k/4)`` this pass rewrites, else None."""
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.power"):
            return None
        exponent = _scalar(self._value(call.args[1]))
        if exponent is None or not self._non_negative(call.args[0]):
            return None
        quarters = exponent * 4
        return int(round(quarters)) if quarters == round(quarters) and 0 < quarters <= 8 \
            else None

    def visit_call_(self, call):
        quarters = self._quarters(call)
        if quarters is None:
            return super().visit_call_(call)
        base = self.visit_expr(call.args[0])
        if quarters == 2:
            return relax.op.sqrt(base)
        root = self.builder_.emit(relax.op.sqrt(base))
        # x^(k/4) = sqrt(x)^(k // 2) * sqrt(sqrt(x))^(k % 2); the last product is the binding
        factors = [root] * (quarters // 2) + ([relax.op.sqrt(root)] if quarters % 2 else [])
        if len(factors) == 1:
            return factors[0]
        result = factors[0]
        for factor in factors[1:-1]:
            result = self.builder_.emit(relax.op.multiply(result, factor))
        last = factors[-1]
        if quarters % 2 and len(factors) > 1:
            last = self.builder_.emit(last)
        return relax.op.multiply(result, last)


@tvm.transform.module_pass(opt_level=0, name="PowerToRoots")
class PowerToRoots:
    """Rewrite ``power(x, k/4)`` with a provably non-negative ``x`` into square roots (see
    the module doc). Holds no settings."""

    def transform_module(self, mod: tvm.IRModule, _ctx=None) -> tvm.IRModule:
        updated = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        for gvar, func in mod.functions.items():
            if isinstance(func, relax.Function):
                updated[gvar] = _RootRewriter(mod, func).visit_expr(func)
        return updated


__all__ = ["PowerToRoots"]
