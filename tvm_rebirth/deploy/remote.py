"""Original vs rebirth on a device from the RPC tracker: cross-build, upload, run, time,
compare with the host build, and on the emulated Cortex-A72 count guest instructions."""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import RebirthError

logger = logging.getLogger(__name__)


def default_target_for(key: str) -> str:
    from .device import LOCAL_KEY
    from ..compile.targets import PRESETS

    if key in PRESETS:
        return key
    if key == LOCAL_KEY:
        return "host"
    raise RebirthError(f"key '{key}' is not a target preset: pass --target "
                       f"(one of host, {', '.join(PRESETS)})")


def is_emulated(host: str, port: int, key: str) -> bool:
    """Whether (tracker, key) is the emulated Cortex-A72 that `tvm-rebirth device` started."""
    from .device import EMULATED_KEY, read_state

    state = read_state()
    return bool(state and key == EMULATED_KEY and state["port"] == port
                and host in ("127.0.0.1", "localhost"))


class OutlivesSession(Exception):
    """The next timing call could outlast the session's timeout."""


class SessionClock:
    """The age of an RPC session the device ends after ``timeout`` seconds (0 or None: never).
    ``guarded(call)`` refuses, with OutlivesSession, a call that could end after the device
    ended the session: one it ends mid-message can crash the RPC client (a garbled length:
    std::bad_alloc and an abort, no exception)."""

    def __init__(self, timeout: float):
        self.start, self.timeout, self.longest = time.monotonic(), timeout, 0.0

    def left(self) -> float:
        """Seconds until the device ends the session (infinite without a timeout)."""
        if not self.timeout:
            return float("inf")
        return self.start + self.timeout - time.monotonic()

    def guarded(self, call):
        def once():
            if self.left() < 2 * self.longest + 1.0:
                raise OutlivesSession()
            began = time.monotonic()
            value = call()
            self.longest = max(self.longest, time.monotonic() - began)
            return value
        return once


def _outlives(where, timeout) -> RebirthError:
    return RebirthError(f"{where}: the timing rounds would outlive --session-timeout "
                        f"({timeout:g}s), after which the device ends the session: give "
                        "fewer --rounds or a longer --session-timeout")


def bench_on_device(mods, x, tracker: str, key: str, target_name=None, rounds=5, number=1,
                    count_instructions=True, session_timeout=3600.0) -> dict:
    """Like measure.bench_variants, on a tracker device. ``mods``: {name: IRModule}, the first
    is the baseline. Adds ``device``, ``device_vs_host_max_abs_err`` and, on the emulated
    device, per-variant ``instructions`` and ``instructions_ratio``. The device ends a
    session older than ``session_timeout`` seconds (a hung device cannot hold the run)."""
    import tvm
    from tvm import relax

    from ..compile.build import Runner, compile_module, export_library
    from ..report.measure import count_gflops, interleaved_rounds
    from .rpc import parse_tracker, request_session, require_key
    from ..compile.targets import resolve_target

    host, port = parse_tracker(tracker)
    require_key(host, port, key)
    target_name = target_name or default_target_for(key)
    target = resolve_target(target_name)
    emulated = is_emulated(host, port, key)
    where = f"device '{key}' on tracker {host}:{port}"
    workdir = Path(tempfile.mkdtemp(prefix="tvm-rebirth-remote-"))
    try:
        libs, compiled, host_out = {}, {}, {}
        for name, mod in mods.items():
            logger.info(f"[bench] building {name} for {target_name}")
            compiled[name] = compile_module(mod, target)
            libs[name] = workdir / f"{name.replace(' ', '_')}.so"
            export_library(compiled[name].executable, str(libs[name]), target)
            host_out[name] = Runner(mod)(x)[0]
        clock = SessionClock(session_timeout)
        try:
            session = request_session(host, port, key, timeout=session_timeout)
            device = session.cpu()
            vms, device_out = {}, {}
            for name, lib in libs.items():
                logger.info(f"[bench] uploading {name} to {where}")
                session.upload(str(lib), lib.name)
                vms[name] = relax.VirtualMachine(session.load_module(lib.name), device)
                arg = tvm.runtime.tensor(x, device)
                device_out[name] = vms[name]["main"](arg).numpy()
            arg = tvm.runtime.tensor(x, device)

            def timer(vm):
                evaluator = vm.time_evaluator("main", device, number=number, repeat=1)
                return clock.guarded(lambda: evaluator(arg).mean * 1000)

            samples = interleaved_rounds({n: timer(vm) for n, vm in vms.items()}, rounds,
                                         "bench on " + key)
        except RebirthError:
            raise
        except OutlivesSession:
            raise _outlives(where, session_timeout) from None
        except Exception as exc:  # noqa: BLE001 -- the device died or the session broke
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            # the device ends a session at its timeout wherever the protocol is; the client
            # then sees SessionTimeout, or (mid-message) a garbled event: judge by the clock
            if "SessionTimeout" in str(exc) or clock.left() <= 0:
                first = (f"the session outlived --session-timeout "
                         f"({session_timeout:g}s) and the device ended it")
            elif "kShutdown" in first or "connection" in first.lower():
                first = ("the session ended abruptly: the device's process crashed (an "
                         "instruction the core lacks? check --target) or the device went away")
            raise RebirthError(f"{where} failed during the run: {first}")
        base = next(iter(mods))
        result = {}
        for name, mod in mods.items():
            result[name] = {
                "latency_ms": round(statistics.median(samples[name]), 3),
                "latency_ms_rounds": [round(v, 3) for v in samples[name]],
                "memory_mb": round(compiled[name].planned_bytes / 2 ** 20, 3),
                "gflops": round(count_gflops(mod), 4),
                "tuned_functions": compiled[name].tuned,
                "tuned_by_source": compiled[name].tuned_by_source,
                "functions": compiled[name].functions,
                "max_abs_err": float(np.abs(device_out[name] - device_out[base]).max())}
        if emulated and count_instructions:
            for name, lib in libs.items():
                logger.info(f"[bench] counting guest instructions of {name} (qemu cortex-a72, 1 thread)")
                result[name]["instructions"] = count_instructions_per_inference(lib, x, workdir)
        for name in list(mods)[1:]:
            o, r = result[base], result[name]
            r["speedup"] = round(o["latency_ms"] / r["latency_ms"], 3)
            r["memory_ratio"] = round(o["memory_mb"] / r["memory_mb"], 3)
            r["gflops_ratio"] = round(o["gflops"] / r["gflops"], 3)
            if "instructions" in r:
                r["instructions_ratio"] = round(o["instructions"] / r["instructions"], 3)
        result["device"] = (f"aarch64 cortex-a72 (emulated: qemu-user, {key} on {host}:{port})"
                            if emulated else f"{key} via tracker {host}:{port} ({target_name})")
        result["latency_is_emulated"] = emulated
        result["target"] = target_name
        result["device_vs_host_max_abs_err"] = float(max(
            np.abs(device_out[n] - host_out[n]).max() for n in mods))
        result["max_abs_output"] = float(np.abs(host_out[base]).max())
        result["rounds"], result["number"] = rounds, number
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def bench_on_emulated_device(mods, x, state_dir) -> dict:
    """bench_on_device (one round) on a tracker + emulated Cortex-A72 started for this call,
    their state and logs in ``state_dir`` (the user's own devices, if any, are untouched);
    {"skipped": reason} if the device cannot start (no qemu/mmdebstrap, not root, offline)."""
    from . import device

    with device.private_state(state_dir):
        try:
            state = device.start(emulated=True)
        except RebirthError as err:
            logger.info(f"[device] the emulated Cortex-A72 cannot start; skipping it: {err}")
            return {"skipped": str(err)}
        try:
            tracker = f"127.0.0.1:{state['port']}"
            return bench_on_device(mods, x, tracker, device.EMULATED_KEY, rounds=1, number=1)
        finally:
            device.stop()


# --------------------------------------------------------------------------- instructions

# the start of every script run in the emulated device's Python: ``vm`` is the Relax VM of
# the library argv[1]; mark(0x5EB1) ... mark(0x5EB2) delimit what the counting plugin counts
# (harmless failing lseek calls it recognises)
GUEST_PRELUDE = """import os
import sys
import numpy as np
import tvm
from tvm.runtime import vm as runtime_vm


def mark(code):
    try:
        os.lseek(-1, code, 0)
    except OSError:
        pass


vm = runtime_vm.VirtualMachine(tvm.runtime.load_module(sys.argv[1]), tvm.cpu())
"""

# argv: library, input .npy, inferences to count
_GUEST_RUN = GUEST_PRELUDE + """main = vm["main"]
x = tvm.runtime.tensor(np.load(sys.argv[2]), tvm.cpu())
main(x)  # the first run allocates; count the steady state
mark(0x5EB1)
for _ in range(int(sys.argv[3])):
    main(x)
mark(0x5EB2)
"""


def plugin_path() -> Path:
    """The instruction-counting QEMU plugin, compiled on first use into the cache."""
    from .device import devices_dir

    source = Path(__file__).parent / "qemu_plugin" / "insn_count.c"
    out = devices_dir() / "libinsn_count.so"
    if out.exists() and out.stat().st_mtime >= source.stat().st_mtime:
        return out
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RebirthError("counting instructions needs a C compiler (apt-get install gcc)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}.so")
    proc = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(source)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RebirthError(f"compiling {source} failed: {proc.stderr.strip()[-300:]}")
    os.replace(tmp, out)
    return out


def count_guest_run(argv: list, counter: Path, runs: int, what: str, env=None, plugin=None,
                    timeout: float = 3600) -> int:
    """Run the emulated device's Python with ``argv`` under qemu-user as a Cortex-A72 (one
    thread) with the counting plugin writing to ``counter``; the guest marks ``runs``
    inferences. Returns guest instructions per inference; RebirthError naming ``what``."""
    from .device import GUEST_PYTHON, sysroot_dir

    root = sysroot_dir() / "root"
    qemu = shutil.which("qemu-aarch64")
    if qemu is None or not root.exists():
        raise RebirthError("counting instructions needs qemu-aarch64 (apt-get install "
                           "qemu-user) and the emulated device's sysroot "
                           "(`tvm-rebirth device start`)")
    env = dict(os.environ, **(env or {}), QEMU_CPU="cortex-a72", TVM_NUM_THREADS="1",
               TVM_USE_RUNTIME_LIB="1")
    proc = subprocess.run([qemu, "-L", str(root), "-plugin",
                           f"{plugin or plugin_path()},outfile={counter}",
                           str(root / GUEST_PYTHON), *map(str, argv)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0 or not counter.exists():
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        raise RebirthError(f"{what} under qemu (cortex-a72) failed: {last[:300]}")
    return int(round(int(counter.read_text().strip()) / runs))


def count_instructions_per_inference(lib: Path, x, workdir: Path, runs: int = 2) -> int:
    """Guest aarch64 instructions of one inference of ``lib`` under qemu as a Cortex-A72 with
    one TVM thread: ``runs`` steady-state inferences counted by the plugin, divided by runs."""
    script, data = workdir / "guest_run.py", workdir / "input.npy"
    script.write_text(_GUEST_RUN)
    np.save(data, x)
    return count_guest_run([script, lib, data, runs], workdir / f"count-{lib.stem}.txt", runs,
                           f"instruction count of {lib.name}")


# argv: library, inputs .npz, function names: every function once (allocations), then each
# once more between the markers, so each writes one segment, in the order of argv[3]
_GUEST_FUNCTIONS = GUEST_PRELUDE + """data = np.load(sys.argv[2])
names = sys.argv[3].split(",")
args = {n: [tvm.runtime.tensor(data[f"{n}/{i}"], tvm.cpu())
            for i in range(sum(k.startswith(n + "/") for k in data.files))] for n in names}
for name in names:
    vm[name](*args[name])
for name in names:
    mark(0x5EB1)
    vm[name](*args[name])
    mark(0x5EB2)
"""


def count_instructions_per_function(lib: Path, calls: dict, workdir: Path) -> dict:
    """{function: guest aarch64 instructions of one call} of the Relax functions of ``lib``
    ({function name: [input arrays]}), one qemu run as a Cortex-A72 with one TVM thread,
    each call counted in its steady state (after one call that allocates)."""
    script, data = workdir / "guest_functions.py", workdir / "inputs.npz"
    script.write_text(_GUEST_FUNCTIONS)
    np.savez(data, **{f"{name}/{i}": x for name, xs in calls.items() for i, x in enumerate(xs)})
    segments = workdir / f"segments-{lib.stem}.txt"
    count_guest_run([script, lib, data, ",".join(calls)], workdir / f"count-{lib.stem}.txt", 1,
                    f"instruction counts of {lib.name}",
                    plugin=f"{plugin_path()},segments={segments}")
    counts = [int(v) for v in segments.read_text().split()]
    if len(counts) != len(calls):
        raise RebirthError(f"instruction counts of {lib.name}: {len(counts)} segments for "
                           f"{len(calls)} functions")
    return dict(zip(calls, counts))


def time_functions_on_device(lib: Path, calls: dict, tracker: str, key: str, rounds: int = 5,
                             session_timeout: float = 3600.0) -> dict:
    """{function: median ms of one call} of the Relax functions of ``lib`` on a tracker
    device, every function once per round (interleaved)."""
    import tvm
    from tvm import relax

    from ..report.measure import interleaved_rounds
    from .rpc import parse_tracker, request_session, require_key

    host, port = parse_tracker(tracker)
    require_key(host, port, key)
    clock = SessionClock(session_timeout)
    try:
        session = request_session(host, port, key, timeout=session_timeout)
        device = session.cpu()
        session.upload(str(lib), lib.name)
        vm = relax.VirtualMachine(session.load_module(lib.name), device)

        def timer(name):
            args = [tvm.runtime.tensor(x, device) for x in calls[name]]
            evaluator = vm.time_evaluator(name, device, number=3, repeat=1)
            return clock.guarded(lambda: evaluator(*args).mean * 1000)

        samples = interleaved_rounds({n: timer(n) for n in calls}, rounds, f"cost on {key}")
    except RebirthError:
        raise
    except OutlivesSession:
        raise _outlives(f"device '{key}' on tracker {host}:{port}", session_timeout) from None
    except Exception as exc:  # noqa: BLE001 -- the device died or the session broke
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RebirthError(f"device '{key}' on tracker {host}:{port} failed while measuring "
                           f"costs: {first}") from None
    return {n: statistics.median(v) for n, v in samples.items()}
