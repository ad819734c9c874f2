"""tvm-rebirth tune: a real (tiny) MetaSchedule run writes a database that builds apply, a
killed tune resumes from its finished records, and the tuned build computes the same."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest

from tvm_rebirth.compile.build import Runner
from tvm_rebirth.frontend.loader import load_model
from tvm_rebirth.compile.targets import resolve_target
from tvm_rebirth.compile.database import DB_FILES, default_log_dir, load_database
from tvm_rebirth.compile.tune import extract_tasks

from onnx_models import chain_model
from test_cli import run
from test_flow_cli import assert_error

# trackers, RPC servers and tunes that time out: never two at once (see conftest)
pytestmark = pytest.mark.xdist_group("rpc")


@pytest.fixture
def logs(tmp_path, monkeypatch):
    """A private tuning_logs root, so tests never read or write the committed databases."""
    root = tmp_path / "tuning_logs"
    monkeypatch.setenv("TVM_REBIRTH_TUNING_LOGS", str(root))
    return root


def _records(log_dir):
    return (log_dir / DB_FILES[1]).read_text().splitlines()


def _tune_cmd(model_path, trials):
    return [sys.executable, "-m", "tvm_rebirth.cli", "tune", str(model_path), "--trials",
            str(trials), "--max-tasks", "1", "--json"]


def test_killed_tune_resumes_and_the_build_applies_its_database(tmp_path, logs):
    model_path = chain_model(tmp_path / "net.onnx", ["relu", "max_pool2d"])
    model = load_model(model_path)
    target = resolve_target("host")
    log_dir = default_log_dir(model.name, target, rebirth=False)
    tasks = extract_tasks(model.mod, target)
    assert len(tasks) == 3  # conv+bias+relu, max-pool, conv+bias
    total = 32  # searched trials: killed after 8 or more, then resumed to the total

    # first run: killed (SIGKILL, no chance to clean up) once some searched trials are in;
    # the whole process group, as a crash would take it, so no builder worker outlives it
    proc = subprocess.Popen(_tune_cmd(model_path, total), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    report = log_dir / "tuning.json"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if report.exists() and json.loads(report.read_text())["trials"] >= 8:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = json.loads(report.read_text())
    records_before = len(_records(log_dir))
    assert 8 <= kept["trials"] < total
    assert records_before >= len(tasks) + kept["trials"]  # defaults + searched, all on disk

    # second run continues to the same total, without re-measuring the defaults
    code, stdout, err = run(*_tune_cmd(model_path, total)[3:])
    assert code == 0, err
    assert "measuring the default schedule" not in err
    assert f"searching {total - kept['trials']} trials" in err
    data = json.loads(stdout)
    assert data["trials"] == total and data["database"] == str(log_dir)
    assert len(_records(log_dir)) >= records_before + total - kept["trials"] - data["failed_trials"]
    assert data["wall_seconds"] > kept["wall_seconds"]
    for task in data["tasks"].values():
        assert task["default_ms"] > 0 and task["best_ms"] <= task["default_ms"]
    whole = data["model_ms"]  # the whole model timed with and without the database
    assert whole["default_schedule"] > 0 and whole["tuned"] > 0
    assert (whole["tuned_functions"], whole["functions"]) == (3, 3)
    assert json.loads((log_dir / "tuning.json").read_text())["model_ms"] == whole

    # builds apply the database (every task has at least its default record) and compute
    # the same as ONNX Runtime; --no-tuning-logs ignores it
    assert load_database(target) is not None
    tuned, plain = Runner(model.mod), Runner(model.mod, tuned=False)
    assert (tuned.compiled.tuned, tuned.compiled.functions) == (3, 3)
    assert plain.compiled.tuned == 0
    x = np.random.default_rng(0).standard_normal((1, 4, 32, 32)).astype("float32")
    want = ort.InferenceSession(str(model_path)).run(None, {model.input_name: x})[0]
    np.testing.assert_allclose(tuned(x)[0], want, rtol=1e-3, atol=1e-4)
    code, stdout, err = run("build", model_path, "-o", str(tmp_path / "t.so"), "--json")
    assert code == 0, err
    assert json.loads(stdout)["tuned_functions"] == 3


def test_tune_errors(tmp_path, logs):
    model_path = chain_model(tmp_path / "net.onnx", ["relu"])
    assert_error(run("tune", model_path, "--trials", "4", "--target", "pentium"),
                 "unknown target 'pentium'", "cortex-a72", command="tune")
    assert_error(run("tune", model_path, "--trials", "0"),
                 "argument --trials: must be at least 1", "got 0",
                 command="tune")
    bad = tmp_path / "logs"
    bad.mkdir()
    (bad / "tuning.json").write_text("{not json")
    assert_error(run("tune", model_path, "--trials", "4", "--log-dir", str(bad)),
                 str(bad / "tuning.json"), "not valid JSON", command="tune")
    assert (bad / "tuning.json").read_text() == "{not json"


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_key(port, key, seconds=60):
    from tvm_rebirth.deploy.rpc import tracker_summary

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if key in tracker_summary("127.0.0.1", port).get("queue_info", {}):
                return
        except Exception:  # noqa: BLE001 -- not up yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"key {key} never registered")


@pytest.fixture
def tracker():
    """A real RPC tracker and one host RPC server (key 'local'), both on 127.0.0.1."""
    port, server_port = _free_port(), _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host",
                               "127.0.0.1", "--port", str(port), "--port-end",
                               str(port + 1)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)]
    time.sleep(1)
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}",
         "--key", "local", "--host", "127.0.0.1", "--port", str(server_port),
         "--port-end", str(server_port + 1), "--custom-addr", "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
    try:
        _wait_for_key(port, "local")
        yield f"127.0.0.1:{port}"
    finally:
        for proc in procs:  # with the PopenWorker each of them runs its loop in
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_tune_measures_on_a_device_from_the_tracker(tmp_path, logs, tracker):
    model_path = chain_model(tmp_path / "net.onnx", ["relu", "max_pool2d"])
    log_dir = tmp_path / "remote-db"
    code, stdout, err = run("tune", model_path, "--trials", "8", "--max-tasks", "1",
                            "--tracker", tracker, "--key", "local", "--log-dir", str(log_dir),
                            "--json")
    assert code == 0, err
    data = json.loads(stdout)
    assert data["trials"] == 8 and data["failed_trials"] == 0
    assert data["model_ms"] is None  # whole-model timing only when measuring on this CPU
    report = json.loads((log_dir / "tuning.json").read_text())
    assert report["measured_on"] == f"local via tracker {tracker}"
    assert all(t["default_ms"] > 0 for t in report["tasks"].values())
    assert len(_records(log_dir)) >= 3 + 8


def test_tracker_errors(tmp_path, logs, tracker):
    model_path = chain_model(tmp_path / "net.onnx", ["relu"])
    dead = f"127.0.0.1:{_free_port()}"
    cases = [
        (["--tracker", dead, "--key", "local"], [f"RPC tracker {dead} is unreachable"]),
        (["--tracker", tracker, "--key", "pixel7"],
         ["no device with key 'pixel7'", tracker, "keys there: local"]),
        (["--tracker", tracker], ["--tracker and --key go together"]),
        (["--tracker", "localhost", "--key", "local"], ["--tracker 'localhost'", "HOST:PORT"]),
    ]
    for extra, fragments in cases:
        log_dir = tmp_path / "db"
        assert_error(run("tune", model_path, "--trials", "4", "--log-dir", str(log_dir), *extra),
                     *fragments, command="tune")
        assert not log_dir.exists()  # nothing written before the device is known


def _write_default_records(folder, model, target):
    """A MetaSchedule database in ``folder`` holding, for every task of ``model`` on
    ``target``, the record of its default schedule (what a tune commits first)."""
    from tvm.s_tir import meta_schedule as ms

    from tvm_rebirth.compile.tune import _default_schedule

    folder.mkdir(parents=True)
    db = ms.database.JSONDatabase(str(folder / DB_FILES[0]), str(folder / DB_FILES[1]),
                                  allow_missing=True)
    tasks = extract_tasks(model.mod, target)
    for _, task_mod, _ in tasks:
        workload = db.commit_workload(task_mod)
        db.commit_tuning_record(ms.database.TuningRecord(
            _default_schedule(task_mod, target).trace, workload, [1e-3], target,
            ms.arg_info.ArgInfo.from_prim_func(task_mod["main"])))
    return len(tasks)


def test_a_cpu_without_records_applies_a_compatible_cpus(tmp_path, logs):
    """Records of another CPU with this one's vector unit are applied and named as their
    source; an incompatible CPU's are not; the CPU's own records replace them."""
    import tvm
    from tvm.target import codegen

    from tvm_rebirth.compile.database import compatible_keys, target_key
    from tvm_rebirth.compile.layouts import vector_unit

    model = load_model(chain_model(tmp_path / "net.onnx", ["relu", "max_pool2d"]))
    host = resolve_target("host")
    triple = codegen.llvm_get_system_triple()
    cpus = codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm", "mtriple": triple}))
    compatible = compatible_keys(host, cpus)[0]
    other = next(k for k in cpus if vector_unit(tvm.target.Target(
        {"kind": "llvm", "mtriple": triple, "mcpu": k})) not in (vector_unit(host), None))
    n = _write_default_records(logs / compatible / "net", model, host)
    _write_default_records(logs / other / "net", model, host)
    x = np.random.default_rng(0).standard_normal((1, 4, 32, 32)).astype("float32")
    untuned = Runner(model.mod, tuned=False)(x)[0]
    runner = Runner(model.mod)
    assert runner.compiled.tuned_by_source == {compatible: n}
    np.testing.assert_allclose(runner(x)[0], untuned, rtol=1e-5, atol=1e-5)
    code, out, err = run("build", str(tmp_path / "net.onnx"), "-o", str(tmp_path / "n.so"),
                         "--json")
    assert code == 0, err
    assert json.loads(out)["tuned_by_source"] == {compatible: n}
    # the CPU's own database: only its records
    _write_default_records(logs / target_key(host) / "net", model, host)
    assert Runner(model.mod).compiled.tuned_by_source == {target_key(host): n}


def test_databases_load_pruned_to_their_best_records_from_the_cache(tmp_path, monkeypatch):
    """A committed database (real MetaSchedule traces) loads in full once and from its pruned
    copy afterwards; both answer every workload's query with the same record."""
    import shutil

    from tvm_ffi import structural_hash
    from tvm.s_tir import meta_schedule as ms

    from tvm_rebirth.compile.database import (open_json_database, packaged_tuning_logs,
                                              pruned_records_dir)

    monkeypatch.setenv("TVM_REBIRTH_CACHE", str(tmp_path / "cache"))
    folder = min(packaged_tuning_logs().glob(f"*/*/{DB_FILES[1]}"),
                 key=lambda p: p.stat().st_size).parent
    committed = {name: (folder / name).read_bytes() for name in DB_FILES}
    full = ms.database.JSONDatabase(*(str(folder / name) for name in DB_FILES))
    first = open_json_database(folder)
    (copy,) = pruned_records_dir().iterdir()
    second = open_json_database(folder)
    assert [p.name for p in pruned_records_dir().iterdir()] == [copy.name]
    assert {name: (folder / name).read_bytes() for name in DB_FILES} == committed
    workloads = {structural_hash(r.workload.mod): r.workload.mod
                 for r in full.get_all_tuning_records()}
    assert len(second) == len(workloads) < len(full) == len(first)

    def best(db, mod):
        record = db.query_tuning_record(mod, resolve_target("host"), "main")
        return str(record.trace), [float(s) for s in record.run_secs]

    for mod in workloads.values():
        assert best(second, mod) == best(full, mod)

    # a torn line in another folder with the same records: the same pruned copy
    torn = tmp_path / "torn"
    shutil.copytree(folder, torn)
    with open(torn / DB_FILES[1], "ab") as f:
        f.write(committed[DB_FILES[1]].splitlines()[0][:40])
    assert len(open_json_database(torn)) == len(second)
    assert [p.name for p in pruned_records_dir().iterdir()] == [copy.name]

    # a cache that cannot be written: the full database, no error
    monkeypatch.setenv("TVM_REBIRTH_CACHE", str(tmp_path / "torn" / DB_FILES[0]))
    assert len(open_json_database(folder)) == len(full)


def test_a_candidate_that_outlasts_its_session_fails_alone(tmp_path, tracker, monkeypatch):
    """A tuning session on a device lasts a time sized for the candidates it has left; the
    device ends it after that, so a candidate that hangs fails on its own and the next one
    is timed in a new session (before, one hung session held the device for 600 s)."""
    import tvm
    from tvm import te
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    from tvm_rebirth.compile import candidates
    from tvm_rebirth.deploy.rpc import parse_tracker

    def artifact(n, name):  # an unscheduled n x n matmul: seconds at n = 1536, none at 16
        a, b = te.placeholder((n, n), name="a"), te.placeholder((n, n), name="b")
        k = te.reduce_axis((0, n), name="k")
        c = te.compute((n, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="c")
        func = te.create_prim_func([a, b, c])
        path = str(tmp_path / f"{name}.so")
        tvm.compile(tvm.IRModule({"main": func}), target="llvm").export_library(path)
        return RunnerInput(path, "llvm", ArgInfo.from_prim_func(func))

    monkeypatch.setattr(candidates, "SESSION_SECONDS", 2.0)
    monkeypatch.setattr(candidates, "SESSION_SECONDS_PER_CANDIDATE", 0.0)
    host, port = parse_tracker(tracker)
    runner = candidates.make_rpc_runner(host, port, "local", number=3, repeat=1,
                                        min_repeat_ms=50)
    start = time.time()
    slow, fast = (f.result() for f in runner.run([artifact(1536, "slow"),
                                                  artifact(16, "fast")]))
    assert slow.error_msg and slow.run_secs is None
    assert fast.error_msg is None and len(fast.run_secs) == 1, fast.error_msg
    assert time.time() - start < 60
