"""Def-use view of one Relax function, and constant evaluation: what every analysis reads.

``Dataflow(func)`` indexes the bindings of every block (dataflow or not) once: value of each
var, its position, and its readers (``RETURN`` stands for the function's result).
``evaluate_constant`` computes an expression built from constants only (a bias reshape, the
terms of a decomposed BatchNorm) in numpy.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .site import ConvSpec

RETURN = "<return>"  # the reader standing for the function's result
# elementwise ops a per-channel constant can scale or shift a tensor with
AFFINE_OPS = ("relax.multiply", "relax.add", "relax.subtract", "relax.divide")


def op_name(value) -> str | None:
    """``relax.nn.conv2d`` etc. for a call of a Relax op, else None."""
    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
        return value.op.name
    return None


def emit(builder, expr, as_output: bool, name_hint: str = ""):
    """Emit ``expr`` in a mutator's builder: as a dataflow block's output when ``as_output``
    and the builder is inside a dataflow block; a plain binding otherwise (bindings outside
    dataflow blocks, e.g. around an ONNX ``If``, have no outputs to mark)."""
    if as_output and builder.current_block_is_dataflow():
        return builder.emit_output(expr, name_hint=name_hint)
    return builder.emit(expr, name_hint=name_hint)


def ints(values) -> list:
    return [int(v) for v in values]


def shape_of(expr) -> list | None:
    """Static shape of a tensor-typed expression; None when unknown or symbolic."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    values = getattr(ty.shape, "values", None)
    if values is None or not all(isinstance(v, tvm.tirx.IntImm) for v in values):
        return None
    return ints(values)


_BINARY = {
    "relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
    "relax.divide": np.divide, "relax.power": np.power,
}
_UNARY = {"relax.isnan": np.isnan, "relax.sqrt": np.sqrt, "relax.rsqrt": lambda x: 1.0 / np.sqrt(x),
          "relax.negative": np.negative, "relax.exp": np.exp}


def evaluate_constant(expr, var2val) -> np.ndarray:
    """numpy (float64) value of a constant-only expression; ValueError when it is not one."""
    if isinstance(expr, tvm.ir.expr.Constant):
        return expr.value.numpy().astype(np.float64)
    if isinstance(expr, relax.Var):
        if expr not in var2val:
            raise ValueError(f"'{expr.name}' is not a constant")
        return evaluate_constant(var2val[expr], var2val)
    op = op_name(expr)
    if op in _BINARY:
        return _BINARY[op](evaluate_constant(expr.args[0], var2val),
                           evaluate_constant(expr.args[1], var2val))
    if op in _UNARY:
        return _UNARY[op](evaluate_constant(expr.args[0], var2val))
    if op == "relax.where":
        return np.where(*(evaluate_constant(a, var2val) for a in expr.args))
    if op == "relax.reshape":
        return evaluate_constant(expr.args[0], var2val).reshape(ints(expr.args[1].values))
    if op == "relax.expand_dims":
        arr = evaluate_constant(expr.args[0], var2val)
        for axis in sorted(ints(expr.attrs.axis)):
            arr = np.expand_dims(arr, axis)
        return arr
    if op == "relax.squeeze":
        axis = expr.attrs.axis
        return np.squeeze(evaluate_constant(expr.args[0], var2val),
                          axis=None if axis is None else tuple(ints(axis)))
    if op == "relax.permute_dims":
        axes = expr.attrs.axes
        return np.transpose(evaluate_constant(expr.args[0], var2val),
                            None if axes is None else ints(axes))
    if op == "relax.astype":
        return evaluate_constant(expr.args[0], var2val)
    raise ValueError(f"cannot fold {op or type(expr).__name__} in closed form")


class Dataflow:
    """Bindings of one function with def-use edges and constant knowledge.

    Attributes: ``bindings`` (in order), ``value`` (var -> bound value), ``position``
    (var -> index), ``users`` (var -> readers, ``RETURN`` for the result), ``var2val``.
    """

    def __init__(self, func: relax.Function):
        self.var2val = relax.analysis.get_var2val(func)
        self.bindings = [b for block in func.body.blocks for b in block.bindings]
        self.value = {b.var: b.value for b in self.bindings}
        self.position = {b.var: i for i, b in enumerate(self.bindings)}
        self.users = {}
        for b in self.bindings:
            for var in relax.analysis.free_vars(b.value):
                self.users.setdefault(var, []).append(b.var)
        for var in relax.analysis.free_vars(func.body.body):
            self.users.setdefault(var, []).append(RETURN)
        self._const = {}

    def users_of(self, var) -> list:
        return self.users.get(var, [])

    def sole_user(self, var):
        """The one binding reading ``var``, or None (no reader, several, or the result)."""
        users = self.users_of(var)
        return users[0] if len(users) == 1 and users[0] != RETURN else None

    def is_const(self, expr) -> bool:
        """True when ``expr`` is computed from constants only (e.g. reshape of a bias)."""
        if isinstance(expr, (tvm.ir.expr.Constant, relax.ShapeExpr)):
            return True
        if isinstance(expr, relax.Var):
            if expr not in self._const:
                value = self.value.get(expr)
                self._const[expr] = value is not None and self.is_const(value)
            return self._const[expr]
        if isinstance(expr, relax.Call):
            return all(self.is_const(arg) for arg in expr.args)
        if isinstance(expr, relax.Tuple):
            return all(self.is_const(f) for f in expr.fields)
        return False

    def constant(self, expr) -> np.ndarray:
        """numpy value of a constant-only expression (see ``evaluate_constant``)."""
        return evaluate_constant(expr, self.var2val)

    def tuple_fields(self, expr) -> list | None:
        if isinstance(expr, relax.Var) and isinstance(self.value.get(expr), relax.Tuple):
            expr = self.value[expr]
        return list(expr.fields) if isinstance(expr, relax.Tuple) else None

    def per_channel_const(self, expr, channels: int) -> bool:
        """A constant that broadcasts per channel (or a scalar) over an NCHW tensor."""
        if not self.is_const(expr):
            return False
        shape = shape_of(expr)
        if shape is None:
            return False
        while shape and shape[0] == 1 and len(shape) > 3:
            shape = shape[1:]
        return shape in ([], [1], [channels, 1, 1], [1, 1, 1])

    def is_plain_conv(self, var) -> bool:
        """An NCHW/OIHW conv2d without dilation whose weights are constant, static shapes."""
        return op_name(self.value.get(var)) == "relax.nn.conv2d" and \
            self.conv_problem(var) is None

    def conv_problem(self, var) -> str | None:
        """Why conv2d ``var`` is not a plain conv a site can rewrite, or None."""
        call = self.value[var]
        a = call.attrs
        weight = call.args[1]
        if not self.is_const(weight):
            source = self._param_source(weight)
            where = f" (function parameter '{source.name}')" if source is not None else ""
            return (f"its weights are not bound constants{where}: bind them "
                    "(relax.transform.BindParams, or import with keep_params_in_input=False)")
        if a.data_layout != "NCHW" or a.kernel_layout != "OIHW":
            return f"layout {a.data_layout}/{a.kernel_layout} (NCHW/OIHW only)"
        if any(int(d) != 1 for d in a.dilation):
            return "a dilated conv"
        if shape_of(call.args[0]) is None or shape_of(weight) is None:
            return "dynamic shapes"
        return None

    def _param_source(self, expr):
        """The function parameter a non-constant expression reads, if any."""
        seen = [expr]
        while seen:
            e = seen.pop()
            if isinstance(e, relax.Var) and e not in self.value:
                return e
            if isinstance(e, relax.Var):
                seen.append(self.value[e])
            elif isinstance(e, relax.Call):
                seen.extend(e.args)
        return None

    def is_pointwise_conv(self, var) -> bool:
        """A plain 1x1 conv: stride 1, no padding, no groups, reading a var."""
        if not self.is_plain_conv(var):
            return False
        call = self.value[var]
        a = call.attrs
        return (shape_of(call.args[1])[2:] == [1, 1] and all(int(s) == 1 for s in a.strides)
                and not any(int(p) for p in a.padding) and int(a.groups) == 1
                and isinstance(call.args[0], relax.Var))

    def conv_spec(self, var, name: str) -> ConvSpec:
        """The geometry of conv2d ``var`` as a plan records it."""
        call = self.value[var]
        attrs = call.attrs
        wshape = shape_of(call.args[1])
        return ConvSpec(replaces=name, in_channels=wshape[1] * int(attrs.groups),
                        out_channels=wshape[0], kernel=wshape[2:4], stride=ints(attrs.strides),
                        padding=ints(attrs.padding), groups=int(attrs.groups))


@relax.expr_functor.mutator
class RebindValues(relax.PyExprMutator):
    """Re-emits each binding of ``rebind`` ({var: make}) with the value ``make(visit)``
    returns (``visit``: this mutator's ``visit_expr``, for the operands), under the same
    name and kind of var; every other binding as it is, its readers following."""

    def __init__(self, mod, rebind: dict):
        super().__init__(mod)
        self.rebind = rebind

    def visit_var_binding_(self, binding):
        make = self.rebind.get(binding.var)
        if make is None:
            super().visit_var_binding_(binding)
            return
        new = self.builder_.normalize(make(self.visit_expr))
        kind = relax.DataflowVar if isinstance(binding.var, relax.DataflowVar) else relax.Var
        var = kind(binding.var.name, new.ty)
        self.builder_.emit_normalized(relax.VarBinding(var, new))
        self.set_var_remap(binding.var, var)


def with_function(mod: tvm.IRModule, func_name: str, func: relax.Function) -> tvm.IRModule:
    """``mod`` with ``func`` (its unused bindings removed) as ``func_name``, and the
    PrimFuncs nothing calls any more removed."""
    updated = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    updated[func_name] = relax.analysis.remove_all_unused(func)
    return relax.transform.DeadCodeElimination()(updated)
