"""AttachLayerNames: give the vars of conv/pool/LRN/BN/concat bindings their source layer names.

The ONNX frontend names every binding ``lv<N>``. Right after import the k-th ``conv2d`` is
the k-th ONNX ``Conv`` (the frontend keeps node order), so the names can be attached by
position once; from then on they travel with the vars through later rewrites, and site ids
stay stable however the graph is slimmed::

    lv = R.nn.conv2d(data, W1, strides=[2, 2])          ->  conv1/7x7_s2 = R.nn.conv2d(...)
    lv4 = R.nn.max_pool2d(lv3, [3, 3], strides=[2, 2])  ->  pool1/3x3_s2 = R.nn.max_pool2d(...)

The module attribute ``rebirth_layer_names`` lists every attached name. A kind whose count
differs from the given list is left unnamed (sites then use positions).
"""

from __future__ import annotations

import tvm
from tvm import relax

from .dataflow import Dataflow, emit
from .layers import LAYER_NAMES_ATTR, LrnMatcher, layer_vars


@relax.expr_functor.mutator
class _Renamer(relax.PyExprMutator):
    def __init__(self, mod, names):
        super().__init__(mod)
        self.names = names  # var -> new name

    def visit_var_binding_(self, binding):
        name = self.names.get(binding.var)
        if name is None:
            super().visit_var_binding_(binding)
            return
        value = self.visit_expr(binding.value)
        new = emit(self.builder_, value, not isinstance(binding.var, relax.DataflowVar), name)
        self.set_var_remap(binding.var, new)


@tvm.transform.module_pass(opt_level=0, name="AttachLayerNames")
class AttachLayerNames:
    """Rename layer vars from their source model's layer names.

    Parameters
    ----------
    names : dict
        {kind: [layer names in graph order]} with kinds conv2d, max_pool2d, avg_pool2d, lrn,
        batch_norm, concat (``frontend.loader.onnx_layer_names`` reads them from ONNX).
    func_name : str
        The function to rename in.
    """

    def __init__(self, names: dict, func_name: str = "main"):
        self.names = {k: [str(n) for n in v] for k, v in names.items()}
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, _ctx=None) -> tvm.IRModule:
        func = mod[self.func_name]
        graph = Dataflow(func)
        lrns = LrnMatcher().match(graph)
        renames, attached = {}, []
        for kind, vars_ in layer_vars(graph, lrns).items():
            source = self.names.get(kind, [])
            if len(source) != len(vars_):
                continue
            for var, name in zip(vars_, source):
                renames[var] = name
                attached.append(name)
        func = _Renamer(mod, renames).visit_expr(func)
        updated = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        updated[self.func_name] = func
        return updated.with_attr(LAYER_NAMES_ATTR, sorted(set(attached)))
