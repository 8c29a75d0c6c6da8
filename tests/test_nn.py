"""Modules, optimizers and schedules."""
import numpy as np
import pytest

from fanin import Tensor, models, nn, ops, optim


def test_linear_matches_numpy_and_kaiming_scale():
    layer = nn.Linear(400, 300, seed=0)
    assert layer.weight.shape == (300, 400)
    assert abs(layer.weight.data.std() - np.sqrt(2 / 400)) < 0.005
    x = np.random.default_rng(1).standard_normal((5, 400)).astype(np.float32)
    np.testing.assert_allclose(layer(x).data, x @ layer.weight.data.T + layer.bias.data, rtol=1e-5)


def test_same_seed_same_weights_different_seed_different():
    a, b, c = (models.mlp([10, 8, 3], seed=s) for s in (0, 0, 1))
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        np.testing.assert_array_equal(pa.data, pb.data)
    assert not np.array_equal(a.parameters()[0].data, c.parameters()[0].data)


def test_named_parameters_and_state_dict_roundtrip():
    model = models.cnn(channels=(4, 8), hidden=16, seed=0)
    names = [n for n, _ in model.named_parameters()]
    assert names[0] == "0.weight" and "1.weight" in names and "1.running_mean" not in names
    sd = model.state_dict()
    assert "1.running_mean" in sd and "1.running_var" in sd
    other = models.cnn(channels=(4, 8), hidden=16, seed=5)
    other.load_state_dict(sd)
    for (n, p), (_, q) in zip(model.named_parameters(), other.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=n)
    sd["0.weight"] = sd["0.weight"][:1]
    with pytest.raises(ValueError, match="0.weight"):
        other.load_state_dict(sd)
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({})


def test_train_eval_switches_batchnorm_and_dropout():
    model = nn.Sequential(nn.Linear(4, 4, seed=0), nn.BatchNorm1d(4), nn.Dropout(0.5, seed=0))
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    model.eval()
    assert all(not m.training for m in model.modules())
    np.testing.assert_array_equal(model(x).data, model(x).data)
    model.train()
    assert model[2].training


def test_layer_input_errors():
    layer = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"\(5, 4\).*\(batch, 3\)"):
        layer(np.ones((5, 4), np.float32))
    with pytest.raises(TypeError, match="numeric"):
        layer(np.array([["a", "b", "c"]]))
    assert layer(np.ones((1, 3), np.int64)).dtype == np.float32  # integers are cast


def test_conv_bn_pool_stack_shapes():
    model = models.cnn(channels=(4, 8), hidden=16, seed=0)
    out = model(np.zeros((2, 1, 28, 28), np.float32))
    assert out.shape == (2, 10)


def _quadratic_problem(opt_factory, steps=200):
    rng = np.random.default_rng(0)
    target = rng.standard_normal(5).astype(np.float32)
    w = nn.Parameter(np.zeros(5, np.float32))
    opt = opt_factory([w])
    for _ in range(steps):
        loss = ((w - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return np.abs(w.data - target).max()


@pytest.mark.parametrize("factory", [
    lambda p: optim.SGD(p, lr=0.1),
    lambda p: optim.SGD(p, lr=0.05, momentum=0.9),
    lambda p: optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    lambda p: optim.Adam(p, lr=0.05),
    lambda p: optim.AdamW(p, lr=0.05, weight_decay=0.0),
])
def test_optimizers_converge(factory):
    assert _quadratic_problem(factory) < 1e-2


def test_sgd_momentum_matches_hand_computation():
    w = nn.Parameter(np.array([1.0], np.float32))
    opt = optim.SGD([w], lr=0.1, momentum=0.5, weight_decay=0.1)
    for _ in range(2):
        w.grad = np.array([2.0], np.float32)
        opt.step()
    # step 1: g = 2 + 0.1*1 = 2.1, buf = 2.1, w = 1 - 0.21 = 0.79
    # step 2: g = 2 + 0.079 = 2.079, buf = 1.05 + 2.079 = 3.129, w = 0.79 - 0.3129
    np.testing.assert_allclose(w.data, [0.79 - 0.3129], rtol=1e-6)


@pytest.mark.parametrize("make", [lambda: optim.SGD, lambda: optim.Adam, lambda: optim.AdamW])
def test_optimizers_update_a_read_only_or_strided_parameter_as_its_own_copy(make):
    # np.load(mmap_mode="r") gives read-only weights, a slice strided ones: each step writes the parameter's
    # own contiguous copy (the caller's array is left as it was), with the numbers of a writable parameter
    base = np.arange(1, 13, dtype=np.float32).reshape(3, 4)
    ro = base.copy()
    ro.flags.writeable = False
    strided = np.arange(1, 25, dtype=np.float32).reshape(3, 8)[:, ::2]
    for src in (ro, strided):
        p, q = nn.Parameter(src), nn.Parameter(np.array(src))
        opts = [make()([p], lr=0.1), make()([q], lr=0.1)]
        for _ in range(2):
            p.grad = q.grad = np.ones((3, 4), np.float32)
            for o in opts:
                o.step()
        np.testing.assert_array_equal(p.data, q.data)
        assert p.data.flags.writeable and p.data.flags.c_contiguous and not np.array_equal(p.data, src)
    np.testing.assert_array_equal(ro, base)


def test_adam_first_step_is_lr_sized():
    w = nn.Parameter(np.array([0.0, 0.0], np.float32))
    opt = optim.Adam([w], lr=0.01)
    w.grad = np.array([5.0, -0.001], np.float32)
    opt.step()
    np.testing.assert_allclose(w.data, [-0.01, 0.01], rtol=1e-3)


def test_adamw_decays_weights_without_gradient_signal():
    w = nn.Parameter(np.array([1.0], np.float32))
    opt = optim.AdamW([w], lr=0.1, weight_decay=0.5)
    w.grad = np.array([0.0], np.float32)
    opt.step()
    np.testing.assert_allclose(w.data, [0.95], rtol=1e-6)


def test_optimizer_state_reset_and_remap():
    w = nn.Parameter(np.ones((3, 2), np.float32))
    opt = optim.SGD([w], lr=0.1, momentum=0.9)
    w.grad = np.ones((3, 2), np.float32)
    opt.step()
    mask = np.zeros((3, 2), bool)
    mask[1, 0] = True
    opt.reset_state(w, mask)
    buf = opt.state[w]["momentum"]
    assert buf[1, 0] == 0 and buf[0, 0] == 1
    buf[2, 1] = 7.0  # mark a row that must survive the remap
    w.data = w.data[[0, 2]]
    opt.remap_state(w, lambda a: a[[0, 2]])
    np.testing.assert_array_equal(opt.state[w]["momentum"], [[1, 1], [1, 7]])
    w.grad = np.ones((2, 2), np.float32)
    before = w.data.copy()
    opt.step()  # momentum 0.9 * old + grad, then w -= lr * momentum
    np.testing.assert_allclose(opt.state[w]["momentum"], [[1.9, 1.9], [1.9, 7.3]], rtol=1e-6)
    np.testing.assert_allclose(w.data, before - 0.1 * np.array([[1.9, 1.9], [1.9, 7.3]]), rtol=1e-6)


def test_optimizer_state_dict_roundtrip():
    w = nn.Parameter(np.ones(3, np.float32))
    opt = optim.Adam([w], lr=0.1)
    w.grad = np.ones(3, np.float32)
    opt.step()
    sd = opt.state_dict()
    w2 = nn.Parameter(np.ones(3, np.float32))
    opt2 = optim.Adam([w2], lr=0.5)
    opt2.load_state_dict(sd)
    assert opt2.steps == 1 and opt2.lr == 0.1
    np.testing.assert_array_equal(opt2.state[w2]["m"], opt.state[w]["m"])


def test_optimizer_errors():
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([], lr=0.1)
    w = nn.Parameter(np.ones(2, np.float32))
    with pytest.raises(ValueError, match="lr"):
        optim.SGD([w], lr=0)
    with pytest.raises(ValueError, match="more than once"):
        optim.SGD([w, w], lr=0.1)


def test_cosine_schedule_warmup_and_decay():
    w = nn.Parameter(np.ones(1, np.float32))
    opt = optim.SGD([w], lr=1.0)
    sched = optim.CosineSchedule(opt, total_steps=110, warmup_steps=10)
    assert opt.lr == pytest.approx(0.1)
    lrs = [opt.lr]
    for _ in range(110):
        sched.step()
        lrs.append(opt.lr)
    assert lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_training_reduces_loss_on_a_toy_problem():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    model = models.mlp([8, 16, 2], seed=0)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first = None
    for _ in range(50):
        loss = ops.cross_entropy(model(Tensor(x)), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


# ------------------------------------------------- contracts the mutation run found untested
def test_optimizer_defaults_and_argument_boundaries():
    w = nn.Parameter(np.ones(3, np.float32))
    assert optim.Adam([w]).lr == 1e-3 and optim.AdamW([w]).lr == 1e-3 and optim.SGD([w]).lr == 0.1
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        optim.SGD([w], lr=0.1, nesterov=True)
    optim.SGD([w], lr=0.1, momentum=1.0, nesterov=True)  # any positive momentum is fine
    opt = optim.SGD([w], lr=0.1)
    for total, warm in ((0, 0), (10, -1), (10, 11)):
        with pytest.raises(ValueError, match="warmup_steps"):
            optim.CosineSchedule(opt, total_steps=total, warmup_steps=warm)
    s = optim.CosineSchedule(opt, total_steps=3, warmup_steps=2)  # one decay step after the warm-up
    assert [s.lr_at(t) for t in range(4)] == pytest.approx([0.05, 0.1, 0.1, 0.0])


def test_optimizers_name_parameters_from_named_parameters():
    model = nn.Sequential(nn.Linear(3, 2, seed=0))
    opt = optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    assert opt.params == model.parameters()
    w = model[0].weight
    w.name = None  # the name now comes from the (name, parameter) pairs the optimizer was given
    assert opt.param_name(w) == "'0.weight' (parameter 0, shape (2, 3))"
    stray = nn.Parameter(np.ones(2, np.float32))
    assert opt.param_name(stray) == "a parameter of shape (2,)"
    anon = optim.SGD([nn.Parameter(np.ones(4, np.float32))], lr=0.1)
    assert anon.param_name(anon.params[0]) == "parameter 0 of shape (4,)"


def test_a_non_contiguous_parameter_is_updated_correctly():
    w = nn.Parameter(np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)))
    assert not w.data.flags.c_contiguous
    opt = optim.SGD([w], lr=0.5)
    w.grad = np.ones((2, 3), np.float32)
    opt.step()
    np.testing.assert_array_equal(w.data, np.arange(6, dtype=np.float32).reshape(2, 3) - 0.5)
