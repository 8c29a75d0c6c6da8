"""FanInLinear / FanInConv2d: construction, conversion, and gradients equal to the dense layer's."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fanin import Tensor, nn, ops


def random_constant_fanin(rng, n_out, n_in, k, inactive=()):
    w = np.zeros((n_out, n_in), np.float32)
    for j in range(n_out):
        if j in inactive:
            continue
        cols = rng.choice(n_in, k, replace=False)
        w[j, cols] = rng.standard_normal(k).astype(np.float32) + np.sign(rng.standard_normal(k)) * 0.1
    return w


@settings(max_examples=25, deadline=None)
@given(n_out=st.integers(1, 12), n_in=st.integers(1, 40), b=st.integers(1, 9), seed=st.integers(0, 9999),
       data=st.data())
def test_fanin_linear_matches_dense_linear_forward_and_grads(n_out, n_in, b, seed, data):
    k = data.draw(st.one_of(st.just(n_in), st.integers(1, n_in)))  # k == n_in: the layer's BLAS path
    rng = np.random.default_rng(seed)
    inactive = set(data.draw(st.lists(st.integers(0, n_out - 1), max_size=n_out - 1)))
    w = random_constant_fanin(rng, n_out, n_in, k, inactive)
    bias = rng.standard_normal(n_out).astype(np.float32)
    layer = nn.FanInLinear.from_dense(w, bias)
    np.testing.assert_array_equal(layer.to_dense(), w)
    assert np.all(np.diff(layer.indices[layer.active].astype(int), axis=1) > 0)

    x = rng.standard_normal((b, n_in)).astype(np.float32)
    dy = rng.standard_normal((b, n_out)).astype(np.float32)
    xt = Tensor(x, requires_grad=True)
    out = layer(xt)
    np.testing.assert_allclose(out.data, x @ w.T + bias, rtol=1e-4, atol=1e-4)
    (out * Tensor(dy)).sum().backward()

    wt, bt, xd = Tensor(w, requires_grad=True), Tensor(bias, requires_grad=True), Tensor(x, requires_grad=True)
    (ops.linear(xd, wt, bt) * Tensor(dy)).sum().backward()
    np.testing.assert_allclose(xt.grad, xd.grad, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.bias.grad, bt.grad, rtol=1e-4, atol=1e-4)
    active = layer.active
    expected_dv = np.take_along_axis(wt.grad, layer.indices.astype(np.int64), axis=1)
    np.testing.assert_allclose(layer.values.grad[active], expected_dv[active], rtol=1e-4, atol=1e-4)
    assert np.all(layer.values.grad[~active] == 0)  # ablated neurons stay empty


def test_full_fanin_blas_path_equals_the_condensed_kernels():
    rng = np.random.default_rng(3)
    layer = nn.FanInLinear(50, 7, sparsity=None, k=50, seed=0)
    active = np.ones(7, bool)
    active[2] = False
    layer.set_connectivity(layer.indices, layer.values.data, active)  # zeroes row 2's values
    x = Tensor(rng.standard_normal((40, 50)).astype(np.float32), requires_grad=True)
    dy = Tensor(rng.standard_normal((40, 7)).astype(np.float32))
    grads = []
    for dense in (True, False):
        x.grad = layer.values.grad = layer.bias.grad = None
        y = ops.fanin_linear(x, layer.indices, layer.values, layer.bias, layer.active, dense=dense)
        (y * dy).sum().backward()
        grads.append((y.data, x.grad, layer.values.grad, layer.bias.grad))
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert np.all(grads[0][2][2] == 0)
    with pytest.raises(ValueError, match="dense=True needs fan-in == n_in"):
        ops.fanin_linear(x, layer.indices[:, :10], nn.Parameter(layer.values.data[:, :10]), dense=True)


@settings(max_examples=12, deadline=None)
@given(c_in=st.integers(1, 4), c_out=st.integers(1, 5), hw=st.integers(3, 7), ksz=st.integers(1, 3),
       stride=st.integers(1, 2), pad=st.integers(0, 1), b=st.integers(1, 3), seed=st.integers(0, 9999),
       data=st.data())
def test_fanin_conv_matches_dense_conv(c_in, c_out, hw, ksz, stride, pad, b, seed, data):
    rng = np.random.default_rng(seed)
    n_in = c_in * ksz * ksz
    k = data.draw(st.integers(1, n_in))
    w = random_constant_fanin(rng, c_out, n_in, k).reshape(c_out, c_in, ksz, ksz)
    bias = rng.standard_normal(c_out).astype(np.float32)
    layer = nn.FanInConv2d.from_dense(w, bias, stride=stride, padding=pad)
    np.testing.assert_array_equal(layer.to_dense(), w)
    x = rng.standard_normal((b, c_in, hw, hw)).astype(np.float32)
    xt = Tensor(x, requires_grad=True)
    out = layer(xt)
    xd, wt, bt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True), Tensor(bias, requires_grad=True)
    ref = ops.conv2d(xd, wt, bt, stride, pad)
    np.testing.assert_allclose(out.data, ref.data, rtol=1e-4, atol=1e-4)
    dy = rng.standard_normal(out.shape).astype(np.float32)
    (out * Tensor(dy)).sum().backward()
    (ref * Tensor(dy)).sum().backward()
    np.testing.assert_allclose(xt.grad, xd.grad, rtol=1e-4, atol=1e-4)
    dv = np.take_along_axis(wt.grad.reshape(c_out, -1), layer.indices.astype(np.int64), axis=1)
    np.testing.assert_allclose(layer.values.grad, dv, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.bias.grad, bt.grad, rtol=1e-4, atol=1e-4)


def test_random_init_constant_fanin_sorted_distinct_and_sparse_kaiming():
    layer = nn.FanInLinear(1000, 300, sparsity=0.9, seed=0)
    assert layer.indices.shape == (300, 100) and layer.indices.dtype == np.int16
    assert np.all(np.diff(layer.indices.astype(int), axis=1) > 0)
    assert layer.sparsity == pytest.approx(0.9)
    assert abs(layer.values.data.std() - np.sqrt(2 / 100)) < 0.01  # initialised for the sparse fan-in
    big = nn.FanInLinear(40000, 2, sparsity=0.999, seed=0)
    assert big.indices.dtype == np.int32 and big.k == 40


def test_same_seed_same_layer():
    a, b = nn.FanInLinear(50, 20, 0.8, seed=3), nn.FanInLinear(50, 20, 0.8, seed=3)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.values.data, b.values.data)


def test_from_dense_names_rows_with_unequal_counts():
    w = np.zeros((4, 6), np.float32)
    w[0, :2] = 1
    w[1, :3] = 1
    w[3, 1:3] = 1
    with pytest.raises(ValueError, match="row 1: 3"):
        nn.FanInLinear.from_dense(w)
    with pytest.raises(ValueError, match="every row is zero"):
        nn.FanInLinear.from_dense(np.zeros((2, 3), np.float32))
    with pytest.raises(TypeError, match="2-D float"):
        nn.FanInLinear.from_dense(np.ones((2, 3), np.int64))


def test_bad_sparsity_is_explained():
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        nn.FanInLinear(10, 10, sparsity=1.5)
    with pytest.raises(ValueError, match="fewer than one input"):
        nn.FanInLinear(10, 10, sparsity=0.95)
    with pytest.raises(ValueError, match=r"expected \(batch, 10\)"):
        nn.FanInLinear(10, 4, sparsity=0.5)(np.ones((2, 9), np.float32))


def test_state_dict_roundtrip_with_different_fanin():
    a = nn.FanInLinear(30, 8, sparsity=0.5, seed=0)
    b = nn.FanInLinear(30, 8, sparsity=0.8, seed=1)
    b.load_state_dict(a.state_dict())
    assert b.k == a.k
    np.testing.assert_array_equal(b.to_dense(), a.to_dense())


def test_input_gradient_follows_a_connectivity_change():
    """The cached transposed structure must be rebuilt when the topology changes."""
    rng = np.random.default_rng(0)
    layer = nn.FanInLinear(30, 12, sparsity=0.7, seed=0)
    x = rng.standard_normal((16, 30)).astype(np.float32)
    for step in range(2):
        xt = Tensor(x, requires_grad=True)
        layer(xt).sum().backward()
        np.testing.assert_allclose(xt.grad, np.ones((16, 12), np.float32) @ layer.to_dense(), rtol=1e-5, atol=1e-5)
        new = nn.FanInLinear(30, 12, sparsity=0.5, seed=step + 1)
        layer.set_connectivity(new.indices, new.values.data, np.ones(12, bool))


@settings(max_examples=20, deadline=None)
@given(b=st.sampled_from([3, 8, 9, 31, 32, 33, 70]), seed=st.integers(0, 9999), extra=st.booleans())
def test_packed_activations_give_the_dense_network_s_grads(b, seed, extra):
    """Sparse -> ReLU -> sparse -> ReLU -> dense classifier: from batch 8 on activations and their gradients
    stay packed between layers (tensor.Panels); outputs and every gradient equal the dense network's."""
    from fanin.tensor import panels_of

    rng = np.random.default_rng(seed)
    ws = [random_constant_fanin(rng, 12, 20, 5), random_constant_fanin(rng, 9, 12, 4, inactive={2}),
          random_constant_fanin(rng, 4, 9, 9)]
    bs = [rng.standard_normal(w.shape[0]).astype(np.float32) for w in ws]
    layers = [nn.FanInLinear.from_dense(w, bias) for w, bias in zip(ws, bs)]
    x = rng.standard_normal((b, 20)).astype(np.float32)
    dy = rng.standard_normal((b, 4)).astype(np.float32)
    c = rng.standard_normal((b, 12)).astype(np.float32)

    xt = Tensor(x, requires_grad=True)
    h1 = ops.relu(layers[0](xt))
    assert (panels_of(h1) is not None) == (b >= 8)
    out = layers[2](ops.relu(layers[1](h1)))
    loss = (out * Tensor(dy)).sum()
    if extra:  # a second, ordinary consumer of the packed h1: its gradient is summed with the packed one
        loss = loss + (h1 * Tensor(c)).sum()
    loss.backward()

    dense = [(Tensor(w, requires_grad=True), Tensor(bias, requires_grad=True)) for w, bias in zip(ws, bs)]
    xd = Tensor(x, requires_grad=True)
    g1 = ops.relu(ops.linear(xd, *dense[0]))
    ref = ops.linear(ops.relu(ops.linear(g1, *dense[1])), *dense[2])
    ref_loss = (ref * Tensor(dy)).sum()
    if extra:
        ref_loss = ref_loss + (g1 * Tensor(c)).sum()
    ref_loss.backward()

    np.testing.assert_allclose(out.data, ref.data, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(h1.data, g1.data, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(xt.grad, xd.grad, rtol=1e-4, atol=1e-4)
    assert isinstance(xt.grad, np.ndarray) and xt.grad.shape == x.shape  # leaves get ordinary arrays
    for layer, (wt, bt) in zip(layers, dense):
        expected = np.take_along_axis(wt.grad, layer.indices.astype(np.int64), axis=1)
        active = layer.active
        np.testing.assert_allclose(layer.values.grad[active], expected[active], rtol=1e-4, atol=1e-4)
        assert np.all(layer.values.grad[~active] == 0)
        np.testing.assert_allclose(layer.bias.grad, bt.grad, rtol=1e-4, atol=1e-4)


def test_a_training_step_returns_its_packed_buffers_without_the_garbage_collector():
    """Packed activations live in the huge-page pool; a step's buffers must be freed by reference counting
    alone (a reference cycle would keep them until a GC pass and grow the pool every step)."""
    import gc

    from fanin.kernels import memory

    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.FanInLinear(300, 256, sparsity=0.8, seed=0), nn.ReLU(),
                          nn.FanInLinear(256, 256, sparsity=0.8, seed=1), nn.ReLU(),
                          nn.FanInLinear(256, 10, sparsity=None, k=256, seed=2))
    x = rng.standard_normal((128, 300)).astype(np.float32)
    labels = rng.integers(0, 10, 128)
    gc.disable()
    try:
        before = memory.stats()["in_use"]
        for _ in range(3):
            loss = ops.cross_entropy(model(Tensor(x)), labels)
            loss.backward()
            del loss
            assert memory.stats()["in_use"] == before
    finally:
        gc.enable()
