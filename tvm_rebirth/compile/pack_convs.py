"""The Relax pass that puts every conv we have a kernel for on it: ``PackConvWeights(target)``
rewrites each ``R.nn.conv2d`` that ``layouts.conv_rewrite_applies`` accepts into a call of
our TE convolution reading weights packed at compile time (``layouts.blocked_conv_te``), or of
Winograd's kernel where it pays (``winograd.winograd_conv``), and each dense layer with
constant weights into a blocked 1x1 conv (``dense.dense_as_conv``). It runs before
legalization, so bias / BatchNorm / ReLU / clip after the conv still fuse into the same
PrimFunc; the tile plan is chosen here, per conv and target (``layouts.plan_conv``).
"""

from __future__ import annotations

import logging

from .dense import dense_as_conv
from .layouts import (GEMM_ACCUMULATORS, blocked_conv_te, conv_rewrite_applies, pack_weight,
                      plan_conv, rewrite_relax_functions, vector_unit)
from .winograd import winograd_conv

logger = logging.getLogger(__name__)


def PackConvWeights(target):  # noqa: N802 -- a pass, named like TVM's
    """The module pass (see module doc) for ``target``; a no-op where the target has no SIMD
    unit we know."""
    import tvm
    from tvm import relax

    unit = vector_unit(target)
    cores = int(target.attrs.get("num-cores", 2) or 2)

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.rewritten = 0

        def visit_call_(self, call):  # noqa: N802 -- ExprMutator's hook
            call = self.visit_expr_post_order(call)
            if getattr(call.op, "name", "") == "relax.matmul":
                dense = dense_as_conv(
                    self.builder_, call, self.lookup_binding,
                    lambda channels: plan_conv(unit, channels, 1, 1, 1, pointwise=True),
                    pack_weight, blocked_conv_te)
                self.rewritten += dense is not None
                return call if dense is None else dense
            if not conv_rewrite_applies(call):
                return call
            winograd = winograd_conv(
                self.builder_, call,
                lambda channels, width: plan_conv(unit, channels, width, 1, 1,
                                                  whole_blocks=True, pointwise=True,
                                                  max_accumulators=GEMM_ACCUMULATORS),
                pack_weight, blocked_conv_te, cores)
            if winograd is not None:
                self.rewritten += 1
                return winograd
            attrs = call.attrs
            x, weight = call.args
            out_channels, _, kh, kw = (int(d) for d in weight.value.shape)
            groups = int(attrs.groups)
            out_w = int(call.ty.shape[3])
            stride_w = int(attrs.strides[1])
            plan = plan_conv(unit, out_channels // groups, out_w, kw, stride_w,
                             whole_blocks=groups > 1,
                             pointwise=(kh, kw, stride_w) == (1, 1, 1))
            if plan is None:
                return call
            packed = relax.const(pack_weight(weight.value.numpy(), plan.block, groups),
                                 "float32")
            self.rewritten += 1
            strides = [int(s) for s in attrs.strides]
            padding = [int(p) for p in attrs.padding]
            dilation = [int(d) for d in attrs.dilation]
            return self.builder_.call_te(
                lambda data, kernel: blocked_conv_te(data, kernel, out_channels, strides,
                                                     padding, dilation, plan, groups),
                x, packed, primfunc_name_hint="rebirth_conv2d")

    @tvm.transform.module_pass(opt_level=0, name="PackConvWeights")
    def _pass(mod, _ctx):
        if unit is None:
            return mod
        rewriter = _Rewriter(mod)
        mod = rewrite_relax_functions(mod, rewriter)
        if rewriter.rewritten:
            logger.debug(f"[layouts] {rewriter.rewritten} convs use packed weights")
        # the transposes of dense weights the convs replaced would still be folded
        return relax.transform.DeadCodeElimination()(mod)

    return _pass
