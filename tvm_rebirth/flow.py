"""The one orchestrator of tvm-rebirth: the CLI, the demo and every benchmark run the flow here.

    MODEL (zoo name | .onnx)   load()
      -> RebirthPlan            plan_for(): a plan file, validated | select_plan(): what is
                                measured to pay on the target | every site found (--select all)
      -> calibration images     calibration(): none needed when every enabled site is exact
      -> RebirthWeights         weights_for(): a weights file, checked | fine_tune() (+ e2e)
      -> rebirth IRModule       slim() = passes.rebirth_pipeline(plan, weights)(model.mod)
         (rebirth_model() is all four: "MODEL's rebirth model, defaults where nothing given")
      -> commands               plan_command, finetune_command, bench, evaluate, build, tune,
                                models, device: each returns its JSON payload (a plain dict;
                                plan_command: the plan and its payload)

Functions take typed option dataclasses (RebirthOptions, BenchArgs, ...) and a ``tag``: the
command whose progress lines they log (``[bench] ...``); ``tag=None`` logs nothing of the
implicit-default steps. Errors are RebirthError with one-line messages.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

from .errors import RebirthError, require_count, require_number
from .learn.finetune import (DISTILL_EPOCHS, RECONSTRUCT_EPOCHS,  # noqa: F401
                             DistillSettings, diverging_stages, diverging_stages_text)
from .passes.site import SITE_KINDS

logger = logging.getLogger(__name__)


# -- options -------------------------------------------------------------------------------
@dataclass
class E2EOptions:
    """End-to-end refinement after layer-wise fitting (finetune --e2e ...)."""

    enabled: bool = False
    images: int = 4096  # images it trains on
    epochs: int = 8
    labels: str | None = None  # "source" (the zoo model's labeled set) or a LABELS.npy path
    flip: bool = False  # random horizontal flips

    def check(self) -> None:
        """Refuse labels or flips without end-to-end refinement, and counts below one."""
        require_positive(self.images, "--e2e-images")
        require_positive(self.epochs, "--e2e-epochs")
        if (self.labels or self.flip) and not self.enabled:
            raise RebirthError("--e2e-labels and --e2e-flip refine end to end: add --e2e")


@dataclass
class RebirthOptions:
    """Where a rebirth model's plan and weights come from; None means the default."""

    plan: str | None = None  # plan file; None: plan per ``select``
    weights: str | None = None  # weights file learned for ``plan``; None: fine-tune
    calib: str | None = None  # calibration folder or .npy; None: the zoo model's own source
    images: int | None = None  # calibration images; None: sized for the model
    # (learn.calib.default_image_count)
    policy: str = "keep-kernel"
    kinds: tuple = SITE_KINDS
    branch_widths: str = "carry"
    # without a plan file: "paying" plans what is measured to pay on the command's device
    # (select_plan), "all" every site found with default variants
    select: str = "paying"
    budget: float | None = None  # accuracy budget of "paying" (None: the default)
    # epochs of block reconstruction with TVM gradients after each site's closed form (0: off)
    reconstruct_epochs: int = RECONSTRUCT_EPOCHS
    # epochs of whole-network distillation on the calibration images after that (0: off)
    distill_epochs: int = DISTILL_EPOCHS
    # how it trains (rate, blends, batch, targets): the measured defaults; benchmarks vary it
    distill: DistillSettings = field(default_factory=DistillSettings)
    mirror: bool = True  # fit on each calibration image and its horizontal mirror image
    seed: int = 0  # the fine-tune's training: batch order, blends (same seed, same weights)
    e2e: E2EOptions = field(default_factory=E2EOptions)
    # build/tune --rebirth: the rebirth model even without a plan file (planned for their
    # target or device, as bench does)
    implicit_plan: bool = False

    def inputs(self) -> dict:
        """{what: path} of the files these options read (outputs must not overwrite them)."""
        return {"--plan file": self.plan, "--weights file": self.weights,
                "--calib images": self.calib,
                "--e2e-labels file": self.e2e.labels if self.e2e.labels != "source" else None}

    @property
    def given(self) -> bool:
        """True when build/tune make the rebirth model: a plan or weights file was named,
        or ``implicit_plan`` asked for it."""
        return bool(self.plan or self.weights or self.implicit_plan)

    def check(self) -> None:
        """Option combinations that cannot work, refused before any work."""
        if self.images is not None:
            require_positive(self.images, "--images")
        for flag, count in (("--reconstruct-epochs", self.reconstruct_epochs),
                            ("--distill-epochs", self.distill_epochs), ("--seed", self.seed)):
            require_count(count, flag)  # epochs: 0 is off
        if self.budget is not None:
            require_number(self.budget, "--budget", at_least=0)
        require_site_search(self.policy, self.kinds, self.branch_widths)
        if self.select not in ("paying", "all"):
            raise RebirthError(f"--select {self.select}: use paying or all")
        if self.plan and (self.select != "paying" or self.budget is not None):
            raise RebirthError("--select/--budget choose the sites of an implicit plan: "
                               "drop them with --plan")
        if self.select == "all" and self.budget is not None:
            raise RebirthError("--budget is the accuracy budget of --select paying: drop it "
                               "with --select all")
        if self.weights and not self.plan:
            raise RebirthError("--weights needs the --plan it was learned for")
        if self.implicit_plan and self.plan:
            raise RebirthError("--rebirth plans the model itself: drop it with --plan")
        self.e2e.check()


@dataclass
class Rebirth:
    """A model's rebirth: its plan, weights, the slimmed module and how the weights came."""

    model: object  # LoadedModel
    plan: object  # RebirthPlan
    weights: object  # RebirthWeights
    mod: object  # the slimmed IRModule
    fit: dict | None = None  # learn.finetune's report when fine-tuned here, else None
    fit_seconds: float = 0.0  # calibration loading + fine-tuning, 0 for a weights file


@dataclass
class ModelArgs:
    """What every command on a model takes: MODEL and where its rebirth comes from."""

    model: str
    rebirth: RebirthOptions = field(default_factory=RebirthOptions)
    input: str | None = None  # --input: the image input's name (several inputs)
    input_shape: list | None = None  # --input-shape: fixes its dynamic dims


@dataclass
class PlanArgs:
    """`tvm-rebirth plan`: find sites and write a plan, or validate an edited one."""

    model: str
    output: str | None = None
    check: str | None = None  # a plan file to validate instead of writing one
    policy: str = "keep-kernel"
    kinds: tuple = SITE_KINDS
    branch_widths: str = "carry"
    input: str | None = None  # as ModelArgs
    input_shape: list | None = None
    selection: SelectOptions | None = None  # None: every site found (--select all)


@dataclass
class SelectOptions:
    """`plan --select paying`: measure every site variant on a target and choose what pays."""

    target: str | None = None  # None: this CPU; a Cortex-A preset: the emulated core
    tracker: str | None = None  # HOST:PORT with ``key``: latency on that device
    key: str | None = None
    budget: float | None = None  # accuracy budget; None: planning.selection.DEFAULT_BUDGET
    calib: str | None = None  # images for the accuracy estimates (default: the zoo's source)
    images: int = 32  # how many
    tuned: bool = True  # apply the target's tuning records, as the model build does

    def check(self, kinds=SITE_KINDS) -> None:
        """Its counts, budget and the site ``kinds`` to choose among, refused before any
        work (a select measures for minutes)."""
        require_positive(self.images, "--images")
        if self.budget is not None:
            require_number(self.budget, "--budget", at_least=0)
        # the variants are the policies and widths; only the kinds are the caller's
        require_site_search("keep-kernel", kinds, "carry", label="--kinds: ")


@dataclass(kw_only=True)
class FinetuneArgs(ModelArgs):
    """`tvm-rebirth finetune`: learn a plan's rebirth convs into a weights file."""

    output: str | None = None


@dataclass(kw_only=True)
class BenchArgs(ModelArgs):
    """`tvm-rebirth bench`: original vs rebirth on this CPU or a tracker device."""

    tracker: str | None = None  # HOST:PORT
    key: str | None = None
    target: str | None = None  # device target preset
    session_timeout: float = 3600.0
    rounds: int = 7
    profile: bool = False  # time per layer type (this CPU only)
    output: str | None = None  # also write the JSON report here


@dataclass(kw_only=True)
class EvalArgs(ModelArgs):
    """`tvm-rebirth eval`: top-1/top-5 of original and rebirth on the labeled set."""

    limit: int | None = None


@dataclass(kw_only=True)
class BuildArgs(ModelArgs):
    """`tvm-rebirth build`: the original (or rebirth, when a plan/weights or
    ``implicit_plan``, the CLI's --rebirth, is given) library."""

    target: str = "host"
    output: str | None = None
    tuning_logs: bool = True


@dataclass(kw_only=True)
class TuneArgs(ModelArgs):
    """`tvm-rebirth tune`: MetaSchedule tuning into a tuning_logs database."""

    trials: int
    target: str = "host"
    max_tasks: int | None = None
    build_timeout: float = 60.0
    measure: bool = True
    log_dir: str | None = None
    tracker: str | None = None
    key: str | None = None


@dataclass
class DeviceArgs:
    """`tvm-rebirth device start|stop|status`."""

    action: str
    port: int | None = None
    local: bool = False
    emulated: bool = True
    servers: int = 1


def _log(tag, message) -> None:
    if tag:
        logger.info(f"[{tag}] {message}")


def require_site_search(policy: str, kinds, branch_widths: str, label: str = "") -> None:
    """The passes' check of a site search's settings (a ValueError) as a RebirthError,
    ``label`` before its message."""
    from .passes.analysis import check_settings

    try:
        check_settings(policy, kinds, branch_widths)
    except ValueError as err:
        raise RebirthError(f"{label}{err}") from None


def require_positive(value, flag: str) -> None:
    """RebirthError unless ``value`` (of option ``flag``) is None or an integer of at least 1."""
    if value is not None:
        require_count(value, flag, 1)


def model_inputs(model: str, options: RebirthOptions | None = None) -> dict:
    """{what: path} of every file a command on MODEL with ``options`` reads."""
    inputs = {"model": model if os.path.isfile(model) else None}
    return {**inputs, **(options.inputs() if options else {})}


def checked_output(path, inputs: dict) -> str:
    """report.output.output_path: the real file an output path names, checked before work."""
    from .report.output import output_path

    return output_path(path, inputs)


# -- the flow, step by step -----------------------------------------------------------------
def load(model: str, tag: str | None = None, input: str | None = None,
         input_shape: list | None = None):
    """The LoadedModel of a zoo name or an .onnx path (logs '[tag] loading MODEL');
    ``input``/``input_shape``: its image input and that input's shape (loader.load_model)."""
    import dataclasses

    from .frontend import zoo
    from .frontend.loader import load_model

    _log(tag, f"loading {model}")
    if os.path.isdir(model):
        # a folder is never a model: a bare zoo name means the zoo model (a report or plan
        # folder named after it must not shadow it); any other folder is an error
        if model not in zoo.ZOO:
            raise RebirthError(f"{model}: is a directory, not an .onnx model file")
        logger.info(f"note: ./{model} is a folder, not a model file; using the zoo model "
                    f"'{model}'")
        loaded = load_model(str(zoo.zoo_path(model)), input, input_shape)
        return dataclasses.replace(loaded, name=model, zoo_entry=zoo.ZOO[model])
    if model in zoo.ZOO and os.path.isfile(model):
        logger.info(f"note: loading the file ./{model}, not the zoo model '{model}'")
    return load_model(model, input, input_shape)


def require_one_input(model, command: str) -> None:
    """RebirthError when ``command`` would run ``model`` (it feeds images to the image input
    alone) but the model has other inputs too."""
    if model.other_inputs:
        others = ", ".join(f"'{k}' {v}" for k, v in model.other_inputs.items())
        raise RebirthError(f"{model.path}: {command} runs the model on its image input "
                           f"'{model.input_name}' alone, but it has other inputs too "
                           f"({others}); plan, build and tune --no-measure work on it")


def has_conv(model) -> bool:
    """True when ``model``'s main function has a conv2d (a model without one has no site)."""
    from tvm import relax

    found = []
    relax.analysis.post_order_visit(model.mod["main"], lambda e: found.append(1) if isinstance(
        e, relax.Call) and getattr(e.op, "name", None) == "relax.nn.conv2d" else None)
    return bool(found)


def require_conv(model, command: str) -> None:
    """RebirthError when ``model`` has no conv2d: nothing to slim, nothing to compare."""
    if not has_conv(model):
        raise RebirthError(f"{model.path}: the model has no conv2d, so there is nothing to "
                           f"slim: its rebirth is the original ({command} compares the two)")


def site_counts(plan) -> dict:
    """{kind: number of sites of that kind} over every site kind."""
    return {k: sum(s.kind == k for s in plan.sites) for k in SITE_KINDS}


def load_plan(path, model, label=None):
    """The plan file at ``path``, validated against ``model`` (errors name ``label``)."""
    from .plan import RebirthPlan

    plan = RebirthPlan.load(path)
    plan.validate(model, label=label)
    return plan


def find_plan(model, policy="keep-kernel", kinds=SITE_KINDS, branch_widths="carry"):
    """A new plan with every site of ``kinds`` found in ``model``."""
    from .plan import RebirthPlan

    return RebirthPlan.from_model(model, policy=policy, kinds=kinds, branch_widths=branch_widths)


def select_plan(model, options: SelectOptions, kinds=SITE_KINDS, tag: str | None = "plan"):
    """The plan that pays on ``options``' target: every site's variants measured there (cost
    table, cached), their accuracy cost estimated on a few calibration images, the best
    saving chosen under the budget (see tvm_rebirth.planning)."""
    from .compile.build import planned_memory
    from .learn.calib import calibration_images
    from .passes import rebirth_pipeline
    from .planning.accuracy import accuracy_costs
    from .planning.costs import measure_costs, measurement_for
    from .planning.selection import (DEFAULT_BUDGET, fast_variants, select_variants,
                                     selected_plan)
    from .planning.variants import site_choices

    options.check(kinds)
    budget = DEFAULT_BUDGET if options.budget is None else options.budget
    require_device(options.tracker, options.key)
    how = measurement_for(options.target, options.tracker, options.key)
    choices = site_choices(model.mod, kinds)
    if not choices.groups:  # nothing to choose from: the plan lists what was rejected
        return find_plan(model, kinds=kinds)
    learned = any(not s.exact for v in choices.variants.values() for s in v.values())
    # images first: a missing --calib fails before minutes of building and measuring
    images = calibration_images(model, options.calib, count=options.images)[0] \
        if learned else None
    n = sum(len(g.combos) for g in choices.groups)
    _log(tag, f"{len(choices.variants)} site(s), {n} block variant(s) to cost on {how.label}")
    table = measure_costs(model, choices, how, options.tuned)
    # only variants that save enough can be chosen: the others need no accuracy estimate
    fast = fast_variants(choices, table)
    if learned:
        count = sum(not choices.site(s, v).exact for s, v in fast)
        _log(tag, f"estimating the accuracy costs of the {count} learned variant(s) that "
                  f"save enough, on {options.images} calibration images")
    errors = accuracy_costs(model, choices, images, kinds, fast)

    def model_memory(combos):
        return planned_memory(rebirth_pipeline(choices.slimming_plan(combos), None)(model.mod),
                              how.target)

    selection = select_variants(choices, table, errors, budget, model_memory)
    _log(tag, f"predicted {selection.predicted_speedup:.2f}x on {how.label} "
              f"(accuracy cost {selection.accuracy_cost:.2f} of {budget})")
    return selected_plan(model, choices, selection, kinds)


def plan_for(model, options: RebirthOptions, tag: str | None = None, tracker=None, key=None,
             target=None, tuned: bool = True):
    """The plan of ``options``: its plan file, validated; else (``select`` "paying") the
    sites measured to pay on this CPU, on ``target`` or on the ``tracker``/``key`` device
    (with the target's tuning records unless ``tuned`` is false, as the build it is for),
    or ("all") every site found."""
    if options.plan:
        return load_plan(options.plan, model)
    if options.select == "all":
        _log(tag, f"no --plan: planning every site of {model.name} ({options.policy})")
        return find_plan(model, options.policy, options.kinds, options.branch_widths)
    where = f"device '{key}'" if key else (target or "this CPU")
    _log(tag, f"no --plan: planning the sites of {model.name} that pay on {where}")
    return select_plan(model, SelectOptions(target=target, tracker=tracker, key=key,
                                            budget=options.budget, calib=options.calib,
                                            tuned=tuned),
                       options.kinds, tag)


def calibration(model, options: RebirthOptions, plan=None, tag: str | None = None) -> tuple:
    """(images or None, description) to fit ``plan``'s learned sites on: ``options.images``
    (default sized for the model: ``default_image_count``) from ``options.calib`` (default
    the zoo model's own source); none when every enabled site of ``plan`` is exact. Without
    a plan the images are always loaded."""
    from .learn.calib import MIN_LEARNING_IMAGES, calibration_images, default_image_count

    if plan is not None and not plan.enabled_sites():
        logger.warning(f"{'[' + tag + '] ' if tag else ''}the plan enables no site: the "
                       "rebirth model is the original model")
        return None, "none needed (no site is enabled)"
    if plan is not None and not any(not s.exact for s in plan.enabled_sites()):
        return None, "none needed (exact sites only)"
    if plan is not None and (options.images or MIN_LEARNING_IMAGES) < MIN_LEARNING_IMAGES:
        raise RebirthError(f"--images {options.images}: learned sites need at least "
                           f"{MIN_LEARNING_IMAGES} calibration images (every 8th is held out "
                           "to measure their error)")
    count = options.images or default_image_count(model)
    _log(tag, f"loading {count} calibration images"
              + ("" if options.images else f" (sized for {model.name}; --images sets it)"))
    images, description = calibration_images(model, options.calib, count=count)
    if plan is not None and len(images) < MIN_LEARNING_IMAGES:
        raise RebirthError(f"{options.calib}: {len(images)} image(s); learned sites need at "
                           f"least {MIN_LEARNING_IMAGES} (every 8th is held out to measure "
                           "their error)")
    return images, description


def e2e_data(model, options: RebirthOptions, tag: str | None = None) -> tuple:
    """(images, labels) for end-to-end refinement: ``options.e2e.images`` labeled training
    images with ``e2e.labels`` ("source": the zoo model's own labeled set), else unlabeled
    calibration images (seed 1); (None, None) when end-to-end refinement is off."""
    from .learn.calib import calibration_images, labeled_training_images

    e2e = options.e2e
    if not e2e.enabled:
        return None, None
    _log(tag, f"loading {e2e.images} images for end-to-end refinement")
    if e2e.labels:
        images, labels, _ = labeled_training_images(
            model, options.calib, None if e2e.labels == "source" else e2e.labels,
            count=e2e.images)
        return images, labels
    images, _ = calibration_images(model, options.calib, count=e2e.images, seed=1)
    return images, None


def fine_tune(model, plan, options: RebirthOptions, tag: str | None = None,
              images: tuple | None = None) -> tuple:
    """(RebirthWeights, report) learned for ``plan``: layer-wise on the calibration images
    (``images`` = (array, description) when already loaded), then end to end when
    ``options.e2e.enabled``."""
    from .learn.finetune import finetune

    options.e2e.check()
    calib, description = images if images is not None else calibration(model, options, plan, tag)
    e2e_images, e2e_labels = e2e_data(model, options, tag)
    return finetune(model, plan, calib, description, e2e_images=e2e_images,
                    e2e_epochs=options.e2e.epochs, e2e_labels=e2e_labels,
                    e2e_flip=options.e2e.flip, reconstruct_epochs=options.reconstruct_epochs,
                    distill_epochs=options.distill_epochs, distill_settings=options.distill,
                    mirror=options.mirror, seed=options.seed)


def weights_for(model, plan, options: RebirthOptions, tag: str | None = None,
                images: tuple | None = None) -> tuple:
    """(RebirthWeights, fine-tune report or None): the weights file of ``options``, checked
    against ``plan`` (it needs the plan file it was learned for), or fine-tuned."""
    from .learn.weights import RebirthWeights

    options.check()
    if options.weights:
        return RebirthWeights.load(options.weights, plan), None
    _log(tag, "no --weights: fine-tuning the plan first")
    require_one_input(model, "fine-tuning")
    return fine_tune(model, plan, options, tag, images)


def slim(model, plan, weights):
    """The slimmed module: passes.rebirth_pipeline(plan, weights) applied to the model (the
    weights were checked against ``plan`` where they were loaded, or learned for it)."""
    from .passes import rebirth_pipeline

    return rebirth_pipeline(plan, weights)(model.mod)


def rebirth_model(model, options: RebirthOptions | None = None, tag: str | None = None, *,
                  plan=None, images: tuple | None = None, tracker=None, key=None,
                  target=None, tuned: bool = True) -> Rebirth:
    """The rebirth model of ``model`` (a LoadedModel or a MODEL string) with the plan and
    weights files of ``options`` where given, defaults otherwise (``plan_for``: the sites that
    pay on this CPU, on ``target`` or on the ``tracker``/``key`` device; fine-tuned on the
    calibration images). ``plan``: a plan object to use instead of ``options.plan``;
    ``images``: preloaded calibration (array, description)."""
    options = options or RebirthOptions()
    options.check()  # before planning, which measures for minutes
    if isinstance(model, str):
        model = load(model)
    plan = plan if plan is not None else plan_for(model, options, tag, tracker, key, target,
                                                  tuned)
    start = time.time()
    weights, fit = weights_for(model, plan, options, tag, images)
    seconds = time.time() - start if fit is not None else 0.0
    return Rebirth(model, plan, weights, slim(model, plan, weights), fit, seconds)


def variant(model, options: RebirthOptions, tag: str | None = None, tracker=None, key=None,
            target=None, tuned: bool = True) -> tuple:
    """(module, "original" | "rebirth"): the rebirth module when ``options.given``; without a
    plan file planned for ``target`` or the ``tracker``/``key`` device (``plan_for``)."""
    if not options.given:
        return model.mod, "original"
    rebirth = rebirth_model(model, options, tag, tracker=tracker, key=key, target=target,
                            tuned=tuned)
    return rebirth.mod, "rebirth"


def accuracy(model, mod, images, labels) -> dict:
    """top-1/top-5 (report.measure.top_k) of the original model and ``mod`` on labeled images."""
    from .compile.build import Runner
    from .report.measure import top_k

    return top_k({"original": Runner(model.mod), "rebirth": Runner(mod)}, images, labels)


def require_device(tracker, key) -> None:
    """Both or neither of tracker and key, and the tracker must have the key: checked before
    any fine-tuning or building."""
    if bool(tracker) != bool(key):
        raise RebirthError("--tracker and --key go together (the tracker's address and the "
                           "device key to measure on)")
    if tracker:
        from .deploy.rpc import parse_tracker, require_key

        require_key(*parse_tracker(tracker), key)


def bench_host(model, mod, rounds=7, profile=False, x=None) -> tuple:
    """(result in the bench layout, device description): original vs ``mod`` on this CPU,
    on ``x`` (default the model's bench input), ``profile``: time per layer type too."""
    from .compile.build import host_target
    from .learn.calib import bench_input
    from .report.measure import bench_pair

    require_positive(rounds, "--rounds")
    x = bench_input(model)[0] if x is None else x
    result = bench_pair(model.mod, mod, x, rounds=rounds, profile=profile)
    device = f"host {host_target().attrs['mcpu']} ({os.environ.get('TVM_NUM_THREADS')} threads)"
    return result, device


def bench_emulated(model, mod, state_dir, x=None) -> dict:
    """Original vs ``mod`` on an emulated Cortex-A72 started for this call (bench layout with
    instruction counts), or {"skipped": reason} when that device cannot start."""
    from .deploy.remote import bench_on_emulated_device
    from .learn.calib import bench_input
    from .report.measure import pair_layout

    x = bench_input(model)[0] if x is None else x
    result = bench_on_emulated_device({"original": model.mod, "rebirth": mod}, x, state_dir)
    return result if "skipped" in result else pair_layout(result)


# -- commands: each returns its JSON payload ------------------------------------------------
def models() -> dict:
    """`models`: every zoo entry with its source, input shape and whether it is cached."""
    from .frontend import zoo

    entries = []
    for entry in zoo.ZOO.values():
        cached = (zoo.cache_dir() / "models" / f"{entry.name}.onnx").exists()
        source = f"package: {entry.path}" if entry.path else f"onnx wheel: {entry.source}"
        cached = cached or bool(entry.path)
        entries.append({"name": entry.name, "source": source,
                        "input_shape": list(entry.input_shape),
                        "description": entry.description,
                        "cached": cached, "default": entry.name == zoo.DEFAULT_MODEL})
    return {"models": entries}


def site_json(s) -> dict:
    """One plan site as the JSON the plan command prints."""
    return {"id": s.id, "kind": s.kind, "exact": s.exact, "enabled": s.enabled, "ops": s.ops,
            "layers": s.layers, "old_conv": [c.to_dict() for c in s.old_conv],
            "new_conv": [c.to_dict() for c in s.new_conv], "note": s.note,
            **({"absorb": s.to_dict()["absorb"]} if s.absorb else {})}


def plan_command(args: PlanArgs) -> tuple:
    """`plan`: (plan, payload) — the sites ``args.selection`` chooses (None: every site
    found) written to ``args.output`` (default <model>.plan.yaml), or the plan file
    ``args.check`` validated against the model."""
    from .plan import RebirthPlan

    if args.check and args.output:
        raise RebirthError("--check validates an existing plan and writes nothing: drop -o")
    inputs = {**model_inputs(args.model), "--check plan": args.check}
    output = checked_output(args.output, inputs) if args.output else None
    if args.selection is not None and not args.check:
        args.selection.check(args.kinds)
    start = time.time()
    model = load(args.model, "plan", args.input, args.input_shape)
    if args.check:
        plan = RebirthPlan.load(args.check)
        logger.info(f"[plan] validating {args.check} against {model.name}")
        plan.validate(model, label=args.check)
        out = args.check
    else:
        if args.selection is not None:
            plan = select_plan(model, args.selection, args.kinds)
        else:
            logger.info(f"[plan] finding rebirth sites ({args.policy})")
            plan = find_plan(model, args.policy, args.kinds, args.branch_widths)
        out = args.output or f"{model.name}.plan.yaml"
        plan.save(output or checked_output(out, inputs))
    nothing = None if plan.sites else (
        "no site found" if has_conv(model) else "the model has no conv2d")
    if nothing:
        logger.info(f"[plan] nothing to slim: {nothing}")
    payload = {"model": model.name, "sha256": model.sha256, "plan": os.path.abspath(out),
               "image_input": model.input_name, "nothing_to_slim": nothing,
               "plan_sha256": plan.sha256, "valid": True,
               "policy": plan.policy, "input_shapes": plan.input_shapes,
               "sites": [site_json(s) for s in plan.sites], "rejected": plan.rejected,
               "counts": site_counts(plan), "seconds": round(time.time() - start, 2),
               **({"selection": plan.selection} if plan.selection else {})}
    return plan, payload


def finetune_command(args: FinetuneArgs) -> dict:
    """`finetune`: learn the plan's sites (+ end to end) and write the weights file
    (default <model>.weights.npz); payload with per-site errors and seconds."""
    options = args.rebirth
    options.check()
    inputs = model_inputs(args.model, options)
    output = checked_output(args.output, inputs) if args.output else None
    start = time.time()
    model = load(args.model, None, args.input, args.input_shape)
    require_one_input(model, "finetune")
    out = args.output or f"{model.name}.weights.npz"
    output = output or checked_output(out, inputs)
    plan = plan_for(model, options, "finetune")
    images = calibration(model, options, plan, "finetune")
    weights, report = fine_tune(model, plan, options, "finetune", images)
    weights.save(output)
    return {"model": model.name, "weights": os.path.abspath(out), "plan_sha256": plan.sha256,
            "calibration": images[1], "mirror_images": report["mirror_images"],
            "sites": report["sites"], "seconds": round(time.time() - start, 2),
            **{key: report[key] for key in ("distillation", "end_to_end") if key in report}}


def predicted_speedup(plan) -> dict | None:
    """{speedup, target, unit} the plan's selection predicted, or None: no selection, or
    one whose chosen sites are no longer the enabled ones (the plan was edited since)."""
    selection = plan.selection or {}
    chosen = {s for s, e in (selection.get("sites") or {}).items()
              if isinstance(e, dict) and e.get("variant", "off") != "off"}
    if "predicted_speedup" not in selection or chosen != {s.id for s in plan.enabled_sites()}:
        return None
    return {"speedup": selection["predicted_speedup"], "target": selection.get("target"),
            "unit": selection.get("unit")}


def bench(args: BenchArgs) -> dict:
    """`bench`: original vs rebirth side by side on this CPU (``profile``: per layer type)
    or on the tracker device ``key``; the device is checked before any fine-tuning."""
    require_device(args.tracker, args.key)
    if args.profile and args.tracker:
        raise RebirthError("--profile times kernels on this CPU; drop it with --tracker")
    args.rebirth.check()
    require_positive(args.rounds, "--rounds")
    require_number(args.session_timeout, "--session-timeout (seconds)", above=0)
    output = checked_output(args.output, model_inputs(args.model, args.rebirth)) \
        if args.output else None
    model = load(args.model, None, args.input, args.input_shape)
    require_one_input(model, "bench")
    require_conv(model, "bench")
    rebirth = rebirth_model(model, args.rebirth, "bench", tracker=args.tracker, key=args.key,
                            target=args.target if args.tracker else None)
    from .learn.calib import bench_input

    x, input_desc = bench_input(model, args.rebirth.calib)
    if args.tracker:
        from .deploy.remote import bench_on_device
        from .report.measure import pair_layout

        result = pair_layout(bench_on_device({"original": model.mod, "rebirth": rebirth.mod}, x,
                                             args.tracker, args.key, args.target,
                                             rounds=args.rounds,
                                             session_timeout=args.session_timeout))
        device = result.pop("device")
    else:
        result, device = bench_host(model, rebirth.mod, args.rounds, args.profile, x)
    payload = {"model": model.name, "device": device, "input": input_desc,
               "sites": [s.id for s in rebirth.plan.enabled_sites()], **result}
    predicted = predicted_speedup(rebirth.plan)
    if predicted:  # the plan's prediction, next to what was measured
        payload["predicted"] = predicted
    if output:
        from .report.output import write_json

        write_json(output, payload)
    return payload


def evaluate(args: EvalArgs) -> dict:
    """`eval`: top-1/top-5 of original and rebirth on the model's labeled set (found before
    any fine-tuning); when it fine-tunes (no weights file), "diverging": the fine-tune's
    stages that fit their images far better than the held-out ones (``diverging_stages``)."""
    from .report.measure import labeled_set

    require_positive(args.limit, "--limit")
    args.rebirth.check()
    model = load(args.model, None, args.input, args.input_shape)
    require_one_input(model, "eval")
    images, labels, description = labeled_set(model, args.limit)
    rebirth = rebirth_model(model, args.rebirth, "eval")
    logger.info(f"[eval] building original and rebirth models; evaluating on {description}")
    result = accuracy(model, rebirth.mod, images, labels)
    payload = {"model": model.name, "labeled_set": description,
               "sites": [s.id for s in rebirth.plan.enabled_sites()], **result}
    if rebirth.fit is not None:  # fine-tuned here: the stages that were short of images
        payload["diverging"] = diverging_stages(rebirth.fit)
    return payload


def _planning_target(target: str):
    """The target an implicit plan is measured on: None for this CPU ("host"), so that with
    a tracker (tune) the key's default target is measured, not this CPU's."""
    return None if target == "host" else target


def build(args: BuildArgs) -> dict:
    """`build`: compile the original (or rebirth) model into a library for ``target``, with
    the tuning_logs unless ``tuning_logs`` is false."""
    from .compile.build import compile_module, export_library
    from .compile.targets import resolve_target, target_label
    from .report.output import install_file

    target = resolve_target(args.target)
    args.rebirth.check()
    inputs = model_inputs(args.model, args.rebirth)
    output = checked_output(args.output, inputs) if args.output else None
    start = time.time()
    model = load(args.model, None, args.input, args.input_shape)
    what = "rebirth" if args.rebirth.given else "original"
    out = args.output or f"{model.name}-{what}-{target_label(args.target)}.so"
    output = output or checked_output(out, inputs)
    mod, what = variant(model, args.rebirth, "build", target=_planning_target(args.target),
                        tuned=args.tuning_logs)
    logger.info(f"[build] compiling the {what} {model.name} for {args.target}")
    compiled = compile_module(mod, target, tuned=args.tuning_logs)
    with tempfile.TemporaryDirectory(prefix="tvm-rebirth-build-") as scratch:
        # exported in a scratch folder, then copied: a full destination is a one-line error
        library = os.path.join(scratch, os.path.basename(output))
        export_library(compiled.executable, library, target)
        install_file(library, output)
    return {"model": model.name, "variant": what, "path": os.path.abspath(out),
            "target": args.target, "target_json": str(target),
            "planned_memory_mb": round(compiled.planned_bytes / 2 ** 20, 3),
            "tuned_functions": compiled.tuned, "tuned_by_source": compiled.tuned_by_source,
            "functions": compiled.functions, "bytes": os.path.getsize(out), "seconds": round(time.time() - start, 2)}


def tune(args: TuneArgs) -> dict:
    """`tune`: MetaSchedule-tune the original (or rebirth) model into ``log_dir`` (default
    the user cache, ~/.cache/tvm-rebirth/tuning_logs/<target>/<model>[-rebirth]/: see
    compile.database.default_log_dir), on this CPU or a tracker device."""
    from .compile.database import default_log_dir
    from .compile.targets import resolve_target
    from .compile.tune import tune as run_tune

    target = resolve_target(args.target)
    require_device(args.tracker, args.key)
    require_positive(args.trials, "--trials")
    require_positive(args.max_tasks, "--max-tasks")
    require_number(args.build_timeout, "--build-timeout (seconds)", above=0)
    args.rebirth.check()  # all before loading, planning and fine-tuning
    model = load(args.model, None, args.input, args.input_shape)
    mod, what = variant(model, args.rebirth, "tune", args.tracker, args.key,
                        _planning_target(args.target))
    log_dir = args.log_dir or default_log_dir(model.name, target, what == "rebirth")
    logger.info(f"[tune] {what} {model.name} for {args.target}: up to {args.trials} trials "
                f"-> {log_dir}")
    report = run_tune(mod, target, log_dir, args.trials, model_name=model.name,
                      max_tasks=args.max_tasks, build_timeout=args.build_timeout,
                      tracker=args.tracker, key=args.key, measure=args.measure)
    tasks = report["tasks"]
    default = sum(t["calls"] * (t["default_ms"] or 0) for t in tasks.values())
    best = sum(t["calls"] * (t["best_ms"] or t["default_ms"] or 0) for t in tasks.values())
    return {"model": model.name, "variant": what, "target": args.target,
            "database": os.path.abspath(log_dir), "trials": report["trials"],
            "failed_trials": report["failed_trials"], "wall_seconds": report["wall_seconds"],
            "default_ms": round(default, 3), "best_ms": round(best, 3),
            "model_ms": report.get("model_ms"), "tasks": tasks}


def device(args: DeviceArgs) -> dict:
    """`device`: start (then status), stop ({"stopped": [...]}) or status of the tracker and
    its devices on 127.0.0.1 (deploy.device.status: whether the tracker answers, who holds
    its port, per process whether the recorded pid or only its group still runs)."""
    from .deploy import device as devices

    if args.action not in ("start", "stop", "status"):
        raise RebirthError(f"device action {args.action!r}: use start, stop or status")
    if args.action == "start":
        require_positive(args.servers, "--servers")
        if not args.emulated and not args.local:
            raise RebirthError("nothing to start: --no-emulated needs --local")
        devices.start(port=args.port, local=args.local, emulated=args.emulated,
                      servers=args.servers)
    elif args.action == "stop":
        return {"stopped": [{"role": p["role"], "pid": p["pid"]} for p in devices.stop()]}
    return devices.status()  # every field, the dead-leader and port ones included
