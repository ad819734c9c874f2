"""Layer-wise fitting of rebirth convolutions."""

import numpy as np
import pytest

from tvm_rebirth.learn.fit import activate, conv_forward, fit_rebirth_conv, im2col
from tvm_rebirth.passes.site import ConvSpec
from onnx_models import GraphMaker

RNG = np.random.default_rng(0)


def _problem(groups=1, stride=2):
    spec = ConvSpec("c", 8, 16, [3, 3], [stride, stride], [1, 1, 0, 0], groups=groups)
    x = RNG.standard_normal((24, 8, 15, 15)).astype("float32")
    w = RNG.standard_normal((16, 8 // groups, 3, 3)).astype("float32")
    b = RNG.standard_normal(16).astype("float32")
    return spec, x, w, b


@pytest.mark.parametrize("groups", [1, 2])
def test_least_squares_recovers_a_realisable_conv(groups):
    spec, x, w, b = _problem(groups)
    result = fit_rebirth_conv(x, conv_forward(x, w, b, spec), spec, relu=False, ridge=1e-9)
    assert result.rel_error < 1e-5
    np.testing.assert_allclose(result.weight, w, atol=1e-3)
    np.testing.assert_allclose(result.bias, b, atol=1e-3)


def test_relu_refinement_improves_on_the_closed_form():
    spec, x, w, b = _problem()
    y = np.maximum(conv_forward(x, w, b, spec), 0)
    result = fit_rebirth_conv(x, y, spec, relu=True, ridge=1e-9, steps=30)
    assert result.rel_error < 0.5 * result.rel_error_closed_form
    assert result.rel_error < 0.05


def test_over_relaxed_refinement_matches_twice_as_many_plain_steps():
    spec, x, w, b = _problem()
    noise = 0.3 * RNG.standard_normal((24, 16, 7, 7)).astype("float32")
    y = np.maximum(conv_forward(x, w, b, spec) + noise, 0)  # not realisable: a real fit
    refined = fit_rebirth_conv(x, y, spec, relu=True, steps=6)
    plain = {steps: fit_rebirth_conv(x, y, spec, relu=True, steps=steps,
                                     over_relaxation=1.0).rel_error for steps in (6, 12)}
    assert plain[12] < refined.rel_error_closed_form
    assert refined.rel_error <= 1.02 * plain[12] and refined.rel_error < 0.7 * plain[6]
    # a step that raises the error is undone: a diverging factor still ends below the start
    diverging = fit_rebirth_conv(x, y, spec, relu=True, steps=6, over_relaxation=4.0)
    assert diverging.rel_error < diverging.rel_error_closed_form


def test_fit_rejects_a_spec_that_does_not_produce_the_target_shape():
    spec, x, w, b = _problem()
    y = conv_forward(x, w, b, spec)
    wrong = ConvSpec("c", 8, 16, [3, 3], [1, 1], [1, 1, 1, 1])
    with pytest.raises(ValueError, match="gives 15x15, the target is 7x7"):
        fit_rebirth_conv(x, y, wrong)


def test_im2col_matches_a_direct_convolution():
    x = RNG.standard_normal((2, 3, 9, 9)).astype("float32")
    w = RNG.standard_normal((4, 3, 3, 3)).astype("float32")
    cols, (ho, wo) = im2col(x, [3, 3], [2, 2], [1, 1, 1, 1])
    out = (cols @ w.reshape(4, -1).T).reshape(2, ho, wo, 4).transpose(0, 3, 1, 2)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    direct = np.zeros_like(out)
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            direct[:, :, i, j] = np.einsum("nchw,ochw->no", patch, w)
    np.testing.assert_allclose(out, direct, rtol=1e-5, atol=1e-5)


def test_a_leaky_activation_is_fitted_through_its_inverse():
    """PReLU slopes per channel: the pre-activation target Y / slope (Y < 0) is linear in
    the patches, so the fit through the activation recovers the conv; fitting Y as if
    nothing followed the conv leaves a large error once the activation is applied."""
    spec, x, w, b = _problem()
    slope = RNG.uniform(0.05, 0.3, 16).astype("float32")
    y = activate(conv_forward(x, w, b, spec), slope=slope)
    result = fit_rebirth_conv(x, y, spec, relu=False, ridge=1e-9, slope=slope)
    assert result.rel_error < 1e-4
    np.testing.assert_allclose(result.weight, w, atol=1e-3)
    linear = fit_rebirth_conv(x, y, spec, relu=False, ridge=1e-9)
    through = activate(conv_forward(x, linear.weight, linear.bias, spec), slope=slope)
    assert np.linalg.norm(through - y) > 0.05 * np.linalg.norm(y)


def test_finetune_fits_a_prelu_site_through_its_activation(tmp_path):
    """conv -> PRelu -> BatchNorm (positive scale, no shift): one conv + the same PReLU
    reproduces it exactly, and the fine-tuned rebirth model does (the slopes come from the
    model's PRelu)."""
    from onnx import helper

    from tvm_rebirth import flow
    from tvm_rebirth.compile.build import Runner
    from tvm_rebirth.learn.finetune import finetune

    g = GraphMaker((1, 3, 16, 16))
    x = g.conv("data", "conv1", 8)
    slope = g._const("act1_slope", g.rng.uniform(0.05, 0.3, (8, 1, 1)))
    g.nodes.append(helper.make_node("PRelu", [x, slope], ["act1"], name="act1"))
    g.channels["act1"] = 8
    stats = [g._const(f"bn1_{t}", v) for t, v in [
        ("s", g.rng.uniform(0.5, 1.5, 8)), ("b", np.zeros(8)), ("m", np.zeros(8)),
        ("v", g.rng.uniform(0.5, 1.5, 8))]]
    g.nodes.append(helper.make_node("BatchNormalization", ["act1"] + stats, ["bn1"],
                                    name="bn1", epsilon=1e-5))
    g.channels["bn1"] = 8
    model = flow.load(g.save(tmp_path / "prelu_bn.onnx", [g.conv("bn1", "tail", 4, k=1)]))
    plan = flow.find_plan(model)
    assert [s.ops for s in plan.sites] == [["conv2d", "prelu", "batch_norm"]]
    images = RNG.standard_normal((64, 3, 16, 16)).astype("float32")
    weights, report = finetune(model, plan, images, reconstruct_epochs=0)
    assert report["sites"][0]["rel_error"] < 1e-2  # the ridge term: ~1e-3
    slim = Runner(flow.slim(model, plan, weights))
    original = Runner(model.mod)
    for image in images[:4]:
        want = original(image[None])[0]
        np.testing.assert_allclose(slim(image[None])[0], want, atol=1e-2 * np.abs(want).max())
