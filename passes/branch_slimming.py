"""BranchSlimming: merge the branches of each enabled inception module into fewer, wider ones.

Before (GoogLeNet inception_3a; bias adds left out)::

    b1 = relu(conv2d(x, W_1x1))                                # 64 channels
    b2 = relu(conv2d(relu(conv2d(x, W_3r)), W_3x3))            # 96 -> 128
    b3 = relu(conv2d(relu(conv2d(x, W_5r)), W_5x5))            # 16 -> 32
    b4 = relu(conv2d(max_pool2d(x, [3, 3], [1, 1]), W_proj))   # 32
    out = concat([b1, b2, b3, b4], axis=1)                     # 256

After (weights from the fine-tune stage; widths from the plan)::

    r3  = relu(conv2d(x, W_3r'))                  # 96 (a plan may thin it, e.g. to 48)
    b12 = relu(conv2d(r3, W_3x3'))                # 64 + 128: the 1x1 branch, then the 3x3
    r5  = relu(conv2d(x, W_5r'))                  # 16 + 32: also carries the pool branch
    b34 = relu(conv2d(r5, W_5x5'))                # 32 + 32: the 5x5 branch, then pool-proj
    out = concat([b12, b34], axis=1)              # 256, same channel order as before

A receiving conv outputs the channels of the branches it covers in their concat order, so
every consumer of the module sees the same channels; when the covered branches are not
adjacent in the concat the receiver's output is split and the pieces concatenated in the
original order. Convs keep their kernel, stride and padding as they are in the module the
pass runs on (StreamlineSlimming may have strided them first); only widths change. Plan,
weights and module are all checked before anything is rewritten: a mismatch raises
RebirthError naming the site and key. Rewritten sites are recorded in the module attribute
``rebirth_slimmed_sites``: running the pass again on its output is a no-op.
"""

from __future__ import annotations

import tvm
from tvm import relax

from .analysis import analyze_sites, mark_slimmed, match_site, slimmed_sites
from .dataflow import emit, shape_of
from .errors import RebirthError
from .site import branch_conv_layout, branch_groups, site_conv_weights


@relax.expr_functor.mutator
class _BranchRewriter(relax.PyExprMutator):
    """Emits the slimmed branches of each site in place of its concat binding."""

    def __init__(self, mod, rewrites):
        super().__init__(mod)
        self.rewrites = rewrites  # concat var -> (site id, [receiver emission], pieces)

    def visit_var_binding_(self, binding):
        rewrite = self.rewrites.get(binding.var)
        if rewrite is None:
            super().visit_var_binding_(binding)
            return
        site_id, receivers, pieces = rewrite
        outputs = {}
        for receiver, convs in receivers.items():
            y = None
            for block, attrs, weight, bias in convs:
                data = self.visit_expr(block.data) if y is None else y
                y = self.builder_.emit(relax.op.nn.conv2d(
                    data, relax.const(weight), strides=attrs.strides, padding=attrs.padding),
                    name_hint=block.name)
                y = self.builder_.emit(relax.op.add(y, relax.const(bias.reshape(1, -1, 1, 1))))
                if block.relu:
                    y = self.builder_.emit(relax.op.nn.relu(y))
            outputs[receiver] = y
        fields, splits = [], {}
        for source, start, stop in pieces:
            if not isinstance(source, int):
                fields.append(self.visit_expr(source))
                continue
            y = outputs[source]
            width = shape_of(y)[1]
            if (start, stop) == (0, width):
                fields.append(y)
                continue
            if source not in splits:
                cuts = sorted({c for s, a, z in pieces if isinstance(s, int) and s == source
                               for c in (a, z)
                               if 0 < c < width})
                splits[source] = (self.builder_.emit(relax.op.split(y, cuts, axis=1)), [0] + cuts)
            parts, starts = splits[source]
            fields.append(self.builder_.emit(relax.TupleGetItem(parts, starts.index(start))))
        out = relax.op.concat(fields, axis=1) if len(fields) > 1 else None
        if out is None:  # everything merged into one conv: its output is the module's
            self.set_var_remap(binding.var, fields[0])
            return
        new = emit(self.builder_, out, not isinstance(binding.var, relax.DataflowVar), site_id)
        self.set_var_remap(binding.var, new)


@tvm.transform.module_pass(opt_level=0, name="BranchSlimming")
class BranchSlimming:
    """Merge the branches of every enabled ``branch`` site of ``plan`` (see module doc).

    Parameters
    ----------
    plan : RebirthPlan, or any object with ``sites`` (list of RebirthSite) and ``policy``
        Where and how to slim.
    weights : Mapping[str, numpy.ndarray], or None
        ``<site id>/<layer>/weight`` (OIHW) and ``.../bias`` for every conv in the site's
        ``new_conv`` (``site.weight_keys``); None: the structure only (seeded placeholders).
    func_name : str
        The function to rewrite.

    Run it after StreamlineSlimming when both are used (``pipeline.rebirth_pipeline``).
    """

    def __init__(self, plan, weights, func_name: str = "main"):
        self.plan = plan
        self.weights = weights
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, _ctx=None) -> tvm.IRModule:
        done = slimmed_sites(mod)  # applied by an earlier run: slimming again is a no-op
        sites = [s for s in self.plan.sites
                 if s.enabled and s.kind == "branch" and s.id not in done]
        if not sites:
            return mod
        analysis = analyze_sites(mod, self.plan.policy, ["branch"], self.func_name)
        mod = analysis.mod  # prepared: the module the traces' vars belong to
        rewrites = {}
        for site in sites:
            match_site(analysis, site)
            trace = analysis.trace(site.id)
            rewrites[trace.concat] = (site.id, *_emission(site, trace, analysis, self.weights))
        func = _BranchRewriter(mod, rewrites).visit_expr(mod[self.func_name])
        func = relax.analysis.remove_all_unused(func)
        updated = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        updated[self.func_name] = func
        return mark_slimmed(updated, [s.id for s in sites])


def _emission(site, trace, analysis, weights):
    """The convs each receiver emits, and the concat pieces in the original order."""
    try:
        groups = branch_groups(site)
    except ValueError as err:  # an absorb the plan cannot mean
        raise RebirthError(f"site '{site.id}': {err}") from None
    layout = branch_conv_layout(site, groups)
    calls = [analysis.graph.value[trace.convs[name].conv] for name, _, _ in layout]
    # geometry as in this module: StreamlineSlimming may have strided and grown the kernels
    kernels = [shape_of(call.args[1])[2:] for call in calls]
    receivers = {}
    for (name, _, receiver), call, (weight, bias) in zip(
            layout, calls, site_conv_weights(site, weights, kernels)):
        receivers.setdefault(receiver, []).append((trace.convs[name], call.attrs, weight, bias))
    pieces = []  # [receiver index or the original concat field, start, stop channel]
    for index, field in enumerate(trace.fields):
        owner = next((r for r, covered in groups.items() if index in covered), None)
        if owner is None:
            pieces.append([field, None, None])
            continue
        covered = groups[owner]
        widths = [site.branches[i].out_channels for i in covered]
        start = sum(widths[:covered.index(index)])
        stop = start + widths[covered.index(index)]
        if pieces and pieces[-1][0] == owner and pieces[-1][2] == start:
            pieces[-1][2] = stop  # adjacent channels of the same receiver: one piece
        else:
            pieces.append([owner, start, stop])
    return receivers, pieces
