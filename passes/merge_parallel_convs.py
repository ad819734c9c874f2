"""MergeParallelConvs: 1x1 convs that read the same tensor become one wide conv + split.

Lossless (the plan calls such a merge ``exact``): the wide conv's weights and bias are the
originals stacked along the output channels.

Before (GoogLeNet inception_3a after BranchSlimming: both reducers read the module input)::

    a  = R.nn.conv2d(x, W_3r)           # 1x1, 96 channels
    a2 = R.add(a, b_3r)
    b  = R.nn.conv2d(x, W_5r)           # 1x1, 48 channels
    b2 = R.add(b, b_5r)

After::

    w  = R.nn.conv2d(x, concat([W_3r, W_5r]))      # 1x1, 144 channels
    w2 = R.add(w, concat([b_3r, b_5r]))
    s  = R.split(w2, [96], axis=1)
    a2 = s[0]; b2 = s[1]                 # every reader of a2 / b2 is unchanged
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .dataflow import Dataflow, op_name
from .layers import LrnMatcher, attached_names, layer_names
from .traces import conv_block, conv_block_weights


@relax.expr_functor.mutator
class _MergeRewriter(relax.PyExprMutator):
    def __init__(self, mod, groups):
        super().__init__(mod)
        # first block's end var -> (blocks, W, b, widths); each block's end -> (group, index)
        self.first = {g[0][0].end: g for g in groups}
        self.pieces = {block.end: (id(g), i) for g in groups for i, block in enumerate(g[0])}
        self.splits = {}

    def visit_var_binding_(self, binding):
        if binding.var in self.first:
            blocks, weight, bias, widths = self.first[binding.var]
            data = self.visit_expr(blocks[0].data)
            wide = self.builder_.emit(relax.op.nn.conv2d(data, relax.const(weight)),
                                      name_hint="+".join(b.name for b in blocks))
            wide = self.builder_.emit(relax.op.add(wide, relax.const(bias.reshape(1, -1, 1, 1))))
            cuts = np.cumsum(widths)[:-1].tolist()
            self.splits[id(self.first[binding.var])] = self.builder_.emit(
                relax.op.split(wide, cuts, axis=1))
        if binding.var in self.pieces:
            group, index = self.pieces[binding.var]
            piece = self.builder_.emit(relax.TupleGetItem(self.splits[group], index))
            self.set_var_remap(binding.var, piece)
            return
        super().visit_var_binding_(binding)


@tvm.transform.module_pass(opt_level=0, name="MergeParallelConvs")
class MergeParallelConvs:
    """Merge every group of >= 2 plain 1x1 convs (stride 1, no padding, groups 1, + optional
    per-channel bias) reading the same tensor into one wide conv and a split.

    Parameters
    ----------
    func_name : str
        The function to rewrite.
    """

    def __init__(self, func_name: str = "main"):
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, _ctx=None) -> tvm.IRModule:
        groups = _parallel_groups(mod, self.func_name)
        if not groups:
            return mod
        func = _MergeRewriter(mod, groups).visit_expr(mod[self.func_name])
        func = relax.analysis.remove_all_unused(func)
        updated = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        updated[self.func_name] = func
        return updated


def _parallel_groups(mod, func_name) -> list:
    """[(ConvBlocks, stacked W, stacked b, widths)] of the 1x1 convs sharing an input."""
    graph = Dataflow(mod[func_name])
    names = layer_names(graph, LrnMatcher().match(graph), attached_names(mod))
    groups = []
    for var, users in graph.users.items():
        blocks = [conv_block(graph, names, u) for u in dict.fromkeys(users)
                  if u in graph.value and op_name(graph.value[u]) == "relax.nn.conv2d"
                  and graph.value[u].args[0].same_as(var) and graph.is_pointwise_conv(u)]
        blocks = [b for b in blocks if isinstance(b.end, relax.DataflowVar)]
        if len(blocks) < 2:
            continue
        blocks.sort(key=lambda b: graph.position[b.end])
        weights = [conv_block_weights(graph, b) for b in blocks]
        groups.append((blocks, np.concatenate([w for w, _ in weights]),
                       np.concatenate([b for _, b in weights]),
                       [w.shape[0] for w, _ in weights]))
    return groups
