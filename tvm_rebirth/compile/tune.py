"""MetaSchedule tuning of a model's fused PrimFuncs into a tuning_logs database.

Before searching, each task's *default* schedule (what an untuned build runs:
``build.schedule_rules``) is measured and committed as a record of its own: the database's best record is never worse
than what a build without tuning would run, and the search starts from it. A rerun continues
where the folder's records end.
"""

from __future__ import annotations

import logging
import platform
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np

from ..errors import RebirthError, require_count, require_number
from .candidates import (make_builder, make_commit_measured, make_local_runner,
                         make_progress, make_rpc_runner, new_run_dir, read_report,
                         remove_artifact, write_report)
from .build import fused_module, schedule_rules
from .database import DB_FILES, repair_folder, target_key

logger = logging.getLogger(__name__)


def extract_tasks(mod, target):
    """[(task name, IRModule with one PrimFunc 'main', how often the model calls it)]."""
    from tvm.s_tir import meta_schedule as ms

    tasks = ms.relax_integration.extract_tasks(fused_module(mod, target), target)
    return [(t.task_name, t.dispatched[0], int(t.weight)) for t in tasks]


DEFAULT_ATTEMPTS = 3


def _default_schedule(task_mod, target):
    """The schedule an untuned build gives this task (the first rule that applies)."""
    from tvm import s_tir

    for rule in schedule_rules():
        sch = rule.apply(task_mod["main"], target, False)
        if sch is not None:
            return sch
    return s_tir.Schedule(task_mod)


def tune(mod, target, log_dir, trials: int, *, model_name="model", max_tasks=None,
         trials_per_iter=8, build_timeout=60.0, tracker=None, key=None, workers=None,
         seed=0, measure=True) -> dict:
    """Tune ``mod``'s tasks for ``target`` into ``log_dir`` until the folder holds ``trials``
    searched trials (a rerun continues: finished records are kept, only the rest is run).

    Tasks are weighted by their share of the model's time under the default schedule; with
    few trials only the heaviest tasks are searched (about two search rounds each). With
    ``measure``, the whole model is then timed with the generic schedule vs this database
    (when measuring on this CPU; ``model_ms`` in the report). ``tracker`` ("host:port") and
    ``key`` measure every candidate on a device from an RPC tracker instead of this CPU.

    Only measured candidates become records, and a task whose default schedule could not be
    measured is not done: a rerun measures it again; when no task could be measured the tune
    fails. Ctrl-C raises KeyboardInterrupt (whatever TVM was doing) after the candidates'
    builds are stopped; the records so far stay and a rerun continues from them. Candidate
    libraries live in one temp folder per run, removed at the end."""
    from .targets import is_cross

    if max_tasks is not None:
        require_count(max_tasks, "--max-tasks", 1)
    require_number(build_timeout, "--build-timeout (seconds)", above=0)
    if is_cross(target) and not tracker and platform.machine() not in ("aarch64", "arm64"):
        raise RebirthError(f"target {target_key(target)} does not run on this host: tune it on "
                           "a device with --tracker HOST:PORT --key KEY (`tvm-rebirth device "
                           "start` gives an emulated one)")
    if measure and not tracker and not is_cross(target):
        require_measurable(mod)  # before any search, not after it
    interrupted, write_errors = [], []

    def on_sigint(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    in_main = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGINT, on_sigint) if in_main else None
    run_dir = None
    try:
        run_dir = new_run_dir()
        return _tune(mod, target, Path(log_dir), trials, model_name, max_tasks,
                     trials_per_iter, build_timeout, tracker, key, workers, seed, measure,
                     run_dir, write_errors)
    except Exception:
        # TVM turns a KeyboardInterrupt or a RebirthError (tuning.json not written: a full
        # disk) raised inside its callbacks into a bare RuntimeError
        if interrupted:
            raise KeyboardInterrupt from None
        if write_errors:
            raise write_errors[0] from None
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous_handler)
        if run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        if interrupted:
            logger.warning(f"[tune] interrupted; what was measured stays in {log_dir}: rerun "
                           "the same command to continue")


def require_measurable(mod) -> None:
    """RebirthError unless ``mod``'s main takes the one static float32 tensor the whole-model
    measurement at the end of ``tune`` feeds it (checked before searching)."""
    import tvm

    from ..passes.dataflow import shape_of

    params = list(mod["main"].params)
    described = []
    for p in params:
        shape = getattr(getattr(p.ty, "shape", None), "values", None)
        dims = "?" if shape is None else ", ".join(
            str(int(v)) if isinstance(v, tvm.tirx.IntImm) else str(v) for v in shape)
        described.append(f"'{p.name}' ({getattr(p.ty, 'dtype', '?')} [{dims}])")
    if len(params) != 1:
        raise RebirthError(f"the model takes {len(params)} inputs ({', '.join(described)}); "
                           "measuring the whole model after tuning feeds one image: pass "
                           "--no-measure")
    if getattr(params[0].ty, "dtype", None) != "float32" or shape_of(params[0]) is None:
        raise RebirthError(f"input {described[0]}: measuring the whole model after tuning "
                           "needs a float32 input of static shape: pass --no-measure")


def _tune(mod, target, log_dir, trials, model_name, max_tasks, trials_per_iter, build_timeout,
          tracker, key, workers, seed, measure, run_dir, write_errors) -> dict:
    from tvm.s_tir import meta_schedule as ms

    from .targets import is_cross

    started = time.time()
    workers = workers or max(1, int(target.attrs.get("num-cores", 2)))
    builder = make_builder(build_timeout, workers, run_dir)
    where = f"device '{key}' via tracker {tracker}" if tracker else "this host"
    if tracker:
        from ..deploy.rpc import parse_tracker, require_key

        host, port = parse_tracker(tracker)
        require_key(host, port, key)
        runner = make_rpc_runner(host, port, key, number=3, repeat=1, min_repeat_ms=50)
    else:
        runner = make_local_runner(number=3, repeat=1, min_repeat_ms=50)
    previous = read_report(log_dir)
    if previous.get("model", model_name) != model_name:
        raise RebirthError(f"{log_dir} holds tuning of model '{previous['model']}', not "
                           f"'{model_name}': pass another --log-dir (or move that folder away)")
    log_dir.mkdir(parents=True, exist_ok=True)
    repair_folder(log_dir)  # a torn last record (full disk, killed run) is dropped, not fatal
    database = ms.database.JSONDatabase(str(log_dir / DB_FILES[0]),
                                        str(log_dir / DB_FILES[1]), allow_missing=True)
    tasks = extract_tasks(mod, target)
    if not tasks:
        raise RebirthError("the model has no tunable functions")
    # tasks whose default was never measured (older runs kept them as "nan") are not done
    done = {n: t for n, t in previous.get("tasks", {}).items() if t.get("default_ms")}
    report = {"log_dir": str(log_dir), "model": model_name, "target": str(target),
              "measured_on": f"{key} via tracker {tracker}" if tracker else "this host",
              "trials": int(previous.get("trials", 0)),
              "failed_trials": int(previous.get("failed_trials", 0)),
              "prior_seconds": float(previous.get("wall_seconds", 0.0)),
              "wall_seconds": float(previous.get("wall_seconds", 0.0)),
              "tasks": done}

    # 1. the default schedule of every task, measured and committed (skipped on a rerun)
    fresh = [(n, m, c) for n, m, c in tasks if n not in report["tasks"]]
    if fresh:
        logger.info(f"[tune] measuring the default schedule of {len(fresh)} task(s)")
    failures = {}
    for k, (name, task_mod, count) in enumerate(fresh):
        sch = _default_schedule(task_mod, target)
        built = builder.build([ms.builder.BuilderInput(sch.mod, target)])[0]
        ran = None
        if built.error_msg is None:
            args_info = ms.arg_info.ArgInfo.from_prim_func(task_mod["main"])
            # A device that drops out mid-run fails one measurement; the tracker hands the
            # retry to another server, so a lost default does not leave the task unsearched.
            try:
                for attempt in range(DEFAULT_ATTEMPTS):
                    ran = runner.run([ms.runner.RunnerInput(built.artifact_path,
                                                            target.kind.name,
                                                            args_info)])[0].result()
                    if ran.error_msg is None:
                        break
                    logger.warning(f"[tune] default {name}: measurement {attempt + 1}/"
                                   f"{DEFAULT_ATTEMPTS} failed: "
                                   f"{ran.error_msg.strip().splitlines()[0]}")
            finally:
                remove_artifact(built.artifact_path)
        error = built.error_msg or (ran.error_msg if ran is not None else None)
        if error is not None:
            failures[name] = (error.strip().splitlines() or ["?"])[0][:200]
            logger.warning(f"[tune] default {k + 1}/{len(fresh)} {name}: not measured "
                           f"({failures[name]}); a rerun tries it again")
            continue
        default_ms = float(np.median([float(s) for s in ran.run_secs])) * 1000
        database.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, database.commit_workload(task_mod), ran.run_secs, target, args_info))
        report["tasks"][name] = {"calls": count, "default_ms": round(default_ms, 4),
                                 "best_ms": round(default_ms, 4)}
        logger.info(f"[tune] default {k + 1}/{len(fresh)} {name}: {default_ms:.3f} ms")
        report["wall_seconds"] = round(report["prior_seconds"] + time.time() - started, 1)
        write_report(report)
    measured = [t for t in tasks if t[0] in report["tasks"]]
    if not measured:
        first = next(iter(failures.values()))
        raise RebirthError(f"none of the {len(tasks)} task(s) could be built and measured on "
                           f"{where} ({first}); nothing was recorded in {log_dir}")
    if failures:
        logger.warning(f"[tune] {len(failures)} of {len(tasks)} task(s) not measured; "
                       "searching the others")

    # 2. the search, over the heaviest tasks
    share = {n: report["tasks"][n]["calls"] * report["tasks"][n]["default_ms"]
             for n, _, _ in measured}
    total = sum(share.values()) or 1.0
    for n in share:
        report["tasks"][n]["time_share"] = round(share[n] / total, 4)
    remaining = trials - report["trials"]
    order = sorted(measured, key=lambda t: -share[t[0]])
    if max_tasks is None:
        max_tasks = max(1, remaining // (2 * trials_per_iter))
    chosen = [t for t in order[:max_tasks] if share[t[0]] > 0]
    report["searched_tasks"] = sorted(set(report.get("searched_tasks", []))
                                      | {n for n, _, _ in chosen})
    if remaining <= 0 or not chosen:
        logger.info(f"[tune] {report['trials']} trials already in {log_dir}: nothing to do")
    else:
        covered = sum(share[n] for n, _, _ in chosen) / total
        logger.info(f"[tune] searching {remaining} trials over {len(chosen)} of {len(tasks)} tasks "
            f"({covered:.0%} of the default-schedule time)")
        contexts = [ms.TuneContext(
            mod=task_mod, target=target, space_generator="post-order-apply",
            search_strategy=ms.search_strategy.EvolutionarySearch(
                population_size=128, init_min_unmeasured=32, genetic_num_iters=2),
            task_name=name, rand_state=seed + i, num_threads=workers).clone()
            for i, (name, task_mod, _) in enumerate(chosen)]
        names = [n for n, _, _ in chosen]
        ms.tune_tasks(
            tasks=contexts, task_weights=[share[n] for n in names], work_dir=str(log_dir),
            max_trials_global=remaining, max_trials_per_task=remaining,
            num_trials_per_iter=trials_per_iter, builder=builder, runner=runner,
            database=database, cost_model=ms.cost_model.XGBModel(num_tuning_cores=workers),
            measure_callbacks=[make_commit_measured(database, contexts),
                               ms.measure_callback.RemoveBuildArtifact(),
                               ms.measure_callback.UpdateCostModel(),
                               make_progress(names, report, started, write_errors)],
            task_scheduler="gradient")
    report["wall_seconds"] = round(report["prior_seconds"] + time.time() - started, 1)
    if measure and not tracker and not is_cross(target):
        report["model_ms"] = _measure_model(mod, target, database)
    write_report(report)
    report.pop("prior_seconds")
    return report


def _measure_model(mod, target, database, rounds=7, number=3) -> dict:
    """Whole-model latency on this CPU with the generic schedule vs with this database,
    medians of interleaved rounds."""
    from .build import Runner
    from ..report.measure import interleaved_rounds, tvm_timer

    x = _random_args_for(mod)
    runners = {"default_schedule": Runner(mod, target, tuned=False),
               "tuned": Runner(mod, target, tuned=database)}
    timers = {name: tvm_timer(r, x, number) for name, r in runners.items()}
    for timer in timers.values():
        timer()
    samples = interleaved_rounds(timers, rounds, "tune: whole model")
    result = {name: round(float(np.median(v)), 3) for name, v in samples.items()}
    result["speedup"] = round(result["default_schedule"] / result["tuned"], 3)
    result["tuned_functions"] = runners["tuned"].compiled.tuned
    result["functions"] = runners["tuned"].compiled.functions
    return result


def _random_args_for(mod):
    shape = [int(v) for v in mod["main"].params[0].ty.shape.values]
    return np.random.default_rng(0).standard_normal(shape).astype("float32")
