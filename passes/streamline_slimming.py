"""StreamlineSlimming: replace each enabled streamline site by its rebirth convolution.

Before (GoogLeNet conv1 block, site ``conv1/7x7_s2+pool1/3x3_s2+pool1/norm1``)::

    lv   = R.nn.conv2d(data, W1, strides=[2, 2], padding=[3, 3, 3, 3])
    lv2  = R.add(lv, b1)
    lv3  = R.nn.relu(lv2)
    lv4  = R.nn.max_pool2d(lv3, pool_size=[3, 3], strides=[2, 2])
    lv5 .. lv12 = LRN(lv4)            # multiply, expand_dims, avg_pool3d, ..., divide

After (weights from the fine-tune stage, or closed form for exact sites)::

    lv   = R.nn.conv2d(data, W_rebirth, strides=[4, 4], padding=[1, 1, 0, 0])
    lv2  = R.add(lv, b_rebirth)
    lv3  = R.nn.relu(lv2)             # kept when the block had a ReLU

A pool after an inception concat becomes strided branch convs feeding the concat. Every
site and every weight shape is checked before anything is rewritten; a mismatch raises
RebirthError naming the site and key. The ids of the rewritten sites are added to the module
attribute ``rebirth_slimmed_sites``: running the pass again on its output is a no-op.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .analysis import analyze_sites, mark_slimmed, match_site, slimmed_sites
from .dataflow import emit, shape_of
from .errors import RebirthError
from .exact_merge import exact_site_weights
from .site import refit_keys, site_conv_weights, weight_keys


@relax.expr_functor.mutator
class _SiteRewriter(relax.PyExprMutator):
    """Emits the rebirth conv(s) in place of each site's last binding."""

    def __init__(self, mod, replacements, refits):
        super().__init__(mod)
        # end var -> ([(input, ConvSpec, W, b, relu, activation call or None)], name of the
        # concat the convs feed)
        self.replacements = replacements
        self.refits = refits  # consumer end var -> (ConvBlock, conv2d call, W, b)

    def visit_var_binding_(self, binding):
        refit = self.refits.get(binding.var)
        if refit is not None:
            self._refit(binding, *refit)
            return
        if binding.var not in self.replacements:
            super().visit_var_binding_(binding)
            return
        convs, concat_name = self.replacements[binding.var]
        is_output = not isinstance(binding.var, relax.DataflowVar)
        last = len(convs) == 1  # several convs end in a concat, which is the output
        outs = []
        for data, spec, weight, bias, relu, activation in convs:
            # the rebirth conv keeps the replaced layer's name, so site ids stay stable
            y = self.builder_.emit(relax.op.nn.conv2d(
                self.visit_expr(data), relax.const(weight), strides=spec.stride,
                padding=spec.padding, groups=spec.groups), name_hint=spec.replaces)
            act = activation is not None or relu
            y = self._emit(relax.op.add(y, relax.const(bias.reshape(1, -1, 1, 1))),
                           is_output and last and not act)
            if activation is not None:  # the block's activation, re-applied on the new conv
                y = self._emit(relax.Call(activation.op, [y] + [
                    self.visit_expr(a) for a in activation.args[1:]], activation.attrs,
                    activation.ty_args), is_output and last)
            elif relu:
                y = self._emit(relax.op.nn.relu(y), is_output and last)
            outs.append(y)
        if len(outs) == 1:
            new = outs[0]
        else:  # the concat keeps its layer name: BranchSlimming finds the module by it
            concat = relax.op.concat(outs, axis=1)
            new = emit(self.builder_, concat, is_output, concat_name)
        self.set_var_remap(binding.var, new)

    def _refit(self, binding, consumer, conv_call, weight, bias):
        """A consumer conv with refitted weights: same geometry, new W and b."""
        y = self.builder_.emit(relax.op.nn.conv2d(
            self.visit_expr(consumer.data), relax.const(weight),
            strides=conv_call.attrs.strides, padding=conv_call.attrs.padding,
            dilation=conv_call.attrs.dilation, groups=conv_call.attrs.groups),
            name_hint=consumer.name)
        y = self._emit(relax.op.add(y, relax.const(bias.reshape(1, -1, 1, 1))),
                       not isinstance(binding.var, relax.DataflowVar))
        self.set_var_remap(binding.var, y)

    def _emit(self, expr, as_output):
        return emit(self.builder_, expr, as_output)


@tvm.transform.module_pass(opt_level=0, name="StreamlineSlimming")
class StreamlineSlimming:
    """Replace every enabled ``streamline`` site of ``plan`` by its rebirth conv.

    Parameters
    ----------
    plan : RebirthPlan, or any object with ``sites`` (list of RebirthSite) and ``policy``
        Where and how to slim.
    weights : Mapping[str, numpy.ndarray], or None
        ``<site id>/weight`` (OIHW) and ``<site id>/bias`` per site (``site.weight_keys``);
        exact sites missing from it are computed in closed form.
        ``<site id>/refit/<layer>/weight|bias`` replace the weights of a conv that reads the
        site's output (the fine-tune stage refits those to absorb the site's residual error).
        None: the structure only (exact sites in closed form, seeded placeholders for the
        learned ones, no refits).
    func_name : str
        The function to rewrite.
    """

    def __init__(self, plan, weights, func_name: str = "main"):
        self.plan = plan
        self.weights = weights
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, _ctx=None) -> tvm.IRModule:
        done = slimmed_sites(mod)  # applied by an earlier run: slimming again is a no-op
        sites = [s for s in self.plan.sites
                 if s.enabled and s.kind == "streamline" and s.id not in done]
        if not sites:
            return mod
        updated = _Streamline(mod, self.plan.policy, self.weights, self.func_name).run(sites)
        return mark_slimmed(updated, [s.id for s in sites])


class _Streamline:
    """One run of StreamlineSlimming: the module's site analysis, computed once."""

    def __init__(self, mod, policy, weights, func_name):
        self.weights, self.func_name = weights, func_name
        self.analysis = analyze_sites(mod, policy, ["streamline"], func_name)
        self.mod = self.analysis.mod  # prepared: the module the traces' vars belong to

    def run(self, sites) -> tvm.IRModule:
        replacements, refits = {}, {}
        for site in sites:
            match_site(self.analysis, site)
            trace = self.analysis.trace(site.id)
            activations = trace.activation or [None] * len(trace.convs)
            convs = [(data, spec, weight, bias, relu, act) for (weight, bias), spec, data, relu,
                     act in zip(self._conv_weights(site), site.new_conv, trace.inputs,
                                trace.relu, activations)]
            replacements[trace.end] = (convs, site.layers[0])
            for consumer in trace.consumers:
                refit = self._refit(site, consumer)
                if refit is not None:
                    refits[consumer.end] = refit
        func = _SiteRewriter(self.mod, replacements, refits).visit_expr(self.mod[self.func_name])
        func = relax.analysis.remove_all_unused(func)
        updated = tvm.IRModule(dict(self.mod.functions), attrs=self.mod.attrs)
        updated[self.func_name] = func
        return updated

    def _conv_weights(self, site):
        keys = [k for _, wkey, bkey in weight_keys(site) for k in (wkey, bkey)]
        if site.exact and (self.weights is None or not all(k in self.weights for k in keys)):
            return [exact_site_weights(self.analysis, site.id)]
        return site_conv_weights(site, self.weights)

    def _refit(self, site, consumer):
        """(ConvBlock, conv2d call, W, b) of a consumer conv with refitted weights, or None
        when the weights hold no refit for it."""
        wkey, bkey = refit_keys(site, consumer.name)
        if self.weights is None or wkey not in self.weights:
            return None
        weight = np.asarray(self.weights[wkey])
        bias = np.asarray(self.weights[bkey]) if bkey in self.weights else np.zeros(0)
        call = self.analysis.graph.value[consumer.conv]
        want = shape_of(call.args[1])
        if list(weight.shape) != want or list(bias.shape) != [want[0]]:
            raise RebirthError(f"site '{site.id}': refit of '{consumer.name}' has shapes "
                               f"{list(weight.shape)}/{list(bias.shape)}, the layer "
                               f"needs {want}/[{want[0]}]")
        return consumer, call, weight.astype("float32"), bias.astype("float32")
