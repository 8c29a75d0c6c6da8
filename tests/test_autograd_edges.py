"""Edge cases of the ops, layers and optimizers that a differential test against PyTorch found silently wrong
(sixteenth session): each test states the right answer from the definition, not from PyTorch."""
import numpy as np
import pytest

from fanin import nn, ops, optim
from fanin.tensor import Tensor


@pytest.mark.parametrize("axes", [(-1, 0, 1), (1, -1, 0), (2, 0, 1), (-3, -1, -2)])
def test_transpose_with_negative_axes_sends_the_gradient_back_through_the_inverse(axes):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    a = Tensor(x, requires_grad=True)
    y = a.transpose(*axes)
    g = rng.standard_normal(y.shape).astype(np.float32)
    y.backward(g)
    positive = tuple(ax % 3 for ax in axes)
    assert y.shape == np.transpose(x, positive).shape
    # <y, g> = <x, transpose^-1(g)>: the gradient is g moved back to x's axes
    np.testing.assert_array_equal(a.grad, np.transpose(g, np.argsort(positive)))


def _adam_alone(g, steps, **kw):
    p = nn.Parameter(np.ones(3, np.float32))
    opt = optim.Adam([p], lr=0.01, **kw)
    for _ in range(steps):
        p.grad = g.copy()
        opt.step()
    return p.data


@pytest.mark.parametrize("cls", [optim.Adam, optim.AdamW])
def test_adam_corrects_each_parameters_bias_by_its_own_steps(cls):
    """A parameter that first gets a gradient after 5 steps moves, over its next 5, as if its optimizer had just
    started (the bias correction of its own first step: lr-sized), not with the correction of step 6 onwards."""
    g = np.array([0.5, -1.0, 2.0], np.float32)
    p, q = nn.Parameter(np.ones(3, np.float32)), nn.Parameter(np.ones(3, np.float32))
    opt = cls([p, q], lr=0.01)
    for t in range(10):
        q.grad = g.copy()
        p.grad = g.copy() if t >= 5 else None
        opt.step()
    alone = cls([nn.Parameter(np.ones(3, np.float32))], lr=0.01)
    r = alone.params[0]
    for _ in range(5):
        r.grad = g.copy()
        alone.step()
    np.testing.assert_allclose(p.data, r.data, rtol=0, atol=1e-7)
    # the first step of Adam moves each weight by ~lr whatever the gradient's size
    assert np.allclose(np.abs(p.data - 1), 0.05, atol=2e-3)
    assert opt.counts[p] == 5 and opt.counts[q] == 10 and opt.steps == 10


def test_adam_counts_travel_with_the_state_and_old_state_dicts_load_as_before():
    g = np.array([0.5, -1.0, 2.0], np.float32)
    p, q = nn.Parameter(np.ones(3, np.float32)), nn.Parameter(np.ones(3, np.float32))
    opt = optim.Adam([p, q], lr=0.01)
    for t in range(4):
        q.grad, p.grad = g.copy(), (g.copy() if t >= 2 else None)
        opt.step()
    sd = opt.state_dict()
    other = optim.Adam([p, q], lr=0.01)
    other.load_state_dict(sd)
    assert other.counts == {p: 2, q: 4}
    old = {k: v for k, v in sd.items() if k != "counts"}  # a checkpoint of the code before the counts
    other.load_state_dict(old)
    assert other.counts == {p: 4, q: 4}


def test_relu_keeps_a_scalars_shape_and_its_gradient_reaches_a_sum():
    w = Tensor(np.array(0.7, np.float32), requires_grad=True)
    y = ops.relu(w)
    y.backward()
    assert y.shape == () and w.grad.shape == () and float(w.grad) == 1.0
    a = Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    ops.relu(a.sum()).backward()
    np.testing.assert_array_equal(a.grad, np.ones((2, 3)))


def test_division_by_a_tiny_or_huge_denominator_has_a_finite_gradient():
    a_ = np.array([1e-30, 0.0, 3.0, 1.0], np.float32)
    b_ = np.array([1e-25, 1e-25, 1e18, -1e-15], np.float32)
    a, b = Tensor(a_, requires_grad=True), Tensor(b_, requires_grad=True)
    (a / b).sum().backward()
    want = -(a_.astype(np.float64) / b_.astype(np.float64) ** 2)
    assert np.all(np.isfinite(b.grad))
    np.testing.assert_allclose(b.grad, want, rtol=1e-5)


def test_the_gradient_of_x_to_the_zero_is_zero_everywhere():
    x = Tensor(np.array([0.0, 1.0, -2.0], np.float32), requires_grad=True)
    (x ** 0).sum().backward()
    np.testing.assert_array_equal(x.grad, [0, 0, 0])


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.float16, bool])
def test_a_tensor_of_another_dtype_is_refused_not_truncated(dtype):
    with pytest.raises(TypeError, match="float32 or float64"):
        Tensor([0.1, 0.7], dtype=dtype)


def test_a_tensor_as_an_index_is_refused_and_arrays_index_with_gradients_that_add_up():
    t = Tensor(np.arange(5, dtype=np.float32), requires_grad=True)
    s = t[np.array([0, 2, 2])]
    s.sum().backward()
    np.testing.assert_array_equal(s.data, [0, 2, 2])
    np.testing.assert_array_equal(t.grad, [1, 0, 2, 0, 0])
    m = t[np.array([True, False, True, True, False])]
    np.testing.assert_array_equal(m.data, [0, 2, 3])
    for index in (Tensor(np.array([0, 2])), Tensor(np.array([True, False, True, True, False])),
                  (Tensor(np.array([1])),)):  # a mask in a Tensor is floats: it would read as rows 1, 0, 1, 1, 0
        with pytest.raises(TypeError, match="not a Tensor"):
            t[index]


def test_an_empty_batch_goes_through_a_convolution_and_batch_norm_both_ways():
    x = Tensor(np.zeros((0, 2, 5, 5), np.float32), requires_grad=True)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    y = conv(x)
    y.backward(np.zeros(y.shape, np.float32))
    assert x.grad.shape == (0, 2, 5, 5) and not conv.weight.grad.any()
    assert nn.BatchNorm1d(3).eval()(Tensor(np.zeros((0, 3), np.float32))).shape == (0, 3)
    assert nn.BatchNorm2d(3).eval()(Tensor(np.zeros((0, 3, 4, 4), np.float32))).shape == (0, 3, 4, 4)


@pytest.mark.parametrize("batch", [1, 40])  # the row kernels and the packed path
def test_an_ablated_neuron_gives_its_bias_even_when_its_row_holds_values(batch):
    """SPEC section 1: an ablated neuron outputs bias[j]. Called directly with values in that row, the op ignores
    them (no output, no gradient to x through them), and the values get no gradient."""
    rng = np.random.default_rng(1)
    x = Tensor(rng.standard_normal((batch, 6)).astype(np.float32), requires_grad=True)
    idx = np.tile(np.arange(0, 6, 2), (4, 1))
    vals = Tensor(rng.standard_normal((4, 3)).astype(np.float32), requires_grad=True)
    bias = Tensor(rng.standard_normal(4).astype(np.float32), requires_grad=True)
    active = np.array([True, False, True, False])
    y = ops.fanin_linear(x, idx, vals, bias, active=active)
    w = np.zeros((4, 6), np.float32)
    w[np.arange(4)[:, None], idx] = vals.data * active[:, None]
    np.testing.assert_allclose(y.data, x.data @ w.T + bias.data, rtol=1e-5, atol=1e-5)
    g = rng.standard_normal(y.shape).astype(np.float32)
    y.backward(g)
    np.testing.assert_allclose(x.grad, g @ w, rtol=1e-5, atol=1e-5)
    assert not vals.grad[~active].any()
    assert vals.data[~active].any()  # the caller's values were not written
