"""fanin.kernels against dense NumPy twins (hypothesis), plus the errors users can cause."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fanin import kernels as K

SETTINGS = dict(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# batch sizes that hit the gathered small-batch path (< 8) and the panel path (partial/full panels)
BATCHES = [1, 2, 7, 8, 9, 31, 32, 33, 64, 70]


# ------------------------------------------------------------------ dense twins
def dense_weight(indices, values, n_in):
    w = np.zeros((indices.shape[0], n_in), np.float64)
    np.put_along_axis(w, indices.astype(np.int64), values.astype(np.float64), axis=1)
    return w


def ref_forward(x, indices, values, bias, n_in):
    y = x.astype(np.float64) @ dense_weight(indices, values, n_in).T
    return y if bias is None else y + bias


def ref_backward(x, indices, values, dy):
    w = dense_weight(indices, values, x.shape[1])
    g = dy.astype(np.float64).T @ x.astype(np.float64)
    return dy.astype(np.float64) @ w, np.take_along_axis(g, indices.astype(np.int64), axis=1)


def ref_scores(x, dy, indices):
    """|G| with held positions at -inf, G = dy^T x in float64."""
    g = np.abs(dy.astype(np.float64).T @ x.astype(np.float64))
    np.put_along_axis(g, indices.astype(np.int64), -np.inf, axis=1)
    return g


def patch_pairs(x_shape, kh, kw, stride, padding):
    """Every (im2col row, column, input position) pair that lies inside the input, by plain loops."""
    (sh, sw), (ph, pw) = stride, padding
    b, c, h, w = x_shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    for n in range(b):
        for oy in range(ho):
            for ox in range(wo):
                for ch in range(c):
                    for dy in range(kh):
                        for dx in range(kw):
                            iy, ix = oy * sh - ph + dy, ox * sw - pw + dx
                            if 0 <= iy < h and 0 <= ix < w:
                                yield (n * ho + oy) * wo + ox, (ch * kh + dy) * kw + dx, (n, ch, iy, ix)


def ref_im2col(x, kh, kw, stride, padding):
    (sh, sw), (ph, pw) = stride, padding
    b, c, h, w = x.shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    cols = np.zeros((b * ho * wo, c * kh * kw), x.dtype)
    for row, col, pos in patch_pairs(x.shape, kh, kw, stride, padding):
        cols[row, col] = x[pos]
    return cols


def ref_col2im(cols, x_shape, kh, kw, stride, padding):
    out = np.zeros(x_shape, np.float64)
    for row, col, pos in patch_pairs(x_shape, kh, kw, stride, padding):
        out[pos] += cols[row, col]
    return out


# ------------------------------------------------------------------ generators
def random_layer(rng, n_out, n_in, k, dtype, inactive=0.0):
    """Sorted distinct indices per row, float32 values; a fraction of rows ablated (all-zero)."""
    indices = np.sort(np.argsort(rng.random((n_out, n_in)), axis=1)[:, :k], axis=1).astype(dtype)
    values = rng.standard_normal((n_out, k)).astype(np.float32)
    dead = rng.random(n_out) < inactive
    if dead.all():  # SPEC edge case "all neurons ablated but one"
        dead[rng.integers(n_out)] = False
    values[dead] = 0
    return indices, values


@st.composite
def layers(draw, max_out=40, max_in=60):
    n_out = draw(st.integers(1, max_out))
    n_in = draw(st.integers(1, max_in))
    k = draw(st.one_of(st.just(1), st.just(n_in), st.integers(1, n_in)))
    dtype = draw(st.sampled_from([np.int16, np.int32]))
    inactive = draw(st.sampled_from([0.0, 0.3, 1.0]))
    batch = draw(st.sampled_from(BATCHES))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    indices, values = random_layer(rng, n_out, n_in, k, dtype, inactive)
    x = rng.standard_normal((batch, n_in)).astype(np.float32)
    dy = rng.standard_normal((batch, n_out)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32) if draw(st.booleans()) else None
    return indices, values, bias, x, dy


def close(got, want, rtol=2e-5, atol=2e-5):
    finite = np.abs(want)[np.isfinite(want)]
    scale = max(1.0, float(finite.max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale)


# ------------------------------------------------------------------ properties
@settings(**SETTINGS)
@given(layers())
def test_forward_matches_dense(case):
    indices, values, bias, x, _ = case
    y = K.fanin_forward(x, indices, values, bias)
    assert y.dtype == np.float32 and y.shape == (x.shape[0], indices.shape[0])
    close(y, ref_forward(x, indices, values, bias, x.shape[1]))
    dead = ~values.any(axis=1)
    close(y[:, dead], np.broadcast_to(0 if bias is None else bias[dead], y[:, dead].shape))


@settings(**SETTINGS)
@given(layers())
def test_backward_matches_dense(case):
    indices, values, _, x, dy = case
    dx_ref, dv_ref = ref_backward(x, indices, values, dy)
    dx, dv = K.fanin_backward(x, indices, values, dy)
    assert dx.shape == x.shape and dv.shape == values.shape and dx.dtype == dv.dtype == np.float32
    close(dx, dx_ref)
    close(dv, dv_ref)
    close(K.fanin_backward_input(indices, values, dy, x.shape[1]), dx_ref)
    close(K.fanin_backward_values(x, indices, dy), dv_ref)


@settings(**SETTINGS)
@given(layers())
def test_prepacked_panels_give_the_same_results(case):
    indices, values, bias, x, dy = case
    xp, dyp = K.pack_panels(x), K.pack_panels(dy)
    if x.shape[0] < 8:
        assert xp is None and dyp is None  # the small-batch kernels read x directly
    else:  # x transposed, the batch zero-padded to a multiple of 32
        want = np.zeros((-(-x.shape[0] // 32) * 32, x.shape[1]), np.float32)
        want[:x.shape[0]] = x
        np.testing.assert_array_equal(xp, want.T)
    np.testing.assert_array_equal(K.fanin_forward(x, indices, values, bias, xp=xp),
                                  K.fanin_forward(x, indices, values, bias))
    dx, dv = K.fanin_backward(x, indices, values, dy)
    for got, want in zip(K.fanin_backward(x, indices, values, dy, xp=xp, dyp=dyp), (dx, dv)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(K.fanin_backward_values(x, indices, dy, xp=xp, dyp=dyp), dv)
    np.testing.assert_array_equal(K.fanin_backward_input(indices, values, dy, x.shape[1], dyp=dyp), dx)


def test_panels_of_another_shape_are_refused():
    rng = np.random.default_rng(0)
    indices, values = random_layer(rng, 6, 40, 5, np.int16)
    x = rng.standard_normal((40, 40)).astype(np.float32)
    with pytest.raises(ValueError, match=r"xp must be pack_panels\(x\).*\(40, 64\)"):
        K.fanin_forward(x, indices, values, xp=K.pack_panels(x[:33, :39].copy()))
    with pytest.raises(ValueError, match=r"dyp must be pack_panels\(dy\)"):
        K.fanin_backward_values(x, indices, np.ones((40, 6), np.float32), dyp=K.pack_panels(x))


@settings(**SETTINGS)
@given(layers(), st.booleans())
def test_panel_layout_kernels_match_dense(case, transposed):
    """Packed in, packed out (training's layout): the same numbers as the dense twin, zero past the batch."""
    indices, values, bias, x, dy = case
    B, n_in = x.shape
    def packed(a):  # by hand: the panel kernels take any batch (pack_panels leaves small ones unpacked)
        p = np.zeros((a.shape[1], -(-B // 32) * 32), a.dtype)
        p[:, :B] = a.T
        return p

    xp, dyp = packed(x), packed(dy)
    yp = K.fanin_forward_panels(xp, B, indices, values, bias)
    assert yp.shape == (indices.shape[0], xp.shape[1]) and yp.dtype == np.float32
    assert np.all(yp[:, B:] == 0)
    close(K.unpack_panels(yp, B), ref_forward(x, indices, values, bias, n_in))
    tr = K.transpose_structure(indices, n_in) if transposed else None
    dxp, dv = K.fanin_backward_panels(xp, indices, values, dyp, B, transposed=tr)
    dx_ref, dv_ref = ref_backward(x, indices, values, dy)
    assert dxp.shape == xp.shape and np.all(dxp[:, B:] == 0)
    close(K.unpack_panels(dxp, B), dx_ref)
    close(dv, dv_ref)
    none, dv2 = K.fanin_backward_panels(xp, indices, values, dyp, B, need_dx=False)
    assert none is None
    np.testing.assert_array_equal(dv2, dv)
    np.testing.assert_array_equal(K.unpack_panels(xp, B), x)


def test_panel_layout_arguments_are_checked():
    rng = np.random.default_rng(0)
    indices, values = random_layer(rng, 6, 40, 5, np.int16)
    xp = K.pack_panels(rng.standard_normal((40, 40)).astype(np.float32))  # (40, 64)
    with pytest.raises(ValueError, match=r"not the panel layout of a batch of 70.*\(40, 96\)"):
        K.fanin_forward_panels(xp, 70, indices, values)
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        K.unpack_panels(xp, 0)
    with pytest.raises(ValueError, match="dyp has 40 rows but indices has 6 neurons"):
        K.fanin_backward_panels(xp, indices, values, xp, 40)
    with pytest.raises(TypeError, match="share one float dtype"):
        K.fanin_forward_panels(xp, 40, indices, values.astype(np.float64))
    with pytest.raises(ValueError, match=r"hold 39, outside \[0, 30\) for xp of shape \(30, 64\)"):
        K.fanin_forward_panels(xp[:30].copy(), 40, indices, values)


@settings(**SETTINGS)
@given(layers())
def test_transpose_structure_is_the_csc_of_indices(case):
    indices, values, _, x, _ = case
    n_out, k = indices.shape
    n_in = x.shape[1]
    colptr, rows, slots = K.transpose_structure(indices, n_in)
    assert colptr.shape == (n_in + 1,) and rows.shape == slots.shape == (n_out * k,)
    assert colptr[0] == 0 and colptr[-1] == n_out * k and np.all(np.diff(colptr) >= 0)
    np.testing.assert_array_equal(np.diff(colptr), np.bincount(indices.ravel().astype(np.int64), minlength=n_in))
    for i in range(n_in):
        r, sl = rows[colptr[i]:colptr[i + 1]], slots[colptr[i]:colptr[i + 1]]
        assert np.all(np.diff(r) > 0), "neurons of one input are listed in increasing order"
        np.testing.assert_array_equal(sl // k, r)
        np.testing.assert_array_equal(indices.ravel()[sl], i)
    # every (neuron, slot) appears exactly once
    np.testing.assert_array_equal(np.sort(slots), np.arange(n_out * k))


@settings(**SETTINGS)
@given(layers())
def test_backward_with_cached_transpose_matches_dense(case):
    indices, values, _, x, dy = case
    n_in = x.shape[1]
    dx_ref, dv_ref = ref_backward(x, indices, values, dy)
    tr = K.transpose_structure(indices, n_in)
    close(K.fanin_backward_input(indices, values, dy, n_in, transposed=tr), dx_ref)
    dx, dv = K.fanin_backward(x, indices, values, dy, transposed=tr)
    close(dx, dx_ref)
    close(dv, dv_ref)
    dx64 = K.fanin_backward_input(indices, values.astype(np.float64), dy, n_in, transposed=tr)
    assert dx64.dtype == np.float64
    np.testing.assert_allclose(dx64, dx_ref, rtol=1e-9, atol=1e-9)


def test_transposed_of_other_indices_is_refused():
    rng = np.random.default_rng(7)
    indices, values = random_layer(rng, 5, 8, 3, np.int16)
    dy = rng.standard_normal((9, 5)).astype(np.float32)
    other = K.transpose_structure(random_layer(rng, 5, 8, 2, np.int16)[0], 8)
    with pytest.raises(ValueError, match="transposed must be transpose_structure"):
        K.fanin_backward_input(indices, values, dy, 8, transposed=other)
    with pytest.raises(ValueError, match="transposed must be transpose_structure"):
        K.fanin_backward(rng.standard_normal((9, 8)).astype(np.float32), indices, values, dy,
                         transposed=K.transpose_structure(indices, 9))
    with pytest.raises(ValueError, match="outside"):
        K.transpose_structure(indices, 4)
    for bad in (8.7, 8.0, "8", True, 0, -3):  # never truncated or parsed: 8.7 would have run as 8
        with pytest.raises(ValueError, match="n_in must be a positive integer"):
            K.fanin_backward_input(indices, values, dy, bad)
        with pytest.raises(ValueError, match="n_in must be a positive integer"):
            K.transpose_structure(indices, bad)
        with pytest.raises(ValueError, match="n_in must be a positive integer"):
            K.validate_indices(indices, bad)
    assert K.fanin_backward_input(indices, values, dy, np.int64(8)).shape == (9, 8)


@settings(**SETTINGS)
@given(layers(), st.integers(0, 70), st.sampled_from([None, 1, 3, 64]))
def test_growth_candidates_match_dense_topc(case, c, block):
    indices, _, _, x, dy = case
    n_out, n_in = indices.shape[0], x.shape[1]
    cand, score = K.growth_candidates(x, dy, indices, c, block)
    assert cand.shape == score.shape == (n_out, c) and cand.dtype == np.int32 and score.dtype == np.float32
    g = ref_scores(x, dy, indices)
    want = -np.sort(-g, axis=1)[:, :c]  # reference scores, descending, -inf where no free input
    tol = 1e-5 * max(1.0, float(np.abs(want[np.isfinite(want)]).max(initial=0.0)))
    free = n_in - indices.shape[1]
    for j in range(n_out):
        got, idx = score[j], cand[j]
        m = min(c, free)
        assert np.all(idx[m:] == -1) and np.all(np.isneginf(got[m:])), "padding must be -1 / -inf"
        chosen = idx[:m]
        assert len(set(chosen.tolist())) == m, "no duplicate candidates"
        assert not np.isin(chosen, indices[j]).any(), "held inputs are never candidates"
        assert np.all(np.diff(got[:m]) <= tol), "sorted by score, descending"
        np.testing.assert_allclose(got[:m], g[j, chosen], atol=tol, rtol=1e-5)
        np.testing.assert_allclose(got[:m], want[j, :m], atol=tol, rtol=1e-5)
    unsorted_idx, unsorted_score, held = K.growth_candidates(x, dy, indices, c, block, sort=False, held=True)
    g_dense = np.abs(dy.astype(np.float64).T @ x.astype(np.float64))
    np.testing.assert_allclose(held, np.take_along_axis(g_dense, indices.astype(np.int64), axis=1), atol=tol, rtol=1e-5)
    for j in range(n_out):  # the same set, in input order
        m = min(c, free)
        assert np.all(np.diff(unsorted_idx[j, :m]) > 0)
        np.testing.assert_allclose(np.sort(unsorted_score[j, :m])[::-1], score[j, :m], atol=tol, rtol=1e-5)


@settings(**SETTINGS)
@given(layers())
def test_growth_candidates_accept_a_list_of_batches(case):
    indices, _, _, x, dy = case
    parts = max(1, x.shape[0] // 2)
    c = 3
    whole = K.growth_candidates(x, dy, indices, c)[1]
    split = K.growth_candidates([x[:parts], x[parts:]], [dy[:parts], dy[parts:]], indices, c)[1]
    close(split, whole)
    close(K.dense_grad([x[:parts], x[parts:]], [dy[:parts], dy[parts:]]), dy.T.astype(np.float64) @ x)


@settings(**SETTINGS)
@given(layers())
def test_fixed_point_forward_matches_dense(case):
    indices, values, bias, x, _ = case
    rng = np.random.default_rng(int(abs(values).sum() * 1000) % 2**31)
    q = rng.integers(-128, 128, size=values.shape).astype(np.int8)
    scale = (rng.random(indices.shape[0]) * 0.1).astype(np.float32)
    y = K.fixed_point_forward(x, indices, q, scale, bias)
    want = ref_forward(x, indices, q.astype(np.float64) * scale[:, None], bias, x.shape[1])
    close(y, want, rtol=1e-4, atol=1e-4)


def test_float64_is_computed_in_float64():
    rng = np.random.default_rng(0)
    indices, values = random_layer(rng, 9, 13, 4, np.int16)
    for batch in (1, 40):
        x = rng.standard_normal((batch, 13))
        dy = rng.standard_normal((batch, 9))
        y = K.fanin_forward(x, indices, values.astype(np.float64))
        assert y.dtype == np.float64
        np.testing.assert_allclose(y, ref_forward(x, indices, values, None, 13), rtol=1e-12, atol=1e-12)
        dx, dv = K.fanin_backward(x, indices, values, dy)  # mixed float32 / float64 -> float64
        dx_ref, dv_ref = ref_backward(x, indices, values, dy)
        assert dx.dtype == dv.dtype == np.float64
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-7, atol=1e-7)
        np.testing.assert_allclose(dv, dv_ref, rtol=1e-12, atol=1e-12)


def test_large_index_dtype_and_wide_layer():
    rng = np.random.default_rng(1)
    n_in = 40000  # past int16: index_dtype picks int32
    assert K.index_dtype(n_in) is np.int32 and K.index_dtype(32767) is np.int16
    indices, values = random_layer(rng, 3, n_in, 50, np.int32)
    K.validate_indices(indices, n_in)
    for batch in (1, 33):
        x = rng.standard_normal((batch, n_in)).astype(np.float32)
        close(K.fanin_forward(x, indices, values), ref_forward(x, indices, values, None, n_in))


def test_large_layer_uses_blocks_without_dense_scores():
    rng = np.random.default_rng(2)
    indices, _ = random_layer(rng, 300, 500, 20, np.int16)
    x = rng.standard_normal((16, 500)).astype(np.float32)
    dy = rng.standard_normal((16, 300)).astype(np.float32)
    a = K.growth_candidates(x, dy, indices, 5, block=7)[1]
    b = K.growth_candidates(x, dy, indices, 5)[1]
    close(a, b)


@settings(**SETTINGS)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 7), st.integers(1, 7), st.integers(1, 3),
       st.integers(1, 3), st.integers(1, 2), st.integers(1, 2), st.integers(0, 2), st.integers(0, 1),
       st.integers(0, 2**31 - 1))
def test_im2col_col2im_match_loops_and_are_adjoint(b, c, h, w, kh, kw, sh, sw, ph, pw, seed):
    if (h + 2 * ph - kh) < 0 or (w + 2 * pw - kw) < 0:
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, c, h, w)).astype(np.float32)
    cols = K.im2col(x, kh, kw, (sh, sw), (ph, pw))
    np.testing.assert_array_equal(cols, ref_im2col(x, kh, kw, (sh, sw), (ph, pw)))
    g = rng.standard_normal(cols.shape).astype(np.float32)
    dx = K.col2im(g, x.shape, kh, kw, (sh, sw), (ph, pw))
    close(dx, ref_col2im(g, x.shape, kh, kw, (sh, sw), (ph, pw)))
    lhs = float(np.sum(cols.astype(np.float64) * g))
    rhs = float(np.sum(x.astype(np.float64) * dx))
    assert abs(lhs - rhs) <= 1e-4 * max(1.0, abs(lhs))


def test_im2col_int_stride_and_padding():
    x = np.arange(2 * 3 * 5 * 4, dtype=np.float32).reshape(2, 3, 5, 4)
    np.testing.assert_array_equal(K.im2col(x, 3, 3, 2, 1), ref_im2col(x, 3, 3, (2, 2), (1, 1)))


# ------------------------------------------------------------------ layouts and flags
def test_non_contiguous_inputs_work_and_equal_contiguous():
    rng = np.random.default_rng(3)
    indices, values = random_layer(rng, 12, 20, 5, np.int16)
    for batch in (1, 40):
        xbig = rng.standard_normal((20, 2 * batch)).astype(np.float32)
        x = xbig.T[::2]  # (batch, 20), neither C- nor F-contiguous
        assert not x.flags.c_contiguous
        np.testing.assert_array_equal(K.fanin_forward(x, indices, values), K.fanin_forward(x.copy(), indices, values))
        dy = np.asfortranarray(rng.standard_normal((batch, 12)).astype(np.float32))
        for a, b in zip(K.fanin_backward(x, indices, values, dy), K.fanin_backward(x.copy(), indices, values, dy.copy())):
            np.testing.assert_array_equal(a, b)
    vals_t = np.asfortranarray(values)
    x = rng.standard_normal((3, 20)).astype(np.float32)
    np.testing.assert_array_equal(K.fanin_forward(x, indices, vals_t), K.fanin_forward(x, indices, values))


def test_check_false_skips_the_index_scan_but_not_shape_checks():
    rng = np.random.default_rng(4)
    indices, values = random_layer(rng, 4, 10, 3, np.int16)
    x = rng.standard_normal((2, 10)).astype(np.float32)
    close(K.fanin_forward(x, indices, values, check=False), ref_forward(x, indices, values, None, 10))
    with pytest.raises(ValueError, match="values of shape"):
        K.fanin_forward(x, indices, values[:, :2], check=False)


def test_empty_batch():
    rng = np.random.default_rng(5)
    indices, values = random_layer(rng, 4, 10, 3, np.int16)
    x = np.zeros((0, 10), np.float32)
    assert K.fanin_forward(x, indices, values).shape == (0, 4)
    dx, dv = K.fanin_backward(x, indices, values, np.zeros((0, 4), np.float32))
    assert dx.shape == (0, 10)
    np.testing.assert_array_equal(dv, 0)


# ------------------------------------------------------------------ bad inputs
@pytest.fixture
def small():
    rng = np.random.default_rng(6)
    indices, values = random_layer(rng, 5, 8, 3, np.int16)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    dy = rng.standard_normal((4, 5)).astype(np.float32)
    return indices, values, x, dy


def test_index_out_of_range_is_named(small):
    indices, values, x, dy = small
    bad = indices.copy()
    bad[2, -1] = 8
    with pytest.raises(ValueError, match=r"hold 8, outside \[0, 8\) for x of shape \(4, 8\)"):
        K.fanin_forward(x, bad, values)
    bad[2, -1] = -1
    with pytest.raises(ValueError, match="outside"):
        K.fanin_backward(x, bad, values, dy)
    with pytest.raises(ValueError, match="outside"):
        K.fanin_backward_input(bad, values, dy, 8)
    with pytest.raises(ValueError, match="outside"):
        K.validate_indices(bad, 8)


def test_x_width_mismatch_names_both_shapes(small):
    indices, values, _, _ = small
    x = np.zeros((2, 5), np.float32)  # the layer reads inputs up to 7
    with pytest.raises(ValueError, match=r"indices of shape \(5, 3\).*x of shape \(2, 5\)"):
        K.fanin_forward(x, indices, values)


def test_duplicate_or_unsorted_indices_name_the_row(small):
    indices, _, _, _ = small
    dup = indices.copy()
    dup[3] = [1, 1, 4]
    with pytest.raises(ValueError, match="row 3 of indices repeats input 1"):
        K.validate_indices(dup, 8)
    unsorted = indices.copy()
    unsorted[1] = [5, 2, 7]
    with pytest.raises(ValueError, match="row 1 of indices is out of order"):
        K.validate_indices(unsorted, 8)
    K.validate_indices(indices, 8)  # a good layer passes


def test_wrong_dtypes_say_how_to_cast(small):
    indices, values, x, dy = small
    with pytest.raises(TypeError, match=r"x has dtype float16.*astype\(np.float32\)"):
        K.fanin_forward(x.astype(np.float16), indices, values)
    with pytest.raises(TypeError, match=r"indices have dtype int64.*index_dtype"):
        K.fanin_forward(x, indices.astype(np.int64), values)
    with pytest.raises(TypeError, match="values has dtype int32"):
        K.fanin_forward(x, indices, values.astype(np.int32))
    with pytest.raises(TypeError, match="qvalues have dtype float32.*int8"):
        K.fixed_point_forward(x, indices, values, np.ones(5, np.float32))
    with pytest.raises(TypeError, match=r"must be a NumPy array \(or a fanin Tensor/Parameter\), got list"):
        K.fanin_forward(x.tolist(), indices, values)
    with pytest.raises(TypeError, match=r"masked array.*a.filled\(0\)"):  # its mask would be ignored
        K.fanin_forward(np.ma.masked_array(x, mask=x > 0), indices, values)


def test_foreign_byte_order_is_read_as_its_values(small):
    indices, values, x, dy = small
    want = K.fanin_forward(x, indices, values)
    got = K.fanin_forward(x.astype(">f4"), indices.astype(">" + indices.dtype.str[1:]), values.astype(">f4"))
    np.testing.assert_array_equal(got, want)
    dx, dv = K.fanin_backward(x.astype(">f4"), indices, values, dy.astype(">f4"))
    wdx, wdv = K.fanin_backward(x, indices, values, dy)
    np.testing.assert_array_equal(dx, wdx)
    np.testing.assert_array_equal(dv, wdv)


def test_wrong_shapes_are_sentences(small):
    indices, values, x, dy = small
    with pytest.raises(ValueError, match=r"x must be 2-D \(batch, n_in\), got shape \(8,\).*x\[None, :\]"):
        K.fanin_forward(x[0], indices, values)
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        K.fanin_forward(x, indices, values, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"dy of shape \(4, 4\) does not match x of shape \(4, 8\)"):
        K.fanin_backward(x, indices, values, dy[:, :4])
    with pytest.raises(ValueError, match=r"dy of shape \(3, 5\)"):
        K.fanin_backward_values(x, indices, dy[:3])
    with pytest.raises(ValueError, match="c must be a non-negative integer"):
        K.growth_candidates(x, dy, indices, -1)
    with pytest.raises(ValueError, match="does not fit"):
        K.im2col(np.zeros((1, 1, 2, 2), np.float32), 3, 3, 1, 0)
    with pytest.raises(ValueError, match=r"dcols of shape \(3, 9\) does not match"):
        K.col2im(np.zeros((3, 9), np.float32), (1, 1, 4, 4), 3, 3, 1, 0)


def test_device_arrays_say_cuda_is_not_available(small):
    indices, values, x, _ = small

    class FakeDeviceArray:
        __cuda_array_interface__ = {"shape": (4, 8), "typestr": "<f4", "data": (0, False), "version": 3}
        shape, dtype, ndim = (4, 8), np.dtype(np.float32), 2

    with pytest.raises(TypeError, match="same device"):
        K.fanin_forward(FakeDeviceArray(), indices, values)
    import importlib.util

    if importlib.util.find_spec("fanin.kernels.cuda") is None:
        dev = FakeDeviceArray()
        with pytest.raises(NotImplementedError, match="CUDA backend is not available yet"):
            K.fanin_forward(dev, dev, dev)


@settings(**SETTINGS)
@given(size=st.sampled_from([0, 1, 7, 1000, (1 << 21) + 3]), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**31 - 1))
def test_relu_kernels_match_numpy(size, dtype, seed):
    from fanin.kernels import activation

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(size).astype(dtype)
    x[rng.random(size) < 0.1] = 0
    g = rng.standard_normal(size).astype(dtype)
    out = activation.relu(x.reshape(-1, 1))
    assert out.shape == (size, 1) and out.dtype == dtype
    np.testing.assert_array_equal(out[:, 0], np.maximum(x, 0))
    np.testing.assert_array_equal(activation.relu_grad(g.reshape(-1, 1), out)[:, 0], g * (x > 0))


# ------------------------------------------------- survivors of the 2026-11-26 kernels mutation run
def test_growth_candidates_with_tied_scores_keep_every_larger_score_and_break_ties_by_index():
    # integer gradients: many exact ties at the c-th score; each row must still list its larger scores, then
    # the tied ones of lowest input index (a tie-breaking count that is off drops a larger score)
    rng = np.random.default_rng(11)
    n_out, n_in, k = 6, 40, 4
    indices = np.stack([np.sort(rng.choice(n_in, k, replace=False)) for _ in range(n_out)]).astype(np.int32)
    x = np.eye(n_in, dtype=np.float32)
    dy = rng.integers(0, 3, (n_in, n_out)).astype(np.float32)  # |g| in {0, 1, 2}: ties everywhere
    g = ref_scores(x, dy, indices)
    for c in (1, 5, 17, 36):
        cand, score = K.growth_candidates(x, dy, indices, c)
        unsorted, _ = K.growth_candidates(x, dy, indices, c, sort=False)
        for j in range(n_out):
            free = [i for i in range(n_in) if i not in indices[j]]
            want = sorted(free, key=lambda i: (-g[j, i], i))[:c]
            assert sorted(cand[j].tolist()) == sorted(want), (c, j)
            assert unsorted[j].tolist() == sorted(want)
            np.testing.assert_array_equal(score[j], g[j, cand[j]])


def test_growth_candidates_never_choose_nan_scores_and_pad_the_rest():
    # a neuron whose gradient is NaN everywhere (or in part) has fewer than c scored free inputs: the row lists
    # the scored ones, largest first, then -1 / -inf -- never unwritten memory, never a NaN input
    rng = np.random.default_rng(3)
    n_out, n_in, k, c = 3, 12, 2, 5
    indices = np.array([[0, 1], [2, 3], [4, 5]], np.int32)
    x = rng.standard_normal((4, n_in)).astype(np.float32)
    dy = rng.standard_normal((4, n_out)).astype(np.float32)
    dy[:, 1] = np.nan  # row 1: every score NaN
    x[:, 7:] = np.nan  # every row: inputs 7.. NaN, so at most inputs 0..6 less the held ones are scored
    g = ref_scores(x, dy, indices)
    for sort in (True, False):
        cand, score = K.growth_candidates(x, dy, indices, c, sort=sort)
        assert cand[1].tolist() == [-1] * c and np.all(score[1] == -np.inf)
        for j in (0, 2):
            free = [i for i in range(7) if i not in indices[j]]  # 5 scored free inputs, c = 5
            want = sorted(free, key=lambda i: (-g[j, i], i))
            assert cand[j].tolist() == (want if sort else sorted(want))
            np.testing.assert_allclose(score[j], g[j, cand[j]], rtol=1e-5)
    cand, score = K.growth_candidates(x, dy, indices, 8)  # more than are scored: padded
    assert cand[0, 5:].tolist() == [-1] * 3 and np.all(score[0, 5:] == -np.inf)
    assert set(cand[0, :5].tolist()) == {2, 3, 4, 5, 6}


def test_plain_wraps_foreign_device_arrays_and_leaves_host_arrays_alone(monkeypatch):
    from fanin.kernels import _validate

    class Foreign:  # another library's GPU array (CuPy, PyTorch): it only speaks __cuda_array_interface__
        __cuda_array_interface__ = {"shape": (2,), "typestr": "<f4", "data": (0, False), "version": 3}

    class Backend:
        @staticmethod
        def wrap(a):
            return ("wrapped", a)

    calls = []
    monkeypatch.setattr(_validate, "backend", lambda *a, **k: calls.append(a) or Backend)
    host = np.zeros(3, np.float32)
    assert _validate.plain(host, None)[0] is host and not calls  # host arrays never load the CUDA backend
    f = Foreign()
    out = _validate.plain(host, f)
    assert out[0] is host and out[1] == ("wrapped", f) and len(calls) == 1


def test_an_ablated_filter_outputs_exactly_its_bias_whatever_the_input():
    from fanin.kernels import conv

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    x[0, 1, 2, 3] = np.inf  # a filter with no live weight never reads it
    indices = np.tile(np.arange(18, dtype=np.int32), (3, 1))
    values = rng.standard_normal((3, 18)).astype(np.float32)
    values[1] = 0.0  # filter 1 ablated
    bias = np.array([0.5, -0.25, 2.0], np.float32)
    for parallel in (True, False):
        y = conv.fanin_conv2d_forward(x, indices, values, bias, 3, 1, 1, parallel=parallel)
        assert np.all(y[:, 1] == np.float32(-0.25))


def test_a_topology_error_names_the_offending_index():
    for bad, shown in (([[0, 5]], "5"), ([[-2, 1]], "-2"), ([[-2, 9]], "-2")):
        with pytest.raises(ValueError, match=rf"indices hold {shown}, outside \[0, 3\)"):
            K.Topology(np.array(bad), 3)


@settings(**SETTINGS)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 7), st.integers(1, 7), st.integers(1, 3),
       st.integers(1, 3), st.integers(1, 2), st.integers(1, 2), st.integers(0, 2), st.integers(0, 1),
       st.sampled_from([np.float32, np.float64]), st.integers(0, 2**31 - 1))
def test_im2col_planes_is_im2col_per_image_and_col2im_planes_its_adjoint(b, c, h, w, kh, kw, sh, sw, ph, pw, dt, seed):
    if (h + 2 * ph - kh) < 0 or (w + 2 * pw - kw) < 0:
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, c, h, w)).astype(dt)
    planes = K.im2col_planes(x, kh, kw, (sh, sw), (ph, pw))
    rows = ref_im2col(x, kh, kw, (sh, sw), (ph, pw))
    assert planes.dtype == dt
    np.testing.assert_array_equal(planes, rows.reshape(b, -1, rows.shape[1]).transpose(0, 2, 1))
    g = rng.standard_normal(planes.shape).astype(dt)
    dx = K.col2im_planes(g, x.shape, kh, kw, (sh, sw), (ph, pw))
    close(dx, ref_col2im(np.ascontiguousarray(g.transpose(0, 2, 1)).reshape(rows.shape), x.shape, kh, kw, (sh, sw),
                         (ph, pw)))


def test_im2col_planes_checks_its_operands():
    with pytest.raises(ValueError, match="im2col_planes: .*does not fit"):
        K.im2col_planes(np.ones((1, 1, 2, 2), np.float32), 3, 3)
    with pytest.raises(ValueError, match="col2im_planes: dcols of shape"):
        K.col2im_planes(np.ones((1, 9, 5), np.float32), (1, 1, 4, 4), 3, 3, padding=1)
