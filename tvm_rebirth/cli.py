"""The `tvm-rebirth` command line (README's Errors section and ARCHITECTURE.md: a table by
default, exactly one JSON object on stdout with --json, logs on stderr, one-line errors and
exit code 2).

Only parsing and rendering: every command turns its arguments into flow's typed args and
renders the payload flow returns (tvm_rebirth/flow.py does the work)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import traceback

from . import flow
from .errors import RebirthError
from .compile.targets import preset_names
from .planning.selection import DEFAULT_BUDGET
from .report.output import table
from .passes.site import BRANCH_WIDTHS, KERNEL_POLICIES, SITE_KINDS, width_fraction


logger = logging.getLogger("tvm_rebirth.cli")  # also when run as __main__


def _emit(args, payload: dict, text: str) -> None:
    if args.json:
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        sys.stdout.write(text + "\n")


# -- commands: parse -> flow -> render ------------------------------------------------------
def cmd_models(args) -> None:
    payload = flow.models()
    rows = [[m["name"] + (" (default)" if m["default"] else ""), m["description"],
             "x".join(map(str, m["input_shape"])), "yes" if m["cached"] else "no"]
            for m in payload["models"]]
    _emit(args, payload, table(rows, ["model", "architecture", "input", "cached"]))


def _parse_kinds(text: str) -> list:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in SITE_KINDS]
    if bad or not kinds:
        raise RebirthError(f"--kinds: unknown kind(s) {', '.join(bad) or '(none)'}; "
                           f"use {','.join(SITE_KINDS)}")
    return kinds


def _site_rows(sites) -> list:
    rows = []
    for s in sites:
        changes = [f"{o.replaces}: {o.describe()} -> {n.describe()}"
                   for o, n in zip(s.old_conv, s.new_conv)]
        ops = ",".join(s.ops)
        flags = ("exact" if s.exact else "learned") + ("" if s.enabled else ", disabled")
        rows.append([s.id, s.kind, ops, changes[0] if changes else "", flags])
        rows.extend(["", "", "", c, ""] for c in changes[1:])
    return rows


def _selection(args) -> flow.SelectOptions | None:
    """plan's --select/--target/--tracker/--key/--budget/--calib/--images as SelectOptions;
    None for --select all (and for --check, which validates a plan as it is)."""
    select = args.select or ("all" if args.check else "paying")
    if select == "all":
        given = [f for f, v in (("--target", args.target), ("--tracker", args.tracker),
                                ("--key", args.key), ("--budget", args.budget),
                                ("--calib", args.calib), ("--images", args.images))
                 if v is not None]
        if given:
            raise RebirthError(f"--select all enables every site found: {'/'.join(given)} "
                               "only apply to --select paying")
        return None
    given = [f for f, v in (("--policy", args.policy), ("--branch-widths", args.branch_widths))
             if v]
    if given:
        raise RebirthError(f"--select paying chooses each site's variant itself: drop "
                           f"{'/'.join(given)}")
    return flow.SelectOptions(target=args.target, tracker=args.tracker, key=args.key,
                              budget=args.budget, calib=args.calib,
                              images=32 if args.images is None else args.images)


def _selection_text(selection: dict) -> str:
    """The per-site choice table of a selected plan, and the prediction."""
    try:
        unit = selection["unit"]
        rows = []
        for site_id, entry in selection["sites"].items():
            gains = ", ".join(f"{v['variant']} {v['saving']:+.3g}" + (
                f" (err {v['accuracy_cost']:.2f})" if v["accuracy_cost"] else "")
                for v in entry["variants"])
            rows.append([site_id, entry["variant"], gains, entry["reason"]])
        text = table(rows, ["site", "chosen", f"saving per variant ({unit})", "why"])
        return (text + f"\n\npredicted on {selection['target']}: {selection['model_cost']:.4g}"
                f" -> {selection['predicted_cost']:.4g} {unit} "
                f"({selection['predicted_speedup']:.2f}x); accuracy cost "
                f"{selection['accuracy_cost']:.2f} of budget {selection['budget']}")
    except (KeyError, TypeError, ValueError, AttributeError):  # an edited plan file's record
        return "(the plan's selection record is incomplete: run `plan` again to renew it)"


def _sources(measured: dict) -> str:
    """' (znver3: 12)': which databases the tuned functions' records came from."""
    by_source = measured.get("tuned_by_source") or {}
    return f" ({', '.join(f'{k}: {v}' for k, v in by_source.items())})" if by_source else ""


def cmd_plan(args) -> None:
    if args.check:
        given = [flag for flag, value in (("-o", args.output), ("--policy", args.policy),
                                          ("--kinds", args.kinds),
                                          ("--branch-widths", args.branch_widths),
                                          ("--select", args.select), ("--target", args.target),
                                          ("--tracker", args.tracker), ("--key", args.key),
                                          ("--budget", args.budget), ("--calib", args.calib),
                                          ("--images", args.images)) if value is not None]
        if given:
            raise RebirthError(f"--check validates an existing plan as it is: "
                               f"{'/'.join(given)} would be ignored; drop {'/'.join(given)}")
    plan, payload = flow.plan_command(flow.PlanArgs(
        model=args.model, output=args.output, check=args.check,
        policy=args.policy or "keep-kernel", kinds=_parse_kinds(args.kinds or
                                                                 ",".join(SITE_KINDS)),
        branch_widths=args.branch_widths or "carry", selection=_selection(args),
        **_input_args(args)))
    out = args.check or args.output or os.path.basename(payload["plan"])
    text = table(_site_rows(plan.sites), ["site", "kind", "ops", "old -> new conv", "exact"])
    if plan.selection:
        text += "\n\n" + _selection_text(plan.selection)
    counts = ", ".join(f"{v} {k}" for k, v in payload["counts"].items())
    done = "is valid" if args.check else "written to"
    text += f"\n\n{payload['model']}: {counts} site(s); plan {done} {out}"
    for r in plan.rejected:
        text += f"\nrejected {r['id']}: {r['reason']}"
    if payload["nothing_to_slim"]:
        text += f"\nnothing to slim: {payload['nothing_to_slim']}"
    _emit(args, payload, text)


def _input_args(args) -> dict:
    """--input/--input-shape as flow's ModelArgs/PlanArgs fields."""
    return {"input": args.input, "input_shape": args.input_shape}


def _rebirth_options(args) -> flow.RebirthOptions:
    """--plan/--weights/--calib/--images (and finetune's --e2e*) as flow options."""
    e2e = flow.E2EOptions()
    if hasattr(args, "e2e"):
        e2e = flow.E2EOptions(enabled=args.e2e, images=args.e2e_images, epochs=args.e2e_epochs,
                              labels=args.e2e_labels, flip=args.e2e_flip)
    return flow.RebirthOptions(plan=args.plan, weights=getattr(args, "weights", None),
                               calib=args.calib, images=args.images, e2e=e2e,
                               select=getattr(args, "select", None) or "paying",
                               budget=getattr(args, "budget", None),
                               reconstruct_epochs=getattr(args, "reconstruct_epochs",
                                                          flow.RECONSTRUCT_EPOCHS),
                               distill_epochs=getattr(args, "distill_epochs",
                                                      flow.DISTILL_EPOCHS),
                               mirror=not getattr(args, "no_mirror", False),
                               seed=getattr(args, "seed", 0),
                               implicit_plan=getattr(args, "rebirth", False))


def _block_cell(block) -> str:
    """The finetune table's block reconstruction cell."""
    if block is None:
        return "-"
    if "skipped" in block:
        return f"not trained (too big: {block['skipped']})"
    return (f"{block['held_out_before']:.4f} -> {block['held_out_after']:.4f} "
            f"(to {block['ends_at']})")


def cmd_finetune(args) -> None:
    payload = flow.finetune_command(flow.FinetuneArgs(
        model=args.model, rebirth=_rebirth_options(args), output=args.output,
        **_input_args(args)))
    out = args.output or os.path.basename(payload["weights"])
    rows = [[r["id"], "exact" if r["exact"] else "learned",
             "-" if r["rel_error"] is None else f"{r['rel_error']:.4f}",
             _block_cell(r.get("block")),
             f"{r['seconds']:.1f}"]
            for r in payload["sites"]]
    text = table(rows, ["site", "kind", "rel. error", "block loss (held out)", "seconds"]) + (
        f"\n\nweights written to {out} ({payload['calibration']}"
        f"{', each with its mirror image' if payload['mirror_images'] else ''}); "
        f"{payload['seconds']}s")
    distilled = payload.get("distillation")
    if distilled and "skipped" in distilled:
        text += f"\ndistillation on the calibration images: skipped ({distilled['skipped']})"
    elif distilled:
        text += (f"\ndistillation on the calibration images ({distilled['loss']}): held-out "
                 f"loss {distilled['held_out_loss_before']:.4f} -> "
                 f"{distilled['held_out_loss_after']:.4f} (epoch {distilled['kept_epoch']}/"
                 f"{distilled['epochs']}, {distilled['seconds']}s)")
    if "end_to_end" in payload:
        e2e = payload["end_to_end"]
        text += (f"\nend-to-end refinement ({e2e['loss']}): held-out output error "
                 f"{e2e['output_rel_error_before']:.4f} -> {e2e['output_rel_error_after']:.4f}"
                 + (f", held-out top-1 {e2e['held_out_top1_before'] * 100:.2f}% -> "
                    f"{e2e['held_out_top1_after'] * 100:.2f}%" if "held_out_top1_after" in e2e
                    else "")
                 + f" ({e2e['epochs']} epochs on {e2e['images']} images, {e2e['seconds']}s)")
    _emit(args, payload, text + _diverging_line(flow.diverging_stages(payload)))


def _diverging_line(stages: dict) -> str:
    """The line that names the fine-tune's stages that warned (flow.diverging_stages), or ""."""
    if not stages:
        return ""
    return ("\nmore calibration images would help (fitted far better than held out): "
            + flow.diverging_stages_text(stages))


def cmd_bench(args) -> None:
    payload = flow.bench(flow.BenchArgs(
        model=args.model, rebirth=_rebirth_options(args), tracker=args.tracker, key=args.key,
        target=args.target, session_timeout=args.session_timeout, rounds=args.rounds,
        profile=args.profile, output=args.output, **_input_args(args)))
    o, r = payload["original"], payload["rebirth"]
    latency = "latency (ms, median)" if not payload.get("latency_is_emulated") else \
        "latency (ms, EMULATED: not phone speed)"
    rows = [[latency, o["latency_ms"], r["latency_ms"], f"{payload['speedup']}x"],
            ["planned memory (MB)", o["memory_mb"], r["memory_mb"],
             "n/a" if payload["memory_ratio"] is None else f"{payload['memory_ratio']}x"],
            ["GFLOPs", o["gflops"], r["gflops"], f"{payload['gflops_ratio']}x"]]
    if "instructions" in o:
        rows.append(["instructions/inference (qemu cortex-a72, 1 thread)", o["instructions"],
                     r["instructions"], f"{payload['instructions_ratio']}x"])
    if "tuned_functions" in o:
        rows.append(["tuned_functions (from tuning_logs)",
                     f"{o['tuned_functions']}/{o['functions']}{_sources(o)}",
                     f"{r['tuned_functions']}/{r['functions']}{_sources(r)}", ""])
    if "rel_err" in payload:
        rows.append([f"rel_err ({payload.get('compared', 'output')}, vs original)", "",
                     f"{payload['rel_err']:.4g}", ""])
    text = table(rows, ["", "original", "rebirth", "ratio"]) + (
        f"\n\nmax |original - rebirth| = {payload['max_abs_err']:.4g} "
        f"(outputs up to {payload['max_abs_output']:.4g}); {payload['device']}")
    if args.profile:
        from .report.profile import layer_time_rows

        rows = layer_time_rows({k: payload[k]["time_by_layer_type"]
                                for k in ("original", "rebirth")})
        text += "\n\ntime per layer type (ms per inference, share):\n" + table(
            rows, ["layer type", "original", "rebirth"])
        for variant in ("original", "rebirth"):
            rows = [[c["kernel"], c["ms"], c["gflops"],
                     f"{c['peak_share']:.0%}" if c["peak_share"] is not None else "-"]
                    for c in payload[variant]["conv_throughput"]]
            text += f"\n\nheaviest conv kernels, {variant}:\n" + table(
                rows, ["kernel", "ms", "GFLOP/s", "of fp32 peak"])
        if any("winograd" in c["kernel"] for v in ("original", "rebirth")
               for c in payload[v]["conv_throughput"]):
            text += "\n(Winograd kernels: effective GFLOP/s, the direct 3x3 conv's work)"
    if "predicted" in payload:
        p = payload["predicted"]
        text += (f"\nthe plan predicted {p['speedup']}x ({p['unit']} on {p['target']}); "
                 f"measured {payload['speedup']}x here")
    if "device_vs_host_max_abs_err" in payload:
        text += ("\ndevice vs host build: max abs difference "
                 f"{payload['device_vs_host_max_abs_err']:.3g}")
    _emit(args, payload, text)


def cmd_eval(args) -> None:
    payload = flow.evaluate(flow.EvalArgs(model=args.model, rebirth=_rebirth_options(args),
                                          limit=args.limit, **_input_args(args)))
    rows = [[name, f"{payload[name]['top1'] * 100:.2f}", f"{payload[name]['top5'] * 100:.2f}"]
            for name in ("original", "rebirth")]
    text = table(rows, ["model", "top-1 %", "top-5 %"]) + (
        f"\n\n{payload['labeled_set']}; predictions agree on {payload['agreement'] * 100:.2f}%")
    _emit(args, payload, text + _diverging_line(payload.get("diverging")))


def cmd_build(args) -> None:
    payload = flow.build(flow.BuildArgs(model=args.model, rebirth=_rebirth_options(args),
                                        target=args.target, output=args.output,
                                        tuning_logs=not args.no_tuning_logs,
                                        **_input_args(args)))
    out = args.output or os.path.basename(payload["path"])
    _emit(args, payload, f"{payload['variant']} {payload['model']} for {args.target} -> {out} "
                         f"({payload['bytes'] / 2 ** 20:.1f} MiB, planned activations "
                         f"{payload['planned_memory_mb']} MB, {payload['tuned_functions']}/"
                         f"{payload['functions']} functions from tuning_logs{_sources(payload)}, "
                         f"{payload['seconds']}s)")


def cmd_tune(args) -> None:
    payload = flow.tune(flow.TuneArgs(
        model=args.model, trials=args.trials, rebirth=_rebirth_options(args),
        target=args.target, max_tasks=args.max_tasks, build_timeout=args.build_timeout,
        measure=not args.no_measure, log_dir=args.log_dir, tracker=args.tracker, key=args.key,
        **_input_args(args)))
    tasks = payload["tasks"]
    rows = sorted(([n, t["calls"], t["default_ms"], t["best_ms"],
                    f"{(t.get('time_share') or 0) * 100:.1f}%"] for n, t in tasks.items()),
                  key=lambda r: -float(r[4][:-1]))
    text = table(rows[:15], ["task", "calls", "default (ms)", "best (ms)", "time share"]) + (
        f"\n\n{payload['trials']} trials in {payload['wall_seconds']:.0f}s; sum of task times "
        f"{payload['default_ms']} ms with the default schedule -> {payload['best_ms']} ms tuned"
        f"\ndatabase: {payload['database']}")
    if payload["model_ms"]:
        m = payload["model_ms"]
        text += (f"\nwhole model: {m['default_schedule']} ms generic schedule -> {m['tuned']} ms "
                 f"tuned ({m['speedup']}x, {m['tuned_functions']}/{m['functions']} functions)")
    _emit(args, payload, text)


def cmd_device(args) -> None:
    payload = flow.device(flow.DeviceArgs(action=args.action, port=args.port, local=args.local,
                                          emulated=not args.no_emulated, servers=args.servers))
    if args.action == "stop":
        stopped = payload["stopped"]
        _emit(args, payload, f"stopped {len(stopped)} process(es)" if stopped
              else "nothing was running")
        return
    warnings = [f"warning: {w}" for w in payload["warnings"]]
    if not payload["running"]:
        _emit(args, payload, "\n".join(["no devices running (`tvm-rebirth device start`)"]
                                       + warnings))
        return
    rows = [[key, q.get("free", 0), q.get("pending", 0)] for key, q in payload["keys"].items()]
    tracker = (f"tracker {payload['tracker']} ("
               + ("answers" if payload["tracker_answers"] else "does not answer")
               + (", port in use" if payload["port_in_use"] else ", port free") + ")")

    def process_line(p):
        state = p["state"]
        if state == "leader dead, group running":
            state = "dead; its group runs on: pid " + ", ".join(map(str, p["group"]))
        return f"  {p['role']}: pid {p['pid']} ({state})"

    text = "\n".join([tracker, table(rows, ["key", "free", "pending"])]
                     + [process_line(p) for p in payload["processes"]]
                     + warnings)
    _emit(args, payload, text)


def cmd_demo(args) -> None:
    """plan -> fine-tune -> slim -> build -> bench (CPU, emulated Cortex-A72) on GoogLeNet;
    accuracy on fmnist-inception; report folder with JSON, markdown and PNG plots."""
    from .demo import diverging_line, run_demo, stage_line, summary_rows

    summary = run_demo(args.report_dir, images=args.images, rounds=args.rounds,
                       eval_limit=args.eval_limit, device=not args.no_device)
    text = table(summary_rows(summary), ["", "original", "rebirth", "change"])
    warning = diverging_line(summary["accuracy"])
    _emit(args, summary, f"{text}\n\nstages: {stage_line(summary)} "
                         f"(total {summary['total_seconds']:.0f}s)\nreport: {summary['report_dir']}"
                         + (f"\n{warning}" if warning else ""))


# -- entry point -----------------------------------------------------------------------------
def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: '{text}'") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (a count: images, rounds, epochs, a limit)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0 (epochs that may be switched off)."""
    return _int_at_least(text, 0)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0 (seconds)."""
    value = _finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1 to 65535."""
    value = _int_at_least(text, 1)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (at most 65535), got {value}")
    return value


def accuracy_budget(text: str) -> float:
    """argparse type: an accuracy budget, a finite number of at least 0."""
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def branch_widths(text: str) -> str:
    """argparse type: carry, paper, or a fraction of carry between 0 and 1 ("0.75")."""
    if text in BRANCH_WIDTHS or width_fraction(text) is not None:
        return text
    raise argparse.ArgumentTypeError(f"'{text}': use {' or '.join(BRANCH_WIDTHS)}, or a "
                                     "fraction of carry between 0 and 1 (e.g. 0.75)")


def input_shape(text: str) -> list:
    """argparse type: N,C,H,W as four positive integers (--input-shape 1,3,224,224)."""
    try:
        dims = [int(d) for d in text.replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,C,H,W, got '{text}'") from None
    if len(dims) != 4 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected four positive dims N,C,H,W, got '{text}'")
    return dims


def add_input_options(p) -> None:
    """--input and --input-shape: which model input takes the images, and its shape."""
    p.add_argument("--input", metavar="NAME",
                   help="the image input of a model with several inputs (default: its only "
                        "float32 4-D input)")
    p.add_argument("--input-shape", type=input_shape, metavar="N,C,H,W",
                   help="fixed shape of the image input (needed when its height/width are "
                        "dynamic)")


TARGET_HELP = ("a preset (" + ", ".join(preset_names()) + "), a TVM target tag (e.g. "
               "arm/rk3399, raspberry-pi/4b-aarch64; tvm.target.list_tags()), a target kind "
               "(llvm) or a target dict as JSON, e.g. '{\"kind\": \"llvm\", \"mtriple\": "
               "\"aarch64-linux-gnu\", \"mcpu\": \"cortex-a55\"}'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tvm-rebirth", description="DeepRebirth layer slimming for Apache TVM Relax")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, func, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        p.set_defaults(func=func)
        return p

    add("models", cmd_models, "list the built-in model zoo")
    p = add("plan", cmd_plan, "find the rebirth sites that pay on the target and write an "
                              "editable plan")
    p.description += (" (--select all: every site found, whatever the target; --select "
                      "paying --target T: only the variants measured to pay on T)")
    p.add_argument("model", help="zoo name (see `tvm-rebirth models`) or path to an .onnx file")
    p.add_argument("-o", "--output", help="plan file to write (default: <model>.plan.yaml)")
    p.add_argument("--kinds", help="site kinds to look for (default: streamline,branch)")
    p.add_argument("--check", metavar="PLAN",
                   help="validate an existing (edited) plan against MODEL instead of writing one")
    p.add_argument("--policy", choices=KERNEL_POLICIES,
                   help="rebirth conv kernel: keep-kernel (the paper, default) or "
                        "keep-receptive-field")
    p.add_argument("--branch-widths", type=branch_widths, metavar="carry|paper|F",
                   help="branch sites' reducer widths: carry (the pool branch's receiver's "
                        "reducer grows by the pool projection's width; default), paper "
                        "(3x3 reducer halved: fewer FLOPs, more error), or a fraction F of "
                        "carry's widths (0 < F < 1, e.g. 0.75)")
    p.add_argument("--select", choices=("all", "paying"),
                   help="paying (default): measure every site variant on the target and "
                        "keep what is predicted faster and no bigger, within --budget; all: "
                        "every site found, default variants (for studies and tests)")
    p.add_argument("--target", help="--select paying: measure on this target (default: this "
                   f"CPU; a Cortex-A preset counts instructions on the emulated core): "
                   f"{TARGET_HELP}")
    p.add_argument("--tracker", help="--select paying: measure on a device, HOST:PORT")
    p.add_argument("--key", help="the device key on --tracker")
    p.add_argument("--budget", type=accuracy_budget,
                   help="--select paying: accuracy budget, the chosen variants' predicted "
                   "relative error of the model's output together "
                   f"(each measured alone; they add in squares; default {DEFAULT_BUDGET})")
    p.add_argument("--calib", help="--select paying: images for the accuracy estimates "
                   "(folder or .npy; default: the model's calibration source)")
    p.add_argument("--images", type=positive_int,
                   help="--select paying: how many (default 32)")
    add_input_options(p)
    def add_flow(p, weights=True):
        p.add_argument("model", help="zoo name or path to an .onnx file")
        p.add_argument("--plan", help="plan file (default: plan the sites that pay on this CPU; "
                                          "--select all: every site)")
        if weights:
            p.add_argument("--weights", help="weights from `tvm-rebirth finetune` "
                                             "(default: fine-tune first)")
        p.add_argument("--calib", help="calibration images: a folder of JPEG/PNG files or a "
                                       ".npy array (default: the zoo model's own source)")
        p.add_argument("--images", type=positive_int,
                       help="calibration images (default: sized for the model: 2048 for "
                            "small ones like fmnist-inception, 256 for GoogLeNet and bigger)")
        p.add_argument("--select", choices=("paying", "all"),
                       help="without --plan: plan the sites measured to pay on the device "
                            "(paying, default) or every site found (all)")
        p.add_argument("--budget", type=accuracy_budget,
                       help="without --plan: accuracy budget of --select paying (default "
                            f"{DEFAULT_BUDGET})")
        p.add_argument("--reconstruct-epochs", type=non_negative_int,
                       default=flow.RECONSTRUCT_EPOCHS,
                       help="epochs of block reconstruction with TVM gradients after each "
                            f"site's closed-form fit ({flow.RECONSTRUCT_EPOCHS}; 0: off)")
        p.add_argument("--distill-epochs", type=non_negative_int, default=flow.DISTILL_EPOCHS,
                       help="then epochs of whole-network distillation on the calibration "
                            f"images ({flow.DISTILL_EPOCHS}; 0: off; skipped for models too "
                            "big to afford it, e.g. GoogLeNet at 256 images)")
        p.add_argument("--no-mirror", action="store_true",
                       help="fit on the calibration images alone (default: each image and "
                            "its horizontal mirror image)")
        p.add_argument("--seed", type=non_negative_int, default=0,
                       help="seed of the fine-tune's training: batch order and blends (0; "
                            "the same seed gives the same weights, others show the noise)")
        add_input_options(p)

    def add_variant(p, verb):
        """MODEL, the original or (with --plan/--weights or --rebirth) rebirth variant, and
        --target."""
        p.add_argument("model", help="zoo name or path to an .onnx file")
        p.add_argument("--plan", help=f"plan file: {verb} the rebirth model")
        p.add_argument("--rebirth", action="store_true",
                       help=f"{verb} the rebirth model without a plan file: the sites measured "
                            "to pay on --target" + (" (or the --tracker/--key device)"
                                                    if verb == "tune" else "")
                            + ", fine-tuned on --images calibration images")
        p.add_argument("--weights", help="weights for --plan (default: fine-tune first)")
        p.add_argument("--calib", help="calibration images when fine-tuning is needed")
        p.add_argument("--images", type=positive_int,
                       help="calibration images (default: sized for the model: 2048 for "
                            "small ones like fmnist-inception, 256 for GoogLeNet and bigger)")
        p.add_argument("--target", default="host",
                       help=f"what to compile for: {TARGET_HELP} (default host)")
        add_input_options(p)

    p = add("finetune", cmd_finetune, "learn the rebirth convs of a plan from unlabeled images")
    add_flow(p, weights=False)
    p.add_argument("-o", "--output", help="weights file (default: <model>.weights.npz)")
    p.add_argument("--e2e", action="store_true",
                   help="then refine all learned convs end to end by distilling the original "
                        "outputs with TVM gradients (with --e2e-labels: retrain on labels, the "
                        "original as teacher)")
    p.add_argument("--e2e-images", type=positive_int, default=4096,
                   help="images for end-to-end refinement (4096)")
    p.add_argument("--e2e-epochs", type=positive_int, default=8, help="epochs of it (8)")
    p.add_argument("--e2e-labels", nargs="?", const="source", metavar="LABELS.npy",
                   help="retrain with labels, the original model as teacher: class indices "
                        "for the rows of --calib FILE.npy; alone, the zoo model's own labeled "
                        "training set")
    p.add_argument("--e2e-flip", action="store_true",
                   help="add random horizontal flips during end-to-end refinement")
    p = add("bench", cmd_bench, "original vs rebirth side by side: latency, memory, GFLOPs")
    add_flow(p)
    p.add_argument("--tracker", help="RPC tracker HOST:PORT: run both on a device from it")
    p.add_argument("--key", help="device key on the tracker (with --tracker)")
    p.add_argument("--target", help=f"the device's target (with --tracker): {TARGET_HELP} "
                                    "(default: the key when it names a preset, host for "
                                    "'local')")
    p.add_argument("--session-timeout", type=positive_float, default=3600.0,
                   help="seconds the device session may last (3600)")
    p.add_argument("--rounds", type=positive_int, default=7,
                   help="interleaved timing rounds (7)")
    p.add_argument("--profile", action="store_true",
                   help="also time every kernel and report time per layer type (this CPU)")
    p.add_argument("-o", "--output", help="also write the JSON report to this file")
    p = add("eval", cmd_eval, "top-1/top-5 of original and rebirth on the labeled set")
    add_flow(p)
    p.add_argument("--limit", type=positive_int,
                   help="evaluate only the first N labeled images")
    p = add("build", cmd_build, "compile the original (or, with --plan/--weights or "
                                "--rebirth, the rebirth) model into a deployable shared library")
    add_variant(p, "build")
    p.add_argument("-o", "--output", help="library path (default: <model>-<variant>-<target>.so)")
    p.add_argument("--no-tuning-logs", action="store_true",
                   help="ignore tuning_logs: generic schedule everywhere")
    p = add("tune", cmd_tune, "MetaSchedule-tune the (original, or with --plan/--weights or "
                              "--rebirth the rebirth) model into a tuning_logs database that "
                              "builds apply")
    add_variant(p, "tune")
    p.add_argument("--trials", type=positive_int, required=True,
                   help="searched trials the database should hold in total (a rerun continues)")
    p.add_argument("--max-tasks", type=positive_int,
                   help="search only the N heaviest tasks (default: about trials / 16)")
    p.add_argument("--build-timeout", type=positive_float, default=60.0,
                   help="seconds before a candidate's compilation is killed (60)")
    p.add_argument("--no-measure", action="store_true",
                   help="skip timing the whole model before/after at the end")
    p.add_argument("--log-dir", help="database folder (default: <cache>/tuning_logs/<target>/"
                                     "<model>[-rebirth]/ in the user cache, $TVM_REBIRTH_CACHE "
                                     "or ~/.cache/tvm-rebirth; builds read the user cache "
                                     "first, then the tuning_logs installed with the package)")
    p.add_argument("--tracker", help="RPC tracker host:port (device tuning)")
    p.add_argument("--key", help="device key on the tracker")
    p = add("device", cmd_device, "RPC tracker + emulated Cortex-A72 (and this host) on "
                                  "127.0.0.1")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--port", type=port_number,
                   help="tracker port (default: the first free from 9190)")
    p.add_argument("--local", action="store_true",
                   help="also serve this host under key 'local'")
    p.add_argument("--no-emulated", action="store_true",
                   help="no emulated Cortex-A72 (with --local: a host-only tracker)")
    p.add_argument("--servers", type=int, default=1,
                   help="emulated Cortex-A72 servers under the key (a small farm; default 1)")
    p = add("demo", cmd_demo, "run the whole flow on the default model")
    p.add_argument("--report-dir", default="rebirth-demo", help="where the report goes")
    p.add_argument("--images", type=positive_int,
                   help="calibration images per model (default: 64 for GoogLeNet, whose "
                        "weights only need to be plausible for speed and memory; "
                        "fmnist-inception, whose accuracy is reported, its default count: "
                        "2048)")
    p.add_argument("--rounds", type=positive_int, default=7,
                   help="interleaved timing rounds (7)")
    p.add_argument("--eval-limit", type=positive_int, help="evaluate on the first N test images only")
    p.add_argument("--no-device", action="store_true",
                   help="skip the emulated Cortex-A72 stage (tracker + qemu device)")
    return parser


def _log_to_stderr() -> None:
    """Progress of every stage on stderr, one plain line per message (stdout is the table or
    the JSON object)."""
    root = logging.getLogger("tvm_rebirth")
    if not any(getattr(h, "tvm_rebirth_cli", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.tvm_rebirth_cli = True
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def main(argv=None) -> int:
    os.environ.setdefault("TVM_NUM_THREADS", str(min(os.cpu_count() or 1, 2)))
    args = build_parser().parse_args(argv)
    _log_to_stderr()
    try:
        args.func(args)
    except RebirthError as err:
        print(f"tvm-rebirth {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tvm-rebirth {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug of ours: one line, the traceback only on request
        if os.environ.get("TVM_REBIRTH_DEBUG"):
            traceback.print_exc()
        first = (str(err).strip().splitlines() or [""])[0]
        print(f"tvm-rebirth {args.command}: internal error: {type(err).__name__}: {first} "
              "(set TVM_REBIRTH_DEBUG=1 for the traceback)", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
