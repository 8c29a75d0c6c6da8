"""fanin.kernels.conv (direct condensed convolution) against a dense NumPy twin (hypothesis)."""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fanin.kernels import conv, transpose_structure

SETTINGS = dict(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------ dense twin
def dense_weight(indices, values, c_in, kh, kw):
    w = np.zeros((indices.shape[0], c_in * kh * kw), np.float64)
    np.put_along_axis(w, indices.astype(np.int64), values.astype(np.float64), axis=1)
    return w.reshape(-1, c_in, kh, kw)


def patches(x, kh, kw, stride, padding):
    """(B, C, kh, kw, Ho, Wo) float64 windows of the zero-padded input."""
    (sh, sw), (ph, pw) = stride, padding
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho = (xp.shape[2] - kh) // sh + 1
    wo = (xp.shape[3] - kw) // sw + 1
    out = np.empty(x.shape[:2] + (kh, kw, ho, wo))
    for i in range(kh):
        for j in range(kw):
            out[:, :, i, j] = xp[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
    return out


def ref_forward(x, w, bias, stride, padding):
    y = np.einsum("bcijhw,ocij->bohw", patches(x, w.shape[2], w.shape[3], stride, padding), w)
    return y if bias is None else y + bias[None, :, None, None]


def ref_backward(x, w, indices, dy, stride, padding):
    """(dx, dvalues) of ref_forward: dx by scattering dy back through each tap, dW from the patches."""
    (sh, sw), (ph, pw) = stride, padding
    _, _, kh, kw = w.shape
    dy = dy.astype(np.float64)
    ho, wo = dy.shape[2:]
    dxp = np.zeros((x.shape[0], x.shape[1], x.shape[2] + 2 * ph + sh, x.shape[3] + 2 * pw + sw))
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] += np.einsum("bohw,oc->bchw", dy, w[:, :, i, j])
    dx = dxp[:, :, ph:ph + x.shape[2], pw:pw + x.shape[3]]
    dw = np.einsum("bcijhw,bohw->ocij", patches(x, kh, kw, stride, padding), dy).reshape(w.shape[0], -1)
    return dx, np.take_along_axis(dw, indices.astype(np.int64), axis=1)


# ------------------------------------------------------------------ cases
@st.composite
def conv_case(draw, big=False):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    # big: several R x L register tiles (4 rows x 16 columns) and partial ones
    h = draw(st.integers(max(1, kh - 2 * ph), 11 if big else 3 + kh))
    w = draw(st.integers(max(1, kw - 2 * pw), 37 if big else 3 + kw))
    b, c_in, c_out = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3 if not big else 5))
    n_in = c_in * kh * kw
    k = draw(st.integers(1, n_in))
    index_dtype = draw(st.sampled_from([np.int16, np.int32]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    indices = np.stack([np.sort(rng.choice(n_in, k, replace=False)) for _ in range(c_out)]).astype(index_dtype)
    values = rng.standard_normal((c_out, k)).astype(dtype)
    ablated = draw(st.lists(st.booleans(), min_size=c_out, max_size=c_out))
    if all(ablated):
        ablated[draw(st.integers(0, c_out - 1))] = False  # keep one neuron alive
    values[np.array(ablated)] = 0
    bias = rng.standard_normal(c_out).astype(dtype) if draw(st.booleans()) else None
    x = rng.standard_normal((b, c_in, h, w)).astype(dtype)
    return x, indices, values, bias, (kh, kw), (sh, sw), (ph, pw), rng


def check(case):
    x, indices, values, bias, ks, stride, padding, rng = case
    dt = x.dtype
    tol = dict(rtol=1e-4, atol=1e-4) if dt == np.float32 else dict(rtol=1e-10, atol=1e-10)
    w = dense_weight(indices, values, x.shape[1], *ks)
    y = conv.fanin_conv2d_forward(x, indices, values, bias, ks, stride, padding)
    assert y.dtype == dt
    # the serial twin (no parallel region: the runtime's small batches, forked children) computes the same bits
    np.testing.assert_array_equal(conv.fanin_conv2d_forward(x, indices, values, bias, ks, stride, padding,
                                                            parallel=False), y)
    for parallel in (True, False):  # the ReLU the runtime fuses into the stores: exactly max(y, 0)
        np.testing.assert_array_equal(conv.fanin_conv2d_forward(x, indices, values, bias, ks, stride, padding,
                                                                parallel=parallel, relu=True), np.maximum(y, 0))
    np.testing.assert_allclose(y, ref_forward(x, w, None if bias is None else bias.astype(np.float64), stride, padding),
                               **tol)
    dy = rng.standard_normal(y.shape).astype(dt)
    tr = transpose_structure(indices, x.shape[1] * ks[0] * ks[1])
    dx, dv = conv.fanin_conv2d_backward(x, indices, values, dy, ks, stride, padding, tr)
    rdx, rdv = ref_backward(x, w, indices, dy, stride, padding)
    assert dx.dtype == dt and dv.dtype == dt and dx.shape == x.shape and dv.shape == values.shape
    np.testing.assert_allclose(dx, rdx, **tol)
    np.testing.assert_allclose(dv, rdv, **tol)
    none, dv2 = conv.fanin_conv2d_backward(x, indices, values, dy, ks, stride, padding, None, need_dx=False)
    assert none is None
    np.testing.assert_allclose(dv2, dv, rtol=0, atol=0)


@settings(**SETTINGS)
@given(conv_case())
def test_small_shapes_match_dense(case):
    check(case)


@settings(**SETTINGS)
@given(conv_case(big=True))
def test_multi_tile_shapes_match_dense(case):
    check(case)


def test_k_full_and_k_one_and_noncontiguous():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 9, 18)).astype(np.float32)
    for k in (1, 27):
        indices = np.stack([np.sort(rng.choice(27, k, replace=False)) for _ in range(4)]).astype(np.int16)
        values = rng.standard_normal((4, k)).astype(np.float32)
        w = dense_weight(indices, values, 3, 3, 3)
        xt = np.asfortranarray(x)
        y = conv.fanin_conv2d_forward(xt, indices, values, None, 3, 1, 1)
        np.testing.assert_allclose(y, ref_forward(x, w, None, (1, 1), (1, 1)), rtol=1e-4, atol=1e-4)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        dx, dv = conv.fanin_conv2d_backward(xt, indices, values, dy[..., ::-1].copy()[..., ::-1], 3, 1, 1, None)
        rdx, rdv = ref_backward(x, w, indices, dy, (1, 1), (1, 1))
        np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dv, rdv, rtol=1e-4, atol=1e-4)


def test_serial_twins_are_compiled_without_a_parallel_region():
    from fanin.kernels import pool

    for par, ser in [(conv.conv_forward, conv.conv_forward_serial), (conv._pad, conv._pad_serial),
                     (pool.max_pool_forward, pool.max_pool_forward_serial)]:
        assert par.targetoptions.get("parallel") and not ser.targetoptions.get("parallel")
    # the serial convolution pads with the serial padding, not the parallel one it would find by name
    assert conv.conv_forward_serial.py_func.__globals__["_pad"] is conv._pad_serial
    assert conv.conv_forward.py_func.__globals__["_pad"] is conv._pad
