"""Conv kernels inside whole models on this CPU: per-kernel time and GFLOP/s (what
`tvm-rebirth bench --profile` reports), with activations in NCHW[x]c between our convs
(compile/channel_blocks.py, the default) and without it (TVM_REBIRTH_CHANNEL_BLOCKS=0).

Each (model, layout) is built and timed in a process of its own (untuned, TVM_NUM_THREADS
threads), so no thread pool of another build spins on the same cores. Per-kernel times come
from the VM's per-call callback, so kernels under a millisecond read a little slow.

Usage: python benchmarks/conv_profile.py [--models googlenet,resnet50] [--top 12] [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write  # noqa: E402

LAYOUTS = {"NCHW[x]c": "1", "NCHW": "0"}  # name -> TVM_REBIRTH_CHANNEL_BLOCKS
HEAVY_SHARE = 0.6  # the kernel issue's bar for the heaviest convs: >= 60 % of nominal peak


def profile_one(model_name: str, runs: int, top: int) -> dict:
    """Build ``model_name`` untuned for this CPU and time its kernels (this process)."""
    import numpy as np

    from tvm_rebirth.compile.build import Runner, host_target
    from tvm_rebirth.frontend.loader import load_model
    from tvm_rebirth.report.profile import (conv_throughput, fp32_peak_gflops, kernel_macs,
                                            time_by_layer_type)

    model = load_model(model_name)
    x = np.random.default_rng(0).random(model.input_shapes[model.input_name]).astype("float32")
    runner = Runner(model.mod, tuned=False)
    profile = time_by_layer_type(runner, x, runs=runs)
    threads = int(os.environ["TVM_NUM_THREADS"])
    rows = conv_throughput(profile, kernel_macs(model.mod, host_target()), threads, top=10**6)
    conv_ms = sum(r["ms"] for r in rows)
    heavy_ms = sum(r["ms"] for r in rows if (r["peak_share"] or 0) >= HEAVY_SHARE)
    return {"total_ms": round(profile["total_ms"], 3), "conv_ms": round(conv_ms, 3),
            "conv_ms_at_60pct_peak": round(heavy_ms, 3), "peak_gflops": fp32_peak_gflops(threads),
            "layout_copy_ms": round(sum(ms for k, ms in profile["kernels"].items()
                                        if "layout_transform" in k), 3),
            "kernels": rows[:top]}


def _in_subprocess(model: str, blocks: str, runs: int, top: int) -> dict:
    env = dict(os.environ, TVM_REBIRTH_CHANNEL_BLOCKS=blocks)
    out = subprocess.run([sys.executable, __file__, "--one", model, "--runs", str(runs),
                          "--top", str(top)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"conv_profile: {model} (TVM_REBIRTH_CHANNEL_BLOCKS={blocks}) "
                         f"failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="googlenet,resnet50")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # one model, this process, JSON out
    args = ap.parse_args()
    if args.one:
        print(json.dumps(profile_one(args.one, args.runs, args.top)))
        return
    results, sections = {}, []
    for model in args.models.split(","):
        results[model] = {}
        for layout, blocks in LAYOUTS.items():
            print(f"[conv_profile] {model} {layout}", file=sys.stderr)
            results[model][layout] = _in_subprocess(model, blocks, args.runs, args.top)
        summary = [[layout, r["total_ms"], r["conv_ms"],
                    f"{100 * r['conv_ms_at_60pct_peak'] / max(r['conv_ms'], 1e-9):.0f} %",
                    r["layout_copy_ms"]] for layout, r in results[model].items()]
        blocked = results[model]["NCHW[x]c"]
        kernels = [[k["kernel"], k["ms"], k["gflops"], f"{100 * k['peak_share']:.0f} %"]
                   for k in blocked["kernels"]]
        sections.append(
            f"## {model}\n\n"
            + table(summary, ["activations", "kernels ms", "conv kernels ms",
                              "conv time in kernels >= 60 % of peak", "layout copies ms"])
            + "\n\nHeaviest conv kernels with NCHW[x]c activations:\n\n"
            + table(kernels, ["kernel", "ms per inference", "GFLOP/s", "of nominal peak"]))
    peak = next(iter(next(iter(results.values())).values()))["peak_gflops"]
    markdown = ("# Conv kernels inside whole models (this CPU, untuned)\n\n"
                + "\n\n".join(sections)
                + f"\n\n{os.environ['TVM_NUM_THREADS']} threads, nominal fp32 peak {peak:.0f} "
                  "GFLOP/s; per-kernel medians of the VM's per-call timings; each build in "
                  "its own process. A Winograd kernel's GFLOP/s are effective ones (the "
                  "direct conv's multiply-adds over its time).")
    write("conv_profile", {"models": results, "threads": int(os.environ["TVM_NUM_THREADS"])},
          markdown)


if __name__ == "__main__":
    main()
