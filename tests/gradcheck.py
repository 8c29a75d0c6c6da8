"""Central finite differences in float64: the independent oracle for every op's backward."""
import numpy as np

from fanin import Tensor


def numeric_grad(f, arrays, i, eps=1e-6):
    """d f(arrays) / d arrays[i] by central differences (f returns a float)."""
    x = arrays[i]
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        idx = it.multi_index
        old = x[idx]
        x[idx] = old + eps
        fp = f(arrays)
        x[idx] = old - eps
        fm = f(arrays)
        x[idx] = old
        g[idx] = (fp - fm) / (2 * eps)
    return g


def check_grads(fn, *arrays, rtol=1e-5, atol=1e-6, weights_seed=0):
    """Compare autograd gradients of ``sum(fn(*tensors) * w)`` with finite differences.

    ``w`` is a fixed random weighting so that every output element matters.
    """
    arrays = [np.array(a, dtype=np.float64) for a in arrays]
    out0 = fn(*[Tensor(a) for a in arrays]).data
    w = np.random.default_rng(weights_seed).standard_normal(np.shape(out0))

    def scalar(arrs):
        return float(np.sum(fn(*[Tensor(a) for a in arrs]).data * w))

    tensors = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    out = fn(*tensors)
    (out * Tensor(w)).sum().backward()
    for i, t in enumerate(tensors):
        expected = numeric_grad(scalar, arrays, i)
        got = t.grad if t.grad is not None else np.zeros_like(arrays[i])
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol, err_msg=f"gradient of input {i}")
