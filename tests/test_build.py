"""tvm-rebirth build: host and cross (aarch64) shared libraries that load and run."""

import json
import shutil

import numpy as np
import pytest
import tvm
from tvm import relax

from tvm_rebirth.compile.build import Runner
from tvm_rebirth.frontend.loader import load_model

from onnx_models import chain_model
from test_cli import run
from test_flow_cli import assert_error


def test_host_library_runs_like_the_in_process_build(tmp_path):
    model_path = chain_model(tmp_path / "net.onnx", ["relu", "lrn", "max_pool2d"])
    out = tmp_path / "net.so"
    code, stdout, err = run("build", model_path, "-o", str(out), "--json")
    assert code == 0, err
    data = json.loads(stdout)
    assert data["path"] == str(out) and data["target"] == "host" and data["variant"] == "original"
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out)), tvm.cpu())
    x = np.random.default_rng(0).standard_normal((1, 4, 32, 32)).astype("float32")
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, Runner(load_model(model_path).mod)(x)[0], rtol=1e-5,
                               atol=1e-5)


def test_rebirth_library_with_a_plan(tmp_path):
    model_path = chain_model(tmp_path / "net.onnx", ["batch_norm", "avg_pool2d"])
    assert run("plan", model_path, "--select", "all", "-o", str(tmp_path / "p.yaml"))[0] == 0
    code, stdout, err = run("build", model_path, "--plan", str(tmp_path / "p.yaml"), "-o",
                            str(tmp_path / "slim.so"), "--json")
    assert code == 0, err
    assert json.loads(stdout)["variant"] == "rebirth"
    assert (tmp_path / "slim.so").stat().st_size > 0
    # the site is exact (BN and an unpadded avg-pool fold in closed form): the library
    # computes what the original model does, with one conv less work per pool window
    lib = tvm.runtime.load_module(str(tmp_path / "slim.so"))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    x = np.random.default_rng(1).standard_normal((1, 4, 32, 32)).astype("float32")
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    want = Runner(load_model(model_path).mod)(x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="needs g++-aarch64-linux-gnu (installed by .ci/run)")
def test_cross_build_for_cortex_a72_is_an_aarch64_library(tmp_path):
    model_path = chain_model(tmp_path / "net.onnx", ["relu", "max_pool2d"])
    out = tmp_path / "net-a72.so"
    code, stdout, err = run("build", model_path, "--target", "cortex-a72", "-o", str(out))
    assert code == 0, err
    header = out.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 0xB7


def test_unknown_target_lists_the_presets(tmp_path):
    model_path = chain_model(tmp_path / "net.onnx", ["relu", "max_pool2d"])
    assert_error(run("build", model_path, "--target", "cortex-a99", "-o",
                     str(tmp_path / "x.so")), "unknown target 'cortex-a99'", "cortex-a72",
                 "host", command="build")
    assert not (tmp_path / "x.so").exists()
