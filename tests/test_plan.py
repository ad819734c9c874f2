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
    def into_1x1(d):
        site = next(s for s in d["sites"] if s["id"] == "inception_3a/output")
        site["absorb"] = {"pool_branch": "inception_3a/pool_proj",
                          "pool_into": "inception_3a/1x1"}
    edit(plan_file, into_1x1)
    with pytest.raises(RebirthError, match="'inception_3a/output': absorbing conv "
                                           "'inception_3a/1x1' has kernel \\[1, 1\\], smaller "
                                           "than the 3x3 pool window"):
        RebirthPlan.load(plan_file).validate(googlenet)


def _branch_edit(site_id, change):
    def apply(d):
        change(next(s for s in d["sites"] if s["id"] == site_id))
    return apply


def _conv(site, name):
    return next(c for c in site["new_conv"] if c["replaces"] == name)


@pytest.mark.parametrize("change, message", [
    (lambda s: _conv(s, "inception_3a/5x5").update(kernel=[7, 7], padding=[3, 3, 3, 3]),
     "keeps kernel, stride, padding"),
    (lambda s: _conv(s, "inception_3a/3x3").update(out_channels=128),
     "out_channels must be 64\\+128=192"),
    (lambda s: _conv(s, "inception_3a/3x3_reduce").update(out_channels=48),
     "'inception_3a/3x3': in_channels must be 48"),
    (lambda s: s["absorb"].update(pool_into="inception_3a/3x3"), "merged twice|must list"),
    (lambda s: s["absorb"].update(one_by_one_into="inception_3a/5x5_reduce"),
     "not the last conv of a branch"),
    (lambda s: s.update(exact=True), "exact must be false"),
])
def test_bad_branch_edits(googlenet, plan_file, change, message):
    edit(plan_file, _branch_edit("inception_3a/output", change))
    with pytest.raises(RebirthError, match=message) as err:
        RebirthPlan.load(plan_file).validate(googlenet)
    assert "inception_3a/output" in str(err.value) and "\n" not in str(err.value)


def test_thinning_a_reducer_is_a_valid_edit(googlenet, plan_file):
    def thin(site):
        _conv(site, "inception_3a/3x3_reduce")["out_channels"] = 48
        _conv(site, "inception_3a/3x3")["in_channels"] = 48
    edit(plan_file, _branch_edit("inception_3a/output", thin))
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
