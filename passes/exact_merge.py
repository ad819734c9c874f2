"""Closed-form rebirth weights for exact sites.

A chain that stays linear up to an optional final ReLU (conv -> BN / Caffe Scale ->
avg-pool) is itself a convolution: BN and Scale fold into the weights and bias channel by
channel, and an unpadded k x k / s average pool of a conv with stride s_c is one conv whose
kernel is the average of k*k copies of the original kernel shifted by s_c.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from .analysis import SiteAnalysis
from .dataflow import op_name
from .errors import RebirthError
from .site import ACTIVATIONS


def _per_channel(arr, channels):
    flat = np.asarray(arr, np.float64).reshape(-1)
    if flat.size == 1:
        return np.full(channels, flat[0])
    if flat.size != channels:
        raise RebirthError(f"expected {channels} per-channel values, got shape {arr.shape}")
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


def exact_site_weights(analysis: SiteAnalysis, site_id: str) -> tuple:
    """(weight OIHW, bias O) float32 of the one conv computing exact site ``site_id``."""
    site = analysis.site(site_id)
    if site is None:
        raise RebirthError(f"site '{site_id}': not in the module")
    if not site.exact or len(site.new_conv) != 1:
        raise RebirthError(f"site '{site_id}' is not exact: its weights must be learned")
    trace = analysis.trace(site_id)
    graph = analysis.graph
    conv = graph.value[trace.convs[0]]
    weight = graph.constant(conv.args[1])
    channels = weight.shape[0]
    bias = np.zeros(channels)
    jump = [int(s) for s in conv.attrs.strides]
    for step in trace.steps:
        call = graph.value[step.var]
        if step.kind == "bias":
            other = call.args[1] if call.args[0].same_as(trace.convs[0]) else call.args[0]
            bias = bias + _per_channel(graph.constant(other), channels)
        elif step.kind == "batch_norm":
            bn = graph.value[call.tuple_value] if isinstance(call, relax.TupleGetItem) else call
            gamma, beta, mean, var = (_per_channel(graph.constant(a), channels)
                                      for a in bn.args[1:5])
            if not bool(bn.attrs.scale):
                gamma = np.ones(channels)
            if not bool(bn.attrs.center):
                beta = np.zeros(channels)
            factor = gamma / np.sqrt(var + float(bn.attrs.epsilon))
            weight = weight * factor[:, None, None, None]
            bias = (bias - mean) * factor + beta
        elif step.kind == "scale":
            op = op_name(call)
            other = call.args[0] if graph.is_const(call.args[0]) else call.args[1]
            c = _per_channel(graph.constant(other), channels)
            if op == "relax.multiply":
                weight, bias = weight * c[:, None, None, None], bias * c
            elif op == "relax.divide":
                weight, bias = weight / c[:, None, None, None], bias / c
            elif op == "relax.add":
                bias = bias + c
            elif op == "relax.subtract":
                bias = bias - c
        elif step.kind == "avg_pool2d":
            pool = [int(v) for v in call.attrs.pool_size]
            weight = _pool_kernel(weight, pool, jump)
            jump = [j * int(s) for j, s in zip(jump, call.attrs.strides)]
        elif step.kind not in ACTIVATIONS:
            raise RebirthError(f"site '{site_id}': '{step.kind}' has no closed form")
    expected = site.new_conv[0]
    if list(weight.shape[2:]) != list(expected.kernel):
        raise RebirthError(f"site '{site_id}': merged kernel {list(weight.shape[2:])} differs "
                           f"from the plan's {expected.kernel}")
    return weight.astype(np.float32), bias.astype(np.float32)
