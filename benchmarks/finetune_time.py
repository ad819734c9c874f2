"""How long the default fine-tune takes: `tvm-rebirth finetune MODEL --plan P` on the model's
default plan (the sites measured to pay on this CPU, written first and not timed) with the
default calibration images, each run in its own process, timed from the command's start to
its exit (imports, capture builds, fits, block reconstruction, distillation when afforded,
the weights written).

    python benchmarks/finetune_time.py [--models googlenet] [--runs 2]   # ~5 min a run

writes benchmarks/results/finetune_time.{json,md}
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")

from _common import machine, write  # noqa: E402
from run_all import finetune_time_table, finetune_time_text  # noqa: E402

# the budget for GoogLeNet's default fine-tune
BUDGET_SECONDS = 300


def cli(*args, json_out=False) -> tuple:
    """(payload or None, wall seconds) of one `tvm-rebirth` command in its own process; a
    failure stops the benchmark with the command's last error line."""
    command = [sys.executable, "-m", "tvm_rebirth.cli", *args] + (["--json"] if json_out else [])
    start = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.time() - start
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        sys.exit(f"finetune_time: `tvm-rebirth {' '.join(args)}` failed: {lines[-1]}")
    return (json.loads(done.stdout) if json_out else None), seconds


def measure(model: str, runs: int, workdir: Path) -> dict:
    plan = workdir / f"{model}.plan.yaml"
    cli("plan", model, "-o", str(plan))
    walls, payload = [], None
    for run in range(runs):
        weights = workdir / f"{model}.{run}.npz"
        payload, wall = cli("finetune", model, "--plan", str(plan), "-o", str(weights),
                            json_out=True)
        walls.append(round(wall, 1))
        print(f"{model}: run {run + 1}/{runs}: {wall:.1f} s", file=sys.stderr, flush=True)
    distilled = payload.get("distillation") or {}
    return {"model": model, "sites": len(payload["sites"]),
            "calibration": payload["calibration"],
            "mirror_images": payload["mirror_images"],
            "distilled": bool(distilled) and not distilled.get("skipped"),
            "walls": walls, "median": statistics.median(walls),
            "reported": payload["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="googlenet")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs {args.runs}: at least one run")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(m, args.runs, Path(tmp)) for m in args.models.split(",")]
    data = {"rows": rows, "budget_seconds": BUDGET_SECONDS, "machine": machine()}
    md = "# Default fine-tune: wall time of `tvm-rebirth finetune`\n\n" + \
        finetune_time_table(data) + "\n\n" + finetune_time_text(data)
    write("finetune_time", data, md)
    print(md)


if __name__ == "__main__":
    main()
