"""The tvm-rebirth command line, run as a real subprocess."""

import json
import subprocess
import sys


from onnx_models import GraphMaker, inception_model


# a guard against hangs, not a speed bar: the demo test (planning GoogLeNet from an empty
# cache: its cost table and accuracy costs) shares CI's 2 cores with the other worker
CLI_TIMEOUT_S = 2400


def run(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "tvm_rebirth.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(code, stdout, stderr, *fragments):
    assert code == 2, (stdout, stderr)
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("tvm-rebirth plan: error: "), stderr
    for fragment in fragments:
        assert fragment in last, last
    assert stdout == ""


def test_models_json():
    code, out, _ = run("models", "--json")
    assert code == 0
    models = {m["name"]: m for m in json.loads(out)["models"]}
    for name in ["googlenet", "alexnet", "zfnet", "squeezenet", "resnet50", "vgg19",
                 "inception_v2"]:
        assert models[name]["input_shape"] == [1, 3, 224, 224]
        assert models[name]["source"].startswith("onnx wheel: light_")


def test_plan_alexnet_json_and_file(tmp_path):
    out_file = tmp_path / "alexnet.yaml"
    code, out, err = run("plan", "alexnet", "--select", "all", "--json", "-o", str(out_file))
    assert code == 0, err
    data = json.loads(out)
    assert [s["id"] for s in data["sites"]] == ["conv1+norm1+pool1", "conv2+norm2+pool2",
                                                "conv5+pool5"]
    assert all(s["kind"] == "streamline" and not s["exact"] for s in data["sites"])
    assert {"id", "kind", "exact", "ops", "new_conv"} <= set(data["sites"][0])
    assert out_file.exists() and data["plan"] == str(out_file)
    code, out, err = run("plan", "alexnet", "--check", str(out_file), "--json")
    assert code == 0, err
    assert json.loads(out)["valid"] is True


def test_plan_googlenet_table_and_kinds(tmp_path):
    code, out, err = run("plan", "googlenet", "--select", "all", "--kinds", "branch", cwd=tmp_path)
    assert code == 0, err
    assert "inception_3a/output" in out and "9 branch" in out and "0 streamline" in out
    assert (tmp_path / "googlenet.plan.yaml").exists()
    assert "[plan]" in err  # progress goes to stderr


def test_plan_of_a_user_onnx_file(tmp_path):
    path = inception_model(tmp_path / "inception.onnx")
    code, out, err = run("plan", path, "--select", "all", "--json", "-o", str(tmp_path / "p.yaml"),
                         "--policy", "keep-receptive-field")
    assert code == 0, err
    data = json.loads(out)
    assert data["model"] == "inception" and data["policy"] == "keep-receptive-field"
    assert data["counts"] == {"streamline": 1, "branch": 1}


def test_missing_model_file(tmp_path):
    result = run("plan", str(tmp_path / "nope.onnx"), "--select", "all", "-o", str(tmp_path / "p.yaml"))
    assert_one_line_error(*result, "nope.onnx", "no such file")
    assert not (tmp_path / "p.yaml").exists()


def test_unknown_zoo_name(tmp_path):
    assert_one_line_error(*run("plan", "googlenett", "--select", "all", "-o", str(tmp_path / "p.yaml")),
                          "unknown model 'googlenett'", "googlenet")


def test_corrupt_onnx_keeps_an_existing_plan_intact(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07not a protobuf at all" * 50)
    existing = tmp_path / "p.yaml"
    existing.write_text("precious: true\n")
    assert_one_line_error(*run("plan", str(bad), "--select", "all", "-o", str(existing)), "broken.onnx",
                          "not a readable ONNX model")
    assert existing.read_text() == "precious: true\n"


def test_an_op_the_importer_rejects(tmp_path):
    g = GraphMaker((1, 4, 8, 8))
    x = g.conv("data", "conv1", 4)
    from onnx import helper
    g.nodes.append(helper.make_node("MyCustomOp", [x], ["y"], name="custom"))
    path = g.save(tmp_path / "custom.onnx", ["y"])
    assert_one_line_error(*run("plan", path, "--select", "all", "-o", str(tmp_path / "p.yaml")), "custom.onnx",
                          "MyCustomOp")


def test_a_plan_for_a_different_model(tmp_path):
    plan = tmp_path / "alexnet.yaml"
    assert run("plan", "alexnet", "--select", "all", "-o", str(plan))[0] == 0
    other = inception_model(tmp_path / "inception.onnx")
    assert_one_line_error(*run("plan", other, "--check", str(plan)), "alexnet.yaml",
                          "made for model 'alexnet'")


def test_bad_kinds():
    assert_one_line_error(*run("plan", "alexnet", "--select", "all", "--kinds", "streamline,diagonal"),
                          "--kinds", "diagonal")


def test_bench_table_shows_rel_err_on_logits_and_tuned_functions(tmp_path):
    """bench's text table: the relative error of the logits (the input of the final softmax,
    whose saturated outputs say nothing) and how many functions came from tuning_logs."""
    import onnx
    from onnx import helper

    from onnx_models import chain_model

    path = chain_model(tmp_path / "net.onnx", ["batch_norm", "avg_pool2d"])  # exact: no fit
    model = onnx.load(path)
    tail = model.graph.output[0].name
    model.graph.node.append(helper.make_node("Softmax", [tail], ["prob"], name="prob", axis=1))
    model.graph.output[0].name = "prob"
    onnx.save(model, path)
    assert run("plan", path, "--select", "all", "-o", str(tmp_path / "p.yaml"))[0] == 0
    code, out, err = run("bench", path, "--plan", str(tmp_path / "p.yaml"), "--rounds", "1")
    assert code == 0, err
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    assert "tuned_functions (from tuning_logs)" in rows
    tuned = rows["tuned_functions (from tuning_logs)"].split()[-2:]
    assert all(t.count("/") == 1 and t.split("/")[1].isdigit() for t in tuned), tuned
    assert "rel_err (logits, vs original)" in rows
    assert float(rows["rel_err (logits, vs original)"].split()[-1]) < 1e-4  # an exact site


def test_target_help_lists_presets_tags_and_dicts():
    for command in ("build", "tune", "bench", "plan"):
        code, out, _ = run(command, "--help")
        text = " ".join(out.split())
        assert code == 0 and "cortex-a72" in text and "arm/rk3399" in text, command
        assert "tvm.target.list_tags()" in text and '{"kind": "llvm"' in text, command
    code, out, _ = run("plan", "--help")
    text = " ".join(out.split())
    assert "--select {all,paying}" in text and "measure on this target" in text


def test_the_cli_hides_torch():
    """tvm_ffi imports torch when installed (1.5 s per command): a tvm-rebirth process
    hides it (no command uses it); other programs are left alone."""
    from tvm_rebirth.startup import is_cli_process

    assert is_cli_process(["/usr/local/bin/tvm-rebirth"], ["python", "/usr/local/bin/tvm-rebirth"])
    assert is_cli_process(["-m"], ["python", "-m", "tvm_rebirth.cli", "bench"])
    assert not is_cli_process(["train.py"], ["python", "train.py"])
    assert not is_cli_process(["-c"], ["python", "-c", "import tvm_rebirth"])
    probe = "import sys, tvm_rebirth; print('torch' in sys.modules and sys.modules['torch'] is None)"
    hidden = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert hidden.stdout.strip() == "False"  # a Python program keeps torch
