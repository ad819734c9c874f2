"""Inference BatchNorm as a per-channel affine map, folded into the conv before it where there
is one, so that no BatchNorm kernel runs.

TVM's CPU legalization keeps ``R.nn.batch_norm`` a kernel of its own (and TVM's
``FoldBatchnormToConv2D`` misses a conv with a bias between it and the BatchNorm, and leaves
the folded weights as expressions). With constant statistics, BatchNorm is
``y = x * s + t`` per channel, ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``::

    Before:  c = R.nn.conv2d(x, W)                  # W constant, OIHW, NCHW data
             b = R.add(c, bias)                     # optional constant per-channel bias
             n = R.nn.batch_norm(b, gamma, beta, mean, var, axis=1)
             y = n[0]
    After:   c = R.nn.conv2d(x, W * s[:, None, None, None])
             y = R.add(c, (bias - mean) * s + beta)  # constants, computed here

Any other inference BatchNorm with constant parameters becomes
``R.add(R.multiply(x, s), t)`` (two elementwise ops that fuse into their neighbours' kernels).
The folded conv's epilogue is a plain bias add, which the conv kernels (``pack_convs``) apply
per tile.
"""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.dpl import TupleGetItemPattern, is_const, is_op, rewrite_call, wildcard


def _array(expr) -> np.ndarray:
    return expr.value.numpy()


def _affine(bn_call, gamma, beta, mean, var) -> tuple[np.ndarray, np.ndarray] | None:
    """(s, t) of an inference BatchNorm with constant parameters: y = x * s + t along its
    axis; None for a training one (it normalises by the batch's own statistics)."""
    attrs = bn_call.attrs
    if attrs.training:
        return None
    std = np.sqrt(_array(var).astype(np.float64) + float(attrs.epsilon))
    scale = _array(gamma).astype(np.float64) / std if attrs.scale else 1.0 / std
    shift = -_array(mean).astype(np.float64) * scale
    if attrs.center:
        shift = shift + _array(beta)
    return scale, shift


def _channel_bias(bias: np.ndarray, channels: int) -> np.ndarray | None:
    """A conv's bias as a per-output-channel vector, or None when it does not broadcast
    along the channels of an NCHW output (shape [1, C, 1, 1] or [C, 1, 1])."""
    shape = bias.shape
    if len(shape) not in (3, 4) or shape[-3] != channels or \
            any(d != 1 for i, d in enumerate(shape) if i != len(shape) - 3):
        return None
    return bias.reshape(channels)


@relax.transform.function_pass(opt_level=0, name="FoldBatchNorm")
class FoldBatchNorm:
    """Rewrite inference BatchNorms with constant parameters (see the module doc). Holds
    only its patterns."""

    def __init__(self):
        self.data = wildcard()
        self.weight = is_const()
        self.conv = is_op("relax.nn.conv2d")(self.data, self.weight)
        self.bias = is_const()
        self.biased = is_op("relax.add")(self.conv, self.bias)
        self.params = [is_const() for _ in range(4)]  # gamma, beta, mean, var
        self.norm_of_conv = is_op("relax.nn.batch_norm")(self.conv | self.biased, *self.params)
        self.after_conv = TupleGetItemPattern(self.norm_of_conv, 0)
        self.any_input = wildcard()
        self.norm = is_op("relax.nn.batch_norm")(self.any_input, *self.params)
        self.alone = TupleGetItemPattern(self.norm, 0)

    def transform_function(self, func, _mod, _ctx):
        if not isinstance(func, relax.Function) or int(func.attrs.get("Primitive", 0)
                                                     if func.attrs else 0):
            return func
        func = rewrite_call(self.after_conv, self._fold_into_conv, func)
        return rewrite_call(self.alone, self._as_affine, func)

    def _fold_into_conv(self, expr, matches):
        conv, bn = matches[self.conv], matches[self.norm_of_conv]
        attrs = conv.attrs
        weight = _array(matches[self.weight])
        channels = weight.shape[0]
        if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != \
                ("NCHW", "OIHW", "NCHW") or int(bn.attrs.axis) not in (1, -3) or \
                str(weight.dtype) != "float32":
            return expr
        bias = np.zeros(channels)
        if self.bias in matches:
            bias = _channel_bias(_array(matches[self.bias]), channels)
            if bias is None:
                return expr
        affine = _affine(bn, *(matches[p] for p in self.params))
        if affine is None or np.shape(affine[0]) != (channels,):
            return expr
        scale, shift = affine
        folded = (weight * scale.reshape(-1, 1, 1, 1)).astype(weight.dtype)
        new_conv = relax.Call(conv.op, (matches[self.data], relax.const(folded)), attrs)
        offset = (bias * scale + shift).astype(weight.dtype).reshape(1, channels, 1, 1)
        return relax.op.add(new_conv, relax.const(offset))

    def _as_affine(self, expr, matches):
        bn, data = matches[self.norm], matches[self.any_input]
        shape = data.ty.shape if hasattr(data.ty, "shape") else None
        if shape is None or str(data.ty.dtype) != "float32":
            return expr
        rank = len(shape)
        axis = int(bn.attrs.axis) % rank
        affine = _affine(bn, *(matches[p] for p in self.params))
        if affine is None:
            return expr
        scale, shift = affine
        along = [1] * rank
        along[axis] = -1
        as_const = lambda v: relax.const(np.asarray(v, "float32").reshape(along))  # noqa: E731
        return relax.op.add(relax.op.multiply(data, as_const(scale)), as_const(shift))


__all__ = ["FoldBatchNorm"]
