"""Streamline sites: a conv (+ bias) followed by non-tensor layers, and a stride-2 pool after
an inception concat, each to become strided rebirth conv(s).

A chain runs from a conv through bias, ReLU, max/avg pool, LRN, BatchNorm and per-channel
scale ops in any order, never across a tensor another op also reads::

    lv  = R.nn.conv2d(x, W, strides=[2, 2], padding=[3, 3, 3, 3])
    lv2 = R.add(lv, b)                      # bias
    lv3 = R.nn.relu(lv2)
    lv4 = R.nn.max_pool2d(lv3, [3, 3], strides=[2, 2])
    lv5 ... lv12 = <LRN: multiply, expand_dims, avg_pool3d, squeeze, ..., divide>

is the site ``conv1/7x7_s2+pool1/3x3_s2+pool1/norm1`` with ops
["conv2d", "relu", "max_pool2d", "lrn"] and (keep-kernel policy) a new 7x7/s4 conv.
"""

from __future__ import annotations

import dataclasses

from tvm import relax

from .dataflow import AFFINE_OPS, RETURN, Dataflow, ints, op_name, shape_of
from .layers import POOL_OPS
from .site import (ACTIVATIONS, LINEAR_OPS, NON_TENSOR_OPS, RELU_LIKE, ConvSpec, RebirthSite,
                   Window, rebirth_geometry)
from .traces import Step, StreamlineTrace, consumer_convs


# Relax op -> the activation kind a plan's ops list records
_ACTIVATION_OPS = {"relax.nn.relu": "relu", "relax.nn.prelu": "prelu",
                   "relax.nn.leakyrelu": "leaky_relu", "relax.clip": "clip",
                   "relax.nn.relu6": "relu6"}


@dataclasses.dataclass
class Found:
    """A site and where it sits."""

    site: RebirthSite
    trace: object


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A block that looks like a site but cannot be slimmed, and why."""

    id: str
    reason: str


@dataclasses.dataclass
class _ChainStep:
    """The op a chain may continue through: kind "bias" for the conv's bias add."""

    kind: str
    out: object
    layer: str | None = None
    windows: tuple | None = None  # (Window h, Window w) of a pool
    pool_attrs: object = None
    call: object = None  # an activation's call (re-applied at the chain's end)


@dataclasses.dataclass
class _Chain:
    """A chain walked from a conv or concat: its op kinds, layer names, pool windows per
    axis, the Steps passed, where it ends, and whether it stayed linear."""

    ops: list
    layers: list
    windows_h: list
    windows_w: list
    steps: list = dataclasses.field(default_factory=list)
    end: object = None
    linear: bool = True
    activation: str | None = None  # the last activation's kind
    activation_call: object = None  # and its call, when not a plain ReLU


def _conv_windows(spec: ConvSpec):
    return ([Window(spec.kernel[0], spec.stride[0], spec.padding[0], spec.padding[2])],
            [Window(spec.kernel[1], spec.stride[1], spec.padding[1], spec.padding[3])])


class StreamlineFinder:
    """Finds streamline sites in one function (see module doc); ``names`` gives each layer
    var its name, ``lrns`` the matched LRN subgraphs (``layers.LrnMatcher``)."""

    def __init__(self, graph: Dataflow, names: dict, lrns: dict, policy: str):
        self.graph, self.names, self.lrns, self.policy = graph, names, lrns, policy

    # -- the chain --------------------------------------------------------------------------
    def _step(self, cur, allow_bias) -> _ChainStep | None:
        """The op consuming ``cur`` when a chain may continue through it, else None."""
        graph = self.graph
        lrn = self.lrns.get(cur)
        if lrn is not None and set(graph.users_of(cur)) == lrn.reads:
            return _ChainStep("lrn", lrn.out, self.names[lrn.out])
        user = graph.sole_user(cur)
        if user is None:
            return None
        value = graph.value[user]
        op = op_name(value)
        channels = (shape_of(cur) or [0, 0])[1]
        kind = _ACTIVATION_OPS.get(op)
        if kind is not None and value.args[0].same_as(cur) and all(
                graph.is_const(a) or isinstance(a, relax.PrimValue) for a in value.args[1:]):
            return _ChainStep(kind, user, call=value)
        if op in POOL_OPS:
            a = value.attrs
            if a.layout != "NCHW" or any(int(d) != 1 for d in a.dilation):
                return None
            k, s, p = ints(a.pool_size), ints(a.strides), ints(a.padding)
            windows = tuple(Window(k[d], s[d], p[d], p[d + 2], bool(a.ceil_mode)) for d in (0, 1))
            return _ChainStep(POOL_OPS[op], user, self.names[user], windows, a)
        if op == "relax.nn.batch_norm":
            return self._batch_norm_step(cur, user, value)
        if op in AFFINE_OPS and len(value.args) == 2:
            lhs, rhs = value.args
            commutes = op in ("relax.multiply", "relax.add")
            other = rhs if lhs.same_as(cur) else (lhs if commutes and rhs.same_as(cur) else None)
            if other is not None and graph.per_channel_const(other, channels):
                return _ChainStep("bias" if allow_bias and op == "relax.add" else "scale", user)
        return None

    def _batch_norm_step(self, cur, user, value) -> _ChainStep | None:
        """An inference BatchNorm (training=False: moving statistics, constant) whose only
        live output is the normalised one."""
        graph = self.graph
        if bool(value.attrs.training) or not value.args[0].same_as(cur) or not all(
                graph.is_const(a) for a in value.args[1:]):
            return None
        readers = graph.users_of(user)
        main = [u for u in readers if isinstance(graph.value.get(u), relax.TupleGetItem)
                and graph.value[u].index == 0]
        rest = [u for u in readers if u not in main]
        if len(main) == 1 and all(not graph.users_of(u) for u in rest):
            return _ChainStep("batch_norm", main[0], self.names[user])
        return None

    def _walk(self, chain: _Chain, cur, allow_bias: bool) -> _Chain:
        """Extend ``chain`` from ``cur`` through bias/relu/non-tensor ops."""
        chain.end, pending_relu = cur, False
        while True:
            step = self._step(cur, allow_bias)
            if step is None:
                break
            allow_bias = False
            cur = step.out
            chain.steps.append(Step(step.kind, cur))
            if step.kind == "bias":  # part of the conv
                chain.end = cur
                continue
            if step.kind in ACTIVATIONS:
                chain.ops.append(step.kind)
                chain.activation = step.kind
                chain.activation_call = None if step.kind == "relu" else step.call
                pending_relu = True
                continue
            if pending_relu:
                chain.linear = False  # a relu inside the chain, not only at its end
                pending_relu = False
            if step.kind == "scale" and chain.ops[-1] == "scale":
                chain.end = cur
                continue
            chain.ops.append(step.kind)
            if step.layer:
                chain.layers.append(step.layer)
            if step.kind not in LINEAR_OPS:
                chain.linear = False
            if step.windows is not None:
                a = step.pool_attrs
                if step.kind == "avg_pool2d" and (any(ints(a.padding)) or a.ceil_mode):
                    chain.linear = False  # border windows average fewer values
                chain.windows_h.append(step.windows[0])
                chain.windows_w.append(step.windows[1])
            chain.end = cur
        if chain.ops[-1] in ACTIVATIONS:  # trailing activations belong to the chain
            chain.end = cur
        while chain.steps and not chain.steps[-1].var.same_as(chain.end):
            chain.steps.pop()
        return chain

    # -- conv -> non-tensor ops --------------------------------------------------------------
    def from_conv(self, conv_var) -> Found | Rejection | None:
        graph = self.graph
        name = self.names[conv_var]
        problem = graph.conv_problem(conv_var)
        if problem is not None and "not bound" in problem:
            return Rejection(name, f"'{name}': {problem}")
        spec = graph.conv_spec(conv_var, name) if problem is None else None
        wh, ww = _conv_windows(spec) if spec is not None else ([], [])
        chain = self._walk(_Chain(["conv2d"], [name], wh, ww), conv_var, allow_bias=True)
        if not any(op in NON_TENSOR_OPS for op in chain.ops):
            shared = self._shared_pool(chain.end)
            if shared is not None:
                return Rejection(f"{name}+{shared[0]}", f"'{shared[0]}' reads a tensor that "
                                 f"{shared[1]} ops read: a chain never crosses a shared "
                                 "tensor")
            blocked = self._blocked_pool(chain.end)
            if blocked is not None:
                return Rejection(f"{name}+{blocked[1]}", f"'{blocked[0]}' between the conv and "
                                 f"'{blocked[1]}' is not a chain op (bias, ReLU/PReLU/LeakyReLU/"
                                 "Clip, pools, LRN, BatchNorm, per-channel scale)")
            return None
        site_id = "+".join(chain.layers)
        if problem is not None:
            return Rejection(site_id, f"'{name}': {problem}")
        in_hw = shape_of(graph.value[conv_var].args[0])[2:]
        out_hw = shape_of(chain.end)[2:]
        try:
            kernel, stride, pad, note = rebirth_geometry(
                (chain.windows_h, chain.windows_w), in_hw, out_hw, self.policy,
                exact=chain.linear)
        except ValueError as err:  # no conv geometry reproduces the block's output shape
            return Rejection(site_id, str(err))
        new = ConvSpec(name, spec.in_channels, spec.out_channels, kernel, stride, pad,
                       spec.groups)
        trace = StreamlineTrace(
            convs=[conv_var], inputs=[graph.value[conv_var].args[0]],
            relu=[chain.activation in RELU_LIKE], steps=chain.steps, end=chain.end,
            consumers=consumer_convs(graph, self.names, chain.end),
            activation=[chain.activation_call])
        return Found(RebirthSite(id=site_id, kind="streamline", ops=chain.ops,
                                 layers=chain.layers, old_conv=[spec], new_conv=[new],
                                 exact=chain.linear, input_hw=in_hw, output_hw=out_hw,
                                 note=note), trace)

    def _shared_pool(self, var):
        """(layer name, readers) of a pool/BN/LRN that reads ``var`` while other ops read it
        too (the chain stopped there), else None."""
        users = [u for u in self.graph.users_of(var) if u != RETURN]
        if len(users) < 2:
            return None
        for user in users:
            op = op_name(self.graph.value[user])
            if op in POOL_OPS or op == "relax.nn.batch_norm":
                return self.names.get(user, op), len(self.graph.users_of(var))
        return None

    def _blocked_pool(self, var):
        """(op, pool layer) when ``var``'s one reader is an op a chain cannot pass and that
        op's one reader is a pool or BatchNorm, else None."""
        graph = self.graph
        user = graph.sole_user(var)
        if user is None or op_name(graph.value[user]) in (None, "relax.nn.conv2d",
                                                          "relax.concat"):
            return None
        after = graph.sole_user(user)
        if after is None:
            return None
        op = op_name(graph.value[after])
        if op in POOL_OPS or op == "relax.nn.batch_norm":
            return op_name(graph.value[user]).replace("relax.", ""), self.names.get(after, op)
        return None

    # -- concat -> stride-2 pool -------------------------------------------------------------
    def _branch_tail(self, var):
        """Walk back from a concat input through relu/bias to its conv: (the conv var or
        None when the branch does not end in a private plain conv, whether a relu was seen)."""
        graph = self.graph
        relu_seen = False
        while len(graph.users_of(var)) == 1:
            value = graph.value.get(var)
            op = op_name(value)
            if op == "relax.nn.conv2d":
                return (var if graph.is_plain_conv(var) else None), relu_seen
            if op == "relax.nn.relu":
                relu_seen = True
                var = value.args[0]
            elif op == "relax.add" and graph.is_const(value.args[1]):
                var = value.args[0]
            else:
                break
        return None, relu_seen

    def from_concat(self, concat_var) -> Found | Rejection | None:
        """The stride >= 2 pool right after a channel concat of private conv branches."""
        graph = self.graph
        value = graph.value[concat_var]
        fields = graph.tuple_fields(value.args[0])
        pool_var = graph.sole_user(concat_var)
        if not fields or pool_var is None or int(value.attrs.axis) not in (1, -3):
            return None
        pool = graph.value[pool_var]
        if op_name(pool) not in POOL_OPS or max(ints(pool.attrs.strides)) < 2:
            return None
        tails = [self._branch_tail(f) if isinstance(f, relax.Var) else (None, False)
                 for f in fields]
        if any(conv is None for conv, _ in tails):
            return None
        concat_name = self.names[concat_var]
        chain = self._walk(_Chain(["concat"], [concat_name], [], []), concat_var,
                           allow_bias=False)
        linear = chain.linear and not any(relu for _, relu in tails)
        site_id = "+".join(chain.layers)
        out_hw = shape_of(chain.end)[2:]
        old, new = [], []
        for conv, _ in tails:
            spec = graph.conv_spec(conv, self.names[conv])
            in_hw = shape_of(graph.value[conv].args[0])[2:]
            conv_wh, conv_ww = _conv_windows(spec)
            try:
                kernel, stride, pad, _ = rebirth_geometry(
                    (conv_wh + chain.windows_h, conv_ww + chain.windows_w), in_hw, out_hw,
                    self.policy, exact=linear)
            except ValueError as err:
                return Rejection(site_id, f"{spec.replaces}: {err}")
            old.append(spec)
            new.append(dataclasses.replace(spec, kernel=kernel, stride=stride, padding=pad))
        grown = [o.replaces for o, n in zip(old, new) if n.kernel != o.kernel]
        note = f"kernels grown for {', '.join(grown)}" if grown else ""
        enabled = True
        if self.policy == "keep-receptive-field" and not linear:
            # measured 0.81-0.91x on GoogLeNet 3b/4e: slower, so opt-in only
            enabled = False
            note = "receptive-field-preserving branch convs ran slower; enable by hand"
        in_hw = shape_of(graph.value[tails[0][0]].args[0])[2:]
        trace = StreamlineTrace(
            convs=[c for c, _ in tails], inputs=[graph.value[c].args[0] for c, _ in tails],
            relu=[r for _, r in tails], steps=chain.steps, end=chain.end,
            consumers=consumer_convs(graph, self.names, chain.end))
        return Found(RebirthSite(id=site_id, kind="streamline", ops=chain.ops,
                                 layers=chain.layers, old_conv=old, new_conv=new, exact=linear,
                                 enabled=enabled, input_hw=in_hw, output_hw=out_hw, note=note,
                                 pooled_concat=concat_name), trace)
