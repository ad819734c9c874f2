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
site, shape and the plan hash are checked before anything is rewritten; a mismatch raises
RebirthError naming the site.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..errors import RebirthError
from .exact_merge import exact_site_weights
from .find_rebirth_sites import FindRebirthSites
from .site import refit_keys, weight_arrays, weight_keys


@relax.expr_functor.mutator
class _SiteRewriter(relax.PyExprMutator):
    """Emits the rebirth conv(s) in place of each site's last binding."""

    def __init__(self, mod, replacements, refits):
        super().__init__(mod)
        # end var -> ([(input, ConvSpec, W, b, relu)], name of the concat the convs feed)
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
        for data, spec, weight, bias, relu in convs:
            # the rebirth conv keeps the replaced layer's name, so site ids stay stable
            y = self.builder_.emit(relax.op.nn.conv2d(
                self.visit_expr(data), relax.const(weight), strides=spec.stride,
                padding=spec.padding, groups=spec.groups), name_hint=spec.replaces)
            y = self._emit(relax.op.add(y, relax.const(bias.reshape(1, -1, 1, 1))),
                           is_output and last and not relu)
            if relu:
                y = self._emit(relax.op.nn.relu(y), is_output and last)
            outs.append(y)
        if len(outs) == 1:
            new = outs[0]
        else:  # the concat keeps its layer name: BranchSlimming finds the module by it
            concat = relax.op.concat(outs, axis=1)
            new = (self.builder_.emit_output(concat, name_hint=concat_name) if is_output
                   else self.builder_.emit(concat, name_hint=concat_name))
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
        return self.builder_.emit_output(expr) if as_output else self.builder_.emit(expr)


@tvm.transform.module_pass(opt_level=0, name="StreamlineSlimming")
class StreamlineSlimming:
    """Replace every enabled ``streamline`` site of ``plan`` by its rebirth conv.

    ``weights`` maps ``<site id>/weight`` (OIHW) and ``<site id>/bias`` to arrays (see
    ``site.weight_keys``); an object with ``.arrays`` and ``.plan_sha256`` (a loaded weights
    file) also has its plan hash checked. Exact sites missing from ``weights`` are computed
    in closed form. ``<site id>/refit/<layer>/weight|bias`` entries replace the weights of a
    conv that reads the site's output (the fine-tune stage refits those to absorb the
    site's residual error).
    """

    def __init__(self, plan, weights, func_name: str = "main"):
        self.plan = plan
        self.weights = weights
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, _ctx=None) -> tvm.IRModule:
        sites = [s for s in self.plan.sites if s.enabled and s.kind == "streamline"]
        if not sites:
            return mod
        arrays = weight_arrays(self.plan, self.weights)
        finder = FindRebirthSites(self.plan.policy, ["streamline"], self.func_name)
        found = {s.id: s for s in finder.find(mod)}
        replacements, refits = {}, {}
        for site in sites:
            ref = found.get(site.id)
            if ref is None:
                raise RebirthError(f"site '{site.id}': not in the module (already slimmed, or a "
                                   "plan for another model?)")
            if ref.ops != site.ops or [c.to_dict() for c in ref.old_conv] != [
                    c.to_dict() for c in site.old_conv]:
                raise RebirthError(f"site '{site.id}': the module's block differs from the plan")
            trace = finder.traces[site.id]
            convs = []
            for (replaces, wkey, bkey), spec, data, relu in zip(
                    weight_keys(site), site.new_conv, trace.inputs, trace.relu):
                weight, bias = self._weights_for(mod, site, arrays, wkey, bkey)
                want = (spec.out_channels, spec.in_channels // spec.groups, *spec.kernel)
                if tuple(weight.shape) != want:
                    raise RebirthError(f"site '{site.id}': weight '{wkey}' has shape "
                                       f"{list(weight.shape)}, the plan needs {list(want)}")
                if tuple(bias.shape) != (spec.out_channels,):
                    raise RebirthError(f"site '{site.id}': bias '{bkey}' has shape "
                                       f"{list(bias.shape)}, the plan needs [{spec.out_channels}]")
                convs.append((data, spec, weight.astype("float32"), bias.astype("float32"), relu))
            replacements[trace.end] = (convs, site.layers[0])
            for consumer in trace.consumers:
                wkey, bkey = refit_keys(site, consumer.name)
                if wkey not in arrays:
                    continue  # no refit learned for this consumer
                weight, bias = np.asarray(arrays[wkey]), np.asarray(arrays.get(bkey, []))
                call = finder._graph.value[consumer.conv]
                want = tuple(int(v) for v in call.args[1].ty.shape.values)
                if tuple(weight.shape) != want or tuple(bias.shape) != (want[0],):
                    raise RebirthError(f"site '{site.id}': refit of '{consumer.name}' has shapes "
                                       f"{list(weight.shape)}/{list(bias.shape)}, the layer "
                                       f"needs {list(want)}/[{want[0]}]")
                refits[consumer.end] = (consumer, call, weight.astype("float32"),
                                        bias.astype("float32"))
        func = _SiteRewriter(mod, replacements, refits).visit_expr(mod[self.func_name])
        func = relax.analysis.remove_all_unused(func)
        updated = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        updated[self.func_name] = func
        return updated

    def _weights_for(self, mod, site, arrays, wkey, bkey):
        if wkey in arrays and bkey in arrays:
            return np.asarray(arrays[wkey]), np.asarray(arrays[bkey])
        if site.exact:
            return exact_site_weights(mod, site.id, self.func_name)
        missing = wkey if wkey not in arrays else bkey
        raise RebirthError(f"site '{site.id}': the weights have no '{missing}' "
                           "(run `tvm-rebirth finetune` for this plan)")
