"""What a user would pick instead, on the same model: ONNX Runtime (and, on the emulated
Cortex-A72, ncnn and MNN) on the original model next to tvm-rebirth's builds of the original
and the rebirth model.

    python benchmarks/peers.py --model googlenet [--plan P --weights W] [--kinds streamline]
                               [--rounds 9] [--json]
    python benchmarks/peers.py --model googlenet --device cortex-a72 [--json]

This CPU: every engine in its own process (tvm_rebirth.deploy.peers.time_engines), timed in
alternating rounds, the same thread count for everyone (TVM_NUM_THREADS, default 2): ONNX
Runtime, both TVM builds untuned (generic schedule) and, where tuning_logs exist for this
CPU, tuned; plus ONNX Runtime alone in a fresh process as the check that nothing stole its
cores. Writes benchmarks/results/peers_<model>.{json,md}.

--device cortex-a72: guest aarch64 instructions per inference under qemu-user -cpu
cortex-a72, 1 thread, of ONNX Runtime 1.32, ncnn (fp32) and MNN (their aarch64 wheels) and
of tvm-rebirth's cross-built original and rebirth; logits (before the final Softmax) of
every engine against ONNX Runtime on this host. Writes peers_<model>_cortex-a72.{json,md}.

Without --plan the default plan (every site) is fine-tuned on --images (64) calibration
images; the first calibration image is the input everyone runs.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

os.environ.setdefault("TVM_NUM_THREADS", "2")

from _common import machine, table, write  # noqa: E402

from tvm_rebirth import flow  # noqa: E402
from tvm_rebirth.deploy import peers  # noqa: E402
from tvm_rebirth.report.measure import count_gflops  # noqa: E402
from tvm_rebirth.report.profile import fp32_peak_gflops  # noqa: E402

EMULATED = "cortex-a72"
ENGINE_NAMES = {"onnxruntime_original": "ONNX Runtime 1.32", "ncnn_original": "ncnn 20261020 (fp32)",
                "mnn_original": "MNN 3.6.1", "tvm_original": "tvm-rebirth original",
                "tvm_rebirth": "tvm-rebirth rebirth"}


def rebirth_note(args, plan) -> str:
    sites = plan.enabled_sites()
    return (f"Rebirth: {len(sites)} sites ({', '.join(sorted({s.kind for s in sites}))})"
            + (f"; --plan/--weights made by `tvm-rebirth plan {args.model} -o P` and "
               f"`tvm-rebirth finetune {args.model} --plan P -o W` (the default flow)."
               if args.plan else "."))


def emulated(args, model, plan, rebirth, x) -> tuple:
    with tempfile.TemporaryDirectory(prefix="tvm-rebirth-peers-") as workdir:
        result = peers.count_on_emulated_device(
            model, {"tvm_original": model.mod, "tvm_rebirth": rebirth}, x, workdir,
            target_name=args.device)
    floor = result["mac_floor_instructions"]
    payload = {"model": args.model, "device": result.pop("device"), "threads": 1, **result,
               "gflop": {"original": round(count_gflops(model.mod), 4),
                         "rebirth": round(count_gflops(rebirth), 4)},
               "sites": [s.id for s in plan.enabled_sites()]}
    logits = result["logits_vs_host_onnxruntime"]
    rows = [[ENGINE_NAMES[name], f"{result[f'{name}_instructions']:.3g}",
             f"{result[f'{name}_instructions'] / floor:.2f}",
             f"{logits[name]['max_abs_diff']:.2g} ({logits[name]['relative']:.1e})"]
            for name in ENGINE_NAMES]
    rows.append(["floor: multiply-adds / 4 (one FMLA = 4 fp32 MACs)", f"{floor:.3g}", "1.00", "-"])
    md = (f"# Peers on {args.model}, emulated Cortex-A72\n\n"
          + table(rows, ["engine", "instructions / inference", "x floor",
                         "logits vs ONNX Runtime on the host: max abs (relative)"])
          + f"\n\nGuest aarch64 instructions per inference, counted exactly by the project's "
            f"QEMU plugin (qemu-user -cpu {args.device}, 1 thread, one warm-up inference "
            "first, the same input for every engine); models cut before the final Softmax. "
            "ncnn from pnnx with fp16 storage/arithmetic off; MNN from mnnconvert; "
            "tvm-rebirth cross-built for the core with our schedule rules (no tuning_logs for it). "
            "The rebirth's logits differ by what its learned convs approximate. "
            + rebirth_note(args, plan))
    return payload, md


def host(args, model, plan, rebirth, x) -> tuple:
    threads = int(os.environ["TVM_NUM_THREADS"])
    with tempfile.TemporaryDirectory(prefix="tvm-rebirth-peers-") as workdir:
        result = peers.time_on_host(model, {"tvm_original": model.mod, "tvm_rebirth": rebirth},
                                    x, threads, args.number, args.rounds, workdir)
    samples = result["rounds"]
    ms = {f"{k}_ms": round(statistics.median(v), 3) for k, v in samples.items()}
    alone = round(statistics.median(result["onnxruntime_alone"]), 3)
    gflop = {"original": count_gflops(model.mod), "rebirth": count_gflops(rebirth)}
    peak = fp32_peak_gflops(threads)
    achieved = {name: gflop["rebirth" if name.startswith("tvm_rebirth") else "original"]
                / ms[f"{name}_ms"] * 1000 for name in samples}
    cpu = f"{machine()['cpu']} (target key {result['target_key']})"
    payload = {"model": args.model, "cpu": cpu, "threads": threads, **ms,
               "onnxruntime_alone_ms": alone,
               "onnxruntime_interleaved_vs_alone": round(ms["onnxruntime_original_ms"] / alone, 3),
               "tuning_logs": result["tuning_logs"],
               "gflop": {k: round(v, 4) for k, v in gflop.items()},
               "achieved_gflops_per_s": {k: round(v, 2) for k, v in achieved.items()},
               "peak_gflops_per_s": round(peak, 1),
               "rounds": {k: [round(s, 3) for s in v] for k, v in samples.items()},
               "onnxruntime_alone_rounds": [round(s, 3) for s in result["onnxruntime_alone"]],
               "max_abs_diff_vs_onnxruntime": result["max_abs_diff_vs_onnxruntime"],
               "tuned_functions": result["tuned_functions"],
               "sites": [s.id for s in plan.enabled_sites()]}
    rows = [[name.replace("_", " "), ms[f"{name}_ms"], f"{achieved[name]:.1f}",
             f"{achieved[name] / peak * 100:.1f} %"] for name in samples]
    rows.append(["onnxruntime alone (fresh process, nothing else running)", alone, "", ""])
    tuned = ("; ".join(f"{k.replace('_', ' ')}: {t}/{n} functions from tuning_logs"
                       for k, (t, n) in result["tuned_functions"].items())
             if result["tuning_logs"] else
             f"no tuning_logs for {result['target_key']}: both TVM builds run our schedule "
             "rules only (untuned)")
    md = (f"# Peers on {args.model} ({threads} threads, {cpu})\n\n"
          + table(rows, ["runtime", "ms (median)", "GFLOP/s", "of nominal peak"])
          + f"\n\nEvery engine in its own process, medians of {args.rounds} alternating rounds "
            f"of {args.number} runs; ONNX Runtime interleaved / alone = "
            f"{payload['onnxruntime_interleaved_vs_alone']}. Nominal fp32 peak {peak:.0f} "
            f"GFLOP/s. {tuned}. " + rebirth_note(args, plan))
    return payload, md


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="googlenet")
    ap.add_argument("--device", choices=[EMULATED],
                    help="count guest instructions on the emulated core instead of timing here")
    ap.add_argument("--plan")
    ap.add_argument("--weights")
    ap.add_argument("--kinds", default="streamline,branch", help="site kinds without --plan")
    ap.add_argument("--select", choices=("paying", "all"), default="paying",
                    help="without --plan: the sites measured to pay on the device (paying) or "
                         "every site found (all)")
    ap.add_argument("--branch-widths", default="carry", help="branch widths without --plan")
    ap.add_argument("--images", type=int, default=64,
                    help="calibration images without --weights (speed does not depend on them)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--number", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    model = flow.load(args.model)
    options = flow.RebirthOptions(plan=args.plan, weights=args.weights, images=args.images,
                                  kinds=tuple(args.kinds.split(",")),
                                  branch_widths=args.branch_widths, select=args.select)
    calib = flow.calibration(model, options)  # always: its first image is the input
    result = flow.rebirth_model(model, options, images=calib, target=args.device)
    x = calib[0][:1]
    run = emulated if args.device else host
    payload, md = run(args, model, result.plan, result.mod, x)
    write(f"peers_{args.model}" + (f"_{args.device}" if args.device else ""), payload, md)
    print(json.dumps(payload, indent=2) if args.json else md)


if __name__ == "__main__":
    sys.exit(main())
