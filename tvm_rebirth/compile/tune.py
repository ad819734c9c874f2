"""MetaSchedule tuning of a model's fused PrimFuncs into a tuning_logs database.

Before searching, each task's *default* schedule (what an untuned build runs:
``build.schedule_rules``) is measured and committed as a record of its own: the database's best record is never worse
than what a build without tuning would run, and the search starts from it. A rerun continues
where the folder's records end.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ..errors import RebirthError
from .candidates import (make_builder, make_local_runner, make_progress, make_rpc_runner,
                         read_report, remove_artifact, write_report)
from .build import fused_module, schedule_rules
from .database import DB_FILES

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
    ``key`` measure every candidate on a device from an RPC tracker instead of this CPU."""
    from tvm.s_tir import meta_schedule as ms

    from .targets import is_cross

    log_dir = Path(log_dir)
    started = time.time()
    workers = workers or max(1, int(target.attrs.get("num-cores", 2)))
    builder = make_builder(build_timeout, workers)
    if tracker:
        from ..deploy.rpc import parse_tracker, require_key

        host, port = parse_tracker(tracker)
        require_key(host, port, key)
        runner = make_rpc_runner(host, port, key, number=3, repeat=1, min_repeat_ms=50)
    else:
        runner = make_local_runner(number=3, repeat=1, min_repeat_ms=50)
    log_dir.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(str(log_dir / DB_FILES[0]),
                                        str(log_dir / DB_FILES[1]), allow_missing=True)
    previous = read_report(log_dir)
    tasks = extract_tasks(mod, target)
    if not tasks:
        raise RebirthError("the model has no tunable functions")
    report = {"log_dir": str(log_dir), "model": model_name, "target": str(target),
              "measured_on": f"{key} via tracker {tracker}" if tracker else "this host",
              "trials": int(previous.get("trials", 0)),
              "failed_trials": int(previous.get("failed_trials", 0)),
              "prior_seconds": float(previous.get("wall_seconds", 0.0)),
              "wall_seconds": float(previous.get("wall_seconds", 0.0)),
              "tasks": previous.get("tasks", {})}

    # 1. the default schedule of every task, measured and committed (skipped on a rerun)
    fresh = [(n, m, c) for n, m, c in tasks if n not in report["tasks"]]
    if fresh:
        logger.info(f"[tune] measuring the default schedule of {len(fresh)} task(s)")
    for k, (name, task_mod, count) in enumerate(fresh):
        sch = _default_schedule(task_mod, target)
        built = builder.build([ms.builder.BuilderInput(sch.mod, target)])[0]
        default_ms = None
        if built.error_msg is None:
            args_info = ms.arg_info.ArgInfo.from_prim_func(task_mod["main"])
            # A device that drops out mid-run fails one measurement; the tracker hands the
            # retry to another server, so a lost default does not leave the task unsearched.
            for attempt in range(DEFAULT_ATTEMPTS):
                ran = runner.run([ms.runner.RunnerInput(built.artifact_path, target.kind.name,
                                                        args_info)])[0].result()
                if ran.error_msg is None:
                    break
                logger.warning(f"[tune] default {name}: measurement {attempt + 1}/"
                               f"{DEFAULT_ATTEMPTS} failed: {ran.error_msg.splitlines()[0]}")
            remove_artifact(built.artifact_path)
            if ran.error_msg is None:
                default_ms = float(np.median([float(s) for s in ran.run_secs])) * 1000
                database.commit_tuning_record(ms.database.TuningRecord(
                    sch.trace, database.commit_workload(task_mod), ran.run_secs, target,
                    args_info))
        report["tasks"][name] = {"calls": count,
                                 "default_ms": round(default_ms, 4) if default_ms else None,
                                 "best_ms": round(default_ms, 4) if default_ms else None}
        logger.info(f"[tune] default {k + 1}/{len(fresh)} {name}: {default_ms or float('nan'):.3f} ms")
        report["wall_seconds"] = round(report["prior_seconds"] + time.time() - started, 1)
        write_report(report)

    # 2. the search, over the heaviest tasks
    share = {n: report["tasks"][n]["calls"] * (report["tasks"][n]["default_ms"] or 0.0)
             for n, _, _ in tasks}
    total = sum(share.values()) or 1.0
    for n in share:
        report["tasks"][n]["time_share"] = round(share[n] / total, 4)
    remaining = trials - report["trials"]
    order = sorted(tasks, key=lambda t: -share[t[0]])
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
            measure_callbacks=ms.MeasureCallback.create("default")
            + [make_progress(names, report, started)],
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
