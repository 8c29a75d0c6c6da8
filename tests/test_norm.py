"""Batch-norm kernels (fanin.kernels.norm) against their NumPy twin: the formulas written out with NumPy."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fanin import Tensor, ops
from fanin.kernels import norm


def bn_twin(x, gamma, beta, g, training, mean=None, var=None, eps=1e-5):
    """(out, dx, dgamma, dbeta) in float64: batch statistics in training, the given ones in evaluation."""
    x, g = x.astype(np.float64), g.astype(np.float64)
    gamma, beta = gamma.astype(np.float64), beta.astype(np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    shape = [1] * x.ndim
    shape[1] = x.shape[1]
    if training:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    inv = (1 / np.sqrt(var + eps)).reshape(shape)
    xhat = (x - mean.reshape(shape)) * inv
    out = xhat * gamma.reshape(shape) + beta.reshape(shape)
    gxhat = g * gamma.reshape(shape)
    if training:
        n = x.size // x.shape[1]
        dx = inv / n * (n * gxhat - gxhat.sum(axis=axes).reshape(shape)
                        - xhat * (gxhat * xhat).sum(axis=axes).reshape(shape))
    else:
        dx = gxhat * inv
    return out, dx, (g * xhat).sum(axis=axes), g.sum(axis=axes)


def _case(rng, shape, dtype):
    c = shape[1]
    x = (rng.standard_normal(shape) * rng.uniform(0.1, 5) + rng.uniform(-3, 3)).astype(dtype)
    return x, rng.uniform(0.5, 2, c).astype(dtype), rng.standard_normal(c).astype(dtype), \
        rng.standard_normal(shape).astype(dtype)


shapes = st.one_of(
    st.tuples(st.integers(2, 6), st.integers(1, 5)),  # BatchNorm1d
    st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 6), st.integers(1, 6)),  # BatchNorm2d
    st.tuples(st.integers(2, 9), st.integers(250, 600)),  # 1-D with more channels than one block (norm.CB)
)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, training=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 10_000))
def test_batch_norm_op_matches_the_numpy_twin(shape, training, dtype, seed):
    if training and np.prod(shape) // shape[1] < 2:
        return
    rng = np.random.default_rng(seed)
    x, gamma, beta, g = _case(rng, shape, dtype)
    rm, rv = rng.standard_normal(shape[1]).astype(dtype), rng.uniform(0.5, 2, shape[1]).astype(dtype)
    xt, gt, bt = Tensor(x, requires_grad=True), Tensor(gamma, requires_grad=True), Tensor(beta, requires_grad=True)
    out = ops.batch_norm(xt, gt, bt, rm.copy(), rv.copy(), training)
    out.backward(g)
    ref = bn_twin(x, gamma, beta, g, training, rm.astype(np.float64), rv.astype(np.float64))
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    assert out.data.dtype == dtype and xt.grad.dtype == dtype and gt.grad.dtype == dtype
    scale = max(1.0, float(np.abs(g).sum(axis=0).max()))  # the parameter gradients are sums over the batch
    np.testing.assert_allclose(out.data, ref[0], **tol)
    # dx = gamma inv (g - mean(g) - xhat mean(g xhat)) cancels (to exactly 0 for two samples a channel): its
    # rounding error is relative to gamma inv |g|, not to dx
    var = x.astype(np.float64).var(axis=(0,) + tuple(range(2, x.ndim))) if training else rv.astype(np.float64)
    dx_scale = max(1.0, float(np.max(np.abs(gamma) / np.sqrt(var + 1e-5)) * np.abs(g).max()))
    np.testing.assert_allclose(xt.grad / dx_scale, ref[1] / dx_scale, **tol)
    np.testing.assert_allclose(gt.grad / scale, ref[2] / scale, **tol)
    np.testing.assert_allclose(bt.grad / scale, ref[3] / scale, **tol)


@pytest.mark.parametrize("shape", [(64, 300), (16, 3, 40, 40)])
def test_parallel_and_serial_twins_give_the_same_bits(shape):
    rng = np.random.default_rng(1)
    x, gamma, beta, g = _case(rng, shape, np.float32)
    x3 = x.reshape(shape[0], shape[1], -1)
    rows = x3.shape[2] == 1
    args2 = (lambda a: a[:, :, 0]) if rows else (lambda a: a)
    results = []
    for k in (0, 1):
        stats = (norm._stats_rows if rows else norm._stats)[k]
        apply = (norm._apply_rows if rows else norm._apply)[k]
        sums = (norm._sums_rows if rows else norm._sums)[k]
        grad = (norm._grad_input_rows if rows else norm._grad_input)[k]
        mean, var = np.empty(shape[1]), np.empty(shape[1])
        stats(args2(x3), mean, var)
        inv = (1 / np.sqrt(var + 1e-5)).astype(np.float32)
        out = np.empty_like(x3)
        apply(args2(x3), mean, inv, gamma, beta, args2(out))
        sg, sgx = np.empty(shape[1]), np.empty(shape[1])
        g3 = g.reshape(x3.shape)
        sums(args2(x3), mean, inv, args2(g3), sg, sgx)
        dx = np.empty_like(x3)
        grad(args2(x3), mean, inv, gamma, args2(g3), sg, sgx, True, args2(dx))
        results.append((mean, var, out, sg, sgx, dx))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_statistics_of_a_large_offset_keep_float64_accuracy():
    # float32 values around 1e4 with a spread of 1e-1: the variance from float64 sums of squared deviations
    rng = np.random.default_rng(2)
    x = (1e4 + 0.1 * rng.standard_normal((256, 3, 8, 8))).astype(np.float32)
    mean, var = norm.batch_stats(x)
    ref = x.astype(np.float64)
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(var, ref.var(axis=(0, 2, 3)), rtol=1e-9)


def test_non_contiguous_input_and_gradient():
    rng = np.random.default_rng(3)
    x, gamma, beta, g = _case(rng, (4, 3, 5, 6), np.float64)
    xs = np.asfortranarray(x)
    gs = np.asfortranarray(g)
    mean, var = norm.batch_stats(xs)
    inv = 1 / np.sqrt(var + 1e-5)
    out = norm.bn_forward(xs, mean, inv, gamma, beta)
    dx, dgamma, dbeta = norm.bn_backward(xs, mean, inv, gamma, gs, True)
    ref = bn_twin(x, gamma, beta, g, True)
    np.testing.assert_allclose(out, ref[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, ref[1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dgamma, ref[2], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dbeta, ref[3], rtol=1e-10, atol=1e-12)
