"""Branch sites: inception modules whose pool branch (and 1x1 branch) can be merged into
wider tensor branches by BranchSlimming.

A branch site is a channel concat of >= 3 private branches forked from one tensor, one of
them a pool -> conv branch. The pool branch goes into the tensor branch with the largest
kernel (it must cover the pool window); a single 1x1 branch, if any, into the deep branch
with the smallest kernel. Reducer widths follow ``branch_widths`` ("carry", "paper", or a
fraction of carry such as "0.75": see ``site.BRANCH_WIDTHS``).
"""

from __future__ import annotations

import dataclasses

from tvm import relax

from .dataflow import AFFINE_OPS, Dataflow, ints, op_name, shape_of
from .find_streamline import Found, Rejection
from .layers import POOL_OPS
from .site import (Absorb, Branch, RebirthSite, branch_conv_layout, branch_groups,
                   width_fraction)
from .traces import BranchTrace, conv_block

# what a receiving branch may be, re-emitted conv by conv: [1x1 reducer (relu) ->] conv (relu)
_RECEIVER_OPS = (["conv2d"], ["conv2d", "relu"], ["conv2d", "conv2d"], ["conv2d", "relu", "conv2d"],
                 ["conv2d", "conv2d", "relu"], ["conv2d", "relu", "conv2d", "relu"])


@dataclasses.dataclass
class _BranchPath:
    """A concat input walked back to the tensor it forks from: (kind, var) from the fork."""

    fork: object
    steps: list

    def vars_of(self, kinds) -> list:
        return [v for kind, v in self.steps if kind in kinds]


class BranchFinder:
    """Finds branch sites in one function (see module doc)."""

    def __init__(self, graph: Dataflow, names: dict, branch_widths: str):
        self.graph, self.names, self.branch_widths = graph, names, branch_widths

    def _path(self, var) -> _BranchPath | None:
        """Walk back from a concat input to the first tensor another op also reads; None
        when the branch holds an op that is not conv, pool, relu, BN or a constant affine."""
        graph = self.graph
        steps = []
        while True:
            value = graph.value.get(var)
            op = op_name(value)
            if op == "relax.nn.conv2d":
                if not graph.is_plain_conv(var):
                    return None
                steps.append(("conv2d", var))
            elif op in POOL_OPS:
                steps.append((POOL_OPS[op], var))
            elif op == "relax.nn.relu":
                steps.append(("relu", var))
            elif isinstance(value, relax.TupleGetItem) and value.index == 0 and op_name(
                    graph.value.get(value.tuple_value)) == "relax.nn.batch_norm" and not bool(
                    graph.value[value.tuple_value].attrs.training):
                var = value.tuple_value
                steps.append(("batch_norm", var))
                value = graph.value[var]
            elif not (op in AFFINE_OPS and graph.is_const(value.args[1])):
                return None
            var = value.args[0]
            if not isinstance(var, relax.Var):
                return None
            if len(graph.users_of(var)) != 1:
                return _BranchPath(var, steps[::-1])

    def _branch(self, path: _BranchPath) -> Branch:
        graph, names = self.graph, self.names
        convs = path.vars_of(("conv2d",))
        pools = path.vars_of(tuple(POOL_OPS.values()))
        conv_names = [names[v] for v in convs]
        return Branch(
            convs=conv_names,
            kernels=[graph.conv_spec(v, n).kernel for v, n in zip(convs, conv_names)],
            out_channels=graph.conv_spec(convs[-1], conv_names[-1]).out_channels,
            pool=names[pools[0]] if pools else None,
            pool_window=ints(graph.value[pools[0]].attrs.pool_size) if pools else None,
            ops=[kind for kind, _ in path.steps])

    def from_concat(self, concat_var) -> Found | Rejection | None:
        graph = self.graph
        value = graph.value[concat_var]
        fields = graph.tuple_fields(value.args[0])
        if not fields or len(fields) < 3 or int(value.attrs.axis) not in (1, -3):
            return None
        if not all(isinstance(f, relax.Var) and len(graph.users_of(f)) == 1 for f in fields):
            return None
        paths = [self._path(f) for f in fields]
        if any(p is None for p in paths) or len({p.fork for p in paths}) != 1:
            return None
        if any(not p.vars_of(("conv2d",)) for p in paths):
            return None
        site_id = self.names[concat_var]
        branches = [self._branch(p) for p in paths]
        conv_vars = {self.names[v]: v for p in paths for v in p.vars_of(("conv2d",))}
        pool_branches = [b for b in branches if b.starts_with_pool]
        if not pool_branches:
            return None
        pool_branch = pool_branches[0]
        receivers = [b for b in branches if b.pool is None and b.ops in _RECEIVER_OPS
                     and (len(b.kernels) == 1 or b.kernels[0] == [1, 1])]
        by_kernel = sorted(receivers, key=lambda b: -max(b.kernels[-1]))
        if not by_kernel or max(by_kernel[0].kernels[-1]) < max(pool_branch.pool_window):
            return Rejection(site_id, "no tensor branch has a kernel covering the "
                                      f"{pool_branch.pool_window} pool window")
        pool_into = by_kernel[0]
        absorb = Absorb(pool_branch=pool_branch.last_conv, pool_into=pool_into.last_conv)
        singles = [b for b in receivers if len(b.convs) == 1 and b is not pool_into
                   and b.kernels[0] == [1, 1]]
        deep = [b for b in receivers if len(b.convs) > 1 and b is not pool_into]
        if singles and deep:
            into = min(deep, key=lambda b: max(b.kernels[-1]))
            absorb.one_by_one, absorb.one_by_one_into = singles[0].last_conv, into.last_conv
        if any(graph.conv_spec(v, n).groups != 1 for n, v in conv_vars.items()):
            return Rejection(site_id, "grouped convs in a branch cannot be widened")
        site = RebirthSite(
            id=site_id, kind="branch", ops=pool_branch.ops + ["concat"],
            layers=[n for b in branches for n in b.convs] + [site_id], old_conv=[],
            new_conv=[], exact=False, input_hw=(shape_of(paths[0].fork) or [0, 0, 0, 0])[2:],
            output_hw=shape_of(concat_var)[2:], branches=branches, absorb=absorb)
        self._widths(site, conv_vars, branches.index(pool_branch))
        trace = BranchTrace(fork=paths[0].fork, concat=concat_var, fields=list(fields),
                            convs={n: conv_block(graph, self.names, v)
                                   for n, v in conv_vars.items()})
        return Found(site, trace)

    def _widths(self, site: RebirthSite, conv_vars: dict, pool_index: int) -> None:
        """Fill ``old_conv``/``new_conv``: each receiver's reducer and last conv, widened."""
        groups = branch_groups(site)
        branches = site.branches
        for name, role, receiver in branch_conv_layout(site, groups):
            spec = self.graph.conv_spec(conv_vars[name], name)
            site.old_conv.append(spec)
            if role == "reducer":
                pool_into_here = pool_index in groups[receiver]
                # "carry": the reducer also carries what the pool branch saw
                carry = spec.out_channels + (branches[pool_index].out_channels
                                             if pool_into_here else 0)
                fraction = width_fraction(self.branch_widths)
                if self.branch_widths == "paper":  # the paper: thin the 3x3 reducer by half
                    width = spec.out_channels if pool_into_here else max(spec.out_channels // 2, 1)
                elif fraction is not None:
                    width = max(1, round(fraction * carry))
                else:
                    width = carry
                new = dataclasses.replace(spec, out_channels=width)
            else:
                width = sum(branches[i].out_channels for i in groups[receiver])
                in_channels = site.new_conv[-1].out_channels if len(
                    branches[receiver].convs) == 2 else spec.in_channels
                new = dataclasses.replace(spec, in_channels=in_channels, out_channels=width)
            site.new_conv.append(new)
        merged = sum(len(covered) - 1 for covered in groups.values())
        site.note = f"{len(branches)} branches -> {len(branches) - merged}"
