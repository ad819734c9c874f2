"""Where inference time goes, per layer type (the DeepRebirth paper's key figure): every
kernel the Relax VM calls is timed and attributed to the layer type its fused name says.

Relax names a fused kernel after the ops inside it (``fused_conv2d3_add5_relu5``), and
TVM's ONNX importer lowers LRN to square (``multiply`` + ``expand_dims``) -> ``avg_pool3d``
-> scale/``power``/``divide``; those names are what ``layer_type`` reads.
"""

from __future__ import annotations

import re
import time

import numpy as np

LAYER_TYPES = ("convolution", "fully connected", "pooling", "LRN", "batch norm", "concat",
               "other")


def layer_type(symbol: str) -> str | None:
    """The layer type of a kernel symbol; None for VM bookkeeping (``vm.builtin.*``)."""
    if symbol.startswith("vm."):
        return None
    ops = set(re.sub(r"\d+", "", symbol).replace("fused_", "").split("_"))
    name = symbol.lower()
    if "conv2d" in name:  # a conv with its epilogue, or a rebirth conv
        return "convolution"
    if "matmul" in name or "dense" in name:
        return "fully connected"
    if "avg_pool3d" in name or "power" in ops or {"multiply", "expand", "dims"} <= ops:
        return "LRN"
    if "pool" in name or ops & {"mean", "max"}:  # max/avg pools, global average pool
        return "pooling"
    if "batch_norm" in name or ops == {"multiply", "add"}:
        return "batch norm"
    if "concat" in name:
        return "concat"
    return "other"


def time_by_layer_type(runner, x, runs: int = 5) -> dict:
    """{layer type: ms per inference (median over ``runs``)} of a ``build.Runner`` on ``x``,
    plus ``total_ms`` (the kernels' sum) and ``kernels`` ({symbol: ms})."""
    import tvm

    per_run, started = [], {}
    current: dict = {}

    def instrument(func, symbol, before_run, ret_value, *args):
        if before_run:
            started[symbol] = time.perf_counter()
        elif symbol in started:
            current[symbol] = current.get(symbol, 0.0) + time.perf_counter() - started.pop(symbol)
        return 0  # VMInstrumentReturnKind.NO_OP

    arg = tvm.runtime.tensor(np.ascontiguousarray(x), runner.device)
    runner.vm["main"](arg)  # warm up outside the measurement
    runner.vm.set_instrument(instrument)
    try:
        for _ in range(runs):
            current = {}
            runner.vm["main"](arg)
            per_run.append(current)
    finally:
        runner.vm.set_instrument(None)
    kernels = {s: float(np.median([r.get(s, 0.0) for r in per_run])) * 1e3
               for s in {s for r in per_run for s in r}}
    result = {t: 0.0 for t in LAYER_TYPES}
    for symbol, ms in kernels.items():
        kind = layer_type(symbol)
        if kind is not None:
            result[kind] += ms
    result = {t: round(ms, 4) for t, ms in result.items()}
    result["total_ms"] = round(sum(result[t] for t in LAYER_TYPES), 4)
    result["kernels"] = {s: round(ms, 4) for s, ms in sorted(kernels.items())
                         if layer_type(s) is not None}
    return result


def layer_time_rows(profiles: dict) -> list:
    """Table rows [layer type, "ms (share%)" per variant] for the layer types any of the
    ``profiles`` ({name: time_by_layer_type result}) spent time in."""
    return [[kind] + [f"{p[kind]:.3f} ({100 * p[kind] / p['total_ms']:.0f}%)"
                      for p in profiles.values()]
            for kind in LAYER_TYPES if any(p[kind] for p in profiles.values())]
