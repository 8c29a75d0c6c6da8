"""Pooling kernels against NumPy loop twins."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fanin import Tensor, no_grad, ops


def max_pool_twin(x, k, s, p):
    b, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=-np.inf)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    out = np.empty((b, c, ho, wo), x.dtype)
    dx = np.zeros_like(xp)
    for i in range(ho):
        for j in range(wo):
            win = xp[:, :, i * s:i * s + k, j * s:j * s + k].reshape(b, c, -1)
            out[:, :, i, j] = win.max(-1)
            a = win.argmax(-1)
            for n in range(b):
                for ch in range(c):
                    dx[n, ch, i * s + a[n, ch] // k, j * s + a[n, ch] % k] += 1.0
    return out, dx[:, :, p:p + h, p:p + w]


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), c=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), k=st.integers(1, 3),
       s=st.integers(1, 3), p=st.integers(0, 1), seed=st.integers(0, 999), ties=st.booleans())
def test_max_pool_matches_twin(b, c, h, w, k, s, p, seed, ties):
    if p > k // 2 or h + 2 * p < k or w + 2 * p < k:
        return
    rng = np.random.default_rng(seed)
    x = (rng.integers(0, 3, (b, c, h, w)) if ties else rng.standard_normal((b, c, h, w))).astype(np.float32)
    t = Tensor(x, requires_grad=True)
    out = ops.max_pool2d(t, k, s, p)
    ref, ref_dx = max_pool_twin(x, k, s, p)
    np.testing.assert_array_equal(out.data, ref)
    from fanin.kernels import pool
    ho, wo = ref.shape[2:]
    serial = pool.max_pool_forward_serial(x, k, k, s, s, p, p, ho, wo)  # the runtime's serial twin
    parallel = pool.max_pool_forward(x, k, k, s, s, p, p, ho, wo)
    np.testing.assert_array_equal(serial[0], ref)
    np.testing.assert_array_equal(serial[1], parallel[1])
    for values in (pool.max_pool_values, pool.max_pool_values_serial):  # inference: the maxima alone
        np.testing.assert_array_equal(values(x, k, k, s, s, p, p, ho, wo), ref)
    with no_grad():
        np.testing.assert_array_equal(ops.max_pool2d(Tensor(x, requires_grad=True), k, s, p).data, ref)
    out.sum().backward()
    np.testing.assert_array_equal(t.grad, ref_dx)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 3), s=st.integers(1, 3), p=st.integers(0, 1), seed=st.integers(0, 999))
def test_max_pool_nan_keeps_the_first_tap_rule_in_every_kernel(k, s, p, seed):
    """A NaN in a window's first tap is its maximum, a later one is passed over: the training kernel, its
    argmax and the inference kernels agree on it (the compiled network equals the autograd model)."""
    from fanin.kernels import pool
    if p > k // 2:
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 2, 7, 6)).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = np.nan
    ho, wo = (7 + 2 * p - k) // s + 1, (6 + 2 * p - k) // s + 1
    out, arg = pool.max_pool_forward(x, k, k, s, s, p, p, ho, wo)
    for i in range(ho):
        for j in range(wo):
            r0, q0 = max(0, i * s - p), max(0, j * s - p)
            r1, q1 = min(7, i * s - p + k), min(6, j * s - p + k)
            win = x[:, :, r0:r1, q0:q1].reshape(2, 2, -1)
            first = win[..., 0]
            rest = np.where(np.isnan(win[..., 1:]), -np.inf, win[..., 1:]).max(-1, initial=-np.inf)
            want = np.where(np.isnan(first) | (first >= rest), first, rest)
            np.testing.assert_array_equal(out[:, :, i, j], want)
            got = np.take_along_axis(x.reshape(2, 2, -1), arg[:, :, i, j][..., None].astype(np.int64), -1)[..., 0]
            np.testing.assert_array_equal(got, want)
    for values in (pool.max_pool_values, pool.max_pool_values_serial):
        np.testing.assert_array_equal(values(x, k, k, s, s, p, p, ho, wo), out)
