"""Every zoo model materialises deterministically, runs, imports into Relax and is planned."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tvm_rebirth.frontend import zoo
from tvm_rebirth.compile.build import Runner, host_target
from tvm_rebirth.frontend.loader import load_model
from tvm_rebirth.passes import find_rebirth_sites
from tvm_rebirth.compile.database import target_key, tuning_logs_root

REQUIRED = ["googlenet", "alexnet", "zfnet", "squeezenet", "resnet50", "vgg19", "inception_v2"]


@pytest.mark.parametrize("name", REQUIRED)
def test_zoo_model_runs_with_sane_activations_and_has_sites(name):
    path = zoo.zoo_path(name)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert all(n.op_type != "ConstantOfShape" for n in model.graph.node)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32) * 50
    (out,) = session.run(None, {session.get_inputs()[0].name: x})[:1]
    assert np.isfinite(out).all() and out.std() > 0  # not constant, not overflowing
    loaded = load_model(name)
    assert loaded.input_shapes == {session.get_inputs()[0].name: [1, 3, 224, 224]}
    assert find_rebirth_sites(loaded.mod), f"{name}: no rebirth site found"


def test_materialisation_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_REBIRTH_CACHE", str(tmp_path))
    fresh = zoo.zoo_path("alexnet")
    monkeypatch.delenv("TVM_REBIRTH_CACHE")
    assert zoo.file_sha256(fresh) == zoo.file_sha256(zoo.zoo_path("alexnet"))


@pytest.mark.committed_tuning_logs
@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_our_schedules_compute_what_onnxruntime_computes(name):
    """Every zoo model built with our CPU schedules (the committed tuning_logs where they
    have a record, the generic schedule elsewhere) matches ONNX Runtime to 1e-3 relative."""
    model = load_model(name)
    shape = model.input_shapes[model.input_name]
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    want = session.run(None, {model.input_name: x})[0]
    runner = Runner(model.mod)
    got = runner(x)[0]
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    if (tuning_logs_root() / target_key(host_target()) / name).is_dir():
        assert runner.compiled.tuned > 0  # the committed database was applied
