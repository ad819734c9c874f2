"""The phone path on 127.0.0.1: `tvm-rebirth device` starts a real RPC tracker, emulated
Cortex-A72 servers (the aarch64 TVM runtime under qemu-user) and a host server; bench and
tune run through it. The sysroot is provisioned once into the cache (needs network the first
time; CI installs qemu-user, qemu-user-static and mmdebstrap)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import tvm

from tvm_rebirth.compile.build import compile_module, export_library
from tvm_rebirth.deploy.device import EMULATED_KEY, server_command, sysroot_dir
from tvm_rebirth.frontend.loader import load_model

from onnx_models import chain_model
from test_cli import run
from test_flow_cli import assert_error

# emulated devices, trackers and tunes that time out: never two at once (see conftest)
pytestmark = [pytest.mark.xdist_group("rpc"), pytest.mark.skipif(
    shutil.which("qemu-aarch64-static") is None or shutil.which("mmdebstrap") is None,
    reason="needs qemu-user-static, qemu-user and mmdebstrap (installed by .ci/run)")]


@pytest.fixture(scope="module")
def devices(tmp_path_factory):
    """tracker + two emulated Cortex-A72 servers + a host server; a private state file."""
    state = tmp_path_factory.mktemp("devices") / "state.json"
    os.environ["TVM_REBIRTH_DEVICE_STATE"] = str(state)
    try:
        code, stdout, err = run("device", "start", "--local", "--servers", "2", "--json")
        assert code == 0, err
        info = json.loads(stdout)
        yield info
    finally:
        run("device", "stop")
        os.environ.pop("TVM_REBIRTH_DEVICE_STATE", None)


def _listening_addresses(pid):
    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    return {c.laddr.ip for p in procs for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def test_start_and_status_everything_on_loopback(devices):
    assert devices["running"] and devices["tracker"].startswith("127.0.0.1:")
    assert devices["keys"][EMULATED_KEY]["free"] == 2 and devices["keys"]["local"]["free"] == 1
    code, stdout, err = run("device", "status", "--json")
    assert code == 0, err
    status = json.loads(stdout)
    assert status["tracker"] == devices["tracker"]
    assert [p["role"] for p in status["processes"]] == [
        "tracker", f"server {EMULATED_KEY}", f"server {EMULATED_KEY}", "server local"]
    for proc in status["processes"]:
        assert proc["alive"]
        assert _listening_addresses(proc["pid"]) <= {"127.0.0.1"}
    assert (sysroot_dir() / "root/usr/lib/python3/dist-packages/tvm").is_dir()
    # a second start is refused, the running devices stay
    code, _, err = run("device", "start")
    assert code == 2 and "already running" in err


def test_small_model_on_the_emulated_device_matches_the_host(devices, tmp_path):
    model_path = chain_model(tmp_path / "net.onnx", ["batch_norm", "avg_pool2d"])  # exact
    assert run("plan", model_path, "--select", "all", "-o", str(tmp_path / "p.yaml"))[0] == 0
    report = tmp_path / "report.json"
    code, stdout, err = run("bench", model_path, "--plan", str(tmp_path / "p.yaml"),
                            "--tracker", devices["tracker"], "--key", EMULATED_KEY,
                            "--rounds", "2", "-o", str(report), "--json")
    assert code == 0, err
    data = json.loads(stdout)
    assert json.loads(report.read_text()) == data
    assert "cortex-a72 (emulated" in data["device"] and data["latency_is_emulated"]
    assert data["target"] == "cortex-a72"
    assert data["device_vs_host_max_abs_err"] <= 1e-5 * max(1.0, data["max_abs_output"])
    assert data["max_abs_err"] <= 1e-4 * max(1.0, data["max_abs_output"])  # exact sites
    o, r = data["original"], data["rebirth"]
    assert o["instructions"] > r["instructions"] > 0
    assert data["instructions_ratio"] == round(o["instructions"] / r["instructions"], 3)


def test_plan_pays_on_the_emulated_device_and_on_a_tracker_device(devices, tmp_path):
    """plan --select paying measures every site variant where the model will run: exact
    instruction counts on the emulated Cortex-A72 (through its tracker or as --target),
    latency on any other tracker device."""
    from tvm_rebirth.compile.targets import resolve_target
    from tvm_rebirth.deploy.remote import count_instructions_per_inference

    model_path = chain_model(tmp_path / "net.onnx", ["relu", "max_pool2d", "lrn"])
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).random((16, 4, 32, 32), dtype=np.float32))
    common = ["--calib", str(calib), "--images", "16", "--json"]
    code, out, err = run("plan", model_path, "--tracker", devices["tracker"], "--key",
                         EMULATED_KEY, "-o", str(tmp_path / "a72.yaml"), *common)
    assert code == 0, err
    emulated = json.loads(out)["selection"]
    assert emulated["unit"] == "instructions" and emulated["target"] == "emulated-cortex-a72"
    (site,) = emulated["sites"].values()
    assert site["variant"] == "keep-kernel", site  # conv+relu+pool+LRN -> one conv pays
    # the whole model's count is the count of one inference (up to the guest Python's own
    # call overhead, ~1e4 instructions: visible only on a model this small)
    x = np.random.default_rng(0).random((1, 4, 32, 32), dtype=np.float32)
    target = resolve_target("cortex-a72")
    lib = tmp_path / "net.so"
    export_library(compile_module(load_model(model_path).mod, target).executable, str(lib),
                   target)
    whole = count_instructions_per_inference(lib, x, tmp_path)
    assert abs(emulated["model_cost"] - whole) <= 0.02 * whole + 2e4, (emulated["model_cost"],
                                                                       whole)
    # the same core as --target: the cached table, the same choice
    code, out, err = run("plan", model_path, "--target", "cortex-a72", "-o",
                         str(tmp_path / "t.yaml"), *common)
    assert code == 0 and "is cached" in err, err
    assert json.loads(out)["selection"]["sites"] == emulated["sites"]
    # a tracker device that is not the emulated core: latency measured on it
    code, out, err = run("plan", model_path, "--tracker", devices["tracker"], "--key", "local",
                         "-o", str(tmp_path / "local.yaml"), *common)
    assert code == 0, err
    local = json.loads(out)["selection"]
    assert local["unit"] == "ms" and local["target"].startswith("tracker-local-")
    assert local["model_cost"] > 0


def test_private_emulated_device_for_the_demo(devices, tmp_path, caplog):
    """demo and benchmarks start their own tracker + emulated A72 beside the user's devices,
    bench through it, and stop exactly what they started."""
    from tvm_rebirth.deploy.remote import bench_on_emulated_device

    model = load_model(chain_model(tmp_path / "net.onnx", ["relu", "max_pool2d"]))
    x = np.random.default_rng(0).standard_normal((1, 4, 32, 32)).astype("float32")
    caplog.set_level("INFO", logger="tvm_rebirth")
    result = bench_on_emulated_device({"original": model.mod}, x, tmp_path / "private")
    logs = [record.getMessage() for record in caplog.records]
    assert result["latency_is_emulated"] and result["original"]["instructions"] > 0
    assert result["device_vs_host_max_abs_err"] <= 1e-5 * max(1.0, result["max_abs_output"])
    assert not (tmp_path / "private" / "state.json").exists()  # stopped
    assert (tmp_path / "private" / "logs" / "tracker.log").exists()
    assert any("[device] tracker 127.0.0.1:" in line for line in logs)
    status = json.loads(run("device", "status", "--json")[1])  # the user's devices stay
    assert status["tracker"] == devices["tracker"] and all(p["alive"] for p in status["processes"])
    tracker = result["device"].split(" on ")[1].rstrip(")")
    assert tracker != devices["tracker"]


def test_a_fine_tuned_rebirth_executes_fewer_instructions(devices, tmp_path):
    """A trained zoo network's streamline sites (conv + pool + LRN -> one conv), fine-tuned,
    on the emulated core: fewer guest instructions, the device computing what the host does.
    (GoogLeNet and AlexNet: benchmarks/plans.py and peers.py.)"""
    plan = tmp_path / "p.yaml"
    assert run("plan", "fmnist-inception", "--select", "all", "--kinds", "streamline", "-o",
               str(plan))[0] == 0
    code, stdout, err = run("bench", "fmnist-inception", "--plan", str(plan), "--tracker",
                            devices["tracker"], "--key", EMULATED_KEY, "--rounds", "1",
                            "--images", "16", "--json")
    assert code == 0, err
    data = json.loads(stdout)
    assert data["instructions_ratio"] >= 1.3, data
    assert data["device_vs_host_max_abs_err"] <= 1e-3 * data["max_abs_output"]


def test_illegal_instruction_traps_and_the_server_keeps_serving(devices, tmp_path):
    """SVE does not exist on a Cortex-A72: the session dies like on the phone, the server
    stays up and the next session works."""
    from tvm import relax

    from tvm_rebirth.deploy.rpc import parse_tracker, request_session

    model = load_model(chain_model(tmp_path / "net.onnx", ["relu", "max_pool2d"]))
    sve = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                             "mcpu": "neoverse-v1", "mattr": ["+neon", "+sve"]})
    export_library(compile_module(model.mod, sve, tuned=False).executable,
                   str(tmp_path / "sve.so"), sve)
    disasm = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(tmp_path / "sve.so")],
                            capture_output=True, text=True).stdout
    assert " z0." in disasm or "whilelo" in disasm or "index\tz" in disasm  # really SVE
    host, port = parse_tracker(devices["tracker"])
    x = np.random.default_rng(0).standard_normal((1, 4, 32, 32)).astype("float32")
    session = request_session(host, port, EMULATED_KEY)
    session.upload(str(tmp_path / "sve.so"), "sve.so")
    with pytest.raises(Exception, match="kShutdown|connection|closed"):
        vm = relax.VirtualMachine(session.load_module("sve.so"), session.cpu())
        vm["main"](tvm.runtime.tensor(x, session.cpu())).numpy()
    a72 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                             "mcpu": "cortex-a72", "mattr": ["+neon"]})
    export_library(compile_module(model.mod, a72, tuned=False).executable,
                   str(tmp_path / "ok.so"), a72)
    deadline = time.time() + 60
    while True:  # the crashed server re-registers as free
        session = request_session(host, port, EMULATED_KEY)
        try:
            session.upload(str(tmp_path / "ok.so"), "ok.so")
            vm = relax.VirtualMachine(session.load_module("ok.so"), session.cpu())
            out = vm["main"](tvm.runtime.tensor(x, session.cpu())).numpy()
            break
        except Exception:  # noqa: BLE001 -- we may have reached the other server first
            if time.time() > deadline:
                raise
    assert out.shape == (1, 4, 15, 15)
    del vm, session  # ends the session: both servers free again
    deadline = time.time() + 60
    while True:
        status = json.loads(run("device", "status", "--json")[1])
        if status["keys"][EMULATED_KEY]["free"] == 2 or time.time() > deadline:
            break
        time.sleep(1)
    assert all(p["alive"] for p in status["processes"])
    assert status["keys"][EMULATED_KEY]["free"] == 2


def test_farm_tune_survives_a_killed_server(devices, tmp_path):
    """Two extra emulated servers under one key; one is killed while the tune runs."""
    from tvm_rebirth.deploy.rpc import parse_tracker

    _, port = parse_tracker(devices["tracker"])
    guest = sysroot_dir() / "guest-python"
    # the servers' logs say which session hung, should the tune stall
    logs = [open(tmp_path / f"farm-{i}.log", "w") for i in range(2)]
    farm = [subprocess.Popen(server_command(guest, port, "farm", 9700 + 60 * i),
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            for i, log in enumerate(logs)]
    try:
        from test_tuning import _wait_for_key

        _wait_for_key(port, "farm", 120)
        model_path = chain_model(tmp_path / "net.onnx", ["relu", "max_pool2d"])
        log_dir = tmp_path / "db"
        tune = subprocess.Popen(
            [sys.executable, "-m", "tvm_rebirth.cli", "tune", str(model_path), "--target",
             "cortex-a72", "--trials", "16", "--max-tasks", "1", "--tracker",
             devices["tracker"], "--key", "farm", "--log-dir", str(log_dir), "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        report = log_dir / "tuning.json"
        deadline = time.time() + 600
        while time.time() < deadline and tune.poll() is None:
            if report.exists() and json.loads(report.read_text())["tasks"]:
                break
            time.sleep(0.5)
        os.killpg(farm[0].pid, signal.SIGKILL)  # one device dies mid-tune
        stdout, stderr = tune.communicate(timeout=900)
        assert tune.returncode == 0, stderr + "".join(
            f"\nfarm-{i}.log:\n" + (tmp_path / f"farm-{i}.log").read_text()[-2000:]
            for i in range(2))
        data = json.loads(stdout)
        assert data["trials"] == 16
        records = (log_dir / "database_tuning_record.json").read_text().splitlines()
        assert len(records) >= 3 + 16 - data["failed_trials"]
        assert data["failed_trials"] < 16
    finally:
        for proc in farm:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
        for log in logs:
            log.close()


def test_device_errors(devices, tmp_path):
    model_path = chain_model(tmp_path / "net.onnx", ["batch_norm"])
    assert run("plan", model_path, "--select", "all", "-o", str(tmp_path / "p.yaml"))[0] == 0
    report = tmp_path / "r.json"
    base = ["bench", model_path, "--plan", str(tmp_path / "p.yaml"), "-o", str(report)]
    assert_error(run(*base, "--tracker", devices["tracker"], "--key", "pixel7"),
                 "no device with key 'pixel7'", devices["tracker"], command="bench")
    assert_error(run(*base, "--tracker", "127.0.0.1:1", "--key", EMULATED_KEY),
                 "RPC tracker 127.0.0.1:1 is unreachable", command="bench")
    assert_error(run(*base, "--tracker", devices["tracker"]), "--tracker and --key",
                 command="bench")
    # rounds that would outlive the session's timeout stop before the device ends it (a
    # session ended mid-message can abort the RPC client)
    assert_error(run(*base, "--tracker", devices["tracker"], "--key", "local", "--rounds",
                     "1000000", "--session-timeout", "3"),
                 "device 'local' on tracker", "timing rounds would outlive",
                 "--session-timeout (3s)", command="bench")
    assert not report.exists()


def test_a_timing_call_that_could_outlive_the_session_is_refused_before_it_starts():
    from tvm_rebirth.deploy.remote import OutlivesSession, SessionClock

    calls = []

    def slow():
        calls.append(time.monotonic())
        time.sleep(0.4)
        return len(calls)

    guarded = SessionClock(1.6).guarded(slow)
    assert guarded() == 1  # 1.6 s left, no call timed yet
    with pytest.raises(OutlivesSession):
        guarded()  # ~1.2 s left, less than twice the 0.4 s call + 1 s
    assert len(calls) == 1
    unlimited = SessionClock(None).guarded(slow)
    assert [unlimited() for _ in range(2)] == [2, 3]


def test_a_device_killed_mid_run_is_a_one_line_error_and_no_report(devices, tmp_path):
    from tvm_rebirth.deploy.rpc import parse_tracker

    _, port = parse_tracker(devices["tracker"])
    doomed = subprocess.Popen(server_command(sysroot_dir() / "guest-python", port, "doomed",
                                             9800), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        from test_tuning import _wait_for_key

        _wait_for_key(port, "doomed", 120)
        model_path = chain_model(tmp_path / "net.onnx", ["batch_norm"])
        assert run("plan", model_path, "--select", "all", "-o", str(tmp_path / "p.yaml"))[0] == 0
        report = tmp_path / "r.json"
        bench = subprocess.Popen(
            [sys.executable, "-m", "tvm_rebirth.cli", "bench", str(model_path), "--plan",
             str(tmp_path / "p.yaml"), "--tracker", devices["tracker"], "--key", "doomed",
             "--target", "cortex-a72", "--rounds", "100000", "-o", str(report)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in bench.stderr:  # kill the device once timing rounds are running
            if "round 3/" in line:
                os.killpg(doomed.pid, signal.SIGKILL)
                break
        rest = bench.stderr.read()
        bench.wait(timeout=300)
        assert bench.returncode == 2, rest
        last = rest.strip().splitlines()[-1]
        assert last.startswith("tvm-rebirth bench: error: device 'doomed' on tracker "
                               f"{devices['tracker']} failed during the run"), last
        assert "Traceback" not in rest and not report.exists()
    finally:
        try:
            os.killpg(doomed.pid, signal.SIGKILL)
        except OSError:
            pass
        doomed.wait()
