"""FindRebirthSites: locate every block DeepRebirth can slim, on Relax right after import.

Three shapes of block are found (see ``site.RebirthSite``):

* streamline chains -- a conv2d (+ bias) followed by non-tensor layers in any order, the
  ReLU kept, never crossing a tensor another op also reads::

      lv  = R.nn.conv2d(x, W, strides=[2, 2], padding=[3, 3, 3, 3])
      lv2 = R.add(lv, b)                      # bias
      lv3 = R.nn.relu(lv2)
      lv4 = R.nn.max_pool2d(lv3, [3, 3], strides=[2, 2])
      lv5 ... lv12 = <LRN: multiply, expand_dims, avg_pool3d, squeeze, ..., divide>
    becomes the site  conv1/7x7_s2+pool1/3x3_s2+pool1/norm1
      ops ["conv2d", "relu", "max_pool2d", "lrn"], new conv 7x7/s4 (keep-kernel policy)

* a stride-2 pool after an inception concat, absorbed by the last conv of every branch
  (ops start with "concat");

* inception branch groups -- a concat of branches forked from one tensor, one of them a
  pool -> conv branch, to be merged horizontally by BranchSlimming.

The analysis is pure: the module is returned unchanged except for the ``rebirth_sites``
attribute (JSON), and ``find_rebirth_sites`` returns the sites as objects. Source layer names
are the names AttachLayerNames gives the vars of conv/pool/LRN/BN/concat bindings (listed in
the ``rebirth_layer_names`` module attribute); without them sites are named by position.
"""

from __future__ import annotations

import dataclasses
import json

import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from .site import (BRANCH_WIDTHS, KERNEL_POLICIES, LINEAR_OPS, NON_TENSOR_OPS, SITE_KINDS, ConvSpec,
                   RebirthSite, Window, branch_conv_layout, branch_groups, rebirth_geometry)

_POOL_OPS = {"relax.nn.max_pool2d": "max_pool2d", "relax.nn.avg_pool2d": "avg_pool2d"}
_AFFINE_OPS = ("relax.multiply", "relax.add", "relax.subtract", "relax.divide")
_RETURN = "<return>"
_LAYER_KINDS = {"relax.nn.conv2d": "conv2d", "relax.nn.batch_norm": "batch_norm",
                "relax.concat": "concat", **_POOL_OPS}


@dataclasses.dataclass
class SiteTrace:
    """Where a site sits in the function: what the slimming passes rewrite."""

    convs: list   # conv2d vars, one per rebirth conv (same order as site.new_conv)
    inputs: list  # each conv's data input
    relu: list    # whether each rebirth conv is followed by a ReLU
    steps: list   # (kind, var) of every op after the conv(s), bias adds as "bias"
    end: object   # the var whose value the rebirth conv(s) replace
    # convs reading the site's output (directly or through pools): the fine-tune stage may
    # refit them to absorb the site's residual error; see ConvBlock
    consumers: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class BranchTrace:
    """Where a branch site sits: the tensor its branches fork from, the concat joining
    them, and every conv of the branches that BranchSlimming re-emits."""

    fork: object
    concat: object
    fields: list  # the concat's inputs, one per branch (site.branches order)
    convs: dict   # layer name -> ConvBlock


@dataclasses.dataclass
class ConvBlock:
    """A conv (+ bias) (+ relu): a consumer of a site's output, or a branch conv."""

    name: str     # source layer name
    conv: object  # the conv2d var
    data: object  # its data input
    end: object   # the bias-add var (or the conv var without bias): what a refit replaces
    out: object   # the relu var when a relu follows, else ``end``: the refit's target
    relu: bool
    pools: list = dataclasses.field(default_factory=list)  # pools between site and conv


def _shape(expr):
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return [int(v) for v in ty.shape.values]
    except (TypeError, AttributeError):
        return None  # symbolic


def _ints(values):
    return [int(v) for v in values]


def _op_name(value):
    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
        return value.op.name
    return None


class _Dataflow:
    """Bindings of one function with def-use edges and constant folding knowledge."""

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
            self.users.setdefault(var, []).append(_RETURN)
        self._const = {}

    def users_of(self, var):
        return self.users.get(var, [])

    def is_const(self, expr) -> bool:
        """True when expr is computed from constants only (e.g. reshape of a bias)."""
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

    def tuple_fields(self, expr):
        if isinstance(expr, relax.Var) and isinstance(self.value.get(expr), relax.Tuple):
            expr = self.value[expr]
        return list(expr.fields) if isinstance(expr, relax.Tuple) else None


@tvm.transform.module_pass(opt_level=0, name="FindRebirthSites")
class FindRebirthSites:
    """Analysis pass: annotate the module with the rebirth sites it contains.

    ``FindRebirthSites(policy="keep-kernel", kinds=("streamline", "branch"))(mod)`` returns
    ``mod`` with attribute ``rebirth_sites`` (a JSON list of ``RebirthSite.to_dict()``);
    ``find_rebirth_sites`` returns the sites directly.
    """

    def __init__(self, policy: str = "keep-kernel", kinds=SITE_KINDS, func_name: str = "main",
                 branch_widths: str = "carry"):
        if branch_widths not in BRANCH_WIDTHS:
            raise ValueError(f"unknown branch widths '{branch_widths}' (use one of "
                             f"{BRANCH_WIDTHS})")
        self.branch_widths = branch_widths
        if policy not in KERNEL_POLICIES:
            raise ValueError(f"unknown kernel policy '{policy}' (use one of {KERNEL_POLICIES})")
        bad = [k for k in kinds if k not in SITE_KINDS]
        if bad:
            raise ValueError(f"unknown site kind(s) {bad} (use {SITE_KINDS})")
        self.policy, self.kinds, self.func_name = policy, tuple(kinds), func_name
        # The ONNX frontend's LRN: x / (bias + alpha * avg_pool3d(x*x over channels))^beta
        self._lrn_input = wildcard()
        square = is_op("relax.multiply")(self._lrn_input, self._lrn_input)
        window_sum = is_op("relax.squeeze")(
            is_op("relax.nn.avg_pool3d")(is_op("relax.expand_dims")(square)))
        scaled = is_op("relax.add")(is_op("relax.multiply")(window_sum, is_const()), is_const())
        self._lrn = is_op("relax.divide")(
            self._lrn_input, is_op("relax.power")(scaled, is_const()))
        self.rejected = []

    # -- pass interface ---------------------------------------------------------------
    def transform_module(self, mod: tvm.IRModule, _ctx=None) -> tvm.IRModule:
        sites = self.find(mod)
        return mod.with_attr("rebirth_sites", json.dumps([s.to_dict() for s in sites]))

    def find(self, mod: tvm.IRModule) -> list:
        """Return the list of RebirthSite found in ``mod[func_name]``; rejected blocks go to
        ``self.rejected`` as (id, reason)."""
        func = mod[self.func_name]
        graph = _Dataflow(func)
        names = {str(n) for n in mod.attrs["rebirth_layer_names"]} if (
            mod.attrs is not None and "rebirth_layer_names" in mod.attrs) else set()
        self.rejected = []
        self.traces = {}
        self._graph = graph
        self._lrns = self._match_lrns(graph)
        self._names = self._layer_namer(graph, names)
        sites = []
        for binding in graph.bindings:
            op = _op_name(binding.value)
            if op == "relax.nn.conv2d" and "streamline" in self.kinds:
                site = self._streamline_from_conv(binding.var)
            elif op == "relax.concat":
                site = None
                if "streamline" in self.kinds:
                    site = self._pool_after_concat(binding.var)
                if site is not None:
                    sites.append(site)
                site = self._branch_group(binding.var) if "branch" in self.kinds else None
            else:
                continue
            if site is not None:
                sites.append(site)
        seen = {}
        for site in sites:  # ids must be unique even in oddly named models
            if site.id in seen:
                seen[site.id] += 1
                site.id = f"{site.id}#{seen[site.id]}"
            else:
                seen[site.id] = 0
        return sites

    # -- naming ---------------------------------------------------------------------------
    def _match_lrns(self, graph):
        lrns = {}
        for binding in graph.bindings:
            if _op_name(binding.value) != "relax.divide":
                continue
            if not self._lrn.match(binding.value, var2val=graph.var2val):
                continue
            x = binding.value.args[0]  # the pattern resolves vars to values; keep the var
            square = [u for u in graph.users_of(x) if u != _RETURN and _op_name(
                graph.value[u]) == "relax.multiply" and all(a.same_as(x) for a in graph.value[u].args)]
            if square:  # LRN reads x twice (square, divide); a third reader is a fan-out
                lrns[x] = (binding.var, {binding.var, square[0]})
        return lrns

    def _layer_namer(self, graph, names):
        """var -> layer name: the var's own name where AttachLayerNames gave it a source
        layer name, else ``<kind>_<position>``."""
        table = {}
        for kind, vars_ in layer_vars(graph, self._lrns).items():
            for i, var in enumerate(vars_):
                table[var] = str(var.name) if str(var.name) in names else f"{kind}_{i}"
        return table

    # -- helpers ---------------------------------------------------------------------------
    def _conv_spec(self, var, name):
        call = self._graph.value[var]
        attrs = call.attrs
        wshape = _shape(call.args[1])
        return ConvSpec(replaces=name, in_channels=wshape[1] * int(attrs.groups),
                        out_channels=wshape[0], kernel=wshape[2:4], stride=_ints(attrs.strides),
                        padding=_ints(attrs.padding), groups=int(attrs.groups))

    def _is_plain_conv(self, var):
        call = self._graph.value.get(var)
        if _op_name(call) != "relax.nn.conv2d":
            return False
        a = call.attrs
        return (a.data_layout == "NCHW" and a.kernel_layout == "OIHW"
                and all(int(d) == 1 for d in a.dilation) and self._graph.is_const(call.args[1])
                and _shape(call.args[0]) is not None and _shape(call.args[1]) is not None)

    def _per_channel_const(self, expr, channels):
        if not self._graph.is_const(expr):
            return False
        shape = _shape(expr)
        if shape is None:
            return False
        while shape and shape[0] == 1 and len(shape) > 3:
            shape = shape[1:]
        return shape in ([], [1], [channels, 1, 1], [1, 1, 1])

    def _step(self, cur, allow_bias):
        """The op consuming ``cur`` if a chain may continue through it:
        (kind or None for bias, output var, layer name, Window pair or None) -- or None."""
        graph = self._graph
        if cur in self._lrns:
            out, users = self._lrns[cur]
            if set(graph.users_of(cur)) == users:
                return "lrn", out, self._names[out], None
        users = graph.users_of(cur)
        if len(users) != 1 or users[0] == _RETURN:
            return None
        user = users[0]
        value = graph.value[user]
        op = _op_name(value)
        channels = (_shape(cur) or [0, 0])[1]
        if op == "relax.nn.relu":
            return "relu", user, None, None
        if op in _POOL_OPS:
            a = value.attrs
            if a.layout != "NCHW" or any(int(d) != 1 for d in a.dilation):
                return None
            k, s, p = _ints(a.pool_size), _ints(a.strides), _ints(a.padding)
            windows = tuple(Window(k[d], s[d], p[d], p[d + 2], bool(a.ceil_mode)) for d in (0, 1))
            return _POOL_OPS[op], user, self._names[user], (windows, value.attrs)
        if op == "relax.nn.batch_norm" and value.args[0].same_as(cur) and all(
                graph.is_const(arg) for arg in value.args[1:]):
            outs = [u for u in graph.users_of(user)
                    if isinstance(graph.value.get(u), relax.TupleGetItem)]
            main = [u for u in outs if graph.value[u].index == 0]
            rest = [u for u in graph.users_of(user) if u not in main]
            if len(main) == 1 and all(not graph.users_of(u) for u in rest):
                return "batch_norm", main[0], self._names[user], None
            return None
        if op in _AFFINE_OPS and len(value.args) == 2:
            lhs, rhs = value.args
            other = rhs if lhs.same_as(cur) else (lhs if op in ("relax.multiply", "relax.add")
                                                  and rhs.same_as(cur) else None)
            if other is not None and self._per_channel_const(other, channels):
                if allow_bias and op == "relax.add":
                    return None, user, None, None
                return "scale", user, None, None
        return None

    def _walk(self, cur, ops, layers, windows_h, windows_w, allow_bias, steps):
        """Extend a chain from ``cur`` through bias/relu/non-tensor ops; returns the end var
        and whether the chain stayed a linear map of the conv output. ``steps`` receives
        (kind, var) for every op passed, the bias add as kind "bias"."""
        end, linear, pending_relu = cur, True, False
        while True:
            step = self._step(cur, allow_bias)
            if step is None:
                break
            kind, out, name, window = step
            allow_bias = False
            cur = out
            steps.append((kind or "bias", out))
            if kind is None:  # bias add: part of the conv
                end = cur
                continue
            if kind == "relu":
                ops.append("relu")
                pending_relu = True
                continue
            if pending_relu:
                linear = False  # a relu inside the chain, not only at its end
                pending_relu = False
            if kind == "scale" and ops[-1] == "scale":
                end = cur
                continue
            ops.append(kind)
            if name:
                layers.append(name)
            if kind not in LINEAR_OPS:
                linear = False
            if window is not None:
                (wh, ww), attrs = window
                if kind == "avg_pool2d" and (any(_ints(attrs.padding)) or attrs.ceil_mode):
                    linear = False  # border windows average fewer values
                windows_h.append(wh)
                windows_w.append(ww)
            end = cur
        if ops[-1] == "relu":  # trailing relus belong to the chain
            end = cur
        while steps and not steps[-1][1].same_as(end):
            steps.pop()
        return end, linear

    def _consumers(self, end):
        """Plain convs reading ``end`` directly or through pools, with their bias/ReLU."""
        graph, found, frontier, seen = self._graph, [], [(end, [])], set()
        while frontier:
            var, pools = frontier.pop(0)
            for user in graph.users_of(var):
                if user == _RETURN or user in seen:
                    continue
                seen.add(user)
                value = graph.value[user]
                op = _op_name(value)
                if op in _POOL_OPS and value.attrs.layout == "NCHW":
                    a = value.attrs
                    frontier.append((user, pools + [{
                        "kind": _POOL_OPS[op], "pool_size": _ints(a.pool_size),
                        "strides": _ints(a.strides), "padding": _ints(a.padding),
                        "ceil_mode": bool(a.ceil_mode),
                        "count_include_pad": bool(getattr(a, "count_include_pad", False))}]))
                elif op == "relax.nn.conv2d" and value.args[0].same_as(var) and \
                        self._is_plain_conv(user):
                    found.append(self._conv_block(user, pools))
        return found

    def _conv_block(self, conv, pools=()):
        graph = self._graph
        end = conv
        users = graph.users_of(conv)
        if len(users) == 1 and users[0] != _RETURN:
            value = graph.value[users[0]]
            if _op_name(value) == "relax.add" and value.args[0].same_as(conv) and \
                    self._per_channel_const(value.args[1], _shape(conv)[1]):
                end = users[0]
        out, users = end, graph.users_of(end)
        if len(users) == 1 and users[0] != _RETURN and \
                _op_name(graph.value[users[0]]) == "relax.nn.relu":
            out = users[0]
        return ConvBlock(name=self._names[conv], conv=conv, data=graph.value[conv].args[0],
                         end=end, out=out, relu=not out.same_as(end), pools=list(pools))

    # -- the three site shapes -------------------------------------------------------------
    def _streamline_from_conv(self, conv_var):
        if not self._is_plain_conv(conv_var):
            return None
        name = self._names[conv_var]
        spec = self._conv_spec(conv_var, name)
        ops, layers = ["conv2d"], [name]
        wh = [Window(spec.kernel[0], spec.stride[0], spec.padding[0], spec.padding[2])]
        ww = [Window(spec.kernel[1], spec.stride[1], spec.padding[1], spec.padding[3])]
        steps = []
        end, linear = self._walk(conv_var, ops, layers, wh, ww, allow_bias=True, steps=steps)
        if not any(op in NON_TENSOR_OPS for op in ops):
            return None
        in_hw = _shape(self._graph.value[conv_var].args[0])[2:]
        out_hw = _shape(end)[2:]
        site_id = "+".join(layers)
        try:
            kernel, stride, pad, note = rebirth_geometry((wh, ww), in_hw, out_hw, self.policy,
                                                         exact=linear)
        except ValueError as err:
            self.rejected.append((site_id, str(err)))
            return None
        new = ConvSpec(name, spec.in_channels, spec.out_channels, kernel, stride, pad, spec.groups)
        self.traces[site_id] = SiteTrace(
            convs=[conv_var], inputs=[self._graph.value[conv_var].args[0]],
            relu=["relu" in ops], steps=steps, end=end, consumers=self._consumers(end))
        return RebirthSite(id=site_id, kind="streamline", ops=ops, layers=layers,
                           old_conv=[spec], new_conv=[new], exact=linear, input_hw=in_hw,
                           output_hw=out_hw, note=note)

    def _branch_tail(self, var):
        """Walk back from a concat input through relu/bias to its conv: the conv var, or
        None when the branch does not end in a private conv."""
        graph = self._graph
        relu_seen = False
        while True:
            if len(graph.users_of(var)) != 1:
                return None, relu_seen
            value = graph.value.get(var)
            op = _op_name(value)
            if op == "relax.nn.conv2d":
                return (var if self._is_plain_conv(var) else None), relu_seen
            if op == "relax.nn.relu":
                relu_seen = True
                var = value.args[0]
            elif op == "relax.add" and graph.is_const(value.args[1]):
                var = value.args[0]
            else:
                return None, relu_seen

    def _pool_after_concat(self, concat_var):
        graph = self._graph
        value = graph.value[concat_var]
        fields = graph.tuple_fields(value.args[0])
        users = graph.users_of(concat_var)
        if not fields or len(users) != 1 or int(value.attrs.axis) not in (1, -3):
            return None
        pool = graph.value.get(users[0])
        if _op_name(pool) not in _POOL_OPS or max(_ints(pool.attrs.strides)) < 2:
            return None
        tails = [self._branch_tail(f) if isinstance(f, relax.Var) else (None, False)
                 for f in fields]
        if any(conv is None for conv, _ in tails):
            return None
        ops, layers = ["concat"], [self._names[concat_var]]
        wh, ww, steps = [], [], []
        end, linear = self._walk(concat_var, ops, layers, wh, ww, allow_bias=False, steps=steps)
        linear = linear and not any(relu for _, relu in tails)
        site_id = "+".join(layers)
        out_hw = _shape(end)[2:]
        old, new = [], []
        for conv, _ in tails:
            spec = self._conv_spec(conv, self._names[conv])
            in_hw = _shape(graph.value[conv].args[0])[2:]
            conv_wh = [Window(spec.kernel[0], spec.stride[0], spec.padding[0], spec.padding[2])]
            conv_ww = [Window(spec.kernel[1], spec.stride[1], spec.padding[1], spec.padding[3])]
            try:
                kernel, stride, pad, _ = rebirth_geometry(
                    (conv_wh + wh, conv_ww + ww), in_hw, out_hw, self.policy, exact=linear)
            except ValueError as err:
                self.rejected.append((site_id, f"{spec.replaces}: {err}"))
                return None
            old.append(spec)
            new.append(ConvSpec(spec.replaces, spec.in_channels, spec.out_channels, kernel,
                                stride, pad, spec.groups))
        grown = [o.replaces for o, n in zip(old, new) if n.kernel != o.kernel]
        note = f"kernels grown for {', '.join(grown)}" if grown else ""
        enabled = True
        if self.policy == "keep-receptive-field" and not linear:
            # measured 0.81-0.91x on GoogLeNet 3b/4e: slower, so opt-in only
            enabled = False
            note = "receptive-field-preserving branch convs ran slower; enable by hand"
        in_hw = _shape(graph.value[tails[0][0]].args[0])[2:]
        self.traces[site_id] = SiteTrace(
            convs=[c for c, _ in tails], inputs=[graph.value[c].args[0] for c, _ in tails],
            relu=[r for _, r in tails], steps=steps, end=end, consumers=self._consumers(end))
        return RebirthSite(id=site_id, kind="streamline", ops=ops, layers=layers, old_conv=old,
                           new_conv=new, exact=linear, enabled=enabled, input_hw=in_hw,
                           output_hw=out_hw, note=note)

    def _branch_path(self, var):
        """Walk back from a concat input to the tensor it forks from: (fork var, path of
        (kind, var) from the fork side), or (None, []) when the branch is not private."""
        graph = self._graph
        path = []
        while True:
            value = graph.value.get(var)
            op = _op_name(value)
            if op == "relax.nn.conv2d":
                if not self._is_plain_conv(var):
                    return None, []
                path.append(("conv2d", var))
            elif op in _POOL_OPS:
                path.append((_POOL_OPS[op], var))
            elif op == "relax.nn.relu":
                path.append(("relu", var))
            elif isinstance(value, relax.TupleGetItem) and value.index == 0 and _op_name(
                    graph.value.get(value.tuple_value)) == "relax.nn.batch_norm":
                var = value.tuple_value
                path.append(("batch_norm", var))
                value = graph.value[var]
            elif op in _AFFINE_OPS and graph.is_const(value.args[1]):
                pass
            else:
                return None, []
            var = value.args[0]
            if not isinstance(var, relax.Var):
                return None, []
            if len(graph.users_of(var)) != 1:
                return var, path[::-1]

    def _branch_group(self, concat_var):
        graph = self._graph
        value = graph.value[concat_var]
        fields = graph.tuple_fields(value.args[0])
        if not fields or len(fields) < 3 or int(value.attrs.axis) not in (1, -3):
            return None
        if not all(isinstance(f, relax.Var) and len(graph.users_of(f)) == 1 for f in fields):
            return None
        paths = [self._branch_path(f) for f in fields]
        forks = {id(fork) if fork is None else fork for fork, _ in paths}
        if len(forks) != 1 or paths[0][0] is None:
            return None
        site_id = self._names[concat_var]
        branches, conv_vars = [], {}
        for _, path in paths:
            convs = [v for kind, v in path if kind == "conv2d"]
            pools = [(kind, v) for kind, v in path if kind in _POOL_OPS.values()]
            if not convs:
                return None
            names = [self._names[v] for v in convs]
            conv_vars.update(zip(names, convs))
            branches.append({
                "convs": names,
                "kernels": [self._conv_spec(v, n).kernel for v, n in zip(convs, names)],
                "out_channels": self._conv_spec(convs[-1], names[-1]).out_channels,
                "pool": self._names[pools[0][1]] if pools else None,
                "pool_window": (_ints(graph.value[pools[0][1]].attrs.pool_size)
                                if pools else None),
                "ops": [k for k, _ in path],
            })
        pool_branches = [b for b in branches if b["pool"] and b["ops"][0] in _POOL_OPS.values()]
        if not pool_branches:
            return None
        pool_branch = pool_branches[0]
        # a receiver is re-emitted conv by conv: [1x1 reducer (relu) ->] conv (relu), no BN
        receivers = [b for b in branches if b["pool"] is None and b["ops"] in (
            ["conv2d"], ["conv2d", "relu"], ["conv2d", "conv2d"], ["conv2d", "relu", "conv2d"],
            ["conv2d", "conv2d", "relu"], ["conv2d", "relu", "conv2d", "relu"])
            and (len(b["kernels"]) == 1 or b["kernels"][0] == [1, 1])]
        by_kernel = sorted(receivers, key=lambda b: -max(b["kernels"][-1]))
        if not by_kernel or max(by_kernel[0]["kernels"][-1]) < max(pool_branch["pool_window"]):
            self.rejected.append((site_id, "no tensor branch has a kernel covering the "
                                           f"{pool_branch['pool_window']} pool window"))
            return None
        pool_into = by_kernel[0]
        absorb = {"pool_branch": pool_branch["convs"][-1], "pool_into": pool_into["convs"][-1]}
        singles = [b for b in receivers if len(b["convs"]) == 1 and b is not pool_into
                   and b["kernels"][0] == [1, 1]]
        deep = [b for b in receivers if len(b["convs"]) > 1 and b is not pool_into]
        if singles and deep:
            into = min(deep, key=lambda b: max(b["kernels"][-1]))
            absorb.update(one_by_one=singles[0]["convs"][-1], one_by_one_into=into["convs"][-1])
        if any(self._conv_spec(v, n).groups != 1 for n, v in conv_vars.items()):
            self.rejected.append((site_id, "grouped convs in a branch cannot be widened"))
            return None
        site = RebirthSite(
            id=site_id, kind="branch", ops=pool_branch["ops"] + ["concat"],
            layers=[n for b in branches for n in b["convs"]] + [site_id], old_conv=[],
            new_conv=[], exact=False, input_hw=(_shape(paths[0][0]) or [0, 0, 0, 0])[2:],
            output_hw=_shape(concat_var)[2:], branches=branches, absorb=absorb)
        groups = branch_groups(site)
        for name, role, receiver in branch_conv_layout(site, groups):
            spec = self._conv_spec(conv_vars[name], name)
            site.old_conv.append(spec)
            if role == "reducer":
                pool_into_here = branches.index(pool_branch) in groups[receiver]
                if self.branch_widths == "paper":  # the paper: thin the 3x3 reducer by half
                    width = spec.out_channels if pool_into_here else max(spec.out_channels // 2, 1)
                else:  # "carry": the reducer also carries what the pool branch saw
                    width = spec.out_channels + (pool_branch["out_channels"] if pool_into_here
                                                 else 0)
                new = dataclasses.replace(spec, out_channels=width)
            else:
                width = sum(branches[i]["out_channels"] for i in groups[receiver])
                in_channels = site.new_conv[-1].out_channels if len(
                    branches[receiver]["convs"]) == 2 else spec.in_channels
                new = dataclasses.replace(spec, in_channels=in_channels, out_channels=width)
            site.new_conv.append(new)
        merged = sum(len(covered) - 1 for covered in groups.values())
        site.note = f"{len(branches)} branches -> {len(branches) - merged}"
        self.traces[site_id] = BranchTrace(
            fork=paths[0][0], concat=concat_var, fields=list(fields),
            convs={n: self._conv_block(v) for n, v in conv_vars.items()})
        return site


def layer_vars(graph, lrns) -> dict:
    """{layer kind: [vars in binding order]} for the ops that carry source layer names."""
    order = {}
    for binding in graph.bindings:
        kind = _LAYER_KINDS.get(_op_name(binding.value))
        if kind:
            order.setdefault(kind, []).append(binding.var)
    order["lrn"] = sorted((out for out, _ in lrns.values()), key=lambda v: graph.position[v])
    return order


def find_rebirth_sites(mod, policy="keep-kernel", kinds=SITE_KINDS, func_name="main",
                       branch_widths="carry"):
    """The rebirth sites of ``mod[func_name]`` (see FindRebirthSites)."""
    return FindRebirthSites(policy, kinds, func_name, branch_widths).find(mod)
