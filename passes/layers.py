"""Which bindings are layers of the source model: LRN subgraphs, layer kinds, layer names.

Relax has no LRN op: the ONNX frontend decomposes LRN into
``x / power(add(multiply(squeeze(avg_pool3d(expand_dims(x * x))), alpha), bias), beta)``.
``LrnMatcher`` recognises that subgraph with ``tvm.relax.dpl`` (before legalization).
``layer_vars`` lists the vars that carry source layer names (conv2d, pools, LRN outputs,
BatchNorm, concat), and ``layer_names`` names them: the source name AttachLayerNames gave a
var, else ``<kind>_<position>``.
"""

from __future__ import annotations

import dataclasses

from tvm.relax.dpl import is_const, is_op, wildcard

from .dataflow import RETURN, Dataflow, op_name

POOL_OPS = {"relax.nn.max_pool2d": "max_pool2d", "relax.nn.avg_pool2d": "avg_pool2d"}
LAYER_KINDS = {"relax.nn.conv2d": "conv2d", "relax.nn.batch_norm": "batch_norm",
               "relax.concat": "concat", **POOL_OPS}
LAYER_NAMES_ATTR = "rebirth_layer_names"  # module attribute listing attached source names


@dataclasses.dataclass(frozen=True)
class Lrn:
    """One decomposed LRN: its output var and the two bindings that read its input."""

    out: object
    reads: frozenset  # the square and the final divide


class LrnMatcher:
    """Finds the ONNX frontend's LRN decomposition in a function's dataflow."""

    def __init__(self):
        self._input = wildcard()
        square = is_op("relax.multiply")(self._input, self._input)
        window_sum = is_op("relax.squeeze")(
            is_op("relax.nn.avg_pool3d")(is_op("relax.expand_dims")(square)))
        scaled = is_op("relax.add")(is_op("relax.multiply")(window_sum, is_const()), is_const())
        self._pattern = is_op("relax.divide")(
            self._input, is_op("relax.power")(scaled, is_const()))

    def match(self, graph: Dataflow) -> dict:
        """{LRN input var: Lrn} of every LRN in ``graph``."""
        lrns = {}
        for binding in graph.bindings:
            if op_name(binding.value) != "relax.divide":
                continue
            if not self._pattern.match(binding.value, var2val=graph.var2val):
                continue
            x = binding.value.args[0]  # the pattern resolves vars to values; keep the var
            square = [u for u in graph.users_of(x) if u != RETURN and op_name(
                graph.value[u]) == "relax.multiply" and all(
                    a.same_as(x) for a in graph.value[u].args)]
            if square:  # LRN reads x twice (square, divide); a third reader is a fan-out
                lrns[x] = Lrn(out=binding.var, reads=frozenset({binding.var, square[0]}))
        return lrns


def layer_vars(graph: Dataflow, lrns: dict) -> dict:
    """{layer kind: [vars in binding order]} for the ops that carry source layer names."""
    order = {}
    for binding in graph.bindings:
        kind = LAYER_KINDS.get(op_name(binding.value))
        if kind:
            order.setdefault(kind, []).append(binding.var)
    order["lrn"] = sorted((lrn.out for lrn in lrns.values()), key=lambda v: graph.position[v])
    return order


def attached_names(mod) -> set:
    """The source layer names AttachLayerNames recorded on ``mod``."""
    if mod.attrs is None or LAYER_NAMES_ATTR not in mod.attrs:
        return set()
    return {str(n) for n in mod.attrs[LAYER_NAMES_ATTR]}


def layer_names(graph: Dataflow, lrns: dict, names: set) -> dict:
    """var -> layer name: the var's own name where it is a source layer name, else
    ``<kind>_<position>``."""
    table = {}
    for kind, vars_ in layer_vars(graph, lrns).items():
        for i, var in enumerate(vars_):
            table[var] = str(var.name) if str(var.name) in names else f"{kind}_{i}"
    return table
