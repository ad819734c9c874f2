"""The committed tuning_logs in one table: per target and model, trials, wall time, and the
whole-model latency with the generic schedule vs with the database (measured by `tune` at
the end of its run, interleaved rounds on the tuning machine).

    python benchmarks/tuning_summary.py

writes benchmarks/results/tuning_logs.{json,md}
"""

import json
import sys
from pathlib import Path

from _common import table, write

ROOT = Path(__file__).resolve().parents[1] / "tuning_logs"


def main():
    entries = []
    for path in sorted(ROOT.glob("*/*/tuning.json")):
        data = json.loads(path.read_text())
        tasks = data.get("tasks", {})
        entries.append({
            "target": path.parent.parent.name, "database": path.parent.name,
            "trials": data["trials"], "failed_trials": data.get("failed_trials", 0),
            "wall_seconds": data["wall_seconds"], "tasks": len(tasks),
            "searched_tasks": len(data.get("searched_tasks", [])),
            "measured_on": data.get("measured_on", "this host"),
            "model_ms": data.get("model_ms")})
    rows = []
    for e in entries:
        m = e["model_ms"] or {}
        rows.append([e["target"], e["database"], e["trials"], f"{e['wall_seconds'] / 60:.1f}",
                     f"{e['searched_tasks']}/{e['tasks']}", m.get("default_schedule", "-"),
                     m.get("tuned", "-"), f"{m['speedup']}x" if m else "-"])
    md = ("# Committed tuning_logs\n\n"
          + table(rows, ["target", "database", "trials", "wall (min)", "searched tasks",
                         "generic schedule (ms)", "tuned (ms)", "speedup"])
          + "\n\nLatencies: the whole model on the tuning machine right after tuning, medians "
            "of 7 interleaved rounds; `tuned` applies that folder's database alone (builds "
            "apply the union of a target's folders). Each tuning.json has per-task default "
            "and best times.")
    write("tuning_logs", {"databases": entries}, md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
