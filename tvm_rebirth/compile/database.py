"""The tuning_logs databases every build applies (MetaSchedule JSON, one folder per target
and model), found by target key and cached per process.

Layout: ``tuning_logs/<target key>/<model>[-rebirth]/`` holds MetaSchedule's JSON database
(``database_workload.json``, ``database_tuning_record.json``, appended record by record) and
``tuning.json`` (trials, wall time, per-task default vs best time, whole-model before/after).
The target key is the preset's core (``cortex-a72``) or the host CPU (``znver3``). A build
applies the union of every database under its target key: records match by PrimFunc
structure, so a conv tuned for GoogLeNet also serves the rebirth model that shares it.
"""

from __future__ import annotations

import os
from pathlib import Path

DB_FILES = ("database_workload.json", "database_tuning_record.json")


def tuning_logs_root() -> Path:
    """The committed tuning_logs folder of this checkout (or $TVM_REBIRTH_TUNING_LOGS)."""
    env = os.environ.get("TVM_REBIRTH_TUNING_LOGS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "tuning_logs"


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
