"""The peers: ONNX Runtime, ncnn and MNN next to tvm-rebirth's builds, on this CPU (every
engine in its own process) and on the emulated Cortex-A72 (guest instructions per inference
of every engine, logits checked against ONNX Runtime on the host). The emulated test needs
qemu-user, mmdebstrap and network the first time (CI installs the tools; the sysroot, the
engines' aarch64 wheels and the converted models are cached)."""

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tvm_rebirth import flow
from tvm_rebirth.compile.build import Runner
from tvm_rebirth.deploy import peers
from tvm_rebirth.errors import RebirthError

from onnx_models import chain_model

ENGINES = ("onnxruntime_original", "ncnn_original", "mnn_original", "tvm_original",
           "tvm_rebirth")


def _softmax_model(path):
    """conv -> 7x7 AveragePool with end padding on a 6x6 map (GoogLeNet's pool5) -> Softmax."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype("float32"), "w")
    nodes = [helper.make_node("Conv", ["data", "w"], ["c"], kernel_shape=[3, 3]),
             helper.make_node("AveragePool", ["c"], ["p"], kernel_shape=[7, 7], strides=[1, 1],
                              pads=[0, 0, 1, 1]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Softmax", ["f"], ["prob"], axis=1)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _ort(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"data": x})[0]


def test_logits_cut_and_global_pool_are_function_preserving(tmp_path):
    model = flow.load(str(_softmax_model(tmp_path / "m.onnx")))
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype("float32")
    logits = peers.cut_before_softmax(model.onnx_model)
    assert [n.op_type for n in logits.graph.node] == ["Conv", "AveragePool", "Flatten"]
    rewritten = peers.global_pools(logits)
    assert [n.op_type for n in rewritten.graph.node] == ["Conv", "GlobalAveragePool", "Flatten"]
    ref = _ort(logits, x)
    np.testing.assert_allclose(_ort(rewritten, x), ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(_ort(model.onnx_model, x), ref)  # the softmax is gone
    # tvm: main's final softmax removed gives the same logits
    np.testing.assert_allclose(Runner(peers.logits_module(model.mod), tuned=False)(x)[0], ref,
                               rtol=1e-4, atol=1e-5)


def test_engines_on_this_cpu_each_in_its_own_process(tmp_path):
    model = flow.load(chain_model(tmp_path / "net.onnx", ["relu", "max_pool2d"]))
    x = np.random.default_rng(0).standard_normal((1, 4, 32, 32)).astype("float32")
    result = peers.time_on_host(model, {"tvm_original": model.mod}, x, threads=1, number=2,
                                rounds=2, workdir=tmp_path)
    assert set(result["rounds"]) >= {"onnxruntime_original", "tvm_original_untuned"}
    assert all(len(v) == 2 and min(v) > 0 for v in result["rounds"].values())
    assert len(result["onnxruntime_alone"]) == 2
    assert result["max_abs_diff_vs_onnxruntime"]["tvm_original_untuned"] < 1e-4
    assert result["tuned_functions"]["tvm_original_untuned"][0] == 0


@pytest.mark.skipif(
    shutil.which("qemu-aarch64") is None or shutil.which("qemu-aarch64-static") is None
    or shutil.which("mmdebstrap") is None,
    reason="needs qemu-user, qemu-user-static and mmdebstrap (installed by .ci/run)")
def test_every_engine_on_the_emulated_cortex_a72(tmp_path):
    try:
        peers.ensure_peers_site()
    except RebirthError as err:
        if "network" in str(err) or "download" in str(err):
            pytest.skip(f"the emulated device cannot be provisioned offline: {err}")
        raise
    model = flow.load(chain_model(tmp_path / "net.onnx", ["batch_norm", "avg_pool2d"]))
    rebirth = flow.rebirth_model(model, flow.RebirthOptions(select="all"))  # exact sites: no calibration needed
    x = np.random.default_rng(0).standard_normal((1, 4, 32, 32)).astype("float32")
    result = peers.count_on_emulated_device(
        model, {"tvm_original": model.mod, "tvm_rebirth": rebirth.mod}, x, tmp_path / "work")
    for name in ENGINES:
        assert result[f"{name}_instructions"] > 0, name
        diff = result["logits_vs_host_onnxruntime"][name]
        assert diff["relative"] < 1e-4, (name, diff)
    assert result["mac_floor_instructions"] > 0
    assert "cortex-a72" in result["device"]
    # the converted models are cached beside the source model's hash
    assert (peers.onnx_cache_dir(model) / "engine.ncnn.param").exists()
