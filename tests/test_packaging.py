"""Packaging (issue 19 item 6): the wheel carries the committed tuning_logs, every runtime
data file and passes/ as tvm_rebirth.passes, and an install from it finds its logs without
the source tree."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", "build", "tests", "benchmarks", "__pycache__", ".pytest_cache"}


def _source_files(folder: str) -> list:
    """Files of ``folder`` the repository tracks (every file outside caches without git)."""
    try:
        out = subprocess.run(["git", "ls-files", folder], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
        if out:
            return out
    except (OSError, subprocess.CalledProcessError):
        pass
    return [str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel pip builds from a copy of the source tree (a stale build/ of the checkout
    cannot leak files into it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=lambda d, names: [
        n for n in names if n in SKIP or n.endswith(".egg-info")])
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, text=True, timeout=300)
    (path,) = (tmp / "dist").glob("tvm_rebirth-*.whl")
    return path


def test_the_wheel_holds_tuning_logs_and_every_runtime_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    logs = [f for f in _source_files("tuning_logs") if not f.endswith(".gitkeep")]
    assert any(f.endswith("database_tuning_record.json") for f in logs)
    want = {"tvm_rebirth/" + f for f in logs}
    for f in _source_files("tvm_rebirth"):  # modules and data files (zoo_data, qemu_plugin)
        if "/__pycache__/" not in f and not f.endswith(".pyc"):
            want.add(f)
    for f in _source_files("passes"):
        if f.endswith(".py"):
            want.add("tvm_rebirth/" + f)
    assert "tvm_rebirth/frontend/zoo_data/fmnist_inception.onnx" in want
    assert "tvm_rebirth/deploy/qemu_plugin/insn_count.c" in want
    missing = sorted(want - names)
    assert not missing, f"not in {wheel.name}: {missing}"


def test_an_install_from_the_wheel_imports_passes_and_finds_its_logs(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = dict(os.environ, PYTHONPATH=str(site), TVM_REBIRTH_CACHE=str(tmp_path / "cache"))
    env.pop("TVM_REBIRTH_TUNING_LOGS", None)
    code = """if True:
        import tvm_rebirth, tvm_rebirth.passes as passes
        from tvm_rebirth.passes import StreamlineSlimming, BranchSlimming
        from tvm_rebirth.compile import database
        print(tvm_rebirth.__file__); print(passes.__file__)
        print(database.packaged_tuning_logs())
        print(database.default_log_dir("googlenet", __import__("tvm").target.Target("llvm"), False))
        print(*database.tuning_logs_roots(), sep=",")
    """
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout.splitlines()
    package, passes, logs, log_dir, roots = out[-5:]
    assert package == str(site / "tvm_rebirth" / "__init__.py")
    assert passes == str(site / "tvm_rebirth" / "passes" / "__init__.py")
    assert logs == str(site / "tvm_rebirth" / "tuning_logs")
    assert list(Path(logs).glob("*/*/database_tuning_record.json"))
    # tune writes to the user cache, never into the installed package; builds read both
    assert log_dir == str(tmp_path / "cache" / "tuning_logs" / "llvm" / "googlenet")
    assert roots.split(",") == [str(tmp_path / "cache" / "tuning_logs"), logs]
