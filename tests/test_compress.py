"""Self-compression (SPEC.md §3): the quantizer and its straight-through gradients, the size term, and
channel removal that leaves the network's function unchanged."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fanin import Tensor, compress, nn, ops, optim, sparsity

LN2 = math.log(2.0)


def quantize_twin(w, b, e):
    """SPEC.md §3, written out in float64 NumPy."""
    w = np.asarray(w, np.float64)
    b = np.asarray(b, np.float64)[:, None]
    e = np.asarray(e, np.float64)[:, None]
    q = 2.0 ** e * np.round(np.clip(2.0 ** -e * w, -2.0 ** (b - 1), 2.0 ** (b - 1) - 1))
    return np.where(b > 0, q, 0.0)


def ste_twin(g, w, b, e):
    """The gradients the module docstring derives, in float64."""
    w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
    b = np.asarray(b, np.float64)[:, None]
    e = np.asarray(e, np.float64)[:, None]
    y = 2.0 ** -e * w
    lo, hi = -2.0 ** (b - 1), 2.0 ** (b - 1) - 1
    q = quantize_twin(w, b[:, 0], e[:, 0])
    inside, above, below = (y >= lo) & (y <= hi), y > hi, y < lo
    on = b > 0
    dw = np.where(inside & on, g, 0.0)
    db = (g * np.where(on, LN2 * 2.0 ** e * 2.0 ** (b - 1) * (above.astype(float) - below), 0.0)).sum(1)
    de = (g * np.where(on, LN2 * np.where(inside, q - w, q), 0.0)).sum(1)
    return dw, db, de


channels = st.integers(1, 6)


@settings(max_examples=60, deadline=None)
@given(n=channels, k=st.integers(1, 40), seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([np.float32, np.float64]))
def test_quantize_matches_the_formula(n, k, seed, dtype):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 3)).astype(dtype)
    b = rng.choice([0.0, -1.0, 0.3, 1.0, 2.5, 4.0, 7.9], n)
    e = rng.uniform(-6, 2, n)  # negative and fractional exponents
    got = compress.quantize(w, b, e)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, quantize_twin(w, b, e), rtol=1e-6 if dtype == np.float32 else 1e-12, atol=0)
    assert np.all(got[b <= 0] == 0)


def test_clamping_at_both_ends_and_rounding_half_to_even():
    w = np.array([[-100.0, -2.5, -0.5, 0.5, 1.5, 2.5, 100.0]])
    q = compress.quantize(w, np.array([3.0]), np.array([0.0]))  # range [-4, 3]
    np.testing.assert_array_equal(q, [[-4, -2, -0.0, 0, 2, 2, 3]])
    q = compress.quantize(w, np.array([3.0]), np.array([1.0]))  # steps of 2, range [-8, 6]
    np.testing.assert_array_equal(q, [[-8, -2, 0, 0, 2, 2, 6]])


def test_integer_weights_reproduce_the_quantized_values_bit_for_bit():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 50)).astype(np.float32)
    b = np.array([0, 1.5, 2, 3.7, 4, 5.2, 8, 0.5])
    e = rng.uniform(-5, 0, 8)
    r, s = compress.integer_weights(w, b, e)
    q = compress.quantize(w, b, e)
    np.testing.assert_array_equal(s[:, None] * r.astype(np.float32), q)
    for i, bits in enumerate(b):  # ceil(b) signed bits hold each row
        lim = 2 ** (math.ceil(bits) - 1) if bits > 0 else 0
        assert r[i].min() >= -lim and r[i].max() <= max(lim - 1, 0)


@settings(max_examples=40, deadline=None)
@given(n=channels, k=st.integers(1, 30), seed=st.integers(0, 2**31 - 1))
def test_ste_gradients_match_the_derived_formulas(n, k, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k))
    b = rng.choice([0.0, 0.7, 1.0, 2.3, 3.0, 5.5], n)
    e = rng.uniform(-3, 1, n)
    g = rng.standard_normal((n, k))
    wt, bt, et = (Tensor(a.copy(), requires_grad=True) for a in (w, b, e))
    (ops.quantize(wt, bt, et) * Tensor(g)).sum().backward()
    dw, db, de = ste_twin(g, w, b, e)
    np.testing.assert_allclose(wt.grad, dw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bt.grad, db, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(et.grad, de, rtol=1e-10, atol=1e-12)


def test_ste_gradients_are_finite_differences_of_the_surrogate():
    """Away from rounding steps and clamp edges, the STE gradient is the derivative of
    2**e * (clamp(2**-e w) + (rint - clamp) held constant): check it by central differences."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 12)) * 2
    b = np.array([2.2, 3.1, 4.4, 1.6])
    e = np.array([-0.7, -1.3, 0.2, -0.1])
    g = rng.standard_normal((4, 12))
    y = 2.0 ** -e[:, None] * w
    offset = np.round(np.clip(y, -2.0 ** (b[:, None] - 1), 2.0 ** (b[:, None] - 1) - 1)) - \
        np.clip(y, -2.0 ** (b[:, None] - 1), 2.0 ** (b[:, None] - 1) - 1)

    def surrogate(w, b, e):
        lo, hi = -2.0 ** (b[:, None] - 1), 2.0 ** (b[:, None] - 1) - 1
        return float((g * 2.0 ** e[:, None] * (np.clip(2.0 ** -e[:, None] * w, lo, hi) + offset)).sum())

    wt, bt, et = (Tensor(a.copy(), requires_grad=True) for a in (w, b, e))
    (ops.quantize(wt, bt, et) * Tensor(g)).sum().backward()
    h = 1e-6
    for arr, grad in ((w, wt.grad), (b, bt.grad), (e, et.grad)):
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + h
            fp = surrogate(w, b, e)
            arr[idx] = old - h
            fm = surrogate(w, b, e)
            arr[idx] = old
            num[idx] = (fp - fm) / (2 * h)
        np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-6)


def test_quantize_op_rejects_bad_shapes():
    with pytest.raises(ValueError, match="one value per channel"):
        ops.quantize(Tensor(np.ones((3, 4))), Tensor(np.ones(2)), Tensor(np.ones(3)))
    with pytest.raises(TypeError, match="float32 or float64"):
        compress.quantize(np.ones((2, 2), np.int32), np.ones(2), np.ones(2))
    w = np.array([[0.3, -200.0, 5.0], [1.0, 2.0, 3.0]], np.float32)
    for b, e, name in (([np.nan, 2], [0, 0], "b"), ([2, 2], [0, np.inf], "e"), ([2, -np.inf], [0, 0], "b")):
        with pytest.raises(ValueError, match=f"{name} holds NaN or Inf"):  # NaN bits skipped the clamp before
            compress.quantize(w, b, e)
    empty = compress.quantize(np.zeros((0, 5), np.float32), np.zeros(0), np.zeros(0))
    assert empty.shape == (0, 5) and empty.dtype == np.float32


# ------------------------------------------------------------------ SelfCompression
def test_attach_initialises_from_the_weights_and_counts_bits():
    model = nn.Sequential(nn.Linear(20, 6, seed=0), nn.ReLU(), nn.FanInLinear(6, 4, k=3, seed=1))
    sc = compress.SelfCompression(model, gamma=0.1, init_bits=6)
    lin, fan = model[0], model[2]
    np.testing.assert_array_equal(lin.bits.data, 6.0)
    top = np.abs(lin.weight.data).max(axis=1)
    np.testing.assert_allclose(2.0 ** lin.exponent.data * 31, top, rtol=1e-5)  # largest weight just fits
    assert sc.size_bits() == pytest.approx(6 * (6 * 20 + 4 * 3))
    assert sc.n_weights == 6 * 20 + 4 * 3
    loss = sc.size_loss()
    assert float(loss.data) == pytest.approx(0.1 * 6)
    loss.backward()
    np.testing.assert_allclose(lin.bits.grad, 0.1 * 20 / sc.n_weights, rtol=1e-5)
    np.testing.assert_allclose(fan.bits.grad, 0.1 * 3 / sc.n_weights, rtol=1e-5)
    r = sc.report()
    assert r["fp32_dense_bits"] == 32 * (120 + 24)
    assert r["index_bits"] == 4 * 3 * 3  # k * ceil(log2 6) per neuron
    assert r["bits_pct"] == pytest.approx(100 * sc.size_bits() / (32 * 144))


def test_the_quantized_forward_is_what_the_layer_computes():
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(10, 5, seed=0))
    compress.SelfCompression(model, init_bits=2)
    x = rng.standard_normal((3, 10)).astype(np.float32)
    lin = model[0]
    wq = compress.quantize(lin.weight.data, lin.bits.data, lin.exponent.data)
    assert len(np.unique(wq)) <= 5 * 4
    np.testing.assert_allclose(model(Tensor(x)).data, x @ wq.T + lin.bias.data, rtol=1e-6)


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Linear(10, 5, seed=0), (3, 10)),
    (lambda: nn.Conv2d(2, 4, 3, padding=1, seed=0), (2, 2, 6, 6)),
    (lambda: nn.FanInLinear(10, 5, k=4, seed=0), (3, 10)),
    (lambda: nn.FanInConv2d(2, 4, 3, k=7, seed=0), (2, 2, 6, 6)),
])
def test_every_compressible_layer_computes_with_its_quantized_weights(make, shape):
    rng = np.random.default_rng(1)
    layer, twin = make(), make()
    compress.SelfCompression(nn.Sequential(layer), init_bits=2.5)
    w = layer.weight_param.data
    twin.weight_param.data = compress.quantize(w, layer.bits.data, layer.exponent.data)
    assert not np.array_equal(twin.weight_param.data, w)
    x = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(layer(Tensor(x)).data, twin(Tensor(x)).data, rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_explained():
    model = nn.Sequential(nn.Linear(4, 3, seed=0), nn.ReLU(), nn.BatchNorm1d(3), nn.Linear(3, 2, seed=0))
    for gamma in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="gamma"):
            compress.SelfCompression(model, gamma=gamma)
    with pytest.raises(TypeError, match="'2' is a BatchNorm1d"):
        compress.SelfCompression(model, layers=["2"])
    with pytest.raises(ValueError, match="not a layer"):
        compress.SelfCompression(model, layers=["nope"])
    with pytest.raises(ValueError, match="no compressible layers"):
        compress.SelfCompression(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match="model must be a fanin.nn.Module"):
        compress.SelfCompression(np.ones(3))
    for bits in (0.5, 17, float("nan")):
        with pytest.raises(ValueError, match="init_bits"):
            compress.SelfCompression(model, init_bits=bits)
    opt = optim.SGD(model.parameters(), lr=0.1)
    compress.SelfCompression(model, optimizer=opt)
    with pytest.raises(ValueError, match="already compressed"):
        compress.SelfCompression(model)


# --------------------------------------------------------------- channel removal
def _random_state(model, rng):
    for m in model.modules():
        if isinstance(m, nn._BatchNorm):
            m.running_mean[...] = rng.uniform(-0.5, 0.5, m.num_features)
            m.running_var[...] = rng.uniform(0.5, 2, m.num_features)
            m.weight.data[...] = rng.uniform(0.5, 1.5, m.num_features)
            m.bias.data[...] = rng.uniform(-0.5, 0.5, m.num_features)
        if isinstance(m, compress.COMPRESSIBLE) and getattr(m, "bias", None) is not None:
            m.bias.data[...] = rng.uniform(-0.5, 0.5, m.bias.shape)


def _removal_case(model, x, zero, rng, steps=1):
    """Zero the bits of channels ``zero`` (layer index -> channels), step, and return (before, after, sc, opt)."""
    _random_state(model, rng)
    opt = optim.SGD(model.parameters(), lr=1e-30, momentum=0.9)  # makes state, moves nothing
    sc = compress.SelfCompression(model, gamma=0.0, optimizer=opt, seed=0)
    for layer_index, chans in zero.items():
        model[layer_index].bits.data[chans] = 0.0
    model.train()
    loss = (model(Tensor(x)) * 1.0).sum()
    loss.backward()
    opt.step()
    for p in sc.optimizer.params:  # b and e stay where they are: the comparison isolates the removal
        p.grad = None
    model.eval()
    before = model(Tensor(x)).data.copy()
    sc.step()
    after = model(Tensor(x)).data
    return before, after, sc, opt


def _assert_constant_fan_in(layer):
    idx = layer.indices.astype(np.int64)
    rows = idx[layer.active]
    assert rows.shape[1] == layer.k and layer.k <= layer.n_in
    assert np.all(np.diff(rows, axis=1) > 0) and rows.min() >= 0 and rows.max() < layer.n_in


def test_removing_linear_channels_keeps_the_function_and_shrinks_everything():
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(8, 6, seed=0), nn.ReLU(), nn.Linear(6, 5, seed=1), nn.ReLU(),
                          nn.Linear(5, 3, seed=2))
    x = rng.standard_normal((7, 8)).astype(np.float32)
    before, after, sc, opt = _removal_case(model, x, {0: [1, 4], 2: [0]}, rng)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    assert model[0].weight.shape == (4, 8) and model[0].bias.shape == (4,) and model[0].bits.shape == (4,)
    assert model[2].weight.shape == (4, 4) and model[4].weight.shape == (3, 4)
    assert opt.state[model[0].weight]["momentum"].shape == (4, 8)
    assert opt.state[model[2].weight]["momentum"].shape == (4, 4)
    assert sc.optimizer.state.get(model[0].bits, {}).get("m", np.zeros(4)).shape == (4,)
    assert [h["channels"] for h in sc.history] == [[1, 4], [0]]
    assert sc.report()["channels"] == [4, 4, 3]


def test_removing_condensed_channels_refills_constant_fan_in():
    rng = np.random.default_rng(1)
    model = nn.Sequential(nn.FanInLinear(12, 10, k=4, seed=0), nn.ReLU(), nn.FanInLinear(10, 6, k=5, seed=1),
                          nn.ReLU(), nn.Linear(6, 2, seed=2))
    active = np.ones(6, bool)
    active[3] = False  # an ablated neuron in the consumer
    model[2].set_connectivity(model[2].indices, model[2].values.data, active)
    x = rng.standard_normal((9, 12)).astype(np.float32)
    before, after, sc, opt = _removal_case(model, x, {0: [0, 2, 5, 7, 8]}, rng)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    consumer = model[2]
    assert model[0].n_out == 5 and consumer.n_in == 5 and consumer.k == 5
    _assert_constant_fan_in(consumer)
    assert not consumer.active[3]
    assert opt.state[consumer.values]["momentum"].shape == consumer.values.shape


def test_removing_a_few_condensed_inputs_keeps_k_and_starts_new_slots_at_zero():
    rng = np.random.default_rng(2)
    model = nn.Sequential(nn.Linear(5, 30, seed=0), nn.ReLU(), nn.FanInLinear(30, 8, k=6, seed=1))
    x = rng.standard_normal((4, 5)).astype(np.float32)
    held_before = model[2].indices.copy()
    removed = [int(held_before[0, 0]), int(held_before[1, 2])]
    before, after, sc, opt = _removal_case(model, x, {0: removed}, rng)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    consumer = model[2]
    assert consumer.k == 6 and consumer.n_in == 28
    _assert_constant_fan_in(consumer)
    renumber = np.cumsum(~np.isin(np.arange(30), removed)) - 1
    for j in range(8):  # each slot that read a removed input now holds a new input, at weight 0
        kept = [renumber[i] for i in held_before[j] if i not in removed]
        new = sorted(set(consumer.indices[j]) - set(kept))
        assert len(new) == sum(i in removed for i in held_before[j])
        assert all(consumer.values.data[j, list(consumer.indices[j]).index(n)] == 0 for n in new)


def test_removing_conv_channels_through_batch_norm_pool_and_flatten():
    rng = np.random.default_rng(3)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1, bias=False, seed=0), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 4 * 4, 5, seed=1))
    x = rng.standard_normal((3, 2, 8, 8)).astype(np.float32)
    before, after, sc, opt = _removal_case(model, x, {0: [1, 3]}, rng)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    assert model[0].weight.shape == (4, 2, 3, 3)
    bn = model[1]
    assert bn.num_features == 4 and bn.running_mean.shape == (4,) and bn.weight.shape == (4,)
    assert model[5].weight.shape == (5, 4 * 16)
    assert opt.state[bn.weight]["momentum"].shape == (4,)


@pytest.mark.parametrize("condensed", [False, True])
def test_conv_into_conv_without_padding_folds_exactly(condensed):
    rng = np.random.default_rng(4)
    second = nn.FanInConv2d(5, 4, 3, k=20, seed=1) if condensed else nn.Conv2d(5, 4, 3, seed=1)
    model = nn.Sequential(nn.Conv2d(2, 5, 3, seed=0), nn.BatchNorm2d(5), nn.ReLU(), second, nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 3, seed=2))
    x = rng.standard_normal((2, 2, 10, 10)).astype(np.float32)
    before, after, sc, opt = _removal_case(model, x, {0: [0, 3]}, rng)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    assert model[3].c_in == 3 if condensed else model[3].in_channels == 3
    if condensed:
        _assert_constant_fan_in(model[3])


def test_a_padded_conv_consumer_waits_for_a_zero_constant_under_an_l1_push():
    rng = np.random.default_rng(5)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False, seed=0), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 3, 3, padding=1, seed=1), nn.Flatten(), nn.Linear(3 * 6 * 6, 2, seed=2))
    x = rng.standard_normal((2, 1, 6, 6)).astype(np.float32)
    _random_state(model, rng)
    bn = model[1]
    bn.bias.data[2] = 0.3  # channel 2's constant relu(BN(0)) is positive: folding would be wrong at the border
    bn.running_mean[2] = -0.2
    opt = optim.SGD(model.parameters(), lr=0.1)
    sc = compress.SelfCompression(model, gamma=0.0, optimizer=opt, l1=1.0)
    model[0].bits.data[2] = 0.0
    sc.step()
    assert model[0].weight.shape[0] == 4 and sc.pending["0"][2]  # kept, pending
    loss = sc.size_loss()
    assert float(loss.data) == pytest.approx(0.3)  # l1 * |relu(beta)| in training mode
    loss.backward()
    assert bn.bias.grad[2] == pytest.approx(1.0) and np.all(bn.bias.grad[[0, 1, 3]] == 0)
    bn.bias.data[2] = -1.0  # what the L1 push leads to: the constant is 0 in both modes
    model.eval()
    before = model(Tensor(x)).data.copy()
    sc.step()
    np.testing.assert_allclose(model(Tensor(x)).data, before, rtol=1e-5, atol=1e-6)
    assert model[0].weight.shape[0] == 3 and not sc.pending["0"].any()


def test_output_layer_channels_are_never_removed():
    model = nn.Sequential(nn.Linear(4, 3, seed=0), nn.ReLU(), nn.Linear(3, 2, seed=1))
    sc = compress.SelfCompression(model)
    model[2].bits.data[:] = 0
    sc.step()
    assert model[2].weight.shape == (2, 3)


# ------------------------------------------------------------------- training
def _toy(n=256, d=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = (x[:, :3].sum(1) > 0).astype(np.int64) + (x[:, 3] > 1)
    return x, y


def test_training_shrinks_the_network_and_keeps_going():
    x, y = _toy()
    model = nn.Sequential(nn.Linear(12, 32, seed=0), nn.ReLU(), nn.FanInLinear(32, 16, k=8, seed=1), nn.ReLU(),
                          nn.Linear(16, 3, seed=2))
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sc = compress.SelfCompression(model, gamma=2.0, optimizer=opt, lr=0.2, init_bits=4)
    losses = []
    for step in range(150):
        b = slice((step * 32) % 256, (step * 32) % 256 + 32)
        task = ops.cross_entropy(model(Tensor(x[b])), y[b])
        loss = task + sc.size_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sc.step()
        losses.append(float(task.data))
    assert sc.history, "gamma 2 must remove channels"
    assert model[0].out_features < 32 and model[2].n_in == model[0].out_features
    _assert_constant_fan_in(model[2])
    assert sc.report()["bits_pct"] < 100 * 4 / 32
    assert np.isfinite(losses).all() and np.mean(losses[-20:]) < np.mean(losses[:20])


def test_with_srigl_budgets_follow_the_shrunk_layers():
    x, y = _toy(seed=1)
    model = nn.Sequential(nn.FanInLinear(12, 40, k=6, seed=0), nn.ReLU(), nn.FanInLinear(40, 20, k=10, seed=1),
                          nn.ReLU(), nn.Linear(20, 3, seed=2))
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    srigl = sparsity.SRigL(model, opt, sparsity=0.7, distribution="uniform", delta_t=10, total_steps=200)
    sc = compress.SelfCompression(model, gamma=3.0, optimizer=opt, lr=0.3, init_bits=3, srigl=srigl)
    for step in range(120):
        b = slice((step * 32) % 256, (step * 32) % 256 + 32)
        loss = ops.cross_entropy(model(Tensor(x[b])), y[b]) + sc.size_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        srigl.step()
        sc.step()
    assert sc.history and srigl.history
    for i, (_, layer) in enumerate(srigl.layers):
        _assert_constant_fan_in(layer)
        assert srigl._shapes[i] == (layer.n_out, layer.n_in)
        assert srigl.budgets[i] >= layer.n_out


# ---------------------------------------------------------------- checkpoints
def _compressing_run(srigl_on):
    from fanin import models

    model = models.mlp([12, 40, 24, 3], sparsity=0.6 if srigl_on else None, seed=0)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = optim.CosineSchedule(opt, total_steps=4 * 8)
    upd = sparsity.SRigL(model, opt, sparsity=0.6, delta_t=3, t_end=24, gamma_sal=0.5) if srigl_on else None
    sc = compress.SelfCompression(model, gamma=0.5, init_bits=3, optimizer=opt, lr=0.2, srigl=upd)
    return model, opt, sched, upd, sc, np.random.default_rng(0)


@pytest.mark.parametrize("srigl_on", [False, True])
def test_resume_of_a_compressing_run_is_bit_identical(tmp_path, srigl_on):
    from fanin.checkpoint import load_checkpoint, restore_training_state, save_checkpoint, training_state
    from fanin.train import fit

    x, y = _toy(n=256, seed=3)
    model, opt, sched, upd, sc, rng = _compressing_run(srigl_on)
    hooks = [h for h in (upd, sc) if h is not None]
    fit(model, opt, (x, y), epochs=4, batch_size=32, schedule=sched, hooks=hooks, loss_terms=[sc.size_loss],
        progress=False, rng=rng,
        on_epoch_end=lambda e, r: e == 2 and save_checkpoint(tmp_path / "c.npz", training_state(
            model, opt, sched, upd, r, e, [], sc)))
    steps = [h["step"] for h in sc.history]
    assert min(steps) <= 16 < max(steps), "the run must remove channels before and after the checkpoint (step 16)"
    model2, opt2, sched2, upd2, sc2, rng2 = _compressing_run(srigl_on)
    epoch, _ = restore_training_state(load_checkpoint(tmp_path / "c.npz"), model2, opt2, sched2, upd2, rng2, sc2)
    assert epoch == 2
    fit(model2, opt2, (x, y), epochs=4, batch_size=32, schedule=sched2, hooks=[h for h in (upd2, sc2) if h],
        loss_terms=[sc2.size_loss], progress=False, rng=rng2, start_epoch=2)
    a, b = model.state_dict(), model2.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert sc.history == sc2.history
    for p, q in zip(opt.params, opt2.params):
        for name in opt.state.get(p, {}):
            np.testing.assert_array_equal(opt.state[p][name], opt2.state[q][name])


def test_resuming_with_another_compress_setting_is_refused(tmp_path):
    from fanin.checkpoint import CheckpointError, load_checkpoint, restore_training_state, save_checkpoint, \
        training_state

    model, opt, sched, upd, sc, rng = _compressing_run(False)
    save_checkpoint(tmp_path / "c.npz", training_state(model, opt, sched, upd, rng, 1, [], sc))
    from fanin import models
    plain = models.mlp([12, 40, 24, 3], seed=0)
    popt = optim.SGD(plain.parameters(), lr=0.05)
    with pytest.raises(CheckpointError, match="self-compression"):
        restore_training_state(load_checkpoint(tmp_path / "c.npz"), plain, popt, optim.CosineSchedule(popt, 8),
                               None, rng)


def test_after_t_end_bits_and_channels_stay_while_weights_train():
    x, y = _toy(seed=2)
    model = nn.Sequential(nn.Linear(12, 16, seed=0), nn.ReLU(), nn.Linear(16, 3, seed=1))
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sc = compress.SelfCompression(model, gamma=1.0, optimizer=opt, lr=0.2, init_bits=3, t_end=10)
    snapshot = None
    for step in range(30):
        loss = ops.cross_entropy(model(Tensor(x[:64])), y[:64]) + sc.size_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sc.step()
        if step == 9:
            assert sc.frozen
            snapshot = [(layer.bits.data.copy(), layer.exponent.data.copy()) for _, layer in sc.layers]
            w = model[0].weight.data.copy()
    assert sc.t == 10 and float(sc.size_loss().data) == 0.0
    for (b, e), (_, layer) in zip(snapshot, sc.layers):
        np.testing.assert_array_equal(layer.bits.data, b)
        np.testing.assert_array_equal(layer.exponent.data, e)
    assert model[0].weight.shape == w.shape and not np.array_equal(model[0].weight.data, w)


def test_cli_compress_flag_with_and_without_a_value(capsys):
    """`fanin train --compress` (no value) means DEFAULT_GAMMA; a value is a gamma; a bad one is a one-line exit 2."""
    from fanin import cli, models

    p = cli.build_parser()
    args = p.parse_args(["train", "--model", "mlp", "--compress", "--epochs", "1"])
    assert args.compress == "default" and args.epochs == 1
    assert p.parse_args(["train", "--compress", "0.25"]).compress == 0.25
    assert p.parse_args(["train"]).compress is None
    model = models.mlp([12, 8, 4], seed=0)
    opt = optim.SGD(model.parameters(), lr=0.1)
    sc = cli.build_compressor(args, model, opt, None, total_steps=10)
    assert sc.gamma == compress.DEFAULT_GAMMA and sc.cost == "bits"
    cnn_args = p.parse_args(["train", "--model", "cnn", "--compress", "0.2", "--compress-cost", "bits+macs"])
    cnn = models.cnn(channels=(4, 8), hidden=16, seed=0)
    sc = cli.build_compressor(cnn_args, cnn, optim.SGD(cnn.parameters(), lr=0.1), None, total_steps=10)
    assert sc.cost == "bits+macs" and sc._pos[id(cnn[0])] == 28 * 28  # the CLI passes the image shape
    for bad in (["--compress", "-1"], ["--compress", "nan"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["train", *bad])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--compress" in err, err


# --------------------------------------------------------------- the compute-weighted size term
def _small_cnn():
    # 1x10x10 -> conv 3x3 pad 1 (4 ch, 10x10) -> pool 2 (5x5) -> conv 3x3 no pad, stride 2 (condensed, 6 ch, 2x2)
    # -> flatten (24) -> linear 5
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, seed=0), nn.ReLU(), nn.MaxPool2d(2),
                         nn.FanInConv2d(4, 6, 3, stride=2, sparsity=0.5, seed=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(24, 5, seed=2))


@pytest.mark.parametrize("cost", ["bits", "macs", "bits+macs"])
def test_size_term_gradient_per_bit_counts_storage_or_compute(cost):
    model = _small_cnn()
    sc = compress.SelfCompression(model, gamma=2.0, cost=cost, input_shape=(1, 10, 10))
    conv1, conv2, lin = model[0], model[3], model[6]
    n = {id(conv1): 9.0, id(conv2): float(conv2.k), id(lin): 24.0}  # weights per channel
    pos = {id(conv1): 100, id(conv2): 4, id(lin): 1}  # output positions per sample
    channels = {id(conv1): 4, id(conv2): 6, id(lin): 5}
    N = sum(n[i] * channels[i] for i in n)
    N_macs = sum(n[i] * channels[i] * pos[i] for i in n)
    sc.size_loss().backward()
    for layer in (conv1, conv2, lin):
        want = 0.0
        if cost != "macs":
            want += 2.0 * n[id(layer)] / N
        if cost != "bits":
            want += 2.0 * n[id(layer)] * pos[id(layer)] / N_macs
        np.testing.assert_allclose(layer.bits.grad, want, rtol=1e-5)
    if cost == "macs":  # the convolution's bits weigh most per weight, the linear layer's least
        assert conv1.bits.grad[0] / 9 > conv2.bits.grad[0] / conv2.k > lin.bits.grad[0] / 24


def test_compute_cost_needs_the_input_shape_of_a_cnn_and_a_known_cost():
    with pytest.raises(ValueError, match=r"input_shape=\(C, H, W\)"):
        compress.SelfCompression(_small_cnn(), cost="macs")
    with pytest.raises(ValueError, match="cost must be one of bits, macs, bits\\+macs"):
        compress.SelfCompression(_small_cnn(), cost="flops", input_shape=(1, 10, 10))
    mlp = nn.Sequential(nn.Linear(6, 4, seed=0), nn.ReLU(), nn.Linear(4, 2, seed=1))
    sc = compress.SelfCompression(mlp, cost="macs")  # no convolution: every layer counts once per sample
    assert sc.n_macs == sc.n_weights == 6 * 4 + 4 * 2
