"""Every op's backward against central finite differences (float64), over random shapes."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fanin import Tensor, ops
from gradcheck import check_grads

SETTINGS = settings(max_examples=15, deadline=None)


def arr(rng, shape, low=-2.0, high=2.0):
    return rng.uniform(low, high, size=shape)


shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)
seeds = st.integers(0, 2**31 - 1)


@st.composite
def broadcast_pair(draw):
    """Two shapes that broadcast together, with size-1 and missing leading dims on either side."""
    base = draw(shapes)
    def variant():
        dims = [1 if draw(st.booleans()) else n for n in base]
        drop = draw(st.integers(0, len(dims) - 1))
        return tuple(dims[drop:])
    return variant(), variant()


@pytest.mark.parametrize("op", [ops.add, ops.sub, ops.mul, ops.div])
@SETTINGS
@given(pair=broadcast_pair(), seed=seeds)
def test_binary_broadcast(op, pair, seed):
    rng = np.random.default_rng(seed)
    a, b = arr(rng, pair[0]), arr(rng, pair[1])
    if op is ops.div:
        b = np.sign(b) * (np.abs(b) + 0.5)  # away from zero
    check_grads(op, a, b)


@SETTINGS
@given(shape=shapes, seed=seeds, p=st.sampled_from([2, 3, 0.5, -1.0]))
def test_pow(shape, seed, p):
    a = np.abs(arr(np.random.default_rng(seed), shape)) + 0.5
    check_grads(lambda t: t ** p, a)


@pytest.mark.parametrize("fn", [ops.neg, ops.exp, ops.relu, ops.gelu, lambda t: ops.log(t * t + 1.0)])
@SETTINGS
@given(shape=shapes, seed=seeds)
def test_unary(fn, shape, seed):
    a = arr(np.random.default_rng(seed), shape)
    a[np.abs(a) < 1e-3] = 0.1  # relu kink
    check_grads(fn, a)


@SETTINGS
@given(m=st.integers(1, 5), k=st.integers(1, 5), n=st.integers(1, 5), lead=st.integers(0, 3), seed=seeds,
       vec=st.sampled_from(["none", "left", "right"]))
def test_matmul(m, k, n, lead, seed, vec):
    rng = np.random.default_rng(seed)
    a_shape = (k,) if vec == "left" else ((lead, m, k) if lead else (m, k))
    b_shape = (k,) if vec == "right" else (k, n)
    check_grads(ops.matmul, arr(rng, a_shape), arr(rng, b_shape))


@SETTINGS
@given(b=st.integers(1, 4), i=st.integers(1, 5), o=st.integers(1, 5), seed=seeds, bias=st.booleans())
def test_linear(b, i, o, seed, bias):
    rng = np.random.default_rng(seed)
    args = [arr(rng, (b, i)), arr(rng, (o, i))] + ([arr(rng, (o,))] if bias else [])
    check_grads(lambda *t: ops.linear(*t), *args)


@pytest.mark.parametrize("red", [ops.sum, ops.mean])
@SETTINGS
@given(shape=shapes, seed=seeds, keep=st.booleans(), data=st.data())
def test_reductions(red, shape, seed, keep, data):
    axis = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1)))
    check_grads(lambda t: red(t, axis, keep), arr(np.random.default_rng(seed), shape))


@SETTINGS
@given(shape=shapes, seed=seeds, data=st.data())
def test_reshape_transpose_flatten(shape, seed, data):
    a = arr(np.random.default_rng(seed), shape)
    perm = tuple(data.draw(st.permutations(range(len(shape)))))
    check_grads(lambda t: t.transpose(perm).reshape(-1), a)
    check_grads(lambda t: t.T, a)
    check_grads(lambda t: ops.flatten(t, 0), a)


@SETTINGS
@given(n=st.integers(2, 6), seed=seeds)
def test_getitem(n, seed):
    rng = np.random.default_rng(seed)
    a = arr(rng, (n, 3))
    check_grads(lambda t: t[1:], a)
    check_grads(lambda t: t[:, 0], a)
    idx = rng.integers(0, n, size=4)  # repeats accumulate
    check_grads(lambda t: t[idx], a)
    check_grads(lambda t: t[a[:, 0] > 0], a)


@SETTINGS
@given(seed=seeds, axis=st.integers(0, 1))
def test_concat(seed, axis):
    rng = np.random.default_rng(seed)
    a, b = arr(rng, (2, 3)), arr(rng, (2, 3))
    check_grads(lambda x, y: ops.concat([x, y, x], axis=axis), a, b)


@SETTINGS
@given(b=st.integers(1, 4), c=st.integers(2, 6), seed=seeds)
def test_log_softmax_and_cross_entropy(b, c, seed):
    rng = np.random.default_rng(seed)
    z = arr(rng, (b, c))
    labels = rng.integers(0, c, size=b)
    check_grads(lambda t: ops.log_softmax(t), z)
    check_grads(lambda t: ops.cross_entropy(t, labels), z)


def test_cross_entropy_value_matches_definition():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((5, 4))
    y = rng.integers(0, 4, 5)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert ops.cross_entropy(Tensor(z), y).item() == pytest.approx(-np.log(p[np.arange(5), y]).mean())


def test_dropout_mask_and_scale():
    rng = np.random.default_rng(0)
    x = np.ones((200, 50))
    t = Tensor(x, requires_grad=True)
    out = ops.dropout(t, 0.3, np.random.default_rng(1))
    kept = out.data != 0
    assert 0.6 < kept.mean() < 0.8
    np.testing.assert_allclose(out.data[kept], 1 / 0.7)
    out.sum().backward()
    np.testing.assert_allclose(t.grad, out.data)
    assert ops.dropout(t, 0.3, rng, training=False) is t


conv_cases = st.tuples(
    st.integers(1, 2), st.integers(1, 3), st.integers(1, 3),  # batch, c_in, c_out
    st.integers(3, 6), st.integers(3, 6),  # h, w
    st.integers(1, 3), st.integers(1, 2), st.integers(0, 1),  # k, stride, padding
)


@settings(max_examples=12, deadline=None)
@given(case=conv_cases, seed=seeds, bias=st.booleans())
def test_conv2d(case, seed, bias):
    b, ci, co, h, w, k, s, p = case
    rng = np.random.default_rng(seed)
    args = [arr(rng, (b, ci, h, w)), arr(rng, (co, ci, k, k))] + ([arr(rng, (co,))] if bias else [])
    check_grads(lambda x, wt, *bb: ops.conv2d(x, wt, bb[0] if bb else None, s, p), *args)


def test_conv2d_matches_direct_loop():
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal((4, 3, 3, 2))
    out = ops.conv2d(Tensor(x), Tensor(w), None, stride=(2, 1), padding=(1, 0)).data
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
    ref = np.zeros(out.shape)
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            patch = xp[:, :, 2 * i:2 * i + 3, j:j + 2]
            ref[:, :, i, j] = np.einsum("bchw,ochw->bo", patch, w)
    np.testing.assert_allclose(out, ref, rtol=1e-10)


@pytest.mark.parametrize("c_in, layout", [(2, "planes"), (8, "rows")])
def test_conv2d_both_layouts_match_a_direct_loop_with_their_gradients(c_in, layout):
    from fanin import kernels

    assert kernels.im2col_layout(c_in, 3, 3) == layout  # patch planes for few patch entries, rows for many
    rng = np.random.default_rng(4)
    x, w, bias = rng.standard_normal((3, c_in, 6, 5)), rng.standard_normal((4, c_in, 3, 3)), rng.standard_normal(4)
    out = ops.conv2d(Tensor(x), Tensor(w), Tensor(bias), stride=1, padding=1).data
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ref = np.zeros(out.shape)
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            ref[:, :, i, j] = np.einsum("bchw,ochw->bo", xp[:, :, i:i + 3, j:j + 3], w) + bias
    np.testing.assert_allclose(out, ref, rtol=1e-10)
    check_grads(lambda a, wt, bb: ops.conv2d(a, wt, bb, (2, 1), 1), arr(rng, (2, c_in, 5, 4)),
                arr(rng, (3, c_in, 3, 3)), arr(rng, (3,)))
    xt = Tensor(x.astype(np.float32))  # an input that needs no gradient (a first layer): none computed
    ops.conv2d(xt, Tensor(w.astype(np.float32), requires_grad=True), None, 1, 1).sum().backward()
    assert xt.grad is None


@pytest.mark.parametrize("pool", [ops.max_pool2d, ops.avg_pool2d])
@settings(max_examples=12, deadline=None)
@given(h=st.integers(2, 7), w=st.integers(2, 7), k=st.integers(1, 3), s=st.sampled_from([None, 1, 2]),
       p=st.integers(0, 1), seed=seeds)
def test_pooling(pool, h, w, k, s, p, seed):
    if p > k // 2 or h + 2 * p < k or w + 2 * p < k:
        return
    x = np.random.default_rng(seed).permutation(2 * 2 * h * w).reshape(2, 2, h, w) / 7.0  # distinct values
    check_grads(lambda t: pool(t, k, s, p), x)


def test_max_pool_tiled_values():
    x = np.arange(32, dtype=np.float64).reshape(1, 2, 4, 4)
    out = ops.max_pool2d(Tensor(x), 2).data
    np.testing.assert_array_equal(out[0, 0], [[5, 7], [13, 15]])


@pytest.mark.parametrize("ndim", [2, 4])
@pytest.mark.parametrize("training", [True, False])
@settings(max_examples=10, deadline=None)
@given(seed=seeds)
def test_batch_norm(ndim, training, seed):
    rng = np.random.default_rng(seed)
    shape = (4, 3) if ndim == 2 else (3, 2, 3, 2)
    c = shape[1]
    rm, rv = rng.standard_normal(c), rng.uniform(0.5, 2, c)

    def f(x, g, b):
        return ops.batch_norm(x, g, b, rm.copy(), rv.copy(), training)

    check_grads(f, arr(rng, shape), arr(rng, (c,)), arr(rng, (c,)), rtol=1e-4, atol=1e-6)


def test_batch_norm_running_stats():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3)).astype(np.float32) * 2 + 5
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    ones, zeros = Tensor(np.ones(3, np.float32)), Tensor(np.zeros(3, np.float32))
    out = ops.batch_norm(Tensor(x), ones, zeros, rm, rv, True, momentum=0.5)
    np.testing.assert_allclose(out.data.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(rm, 0.5 * x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(rv, 0.5 + 0.5 * x.var(0, ddof=1), rtol=1e-5)


# -------------------------------------------------------------- the tape itself
def test_shared_subexpression_accumulates():
    x = Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    y = x * x
    z = (y + y * x).sum()  # d/dx (x^2 + x^3) = 2x + 3x^2
    z.backward()
    np.testing.assert_allclose(x.grad, 2 * x.data + 3 * x.data ** 2)


def test_grad_accumulates_across_backward_calls():
    x = Tensor(np.ones(3), requires_grad=True)
    (x * 2).sum().backward()
    (x * 3).sum().backward()
    np.testing.assert_allclose(x.grad, 5)


def test_float32_default_and_float64_kept():
    assert Tensor([1, 2]).dtype == np.float32
    assert Tensor(np.zeros(2)).dtype == np.float64
    assert Tensor(np.zeros(2, np.float32)).dtype == np.float32
    with pytest.raises(TypeError, match="dtype"):
        Tensor(np.array(["a"]))


def test_no_grad_records_nothing():
    from fanin import no_grad

    x = Tensor(np.ones(3), requires_grad=True)
    with no_grad():
        y = (x * 2).sum()
    assert not y.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()


def test_backward_on_non_scalar_explains():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"needs a scalar.*\(2, 3\)"):
        (x * 2).backward()


def test_mismatched_shapes_name_both_and_the_op():
    a, b = Tensor(np.ones((2, 3))), Tensor(np.ones((4, 5)))
    with pytest.raises(ValueError, match=r"matmul.*\(2, 3\).*\(4, 5\)"):
        a @ b
    with pytest.raises(ValueError, match=r"add.*\(2, 3\).*\(4, 5\)"):
        a + b
    with pytest.raises(ValueError, match=r"reshape.*\(2, 3\)"):
        a.reshape(4, 2)


def test_reflected_ops_with_numpy_and_scalars():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = (2.0 - x) * np.array([3.0, 4.0]) + 1 / x
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [-3 - 1, -4 - 0.25])


def test_deep_chain_does_not_recurse():
    x = Tensor(np.ones(2), requires_grad=True)
    y = x
    for _ in range(5000):
        y = y + 1.0
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 1)


# ------------------------------------------------- contracts the mutation run found untested
def test_avg_pool_counts_padding_as_zeros():
    x = np.arange(1, 17, dtype=np.float64).reshape(1, 1, 4, 4)
    out = ops.avg_pool2d(Tensor(x), 2, 2, 1).data
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    want = np.array([[padded[0, 0, i:i + 2, j:j + 2].mean() for j in range(0, 5, 2)] for i in range(0, 5, 2)])
    np.testing.assert_allclose(out[0, 0], want)


def test_pool_and_conv_argument_errors_each_condition():
    x = Tensor(np.ones((1, 2, 5, 3)))
    with pytest.raises(ValueError, match="does not fit"):  # fits in height, not in width
        ops.max_pool2d(x, (2, 4))
    with pytest.raises(ValueError, match="at most half"):  # padding too large in one direction only
        ops.max_pool2d(x, 3, 1, (0, 2))
    with pytest.raises(ValueError, match="3 channels but weight"):  # more channels than the weight takes
        ops.conv2d(Tensor(np.ones((1, 3, 4, 4))), Tensor(np.ones((2, 2, 3, 3))))
    with pytest.raises(ValueError, match=r"input must be \(batch, channels, height, width\)"):
        ops.fanin_conv2d(Tensor(np.ones((2, 4, 4))), np.zeros((2, 1), np.int16), Tensor(np.ones((2, 1))))


def test_batch_norm_feature_mismatch_names_both_counts():
    with pytest.raises(ValueError, match="has 3 features but the layer has 4"):
        ops.batch_norm(Tensor(np.ones((5, 3))), Tensor(np.ones(4)), Tensor(np.zeros(4)), np.zeros(4), np.ones(4), False)


def test_cross_entropy_takes_labels_as_a_tensor():
    z = Tensor(np.array([[2.0, 0.0], [0.0, 3.0]]))
    want = float(ops.cross_entropy(z, np.array([0, 1])).data)
    assert float(ops.cross_entropy(z, Tensor(np.array([0, 1]))).data) == want == float(ops.cross_entropy(z, [0, 1]).data)
    with pytest.raises(TypeError, match="integers"):
        ops.cross_entropy(z, np.array([0.5, 1.0]))


def test_ablated_conv_channels_get_no_value_gradient():
    from fanin import nn

    layer = nn.FanInConv2d(2, 3, 3, k=5, seed=0)
    active = np.array([True, False, True])
    layer.set_connectivity(layer.indices, layer.values.data, active)
    out = layer(Tensor(np.random.default_rng(0).standard_normal((2, 2, 5, 5))))
    out.sum().backward()
    assert np.all(layer.values.grad[1] == 0) and np.any(layer.values.grad[0] != 0)


def test_tensor_defaults_and_argument_forms():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = Tensor(a)
    assert not t.requires_grad and t.data is a  # wraps the array: no copy
    assert Tensor(a, dtype=np.float32).data is a
    assert t.sum(axis=0).shape == (3,) and t.mean(axis=1).shape == (2,)
    assert t.reshape((3, 2)).shape == (3, 2) and t.reshape(3, 2).shape == (3, 2)
    assert t.transpose((1, 0)).shape == (3, 2) and t.transpose(1, 0).shape == (3, 2)
    with pytest.raises(RuntimeError, match="needs a scalar"):
        (Tensor(np.zeros(0), requires_grad=True) * 2).backward()  # an empty tensor is not a scalar either
    with pytest.raises(TypeError):
        t.reshape((3, 2), 1)  # a shape tuple and more: not a shape


def test_broadcasting_against_an_empty_array_gives_zero_gradients():
    a, b = Tensor(np.ones(1), requires_grad=True), Tensor(np.ones(0), requires_grad=True)
    (a + b).sum().backward()
    assert a.grad.shape == (1,) and a.grad[0] == 0 and b.grad.shape == (0,)


def test_an_exclusive_gradient_is_adopted_without_a_copy_and_foreign_dtypes_are_cast():
    leaf = Tensor(np.ones(3), requires_grad=True)
    fresh = np.array([1.0, 2.0, 3.0])
    Tensor._make(leaf.data * 1.0, (leaf,), lambda g: (fresh,)).sum().backward()
    assert leaf.grad is fresh  # nothing else holds it: no copy
    leaf64 = Tensor(np.ones(3), requires_grad=True)
    Tensor._make(leaf64.data * 1.0, (leaf64,), lambda g: (np.ones(3, np.float32),)).sum().backward()
    assert leaf64.grad.dtype == np.float64


def test_packed_gradients_reach_ordinary_ops_as_rows_and_add_up():
    """A packed layer's input gradient flowing into an ordinary op (mul), and two packed consumers of one
    packed activation whose gradients are summed in the packed form."""
    from fanin import nn

    rng = np.random.default_rng(0)
    l1, l2, l3 = nn.FanInLinear(12, 10, k=4, seed=0), nn.FanInLinear(10, 6, k=3, seed=1), \
        nn.FanInLinear(10, 5, k=3, seed=2)
    x0 = Tensor(rng.standard_normal((40, 12)).astype(np.float32), requires_grad=True)
    h = ops.relu(l1(x0 * 1.5))
    loss = (l2(h) * Tensor(rng.standard_normal((40, 6)).astype(np.float32))).sum() + l3(h).sum()
    loss.backward()
    w1, w2, w3 = l1.to_dense(), l2.to_dense(), l3.to_dense()
    pre = (x0.data * 1.5) @ w1.T + l1.bias.data
    rng2 = np.random.default_rng(0)  # the same chain in NumPy, with the same random upstream gradient
    rng2.standard_normal((40, 12))
    up = rng2.standard_normal((40, 6)).astype(np.float32)
    g_h = up @ w2 + np.ones((40, 5), np.float32) @ w3
    g_x0 = ((g_h * (pre > 0)) @ w1) * 1.5
    np.testing.assert_allclose(x0.grad, g_x0, rtol=1e-4, atol=1e-5)
    from fanin.tensor import Panels
    p = Panels(np.ones((4, 32), np.float32), 3)
    assert p.shape == (3, 4) and (p + p).array.sum() == 2 * 4 * 32
    assert isinstance(h, fanin_tensor_panel()) and h.size == 40 * 10 and len(h) == 40


def fanin_tensor_panel():
    from fanin.tensor import _PanelTensor
    return _PanelTensor
