"""The tuning_logs databases every build applies (MetaSchedule JSON, one folder per target
and model), found by target key and cached per process.

Roots: the packaged logs (``tvm_rebirth/tuning_logs`` installed as package data, the
checkout's ``tuning_logs/`` in a source tree) and the user cache ``tune`` writes to
(``~/.cache/tvm-rebirth/tuning_logs``, see ``user_tuning_logs``); builds read both, the user
cache first. $TVM_REBIRTH_TUNING_LOGS replaces both (tests, or tuning into the checkout).

Layout: ``<root>/<target key>/<model>[-rebirth]/`` holds MetaSchedule's JSON database
(``database_workload.json``, ``database_tuning_record.json``, appended record by record) and
``tuning.json`` (trials, wall time, per-task default vs best time, whole-model before/after).
The target key is the preset's core (``cortex-a72``) or the host CPU (``znver3``). A build
applies the union of every database under its target key: records match by PrimFunc
structure, so a conv tuned for GoogLeNet also serves the rebirth model that shares it. A
target with no database of its own applies those of *compatible* keys instead: CPUs of the
same architecture with the same vector unit (any AVX-512 x86 core for another, any NEON
Cortex-A for another; ``compatible_keys``). Which source each tuned function's record came
from is reported (``tuned_by_source``): a record made on another CPU is a schedule found
there, not a measurement here.

Records are appended line by line, so a write cut short (a full disk, a killed process)
leaves a torn last line; TVM's reader fails on it (or on a blank line) for every later load.
Every database is read through ``clean_lines`` first: torn, blank or malformed lines are
skipped with a warning naming the file and line, records of a skipped workload go with it.

MetaSchedule replays every record's schedule when it loads a database; builds load a copy
pruned to each workload's best record instead, kept in the user cache after the first full
load (``open_json_database``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DB_FILES = ("database_workload.json", "database_tuning_record.json")


def packaged_tuning_logs() -> Path:
    """The tuning_logs shipped with the package: ``tvm_rebirth/tuning_logs`` of an install
    (package data), or the ``tuning_logs/`` folder of a source checkout."""
    installed = Path(__file__).resolve().parents[1] / "tuning_logs"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "tuning_logs"


def user_tuning_logs() -> Path:
    """Where ``tune`` writes by default: ``<cache>/tuning_logs`` of the user cache directory
    ($TVM_REBIRTH_CACHE, else $XDG_CACHE_HOME/tvm-rebirth, else ~/.cache/tvm-rebirth)."""
    from ..frontend.zoo import cache_dir

    return cache_dir() / "tuning_logs"


def tuning_logs_root() -> Path:
    """The committed tuning_logs (``packaged_tuning_logs``), or $TVM_REBIRTH_TUNING_LOGS."""
    env = os.environ.get("TVM_REBIRTH_TUNING_LOGS")
    return Path(env) if env else packaged_tuning_logs()


def tuning_logs_roots() -> list:
    """The roots builds read, in order of preference: the user cache, then the packaged logs;
    $TVM_REBIRTH_TUNING_LOGS alone when it is set (it also receives ``tune``'s output)."""
    env = os.environ.get("TVM_REBIRTH_TUNING_LOGS")
    return [Path(env)] if env else [user_tuning_logs(), packaged_tuning_logs()]


def target_key(target) -> str:
    return str(target.attrs.get("mcpu", "") or target.kind.name)


def default_log_dir(model_name: str, target, rebirth: bool) -> Path:
    """``tune``'s default folder: ``<user cache>/tuning_logs/<target key>/<model>[-rebirth]``
    (never inside the installed package), or under $TVM_REBIRTH_TUNING_LOGS when set."""
    env = os.environ.get("TVM_REBIRTH_TUNING_LOGS")
    root = Path(env) if env else user_tuning_logs()
    return root / target_key(target) / (model_name + ("-rebirth" if rebirth else ""))


def _valid_workload(value) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, str) and v for v in value))


def _valid_record(value, n_workloads: int) -> bool:
    return (isinstance(value, list) and len(value) == 2 and type(value[0]) is int
            and 0 <= value[0] < n_workloads and isinstance(value[1], list)
            and len(value[1]) >= 2 and isinstance(value[1][0], list))


def _read_lines(path: Path) -> list:
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    return lines[:-1] if lines[-1] == b"" else lines  # the newline ending the last line


def clean_lines(folder) -> tuple:
    """(workload lines, record lines, number of lines skipped) of the database in ``folder``,
    every line valid JSON of the right shape, record workload indices renumbered to match
    the kept workloads. Skipped lines are logged with their file and line number."""
    folder = Path(folder)
    paths = [folder / name for name in DB_FILES]
    skipped = 0

    def parse(path, raw, lineno, valid):
        nonlocal skipped
        if not raw.strip():  # TVM's reader crashes on a blank line: dropped, no news
            skipped += 1
            return None
        try:
            value = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            value = None
        if value is None or not valid(value):
            skipped += 1
            logger.warning(f"[tuning_logs] {path}: line {lineno} is torn or malformed "
                           f"({len(raw)} bytes); skipped")
            return None
        return value

    renumber, workloads, index = {}, [], 0  # TVM's workload index -> the kept one
    for lineno, raw in enumerate(_read_lines(paths[0]), 1):
        value = parse(paths[0], raw, lineno, _valid_workload)
        if value is not None:
            renumber[index] = len(workloads)
            workloads.append(raw.decode("utf-8"))
        if raw.strip():
            index += 1
    records = []
    for lineno, raw in enumerate(_read_lines(paths[1]), 1):
        value = parse(paths[1], raw, lineno, lambda v: _valid_record(v, index))
        if value is None:
            continue
        if value[0] not in renumber:
            skipped += 1
            logger.warning(f"[tuning_logs] {paths[1]}: line {lineno} belongs to a skipped "
                           "workload; skipped")
            continue
        if renumber[value[0]] == value[0]:
            records.append(raw.decode("utf-8"))
        else:
            value[0] = renumber[value[0]]
            records.append(json.dumps(value, separators=(",", ":")))
    return workloads, records, skipped


def _write_lines(path: Path, lines: list) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def repair_folder(folder) -> int:
    """Rewrite the database in ``folder`` (a tune's own output) without torn or malformed
    lines, so appending continues on a clean line; returns how many lines were dropped."""
    folder = Path(folder)
    workloads, records, skipped = clean_lines(folder)
    for path, lines in zip((folder / n for n in DB_FILES), (workloads, records)):
        if path.exists() and (skipped or not path.read_bytes().endswith(b"\n")
                              and path.stat().st_size):
            _write_lines(path, lines)
    if skipped:
        logger.warning(f"[tuning_logs] {folder}: dropped {skipped} torn or malformed line(s)")
    return skipped


def pruned_records_dir() -> Path:
    """Where builds keep each database pruned to its best records: ``<user cache>/
    pruned_tuning_records/<digest of the cleaned lines>/`` (see ``open_json_database``)."""
    from ..frontend.zoo import cache_dir

    return cache_dir() / "pruned_tuning_records"


_PRUNED_KEPT = 32  # pruned copies kept in the cache, the most recently used


def _lines_digest(workloads: list, records: list) -> str:
    digest = hashlib.sha256()
    for lines in (workloads, records):
        digest.update("\n".join(lines).encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def _json_database(folder: Path, allow_missing=False):
    from tvm.s_tir import meta_schedule as ms

    return ms.database.JSONDatabase(str(folder / DB_FILES[0]), str(folder / DB_FILES[1]),
                                    allow_missing=allow_missing)


def _full_database(folder: Path, workloads: list, records: list, skipped: int):
    if not skipped:
        return _json_database(folder)
    copy = Path(tempfile.mkdtemp(prefix="tvm-rebirth-db-"))
    try:
        for name, lines in zip(DB_FILES, (workloads, records)):
            _write_lines(copy / name, lines)
        return _json_database(copy)  # the records are read at construction
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in DB_FILES)


def _store_pruned(full, target: Path) -> None:
    """``full``'s best valid record per workload (MetaSchedule's ``dump_pruned``: what a
    query returns) written to ``target`` atomically, then the oldest copies evicted."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not _complete(target):  # an incomplete copy (a file deleted by hand) is replaced
        shutil.rmtree(target, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        full.dump_pruned(_json_database(staging, allow_missing=True))
        os.replace(staging, target)
    except OSError:  # another process stored the same digest first
        shutil.rmtree(staging, ignore_errors=True)
    copies = sorted((p for p in target.parent.iterdir() if not p.name.startswith(".")),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in copies[_PRUNED_KEPT:]:
        shutil.rmtree(old, ignore_errors=True)


def open_json_database(folder):
    """A MetaSchedule JSONDatabase of ``folder`` read through ``clean_lines`` without changing
    the files (committed databases are inputs).

    MetaSchedule replays every record's trace when it loads a database (the committed
    GoogLeNet logs: ~10 s per process), and a build only ever asks for each workload's best
    record. So the first load stores the database pruned to those records in the user cache
    (``pruned_records_dir``, keyed by the content), and later loads read that copy (~0.3 s);
    a query answers the same from both. Where the cache cannot be written, the full
    database is used."""
    folder = Path(folder)
    workloads, records, skipped = clean_lines(folder)
    pruned = pruned_records_dir() / _lines_digest(workloads, records)
    if _complete(pruned):
        with contextlib.suppress(OSError):  # most recently used: kept by the eviction
            os.utime(pruned)
        return _json_database(pruned)
    logger.info(f"[tuning_logs] loading {folder.parent.name}/{folder.name} ({len(records)} "
                f"records) in full, once: later builds read its best records from "
                f"{pruned_records_dir()}")
    full = _full_database(folder, workloads, records, skipped)
    try:
        _store_pruned(full, pruned)
    except OSError as error:
        logger.info(f"[tuning_logs] {folder}: pruned copy not cached ({error})")
    return full


_LOADED: dict = {}  # (root, database_signature) -> [(source label, database)]


def _union(dbs):
    from tvm.s_tir import meta_schedule as ms

    return dbs[0] if len(dbs) == 1 else ms.database.UnionDatabase(*dbs)


def compatible_keys(target, keys) -> list:
    """The target keys of ``keys`` (tuning_logs folder names) whose CPU our kernels see as
    ``target``'s: LLVM knows the key as a CPU of the target's triple, and its vector unit
    (``layouts.vector_unit``: lanes, registers, broadcast and FMA forms) is the target's. A
    record of such a CPU is a valid schedule here (it may have been tuned for other caches
    or latencies: ``tuned_by_source`` says where each came from)."""
    import tvm
    from tvm.target import codegen

    from .layouts import vector_unit

    own = vector_unit(target)
    if own is None:
        return []
    spec = {"kind": "llvm",
            "mtriple": str(target.attrs.get("mtriple", "") or codegen.llvm_get_system_triple())}
    known = set(codegen.llvm_get_cpu_archlist(tvm.target.Target(spec)))
    return [key for key in keys if key in known and key != target_key(target)
            and vector_unit(tvm.target.Target({**spec, "mcpu": key})) == own]


def _model_dirs(folder: Path) -> list:
    return sorted(p.parent for p in folder.glob(f"*/{DB_FILES[0]}")) if folder.is_dir() else []


def database_sources(target, root=None) -> list:
    """[(label, model folders)] of the databases a build for ``target`` applies, in order of
    preference: per tuning_logs root (``tuning_logs_roots()``, or ``root`` alone) the
    target's own key; when no root has one, every compatible key's (``compatible_keys``).
    Labels name the key, and the root when it is the user cache."""
    roots = [Path(root)] if root else tuning_logs_roots()
    user = None if root else user_tuning_logs()

    def label(r, key):
        return f"{key} (user cache)" if user is not None and r == user else key

    own = [(label(r, target_key(target)), dirs) for r in roots
           if (dirs := _model_dirs(r / target_key(target)))]
    if own:
        return own
    sources = []
    for r in roots:
        keys = sorted(p.name for p in r.iterdir() if p.is_dir()) if r.is_dir() else []
        for key in compatible_keys(target, keys):
            if dirs := _model_dirs(r / key):
                sources.append((label(r, key), dirs))
    return sources


def database_signature(target, root=None) -> tuple:
    """(path, size, mtime) of every database file a build for ``target`` reads: what changes
    when records are added (empty when there are none)."""
    files = [d / name for _, dirs in database_sources(target, root) for d in dirs
             for name in DB_FILES]
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists())


def _source_databases(target, root=None) -> list:
    """[(label, database)] of ``database_sources``, loaded once per process until a file
    under them changes (parsing the committed JSON takes seconds; fine-tuning compiles a
    dozen modules)."""
    sources = database_sources(target, root)
    if not sources:
        return []
    key = (str(root), database_signature(target, root))
    if key not in _LOADED:
        _LOADED.clear()  # one target's worth at a time
        _LOADED[key] = [(label, _union([open_json_database(d) for d in dirs]))
                        for label, dirs in sources]
    return _LOADED[key]


def load_database(target, root=None):
    """The MetaSchedule database a build for ``target`` applies (``database_sources``), or
    None. Within a source the union of its model folders (the best record wins); across
    sources the first holding a record wins (the user's own tuning before the packaged
    logs; compatible keys, used only when the target has no database of its own, in name
    order)."""
    from tvm.s_tir import meta_schedule as ms

    databases = [db for _, db in _source_databases(target, root)]
    if not databases:
        return None
    return databases[0] if len(databases) == 1 else ms.database.OrderedUnionDatabase(*databases)


def tuned_by_source(fused_mod, target, root=None) -> dict:
    """``count_records`` for the databases ``load_database`` applies."""
    return count_records(fused_mod, target, _source_databases(target, root))


def count_records(fused_mod, target, sources) -> dict:
    """{label: how many of ``fused_mod``'s PrimFuncs take their record from that database}
    for ``sources`` ([(label, database)], in order of preference: each function counted
    once, at the first holding a record for it; labels with no function left out)."""
    import tvm
    from tvm import tirx

    counts = {}
    for _, func in fused_mod.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        task = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        for label, db in sources:
            if db.query_tuning_record(task, target, "main") is not None:
                counts[label] = counts.get(label, 0) + 1
                break
    return counts
