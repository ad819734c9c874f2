"""Layer-wise fitting of rebirth convolutions."""

import numpy as np
import pytest

from tvm_rebirth.learn.fit import conv_forward, fit_rebirth_conv, im2col
from tvm_rebirth.passes.site import ConvSpec

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
