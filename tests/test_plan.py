"""RebirthPlan YAML round trip and validation of user edits against the model."""

import pytest
import yaml

from tvm_rebirth import RebirthError, RebirthPlan, load_model

from onnx_models import inception_model


@pytest.fixture(scope="module")
def googlenet():
    return load_model("googlenet")


@pytest.fixture()
def plan_file(googlenet, tmp_path):
    path = tmp_path / "plan.yaml"
    RebirthPlan.from_model(googlenet).save(path)
    return path


def edit(path, change):
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_round_trip_keeps_content_and_hash(googlenet, plan_file):
    plan = RebirthPlan.from_model(googlenet)
    loaded = RebirthPlan.load(plan_file)
    assert loaded.to_dict() == plan.to_dict()
    assert loaded.sha256 == plan.sha256
    assert yaml.safe_load(plan_file.read_text())["format"] == "rebirth-plan/1"
    loaded.validate(googlenet)


def test_disabling_a_site_is_a_valid_edit_that_changes_the_hash(googlenet, plan_file):
    before = RebirthPlan.load(plan_file).sha256
    edit(plan_file, lambda d: d["sites"][0].update(enabled=False))
    plan = RebirthPlan.load(plan_file)
    plan.validate(googlenet)
    assert plan.sha256 != before
    assert plan.sites[0].id not in [s.id for s in plan.enabled_sites()]


def test_growing_a_kernel_with_matching_padding_is_valid(googlenet, plan_file):
    def grow(d):
        d["sites"][0]["new_conv"][0].update(kernel=[11, 11], padding=[3, 3, 0, 0])
    edit(plan_file, grow)
    RebirthPlan.load(plan_file).validate(googlenet)


SITE1 = "conv1/7x7_s2+pool1/3x3_s2+pool1/norm1"


@pytest.mark.parametrize("change, message", [
    (lambda d: d["sites"][0]["new_conv"][0].update(stride=[2, 2]), "stride must be"),
    (lambda d: d["sites"][0]["new_conv"][0].update(padding=[3, 3, 3, 3]), "gives 56x56, the block gives 55x55"),
    (lambda d: d["sites"][0]["new_conv"][0].update(out_channels=32), "out_channels must stay"),
    (lambda d: d["sites"][0]["new_conv"][0].update(kernel=[0, 7]), "kernel and stride"),
    (lambda d: d["sites"][0].update(ops=["conv2d", "max_pool2d"]), "differ from the model"),
    (lambda d: d["sites"][0].update(enabled="yes"), "enabled must be"),
    (lambda d: d["sites"][0].update(exact=True), "nonlinearity inside"),
])
def test_bad_edits_name_the_site(googlenet, plan_file, change, message):
    edit(plan_file, change)
    with pytest.raises(RebirthError, match=message) as err:
        RebirthPlan.load(plan_file).validate(googlenet)
    assert SITE1 in str(err.value) and str(plan_file.name) in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_site_id(googlenet, plan_file):
    edit(plan_file, lambda d: d["sites"][1].update(id="conv9/9x9+pool9"))
    with pytest.raises(RebirthError, match="site 'conv9/9x9\\+pool9' does not exist"):
        RebirthPlan.load(plan_file).validate(googlenet)


def test_absorbing_kernel_smaller_than_the_pool_window(googlenet, plan_file):
    def shrink(d):
        site = next(s for s in d["sites"] if s["id"] == "inception_3a/output")
        conv = next(c for c in site["new_conv"] if c["replaces"] == "inception_3a/5x5")
        conv.update(kernel=[1, 1], padding=[0, 0, 0, 0])
    edit(plan_file, shrink)
    with pytest.raises(RebirthError, match="smaller than the 3x3 pool window"):
        RebirthPlan.load(plan_file).validate(googlenet)


def test_plan_for_a_different_model(plan_file, tmp_path):
    other = load_model(inception_model(tmp_path / "inc.onnx"))
    with pytest.raises(RebirthError, match="made for model 'googlenet'"):
        RebirthPlan.load(plan_file).validate(other)


@pytest.mark.parametrize("text, message", [
    ("sites: [\n", "not valid YAML at line"),
    ("format: something-else\n", "not a tvm-rebirth plan"),
    ("just a string\n", "not a tvm-rebirth plan"),
])
def test_unreadable_plan_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RebirthError, match=message):
        RebirthPlan.load(path)


def test_missing_plan_file(tmp_path):
    with pytest.raises(RebirthError, match="no such plan file"):
        RebirthPlan.load(tmp_path / "nope.yaml")
