"""Faults around tuning and devices (issue 20): torn databases, failed or interrupted tunes,
hostile or dead trackers, orphaned device processes, leftover candidate folders."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from tvm_rebirth.compile.database import DB_FILES, clean_lines, default_log_dir, load_database
from tvm_rebirth.compile.targets import resolve_target
from tvm_rebirth.errors import RebirthError
from tvm_rebirth.frontend.loader import load_model

from onnx_models import chain_model
from test_cli import run
from test_flow_cli import assert_error
from test_tuning import _free_port, _wait_for_key, tracker  # noqa: F401 -- a fixture

# trackers, RPC servers and tunes that time out: never two at once (see conftest)
pytestmark = pytest.mark.xdist_group("rpc")


@pytest.fixture
def logs(tmp_path, monkeypatch):
    root = tmp_path / "tuning_logs"
    monkeypatch.setenv("TVM_REBIRTH_TUNING_LOGS", str(root))
    return root


@pytest.fixture
def tmpdir_env(tmp_path, monkeypatch):
    """A private TMPDIR for the CLI runs, to see what they leave behind."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    return tmp


def _leftovers(tmp):
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("tvm-rebirth"))


def _write_database(model, target, log_dir, tasks_in_report):
    """A database with a (fake-timed) default record per task, as a tune leaves it, and a
    tuning.json whose search is done and which lists the first ``tasks_in_report`` tasks."""
    from tvm.s_tir import meta_schedule as ms

    from tvm_rebirth.compile.tune import _default_schedule, extract_tasks

    log_dir.mkdir(parents=True)
    db = ms.database.JSONDatabase(str(log_dir / DB_FILES[0]), str(log_dir / DB_FILES[1]),
                                  allow_missing=True)
    tasks = extract_tasks(model.mod, target)
    for name, task_mod, _ in tasks:
        sch = _default_schedule(task_mod, target)
        db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, db.commit_workload(task_mod), [1e-5], target,
            ms.arg_info.ArgInfo.from_prim_func(task_mod["main"])))
    report = {"model": model.name, "target": str(target), "trials": 4, "failed_trials": 0,
              "wall_seconds": 1.0, "tasks": {name: {"calls": c, "default_ms": 0.01,
                                                    "best_ms": 0.01}
                                             for name, _, c in tasks[:tasks_in_report]}}
    (log_dir / "tuning.json").write_text(json.dumps(report))
    return tasks


def _all_lines_parse(path):
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# -- 2. torn or malformed database lines ------------------------------------------------------
def test_a_torn_record_is_skipped_by_builds_and_tune_appends_after_it(tmp_path, logs, caplog):
    model_path = chain_model(tmp_path / "net.onnx", ["relu", "max_pool2d"])
    model = load_model(model_path)
    target = resolve_target("host")
    log_dir = default_log_dir(model.name, target, rebirth=False)
    tasks = _write_database(model, target, log_dir, tasks_in_report=2)
    records, workloads = log_dir / DB_FILES[1], log_dir / DB_FILES[0]
    torn = records.read_bytes()
    torn = torn + torn.splitlines()[-1][:50]  # a record cut short by a full disk
    records.write_bytes(torn)
    n_lines = len(torn.splitlines())

    # builds (and bench) load the database: the torn line is skipped with a warning naming
    # the file and line, the file itself is left as it is
    caplog.set_level("WARNING", logger="tvm_rebirth")
    assert load_database(target) is not None
    warned = [r.getMessage() for r in caplog.records]
    assert any(f"{records}: line {n_lines} is torn" in m for m in warned), warned
    assert records.read_bytes() == torn
    code, stdout, err = run("build", model_path, "-o", str(tmp_path / "n.so"), "--json")
    assert code == 0, err
    assert f"{records}: line {n_lines} is torn" in err
    assert json.loads(stdout)["tuned_functions"] == 3  # every task still has its record

    # a blank line and a malformed workload (with a record that refers to it) are dropped too
    with open(workloads, "a") as f:
        f.write("\n[\"123\"]\n")
    orphan = json.loads(torn.splitlines()[0])
    orphan[0] = 3  # the malformed workload's index
    with open(records, "ab") as f:
        f.write(b"\n\n" + json.dumps(orphan).encode() + b"\n")
    kept_w, kept_r, skipped = clean_lines(log_dir)
    assert (len(kept_w), len(kept_r), skipped) == (3, 3, 5)

    # tune rewrites its folder clean and appends the missing task's default after it
    code, stdout, err = run("tune", model_path, "--trials", "4", "--max-tasks", "1",
                            "--no-measure", "--json")
    assert code == 0, err
    assert "torn or malformed" in err and "measuring the default schedule of 1 task" in err
    assert len(_all_lines_parse(workloads)) == 3
    lines = _all_lines_parse(records)
    assert len(lines) == 4 and all(0 <= line[0] < 3 for line in lines)
    assert set(json.loads(stdout)["tasks"]) == {n for n, _, _ in tasks}
    code, _, err = run("build", model_path, "-o", str(tmp_path / "n.so"))
    assert code == 0 and "torn" not in err, err


# -- 4, 8, 13. failed defaults are no records; Ctrl-C; no candidate folders left --------------
def test_failed_defaults_are_an_error_then_ctrl_c_then_resume(tmp_path, logs, tmpdir_env):
    """--build-timeout too short for anything: a clear error, no records, nothing marked done
    and no candidate folders; a correct run in the same folder works, Ctrl-C during its
    search exits 130 with one line; the rerun continues."""
    model_path = chain_model(tmp_path / "net.onnx", ["relu", "max_pool2d"])
    log_dir = tmp_path / "db"
    cmd = ["tune", str(model_path), "--trials", "8", "--max-tasks", "1", "--no-measure",
           "--log-dir", str(log_dir)]
    assert_error(run(*cmd, "--build-timeout", "0.001"),
                 "none of the 3 task(s) could be built and measured on this host",
                 "build timed out", str(log_dir), command="tune")
    assert not (log_dir / "tuning.json").exists()
    assert (log_dir / DB_FILES[1]).read_text() == ""
    assert _leftovers(tmpdir_env) == []

    proc = subprocess.Popen([sys.executable, "-m", "tvm_rebirth.cli", *cmd, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "[tune] searching" in line:
            break
    time.sleep(3)  # inside MetaSchedule's search
    assert proc.poll() is None, seen
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 130, rest
    assert rest.strip().splitlines()[-1] == "tvm-rebirth tune: interrupted", rest
    assert "Traceback" not in rest and "internal error" not in rest
    assert _leftovers(tmpdir_env) == []
    assert not [p for p in psutil.process_iter(["cmdline"])
                if str(log_dir) in " ".join(p.info["cmdline"] or [])]  # no builder child left
    report = json.loads((log_dir / "tuning.json").read_text())
    assert len(report["tasks"]) == 3 and report["trials"] < 8

    code, stdout, err = run(*cmd, "--json")
    assert code == 0, err
    assert "measuring the default schedule" not in err
    data = json.loads(stdout)
    assert data["trials"] == 8 and all(t["default_ms"] > 0 for t in data["tasks"].values())
    assert _leftovers(tmpdir_env) == []
    for line in _all_lines_parse(log_dir / DB_FILES[1]):  # failed candidates are no records
        assert max(line[1][1]) < 1e9


# -- 4. tune's arguments and another model's folder -------------------------------------------
def test_tune_argument_and_folder_errors(tmp_path, logs):
    model_path = chain_model(tmp_path / "net.onnx", ["relu"])
    log_dir = tmp_path / "db"
    base = ["tune", model_path, "--trials", "4", "--log-dir", str(log_dir)]
    assert_error(run(*base, "--max-tasks", "0"), "argument --max-tasks: must be at least 1",
                 command="tune")
    assert_error(run(*base, "--target", "cortex-a72", "--no-measure"),
                 "does not run on this host", "--tracker", command="tune")
    assert not log_dir.exists()
    log_dir.mkdir()
    (log_dir / "tuning.json").write_text(json.dumps({"model": "alexnet", "trials": 4,
                                                     "tasks": {}}))
    assert_error(run(*base), str(log_dir), "model 'alexnet'", "not 'net'", command="tune")
    assert sorted(p.name for p in log_dir.iterdir()) == ["tuning.json"]


# -- 3. every network wait has a timeout ------------------------------------------------------
class _Listener:
    """Something that is not a tracker on a port: silent (accepts, never answers) or
    answering garbage like an HTTP server."""

    def __init__(self, reply: bytes | None):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.reply, self.conns = reply, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.reply is not None:
                try:
                    conn.recv(4)
                    conn.sendall(self.reply)
                except OSError:
                    pass

    def close(self):
        for conn in self.conns:
            conn.close()
        self.sock.close()


def test_a_port_where_something_else_listens_is_a_timely_one_line_error(tmp_path, logs):
    from tvm_rebirth.deploy.rpc import tracker_summary

    model_path = chain_model(tmp_path / "net.onnx", ["relu"])
    silent, http = _Listener(None), _Listener(b"HTTP/1.0 400 Bad Request\r\n\r\n" * 4)
    try:
        for listener, command in ((silent, "tune"), (http, "bench")):
            where = f"127.0.0.1:{listener.port}"
            extra = ["--trials", "4"] if command == "tune" else []
            started = time.time()
            assert_error(run(command, model_path, *extra, "--tracker", where, "--key", "local"),
                         where, "did not answer as an RPC tracker", command=command)
            assert time.time() - started < 60
        with pytest.raises(RebirthError, match=f"127.0.0.1:{http.port} did not answer"):
            tracker_summary("127.0.0.1", http.port)
    finally:
        silent.close()
        http.close()


def test_a_request_for_a_key_whose_server_was_killed_times_out(tracker, monkeypatch):
    from tvm_rebirth.deploy import rpc
    from tvm_rebirth.deploy.device import server_command

    monkeypatch.setattr(rpc, "GONE_GRACE", 4.0)
    host, port = rpc.parse_tracker(tracker)
    doomed = subprocess.Popen(server_command(sys.executable, port, "doomed", _free_port()),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        _wait_for_key(port, "doomed")
        assert rpc.servers_of(rpc.tracker_summary(host, port), "doomed") == 1
    finally:
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait()
    rpc.require_key(host, port, "doomed")  # the tracker still knows the key
    started = time.time()
    with pytest.raises(RebirthError, match=f"key 'doomed' from tracker {tracker}: no server"):
        rpc.request_session(host, port, "doomed")
    assert time.time() - started < 60
    rpc.request_session(host, port, "local")  # the live key still serves


# -- 3, 9. device start on a taken port; a tracker that outlives its leader -------------------
def test_device_start_on_a_taken_port_and_an_orphaned_tracker(tmp_path, monkeypatch):
    from tvm_rebirth.deploy.device import port_in_use

    state = tmp_path / "devices" / "state.json"
    monkeypatch.setenv("TVM_REBIRTH_DEVICE_STATE", str(state))
    taken = _Listener(None)
    try:
        started = time.time()
        assert_error(run("device", "start", "--local", "--no-emulated", "--port",
                         str(taken.port)),
                     f"port {taken.port} on 127.0.0.1 is already in use", command="device")
        assert time.time() - started < 30 and not state.exists()
    finally:
        taken.close()

    code, stdout, err = run("device", "start", "--local", "--no-emulated", "--json")
    assert code == 0, err
    info = json.loads(stdout)
    port = int(info["tracker"].rsplit(":", 1)[1])
    tracker_pid = info["processes"][0]["pid"]
    recorded = state.read_text()
    try:
        status = json.loads(run("device", "status", "--json")[1])
        assert status["tracker_answers"] and status["port_in_use"] and status["warnings"] == []
        assert [p["state"] for p in status["processes"]] == ["running", "running"]
        assert status["port_holders"] and set(status["port_holders"]) <= set(
            status["processes"][0]["group"])
        os.kill(tracker_pid, signal.SIGKILL)  # the leader only: TVM's worker keeps the port
        deadline = time.time() + 10
        while psutil.pid_exists(tracker_pid) and psutil.Process(tracker_pid).status() != \
                psutil.STATUS_ZOMBIE and time.time() < deadline:
            time.sleep(0.1)
        assert port_in_use(port)
        # status says it as it is: the leader died, its group still holds and serves the port
        status = json.loads(run("device", "status", "--json")[1])
        tracker = status["processes"][0]
        assert status["running"] and status["tracker_answers"] and status["port_in_use"]
        assert tracker["alive"] and not tracker["leader_alive"]
        assert tracker["state"] == "leader dead, group running"
        assert tracker["group"] and tracker_pid not in tracker["group"]
        assert status["port_holders"] and set(status["port_holders"]) <= set(tracker["group"])
        assert status["processes"][1]["state"] == "running"
        assert len(status["warnings"]) == 1, status["warnings"]
        for fragment in (f"tracker pid {tracker_pid} died", "process group lives on",
                         f"holds 127.0.0.1:{port}", "answers as the tracker", "device stop"):
            assert fragment in status["warnings"][0], status["warnings"]
        code, text, err = run("device", "status")
        assert code == 0, err
        assert f"tracker 127.0.0.1:{port} (answers, port in use)" in text
        assert f"tracker: pid {tracker_pid} (dead; its group runs on: pid " in text, text
        assert "alive" not in text and f"pid {tracker_pid} (running)" not in text, text
        assert f"warning: tracker pid {tracker_pid} died" in text, text
        assert_error(run("device", "start", "--local", "--no-emulated"), "already running",
                     f"127.0.0.1:{port}", command="device")
        assert state.read_text() == recorded  # the orphan is not forgotten
    finally:
        code, stdout, err = run("device", "stop", "--json")
    assert code == 0, err
    assert len(json.loads(stdout)["stopped"]) == 2
    assert not port_in_use(port) and not state.exists()


# -- 13. candidate folders of killed runs -----------------------------------------------------
def test_candidate_folders_of_killed_runs_are_removed(tmp_path, monkeypatch):
    import tempfile

    from tvm_rebirth.compile import candidates

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"tvm-rebirth-tune-{dead.pid}-abc"
    live = tmp_path / f"tvm-rebirth-tune-{os.getpid()}-def"
    recent = tmp_path / f"tvm-rebirth-tune-{dead.pid}-ghi"
    for folder in (stale, live, recent):
        (folder / "cand-x").mkdir(parents=True)
    old = time.time() - 2 * candidates.STALE_AFTER
    os.utime(stale, (old, old))
    os.utime(live, (old, old))
    run_dir = candidates.new_run_dir()
    assert run_dir.startswith(str(tmp_path / f"tvm-rebirth-tune-{os.getpid()}-"))
    assert not stale.exists() and live.exists() and recent.exists()


# -- 1. tune's tuning.json on a full disk -----------------------------------------------------
def test_a_full_disk_while_tuning_keeps_tuning_json_whole(tmp_path, logs, monkeypatch):
    """tuning.json is written by report.output.write_atomic: ENOSPC (simulated in process at
    the fsync) while measuring defaults or inside MetaSchedule's search is a RebirthError
    naming the file, which keeps its previous content, and no temporary file is left."""
    from tvm_rebirth.compile.tune import extract_tasks, tune
    from tvm_rebirth.report import output

    model = load_model(chain_model(tmp_path / "net.onnx", ["relu", "max_pool2d"]))
    target = resolve_target("host")
    log_dir = tmp_path / "db"
    log_dir.mkdir()
    report = log_dir / "tuning.json"
    old = json.dumps({"model": model.name, "trials": 0, "failed_trials": 0,
                      "wall_seconds": 0.0, "tasks": {}}) + "\n"
    report.write_text(old)
    fsyncs = []

    def full_after(n):
        def fsync(fd):
            fsyncs.append(fd)
            if len(fsyncs) > n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsyncs.clear()
        monkeypatch.setattr(output.os, "fsync", fsync)

    def no_temporary_files():
        return not [p for p in os.listdir(log_dir) if ".tmp" in p]

    # 1. the first default measured, its tuning.json cannot be written
    full_after(0)
    with pytest.raises(RebirthError, match=f"{report}: cannot write .No space left on device"):
        tune(model.mod, target, log_dir, 8, model_name=model.name, max_tasks=1, measure=False)
    assert report.read_text() == old and no_temporary_files()

    # 2. every default written, then the disk fills during the search: the error raised in
    # MetaSchedule's callback comes out as itself, not as TVM's bare RuntimeError
    n_tasks = len(extract_tasks(model.mod, target))
    full_after(n_tasks)
    with pytest.raises(RebirthError, match=f"{report}: cannot write .No space left on device"):
        tune(model.mod, target, log_dir, 8, model_name=model.name, max_tasks=1, measure=False)
    assert len(fsyncs) == n_tasks + 1 and no_temporary_files()
    kept = json.loads(report.read_text())
    assert len(kept["tasks"]) == n_tasks and kept["trials"] == 0
    assert all(t["default_ms"] > 0 for t in kept["tasks"].values())
