"""`tvm-rebirth demo`: the whole flow on the built-in default model.

GoogLeNet (zoo): plan -> fine-tune -> slim -> build with the committed tuning_logs -> bench
on this CPU (with time per layer type) -> the same pair on an emulated Cortex-A72 through
an RPC tracker (instruction counts), when that device can start; then accuracy on
fmnist-inception, the zoo network trained on Fashion-MNIST. Writes a report folder:
summary.json, summary.md, layer_time.png, latency_memory.png, the plan and the weights.
"""

from __future__ import annotations

import logging
import os
import time

from .errors import RebirthError
from .report.output import table, write_json, write_text
from .passes.site import SITE_KINDS

logger = logging.getLogger(__name__)

STEPS = 7


class _Stages:
    """Wall time per stage, in the order they ran."""

    def __init__(self):
        self.seconds, self._t = {}, time.time()

    def done(self, name):
        self.seconds[name] = round(time.time() - self._t, 2)
        self._t = time.time()


# calibration images: GoogLeNet's are for speed and memory (fine-tuning its 13 sites on 256
# images alone takes ~8 minutes here); fmnist-inception's decide the accuracy: the default
# count sized for it (learn.calib.default_image_count: 2048)
DEMO_IMAGES = 64


def run_demo(report_dir, images=None, rounds=7, eval_limit=None, device=True) -> dict:
    """Run the demo and write its report; returns the summary (also summary.json).
    ``images``: calibration images for both models (default 64 GoogLeNet, fmnist-inception's
    default count)."""
    from . import flow
    from .frontend import zoo
    from .report.measure import labeled_set

    for flag, value in (("--images", images), ("--rounds", rounds),
                        ("--eval-limit", eval_limit)):
        flow.require_positive(value, flag)  # before the minutes of the GoogLeNet stage
    report = os.path.abspath(report_dir)
    os.makedirs(report, exist_ok=True)
    stages = _Stages()
    logger.info(f"[demo] 1/{STEPS} loading {zoo.DEFAULT_MODEL} (materialised once into "
        f"{zoo.cache_dir()})")
    model = flow.load(zoo.DEFAULT_MODEL)
    stages.done("load")
    logger.info(f"[demo] 2/{STEPS} planning the rebirth sites that pay on this CPU (every "
                "variant's block measured once, then cached)")
    options = flow.RebirthOptions(images=images or DEMO_IMAGES)
    plan = flow.plan_for(model, options)
    plan.save(os.path.join(report, f"{model.name}.plan.yaml"))
    counts = flow.site_counts(plan)
    stages.done("plan")
    logger.info(f"[demo] 3/{STEPS} fine-tuning {len(plan.enabled_sites())} sites on "
                f"{options.images} images")
    weights, fit = flow.weights_for(model, plan, options)
    weights.save(os.path.join(report, f"{model.name}.weights.npz"))
    stages.done("finetune")
    logger.info(f"[demo] 4/{STEPS} slimming, building (tuning_logs applied) and benchmarking "
        "original vs rebirth on this CPU")
    rebirth = flow.slim(model, plan, weights)
    bench, _ = flow.bench_host(model, rebirth, rounds=rounds, profile=True)
    stages.done("bench")
    if device:
        logger.info(f"[demo] 5/{STEPS} the same pair on an emulated Cortex-A72 through an RPC tracker")
        try:
            on_device = flow.bench_emulated(model, rebirth, os.path.join(report, "device"))
        except RebirthError as err:  # the demo goes on; the report says what happened
            logger.info(f"[demo] the emulated device failed, continuing without it: {err}")
            on_device = {"skipped": f"failed: {err}"}
    else:
        logger.info(f"[demo] 5/{STEPS} device stage skipped (--no-device)")
        on_device = {"skipped": "--no-device"}
    stages.done("device")
    logger.info(f"[demo] 6/{STEPS} accuracy: fmnist-inception (trained on Fashion-MNIST)")
    fm = flow.rebirth_model("fmnist-inception",
                            flow.RebirthOptions(images=images))
    test_x, test_y, test_desc = labeled_set(fm.model, eval_limit)
    accuracy = flow.accuracy(fm.model, fm.mod, test_x, test_y)
    stages.done("eval")
    logger.info(f"[demo] 7/{STEPS} writing the report to {report}")
    summary = {
        "model": model.name, "sites": counts,
        "sites_applied": [s.id for s in plan.enabled_sites()],
        "predicted_speedup": (plan.selection or {}).get("predicted_speedup"),
        "fit": fit["sites"], "bench": bench, "device": on_device,
        "speedup": bench["speedup"], "memory_ratio": bench["memory_ratio"],
        "instructions_ratio": on_device.get("instructions_ratio"),
        "accuracy": {"model": fm.model.name, "labeled_set": test_desc, **accuracy,
                     "fit": fm.fit["sites"],
                     **({"distillation": fm.fit["distillation"]}
                        if "distillation" in fm.fit else {}),
                     "diverging": flow.diverging_stages(fm.fit)},
        "stage_seconds": stages.seconds, "report_dir": report,
    }
    write_report(report, summary)
    stages.done("report")  # summary["stage_seconds"] is this same dict
    summary["total_seconds"] = round(sum(stages.seconds.values()), 1)
    write_json(os.path.join(report, "summary.json"), summary)
    return summary


def summary_rows(summary) -> list:
    """[label, original, rebirth, change] rows of the demo's table."""
    bench, acc = summary["bench"], summary["accuracy"]
    o, r = bench["original"], bench["rebirth"]
    counts = summary["sites"]
    rows = [
        ["sites found", " + ".join(f"{counts[k]} {k}" for k in SITE_KINDS), "", ""],
        ["sites that pay here (slimmed)", "", len(summary["sites_applied"]), ""],
        ["latency on this CPU (ms)", o["latency_ms"], r["latency_ms"], f"{bench['speedup']}x"
         + (f" (predicted {summary['predicted_speedup']}x)"
            if summary.get("predicted_speedup") else "")],
        ["planned memory (MB)", o["memory_mb"], r["memory_mb"], f"{bench['memory_ratio']}x"],
        ["GFLOPs", o["gflops"], r["gflops"], f"{bench['gflops_ratio']}x"],
    ]
    dev = summary["device"]
    if "instructions_ratio" in dev:
        rows.append(["instructions/inference (emulated A72)",
                     f"{dev['original']['instructions']:.4g}",
                     f"{dev['rebirth']['instructions']:.4g}", f"{dev['instructions_ratio']}x"])
    elif "skipped" in dev:
        rows.append(["emulated Cortex-A72", "skipped", "", ""])
    rows.append([f"{acc['model']} top-1 (%)", f"{acc['original']['top1'] * 100:.2f}",
                 f"{acc['rebirth']['top1'] * 100:.2f}",
                 f"{(acc['rebirth']['top1'] - acc['original']['top1']) * 100:+.2f} pt"])
    return rows


def fitting_text(accuracy) -> str:
    """How the accuracy model's rebirth weights were learned (from its fit report)."""
    trained = sum("held_out_after" in site.get("block", {}) for site in accuracy["fit"])
    distilled = accuracy.get("distillation") or {}
    if trained:
        return (f"closed-form fits, then block reconstruction with TVM gradients ({trained} "
                "blocks)" + (f", then the whole network distilled ({distilled['epochs']} "
                             "epochs)" if "epochs" in distilled else "")
                + ", unlabeled images only")
    return "closed-form (layer-wise) fits only, unlabeled images"


def diverging_line(accuracy) -> str:
    """The accuracy model's fine-tune stages that fitted their images far better than the
    held-out ones, and what to run instead; "" when none did."""
    from . import flow

    stages = accuracy.get("diverging")
    if not stages:
        return ""
    return (f"{accuracy['model']}'s fine-tune: more calibration images would help ("
            + flow.diverging_stages_text(stages) + f"); `tvm-rebirth eval {accuracy['model']} "
            "--images N` measures it fine-tuned on N of them")


def stage_line(summary) -> str:
    return ", ".join(f"{k} {v:.0f}s" for k, v in summary["stage_seconds"].items())


def write_report(report, summary) -> None:
    """summary.md and the two PNG figures (summary.json is written by run_demo)."""
    from .report.plots import plot_layer_time, plot_side_by_side
    from .report.profile import layer_time_rows

    bench, dev = summary["bench"], summary["device"]
    profiles = {name: bench[name]["time_by_layer_type"] for name in ("original", "rebirth")}
    plot_layer_time(profiles, os.path.join(report, "layer_time.png"),
                    f"{summary['model']}: time per layer type on this CPU")
    metrics = [("latency on this CPU (ms)",
                {n: bench[n]["latency_ms"] for n in profiles}, f"{bench['speedup']}x faster"),
               ("planned activation memory (MB)",
                {n: bench[n]["memory_mb"] for n in profiles}, f"{bench['memory_ratio']}x less")]
    if "instructions_ratio" in dev:
        metrics.append(("instructions/inference, emulated A72 (1e9)",
                        {n: dev[n]["instructions"] / 1e9 for n in profiles},
                        f"{dev['instructions_ratio']}x fewer"))
    plot_side_by_side(metrics, os.path.join(report, "latency_memory.png"),
                      f"{summary['model']}: original vs rebirth")
    text = ("# tvm-rebirth demo\n\n```\n"
            + table(summary_rows(summary), ["", "original", "rebirth", "change"])
            + "\n```\n\n## Time per layer type (ms per inference, share)\n\n```\n"
            + table(layer_time_rows(profiles), ["layer type", "original", "rebirth"])
            + "\n```\n\n![time per layer type](layer_time.png)\n\n"
            + "![latency and memory](latency_memory.png)\n\n"
            + f"Stages: {stage_line(summary)}.\n"
            + f"\nAccuracy ({summary['accuracy']['model']}): {fitting_text(summary['accuracy'])}. "
              "Retraining "
              "the slimmed network with labels and the original as teacher, as the paper does, "
              "recovers most of the loss: `tvm-rebirth plan fmnist-inception -o P`, "
              "`tvm-rebirth finetune fmnist-inception --plan P --e2e --e2e-labels --e2e-flip "
              "--e2e-images 60000 -o W` (TVM gradients), then `tvm-rebirth eval "
              "fmnist-inception --plan P --weights W`.\n")
    if summary["accuracy"].get("diverging"):
        text += f"\n{diverging_line(summary['accuracy'])}\n"
    if "skipped" in dev:
        text += f"\nEmulated Cortex-A72 stage skipped: {dev['skipped']}\n"
    elif dev:
        text += (f"\nDevice: {dev['device']}; device vs host output difference "
                 f"{dev['device_vs_host_max_abs_err']:.3g}. Latency under emulation is not "
                 "phone speed; instruction counts are exact.\n")
    write_text(os.path.join(report, "summary.md"), text)

