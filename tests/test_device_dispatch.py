"""The CPU side of device dispatch, without a GPU: which arrays count as device arrays, which ops hand a device
tensor to ``fanin.device`` (and so to its clear "no GPU" error here), that host tensors never take that path, and
the host-only guards of ``Tensor`` (``numpy()``, ``to``) and of the tape (the caller's gradient is never adopted).

These run in milliseconds; the device paths themselves are tested under the CUDA simulator
(tests/test_cuda_sim.py, tests/test_cuda_train.py) and on a GPU (tests/test_cuda_device.py).
"""
from __future__ import annotations

import numpy as np
import pytest

from fanin import ops
from fanin import tensor as tm
from fanin.tensor import Tensor


class Foreign:
    """An array from another library living on a GPU: only ``__cuda_array_interface__`` (as CuPy or torch)."""

    def __init__(self, shape=(2, 3)):
        self.shape, self.ndim, self.dtype, self.size = shape, len(shape), np.dtype(np.float32), int(np.prod(shape))
        self.__cuda_array_interface__ = {"shape": shape, "typestr": "<f4", "data": (0, False), "version": 3}


class NumbaLike:
    def __init__(self, flag):
        self.__cuda_ndarray__ = flag


def _device_tensor(shape=(2, 3)):
    t = Tensor(np.zeros(shape, np.float32))
    t.data = Foreign(shape)  # what a device tensor holds; made by hand since there is no GPU here
    return t


def _gpu_here() -> bool:
    from fanin import device

    return device.available()


def test_what_counts_as_a_device_array():
    assert tm._is_device_array(Foreign())
    assert tm._is_device_array(NumbaLike(True))
    assert not tm._is_device_array(NumbaLike(False))
    assert not tm._is_device_array(np.zeros(3))
    assert not tm._is_device_array([1.0, 2.0])
    assert tm.on_cuda(np.zeros(2), _device_tensor())
    assert tm.on_cuda(Foreign())
    assert not tm.on_cuda(np.zeros(2), Tensor(np.zeros(2)), None, 3.0)
    assert not tm.on_cuda()


@pytest.mark.parametrize("name, call", [
    ("add", lambda t: ops.add(t, t)), ("sub", lambda t: ops.sub(t, t)), ("mul", lambda t: ops.mul(t, t)),
    ("neg", ops.neg), ("sum", ops.sum), ("mean", ops.mean), ("relu", ops.relu),
    ("reshape", lambda t: ops.reshape(t, (3, 2))), ("flatten", ops.flatten),
    ("linear", lambda t: ops.linear(t, t)),
])
def test_ops_hand_device_tensors_to_the_device_module(monkeypatch, name, call):
    from fanin import device

    if _gpu_here():
        pytest.skip("a GPU is present: the device ops would run")
    monkeypatch.setattr(tm, "_CUDA", True)  # as after the first device tensor was made
    with pytest.raises(device.CUDAUnavailableError, match="CUDA was asked for"):
        call(_device_tensor())


def test_host_tensors_stay_on_the_host_when_cuda_is_in_use(monkeypatch):
    monkeypatch.setattr(tm, "_CUDA", True)
    a = np.arange(6, dtype=np.float32).reshape(2, 3) - 2
    t = Tensor(a)
    np.testing.assert_array_equal(ops.neg(t).data, -a)
    np.testing.assert_array_equal(ops.add(t, t).data, 2 * a)
    np.testing.assert_array_equal(ops.mul(t, t).data, a * a)
    np.testing.assert_allclose(ops.mean(t).data, a.mean())
    np.testing.assert_array_equal(ops.relu(t).data, np.maximum(a, 0))
    np.testing.assert_array_equal(ops.reshape(t, (3, 2)).data, a.reshape(3, 2))
    np.testing.assert_array_equal(ops.linear(t, Tensor(np.eye(3, dtype=np.float32))).data, a)
    assert isinstance(ops.sum(t).data, np.ndarray) or np.isscalar(ops.sum(t).data)


def test_numpy_and_to_on_the_host():
    t = Tensor(np.ones((2, 2), np.float32))
    assert t.to("cpu") is t and t.device == "cpu"
    assert t.numpy() is t.data
    d = _device_tensor()
    assert d.device == "cuda"
    with pytest.raises(TypeError, match=r"on cuda.*\.to\('cpu'\)"):
        d.numpy()


def test_the_callers_gradient_is_never_adopted():
    """backward(g) on a leaf copies g: the caller may reuse its array, and the leaf's grad must not move."""
    x = Tensor(np.ones(3, np.float32), requires_grad=True)
    g = np.array([1.0, 2.0, 3.0], np.float32)
    x.backward(g)
    assert x.grad is not g
    g[:] = 100
    np.testing.assert_array_equal(x.grad, [1, 2, 3])
    y = x * 2.0  # through an op, twice: accumulated, still its own array
    y.backward(g)
    np.testing.assert_array_equal(x.grad, [201, 202, 203])


def test_conv_shapes_are_checked_in_every_direction():
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((1, 1, 2, 6)).astype(np.float32))
    w = Tensor(rng.standard_normal((2, 1, 3, 3)).astype(np.float32))
    with pytest.raises(ValueError, match="does not fit input"):  # too tall only: height 2 < 3, width fits
        ops.conv2d(x, w)
    x2 = Tensor(rng.standard_normal((1, 1, 6, 2)).astype(np.float32))
    with pytest.raises(ValueError, match="does not fit input"):  # too wide only
        ops.conv2d(x2, w)
    x3 = Tensor(rng.standard_normal((1, 1, 3, 3)).astype(np.float32))
    assert ops.conv2d(x3, w).shape == (1, 2, 1, 1)  # exactly one output position is fine


def test_condensed_conv_values_of_another_shape_are_refused_either_way():
    from fanin import kernels

    rng = np.random.default_rng(1)
    x = Tensor(rng.standard_normal((1, 2, 5, 5)).astype(np.float32))
    idx = np.sort(np.argsort(rng.random((3, 18)), axis=1)[:, :4], axis=1).astype(np.int16)
    topo = kernels.Topology(idx, 18)
    for shape in ((3, 5), (3, 3), (4, 4), (2, 4)):
        with pytest.raises(ValueError, match="must have the shape of the indices"):
            ops.fanin_conv2d(x, topo, Tensor(np.ones(shape, np.float32)), kernel_size=3)
    assert ops.fanin_conv2d(x, topo, Tensor(np.ones((3, 4), np.float32)), kernel_size=3).shape == (1, 3, 3, 3)


def test_host_parameters_take_the_host_update_when_cuda_is_in_use(monkeypatch):
    from fanin import nn, optim

    monkeypatch.setattr(tm, "_CUDA", True)
    for cls in (optim.SGD, optim.Adam):
        p = nn.Parameter(np.ones((2, 3), np.float32))
        opt = cls([p], lr=0.1)
        p.grad = np.ones((2, 3), np.float32)
        opt.step()
        assert isinstance(p.data, np.ndarray) and np.all(p.data < 1)


def test_constants_in_a_graph_get_no_gradient_and_flatten_keeps_the_batch():
    c = Tensor(np.full((2, 3), 2.0, np.float32))  # requires_grad False: a constant
    x = Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    (x * c + c).sum().backward()
    assert c.grad is None
    np.testing.assert_array_equal(x.grad, np.full((2, 3), 2.0))
    t = Tensor(np.zeros((2, 3, 4), np.float32))
    assert t.flatten().shape == (2, 12) and t.flatten(0).shape == (24,)
