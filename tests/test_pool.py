"""Pooling kernels against NumPy loop twins."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fanin import Tensor, ops


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
    out.sum().backward()
    np.testing.assert_array_equal(t.grad, ref_dx)
