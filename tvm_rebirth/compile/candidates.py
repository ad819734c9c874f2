"""How MetaSchedule builds and times candidates here: a forking builder with a hard timeout,
an in-process runner for this CPU, a runner that shares batches among a tracker key's
devices, and a progress callback that keeps tuning.json current."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import RebirthError
from ..report.output import write_atomic

logger = logging.getLogger(__name__)


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


RUN_DIR_PREFIX = "tvm-rebirth-tune-"
STALE_AFTER = 600  # seconds without change before a dead run's folder is removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def new_run_dir() -> str:
    """This run's folder for candidate libraries, ``<tmp>/tvm-rebirth-tune-<pid>-*``; the
    caller removes it at the end. Folders of runs that were killed (their pid gone, nothing
    changed for 10 minutes) are removed first."""
    tmp = Path(tempfile.gettempdir())
    for old in tmp.glob(RUN_DIR_PREFIX + "*"):
        pid = old.name[len(RUN_DIR_PREFIX):].split("-")[0]
        try:
            stale = time.time() - old.stat().st_mtime > STALE_AFTER
        except OSError:
            continue
        if pid.isdigit() and stale and not _pid_alive(int(pid)):
            logger.info(f"[tune] removing {old}, left by a killed run")
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-")


def make_builder(timeout: float, workers: int, run_dir=None):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder

    @derived_object
    class ForkBuilder(PyBuilder):
        """Builds each candidate in a forked child (TVM already imported, so no 40 s import per
        worker) with a hard kill after ``timeout`` seconds: one pathological unrolled candidate
        once kept LLVM busy for more than 8 minutes. One temp dir per artifact, because
        MetaSchedule's RemoveBuildArtifact deletes the artifact's parent directory. Those
        dirs live in ``run_dir`` (the tune removes it at the end); a failed build's dir goes
        at once, and an interrupted batch kills its children and removes theirs."""

        def build(self, build_inputs):
            results = [None] * len(build_inputs)
            pending = list(enumerate(build_inputs))
            running = {}
            try:
                while pending or running:
                    while pending and len(running) < workers:
                        i, inp = pending.pop(0)
                        path = os.path.join(tempfile.mkdtemp(prefix="cand-", dir=run_dir),
                                            "cand.so")
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
                            results[i] = BuilderResult(None,
                                                       f"build timed out after {timeout:g}s")
                        elif done == 0:
                            continue
                        elif os.path.exists(path) and status == 0:
                            results[i] = BuilderResult(path, None)
                        else:
                            error = Path(path + ".error")
                            results[i] = BuilderResult(None, error.read_text() if error.exists()
                                                       else f"build crashed (status {status})")
                        if results[i].artifact_path is None:
                            remove_artifact(path)
                        del running[pid]
            finally:
                for pid, (_, path, _) in running.items():  # interrupted: no child outlives us
                    try:
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                    except OSError:
                        pass
                    remove_artifact(path)
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


def make_local_runner(number: int, repeat: int, min_repeat_ms: int):
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


# a tuning session may last this long, plus this much per candidate it has left to time: a
# session that hangs on the device (seen under qemu: a device held ~600 s) is ended by the
# server after that, failing the candidate it ran, instead of holding the device for the
# whole session_timeout
SESSION_SECONDS = 30.0
SESSION_SECONDS_PER_CANDIDATE = 15.0


def make_rpc_runner(host, port, key, number: int, repeat: int, min_repeat_ms: int,
                     session_timeout: float = 600):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner, RunnerFuture, RunnerResult

    from ..deploy.rpc import request_session

    def run_share(inputs, results):
        """One device's share of a batch, in one session (re-requested if it breaks), which
        the device ends after a time sized for the candidates it has left."""
        session = None
        for position, (i, inp) in enumerate(inputs):
            try:
                if session is None:
                    left = len(inputs) - position
                    session = request_session(host, port, key, min(
                        session_timeout, SESSION_SECONDS + SESSION_SECONDS_PER_CANDIDATE * left))
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

            from ..deploy.rpc import tracker_summary

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


def make_commit_measured(database, contexts):
    """Instead of MetaSchedule's AddToDatabase, which also commits failed candidates (with a
    run time of 1e10 s): only measured candidates become records."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.database import TuningRecord
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    workloads = {}

    @derived_object
    class CommitMeasured(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results):
            ctx = contexts[task_id]
            for cand, built, ran in zip(measure_candidates, builder_results, runner_results):
                if built.error_msg is not None or ran.error_msg is not None or not ran.run_secs:
                    continue
                if task_id not in workloads:
                    workloads[task_id] = database.commit_workload(ctx.mod)
                database.commit_tuning_record(TuningRecord(
                    cand.sch.trace, workloads[task_id], ran.run_secs, ctx.target,
                    cand.args_info))

    return CommitMeasured()


def make_progress(names, report, started, errors):
    """A measure callback keeping tuning.json current. TVM turns an exception raised inside a
    callback into a bare RuntimeError, so a failed write of tuning.json (RebirthError) is also
    appended to ``errors`` for the caller to raise as it is."""
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
            try:
                write_report(report)
            except RebirthError as err:
                errors.append(err)
                raise
            logger.info(f"[tune] {report['trials']} trials ({report['wall_seconds']:.0f}s): "
                f"{names[task_id]} default {task['default_ms']} ms, best {task['best_ms']} ms")

    return Progress()


def write_report(report):
    """The folder's tuning.json, by report.output's rules (write_atomic): all of it or, on a
    full disk or any other failure, the old file untouched and no temporary file left; a
    RebirthError naming the path then."""
    path = Path(report["log_dir"]) / "tuning.json"
    data = {k: v for k, v in report.items() if k not in ("log_dir", "prior_seconds")}
    write_atomic(path, json.dumps(data, indent=1) + "\n")


def read_report(log_dir: Path) -> dict:
    path = log_dir / "tuning.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RebirthError(f"{path}: not valid JSON ({exc}); move it away to start over")


def remove_artifact(path):
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)
