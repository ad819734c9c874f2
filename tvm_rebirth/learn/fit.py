"""Layer-wise fitting of a rebirth convolution from captured activations.

``fit_rebirth_conv`` solves   min_W,b || act(conv(X; W, b)) - Y ||^2
first in closed form (ridge least squares on im2col patches, the target taken as the
pre-activation), then refines the true objective through the ReLU by over-relaxed
alternating least squares (deterministic; the normal equations are factored once). A leaky
activation (PReLU, LeakyReLU: a negative slope per channel) is inverted instead: its
pre-activation target is Y / slope where Y < 0.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from scipy.linalg import cho_factor, cho_solve

# bump when a change makes the fits return other weights (keys the planner's accuracy cache)
FIT_VERSION = 2  # 2: over-relaxed ReLU refinement

# Alternating least squares converges linearly; over-relaxed steps (w + 1.8 (w_ls - w)) reach
# in 6 steps the error plain steps reach in 12, to 0.7 % on GoogLeNet's branch merges
# (benchmarks/fit_speed.py); 2.5 diverges
OVER_RELAXATION = 1.8


def im2col(x, kernel, stride, padding):
    """Patches of x [N, C, H, W]: array [N * Ho * Wo, C * kh * kw] (channel-major like OIHW)."""
    n, c, h, w = x.shape
    kh, kw = kernel
    sh, sw = stride
    pt, pl, pb, pr = padding
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    ho = (h + pt + pb - kh) // sh + 1
    wo = (w + pl + pr - kw) // sw + 1
    cols = np.empty((n, c, kh, kw, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i: i + sh * (ho - 1) + 1: sh, j: j + sw * (wo - 1) + 1: sw]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * ho * wo, c * kh * kw), (ho, wo)


def patches_at(x, kernel, stride, padding, rows):
    """The im2col rows ``rows`` (flat indices into [N, Ho, Wo]) only: what a subsampled
    fit needs, without building every patch."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (pt, pl, pb, pr) = kernel, stride, padding
    ho = (h + pt + pb - kh) // sh + 1
    wo = (w + pl + pr - kw) // sw + 1
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    img, pos = np.divmod(rows, ho * wo)
    top, left = np.divmod(pos, wo)
    top, left = top * sh, left * sw
    cols = np.empty((len(rows), c, kh, kw), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[img, :, top + i, left + j]
    return cols.reshape(len(rows), c * kh * kw)


def conv_forward(x, weight, bias, spec, chunk=16):
    """Reference NCHW convolution (numpy) with a ConvSpec's stride/padding/groups."""
    if len(x) > chunk:  # bounded im2col memory
        return np.concatenate([conv_forward(x[i:i + chunk], weight, bias, spec, chunk)
                               for i in range(0, len(x), chunk)])
    g = spec.groups
    n = x.shape[0]
    cin_g, cout_g = x.shape[1] // g, weight.shape[0] // g
    outs = []
    for gi in range(g):
        cols, (ho, wo) = im2col(x[:, gi * cin_g:(gi + 1) * cin_g], spec.kernel, spec.stride,
                                spec.padding)
        w = weight[gi * cout_g:(gi + 1) * cout_g].reshape(cout_g, -1)
        outs.append((cols @ w.T + bias[gi * cout_g:(gi + 1) * cout_g]).reshape(n, ho, wo, cout_g))
    return np.concatenate(outs, axis=3).transpose(0, 3, 1, 2)


@dataclasses.dataclass
class FitResult:
    weight: np.ndarray  # OIHW float32
    bias: np.ndarray
    rel_error: float  # || act(conv(X)) - Y || / || Y || on the fitted patches
    rel_error_closed_form: float
    seconds: float


def activate(z, relu=False, slope=None, axis=1):
    """The activation a rebirth conv re-applies: a leaky one (``slope``: the negative slope
    of each channel, on ``axis`` of ``z``; PReLU, LeakyReLU), else ReLU when ``relu``, else
    none."""
    if slope is not None:
        shape = [1] * z.ndim
        shape[axis] = -1
        return np.where(z > 0, z, z * np.asarray(slope, z.dtype).reshape(shape))
    return np.maximum(z, 0) if relu else z


def _pre_activation(target, slope):
    """The leaky activation's inverse where it has one (a positive slope): the conv output
    that gives ``target`` (rows x channels)."""
    inverse = np.where(slope > 0, 1.0 / np.where(slope > 0, slope, 1.0), 1.0).astype(np.float32)
    return np.where(target > 0, target, target * inverse)


def relative_error(pred, target) -> float:
    """|| pred - target || / || target ||, the measure of ``FitResult.rel_error`` (which the fit
    sums per group instead)."""
    return float(np.linalg.norm(pred - target) / max(np.linalg.norm(target), 1e-12))


def fit_rebirth_conv(x, y, spec, relu=True, ridge=1e-3, steps=6,
                     max_rows_per_column=16, slope=None, over_relaxation=None) -> FitResult:
    """Fit the conv ``spec`` so that act(conv(x)) reproduces y (x: [N,C,H,W], y: [N,O,Ho,Wo]);
    act is ReLU (``relu``), leaky with ``slope`` per output channel, or none. A ReLU fit is
    refined in ``steps`` steps over-relaxed by ``over_relaxation`` (default
    ``OVER_RELAXATION``; 1.0: plain alternating least squares)."""
    start = time.time()
    x = np.ascontiguousarray(x, np.float32)
    y = np.ascontiguousarray(y, np.float32)
    g = spec.groups
    cin_g, cout_g = x.shape[1] // g, y.shape[1] // g
    weight = np.zeros((spec.out_channels, cin_g, *spec.kernel), np.float32)
    bias = np.zeros(spec.out_channels, np.float32)
    sq_closed = sq_refined = norm = 0.0
    ho, wo = spec.output_hw(x.shape[2:])
    if (ho, wo) != tuple(y.shape[2:]):
        raise ValueError(f"conv {spec.describe()} gives {ho}x{wo}, the target is "
                         f"{y.shape[2]}x{y.shape[3]}")
    total = len(x) * ho * wo
    for gi in range(g):
        xg = x[:, gi * cin_g:(gi + 1) * cin_g]
        target = y[:, gi * cout_g:(gi + 1) * cout_g].transpose(0, 2, 3, 1).reshape(-1, cout_g)
        unknowns = cin_g * spec.kernel[0] * spec.kernel[1]
        if total > max_rows_per_column * unknowns:
            # far more patches than unknowns: a seeded subsample fits as well, much faster
            keep = np.sort(np.random.default_rng(gi).choice(
                total, size=max_rows_per_column * unknowns, replace=False))
            cols, target = patches_at(xg, spec.kernel, spec.stride, spec.padding, keep), \
                target[keep]
        else:
            cols, _ = im2col(xg, spec.kernel, spec.stride, spec.padding)
        out = slice(gi * cout_g, (gi + 1) * cout_g)
        group_slope = None if slope is None else np.asarray(slope, np.float32)[out]

        def act(z):
            return activate(z, relu, group_slope, axis=-1)

        w, b, chol = _ridge(cols, target, ridge)
        if group_slope is not None:  # the inverted target, for the channels it fits better
            wi, bi = _solve(chol, cols, _pre_activation(target, group_slope))
            better = (np.sum((act(cols @ wi + bi) - target) ** 2, axis=0)
                      < np.sum((act(cols @ w + b) - target) ** 2, axis=0))
            w[:, better], b[better] = wi[:, better], bi[better]
        z = cols @ w + b
        closed = _squared_error(act(z), target)
        sq_closed += closed
        if relu and slope is None and steps:  # the best iterate: never worse than closed
            w, b, closed = _refine_relu(
                cols, target, w, b, z, closed, chol, steps,
                OVER_RELAXATION if over_relaxation is None else over_relaxation)
        sq_refined += closed
        norm += float(np.sum(target.astype(np.float64) ** 2))
        weight[out] = w.T.reshape(cout_g, cin_g, *spec.kernel)
        bias[out] = b
    closed_err = (sq_closed / max(norm, 1e-12)) ** 0.5
    err = (sq_refined / max(norm, 1e-12)) ** 0.5
    return FitResult(weight=weight, bias=bias, rel_error=err, rel_error_closed_form=closed_err,
                     seconds=time.time() - start)


def _normal_equations(cols, target, ridge):
    """Cholesky factor of A^T A (+ ridge) for A = [cols, 1]: float32 products accumulated in
    float64 blocks (float32 BLAS is twice as fast and the blocks keep the sums accurate)."""
    k = cols.shape[1]
    gram = np.zeros((k + 1, k + 1))
    for i in range(0, len(cols), 16384):
        a = cols[i:i + 16384]
        gram[:k, :k] += a.T @ a
        s = a.sum(axis=0)
        gram[:k, k] += s
        gram[k, :k] += s
        gram[k, k] += len(a)
    scale = np.trace(gram[:k, :k]) / max(k, 1)
    gram[:k, :k] += ridge * scale * np.eye(k)
    return cho_factor(gram, check_finite=False)


def _solve(chol, cols, target):
    k = cols.shape[1]
    rhs = np.zeros((k + 1, target.shape[1]))
    for i in range(0, len(cols), 16384):
        a = cols[i:i + 16384]
        t = target[i:i + 16384].astype(np.float32)
        rhs[:k] += a.T @ t
        rhs[k] += t.sum(axis=0)
    solution = cho_solve(chol, rhs, check_finite=False)
    return solution[:k].astype(np.float32), solution[k].astype(np.float32)


def _ridge(cols, target, ridge):
    """Closed form: [W; b] = (A^T A + lambda I)^-1 A^T Y, plus the factor for reuse."""
    chol = _normal_equations(cols, target, ridge)
    w, b = _solve(chol, cols, target)
    return w, b, chol


def _squared_error(pred, target) -> float:
    return float(np.sum(np.square(pred - target), dtype=np.float64))


def _refine_relu(cols, target, w, b, z, error, chol, iterations, over_relaxation):
    """Alternating least squares through the ReLU from ``w``, ``b`` (``z`` = A w + b, its
    squared ``error``): where the target is 0 the pre-activation only has to be <= 0, so it
    is replaced by min(current, 0) and the same normal equations are solved again (a plain
    step cannot increase || relu(A w) - Y ||). Steps are over-relaxed
    (w + omega (w_ls - w)); one that raises the error is undone, and the remaining steps are
    plain. Returns the best iterate and its squared error: (w, b, error)."""
    positive = target > 0
    omega = over_relaxation
    best = (w, b, z, error)
    for _ in range(iterations):
        w_ls, b_ls = _solve(chol, cols, np.where(positive, target, np.minimum(z, 0)))
        w, b = w + omega * (w_ls - w), b + omega * (b_ls - b)
        z = cols @ w + b
        error = _squared_error(np.maximum(z, 0), target)
        if error > best[3]:
            w, b, z, error = best
            omega = 1.0
        else:
            best = (w, b, z, error)
    return best[0], best[1], best[3]


def pool_forward(x, kind, pool_size, strides, padding, ceil_mode=False,
                 count_include_pad=False):
    """Reference NCHW max/avg pool with Relax's attributes (padding [t, l, b, r])."""
    kh, kw = pool_size
    sh, sw = strides
    pt, pl, pb, pr = padding
    n, c, h, w = x.shape

    def out_size(size, k, s, p0, p1):
        span = size + p0 + p1 - k
        return (-(-span // s) if ceil_mode else span // s) + 1

    ho, wo = out_size(h, kh, sh, pt, pb), out_size(w, kw, sw, pl, pr)
    # extra bottom/right room for ceil mode windows
    eh = max((ho - 1) * sh + kh - (h + pt + pb), 0)
    ew = max((wo - 1) * sw + kw - (w + pl + pr), 0)
    fill = -np.inf if kind == "max_pool2d" else 0.0
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb + eh), (pl, pr + ew)), constant_values=fill)
    ones = np.pad(np.ones((1, 1, h, w), x.dtype), ((0, 0), (0, 0), (pt, pb + eh), (pl, pr + ew)))
    inside = np.pad(np.ones((1, 1, h + pt + pb, w + pl + pr), x.dtype),
                    ((0, 0), (0, 0), (0, eh), (0, ew)))
    acc = np.full((n, c, ho, wo), fill, np.float32)
    count = np.zeros((1, 1, ho, wo), np.float32)
    for i in range(kh):
        for j in range(kw):
            window = xp[:, :, i: i + sh * (ho - 1) + 1: sh, j: j + sw * (wo - 1) + 1: sw]
            if kind == "max_pool2d":
                acc = np.maximum(acc, window)
            else:
                acc = acc + window
                mask = inside if count_include_pad else ones
                count += mask[:, :, i: i + sh * (ho - 1) + 1: sh, j: j + sw * (wo - 1) + 1: sw]
    return acc if kind == "max_pool2d" else acc / np.maximum(count, 1)
