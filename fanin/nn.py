"""Layers: ``Module``, ``Parameter`` and the dense building blocks.

A module's parameters, buffers and sub-modules are simply its attributes; ``Sequential`` holds
a list. Parameters are found by walking attributes in definition order, so names in
``state_dict()`` are stable (``"0.weight"``, ``"classifier.bias"``).
"""
from __future__ import annotations

import math

import numpy as np

from fanin import ops
from fanin.tensor import Tensor

__all__ = [
    "Parameter", "Module", "Sequential", "Linear", "Conv2d", "BatchNorm1d", "BatchNorm2d", "ReLU",
    "GELU", "MaxPool2d", "AvgPool2d", "Flatten", "Dropout", "kaiming_normal",
]


class Parameter(Tensor):
    """A Tensor that a module owns and an optimizer updates."""

    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype})"


def kaiming_normal(shape, fan_in: int, rng: np.random.Generator, gain: float = math.sqrt(2.0)) -> np.ndarray:
    """Normal weights with std ``gain / sqrt(fan_in)`` (He et al., for ReLU networks)."""
    std = gain / math.sqrt(max(1, fan_in))
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)


def _rng(seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


class Module:
    """Base class: parameters, buffers and children are attributes; ``forward`` computes."""

    training = True
    _buffers: tuple = ()

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must implement forward().")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ---------------------------------------------------------------- tree
    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Module):
                        yield f"{name}.{i}", item

    def modules(self):
        """This module and every module below it, depth first."""
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}{name}.")

    def named_parameters(self, prefix=""):
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
        for name, child in self.named_children():
            yield from child.named_parameters(f"{prefix}{name}.")

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix=""):
        for name in self._buffers:
            yield prefix + name, getattr(self, name)
        for name, child in self.named_children():
            yield from child.named_buffers(f"{prefix}{name}.")

    # --------------------------------------------------------------- modes
    def train(self, mode: bool = True):
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    # --------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Name -> array copy for every parameter and buffer."""
        state = {name: p.data.copy() for name, p in self.named_parameters()}
        state.update({name: np.array(b, copy=True) for name, b in self.named_buffers()})
        return state

    def load_state_dict(self, state: dict, strict: bool = True):
        """Copy arrays from ``state`` into this module's parameters and buffers (shapes must match)."""
        own = dict(self.named_parameters())
        buffers = dict(self.named_buffers())
        missing = [k for k in list(own) + list(buffers) if k not in state]
        unexpected = [k for k in state if k not in own and k not in buffers]
        if strict and (missing or unexpected):
            raise KeyError(
                f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}; "
                "the state must come from a model of the same architecture (or pass strict=False)."
            )
        for name, value in state.items():
            target = own[name].data if name in own else buffers.get(name)
            if target is None:
                continue
            value = np.asarray(value)
            if value.shape != target.shape:
                raise ValueError(
                    f"load_state_dict: '{name}' has shape {value.shape} in the state but {target.shape} "
                    "in the model."
                )
            target[...] = value

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        children = list(self.named_children())
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not children:
            return head + ")"
        body = "\n".join(f"  ({n}): " + repr(c).replace("\n", "\n  ") for n, c in children)
        return f"{head}\n{body}\n)"


class Sequential(Module):
    """Modules applied one after another."""

    def __init__(self, *layers):
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: item {i} is a {type(layer).__name__}, not a Module.")
        self.layers = list(layers)

    def named_children(self):
        for i, layer in enumerate(self.layers):
            yield str(i), layer

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)


def _as_input(x, layer) -> Tensor:
    """Layer input as a floating Tensor (integers are cast to float32; anything else refused)."""
    if isinstance(x, Tensor):
        return x
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{layer}: input must be numeric, got dtype {arr.dtype}.")
    return Tensor(arr if arr.dtype.kind == "f" and arr.dtype.itemsize >= 4 else arr.astype(np.float32))


class Linear(Module):
    """Dense affine layer ``y = x @ W.T + b`` with W of shape (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, seed=None):
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Linear: sizes must be positive, got ({in_features}, {out_features}).")
        rng = _rng(seed)
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(kaiming_normal((out_features, in_features), in_features, rng))
        self.bias = Parameter(np.zeros(out_features, np.float32)) if bias else None

    def forward(self, x):
        x = _as_input(x, "Linear")
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"Linear({self.in_features}, {self.out_features}): input has shape {x.shape}, "
                f"expected (batch, {self.in_features})."
            )
        return ops.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Conv2d(Module):
    """Dense 2-D convolution, weight (out_channels, in_channels, kh, kw)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, seed=None):
        kh, kw = ops._pair(kernel_size)
        rng = _rng(seed)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (kh, kw), ops._pair(stride), ops._pair(padding)
        fan_in = in_channels * kh * kw
        self.weight = Parameter(kaiming_normal((out_channels, in_channels, kh, kw), fan_in, rng))
        self.bias = Parameter(np.zeros(out_channels, np.float32)) if bias else None

    def forward(self, x):
        return ops.conv2d(_as_input(x, "Conv2d"), self.weight, self.bias, self.stride, self.padding)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")


class _BatchNorm(Module):
    _buffers = ("running_mean", "running_var")
    _ndim = 2

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5):
        self.num_features, self.momentum, self.eps = num_features, momentum, eps
        self.weight = Parameter(np.ones(num_features, np.float32))
        self.bias = Parameter(np.zeros(num_features, np.float32))
        self.running_mean = np.zeros(num_features, np.float32)
        self.running_var = np.ones(num_features, np.float32)

    def forward(self, x):
        x = _as_input(x, type(self).__name__)
        if x.ndim != self._ndim:
            raise ValueError(f"{type(self).__name__}: expected a {self._ndim}-D input, got shape {x.shape}.")
        return ops.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                              self.training, self.momentum, self.eps)

    def extra_repr(self):
        return str(self.num_features)


class BatchNorm1d(_BatchNorm):
    """Batch norm over (batch,) for inputs (batch, features)."""

    _ndim = 2


class BatchNorm2d(_BatchNorm):
    """Batch norm over (batch, height, width) for inputs (batch, channels, height, width)."""

    _ndim = 4


class ReLU(Module):
    def forward(self, x):
        return ops.relu(x)


class GELU(Module):
    def forward(self, x):
        return ops.gelu(x)


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x):
        return ops.max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self):
        return f"{self.kernel_size}"


class AvgPool2d(MaxPool2d):
    def forward(self, x):
        return ops.avg_pool2d(x, self.kernel_size, self.stride, self.padding)


class Flatten(Module):
    def forward(self, x):
        return ops.flatten(x, 1)


class Dropout(Module):
    """Drops activations with probability ``p`` in training; identity in eval."""

    def __init__(self, p: float = 0.5, seed=None):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}.")
        self.p = p
        self.rng = _rng(seed)

    def forward(self, x):
        return ops.dropout(x, self.p, self.rng, self.training)

    def extra_repr(self):
        return f"p={self.p}"
