"""Closed-form rebirth weights for exact sites.

A chain that stays linear up to an optional final ReLU (conv -> BN / Caffe Scale ->
avg-pool) is itself a convolution: BN and Scale fold into the weights and bias channel by
channel, and an unpadded k x k / s average pool of a conv with stride s_c is one conv whose
kernel is the average of k*k copies of the original kernel shifted by s_c.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .find_rebirth_sites import FindRebirthSites, _op_name

_ELEMENTWISE = {
    "relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
    "relax.divide": np.divide, "relax.power": np.power,
}
_UNARY = {"relax.sqrt": np.sqrt, "relax.rsqrt": lambda x: 1.0 / np.sqrt(x),
          "relax.negative": np.negative, "relax.exp": np.exp}


def evaluate_constant(expr, var2val):
    """numpy value of a constant-only expression (bias reshapes, decomposed BN terms)."""
    if isinstance(expr, tvm.ir.expr.Constant):
        return expr.value.numpy().astype(np.float64)
    if isinstance(expr, relax.Var):
        if expr not in var2val:
            raise ValueError(f"'{expr.name}' is not a constant")
        return evaluate_constant(var2val[expr], var2val)
    op = _op_name(expr)
    if op in _ELEMENTWISE:
        return _ELEMENTWISE[op](evaluate_constant(expr.args[0], var2val), evaluate_constant(expr.args[1], var2val))
    if op in _UNARY:
        return _UNARY[op](evaluate_constant(expr.args[0], var2val))
    if op == "relax.reshape":
        return evaluate_constant(expr.args[0], var2val).reshape(
            [int(v) for v in expr.args[1].values])
    if op == "relax.expand_dims":
        arr = evaluate_constant(expr.args[0], var2val)
        for axis in sorted(int(a) for a in expr.attrs.axis):
            arr = np.expand_dims(arr, axis)
        return arr
    if op == "relax.squeeze":
        axis = expr.attrs.axis
        return np.squeeze(evaluate_constant(expr.args[0], var2val),
                          axis=None if axis is None else tuple(int(a) for a in axis))
    if op == "relax.permute_dims":
        axes = expr.attrs.axes
        return np.transpose(evaluate_constant(expr.args[0], var2val),
                            None if axes is None else [int(a) for a in axes])
    if op == "relax.astype":
        return evaluate_constant(expr.args[0], var2val)
    raise ValueError(f"cannot fold {op or type(expr).__name__} in closed form")


def _per_channel(arr, channels):
    flat = np.asarray(arr, np.float64).reshape(-1)
    if flat.size == 1:
        return np.full(channels, flat[0])
    if flat.size != channels:
        raise ValueError(f"expected {channels} per-channel values, got shape {arr.shape}")
    return flat


def _pool_kernel(weight, pool, conv_jump):
    """Kernel of conv followed by an unpadded average pool (pool window, jumps per axis)."""
    (ph, pw), (jh, jw) = pool, conv_jump
    o, i, kh, kw = weight.shape
    merged = np.zeros((o, i, kh + (ph - 1) * jh, kw + (pw - 1) * jw))
    for dy in range(ph):
        for dx in range(pw):
            merged[:, :, dy * jh: dy * jh + kh, dx * jw: dx * jw + kw] += weight
    return merged / (ph * pw)


def exact_site_weights(mod, site_id: str, func_name: str = "main"):
    """(weight OIHW, bias O) of the conv that computes exact site ``site_id`` of ``mod``."""
    finder = FindRebirthSites(kinds=["streamline"], func_name=func_name)
    sites = {s.id: s for s in finder.find(mod)}
    site = sites.get(site_id)
    if site is None:
        raise ValueError(f"site '{site_id}' not found in the module")
    if not site.exact or len(site.new_conv) != 1:
        raise ValueError(f"site '{site_id}' is not exact: its weights must be learned")
    trace = finder.traces[site_id]
    var2val = relax.analysis.get_var2val(mod[func_name])
    conv = var2val[trace.convs[0]]
    weight = evaluate_constant(conv.args[1], var2val)
    channels = weight.shape[0]
    bias = np.zeros(channels)
    jump = [int(s) for s in conv.attrs.strides]
    for kind, var in trace.steps:
        call = var2val[var]
        if kind == "bias":
            other = call.args[1] if call.args[0].same_as(trace.convs[0]) else call.args[0]
            bias = bias + _per_channel(evaluate_constant(other, var2val), channels)
        elif kind == "batch_norm":
            bn = var2val[call.tuple_value] if isinstance(call, relax.TupleGetItem) else call
            gamma, beta, mean, var_ = (_per_channel(evaluate_constant(a, var2val), channels)
                                       for a in bn.args[1:5])
            if not bool(bn.attrs.scale):
                gamma = np.ones(channels)
            if not bool(bn.attrs.center):
                beta = np.zeros(channels)
            factor = gamma / np.sqrt(var_ + float(bn.attrs.epsilon))
            weight = weight * factor[:, None, None, None]
            bias = (bias - mean) * factor + beta
        elif kind == "scale":
            op = _op_name(call)
            lhs_is_chain = not _is_const_like(call.args[0], var2val)
            other = call.args[1] if lhs_is_chain else call.args[0]
            c = _per_channel(evaluate_constant(other, var2val), channels)
            if op == "relax.multiply":
                weight, bias = weight * c[:, None, None, None], bias * c
            elif op == "relax.divide":
                weight, bias = weight / c[:, None, None, None], bias / c
            elif op == "relax.add":
                bias = bias + c
            elif op == "relax.subtract":
                bias = bias - c
        elif kind == "avg_pool2d":
            pool = [int(v) for v in call.attrs.pool_size]
            weight = _pool_kernel(weight, pool, jump)
            jump = [j * int(s) for j, s in zip(jump, call.attrs.strides)]
        elif kind != "relu":
            raise ValueError(f"site '{site_id}': '{kind}' has no closed form")
    expected = site.new_conv[0]
    if list(weight.shape[2:]) != list(expected.kernel):
        raise ValueError(f"site '{site_id}': merged kernel {list(weight.shape[2:])} differs "
                         f"from the plan's {expected.kernel}")
    return weight.astype(np.float32), bias.astype(np.float32)


def _is_const_like(expr, var2val):
    try:
        evaluate_constant(expr, var2val)
        return True
    except (ValueError, KeyError):
        return False


def conv_block_weights(finder, block):
    """(W [OIHW], b) of a ConvBlock as the module computes it (the bias add folded in)."""
    graph = finder._graph
    weight = evaluate_constant(graph.value[block.conv].args[1], graph.var2val)
    if block.end.same_as(block.conv):
        bias = np.zeros(weight.shape[0])
    else:
        bias = evaluate_constant(graph.value[block.end].args[1], graph.var2val).reshape(-1)
    return weight.astype("float32"), bias.astype("float32")
