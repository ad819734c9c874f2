"""A site's block as a module of its own: what the planner compiles and measures per variant.

    groups = site_groups(analysis)                # [[site id, ...]]: sites costed together
    block = site_block(analysis, ["conv2/3x3+conv2/norm2+pool2/3x3_s2"])
    # block["main"](site input(s)) -> the site's output, the model's weights bound

Before (a slice of the model)::

    lv3 = R.nn.conv2d(lv2, W)           # conv2/3x3
    lv4 = R.nn.relu(lv3)
    lv5 = R.nn.max_pool2d(lv4, [3, 3])  # pool2/3x3_s2

After (``site_block``)::

    @R.function
    def main(lv2: R.Tensor((1, 64, 56, 56))):
        "conv2/3x3" = R.nn.conv2d(lv2, W)
        ...
        return "pool2/3x3_s2"

Layer vars are named by their layer names and listed in the block's ``rebirth_layer_names``
attribute, so ``analyze_sites`` on the block finds the same site ids and the slimming passes
apply the model's plan to it unchanged. Sites whose rewrites touch a common conv (a pool after
an inception module folded into that module's convs, and the module's branch site) only
make sense together: ``site_groups`` puts them in one group and one block.
"""

from __future__ import annotations

import tvm
from tvm import relax

from .analysis import SiteAnalysis
from .dataflow import Dataflow
from .layers import LAYER_NAMES_ATTR, LrnMatcher, attached_names, layer_names
from .traces import BranchTrace


def _ends(analysis: SiteAnalysis, site_id: str) -> tuple:
    """(input vars, output var) of a site's block."""
    trace = analysis.trace(site_id)
    if isinstance(trace, BranchTrace):
        return [trace.fork], trace.concat
    return list(trace.inputs), trace.end


def _region(graph: Dataflow, inputs, output) -> set:
    """The bindings ``output`` is computed by, back to ``inputs`` (or function parameters)."""
    stop, region, todo = set(inputs), set(), [output]
    while todo:
        var = todo.pop()
        if var in stop or var in region or var not in graph.value:
            continue
        region.add(var)
        todo.extend(relax.analysis.free_vars(graph.value[var]))
    return region


def _rewritten_convs(analysis: SiteAnalysis, site_id: str) -> set:
    return {c.replaces for c in analysis.site(site_id).old_conv}


def site_groups(analysis: SiteAnalysis) -> list:
    """[[site id, ...]] in binding order: sites whose rewrites share a conv are one group."""
    groups = []
    for site in analysis.sites:
        convs = _rewritten_convs(analysis, site.id)
        joined = [g for g in groups if any(convs & _rewritten_convs(analysis, s) for s in g)]
        merged = [s for g in joined for s in g] + [site.id]
        groups = [g for g in groups if g not in joined] + [merged]
    order = {s.id: i for i, s in enumerate(analysis.sites)}
    return sorted((sorted(g, key=order.get) for g in groups), key=lambda g: order[g[0]])


@relax.expr_functor.mutator
class _Substitute(relax.PyExprMutator):
    """Replaces vars by the block's own (parameters and re-emitted bindings)."""

    def __init__(self, mapping: dict):
        super().__init__()
        self.mapping = mapping

    def visit_var_(self, var):
        return self.mapping.get(var, var)

    def visit_dataflow_var_(self, var):
        return self.mapping.get(var, var)


def site_block(analysis: SiteAnalysis, site_ids) -> tvm.IRModule:
    """The block of ``site_ids`` (one group of ``site_groups``) as ``main(inputs) -> output``
    of a new module: the bindings between the sites' inputs and outputs, in model order."""
    graph = analysis.graph
    region, inputs, outputs = set(), [], []
    for site_id in site_ids:
        ins, out = _ends(analysis, site_id)
        region |= _region(graph, ins, out)
        inputs += [v for v in ins if v not in inputs]
        outputs.append(out)
    inputs = [v for v in inputs if v not in region]
    inputs += sorted({v for b in region for v in relax.analysis.free_vars(graph.value[b])
                      if v not in region and v not in inputs}, key=lambda v: v.name)
    read_inside = {v for b in region for v in relax.analysis.free_vars(graph.value[b])}
    outputs = [v for v in dict.fromkeys(outputs) if v not in read_inside]
    names = layer_names(graph, LrnMatcher().match(graph), attached_names(analysis.mod))
    params = [relax.Var(v.name, v.ty) for v in inputs]
    mapping = dict(zip(inputs, params))
    substitute = _Substitute(mapping)
    builder = relax.BlockBuilder()
    with builder.function("main", params):
        with builder.dataflow():
            for binding in graph.bindings:
                if binding.var not in region:
                    continue
                name = names.get(binding.var, binding.var.name)
                value = substitute.visit_expr(binding.value)
                if binding.var in outputs:
                    mapping[binding.var] = builder.emit_output(value, name_hint=name)
                else:
                    mapping[binding.var] = builder.emit(value, name_hint=name)
        result = [mapping[v] for v in outputs]
        builder.emit_func_output(result[0] if len(result) == 1 else relax.Tuple(result))
    block = builder.get()
    for key, value in (analysis.mod.attrs or {}).items():
        block = block.with_attr(key, value)
    return block.with_attr(LAYER_NAMES_ATTR, sorted({names[v] for v in region if v in names}))
