"""finetune / bench / eval as real subprocesses on real ONNX files and real images."""

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from tvm_rebirth.frontend.datasets import fashion_mnist

from onnx_models import chain_model, inception_model
from test_cli import run


def assert_error(result, *fragments, command):
    code, stdout, stderr = result
    assert code == 2, stderr
    assert "Traceback" not in stderr and stdout == ""
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"tvm-rebirth {command}: error: "), last
    for fragment in fragments:
        assert fragment in last, last


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A 3-channel conv->relu->LRN->pool model, 40 real Fashion-MNIST photos as PNG files,
    a plan and learned weights."""
    root = tmp_path_factory.mktemp("flow")
    model = chain_model(root / "net.onnx", ["relu", "lrn", "max_pool2d"], shape=(1, 3, 32, 32))
    images, _ = fashion_mnist("train")
    calib = root / "calib"
    calib.mkdir()
    for i in range(40):
        Image.fromarray(images[i]).save(calib / f"img{i:02d}.png")
    code, _, err = run("plan", model, "--select", "all", "-o", str(root / "plan.yaml"))
    assert code == 0, err
    code, out, err = run("finetune", model, "--plan", str(root / "plan.yaml"), "--calib",
                         str(calib), "-o", str(root / "w.npz"), "--json")
    assert code == 0, err
    return {"root": root, "model": model, "calib": calib, "finetune": json.loads(out)}


def test_finetune_reports_every_site(workdir):
    report = workdir["finetune"]
    (site,) = report["sites"]
    assert site["id"] == "conv1+norm2+pool3" and site["exact"] is False
    assert 0 <= site["rel_error"] < 1.0
    assert report["calibration"].startswith("40 images from")
    assert report["mirror_images"] is True  # the default: each image and its mirror
    assert (workdir["root"] / "w.npz").exists()


def test_finetune_without_mirror_images(workdir, tmp_path):
    code, out, err = run("finetune", workdir["model"], "--plan", str(workdir["root"] / "plan.yaml"),
                         "--calib", str(workdir["calib"]), "--no-mirror", "-o",
                         str(tmp_path / "w.npz"), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["mirror_images"] is False
    assert report["sites"][0]["held_out_images"] * 2 == \
        workdir["finetune"]["sites"][0]["held_out_images"]


def test_bench_side_by_side(workdir):
    root = workdir["root"]
    code, out, err = run("bench", workdir["model"], "--plan", str(root / "plan.yaml"),
                         "--weights", str(root / "w.npz"), "--rounds", "2", "--json")
    assert code == 0, err
    data = json.loads(out)
    for side in ("original", "rebirth"):
        assert {"latency_ms", "memory_mb", "gflops"} <= set(data[side])
        assert data[side]["latency_ms"] > 0
    assert data["rebirth"]["gflops"] < data["original"]["gflops"]  # 3x3/s1 -> 3x3/s2
    assert data["memory_ratio"] > 1  # the full-size relu/LRN buffers are gone
    assert {"speedup", "max_abs_err", "device"} <= set(data)
    assert "[bench] round 2/2" in err


def test_user_onnx_with_learned_sites_needs_calibration(workdir, tmp_path):
    assert_error(run("finetune", "--select", "all", workdir["model"], "-o", str(tmp_path / "w.npz")),
                 "net.onnx", "--calib", command="finetune")
    assert not (tmp_path / "w.npz").exists()


def test_exact_only_plan_needs_no_calibration(tmp_path):
    model = chain_model(tmp_path / "bn.onnx", ["batch_norm", "avg_pool2d"])
    code, out, err = run("finetune", "--select", "all", model, "-o", str(tmp_path / "w.npz"), "--json")
    assert code == 0, err
    (site,) = json.loads(out)["sites"]
    assert site["exact"] and site["method"] == "closed form"
    with np.load(tmp_path / "w.npz") as data:
        assert data["conv1+bn1+ave2/weight"].shape == (8, 4, 4, 4)


def test_weights_for_another_plan(workdir, tmp_path):
    root = workdir["root"]
    other = tmp_path / "plan.yaml"
    code, _, err = run("plan", workdir["model"], "--select", "all", "--policy", "keep-receptive-field", "-o",
                       str(other))
    assert code == 0, err
    assert_error(run("bench", workdir["model"], "--plan", str(other), "--weights",
                     str(root / "w.npz")), "w.npz", "learned for plan", command="bench")


def test_corrupt_weights_file(workdir, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    assert_error(run("bench", workdir["model"], "--plan", str(workdir["root"] / "plan.yaml"),
                     "--weights", str(bad)), "bad.npz", "not a weights .npz file",
                 command="bench")


def test_branch_sites_through_the_cli(tmp_path):
    """plan -> edit (thin a reducer) -> finetune -> bench on an inception module, with a .npy
    calibration array."""
    model = inception_model(tmp_path / "inc.onnx", pool_after=False)
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((32, 16, 28, 28)).astype("f"))
    plan = tmp_path / "plan.yaml"
    code, out, err = run("plan", model, "--select", "all", "--branch-widths", "paper", "-o", str(plan), "--json")
    assert code == 0, err
    (site,) = json.loads(out)["sites"]
    widths = {c["replaces"]: c["out_channels"] for c in site["new_conv"]}
    assert widths["inc/3x3_reduce"] == 12 // 2 and widths["inc/5x5_reduce"] == 4
    code, out, err = run("finetune", model, "--plan", str(plan), "--calib", str(calib),
                         "-o", str(tmp_path / "w.npz"), "--json")
    assert code == 0, err
    (fit,) = json.loads(out)["sites"]
    assert fit["id"] == "inc/output" and fit["kind"] == "branch" and 0 < fit["rel_error"] < 1
    code, out, err = run("bench", model, "--plan", str(plan), "--weights",
                         str(tmp_path / "w.npz"), "--rounds", "1", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["sites"] == ["inc/output"] and data["memory_ratio"] > 1


def test_eval_fmnist_inception_on_a_slice_of_the_test_set(tmp_path):
    code, out, err = run("plan", "fmnist-inception", "--select", "all", "--kinds", "streamline", "-o",
                         str(tmp_path / "p.yaml"))
    assert code == 0, err
    code, out, err = run("eval", "fmnist-inception", "--plan", str(tmp_path / "p.yaml"),
                         "--limit", "400", "--images", "128", "--reconstruct-epochs", "0",
                         "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["n"] == 400 and data["labeled_set"].startswith("Fashion-MNIST test")
    assert data["original"]["top1"] > 0.85  # the committed reference model is a real classifier
    assert data["original"]["top5"] >= data["original"]["top1"]
    assert data["rebirth"]["top1"] > 0.5  # slimmed, fine-tuned layer-wise, still classifies
    assert 0 < data["agreement"] <= 1


@pytest.mark.heavy
@pytest.mark.committed_tuning_logs
def test_demo_runs_the_whole_flow(tmp_path):
    """README's first command, with fewer images and rounds so CI stays quick (the emulated
    device stage is exercised by tests/test_device.py)."""
    report = tmp_path / "report"
    code, out, err = run("demo", "--report-dir", str(report), "--images", "24",
                         "--rounds", "1", "--eval-limit", "200", "--no-device", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["sites"] == {"streamline": 4, "branch": 9}
    # the default plan: what its cost table measured to pay here, the prediction recorded
    plan = yaml.safe_load((report / "googlenet.plan.yaml").read_text())
    assert data["sites_applied"] == [s["id"] for s in plan["sites"] if s["enabled"]]
    assert 0 < len(data["sites_applied"]) <= 13
    assert data["predicted_speedup"] == plan["selection"]["predicted_speedup"] > 1
    assert data["bench"]["rebirth"]["gflops"] < data["bench"]["original"]["gflops"]
    assert data["memory_ratio"] > 1
    assert data["accuracy"]["n"] == 200
    assert data["device"] == {"skipped": "--no-device"} and data["instructions_ratio"] is None
    for name in ("summary.json", "summary.md", "googlenet.plan.yaml", "googlenet.weights.npz",
                 "layer_time.png", "latency_memory.png"):
        assert (report / name).exists(), name
    for png in ("layer_time.png", "latency_memory.png"):
        assert (report / png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((report / "summary.json").read_text())["bench"] == data["bench"]
    # the paper's figure: LRN and pooling time goes away with the slimmed stem and modules
    share = {k: data["bench"][k]["time_by_layer_type"] for k in ("original", "rebirth")}
    assert share["original"]["LRN"] > 0 and share["rebirth"]["LRN"] == 0
    assert share["rebirth"]["pooling"] < share["original"]["pooling"]
    summary = (report / "summary.md").read_text()
    assert "![time per layer type](layer_time.png)" in summary and "LRN" in summary
    # 24 images are too few for block reconstruction: the summary says what was done
    assert "closed-form (layer-wise) fits only" in summary
    assert data["accuracy"]["diverging"] == {} and "more calibration images" not in summary
    for stage in ("load", "plan", "finetune", "bench", "device", "eval", "report"):
        assert stage in data["stage_seconds"]
    assert "[demo] 7/7" in err


@pytest.mark.heavy
def test_end_to_end_refinement_lowers_the_output_error(tmp_path):
    """Unlabeled distillation trains with TVM's gradients (no PyTorch)."""
    code, out, err = run("finetune", "--select", "all", "fmnist-inception", "--images", "128", "--e2e",
                         "--reconstruct-epochs", "0", "--e2e-images", "1024", "--e2e-epochs", "3",
                         "-o",
                         str(tmp_path / "w.npz"), "--json")
    assert code == 0, err
    e2e = json.loads(out)["end_to_end"]
    assert e2e["output_rel_error_after"] < e2e["output_rel_error_before"]
    assert e2e["kept_epoch"] >= 1 and "TVM gradients" in e2e["loss"]
    assert e2e["parameters"] > 0 and "[finetune] end-to-end distillation: epoch 3/3" in err


@pytest.fixture(scope="module")
def labeled_npy(tmp_path_factory):
    """1024 preprocessed Fashion-MNIST train images and their labels as .npy files."""
    from tvm_rebirth import load_model
    from tvm_rebirth.learn.calib import preprocess

    root = tmp_path_factory.mktemp("labeled")
    model = load_model("fmnist-inception")
    images, labels = fashion_mnist("train")
    x = preprocess(images[:1024, :, :, None], model.zoo_entry, (1, 1, 28, 28))
    np.save(root / "x.npy", x)
    np.save(root / "y.npy", labels[:1024].astype(np.int64))
    return root


def test_retraining_with_labels_improves_held_out_top1(tmp_path, labeled_npy):
    """The paper's recipe: layer-wise start, then labels + the original as teacher, with
    TVM's gradients. 1000 images: the held-out ones are not a whole number of batches."""
    code, _, err = run("plan", "fmnist-inception", "--select", "all", "--kinds", "streamline",
                       "-o", str(tmp_path / "p.yaml"))
    assert code == 0, err
    code, out, err = run("finetune", "fmnist-inception", "--plan", str(tmp_path / "p.yaml"),
                         "--calib", str(labeled_npy / "x.npy"), "--images", "128", "--e2e",
                         "--reconstruct-epochs", "0",
                         "--e2e-labels", str(labeled_npy / "y.npy"), "--e2e-flip",
                         "--e2e-images", "1000", "--e2e-epochs", "4",
                         "-o", str(tmp_path / "w.npz"), "--json")
    assert code == 0, err
    e2e = json.loads(out)["end_to_end"]
    assert e2e["loss"] == "cross-entropy + distillation (TVM gradients)" and e2e["flip"]
    assert e2e["images"] == 868 and e2e["held_out_images"] == 124  # 992: whole batches
    # some epoch beat the layer-wise weights on the held-out images, and that epoch was kept
    assert e2e["kept_epoch"] >= 1, err
    assert e2e["held_out_top1_after"] > e2e["held_out_top1_before"]
    assert "top-1" in err and "[finetune] end-to-end retraining with labels: epoch 4/4" in err


def test_bad_labels_fail_before_fitting(tmp_path, labeled_npy):
    y = np.load(labeled_npy / "y.npy")
    y[7] = 10
    np.save(tmp_path / "bad.npy", y)
    result = run("finetune", "--select", "all", "fmnist-inception", "--calib", str(labeled_npy / "x.npy"), "--e2e",
                 "--e2e-labels", str(tmp_path / "bad.npy"), "--e2e-images", "1024",
                 "-o", str(tmp_path / "w.npz"))
    assert_error(result, str(tmp_path / "bad.npy"), "labels must lie in 0..9", "got 0..10",
                 command="finetune")
    assert "[finetune] capturing" not in result[2] and not (tmp_path / "w.npz").exists()
    result = run("finetune", "--select", "all", "fmnist-inception", "--e2e", "--e2e-labels",
                 str(tmp_path / "bad.npy"), "-o", str(tmp_path / "w.npz"))
    assert_error(result, "--e2e-labels labels the rows of a --calib FILE.npy",
                 command="finetune")
    result = run("finetune", "--select", "all", "fmnist-inception", "--e2e-flip", "-o", str(tmp_path / "w.npz"))
    assert_error(result, "add --e2e", command="finetune")
