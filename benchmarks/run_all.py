"""Regenerate every result file in benchmarks/results/ and README's Results section.

    python benchmarks/run_all.py                  # every benchmark (hours on 2 cores), then README
    python benchmarks/run_all.py --only peers,zoo_models
    python benchmarks/run_all.py --readme-only    # README's Results from the JSON files as they are

README's section between the `results:begin` and `results:end` markers is generated here
from benchmarks/results/*.json and nothing else (tests/test_readme.py checks that it
matches), so no figure in it is typed by hand; the count of issue 20's cases in README's
Reliability section (`reliability:begin`/`end`) likewise from results/reliability.json,
rendered by reliability.py. The paper's figures are quoted, not measured.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

# name -> (script and arguments, result files it writes); run in this order
BENCHMARKS = {
    "tuning_logs": (["tuning_summary.py"], ["tuning_logs"]),
    "zoo_models": (["zoo_models.py"], ["zoo_models"]),
    "plans_host": (["plans.py", "--models", "googlenet,alexnet"], ["plans_host"]),
    "plans_cortex_a72": (["plans.py", "--models", "googlenet,alexnet", "--target",
                          "cortex-a72"], ["plans_cortex-a72"]),
    "peers": (["peers.py", "--model", "googlenet"], ["peers_googlenet"]),
    "peers_alexnet": (["peers.py", "--model", "alexnet"], ["peers_alexnet"]),
    "peers_cortex_a72": (["peers.py", "--model", "googlenet", "--device", "cortex-a72"],
                         ["peers_googlenet_cortex-a72"]),
    "peers_alexnet_cortex_a72": (["peers.py", "--model", "alexnet", "--device", "cortex-a72"],
                                 ["peers_alexnet_cortex-a72"]),
    "googlenet_branch": (["branch_googlenet.py"], ["googlenet_branch"]),
    "fmnist_accuracy": (["fmnist_accuracy.py"], ["fmnist_inception_accuracy"]),
    "fmnist_vgg_accuracy": (["fmnist_accuracy.py", "--model", "fmnist-vgg", "--no-e2e"],
                            ["fmnist_vgg_accuracy"]),
    "fmnist_layerwise_limits": (["fmnist_layerwise_limits.py"], ["fmnist_layerwise_limits"]),
    "fmnist_reconstruction": (["fmnist_reconstruction.py"], ["fmnist_reconstruction"]),
    "fmnist_seeds": (["fmnist_seeds.py"], ["fmnist_seeds"]),
    "fmnist_distillation": (["fmnist_distillation.py"], ["fmnist_inception_distillation"]),
    "fmnist_vgg_distillation": (["fmnist_distillation.py", "--model", "fmnist-vgg",
                                 "--variants", "default,seed-1,epochs-48,lr-3e-3,mix-0,"
                                 "batch-64,no-held-out,output-only"],
                                ["fmnist_vgg_distillation"]),
    "plan_accuracy": (["plan_accuracy.py"], ["plan_accuracy"]),
    "finetune_time": (["finetune_time.py"], ["finetune_time"]),
    "training_step": (["training_step.py"], ["training_step"]),
    "reliability": (["reliability.py"], ["reliability"]),  # issue 20's cases (its own block)
}

# DeepRebirth (Li et al., WACV 2018), GoogLeNet on a Samsung Galaxy S5 (Caffe, CPU):
# quoted from the paper for comparison, never measured here.
RETRAINED_STEP = "all sites + retraining with labels"  # the row fmnist_accuracy.py writes
PAPER_GOOGLENET = {"speedup": 3.09, "memory_ratio": 2.5, "top5_change_points": -0.46,
                   "device": "Samsung Galaxy S5 (Caffe, CPU)"}


def _load(name):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def command_of(data) -> str:
    """The recorded command, its script path made relative to the repository root (older
    result files recorded it relative to benchmarks/, where they were run)."""
    words = data["command"].split()
    if not (ROOT / words[1]).is_file() and (HERE / words[1]).is_file():
        words[1] = f"benchmarks/{words[1]}"
    return " ".join(words)


def _reproduce(data):
    return f"Reproduce: `{command_of(data)}` (revision {data.get('revision') or '?'})."


def _machine(data):
    m = data.get("machine", {})
    return f"{m.get('cpu', '?')}, {m.get('threads', '?')} threads"


def zoo_section(zoo):
    rows = []
    for e in zoo["models"]:
        if "latency_ms" not in e:
            continue
        ms, mem, g, ins = e["latency_ms"], e["memory_mb"], e["gflops"], e.get("instructions", {})
        enabled = e.get("sites_enabled")
        rows.append([
            f"`{e['model']}`", (f"{enabled} of " if enabled is not None else "")
            + f"{e['sites']['streamline']} + {e['sites']['branch']}",
            f"{g['original']:.2f} / {g['rebirth']:.2f}",
            f"{ms['original']:.1f} / {ms['rebirth']:.1f}", f"**{e['speedup']}x**",
            f"{e['predicted_speedup']}x" if e.get("predicted_speedup") else "-",
            f"{mem['original']:.2f} / {mem['rebirth']:.2f}", f"**{e['memory_ratio']}x**",
            f"{ms['onnxruntime']:.1f}",
            f"{ins['original'] / 1e9:.3g} / {ins['rebirth'] / 1e9:.3g} ({ins['ratio']}x)"
            if "ratio" in ins else "-",
            ", ".join(f"{t}/{n}" for t, n in (e["tuned_functions"]["original"],
                                                e["tuned_functions"]["rebirth"]))])
    none = [e["model"] for e in zoo["models"] if "latency_ms" not in e]
    selected = any("sites_enabled" in e for e in zoo["models"])
    plan = ("Default plan: the site variants its cost table, measured on this CPU, predicts "
            "faster, within the default accuracy budget ('predicted': its whole-model "
            "speedup)" if selected else "Default plan (every site, keep-kernel, carry widths)")
    return ("### Every zoo model the passes apply to\n\n"
            + table(rows, ["model", "sites (streamline + branch)", "GFLOPs orig / rebirth",
                           "TVM ms orig / rebirth", "speedup", "predicted",
                           "memory MB orig / rebirth", "memory ratio", "ONNX Runtime ms (orig)",
                           "emulated A72 instructions 1e9 (ratio)",
                           "tuned functions orig, rebirth"])
            + f"\n\n{plan}; {_machine(zoo)}; "
              f"medians of {zoo['rounds']} interleaved rounds, both TVM builds with the committed "
              "tuning_logs where they hold records; memory is TVM's planned activation memory; "
              "instructions are exact guest counts per inference under qemu-user cortex-a72 "
              "(1 thread). Tuned functions: how many kernels of each build came "
              "from the committed tuning_logs; the rest run our kernels and generic schedule."
            + (f" No site found, or none pays (the default plan is the original model): "
               f"{', '.join(none)}." if none else "")
            + _revisions(zoo["models"]) + f" {_reproduce(zoo)}\n")


def _revisions(entries) -> str:
    """Which revision measured which rows, when ``--update`` runs left rows of several."""
    by_revision: dict = {}
    for e in entries:
        by_revision.setdefault(e.get("revision", "an earlier revision"), []).append(e["model"])
    if len(by_revision) < 2:
        return ""
    return " Rows measured at different revisions: " + "; ".join(
        f"{', '.join(models)} at {revision}" for revision, models in by_revision.items()) + "."


def plans_section(host, emulated):
    """Predicted vs measured speedup of the default plans, on this CPU and the A72."""
    rows = []
    for data, where in ((host, "this CPU (latency)"), (emulated, "emulated A72 (instructions)")):
        for e in (data or {}).get("models", []):
            rows.append([f"`{e['model']}`", where,
                         f"{len(e['sites_enabled'])} of {e['sites_found']}",
                         f"**{e['speedup']}x**",
                         f"{e['predicted_speedup']}x" if e.get("predicted_speedup") else "-",
                         f"{e['prediction_error']:+.1%}" if "prediction_error" in e else "-",
                         f"{e['memory_ratio']}x"])
    notes = " ".join(f"{label}: {_machine(d)}. {_reproduce(d)}" for d, label in
                     ((host, "This CPU"), (emulated, "Emulated A72")) if d)
    return ("### Plans that pay: predicted vs measured (GoogLeNet, AlexNet)\n\n"
            + table(rows, ["model", "measured on", "sites enabled", "measured speedup",
                           "predicted", "prediction error", "planned memory ratio"])
            + "\n\nThe default plan of each model for that target (`plan --target ...`), "
              "untuned builds on both sides, the rebirth with seeded placeholder weights (same "
              f"graph and kernels as fine-tuned ones). {notes}\n")


def paper_section(zoo, accuracy):
    g = next((e for e in (zoo or {}).get("models", []) if e["model"] == "googlenet"), None)
    rows = [["speedup", f"{PAPER_GOOGLENET['speedup']}x",
             f"{g['speedup']}x (latency, this CPU)" if g else "-",
             f"{g['instructions']['ratio']}x (instructions, emulated A72)"
             if g and "ratio" in g.get("instructions", {}) else "-"],
            ["memory", f"{PAPER_GOOGLENET['memory_ratio']}x",
             f"{g['memory_ratio']}x (planned activations)" if g else "-", ""]]
    steps = (accuracy or {}).get("steps", [])
    # every site slimmed: the last cumulative step (no labels), and retrained when measured
    full_plan = [(s, "default fine-tune, no labels") for s in steps
                 if s["step"].startswith("+ ")][-1:]
    full_plan += [(s, "all sites retrained with labels") for s in steps
                  if s["step"] == RETRAINED_STEP]
    for full, how in full_plan:
        base = steps[0]
        rows.append(["accuracy change", f"{PAPER_GOOGLENET['top5_change_points']} pt top-5 "
                     "(ImageNet, retrained)",
                     f"{(full['top5'] - base['top5']) * 100:+.2f} pt top-5, "
                     f"{full['top1_change_points']:+.2f} pt top-1 (fmnist-inception, "
                     f"{how})", ""])
    return ("### Next to the paper (GoogLeNet)\n\n"
            + table(rows, ["", f"paper, {PAPER_GOOGLENET['device']}", "here",
                            "here, Cortex-A72"])
            + "\n\nThe paper's figures are quoted from DeepRebirth (WACV 2018); ours come from "
              "the tables on this page. The paper measures Caffe on a phone, where LRN and "
              "pooling took a large share of the time; TVM fuses and schedules them, so "
              "convolutions dominate here (`tvm-rebirth demo` plots the share per layer type).\n")


PEER_MODELS = ("googlenet", "alexnet")
EMULATED_ENGINES = {"onnxruntime_original": "ONNX Runtime 1.32 (original)",
                    "ncnn_original": "ncnn 20261020, fp32 (original)",
                    "mnn_original": "MNN 3.6.1 (original)",
                    "tvm_original": "tvm-rebirth original (our schedules, untuned)",
                    "tvm_rebirth": "tvm-rebirth rebirth"}


def rebirth_plan_label(data) -> str:
    """Which plan a peers result's rebirth model is: the default, or the site kinds its
    command asked for (``--kinds``), with the number of sites."""
    words = data.get("command", "").split()
    kinds = words[words.index("--kinds") + 1] if "--kinds" in words[:-1] else None
    count = len(data.get("sites", []))
    return (f"{count} {kinds.replace(',', ' + ')} sites" if kinds
            else f"the default plan, {count} sites")


def _peers(suffix, key) -> dict:
    """{model: result} of the peers_<model><suffix> files that hold ``key`` (result files
    of an older layout are left out)."""
    found = {m: _load(f"peers_{m}{suffix}") for m in PEER_MODELS}
    return {m: d for m, d in found.items() if d and key in d}


def peers_section(peers):
    """This CPU: every engine in its own process (``peers`` = {model: result})."""
    rows = []
    for model, data in peers.items():
        rows += [[model, name.replace("_", " "), data[f"{name}_ms"],
                  data["achieved_gflops_per_s"][name]] for name in data["rounds"]]
        rows.append([model, "onnxruntime alone (fresh process; interleaved / alone = "
                     f"{data['onnxruntime_interleaved_vs_alone']})", data["onnxruntime_alone_ms"],
                     ""])
    first = next(iter(peers.values()))
    return ("### Against ONNX Runtime on this CPU\n\n"
            + table(rows, ["model", "runtime", "ms (median)", "GFLOP/s"])
            + f"\n\n{first['cpu']}, {first['threads']} threads each, every engine in its own "
              "process (rounds alternate engines; ONNX Runtime alone is the check that no "
              "other engine's threads stole its cores); untuned = our schedule rules only"
              + ("" if first["tuning_logs"] else
                 " (no tuning_logs for this CPU, so no tuned builds)")
              + f"; nominal fp32 peak {first['peak_gflops_per_s']} GFLOP/s; rebirth = "
              + "; ".join(f"{m}: {rebirth_plan_label(d)}" for m, d in peers.items())
              + f". {' '.join(_reproduce(d) for d in peers.values())}\n")


def emulated_peers_section(peers):
    """The emulated Cortex-A72: guest instructions per inference of every engine, next to
    the multiply-add floor (``peers`` = {model: result})."""
    header = ["engine (aarch64)"] + [f"{m} instructions (x floor)" for m in peers]
    rows = []
    for name, label in EMULATED_ENGINES.items():
        if name == "tvm_rebirth":
            label += " (" + "; ".join(f"{m}: {rebirth_plan_label(d)}"
                                       for m, d in peers.items()) + ")"
        rows.append([label] + [
            f"{d[f'{name}_instructions']:.3g} ({d[f'{name}_instructions'] / d['mac_floor_instructions']:.2f}x)"
            for d in peers.values()])
    rows.append(["floor: multiply-adds / 4 (one FMLA = 4 fp32 MACs)"]
                + [f"{d['mac_floor_instructions']:.3g}" for d in peers.values()])
    worst = max(v["relative"] for d in peers.values()
                for n, v in d["logits_vs_host_onnxruntime"].items() if n != "tvm_rebirth")
    return ("### Against ONNX Runtime, ncnn and MNN on the emulated Cortex-A72\n\n"
            + table(rows, header)
            + "\n\nGuest aarch64 instructions per inference, counted exactly by our QEMU plugin "
              "(qemu-user -cpu cortex-a72, 1 thread, after a warm-up inference, the same "
              "input for every engine, models cut before the final Softmax); the engines are "
              "their cp311 aarch64 wheels, ncnn converted by pnnx with fp16 storage and "
              "arithmetic off, MNN by mnnconvert. Every original-model engine's logits match "
              f"ONNX Runtime on the host within {worst:.1e} (relative). "
              f"{' '.join(_reproduce(d) for d in peers.values())}\n")


def branch_section(branch):
    rows = []
    for name in [k for k in branch if isinstance(branch[k], dict) and "latency_ms" in branch[k]]:
        v = branch[name]
        rows.append([name, v["latency_ms"], v["memory_mb"], v["gflops"],
                     f"{v['speedup']}x" if "speedup" in v else "-",
                     f"{v['memory_ratio']}x" if "memory_ratio" in v else "-"])
    return ("### GoogLeNet: streamline vs branch slimming\n\n"
            + table(rows, ["variant", "ms", "memory MB", "GFLOPs", "speedup", "memory ratio"])
            + f"\n\n{_machine(branch)}, generic schedule (no tuning_logs). {_reproduce(branch)}\n")


def accuracy_table(accuracy):
    """The steps of fmnist_accuracy.py (its result page uses it too)."""
    rows = [[s["step"], f"{s['top1'] * 100:.2f}", f"{s['top5'] * 100:.2f}",
             f"{s['top1_change_points']:+.2f}"] for s in accuracy["steps"]]
    return table(rows, ["step", "top-1 %", "top-5 %", "top-1 change (pt)"])


def end_to_end_text(accuracy):
    """One sentence per end-to-end row: how it was trained."""
    return "".join(
        f" End-to-end {name}: {r['loss']}{', random flips' if r['flip'] else ''}, "
        f"{r['epochs']} epochs on {r['images']} train images, weights of epoch "
        f"{r['kept_epoch']} kept, {r['seconds']:.0f} s."
        for name, r in accuracy["end_to_end"].items())


def fine_tune_text(accuracy):
    """How the steps were fine-tuned, and on what."""
    return f"{accuracy['fine_tune']} on {accuracy['calibration']}"


def accuracy_section(accuracy):
    return (f"### Accuracy per slimming step ({accuracy.get('model', 'fmnist-inception')})\n\n"
            + accuracy_table(accuracy)
            + f"\n\n{accuracy['labeled_set']}; {fine_tune_text(accuracy)}; steps are "
              f"cumulative in network order (the paper's Table 2).{end_to_end_text(accuracy)} "
              f"{_reproduce(accuracy)}\n")


def limits_table(limits):
    """The variants of fmnist_layerwise_limits.py (its result page uses it too)."""
    rows = [[v["variant"], len(v["sites"]), f"{v['top1'] * 100:.2f}",
             f"{v['top1_change_points']:+.2f}",
             "-" if v["stem_rel_error"] is None else f"{v['stem_rel_error']:.3f}",
             f"{v['worst_other_rel_error']:.3f}"] for v in limits["variants"]]
    return table(rows, ["variant", "sites", "top-1 %", "top-1 change (pt)",
                        "stem held-out error", "worst other site error"])


def limits_section(limits):
    return ("### Layer-wise fitting alone, by plan variant (fmnist-inception)\n\n"
            + limits_table(limits)
            + f"\n\nOriginal top-1 {limits['original_top1'] * 100:.2f} %; no end-to-end "
              "refinement; errors are held-out relative reconstruction errors of each site's "
              f"output. {_reproduce(limits)}\n")


def warned_text(stages) -> str:
    """A fine-tune's stages that warned more images would help (flow.diverging_stages) with
    their targets: "distillation (output); ..." or "none"."""
    return "; ".join(f"{where} ({', '.join(targets)})"
                     for where, targets in stages.items()) or "none"


def _reconstruction_warnings_recorded(data) -> bool:
    """Whether fmnist_reconstruction.py recorded its fine-tunes' warnings (older result
    files did not)."""
    return all("diverging" in r.get("distillation", {}) for r in data["rows"])


def reconstruction_table(data):
    """fmnist_reconstruction.py's rows (its result page uses it too): a * marks a fine-tune
    that warned more images would help; the last column names the default's warnings."""
    base = data["original_top1"]
    keys = [k for k in ("closed_form", "reconstruction", "distillation", "receptive_field")
            if all(k in r for r in data["rows"])]
    recorded = _reconstruction_warnings_recorded(data)
    rows = [[r["images"]] + [cell for key in keys for cell in (
        f"{r[key]['top1'] * 100:.2f} ({(r[key]['top1'] - base) * 100:+.2f})"
        + (" *" if r[key].get("diverging") else ""),
        f"{r[key]['seconds']:.0f}")]
        + ([warned_text(r["distillation"]["diverging"])] if recorded else [])
        for r in data["rows"]]
    titles = {"closed_form": "closed form: top-1 % (pt)",
              "reconstruction": "+ block reconstruction: top-1 % (pt)",
              "distillation": "+ distillation (the default): top-1 % (pt)",
              "receptive_field": "same, `--policy keep-receptive-field`: top-1 % (pt)"}
    return table(rows, ["unlabeled images"] + [t for k in keys for t in (titles[k], "seconds")]
                 + (["the default warned: more images would help (targets)"] if recorded
                    else []))


def reconstruction_text(data) -> str:
    return (f"Original top-1 {data['original_top1'] * 100:.2f} % on {data['labeled_set']}; "
            f"plan: every site found (`--select all`, {data['sites']} sites); block "
            f"reconstruction: {data['epochs']} epochs per site (the default), TVM gradients; "
            "each stage within its multiply-add budget (fewer epochs for the bigger blocks and "
            "the larger counts); "
            + (f"distillation: the whole network on the calibration images, to the "
               f"original's output and each learned site's input, {data['distill_epochs']} "
               "epochs" + (f", {data['distill_mix']:.0%} of each batch blends of two images "
                           "relabelled by the original" if data.get("distill_mix") else "")
               + " (the default from 512 images; measured at every count); "
               if any("distillation" in r for r in data["rows"]) else "")
            + ("`--policy keep-receptive-field`: its streamline sites' convs cover the whole "
               "block they replace (conv1+pool1+norm1: 5x5/s2 instead of 3x3/s2)"
               + (f", {data['field_sites']} sites ({', '.join(data['field_off'])} left off "
                  "as `--select all` plans it: slower)" if data.get("field_off") else "")
               + "; " if any("receptive_field" in r for r in data["rows"]) else "")
            + "calibration images: Fashion-MNIST train (seed 0)"
            + (", each with its mirror image" if data.get("mirror_images") else "")
            + ", every 8th held out; seconds: the whole fine-tune on this machine "
              f"({_machine(data)})"
            + ("; *: the fine-tune warned that a stage fitted its images far better than the "
               "held-out ones (a target's loss below half its held-out loss): more images "
               "would help" if _reconstruction_warnings_recorded(data) else "")
            + ".")


def reconstruction_section(data):
    return ("### Accuracy against unlabeled images: block reconstruction (fmnist-inception)\n\n"
            + reconstruction_table(data) + "\n\n" + reconstruction_text(data)
            + f" {_reproduce(data)}\n")


def seeds_table(data) -> str:
    """fmnist_seeds.py's rows (its result page uses it too)."""
    recorded = all("diverging" in run for entry in data["models"] for run in entry["runs"])
    rows = []
    for entry in data["models"]:
        for run in entry["runs"]:
            distilled = (f"{run['kept_epoch']}/{run['epochs']} at {run['lr']:g}"
                         if run.get("epochs") else f"skipped ({run.get('skipped')})")
            rows.append([entry["model"], entry["sites"], run["seed"],
                         f"{run['top1'] * 100:.2f} ({run['top1_change_points']:+.2f})",
                         distilled]
                        + ([warned_text(run["diverging"])] if recorded else [])
                        + [f"{run['seconds']:.0f}"])
        rows.append([entry["model"], entry["sites"], "mean (spread)",
                     f"**{entry['mean_change_points']:+.2f}** ({entry['spread_points']:.2f})",
                     ""] + ([""] if recorded else []) + [""])
    return table(rows, ["model", "sites", "`--seed`", "top-1 % (pt)",
                        "distillation: epoch kept, rate"]
                 + (["warned: more images would help (targets)"] if recorded else [])
                 + ["fine-tune seconds"])


def seeds_text(data) -> str:
    first = data["models"][0]
    return ("Every site found (`--select all`); default fine-tune on "
            f"{first['calibration']}, the same images at every seed (`--seed` moves only the "
            "training's batch order and blends); top-1 on "
            f"{first['labeled_set']}; seconds: the whole fine-tune on this machine "
            f"({_machine(data)}). A setting measured once ranks against another only when "
            "they differ by more than this spread.")


def seeds_section(data):
    return ("### Every site slimmed: the spread over training seeds\n\n" + seeds_table(data)
            + "\n\n" + seeds_text(data) + f" {_reproduce(data)}\n")


def distillation_table(data) -> str:
    """fmnist_distillation.py's rows (its result page uses it too)."""
    rows = [[r["name"], r["what"], r["epochs"],
             f"{r['top1'] * 100:.2f} ({r['change_pt']:+.2f})", r["disagreements"],
             f"{_two_standard_errors(r['disagreements'], data['test_images']):.2f}"
             if r["disagreements"] else "", f"{r['held_out_loss']:.4f}",
             f"{r['seconds']:.0f}"] for r in data["rows"]]
    return table(rows, ["variant", "what changes", "epochs", "top-1 % (pt)",
                        "test images classified unlike the default",
                        "difference the test set resolves (pt)", "held-out loss after",
                        "seconds"])


def _two_standard_errors(disagreements: int, images: int) -> float:
    """Two standard errors, in points, of the top-1 difference between two models that
    classify ``disagreements`` of ``images`` test images differently."""
    return 200 * disagreements ** 0.5 / images


def distillation_text(data) -> str:
    return (f"Original top-1 {data['original_top1'] * 100:.2f} % on {data['labeled_set']}; "
            f"plan: every site found (`--select all`, {data['sites']} sites); "
            f"{data['images']} unlabeled calibration images (each with its mirror image), "
            f"fine-tuned once up to the distillation (closed forms and block reconstruction, "
            f"seed 0: {data['start_change_pt']:+.2f} points, {data['start_seconds']:.0f} s), "
            f"then distilled once per variant from those weights; the default: "
            f"{data['default']}. The difference the test set resolves: two standard errors "
            f"of the top-1 difference from the default, 200 x sqrt(disagreements) / "
            f"{data['test_images']} points{_seed_resolution(data)}. Held-out loss: the "
            f"distillation's relative squared errors on its held-out images, summed over its "
            f"targets{_loss_notes(data)}. Seconds: the distillation alone, this machine "
            f"({_machine(data)}).")


def _loss_notes(data) -> str:
    """Where a variant's held-out loss means something else: one target, or none held out."""
    names = {r["name"] for r in data["rows"]}
    notes = [note for name, note in (("output-only", "output-only: one target"),
                                     ("no-held-out", "no-held-out: on its fitted images"))
             if name in names]
    return f" ({'; '.join(notes)})" if notes else ""


def _seed_resolution(data) -> str:
    """What the seeds' rows say about the resolution: a training seed alone already moves
    the predictions of that many test images."""
    seeds = [r for r in data["rows"] if r["name"].startswith("seed-")]
    if not seeds:
        return ""
    worst = max(seeds, key=lambda r: r["disagreements"])
    return (f"; another training seed alone ({worst['name']}) classifies "
            f"{worst['disagreements']} test images differently")


def distillation_section(data):
    return (f"### Every site slimmed: the distillation's variants ({data['model']})\n\n"
            + distillation_table(data) + "\n\n" + distillation_text(data)
            + f" {_reproduce(data)}\n")


def plan_variants_table(data) -> str:
    base = data["original_top1"]
    rows = [[r["site"], r["variant"], f"{r['saving_ms']:+.4f}", f"{r['accuracy_cost']:.2f}",
             f"{(r['top1'] - base) * 100:+.2f}"] for r in data["variants"]]
    return table(rows, ["site", "variant", f"saving ({data['unit']}, this CPU)",
                        "predicted output error", "top-1 change (pt)"])


def plan_budgets_table(data) -> str:
    base = data["original_top1"]
    rows = [[f"{r['budget']}" + (" (default)" if r["budget"] == data["default_budget"] else ""),
             r["sites"], f"{r['predicted_speedup']:.2f}x", f"{r['accuracy_cost']:.2f}",
             f"{(r['top1'] - base) * 100:+.2f}"] for r in data["plans"]]
    return table(rows, ["--budget", "chosen variants", "predicted speedup",
                        "predicted output error", "top-1 change (pt)"])


def plan_accuracy_text(data) -> str:
    return (f"{data['model']}, original top-1 {data['original_top1'] * 100:.2f} % on "
            f"{data['labeled_set']}; every plan fine-tuned by the default fine-tune on "
            f"{data['images']} unlabeled Fashion-MNIST train images; savings and predicted "
            f"speedups measured on {data['target']}; predicted output error: each variant's "
            "held-out relative error of the logits with it alone slimmed (closed form on the "
            f"{data['planning_images']} planning images), a plan's their root sum of squares.")


def plan_accuracy_section(data):
    return ("### The planner's predictions against the fine-tuned top-1 (fmnist-inception)\n\n"
            + plan_budgets_table(data) + "\n\n"
            + ("Each variant that saves enough to be chosen, alone:\n\n" + plan_variants_table(data)
               + "\n\n" if data["variants"] else "")
            + plan_accuracy_text(data) + f" {_reproduce(data)}\n")


def finetune_time_table(data) -> str:
    """finetune_time.py's rows (its result page uses it too)."""
    budget = data["budget_seconds"]
    return table([[r["model"], r["sites"], r["calibration"],
                   "yes" if r["mirror_images"] else "no", "yes" if r["distilled"] else "no",
                   ", ".join(f"{w:.1f}" for w in r["walls"]), f"**{r['median']:.1f}**",
                   "yes" if r["median"] < budget else "no"] for r in data["rows"]],
                 ["model", "sites", "calibration", "with mirror images", "distilled",
                  "seconds per run", "median", f"under {budget} s"])


def finetune_time_text(data) -> str:
    return ("The model's default plan (the sites measured to pay on this CPU, planned first, "
            "not timed); default fine-tune options; each run its own process, timed from its "
            f"start to its exit (imports and every build included); {_machine(data)}.")


def finetune_time_section(data):
    return ("### Default fine-tune time\n\n" + finetune_time_table(data) + "\n\n"
            + finetune_time_text(data) + f" {_reproduce(data)}\n")


def training_step_table(data) -> str:
    """training_step.py's kernels (its result page uses it too)."""
    rows = [[f"`{k['name']}`", k["calls"], f"{k['ms']:.2f}",
             f"{k['ms'] / data['kernels_ms'] * 100:.0f} %"] for k in data["top_kernels"]]
    return table(rows, ["kernel (PrimFunc or VM builtin)", "calls per step", "ms per step",
                        "share"])


def training_step_text(data) -> str:
    return (f"{data['model']}, {data['sites']} sites: a step (loss, TVM gradients of every "
            f"learned conv, batch {data['batch']}, the weights copied in and the gradients "
            f"out) takes **{data['step_ms']:.1f} ms**, median of {data['steps']} "
            f"({data['step_gmacs']:.1f} GMAC/s counting 3x the forward's "
            f"{data['macs_per_image'] / 1e6:.1f} M multiply-adds per image); the forward "
            f"loss alone {data['forward_ms']:.1f} ms, the original's forward to the targets "
            f"(the teacher, every step with blends) {data['teacher_ms']:.1f} ms; the kernels "
            f"above are the step's slowest of {data['kernels_ms']:.1f} ms instrumented; "
            f"compiling both took {data['compile_seconds']:.0f} s; {_machine(data)}.")


def training_step_section(data):
    return ("### Distillation training step\n\n" + training_step_text(data) + "\n\n"
            + training_step_table(data) + f"\n\n{_reproduce(data)}\n")


def tuning_section(tuning):
    rows = [[d["target"], d["database"], d["trials"], d["model_ms"]["default_schedule"],
             d["model_ms"]["tuned"], f"{d['model_ms']['speedup']}x"]
            for d in tuning["databases"] if d.get("model_ms")]
    return ("### Committed tuning_logs\n\n"
            + table(rows, ["target", "database", "trials", "generic schedule ms", "tuned ms",
                            "speedup"])
            + f"\n\nWhole model right after tuning, on the tuning machine. {_reproduce(tuning)}\n")


def render() -> str:
    """README's Results section from the result files that exist."""
    zoo, accuracy = _load("zoo_models"), _load("fmnist_inception_accuracy")
    parts = ["## Results\n\nGenerated by `python benchmarks/run_all.py` from "
             "`benchmarks/results/*.json`; every table says how to reproduce it.\n"]
    if zoo:
        parts.append(zoo_section(zoo))
    parts.append(paper_section(zoo, accuracy))
    plans = _load("plans_host"), _load("plans_cortex-a72")
    if any(plans):
        parts.append(plans_section(*plans))
    for data, section in ((_peers("", "onnxruntime_alone_ms"), peers_section),
                          (_peers("_cortex-a72", "mac_floor_instructions"),
                           emulated_peers_section)):
        if data:
            parts.append(section(data))
    for name, section in (("fmnist_inception_accuracy", accuracy_section),
                          ("fmnist_vgg_accuracy", accuracy_section),
                          ("fmnist_layerwise_limits", limits_section),
                          ("fmnist_reconstruction", reconstruction_section),
                          ("fmnist_seeds", seeds_section),
                          ("fmnist_inception_distillation", distillation_section),
                          ("fmnist_vgg_distillation", distillation_section),
                          ("plan_accuracy", plan_accuracy_section),
                          ("finetune_time", finetune_time_section),
                          ("training_step", training_step_section),
                          ("googlenet_branch", branch_section), ("tuning_logs", tuning_section)):
        data = _load(name)
        if data:
            parts.append(section(data))
    return "\n".join(parts)


def update_readme(text=None) -> bool:
    """Replace README's generated section; True if it changed."""
    readme = README.read_text()
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"{README}: the {BEGIN} / {END} markers are missing")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + BEGIN + "\n" + (text or render()) + END + tail
    README.write_text(new)
    return new != readme


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    ap.add_argument("--readme-only", action="store_true",
                    help="do not run benchmarks; regenerate README's section only")
    args = ap.parse_args()
    names = list(BENCHMARKS)
    if args.only:
        names = args.only.split(",")
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            raise SystemExit(f"--only: unknown benchmark(s) {', '.join(unknown)}; "
                             f"choose from {', '.join(BENCHMARKS)}")
    if not args.readme_only:
        for i, name in enumerate(names):
            script = BENCHMARKS[name][0]
            print(f"[run_all] {i + 1}/{len(names)} {name}: python benchmarks/"
                  f"{' '.join(script)}", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, str(HERE / script[0]), *script[1:]], cwd=ROOT,
                           check=True)
    changed = update_readme()
    print(f"[run_all] README Results {'updated' if changed else 'unchanged'}", file=sys.stderr)
    import reliability  # README's Reliability count, from results/reliability.json

    changed = reliability.update_readme()
    print(f"[run_all] README Reliability count {'updated' if changed else 'unchanged'}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
