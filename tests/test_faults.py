"""Faults and bad inputs, end to end through the CLI (issue 20): output paths that must not be
destroyed (inputs, symlinks, devices, folders, read-only and full filesystems), bad weights,
plan typos, numeric flags, calibration data and misleading messages. After every failure
the inputs are untouched and no temporary file is left."""

import contextlib
import errno
import json
import os
import stat
import subprocess
import uuid

import numpy as np
import pytest
import yaml
from onnx_models import chain_model
from PIL import Image
from test_cli import run


def assert_error(result, *fragments, command, code=2):
    """One line ``tvm-rebirth COMMAND: error: ...`` holding every fragment, nothing on stdout."""
    returncode, stdout, stderr = result
    assert returncode == code, stderr
    assert "Traceback" not in stderr and "internal error" not in stderr and stdout == ""
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"tvm-rebirth {command}: error: "), last
    for fragment in fragments:
        assert fragment in last, last


def no_temporary_files(folder) -> bool:
    return not [p for p in os.listdir(folder) if ".tmp" in p]


def snapshot(*paths) -> dict:
    """{path: (is symlink, bytes of what it names)} to show inputs are untouched."""
    return {str(p): (os.path.islink(p), open(p, "rb").read()) for p in paths}


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A conv->relu->LRN->pool->tail model (one learned site, the tail refitted), a 16-image
    calibration array, its plan and weights learned from them."""
    root = tmp_path_factory.mktemp("learned")
    model = chain_model(root / "net.onnx", ["relu", "lrn", "max_pool2d"], shape=(1, 3, 32, 32))
    np.save(root / "calib.npy",
            np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype("f"))
    code, _, err = run("plan", model, "--select", "all", "-o", str(root / "plan.yaml"))
    assert code == 0, err
    code, out, err = run("finetune", model, "--plan", str(root / "plan.yaml"), "--calib",
                         str(root / "calib.npy"), "-o", str(root / "w.npz"), "--json")
    assert code == 0, err
    assert json.loads(out)["sites"][0]["refit"][0]["layer"] == "tail"
    return {"root": root, "model": model, "plan": root / "plan.yaml", "weights": root / "w.npz",
            "calib": root / "calib.npy"}


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    """A conv->BN->avg-pool model: its one site is exact, fine-tuning needs no images."""
    root = tmp_path_factory.mktemp("exact")
    model = chain_model(root / "bn.onnx", ["batch_norm", "avg_pool2d"])
    code, _, err = run("plan", model, "--select", "all", "-o", str(root / "plan.yaml"))
    assert code == 0, err
    return {"root": root, "model": model, "plan": root / "plan.yaml"}


@contextlib.contextmanager
def tmpfs(path, options):
    """A tmpfs mounted at ``path`` (root only; skips the test where mounting is refused)."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def fill(folder):
    """Fill the filesystem of ``folder`` to the last byte (new empty files still fit)."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)


# -- 1. -o never destroys what is at the path ----------------------------------------------
def test_plan_refuses_to_overwrite_its_own_model(exact):
    model = exact["model"]
    before = snapshot(model)
    assert_error(run("plan", model, "--select", "all", "-o", model), "bn.onnx", "this command's model",
                 "refusing to overwrite an input", command="plan")
    assert snapshot(model) == before and no_temporary_files(exact["root"])


def test_finetune_refuses_to_overwrite_its_plan_and_calibration(learned):
    before = snapshot(learned["plan"], learned["calib"])
    for target, what in ((learned["plan"], "--plan file"), (learned["calib"], "--calib")):
        result = run("finetune", learned["model"], "--plan", str(learned["plan"]), "--calib",
                     str(learned["calib"]), "-o", str(target))
        assert_error(result, str(target), what, command="finetune")
        assert "[finetune]" not in result[2]  # refused before any work
    assert snapshot(learned["plan"], learned["calib"]) == before
    assert no_temporary_files(learned["root"])


def test_an_input_reached_through_a_symlink_is_still_an_input(exact, tmp_path):
    link = tmp_path / "alias.onnx"
    link.symlink_to(exact["model"])
    before = snapshot(exact["model"])
    assert_error(run("plan", exact["model"], "--select", "all", "-o", str(link)), "alias.onnx",
                 "this command's model", command="plan")
    assert snapshot(exact["model"]) == before and link.is_symlink()


def test_outputs_are_written_through_symlinks(exact, tmp_path):
    real = tmp_path / "plans" / "real.yaml"
    real.parent.mkdir()
    real.write_text("old\n")
    link = tmp_path / "latest.yaml"
    link.symlink_to(real)
    code, _, err = run("plan", exact["model"], "--select", "all", "-o", str(link))
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert yaml.safe_load(real.read_text())["format"] == "rebirth-plan/1"
    assert no_temporary_files(real.parent) and no_temporary_files(tmp_path)


def test_weights_written_through_a_dangling_symlink(exact, tmp_path):
    link = tmp_path / "w.npz"
    link.symlink_to(tmp_path / "store.npz")
    code, _, err = run("finetune", exact["model"], "--plan", str(exact["plan"]), "-o", str(link))
    assert code == 0, err
    assert link.is_symlink() and (tmp_path / "store.npz").is_file()
    with np.load(tmp_path / "store.npz") as data:
        assert "__meta__" in data.files


def test_non_regular_files_are_never_replaced(exact, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    targets = [(fifo, "not a regular file"), (tmp_path, "is a directory")]
    if os.geteuid() == 0:  # a copy of /dev/full's node: the real one is not ours to risk
        full = tmp_path / "full"
        os.mknod(full, stat.S_IFCHR | 0o666, os.makedev(1, 7))
        targets.append((full, "not a regular file"))
    for target, reason in targets:
        assert_error(run("plan", exact["model"], "--select", "all", "-o", str(target)), str(target), reason,
                     command="plan")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    if os.geteuid() == 0:
        assert stat.S_ISCHR(os.lstat(tmp_path / "full").st_mode)
    assert no_temporary_files(tmp_path)


def test_dev_null_and_dev_full_are_refused(exact):
    for device in ("/dev/null", "/dev/full"):
        before = os.lstat(device)
        assert_error(run("plan", exact["model"], "--select", "all", "-o", device), device, "not a regular file",
                     command="plan")
        after = os.lstat(device)
        assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev


def test_build_into_a_missing_folder_fails_before_compiling(exact, tmp_path):
    out = tmp_path / "missing" / "lib.so"
    result = run("build", exact["model"], "-o", str(out))
    assert_error(result, str(out), "does not exist", command="build")
    assert "[build] compiling" not in result[2]
    assert not (tmp_path / "missing").exists()


def test_bench_report_into_a_directory_fails_before_work(learned, tmp_path):
    result = run("bench", learned["model"], "--plan", str(learned["plan"]), "--weights",
                 str(learned["weights"]), "--rounds", "1", "-o", str(tmp_path))
    assert_error(result, str(tmp_path), "is a directory", command="bench")
    assert "[bench]" not in result[2]


def test_read_only_folder(exact, tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        for args in (("plan", exact["model"]),
                     ("finetune", exact["model"], "--plan", str(exact["plan"])),
                     ("build", exact["model"])):
            out = ro / "out"
            result = run(*args, "-o", str(out))
            assert_error(result, str(out), "cannot write in", "Read-only file system",
                         command=args[0])
            assert "compiling" not in result[2]


def test_full_filesystem_leaves_the_old_file_and_no_temporary(exact, learned, tmp_path):
    with tmpfs(tmp_path / "full", "size=64k") as full:
        (full / "p.yaml").write_text("precious: true\n")
        (full / "w.npz").write_bytes(b"precious")
        fill(full)
        assert_error(run("plan", exact["model"], "--select", "all", "-o", str(full / "p.yaml")), "p.yaml",
                     "No space left on device", command="plan")
        assert_error(run("finetune", learned["model"], "--plan", str(learned["plan"]),
                         "--calib", str(learned["calib"]), "-o", str(full / "w.npz")),
                     "w.npz", "No space left on device", command="finetune")
        assert_error(run("build", exact["model"], "-o", str(full / "lib.so")), "lib.so",
                     "No space left on device", command="build")
        assert not (full / "lib.so").exists()
        assert (full / "p.yaml").read_text() == "precious: true\n"
        assert (full / "w.npz").read_bytes() == b"precious"
        assert no_temporary_files(full)


def test_a_failing_write_removes_its_temporary_file(tmp_path, monkeypatch):
    """The same without a tmpfs: ENOSPC raised by the write itself, in process."""
    from tvm_rebirth import RebirthError
    from tvm_rebirth.report import output

    target = tmp_path / "report.json"
    target.write_text("old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(output.os, "fsync", no_space)
    with pytest.raises(RebirthError, match="report.json: cannot write .No space left on device"):
        output.write_json(target, {"a": 1})
    assert target.read_text() == "old" and no_temporary_files(tmp_path)


def test_interrupted_write_removes_its_temporary_file(tmp_path):
    from tvm_rebirth.report import output

    with pytest.raises(KeyboardInterrupt), output.replacing(tmp_path / "lib.so") as tmp:
        assert tmp.endswith(".so") and ".tmp" in tmp
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


# -- 5. weights files --------------------------------------------------------------------------
def rewrite_npz(src, dst, change):
    with np.load(src) as data:
        arrays = {k: data[k] for k in data.files}
    change(arrays)
    np.savez(dst, **arrays)
    return str(dst)


@pytest.mark.parametrize("case, fragments", [
    ("nan", ["'conv1+norm2+pool3/weight'", "NaN or Inf"]),
    ("inf", ["'conv1+norm2+pool3/refit/tail/bias'", "NaN or Inf"]),
    ("no refit weight", ["missing refit key 'conv1+norm2+pool3/refit/tail/weight'"]),
    ("no refit bias", ["missing refit key 'conv1+norm2+pool3/refit/tail/bias'"]),
    ("meta not json", ["__meta__ is not the JSON object"]),
    ("meta a list", ["__meta__ is not the JSON object"]),
    ("empty", ["not a weights .npz file", "empty"]),
    ("npy", ["not a weights .npz file"]),
])
def test_bad_weights_are_one_line_errors(learned, tmp_path, case, fragments):
    bad = tmp_path / "bad.npz"
    key = "conv1+norm2+pool3"
    changes = {
        "nan": lambda a: a[f"{key}/weight"].__setitem__((0, 0, 0, 0), np.nan),
        "inf": lambda a: a[f"{key}/refit/tail/bias"].__setitem__(0, np.inf),
        "no refit weight": lambda a: a.pop(f"{key}/refit/tail/weight"),
        "no refit bias": lambda a: a.pop(f"{key}/refit/tail/bias"),
        "meta not json": lambda a: a.__setitem__("__meta__", np.array("{plan_sha256: x")),
        "meta a list": lambda a: a.__setitem__("__meta__", np.array("[1, 2]")),
    }
    if case == "empty":
        bad.write_bytes(b"")
    elif case == "npy":
        with open(bad, "wb") as f:
            np.save(f, np.zeros(3, np.float32))
    else:
        rewrite_npz(learned["weights"], bad, changes[case])
    result = run("build", learned["model"], "--plan", str(learned["plan"]), "--weights",
                 str(bad), "-o", str(tmp_path / "lib.so"))
    assert_error(result, str(bad), *fragments, command="build")
    assert "compiling" not in result[2] and not (tmp_path / "lib.so").exists()


# -- 6. plan files -----------------------------------------------------------------------------
@pytest.mark.parametrize("edit, fragments", [
    (lambda d: d["sites"][0].update(enabeld=False),
     ["site 'conv1+bn1+ave2'", "unknown key 'enabeld'", "did you mean 'enabled'"]),
    (lambda d: d.update(sitse=[]), ["unknown key 'sitse'", "did you mean 'sites'"]),
    (lambda d: d["model"].update(path="x"), ["model: unknown key 'path'"]),
    (lambda d: d.update(sites="conv1"), ["'sites' must be a list, got a string"]),
    (lambda d: d["sites"][0].update(new_conv=None),
     ["site 'conv1+bn1+ave2'", "'new_conv' must be a list, got null"]),
    (lambda d: d["sites"][0].update(old_conv=[3]),
     ["site 'conv1+bn1+ave2'", "'old_conv' must be a mapping"]),
    (lambda d: d.update(model="bn"), ["'model' must be a mapping", "got a string"]),
    (lambda d: d["sites"][0].update(exact="yes"), ["exact must be true or false"]),
    (lambda d: d["sites"].__setitem__(0, "conv1"), ["site #0 must be a mapping"]),
])
def test_plan_typos_and_shape_errors(exact, tmp_path, edit, fragments):
    data = yaml.safe_load(exact["plan"].read_text())
    edit(data)
    plan = tmp_path / "edited.yaml"
    plan.write_text(yaml.safe_dump(data, sort_keys=False))
    assert_error(run("plan", exact["model"], "--check", str(plan)), str(plan), *fragments,
                 command="plan")


# -- 7. models outside one float NCHW input ---------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Models whose input is not one float32 NCHW tensor of fixed shape, and calibration
    arrays for 16x16 and 32x32 images."""
    from onnx import TensorProto
    from onnx_models import (
        dynamic_input_model,
        no_conv_model,
        one_conv_model,
        two_input_model,
        typed_input_model,
    )

    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    for size in (16, 32):
        np.save(root / f"calib{size}.npy",
                rng.standard_normal((16, 3, size, size)).astype("f"))
    return {"root": root,
            "two": two_input_model(root / "two.onnx"),  # image and a 4-D offset
            "image_second": two_input_model(root / "second.onnx", image_first=False,
                                            extra_shape=(8, 1, 1)),
            "uint8": typed_input_model(root / "u8.onnx", TensorProto.UINT8),
            "float16": typed_input_model(root / "f16.onnx", TensorProto.FLOAT16),
            "dynamic": dynamic_input_model(root / "dynamic.onnx"),
            "dynamic_batch": dynamic_input_model(root / "batch.onnx", ("N", 3, 16, 16)),
            "no_conv": no_conv_model(root / "noconv.onnx"),
            "one_conv": one_conv_model(root / "one.onnx", shape=(1, 3, 32, 32))}


def test_two_image_like_inputs_need_input_name(inputs, tmp_path):
    model = inputs["two"]
    assert_error(run("plan", model, "--select", "all", "-o", str(tmp_path / "p.yaml")), "two.onnx", "2 inputs",
                 "'image' (float32 [1, 3, 16, 16])", "'offset' (float32 [1, 8, 1, 1])",
                 "--input NAME", command="plan")
    assert_error(run("plan", model, "--select", "all", "--input", "img"), "--input img", "no input 'img'",
                 "'image'", command="plan")
    code, out, err = run("plan", model, "--select", "all", "--input", "image", "-o", str(tmp_path / "p.yaml"),
                         "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["image_input"] == "image" and data["counts"]["streamline"] == 1
    assert data["input_shapes"] == {"image": [1, 3, 16, 16], "offset": [1, 8, 1, 1]}


def test_the_image_need_not_be_the_first_input(inputs, tmp_path):
    model, calib = inputs["image_second"], str(inputs["root"] / "calib16.npy")
    code, out, err = run("plan", model, "--select", "all", "-o", str(tmp_path / "p.yaml"), "--json")
    assert code == 0, err
    data = json.loads(out)  # the one float32 4-D input, though listed second
    assert data["image_input"] == "image" and data["input_shapes"]["image"] == [1, 3, 16, 16]
    code, out, err = run("build", model, "--input", "image", "-o", str(tmp_path / "lib.so"),
                         "--json")
    assert code == 0, err
    assert json.loads(out)["variant"] == "original" and (tmp_path / "lib.so").is_file()
    for command in ("finetune", "bench"):  # they feed images alone: named, not crashed
        result = run(command, model, "--plan", str(tmp_path / "p.yaml"), "--calib", calib,
                     "-o", str(tmp_path / f"{command}.out"))
        assert_error(result, "second.onnx", f"{command} runs the model on its image input "
                     "'image' alone", "other inputs too ('offset' [8, 1, 1])", command=command)
        assert not (tmp_path / f"{command}.out").exists()


@pytest.mark.parametrize("dtype", ["uint8", "float16"])
def test_non_float32_inputs_are_named(inputs, tmp_path, dtype):
    model = inputs[dtype]
    for command in ("plan", "bench"):
        assert_error(run(command, model, "-o", str(tmp_path / "out")),
                     f"input 'data' ({dtype} [1, 3, 16, 16])", "float32", command=command)
    assert os.listdir(tmp_path) == []


def test_dynamic_height_and_width_need_an_input_shape(inputs, tmp_path):
    model, calib = inputs["dynamic"], str(inputs["root"] / "calib32.npy")
    assert_error(run("plan", model, "--select", "all", "-o", str(tmp_path / "p.yaml")),
                 "input 'data' (float32 [N, 3, H, W])", "dynamic height and width",
                 "--input-shape", command="plan")
    assert_error(run("plan", model, "--select", "all", "--input-shape", "1,4,32,32"), "--input-shape 1,4,32,32",
                 "fixed dim C from 3 to 4", command="plan")
    assert_error(run("plan", model, "--select", "all", "--input-shape", "1,3,32"), "--input-shape",
                 "N,C,H,W", command="plan")
    assert not (tmp_path / "p.yaml").exists()
    code, out, err = run("plan", model, "--select", "all", "--input-shape", "1,3,32,32", "-o",
                         str(tmp_path / "p.yaml"), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["input_shapes"] == {"data": [1, 3, 32, 32]}
    site = yaml.safe_load((tmp_path / "p.yaml").read_text())["sites"][0]
    assert site["output_hw"] == [15, 15]  # not [0, 0] of a 1x1 guess
    code, out, err = run("bench", model, "--input-shape", "1,3,32,32", "--plan",
                         str(tmp_path / "p.yaml"), "--calib", calib, "--rounds", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["sites"] == [site["id"]]
    code, out, err = run("plan", inputs["dynamic_batch"], "--select", "all", "-o",
                         str(tmp_path / "batch.yaml"), "--json")  # a dynamic batch is 1
    assert code == 0, err
    assert json.loads(out)["input_shapes"] == {"data": [1, 3, 16, 16]}


def test_a_model_without_conv2d_has_nothing_to_slim(inputs, tmp_path):
    model = inputs["no_conv"]
    code, out, err = run("plan", model, "--select", "all", "-o", str(tmp_path / "p.yaml"))
    assert code == 0, err
    assert "nothing to slim: the model has no conv2d" in out
    assert_error(run("bench", "--select", "all", model, "--rounds", "1"), "noconv.onnx", "no conv2d",
                 "nothing to slim", command="bench")


def test_bench_of_a_model_with_no_planned_memory(inputs, tmp_path):
    code, out, err = run("plan", inputs["one_conv"], "--select", "all", "-o", str(tmp_path / "p.yaml"))
    assert code == 0, err
    assert "nothing to slim: no site found" in out
    code, out, err = run("bench", "--select", "all", inputs["one_conv"], "--rounds", "1", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["rebirth"]["memory_mb"] == 0 and data["memory_ratio"] == 1.0
    code, out, err = run("bench", "--select", "all", inputs["one_conv"], "--rounds", "1")
    assert code == 0, err
    assert "planned memory (MB)" in out and "1.0x" in out


def test_tune_checks_the_input_before_searching(inputs, tmp_path):
    for model, extra, fragments in (
            (inputs["image_second"], ["--input", "image"],
             ["2 inputs", "'offset' (float32 [8, 1, 1])", "--no-measure"]),
            (inputs["uint8"], [], ["input 'data' (uint8 [1, 3, 16, 16])", "float32"]),
            (inputs["dynamic"], [], ["dynamic height and width", "--input-shape"])):
        result = run("tune", model, "--trials", "8", "--log-dir", str(tmp_path / "db"),
                     *extra)
        assert_error(result, *fragments, command="tune")
        assert "[tune] measuring" not in result[2] and not (tmp_path / "db").exists()


# -- 10. numeric flags -------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ("finetune", "M", "--images", "0"), ("finetune", "M", "--images", "-1"),
    ("bench", "M", "--rounds", "0"), ("finetune", "M", "--e2e-images", "0"),
    ("finetune", "M", "--e2e-epochs", "0"), ("eval", "M", "--limit", "0"),
    ("eval", "M", "--limit", "-1"), ("tune", "M", "--trials", "0"),
    ("bench", "M", "--session-timeout", "0"), ("demo", "--eval-limit", "0"),
    ("finetune", "M", "--reconstruct-epochs", "-1"), ("eval", "M", "--reconstruct-epochs", "-2"),
    ("finetune", "M", "--seed", "-1"), ("plan", "M", "--budget", "nan"),
    ("eval", "M", "--budget", "inf"), ("bench", "M", "--budget", "-0.1"),
    ("tune", "M", "--trials", "4", "--max-tasks", "0"),
    ("tune", "M", "--trials", "4", "--build-timeout", "0"),
    ("device", "start", "--port", "70000"), ("device", "start", "--port", "0"),
])
def test_numeric_flags_are_checked_before_any_work(args, tmp_path):
    code, out, err = run(*args, cwd=tmp_path)
    assert code == 2 and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"tvm-rebirth {args[0]}: error: argument {args[-2]}"), last
    assert "must be" in last and f"[{args[0]}]" not in err  # no stage started
    assert os.listdir(tmp_path) == []


# -- 11. calibration ---------------------------------------------------------------------------
def test_nan_in_a_calibration_array_names_the_file(learned, tmp_path):
    x = np.load(learned["calib"])
    x[5, 0, 3, 3] = np.nan
    bad = tmp_path / "nan.npy"
    np.save(bad, x)
    assert_error(run("finetune", learned["model"], "--plan", str(learned["plan"]), "--calib",
                     str(bad), "-o", str(tmp_path / "w.npz")),
                 str(bad), "NaN or Inf", "row 5", command="finetune")
    assert not (tmp_path / "w.npz").exists()


def test_16_bit_png_is_read_at_full_precision(tmp_path):
    from tvm_rebirth.learn.calib import images_from_folder

    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(ramp).save(tmp_path / "wide.png")
    Image.fromarray((ramp // 257).astype(np.uint8)).save(tmp_path / "narrow.png")
    wide, narrow = images_from_folder(tmp_path, (1, 1, 32, 32), 2)[[1, 0]]
    assert wide.max() > 250  # not saturated at 255 from value 256 on
    np.testing.assert_allclose(wide[0], ramp * (255 / 65535), atol=1e-3)
    np.testing.assert_allclose(wide, narrow, atol=1.0)  # the 8-bit scale
    assert len(np.unique(wide)) > len(np.unique(narrow))  # the low bits are kept


def test_too_few_calibration_images_for_a_held_out_measure(learned, tmp_path):
    result = run("finetune", learned["model"], "--plan", str(learned["plan"]), "--calib",
                 str(learned["calib"]), "--images", "1", "-o", str(tmp_path / "w.npz"))
    assert_error(result, "--images 1", "at least 8", "held out", command="finetune")
    folder = tmp_path / "three"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    result = run("finetune", learned["model"], "--plan", str(learned["plan"]), "--calib",
                 str(folder), "-o", str(tmp_path / "w.npz"))
    assert_error(result, str(folder), "3 image(s)", "at least 8", command="finetune")
    assert not (tmp_path / "w.npz").exists()


# -- 12. messages that must not mislead ------------------------------------------------------
def test_a_plan_enabling_no_site_says_so(exact, tmp_path):
    data = yaml.safe_load(exact["plan"].read_text())
    for site in data["sites"]:
        site["enabled"] = False
    plan = tmp_path / "off.yaml"
    plan.write_text(yaml.safe_dump(data, sort_keys=False))
    code, out, err = run("finetune", exact["model"], "--plan", str(plan), "-o",
                         str(tmp_path / "w.npz"), "--json")
    assert code == 0, err
    assert json.loads(out)["calibration"] == "none needed (no site is enabled)"
    assert "enables no site" in err and "exact sites only" not in out + err


@pytest.mark.parametrize("extra", [["-o", "new.yaml"], ["--policy", "keep-receptive-field"],
                                   ["--kinds", "branch"], ["--branch-widths", "paper"]])
def test_plan_check_refuses_options_it_would_ignore(exact, tmp_path, extra):
    assert_error(run("plan", exact["model"], "--check", str(exact["plan"]), *extra,
                     cwd=tmp_path), "--check", extra[0], command="plan")
    assert os.listdir(tmp_path) == []


def test_a_budget_with_select_all_is_refused(exact, tmp_path):
    for command in ("finetune", "eval", "bench"):
        assert_error(run(command, exact["model"], "--select", "all", "--budget", "0.3",
                         cwd=tmp_path), "--budget", "--select paying", command=command)
    assert os.listdir(tmp_path) == []


def test_the_api_checks_what_the_cli_parser_checks(tmp_path):
    """The typed args of flow, given values the CLI's parser refuses: a RebirthError naming
    the flag before any model is loaded (the model does not exist) or port is bound."""
    from tvm_rebirth import flow
    from tvm_rebirth.demo import run_demo
    from tvm_rebirth.deploy import device as devices
    from tvm_rebirth.errors import RebirthError

    missing = str(tmp_path / "missing.onnx")
    for changes, fragment in ((dict(max_tasks=0), "--max-tasks must be an integer of at least"),
                              (dict(build_timeout=float("inf")), "--build-timeout"),
                              (dict(trials=float("nan")), "--trials must be an integer"),
                              (dict(trials=2.5), "--trials must be an integer")):
        with pytest.raises(RebirthError, match=fragment):
            flow.tune(flow.TuneArgs(model=missing, **{"trials": 4, **changes}))
    with pytest.raises(RebirthError, match=r"--session-timeout \(seconds\) must be a finite"):
        flow.bench(flow.BenchArgs(model=missing, session_timeout=float("nan")))
    with pytest.raises(RebirthError, match="--budget is the accuracy budget"):
        flow.RebirthOptions(select="all", budget=0.3).check()
    for options, fragment in ((dict(seed=1.5), "--seed must be an integer"),
                              (dict(seed=True), "--seed must be an integer"),
                              (dict(distill_epochs=float("nan")), "--distill-epochs"),
                              (dict(budget=float("nan")), "--budget must be a finite number"),
                              (dict(kinds=("stream",)), r"unknown site kind\(s\)"),
                              (dict(e2e=flow.E2EOptions(True, 64, 2.5)), "--e2e-epochs")):
        with pytest.raises(RebirthError, match=fragment):
            flow.RebirthOptions(**options).check()
    with pytest.raises(RebirthError, match="--budget must be a finite number at least 0"):
        flow.plan_command(flow.PlanArgs(model=missing, selection=flow.SelectOptions(
            budget=-1.0)))
    with pytest.raises(RebirthError, match=r"--kinds: unknown site kind\(s\) \['stream'\]"):
        flow.select_plan(None, flow.SelectOptions(), kinds=("stream",))
    for kwargs, flag in ((dict(rounds=0), "--rounds"), (dict(images=0), "--images"),
                         (dict(eval_limit=-5), "--eval-limit")):
        with pytest.raises(RebirthError, match=f"{flag} must be an integer of at least 1"):
            run_demo(tmp_path / "demo", **kwargs)
    assert not (tmp_path / "demo").exists()
    with pytest.raises(RebirthError, match="device action 'strat'"):
        flow.device(flow.DeviceArgs(action="strat"))
    for port in (70000, 65530):
        with pytest.raises(RebirthError, match=f"--port {port}: use 1 to 65525"):
            devices.start(port=port)
    with pytest.raises(RebirthError, match="no free port on 127.0.0.1 in 65500..65535"):
        _no_free_port(devices, 65500)


def _no_free_port(devices, start):
    """``free_port`` from ``start`` with every port taken: it stops at 65535."""
    import socket as sockets

    taken = []
    try:
        for port in range(start, 65536):
            sock = sockets.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            taken.append(sock)
        return devices.free_port(start)
    finally:
        for sock in taken:
            sock.close()


def test_branch_widths_must_be_named_or_a_fraction(exact, tmp_path):
    for bad in ("1.5", "wide"):
        assert_error(run("plan", exact["model"], "--select", "all", "--branch-widths", bad,
                         "-o", "p.yaml", cwd=tmp_path), "--branch-widths", bad,
                     "fraction of carry", command="plan")
    assert os.listdir(tmp_path) == []


def test_a_folder_named_like_a_zoo_model_does_not_shadow_it(tmp_path):
    (tmp_path / "fmnist-inception").mkdir()
    code, out, err = run("plan", "fmnist-inception", "--select", "all", "--json", "-o",
                         "fmnist-inception/p.yaml", cwd=tmp_path)
    assert code == 0, err
    assert json.loads(out)["model"] == "fmnist-inception"
    assert "folder, not a model file; using the zoo model 'fmnist-inception'" in err
    assert (tmp_path / "fmnist-inception" / "p.yaml").is_file()
    (tmp_path / "mine").mkdir()
    assert_error(run("plan", "mine", "--select", "all", cwd=tmp_path), "mine: is a directory", command="plan")


def test_bench_of_a_user_model_compares_on_its_calibration_images(learned, tmp_path):
    calib = tmp_path / "other.npy"  # inputs unlike the seeded noise fallback
    np.save(calib, 0.1 * np.random.default_rng(7).random((4, 3, 32, 32), np.float32))
    args = ("bench", learned["model"], "--plan", str(learned["plan"]), "--weights",
            str(learned["weights"]), "--rounds", "1", "--json")
    code, out, err = run(*args, "--calib", str(calib))
    assert code == 0, err
    with_calib = json.loads(out)
    assert with_calib["input"] == f"the first image of {calib}"
    code, out, err = run(*args)
    assert code == 0, err
    assert json.loads(out)["input"].startswith("seeded standard-normal input")
    assert with_calib["max_abs_err"] != json.loads(out)["max_abs_err"]


def test_bench_writes_its_report_file(learned, tmp_path):
    report = tmp_path / f"{uuid.uuid4().hex}.json"
    code, out, err = run("bench", learned["model"], "--plan", str(learned["plan"]), "--weights",
                         str(learned["weights"]), "--rounds", "1", "--json", "-o", str(report))
    assert code == 0, err
    assert json.loads(report.read_text()) == json.loads(out)
    assert no_temporary_files(tmp_path)
