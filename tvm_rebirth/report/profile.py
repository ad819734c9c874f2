"""Where inference time goes, per layer type (the DeepRebirth paper's key figure): every
kernel the Relax VM calls is timed and attributed to the layer type its fused name says.

Relax names a fused kernel after the ops inside it (``fused_conv2d3_add5_relu5``), and
TVM's ONNX importer lowers LRN to square (``multiply`` + ``expand_dims``) -> ``avg_pool3d``
-> scale/``power``/``divide``; those names (and our kernels': ``rebirth_conv2d``,
``rebirth_winograd_*``, ``rebirth_max_pool2d``, ``rebirth_channel_window``) are what
``layer_type`` reads. ``kernel_macs`` reads each kernel's multiply-adds from its PrimFunc,
so ``conv_throughput`` gives each conv's GFLOP/s next to this CPU's fp32 peak.
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
    if "conv2d" in name or "winograd" in name:  # with its epilogue; a Winograd conv
        return "convolution"
    if "matmul" in name or "dense" in name:
        return "fully connected"
    if "avg_pool3d" in name or "channel_window" in name or "power" in ops or {"multiply", "expand", "dims"} <= ops:
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

    per_run, started, calls = [], {}, {}
    current: dict = {}

    def instrument(func, symbol, before_run, ret_value, *args):
        if before_run:
            if not per_run:
                calls[symbol] = calls.get(symbol, 0) + 1
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
    result["calls"] = {s: calls[s] for s in result["kernels"]}
    return result


def kernel_macs(mod, target) -> dict:
    """{PrimFunc name: useful multiply-adds per call} of ``mod``'s fused kernels for
    ``target``, read from the blocks that accumulate a product (conv, matmul): the product
    of their iteration extents; a blocked conv counts its NCHW output, not the padded
    channels and columns it computes. A Winograd kernel counts the multiply-adds of the
    direct 3x3 conv it computes (its GFLOP/s are effective ones: it does fewer)."""
    from tvm import s_tir, tirx

    from ..compile.build import fused_module
    from ..compile.layouts import CONV_BLOCK, UNPACK_BLOCK
    from ..compile.winograd import WINO_OUTPUT

    macs = {}
    for gv, func in fused_module(mod, target).functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        sch = s_tir.Schedule(func)
        blocks = {sch.get(rv).name_hint: sch.get(rv)
                  for rv in sch.get_child_blocks(sch.get_sblock("root"))}
        total = 0
        for block in blocks.values():
            store = block.body
            if block.init is None or not isinstance(store, tirx.BufferStore) or not (
                    isinstance(store.value, tirx.Add) and isinstance(store.value.b, tirx.Mul)):
                continue
            unpacked = blocks.get(UNPACK_BLOCK) if block.name_hint == CONV_BLOCK else None
            if unpacked is not None and WINO_OUTPUT in blocks:  # [N, K, H, W] x C/groups x 9
                unpacked = blocks[WINO_OUTPUT]
                n = 9
            else:
                n = 1
            for v in block.iter_vars:
                if unpacked is None or v.iter_type == tirx.IterVar.CommReduce:
                    n *= int(v.dom.extent)
            for v in (unpacked.iter_vars if unpacked is not None else []):
                n *= int(v.dom.extent)
            total += n
        macs[gv.name_hint] = total
    return macs


def fp32_peak_gflops(threads: int) -> float:
    """This CPU's nominal fp32 peak: threads x clock x FLOP per cycle (two FMA units: 64 with
    AVX-512, else 32), from /proc/cpuinfo; 0.0 where it says nothing."""
    mhz, per_cycle = 0.0, 32
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("cpu MHz"):
                    mhz = max(mhz, float(line.split(":")[1]))
                if line.startswith("flags") and " avx512f" in line:
                    per_cycle = 64
    except OSError:
        return 0.0
    return threads * mhz / 1000 * per_cycle


def conv_throughput(profile: dict, macs: dict, threads: int, top: int = 8) -> list:
    """The ``top`` kernels with multiply-adds by time, as [{kernel, ms, gflops,
    peak_share}] from a ``time_by_layer_type`` result and ``kernel_macs``."""
    peak = fp32_peak_gflops(threads)
    rows = []
    for symbol, ms in sorted(profile["kernels"].items(), key=lambda kv: -kv[1]):
        flops = 2 * macs.get(symbol, 0) * profile["calls"].get(symbol, 1)
        if flops and ms > 0:
            gflops = flops / (ms * 1e6)
            # 4 significant digits: a slow kernel's GFLOP/s rounded to 0.1 was off by 2 %+
            rows.append({"kernel": symbol, "ms": round(ms, 4), "gflops": float(f"{gflops:.4g}"),
                         "peak_share": round(gflops / peak, 3) if peak else None})
    return rows[:top]


def layer_time_rows(profiles: dict) -> list:
    """Table rows [layer type, "ms (share%)" per variant] for the layer types any of the
    ``profiles`` ({name: time_by_layer_type result}) spent time in."""
    return [[kind] + [f"{p[kind]:.3f} ({100 * p[kind] / p['total_ms']:.0f}%)"
                      for p in profiles.values()]
            for kind in LAYER_TYPES if any(p[kind] for p in profiles.values())]
