"""Time per layer type (the paper's figure) and the report plots."""

import json

import numpy as np
import pytest

from tvm_rebirth import RebirthPlan, finetune, load_model
from tvm_rebirth.compile.build import Runner
from tvm_rebirth.passes import rebirth_pipeline
from tvm_rebirth.report.plots import plot_layer_time, plot_side_by_side
from tvm_rebirth.report.profile import LAYER_TYPES, layer_type, time_by_layer_type

from onnx_models import chain_model
from test_cli import run

PNG = b"\x89PNG\r\n\x1a\n"


def test_kernel_names_map_to_layer_types():
    # names as Relax's FuseOps/LegalizeOps give them on GoogLeNet
    assert layer_type("fused_conv2d3_add5_relu5") == "convolution"
    assert layer_type("fused_matmul_add35") == "fully connected"
    assert layer_type("max_pool2d7") == "pooling"
    assert layer_type("fused_avg_pool2d_dropout") == "pooling"
    assert layer_type("mean") == "pooling"
    for lrn_part in ("avg_pool3d1", "fused_multiply2_expand_dims1",
                     "fused_squeeze1_multiply3_add4_power1_divide1"):
        assert layer_type(lrn_part) == "LRN"
    # our kernels: blocked convs, Winograd, separable pools, LRN's window
    for conv_part in ("fused_rebirth_conv2d2_add3_relu2", "rebirth_winograd3",
                      "fused_rebirth_winograd_add_relu"):
        assert layer_type(conv_part) == "convolution"
    assert layer_type("rebirth_max_pool2d4") == "pooling"
    assert layer_type("rebirth_channel_window1") == "LRN"
    assert layer_type("concatenate4") == "concat"
    assert layer_type("reshape18") == "other"
    assert layer_type("vm.builtin.check_tensor_info") is None


def test_slimming_removes_lrn_and_pool_time(tmp_path):
    path = chain_model(tmp_path / "net.onnx", ["relu", "lrn", "max_pool2d"])
    model = load_model(path)
    plan = RebirthPlan.from_model(model)
    x = np.random.default_rng(0).standard_normal((16, 4, 32, 32)).astype("float32")
    weights = finetune(model, plan, x, "random")
    original = time_by_layer_type(Runner(model.mod), x[:1], runs=3)
    rebirth = time_by_layer_type(Runner(rebirth_pipeline(plan, weights)(model.mod)), x[:1],
                                 runs=3)
    assert original["LRN"] > 0 and original["pooling"] > 0 and original["convolution"] > 0
    assert rebirth["LRN"] == 0 and rebirth["pooling"] == 0 and rebirth["convolution"] > 0
    for profile in (original, rebirth):
        assert profile["total_ms"] > 0
        assert abs(sum(profile[t] for t in LAYER_TYPES) - profile["total_ms"]) < 1e-3
        assert set(map(layer_type, profile["kernels"])) <= set(LAYER_TYPES)


def test_plots_are_png(tmp_path):
    profile = {t: 0.0 for t in LAYER_TYPES}
    original = dict(profile, convolution=3.0, pooling=1.0, LRN=0.5, total_ms=4.5)
    rebirth = dict(profile, convolution=2.0, total_ms=2.0)
    a = plot_layer_time({"original": original, "rebirth": rebirth}, tmp_path / "a.png", "t")
    b = plot_side_by_side([("latency (ms)", {"original": 4.5, "rebirth": 2.0}, "2.25x"),
                           ("memory (MB)", {"original": 9.0, "rebirth": 2.0}, None)],
                          tmp_path / "b.png", "t")
    for png in (a, b):
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temp files


def test_bench_profile_prints_time_per_layer_type(tmp_path):
    path = chain_model(tmp_path / "net.onnx", ["batch_norm", "avg_pool2d"])  # exact site
    assert run("plan", path, "--select", "all", "-o", str(tmp_path / "p.yaml"))[0] == 0
    code, out, err = run("bench", path, "--plan", str(tmp_path / "p.yaml"), "--rounds", "2",
                         "--profile", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["original"]["time_by_layer_type"]["pooling"] > 0
    assert data["rebirth"]["time_by_layer_type"]["pooling"] == 0
    # each conv kernel's GFLOP/s is its multiply-adds over its time: conv1 (4 -> 8 channels,
    # 3x3, 32x32) is one of them
    kernels = data["original"]["time_by_layer_type"]["kernels"]
    implied_macs = [c["gflops"] * kernels[c["kernel"]] * 1e6 / 2
                    for c in data["original"]["conv_throughput"]]
    assert any(m == pytest.approx(8 * 4 * 9 * 32 * 32, rel=0.02) for m in implied_macs)
    code, out, err = run("bench", path, "--plan", str(tmp_path / "p.yaml"), "--rounds", "1",
                         "--profile")
    assert code == 0, err
    assert "time per layer type" in out and "pooling" in out
    assert "heaviest conv kernels, original" in out and "GFLOP/s" in out
