"""Where a site sits in the function: the vars the slimming passes rewrite and the fine-tune
stage captures. Produced by the site finders, read through ``SiteAnalysis``."""

from __future__ import annotations

import dataclasses

import numpy as np

from .dataflow import RETURN, Dataflow, ints, op_name, shape_of
from .layers import POOL_OPS


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    """A pool between a site's output and a conv reading it (keyword arguments of
    ``learn.fit.pool_forward`` via ``dataclasses.asdict``)."""

    kind: str
    pool_size: list
    strides: list
    padding: list
    ceil_mode: bool
    count_include_pad: bool


@dataclasses.dataclass
class ConvBlock:
    """A conv (+ bias) (+ relu): a consumer of a site's output, or a branch conv."""

    name: str     # source layer name
    conv: object  # the conv2d var
    data: object  # its data input
    end: object   # the bias-add var (or the conv var without bias): what a refit replaces
    out: object   # the relu var when a relu follows, else ``end``: the refit's target
    relu: bool
    pools: list = dataclasses.field(default_factory=list)  # PoolSpecs between site and conv


@dataclasses.dataclass(frozen=True)
class Step:
    """One op a streamline chain passes after its conv(s): ``kind`` is a plan op kind
    ("relu", "max_pool2d", "lrn", "batch_norm", "scale", ...) or "bias" for the bias add."""

    kind: str
    var: object


@dataclasses.dataclass
class StreamlineTrace:
    """A streamline site in the function."""

    convs: list   # conv2d vars, one per rebirth conv (same order as site.new_conv)
    inputs: list  # each conv's data input
    relu: list    # whether each rebirth conv is followed by a ReLU (or a ReLU-like clip)
    steps: list   # Step of every op after the conv(s)
    end: object   # the var whose value the rebirth conv(s) replace
    # convs reading the site's output (directly or through pools): the fine-tune stage may
    # refit them to absorb the site's residual error
    consumers: list = dataclasses.field(default_factory=list)
    # per conv: the activation call it re-applies (R.nn.prelu(x, alpha), R.clip(...), ...)
    # with its data argument replaced, or None (a ReLU when ``relu``, else nothing)
    activation: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class BranchTrace:
    """A branch site in the function: the tensor its branches fork from, the concat joining
    them, and every conv of the branches that BranchSlimming re-emits."""

    fork: object
    concat: object
    fields: list  # the concat's inputs, one per branch (site.branches order)
    convs: dict   # layer name -> ConvBlock


def pool_spec(call) -> PoolSpec:
    a = call.attrs
    return PoolSpec(kind=POOL_OPS[op_name(call)], pool_size=ints(a.pool_size),
                    strides=ints(a.strides), padding=ints(a.padding),
                    ceil_mode=bool(a.ceil_mode),
                    count_include_pad=bool(getattr(a, "count_include_pad", False)))


def conv_block(graph: Dataflow, names: dict, conv, pools=()) -> ConvBlock:
    """The conv ``conv`` with the per-channel bias add and the ReLU that follow it alone."""
    end = conv
    user = graph.sole_user(conv)
    if user is not None:
        value = graph.value[user]
        if op_name(value) == "relax.add" and value.args[0].same_as(conv) and \
                graph.per_channel_const(value.args[1], shape_of(conv)[1]):
            end = user
    out = end
    user = graph.sole_user(end)
    if user is not None and op_name(graph.value[user]) == "relax.nn.relu":
        out = user
    return ConvBlock(name=names[conv], conv=conv, data=graph.value[conv].args[0], end=end,
                     out=out, relu=not out.same_as(end), pools=list(pools))


def consumer_convs(graph: Dataflow, names: dict, end) -> list:
    """Plain convs reading ``end`` directly or through NCHW pools, as ConvBlocks."""
    found, frontier, seen = [], [(end, [])], set()
    while frontier:
        var, pools = frontier.pop(0)
        for user in graph.users_of(var):
            if user == RETURN or user in seen:
                continue
            seen.add(user)
            value = graph.value[user]
            op = op_name(value)
            if op in POOL_OPS and value.attrs.layout == "NCHW":
                frontier.append((user, pools + [pool_spec(value)]))
            elif op == "relax.nn.conv2d" and value.args[0].same_as(var) and \
                    graph.is_plain_conv(user):
                found.append(conv_block(graph, names, user, pools))
    return found


def conv_block_weights(graph: Dataflow, block: ConvBlock) -> tuple:
    """(W [OIHW], b [O]) float32 of a ConvBlock as the module computes it: its bias add
    folded in, a scalar bias spread over the channels."""
    weight = graph.constant(graph.value[block.conv].args[1])
    bias = np.zeros(weight.shape[0])
    if not block.end.same_as(block.conv):
        bias = np.broadcast_to(graph.constant(graph.value[block.end].args[1]).reshape(-1),
                               (weight.shape[0],))
    return weight.astype("float32"), bias.astype("float32")
