"""Devices on 127.0.0.1: an RPC tracker, an emulated Cortex-A72 and optionally this host.

The emulated device is the aarch64 apache-tvm runtime in an arm64 Debian sysroot, run by
qemu-user with ``QEMU_CPU=cortex-a72`` (instructions the core lacks trap, as on a phone).
The sysroot is built once (mmdebstrap + the aarch64 wheels, compiler library removed) into
the cache dir. Everything binds to loopback; the processes started are recorded in
``devices/state.json``, each the leader of its own process group, so ``stop`` ends exactly
those groups (TVM's tracker and servers work in a child that outlives a leader killed
alone); ``status`` asks the tracker's port, and ``start`` refuses while a recorded group or
the recorded port is still there.

The servers are `resilient_rpc_server.py`: TVM's server with a listen loop that survives a
crashed session (an illegal instruction kills only that session's forked child). The guest
Python runs through a host wrapper script (the host kernel cannot exec aarch64 binaries
without binfmt_misc, which containers lack).
"""

from __future__ import annotations

import logging
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..errors import RebirthError
from ..frontend.zoo import cache_dir

logger = logging.getLogger(__name__)

EMULATED_KEY = "cortex-a72"
LOCAL_KEY = "local"
DEBIAN_SUITE = "bookworm"
GUEST_PYTHON = "usr/bin/python3.11"
# the aarch64 wheels the emulated device runs (the runtime only; pinned like setup.py)
GUEST_WHEELS = ["apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "numpy",
                "typing_extensions", "cloudpickle"]
# Debian packages that provide the tools, by command
TOOLS = {"qemu-aarch64-static": "qemu-user-static", "qemu-aarch64": "qemu-user",
         "mmdebstrap": "mmdebstrap", "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu"}




def devices_dir() -> Path:
    return cache_dir() / "devices"


def state_path() -> Path:
    """Where `start` records its processes ($TVM_REBIRTH_DEVICE_STATE overrides it, so a
    second set of devices -- e.g. the tests' -- never touches the user's)."""
    env = os.environ.get("TVM_REBIRTH_DEVICE_STATE")
    return Path(env) if env else devices_dir() / "state.json"


@contextlib.contextmanager
def private_state(directory):
    """Inside, start/stop/status use a state file (and logs) in ``directory``: devices a
    tool starts for itself never clash with the user's own `tvm-rebirth device start`."""
    old = os.environ.get("TVM_REBIRTH_DEVICE_STATE")
    os.environ["TVM_REBIRTH_DEVICE_STATE"] = str(Path(directory) / "state.json")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TVM_REBIRTH_DEVICE_STATE", None)
        else:
            os.environ["TVM_REBIRTH_DEVICE_STATE"] = old


# --------------------------------------------------------------------------- provisioning


def ensure_tools() -> None:
    """Install the missing tools with apt-get when we can, else say exactly what to install."""
    missing = sorted({pkg for cmd, pkg in TOOLS.items() if shutil.which(cmd) is None})
    if not missing:
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        logger.info(f"[device] installing {' '.join(missing)} (apt-get)")
        for args in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
            proc = subprocess.run(args, capture_output=True, text=True,
                                  env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
            if proc.returncode != 0 and args[1] == "install":
                raise RebirthError(f"apt-get install {' '.join(missing)} failed: "
                                   f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        still = sorted({pkg for cmd, pkg in TOOLS.items() if shutil.which(cmd) is None})
        if not still:
            return
        missing = still
    raise RebirthError(f"the emulated device needs {' '.join(missing)}: install them with "
                       f"`apt-get install {' '.join(missing)}` (as root)")


def sysroot_dir() -> Path:
    return devices_dir() / f"arm64-{DEBIAN_SUITE}"


def ensure_sysroot() -> Path:
    """The arm64 sysroot with the aarch64 TVM runtime, built once (about a minute)."""
    root = sysroot_dir()
    if (root / "ready.json").exists():
        return root
    ensure_tools()
    build = root.with_name(root.name + f".build{os.getpid()}")
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    try:
        logger.info(f"[device] building the arm64 Debian sysroot in {root} (once)")
        _run(["mmdebstrap", "--variant=extract", "--architectures=arm64",
              "--include=python3.11,libstdc++6", DEBIAN_SUITE, str(build / "root")],
             "mmdebstrap (needs network access to deb.debian.org)")
        wheels = build / "wheels"
        logger.info("[device] downloading the aarch64 wheels: " + ", ".join(GUEST_WHEELS))
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
              "--no-deps", "--platform", "manylinux_2_28_aarch64", "--platform",
              "manylinux2014_aarch64", "--python-version", "3.11", "-d", str(wheels),
              *GUEST_WHEELS], "pip download of the aarch64 wheels")
        import zipfile

        site = build / "root/usr/lib/python3/dist-packages"
        for wheel in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(site)
        # the device runs compiled libraries only: drop the 240 MB compiler
        for lib in site.glob("tvm/lib/libtvm_compiler.so"):
            lib.unlink()
        shutil.rmtree(wheels)
        (build / "ready.json").write_text(json.dumps(
            {"suite": DEBIAN_SUITE, "wheels": GUEST_WHEELS, "built": time.time()}) + "\n")
        shutil.rmtree(root, ignore_errors=True)
        os.replace(build, root)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return root


def _run(args, what):
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["?"])
        raise RebirthError(f"{what} failed: {last[-1][:300]}")


def guest_python(root: Path) -> Path:
    """A host script that runs the guest Python under qemu as a Cortex-A72."""
    script = root / "guest-python"
    script.write_text(
        "#!/bin/sh\n"
        f"exec env QEMU_CPU=cortex-a72 TVM_USE_RUNTIME_LIB=1 {shutil.which('qemu-aarch64-static')}"
        f" -L {root / 'root'} {root / 'root' / GUEST_PYTHON} \"$@\"\n")
    script.chmod(0o755)
    return script


# --------------------------------------------------------------------------- processes


def free_port(start: int) -> int:
    """The first port from ``start`` (up to 200 on, and not beyond 65535) that is free."""
    end = min(start + 200, 65536)
    for port in range(start, end):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RebirthError(f"no free port on 127.0.0.1 in {start}..{end - 1}: pass a lower "
                       "--port (or none, for the first free one from 9190)")


def _spawn(args, log_file: Path):
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        # own session: stop kills the whole group (server + its session children)
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True).pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child of ours is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _group_members(pgid: int) -> list:
    """Live (not zombie) processes of process group ``pgid``: `start` runs every tracker and
    server as a group leader, and TVM's tracker and servers work in a child (PopenWorker)
    that outlives a leader killed alone."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def port_in_use(port: int) -> bool:
    """Whether something on 127.0.0.1 already listens on (or holds) ``port`` (connections
    of a closed listener in TIME_WAIT do not count: the tracker reuses the address too)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def port_holders(port: int, pids) -> list:
    """Those of ``pids`` that hold a listening TCP socket on ``port`` (read from /proc: the
    listening sockets' inodes, then each process's open descriptors)."""
    inodes = set()
    for table_file in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table_file) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and \
                    int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    holders = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    holders.append(pid)
                    break
            except OSError:
                continue
    return holders


def read_state() -> dict | None:
    path = state_path()
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise RebirthError(f"{path}: corrupt device state; remove it and run "
                           "`tvm-rebirth device start` again")


def _write_state(state: dict) -> None:
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, path)


def server_command(python, tracker_port: int, key: str, port: int, load_library=None):
    """An RPC server registering ``key``, bound to loopback, that survives crashed sessions
    (``python`` is this host's or the emulated device's)."""
    script = Path(__file__).with_name("resilient_rpc_server.py")
    args = [str(python), str(script), "--tracker", f"127.0.0.1:{tracker_port}", "--key", key,
            "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 50),
            "--custom-addr", "127.0.0.1"]
    if load_library:
        args += ["--load-library", load_library]
    return args


def wait_for_keys(port: int, counts: dict, timeout: float, pids=()) -> dict:
    """Wait until the tracker lists ``counts[key]`` free servers for every key."""
    from .rpc import tracker_summary

    deadline = time.time() + timeout
    queues = {}
    while time.time() < deadline:
        try:
            queues = tracker_summary("127.0.0.1", port).get("queue_info", {})
        except RebirthError:
            queues = {}
        if all(queues.get(k, {}).get("free", 0) >= n for k, n in counts.items()):
            return queues
        if any(not _alive(p) for p in pids):
            break
        time.sleep(0.5)
    missing = [k for k, n in counts.items() if queues.get(k, {}).get("free", 0) < n]
    raise RebirthError(f"device(s) {', '.join(missing)} did not register with the tracker "
                       f"127.0.0.1:{port} within {timeout:.0f}s (logs in "
                       f"{state_path().parent / 'logs'})")


def start(port=None, local=False, emulated=True, servers=1) -> dict:
    """Start a tracker on 127.0.0.1 and the devices; returns the state (also on disk)."""
    # the devices' servers listen on the ports from 10 after the tracker's
    if port is not None and not 1 <= port <= 65535 - 10:
        raise RebirthError(f"--port {port}: use 1 to 65525 (the devices take ports after it)")
    state = read_state()
    if state:
        groups = {p["pid"]: _group_members(p["pid"]) for p in state["processes"]}
        alive = sorted(pid for members in groups.values() for pid in members)
        if alive or port_in_use(state["port"]):
            what = (f"pid(s) {', '.join(map(str, alive))}" if alive
                    else "a process not started by us")
            raise RebirthError(f"devices already running (tracker 127.0.0.1:{state['port']}, "
                               f"held by {what}); `tvm-rebirth device stop` first")
    if port and port_in_use(port):
        raise RebirthError(f"port {port} on 127.0.0.1 is already in use: pass another --port "
                           "(or none, for the first free one from 9190)")
    root = ensure_sysroot() if emulated else None
    port = port or free_port(9190)
    logs = state_path().parent / "logs"
    processes = []
    state = {"host": "127.0.0.1", "port": port, "processes": processes, "keys": []}
    try:
        pid = _spawn([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                      "--port", str(port), "--port-end", str(port + 1)], logs / "tracker.log")
        processes.append({"role": "tracker", "pid": pid})
        _write_state(state)
        _wait_port(port, 30, pid)
        next_port = port + 10
        if emulated:
            python = guest_python(root)
            for i in range(servers):
                server_port = free_port(next_port)
                next_port = server_port + 60
                pid = _spawn(server_command(python, port, EMULATED_KEY, server_port),
                             logs / f"{EMULATED_KEY}-{i}.log")
                processes.append({"role": f"server {EMULATED_KEY}", "pid": pid,
                                  "key": EMULATED_KEY, "port": server_port})
            state["keys"].append(EMULATED_KEY)
        if local:
            server_port = free_port(next_port)
            pid = _spawn(server_command(sys.executable, port, LOCAL_KEY, server_port),
                         logs / f"{LOCAL_KEY}.log")
            processes.append({"role": f"server {LOCAL_KEY}", "pid": pid, "key": LOCAL_KEY,
                              "port": server_port})
            state["keys"].append(LOCAL_KEY)
        _write_state(state)
        logger.info(f"[device] tracker 127.0.0.1:{port}; waiting for {', '.join(state['keys'])}")
        counts = {}
        for proc in processes[1:]:
            counts[proc["key"]] = counts.get(proc["key"], 0) + 1
        wait_for_keys(port, counts, 180, [p["pid"] for p in processes])
    except BaseException:
        stop()
        raise
    return state


def _wait_port(port, timeout, pid):
    """Wait until the tracker we started (``pid``'s group) answers as a tracker on ``port``."""
    from .rpc import tracker_summary

    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _group_members(pid):
            break
        try:
            tracker_summary("127.0.0.1", port)
            return
        except RebirthError:
            time.sleep(0.2)
    raise RebirthError(f"the RPC tracker did not start on 127.0.0.1:{port} "
                       f"(log: {state_path().parent / 'logs' / 'tracker.log'})")


def stop() -> list:
    """End the processes `start` recorded (and only those); returns what was stopped."""
    state = read_state()
    if not state:
        return []
    stopped = []
    for proc in state["processes"]:  # the whole group: a killed leader leaves its worker
        if _group_members(proc["pid"]):
            try:
                os.killpg(proc["pid"], signal.SIGTERM)
            except OSError:
                continue
            stopped.append(proc)
    deadline = time.time() + 10
    for proc in stopped:
        while _group_members(proc["pid"]) and time.time() < deadline:
            time.sleep(0.1)
        if _group_members(proc["pid"]):
            try:
                os.killpg(proc["pid"], signal.SIGKILL)
            except OSError:
                pass
    if port_in_use(state["port"]):
        logger.warning(f"[device] 127.0.0.1:{state['port']} is still held by a process "
                       "`device start` did not start")
    state_path().unlink(missing_ok=True)
    return stopped


def status() -> dict:
    """What runs, said as it is: the tracker address, whether it answers as a tracker and
    whether its port is taken (``tracker_answers``, ``port_in_use``), which live processes
    of the recorded groups hold that port (``port_holders``), the tracker's view of each key,
    and per recorded process: ``leader_alive`` (the recorded pid itself), ``group`` (the live
    pids of its process group: TVM's tracker and servers work in a child that outlives a
    leader killed alone), ``alive`` (any of the group) and ``state`` ("running", "leader
    dead, group running" or "dead"). ``warnings`` says in words what is wrong (a dead
    leader whose group lives on, a port held by a process we did not start, a tracker that
    does not answer)."""
    from .rpc import tracker_summary

    state = read_state()
    if not state:
        return {"running": False, "tracker": None, "tracker_answers": False,
                "port_in_use": False, "port_holders": [], "keys": {}, "processes": [],
                "warnings": []}
    port = state["port"]
    where = f"127.0.0.1:{port}"
    processes = []
    for p in state["processes"]:
        members = _group_members(p["pid"])
        leader = p["pid"] in members
        processes.append(dict(p, alive=bool(members), leader_alive=leader, group=members,
                              state="running" if leader else
                              "leader dead, group running" if members else "dead"))
    try:  # the port, not the pid, says whether a tracker runs
        queues = tracker_summary("127.0.0.1", port).get("queue_info", {})
        answers = True
    except RebirthError:
        queues, answers = {}, False
    in_use = answers or port_in_use(port)
    holders = port_holders(port, [pid for p in processes for pid in p["group"]])
    warnings = []
    for p in processes:
        if p["state"] == "leader dead, group running":
            pids = ", ".join(map(str, p["group"]))
            what = f"{p['role']} pid {p['pid']} died, but its process group lives on (pid {pids})"
            held = [pid for pid in p["group"] if pid in holders]
            if p["role"] == "tracker" and held:
                what += (f" and still holds {where}" + (" and answers as the tracker"
                                                      if answers else ""))
            warnings.append(what + ": `tvm-rebirth device stop` ends the whole group")
    if in_use and not holders:
        warnings.append(f"{where} is held by a process `tvm-rebirth device start` did not "
                        "start")
    elif not answers and any(p["alive"] for p in processes if p["role"] == "tracker"):
        warnings.append(f"the tracker's processes run but {where} does not answer as an RPC "
                        "tracker")
    return {"running": answers or any(p["alive"] for p in processes), "tracker": where,
            "tracker_answers": answers, "port_in_use": in_use, "port_holders": holders,
            "keys": queues, "processes": processes, "warnings": warnings}
