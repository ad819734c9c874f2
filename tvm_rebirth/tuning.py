"""MetaSchedule tuning of a model's fused PrimFuncs, and the tuning_logs databases that every
build applies.

Layout: ``tuning_logs/<target key>/<model>[-rebirth]/`` holds MetaSchedule's JSON database
(``database_workload.json``, ``database_tuning_record.json``, appended record by record) and
``tuning.json`` (trials, wall time, per-task default vs best time, whole-model before/after).
The target key is the preset's core (``cortex-a72``) or the host CPU (``znver3``). A build
applies the union of every database under its target key: records match by PrimFunc
structure, so a conv tuned for GoogLeNet also serves the rebirth model that shares it.

Before searching, each task's *default* schedule (``schedules.GenericCpuSchedule``) is
measured and committed as a record of its own: the database's best record is never worse
than what a build without tuning would run, and the search starts from it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import RebirthError

DB_FILES = ("database_workload.json", "database_tuning_record.json")


def _log(message):
    print(message, file=sys.stderr, flush=True)


def tuning_logs_root() -> Path:
    """The committed tuning_logs folder of this checkout (or $TVM_REBIRTH_TUNING_LOGS)."""
    env = os.environ.get("TVM_REBIRTH_TUNING_LOGS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "tuning_logs"


def target_key(target) -> str:
    return str(target.attrs.get("mcpu", "") or target.kind.name)


def default_log_dir(model_name: str, target, rebirth: bool) -> Path:
    return tuning_logs_root() / target_key(target) / (model_name + ("-rebirth" if rebirth else ""))


_LOADED: dict = {}  # (folder, files' sizes and mtimes) -> database


def load_database(target, root=None):
    """Union of every MetaSchedule database under the target's tuning_logs folder, or None.
    Parsing the committed JSON takes seconds (fine-tuning compiles a dozen modules), so a
    process keeps what it loaded until a file under the folder changes."""
    from tvm.s_tir import meta_schedule as ms

    folder = Path(root or tuning_logs_root()) / target_key(target)
    dirs = sorted(p.parent for p in folder.glob(f"*/{DB_FILES[0]}")) if folder.is_dir() else []
    if not dirs:
        return None
    files = [d / name for d in dirs for name in DB_FILES]
    key = (str(folder), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns)
                              for f in files if f.exists()))
    if key not in _LOADED:
        dbs = [ms.database.JSONDatabase(str(d / DB_FILES[0]), str(d / DB_FILES[1]),
                                        allow_missing=False) for d in dirs]
        _LOADED.clear()  # one folder's worth at a time
        _LOADED[key] = dbs[0] if len(dbs) == 1 else ms.database.UnionDatabase(*dbs)
    return _LOADED[key]


def fused_module(mod, target):
    """The module as both build and tuning see it: legalized and fused, not yet scheduled."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    with tvm.transform.PassContext(opt_level=3), target:
        return tvm.transform.Sequential(cpu_generic.library_dispatch_passes(target)
                                        + cpu_generic.legalize_passes(target))(mod)


# --------------------------------------------------------------------------- build / run


def _export(rt_mod, path, target):
    from tvm.support import cc

    from .targets import CROSS_COMPILER, is_cross

    if is_cross(target):
        rt_mod.export_library(path, fcompile=cc.cross_compiler(CROSS_COMPILER))
    else:
        rt_mod.export_library(path)


def _build_child(mod, target, path):
    """In a forked child: compile one candidate to a shared library, then exit."""
    status = 1
    try:
        import tvm
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        _export(tvm.build(mod, target=target), path, target)
        status = 0
    except BaseException as exc:  # noqa: BLE001 -- reported to the parent through a file
        with open(path + ".error", "w") as f:
            f.write(f"{type(exc).__name__}: {str(exc)[:2000]}")
    finally:
        os._exit(status)


def _make_builder(timeout: float, workers: int):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder

    @derived_object
    class ForkBuilder(PyBuilder):
        """Builds each candidate in a forked child (TVM already imported, so no 40 s import per
        worker) with a hard kill after ``timeout`` seconds: one pathological unrolled candidate
        once kept LLVM busy for more than 8 minutes. One temp dir per artifact, because
        MetaSchedule's RemoveBuildArtifact deletes the artifact's parent directory."""

        def build(self, build_inputs):
            results = [None] * len(build_inputs)
            pending = list(enumerate(build_inputs))
            running = {}
            while pending or running:
                while pending and len(running) < workers:
                    i, inp = pending.pop(0)
                    path = os.path.join(tempfile.mkdtemp(prefix="tvm-rebirth-cand-"), "cand.so")
                    pid = os.fork()
                    if pid == 0:
                        _build_child(inp.mod, inp.target, path)
                    running[pid] = (i, path, time.time())
                time.sleep(0.01)
                for pid, (i, path, start) in list(running.items()):
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done == 0 and time.time() - start > timeout:
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                        results[i] = BuilderResult(None, f"build timed out after {timeout:.0f}s")
                    elif done == 0:
                        continue
                    elif os.path.exists(path) and status == 0:
                        results[i] = BuilderResult(path, None)
                    else:
                        error = Path(path + ".error")
                        results[i] = BuilderResult(None, error.read_text() if error.exists()
                                                   else f"build crashed (status {status})")
                    del running[pid]
            return results

    return ForkBuilder()


def _random_args(args_info, device, seed=0):
    import tvm

    rng = np.random.default_rng(seed)
    args = []
    for info in args_info:
        _, dtype, shape = info.as_json()
        if "float" in dtype:
            data = rng.uniform(-1, 1, size=shape).astype(dtype)
        else:
            data = rng.integers(0, 8, size=shape).astype(dtype)
        args.append(tvm.runtime.tensor(data, device))
    return args


def _time_candidate(rt_mod, device, args_info, number, repeat, min_repeat_ms) -> list:
    """Seconds per run of a built candidate on ``device`` (local or remote), random inputs."""
    args = _random_args(args_info, device)
    evaluator = rt_mod.time_evaluator(rt_mod.entry_name, device, number=number, repeat=repeat,
                                      min_repeat_ms=min_repeat_ms)
    return [float(s) for s in evaluator(*args).results]


def _make_local_runner(number: int, repeat: int, min_repeat_ms: int):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner, RunnerFuture, RunnerResult

    @derived_object
    class InProcessRunner(PyRunner):
        """Times each built candidate on this CPU in the tuning process itself (no worker
        process to start per batch; candidates run one at a time so they never compete)."""

        def run(self, runner_inputs):
            import tvm

            futures = []
            for inp in runner_inputs:
                try:
                    result = RunnerResult(_time_candidate(
                        tvm.runtime.load_module(inp.artifact_path), tvm.cpu(), inp.args_info,
                        number, repeat, min_repeat_ms), None)
                except Exception as exc:  # noqa: BLE001 -- a failing candidate, not a failure
                    result = RunnerResult(None, f"{type(exc).__name__}: {str(exc)[:500]}")
                futures.append(RunnerFuture(f_done=lambda: True, f_result=lambda r=result: r))
            return futures

    return InProcessRunner()


def _make_rpc_runner(host, port, key, number: int, repeat: int, min_repeat_ms: int,
                     session_timeout: float = 600):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner, RunnerFuture, RunnerResult

    from .rpc import request_session

    def run_share(inputs, results):
        """One device's share of a batch, in one session (re-requested if it breaks)."""
        session = None
        for i, inp in inputs:
            try:
                if session is None:
                    session = request_session(host, port, key, session_timeout)
                name = os.path.basename(inp.artifact_path)
                session.upload(inp.artifact_path, name)
                results[i] = RunnerResult(_time_candidate(
                    session.load_module(name), session.cpu(), inp.args_info, number, repeat,
                    min_repeat_ms), None)
                try:
                    session.remove(name)
                except Exception:  # noqa: BLE001 -- leftovers in the server's temp dir
                    pass
            except Exception as exc:  # noqa: BLE001 -- the candidate or the device failed
                results[i] = RunnerResult(None, f"{type(exc).__name__}: {str(exc)[:300]}")
                session = None

    @derived_object
    class TrackerRunner(PyRunner):
        """Times candidates on the devices the RPC tracker has for ``key``: each batch is
        shared among as many threads as the key has servers, one session each; libraries
        are uploaded, arguments filled from the host, the time evaluator runs there. A
        device that dies fails only the candidate it was running; its thread asks the
        tracker again and the surviving devices carry on."""

        def run(self, runner_inputs):
            import threading

            from .rpc import tracker_summary

            try:
                queue = tracker_summary(host, port).get("queue_info", {}).get(key, {})
                devices = max(1, int(queue.get("free", 0)))
            except RebirthError:
                devices = 1
            results = [None] * len(runner_inputs)
            indexed = list(enumerate(runner_inputs))
            threads = [threading.Thread(target=run_share, args=(indexed[k::devices], results))
                       for k in range(min(devices, len(indexed)))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            return [RunnerFuture(f_done=lambda: True, f_result=lambda r=r: r) for r in results]

    return TrackerRunner()


def _make_progress(names, report, started, log):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Progress(PyMeasureCallback):
        """Prints trials done, the task's best and elapsed time; keeps tuning.json current."""

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results):
            task = report["tasks"][names[task_id]]
            for res in runner_results:
                report["trials"] += 1
                if res.run_secs:
                    ms = float(np.median([float(s) for s in res.run_secs])) * 1000
                    if task["best_ms"] is None or ms < task["best_ms"]:
                        task["best_ms"] = round(ms, 4)
                else:
                    report["failed_trials"] += 1
            report["wall_seconds"] = round(report["prior_seconds"] + time.time() - started, 1)
            _write_report(report)
            log(f"[tune] {report['trials']} trials ({report['wall_seconds']:.0f}s): "
                f"{names[task_id]} default {task['default_ms']} ms, best {task['best_ms']} ms")

    return Progress()


# --------------------------------------------------------------------------- report


def _write_report(report):
    path = Path(report["log_dir"]) / "tuning.json"
    tmp = path.with_suffix(".json.tmp")
    data = {k: v for k, v in report.items() if k not in ("log_dir", "prior_seconds")}
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _read_report(log_dir: Path) -> dict:
    path = log_dir / "tuning.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RebirthError(f"{path}: not valid JSON ({exc}); move it away to start over")


# --------------------------------------------------------------------------- tune


def extract_tasks(mod, target):
    """[(task name, IRModule with one PrimFunc 'main', how often the model calls it)]."""
    from tvm.s_tir import meta_schedule as ms

    tasks = ms.relax_integration.extract_tasks(fused_module(mod, target), target)
    return [(t.task_name, t.dispatched[0], int(t.weight)) for t in tasks]


def _default_schedule(task_mod, target):
    from tvm import s_tir

    from .schedules import GenericCpuSchedule

    sch = GenericCpuSchedule().apply(task_mod["main"], target, False)
    if sch is None:
        sch = s_tir.Schedule(task_mod)
    return sch


def tune(mod, target, log_dir, trials: int, *, model_name="model", max_tasks=None,
         trials_per_iter=8, build_timeout=60.0, tracker=None, key=None, workers=None,
         seed=0, measure=True, log=_log) -> dict:
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
    builder = _make_builder(build_timeout, workers)
    if tracker:
        from .rpc import parse_tracker, require_key

        host, port = parse_tracker(tracker)
        require_key(host, port, key)
        runner = _make_rpc_runner(host, port, key, number=3, repeat=1, min_repeat_ms=50)
    else:
        runner = _make_local_runner(number=3, repeat=1, min_repeat_ms=50)
    log_dir.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(str(log_dir / DB_FILES[0]),
                                        str(log_dir / DB_FILES[1]), allow_missing=True)
    previous = _read_report(log_dir)
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
        log(f"[tune] measuring the default schedule of {len(fresh)} task(s)")
    for k, (name, task_mod, count) in enumerate(fresh):
        sch = _default_schedule(task_mod, target)
        built = builder.build([ms.builder.BuilderInput(sch.mod, target)])[0]
        default_ms = None
        if built.error_msg is None:
            args_info = ms.arg_info.ArgInfo.from_prim_func(task_mod["main"])
            ran = runner.run([ms.runner.RunnerInput(built.artifact_path, target.kind.name,
                                                    args_info)])[0].result()
            _remove_artifact(built.artifact_path)
            if ran.error_msg is None:
                default_ms = float(np.median([float(s) for s in ran.run_secs])) * 1000
                database.commit_tuning_record(ms.database.TuningRecord(
                    sch.trace, database.commit_workload(task_mod), ran.run_secs, target,
                    args_info))
        report["tasks"][name] = {"calls": count,
                                 "default_ms": round(default_ms, 4) if default_ms else None,
                                 "best_ms": round(default_ms, 4) if default_ms else None}
        log(f"[tune] default {k + 1}/{len(fresh)} {name}: {default_ms or float('nan'):.3f} ms")
        report["wall_seconds"] = round(report["prior_seconds"] + time.time() - started, 1)
        _write_report(report)

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
        log(f"[tune] {report['trials']} trials already in {log_dir}: nothing to do")
    else:
        covered = sum(share[n] for n, _, _ in chosen) / total
        log(f"[tune] searching {remaining} trials over {len(chosen)} of {len(tasks)} tasks "
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
            + [_make_progress(names, report, started, log)],
            task_scheduler="gradient")
    report["wall_seconds"] = round(report["prior_seconds"] + time.time() - started, 1)
    if measure and not tracker and not is_cross(target):
        report["model_ms"] = _measure_model(mod, target, database, log)
    _write_report(report)
    report.pop("prior_seconds")
    return report


def _measure_model(mod, target, database, log, rounds=7, number=3) -> dict:
    """Whole-model latency on this CPU with the generic schedule vs with this database,
    medians of interleaved rounds."""
    from .build import Runner
    from .measure import interleaved_rounds, tvm_timer

    x = _random_args_for(mod)
    runners = {"default_schedule": Runner(mod, target, tuned=False),
               "tuned": Runner(mod, target, tuned=database)}
    timers = {name: tvm_timer(r, x, number) for name, r in runners.items()}
    for timer in timers.values():
        timer()
    samples = interleaved_rounds(timers, rounds, "tune: whole model", log)
    result = {name: round(float(np.median(v)), 3) for name, v in samples.items()}
    result["speedup"] = round(result["default_schedule"] / result["tuned"], 3)
    result["tuned_functions"] = runners["tuned"].compiled.tuned
    result["functions"] = runners["tuned"].compiled.functions
    return result


def _random_args_for(mod):
    shape = [int(v) for v in mod["main"].params[0].ty.shape.values]
    return np.random.default_rng(0).standard_normal(shape).astype("float32")


def _remove_artifact(path):
    import shutil

    shutil.rmtree(os.path.dirname(path), ignore_errors=True)
