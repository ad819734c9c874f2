"""Shared helpers for the benchmark scripts: result files and markdown tables."""

import json
import os
import shlex
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(),
            "threads": int(os.environ.get("TVM_NUM_THREADS", "2")),
            "python": platform.python_version()}


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return ""


def ort_timer(model, x, threads: int, number: int):
    """A callable giving the mean ms of ``number`` ONNX Runtime runs of the model's ONNX
    file on ``x`` (CPU provider, ``threads`` intra-op threads): the peer on the original."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(model.path), opts, providers=["CPUExecutionProvider"])

    def timer():
        start = time.perf_counter()
        for _ in range(number):
            session.run(None, {model.input_name: x})
        return (time.perf_counter() - start) / number * 1000
    return timer


def race(model, runners, x, threads: int, number: int, rounds: int, label: str,
         ort_name="onnxruntime") -> dict:
    """{name: [ms per round]}: ONNX Runtime on the original model (as ``ort_name``) and every
    TVM runner of ``runners``, each warmed up once, then timed in interleaved rounds."""
    from tvm_rebirth.report.measure import interleaved_rounds, tvm_timer

    timers = {ort_name: ort_timer(model, x, threads, number)}
    timers.update({name: tvm_timer(runner, x, number) for name, runner in runners.items()})
    for timer in timers.values():  # warm up
        timer()
    return interleaved_rounds(timers, rounds, label)


def table(rows, header) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write(name: str, payload: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = dict(payload, machine=machine(), revision=git_revision(),
                   command="python " + shlex.join(
                       [os.path.relpath(os.path.abspath(sys.argv[0]), RESULTS.parents[1])]
                       + sys.argv[1:]))
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown + f"\n\nReproduce: `{payload['command']}`\n")
    print(f"wrote {RESULTS / name}.json and .md", file=sys.stderr)


def count_emulated(mod, x, workdir, name: str, target_name: str = "cortex-a72") -> tuple:
    """(guest instructions per inference, planned activation bytes) of ``mod`` cross-built
    untuned for ``target_name`` and run on the emulated core (qemu-user, 1 thread)."""
    from tvm_rebirth.compile.build import compile_module, export_library
    from tvm_rebirth.compile.targets import resolve_target
    from tvm_rebirth.deploy.remote import count_instructions_per_inference

    target = resolve_target(target_name)
    compiled = compile_module(mod, target, tuned=False)
    lib = Path(workdir) / f"{name}.so"
    export_library(compiled.executable, str(lib), target)
    return count_instructions_per_inference(lib, x, Path(workdir), runs=1), \
        compiled.planned_bytes
