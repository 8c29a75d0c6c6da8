"""Selection kernels (SRigL) and fused optimizer updates against NumPy twins."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fanin import nn, optim
from fanin.kernels import select, update

seeds = st.integers(0, 2**31 - 1)


def top_mask_twin(scores, n):
    flat = scores.ravel()
    order = sorted(range(flat.size), key=lambda i: (-flat[i], i))
    order = [i for i in order if np.isfinite(flat[i])][:n]
    mask = np.zeros(flat.size, bool)
    mask[order] = True
    return mask.reshape(scores.shape)


@settings(max_examples=60, deadline=None)
@given(r=st.integers(1, 6), c=st.integers(1, 8), n=st.integers(0, 60), seed=seeds, ties=st.booleans(),
       infs=st.booleans())
def test_top_mask_matches_sorted_twin(r, c, n, seed, ties, infs):
    rng = np.random.default_rng(seed)
    s = (rng.integers(0, 3, (r, c)) if ties else rng.standard_normal((r, c))).astype(np.float32)
    if infs:
        s[rng.random((r, c)) < 0.3] = -np.inf
    np.testing.assert_array_equal(select.top_mask(s, n), top_mask_twin(s, n))


@settings(max_examples=30, deadline=None)
@given(size=st.integers(1, 5000), frac=st.floats(0, 1), seed=seeds, kind=st.sampled_from(["normal", "ties", "zeros"]),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_top_mask_large_arrays_match_a_stable_sort(size, frac, seed, kind, dtype):
    rng = np.random.default_rng(seed)
    s = {"normal": rng.standard_normal(size), "ties": rng.integers(0, 5, size).astype(float),
         "zeros": rng.choice([0.0, -0.0, 1e-30, -np.inf, 2.0], size)}[kind].astype(dtype)
    n = int(frac * size)
    finite = np.flatnonzero(np.isfinite(s))
    order = finite[np.argsort(-s[finite], kind="stable")][:n]
    want = np.zeros(size, bool)
    want[order] = True
    np.testing.assert_array_equal(select.top_mask(s.reshape(1, -1), n)[0], want)


@settings(max_examples=40, deadline=None)
@given(r=st.integers(1, 6), c=st.integers(1, 8), seed=seeds, ties=st.booleans())
def test_top_per_row_matches_twin(r, c, seed, ties):
    rng = np.random.default_rng(seed)
    s = (rng.integers(0, 3, (r, c)) if ties else rng.standard_normal((r, c))).astype(np.float32)
    s[rng.random((r, c)) < 0.2] = -np.inf
    counts = rng.integers(0, c + 2, r).astype(np.int64)
    got = select.top_per_row(s, counts)
    for j in range(r):
        np.testing.assert_array_equal(got[j], top_mask_twin(s[j:j + 1], counts[j])[0])


@settings(max_examples=30, deadline=None)
@given(c=st.integers(60, 400), seed=seeds, ties=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]))
def test_top_per_row_wide_rows_both_cut_methods(c, seed, ties, dtype):
    """Wide rows as in a regrowth (~1000 scores): counts on both sides of SMALL_WANT (buffer / partition)."""
    rng = np.random.default_rng(seed)
    r = 8
    s = (rng.integers(0, 5, (r, c)) if ties else rng.standard_normal((r, c))).astype(dtype)
    s[rng.random((r, c)) < 0.3] = -np.inf
    counts = np.array([1, 2, select.SMALL_WANT - 1, select.SMALL_WANT, select.SMALL_WANT + 1,
                       c // 2, c - 1, c + 5], np.int64)
    rng.shuffle(counts)
    got = select.top_per_row(s, counts)
    for j in range(r):
        np.testing.assert_array_equal(got[j], top_mask_twin(s[j:j + 1], counts[j])[0])


@settings(max_examples=40, deadline=None)
@given(r=st.integers(1, 6), n_in=st.integers(4, 20), seed=seeds, in_order=st.booleans())
def test_assemble_and_gather_rows(r, n_in, seed, in_order):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, n_in // 2 + 1))
    old = np.stack([np.sort(rng.choice(n_in, k, replace=False)) for _ in range(r)]).astype(np.int64)
    keep = rng.random((r, k)) < 0.5
    free = [np.setdiff1d(np.arange(n_in), old[j]) for j in range(r)]
    c = min(len(f) for f in free)
    cand = np.stack([rng.permutation(f)[:c] for f in free]).astype(np.int64)
    if in_order:  # as the growth kernels list candidates
        cand.sort(axis=1)
    placeholder = rng.random(r) < 0.2
    k_new = int(keep.sum(axis=1).max()) + int(rng.integers(0, c + 1))
    k_new = max(k_new, 1)
    grow = np.zeros((r, c), bool)
    for j in range(r):
        grow[j, :max(0, min(c, k_new - keep[j].sum()))] = True
    new_idx, src, filled = select.assemble_rows(old, keep, cand, grow, k_new, placeholder)
    values = rng.standard_normal((r, k)).astype(np.float32)
    gathered = select.gather_rows(values, src)
    for j in range(r):
        if placeholder[j]:
            assert new_idx[j].tolist() == list(range(k_new)) and np.all(src[j] == -1)
            continue
        expect = sorted([(old[j, t], t) for t in range(k) if keep[j, t]] + [(cand[j, t], -1) for t in range(c)
                                                                          if grow[j, t]])
        assert filled[j] == len(expect)
        if filled[j] == k_new:
            assert new_idx[j].tolist() == [e[0] for e in expect]
            assert src[j].tolist() == [e[1] for e in expect]
            np.testing.assert_array_equal(gathered[j], [values[j, t] if t >= 0 else 0 for _, t in expect])
        elif filled[j] < k_new:  # a short row: what it got, in order, then -1 in every slot it did not fill
            assert new_idx[j, :filled[j]].tolist() == [e[0] for e in expect]
            assert np.all(new_idx[j, filled[j]:] == -1)


def numpy_sgd(p, g, buf, lr, mu, wd, nesterov):
    g = g + wd * p
    if mu:
        buf[:] = mu * buf + g
        g = g + mu * buf if nesterov else buf
    return p - lr * g


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 200), seed=seeds, mu=st.sampled_from([0.0, 0.9]), wd=st.sampled_from([0.0, 1e-2]),
       nesterov=st.booleans())
def test_sgd_update_matches_numpy(n, seed, mu, wd, nesterov):
    if nesterov and mu == 0:
        return
    rng = np.random.default_rng(seed)
    p, g, buf = (rng.standard_normal(n) for _ in range(3))
    ref_buf = buf.copy()
    ref = numpy_sgd(p.copy(), g, ref_buf, 0.1, mu, wd, nesterov)
    update.sgd_update(p, g, buf, 0.1, mu, wd, nesterov)
    np.testing.assert_allclose(p, ref, rtol=1e-12, atol=1e-12)
    if mu:
        np.testing.assert_allclose(buf, ref_buf, rtol=1e-12, atol=1e-12)  # fused multiply-adds round differently


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 200), seed=seeds, decoupled=st.booleans(), steps=st.integers(1, 4))
def test_adam_matches_textbook(n, seed, decoupled, steps):
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal(n)
    grads = [rng.standard_normal(n) for _ in range(steps)]
    p = nn.Parameter(w0.copy())
    opt = (optim.AdamW if decoupled else optim.Adam)(
        [p], lr=0.01, weight_decay=0.1)
    m = v = np.zeros(n)
    w = w0.copy()
    for t, g in enumerate(grads, 1):
        p.grad = g.copy()
        opt.step()
        if decoupled:
            w = w * (1 - 0.01 * 0.1)
        else:
            g = g + 0.1 * w
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        mhat, vhat = m / (1 - 0.9 ** t), v / (1 - 0.999 ** t)
        w = w - 0.01 * mhat / (np.sqrt(vhat) + 1e-8)
    np.testing.assert_allclose(p.data, w, rtol=1e-9, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 600), seed=seeds, ties=st.booleans(), data=st.data())
def test_kth_smallest_matches_numpy_partition(size, seed, ties, data):
    rng = np.random.default_rng(seed)
    a = (rng.integers(0, 4, size) if ties else rng.standard_normal(size)).astype(np.float32)
    kth = data.draw(st.integers(0, size - 1))
    assert select.kth_smallest(a.copy(), kth) == np.partition(a, kth)[kth]
