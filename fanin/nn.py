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
    "GELU", "MaxPool2d", "AvgPool2d", "Flatten", "Dropout", "kaiming_normal", "FanInLinear", "FanInConv2d",
]


class Parameter(Tensor):
    """A Tensor that a module owns and an optimizer updates; ``name`` is its name in the model (set by
    ``named_parameters``/``parameters``, for error messages)."""

    __slots__ = ("name",)

    def __init__(self, data, requires_grad: bool = True, name: str | None = None):
        super().__init__(data, requires_grad=requires_grad)
        self.name = name

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
                if value.name is None:
                    value.name = prefix + name
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

    def to(self, device):
        """Move every parameter (and gradient) to ``device`` ('cpu' or 'cuda') in place; returns the module.
        Optimizers and SRigL hold the same parameters and follow them (``fanin.device``)."""
        from fanin import device as _device

        return _device.move_module(self, device)

    # --------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Name -> array copy (on the host) for every parameter and buffer."""
        state = {name: p.data.copy() if isinstance(p.data, np.ndarray) else _host(p.data)
                 for name, p in self.named_parameters()}
        state.update({name: np.array(b, copy=True) for name, b in self.named_buffers()})
        return state

    def load_state_dict(self, state: dict, strict: bool = True, resize: bool = False):
        """Copy arrays from ``state`` into this module's parameters and buffers (shapes must match,
        except in layers whose shape legitimately changes, such as condensed layers' fan-in).

        ``resize=True`` also takes the state's shapes where layers were resized during training
        (channels removed by self-compression): the layers adopt them.
        """
        expected = set(dict(self.named_parameters())) | set(dict(self.named_buffers()))
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if strict and (missing or unexpected):
            raise KeyError(
                f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}; "
                "the state must come from a model of the same architecture (or pass strict=False)."
            )
        for prefix, module in self.named_modules():
            own = {n: v for n, v in state.items() if n.startswith(prefix) and "." not in n[len(prefix):]}
            if own:
                module._load_own({n[len(prefix):]: np.asarray(v) for n, v in own.items()}, prefix, resize)

    def _load_own(self, state: dict, prefix: str, resize: bool = False):
        """Load this module's own (not its children's) parameters and buffers, in place."""
        resized = False
        for name, value in state.items():
            current = getattr(self, name, None)
            target = current.data if isinstance(current, Tensor) else current
            if isinstance(current, Tensor) and not isinstance(target, np.ndarray):  # on the device: copy over
                from fanin import device as _device

                if value.shape != tuple(target.shape) and not resize:
                    raise ValueError(
                        f"load_state_dict: '{prefix}{name}' has shape {value.shape} in the state but "
                        f"{tuple(target.shape)} in the model."
                    )
                if value.shape != tuple(target.shape):
                    current.grad, resized = None, True
                current.data = _device.move(np.array(value, dtype=target.dtype, copy=True), "cuda")
                continue
            if not isinstance(target, np.ndarray):
                continue
            if value.shape != target.shape:
                if not resize:
                    raise ValueError(
                        f"load_state_dict: '{prefix}{name}' has shape {value.shape} in the state but "
                        f"{target.shape} in the model."
                    )
                copy = np.array(value, dtype=target.dtype, copy=True)
                if isinstance(current, Tensor):
                    current.data, current.grad = copy, None
                else:
                    setattr(self, name, copy)
                resized = True
                continue
            target[...] = value
        if resized:
            self._sync_shape()

    def _sync_shape(self):
        """Update size attributes after ``load_state_dict(resize=True)`` replaced arrays of other shapes."""

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


def nonfinite(named) -> list:
    """The names of the float arrays among ``named`` ((name, array) pairs: ``named_parameters()``, a state dict's
    items; device arrays are copied to the host) that hold NaN or Inf."""
    bad = []
    for name, a in named:
        a = a.data if isinstance(a, Tensor) else a
        a = a if isinstance(a, np.ndarray) else _host(a) if hasattr(a, "shape") else np.asarray(a)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad.append(name)
    return bad


def _host(a) -> np.ndarray:
    """A host copy of a device array (``fanin.device``)."""
    from fanin import device as _device

    return _device.host(a)


def _as_input(x, layer) -> Tensor:
    """Layer input as a floating Tensor (integers are cast to float32; anything else refused)."""
    if isinstance(x, Tensor):
        return x
    if hasattr(x, "__cuda_array_interface__") or getattr(x, "__cuda_ndarray__", False):
        return Tensor(x)  # a device array stays on the device
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{layer}: input must be numeric, got dtype {arr.dtype}.")
    return Tensor(arr if arr.dtype.kind == "f" and arr.dtype.itemsize >= 4 else arr.astype(np.float32))


def _indices_of(keep, n: int) -> np.ndarray:
    """Positions to keep, from a boolean mask of length n or a list of positions."""
    keep = np.asarray(keep)
    idx = np.flatnonzero(keep) if keep.dtype == np.bool_ else keep.astype(np.int64)
    if keep.dtype == np.bool_ and keep.shape != (n,):
        raise ValueError(f"keep mask of shape {keep.shape} for {n} entries.")
    if idx.size and (idx.min() < 0 or idx.max() >= n or np.any(np.diff(idx) <= 0)):
        raise ValueError(f"keep must list increasing positions in [0, {n}).")
    return idx


def take_param(param, idx, axis: int, optimizers=()):
    """Keep entries ``idx`` of ``param`` along ``axis``, in its data and in every optimizer's state for it."""
    if param is None:
        return
    param.data = np.ascontiguousarray(np.take(param.data, idx, axis=axis))
    param.grad = None
    for opt in optimizers:
        if opt.holds(param):
            opt.select_state(param, idx, axis)


class _Quantizable:
    """A layer whose weights self-compression can quantize (``fanin.compress``).

    ``bits`` and ``exponent`` are None, or Parameters with one entry per output channel; the forward
    then uses ``ops.quantize(weight, bits, exponent)`` in place of the weight.
    """

    bits = None
    exponent = None

    @property
    def weight_param(self):
        """The Parameter holding this layer's weights (``weight``, or ``values`` for condensed layers)."""
        return self.weight

    def effective_weight(self):
        """The weight Tensor the forward uses: quantized when self-compression is attached."""
        w = self.weight_param
        return w if self.bits is None else ops.quantize(w, self.bits, self.exponent)

    def _take_outputs(self, idx, optimizers):
        for p in (self.weight_param, getattr(self, "bias", None), self.bits, self.exponent):
            take_param(p, idx, 0, optimizers)


class Linear(_Quantizable, Module):
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
        return ops.linear(x, self.effective_weight(), self.bias)

    def select_outputs(self, keep, optimizers=()):
        """Keep only the output neurons ``keep`` (mask or positions), with their optimizer state."""
        idx = _indices_of(keep, self.out_features)
        self._take_outputs(idx, optimizers)
        self.out_features = len(idx)

    def select_inputs(self, keep, optimizers=()):
        """Keep only the input features ``keep`` (the weight's columns), with their optimizer state."""
        idx = _indices_of(keep, self.in_features)
        take_param(self.weight, idx, 1, optimizers)
        self.in_features = len(idx)

    def _sync_shape(self):
        self.out_features, self.in_features = self.weight.shape

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Conv2d(_Quantizable, Module):
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
        return ops.conv2d(_as_input(x, "Conv2d"), self.effective_weight(), self.bias, self.stride, self.padding)

    def select_outputs(self, keep, optimizers=()):
        """Keep only the output channels ``keep``, with their optimizer state."""
        idx = _indices_of(keep, self.out_channels)
        self._take_outputs(idx, optimizers)
        self.out_channels = len(idx)

    def select_inputs(self, keep, optimizers=()):
        """Keep only the input channels ``keep``, with their optimizer state."""
        idx = _indices_of(keep, self.in_channels)
        take_param(self.weight, idx, 1, optimizers)
        self.in_channels = len(idx)

    def _sync_shape(self):
        self.out_channels, self.in_channels = self.weight.shape[:2]

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

    def select(self, keep, optimizers=()):
        """Keep only the channels ``keep``: parameters, their optimizer state and the running statistics."""
        idx = _indices_of(keep, self.num_features)
        take_param(self.weight, idx, 0, optimizers)
        take_param(self.bias, idx, 0, optimizers)
        self.running_mean = np.ascontiguousarray(self.running_mean[idx])
        self.running_var = np.ascontiguousarray(self.running_var[idx])
        self.num_features = len(idx)

    def _sync_shape(self):
        self.num_features = self.weight.shape[0]

    def eval_affine(self):
        """(scale, shift) with eval-mode output ``x * scale + shift`` per channel (float64)."""
        scale = self.weight.data.astype(np.float64) / np.sqrt(self.running_var.astype(np.float64) + self.eps)
        return scale, self.bias.data.astype(np.float64) - self.running_mean.astype(np.float64) * scale

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


# ------------------------------------------------------------ condensed layers
class _FanIn(_Quantizable, Module):
    """Shared state of condensed constant fan-in layers: a ``Topology`` (indices, active), values, bias.

    The connectivity is an immutable value (``fanin.kernels.Topology``): ``layer.indices`` and
    ``layer.active`` are read-only arrays, and the only way to change them is
    ``set_connectivity(...)`` (or SRigL's update and channel removal, which call it), which
    validates the new arrays and makes a new topology with a new ``version``.
    """

    _buffers = ("indices", "active", "n_inputs")

    def _init_condensed(self, n_in: int, n_out: int, sparsity, k, bias: bool, seed):
        from fanin import kernels

        if n_in < 1 or n_out < 1:
            raise ValueError(f"{type(self).__name__}: sizes must be positive, got n_in={n_in}, n_out={n_out}.")
        if k is None:
            if sparsity is None or not 0.0 <= float(sparsity) < 1.0:
                raise ValueError(
                    f"{type(self).__name__}: sparsity must be in [0, 1), got {sparsity}; "
                    "it is the fraction of weights removed (0.9 keeps 10 %)."
                )
            k = int(n_in * (1.0 - float(sparsity)) + 1e-9)
            if k < 1:
                raise ValueError(
                    f"{type(self).__name__}: sparsity {sparsity} leaves fewer than one input per neuron "
                    f"(n_in={n_in}); lower the sparsity to at most {1 - 1 / n_in:.6f}."
                )
        if not 1 <= k <= n_in:
            raise ValueError(f"{type(self).__name__}: fan-in k must be in [1, {n_in}], got {k}.")
        rng = _rng(seed)
        self.n_in, self.n_out = n_in, n_out
        self.topology = kernels.Topology(random_fanin_indices(n_out, n_in, k, rng), n_in)
        self.values = Parameter(kaiming_normal((n_out, k), k, rng))
        self.bias = Parameter(np.zeros(n_out, np.float32)) if bias else None
        self.capture = None  # a list while SRigL wants (x, dy) pairs for growth scores

    @property
    def indices(self) -> np.ndarray:
        """(n_out, k) input index of every weight, read-only (change it with ``set_connectivity``)."""
        return self.topology.indices

    @indices.setter
    def indices(self, value):
        raise AttributeError(
            f"{type(self).__name__}.indices is read-only; change the connectivity with "
            "layer.set_connectivity(indices, values, active), which validates it."
        )

    @property
    def active(self) -> np.ndarray:
        """(n_out,) bool, False for ablated neurons; read-only (change it with ``set_connectivity``)."""
        return self.topology.active

    @active.setter
    def active(self, value):
        raise AttributeError(
            f"{type(self).__name__}.active is read-only; change it with layer.set_connectivity(indices, values, active)."
        )

    @property
    def n_inputs(self) -> np.ndarray:
        """``[n_in]`` as an array (a buffer, so checkpoints carry an input count that channel removal changed)."""
        return np.array([self.n_in], np.int64)

    @property
    def k(self) -> int:
        """The constant fan-in."""
        return self.values.shape[1]

    @property
    def sparsity(self) -> float:
        """Fraction of the dense weights that are absent (ablated neurons count as empty)."""
        return 1.0 - self.k * self.topology.n_active / (self.n_in * self.n_out)

    def to_dense(self) -> np.ndarray:
        """The (n_out, n_in) weight matrix (ablated rows are zero)."""
        w = np.zeros((self.n_out, self.n_in), np.float32)
        rows = np.nonzero(self.active)[0]
        vals = self.values.data if isinstance(self.values.data, np.ndarray) else _host(self.values.data)
        w[rows[:, None], self.indices[rows].astype(np.int64)] = vals[rows]
        return w

    def set_connectivity(self, indices, values: np.ndarray, active: np.ndarray | None = None):
        """Replace the layer's connectivity: ``indices`` (n_out, k) or a ``Topology``, ``values`` (n_out, k),
        ``active`` (n_out,) bool (default: all, or the topology's). Validated; values of inactive rows are zeroed.
        """
        from fanin import kernels

        if isinstance(indices, kernels.Topology):
            topo = indices
            if active is not None and not np.array_equal(np.asarray(active, bool), topo.active):
                raise ValueError(f"{type(self).__name__}.set_connectivity: active disagrees with the topology's; "
                                 "pass one or the other.")
            if topo.n_in != self.n_in:
                raise ValueError(f"{type(self).__name__}.set_connectivity: the topology has n_in={topo.n_in}, "
                                 f"the layer {self.n_in}.")
        else:
            topo = kernels.Topology(indices, self.n_in, active)
        on_device = not isinstance(self.values.data, np.ndarray)  # the layer stays where it is
        values = np.array(values if isinstance(values, np.ndarray) or not hasattr(values, "copy_to_host")
                          else _host(values), dtype=np.float32, copy=True, order="C")
        if values.shape != topo.indices.shape or topo.n_out != self.n_out:
            raise ValueError(
                f"{type(self).__name__}: indices {topo.indices.shape} and values {values.shape} must both be "
                f"({self.n_out}, k)."
            )
        values[~topo.active] = 0
        self.topology = topo
        if on_device:
            from fanin import device as _device

            values = _device.move(values, "cuda")
        self.values.data = values
        self.values.grad = None

    def _load_own(self, state: dict, prefix: str, resize: bool = False):
        if "indices" in state:  # the fan-in may differ from this layer's: take the state's arrays
            n_inputs = np.asarray(state.get("n_inputs", [self.n_in])).reshape(-1)
            if state["indices"].ndim != 2 or n_inputs.size != 1 or n_inputs.dtype.kind not in "iu":
                raise ValueError(f"load_state_dict: '{prefix}indices' (shape {state['indices'].shape}) and "
                                 f"'{prefix}n_inputs' ({n_inputs.size} values) must be an (n_out, k) array and one "
                                 "integer: the state is corrupt.")
            n_out, n_in = int(state["indices"].shape[0]), int(n_inputs[0])
            if (n_out, n_in) != (self.n_out, self.n_in):
                if not resize:
                    raise ValueError(
                        f"load_state_dict: '{prefix}indices' describes a ({n_out} x {n_in}) layer but the model's is "
                        f"({self.n_out} x {self.n_in})."
                    )
                self.n_out, self.n_in = n_out, n_in
                self._set_out_channels(n_out)
                self._set_in_channels(None)
                self.values.data = np.zeros(state["indices"].shape, self.values.dtype)
            active = state.get("active", np.ones(self.n_out, bool))
            self.set_connectivity(state["indices"], state.get("values", self.values.data), active.astype(bool))
            state = {k: v for k, v in state.items() if k not in ("indices", "values", "active", "n_inputs")}
        super()._load_own(state, prefix, resize)

    def transposed(self):
        """The CSC form of the connectivity (for the input gradient), built once per topology."""
        return self.topology.transposed()

    @property
    def weight_param(self):
        return self.values

    def _condensed(self, x2d: Tensor) -> Tensor:
        return ops.fanin_linear(x2d, self.topology, self.effective_weight(), self.bias, capture=self.capture)

    # ------------------------------------------------------------- resizing
    def select_outputs(self, keep, optimizers=()):
        """Keep only the neurons (output channels) ``keep``: rows of the topology, values, bias, bits, exponent."""
        from fanin import kernels

        idx = _indices_of(keep, self.n_out)
        topo = kernels.Topology(self.indices[idx], self.n_in, self.active[idx])
        self._take_outputs(idx, optimizers)
        self.topology = topo
        self.n_out = len(idx)
        self._set_out_channels(len(idx))

    def _set_out_channels(self, n):
        pass

    def remove_inputs(self, removed, rng, optimizers=()):
        """Drop the inputs where ``removed`` (bool, n_in) is True and renumber the rest.

        Every slot that read a removed input gets another live input the neuron does not hold yet
        (drawn with ``rng``), at weight 0 and optimizer state 0, so each active neuron keeps exactly
        ``min(k, inputs left)`` distinct inputs (constant fan-in holds). Returns ``src`` (n_out, k')
        with the old slot of each new connection, or -1 for a refilled one.
        """
        from fanin import kernels
        from fanin.kernels import select

        removed = np.asarray(removed, bool)
        if removed.shape != (self.n_in,):
            raise ValueError(f"remove_inputs: mask of shape {removed.shape} for a layer with n_in={self.n_in}.")
        n_in_new = self.n_in - int(removed.sum())
        if n_in_new < 1:
            raise ValueError(f"{type(self).__name__}: removing every input would leave the layer with none.")
        renumber = np.cumsum(~removed) - 1  # old input -> new input (where kept)
        k_new = min(self.k, n_in_new)
        old = self.indices.astype(np.int64)
        new_idx = np.empty((self.n_out, k_new), np.int64)
        src = np.full((self.n_out, k_new), -1, np.int64)
        for j in range(self.n_out):
            if not self.active[j]:
                new_idx[j] = np.arange(k_new)  # placeholder row: holds nothing
                continue
            keep_slots = np.flatnonzero(~removed[old[j]])[:k_new]
            held = renumber[old[j, keep_slots]]
            free = np.setdiff1d(np.arange(n_in_new), held, assume_unique=True)
            fill = np.sort(rng.choice(free, size=k_new - len(held), replace=False)) if len(held) < k_new else []
            row = np.concatenate([held, fill]).astype(np.int64)
            row_src = np.concatenate([keep_slots, np.full(len(fill), -1)]).astype(np.int64)
            order = np.argsort(row, kind="stable")
            new_idx[j], src[j] = row[order], row_src[order]
        values = select.gather_rows(self.values.data, src)
        self.n_in = n_in_new
        self._set_in_channels(removed)
        self.topology = kernels.Topology(new_idx, n_in_new, self.active)
        self.values.data = np.ascontiguousarray(values)
        self.values.grad = None
        for opt in optimizers:
            if opt.holds(self.values):
                opt.remap_state(self.values, lambda a: select.gather_rows(a, src))
        return src

    def _set_in_channels(self, removed):
        pass


def random_fanin_indices(n_out: int, n_in: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """(n_out, k) sorted, distinct random input indices per row, in the layer's index dtype."""
    from fanin import kernels

    out = np.empty((n_out, k), dtype=kernels.index_dtype(n_in))
    for j in range(n_out):
        out[j] = np.sort(rng.choice(n_in, size=k, replace=False))
    return out


def _condensed_from_dense(cls, weight: np.ndarray):
    """(indices, values, active) of a dense matrix whose non-empty rows hold equally many non-zeros."""
    from fanin import kernels

    w = np.asarray(weight)
    if w.ndim != 2 or w.dtype.kind != "f":
        raise TypeError(f"{cls.__name__}.from_dense: weight must be a 2-D float array, got {w.dtype} {w.shape}.")
    nz = w != 0
    counts = nz.sum(axis=1)
    active = counts > 0
    if not active.any():
        raise ValueError(f"{cls.__name__}.from_dense: every row is zero; a layer needs at least one active neuron.")
    k = int(counts[active][0])
    bad = np.nonzero(active & (counts != k))[0]
    if bad.size:
        shown = ", ".join(f"row {r}: {counts[r]}" for r in bad[:5])
        raise ValueError(
            f"{cls.__name__}.from_dense: constant fan-in needs the same number of non-zeros in every "
            f"non-empty row; row {np.nonzero(active)[0][0]} has {k} but {shown}"
            f"{' ...' if bad.size > 5 else ''}. Prune the rows to equal counts first."
        )
    n_out, n_in = w.shape
    indices = np.empty((n_out, k), kernels.index_dtype(n_in))
    values = np.zeros((n_out, k), np.float32)
    rows = np.nonzero(active)[0]
    cols = np.nonzero(nz[rows])[1].reshape(len(rows), k)  # row-major: sorted within each row
    indices[rows] = cols
    values[rows] = w[rows[:, None], cols]
    indices[~active] = np.arange(k)  # placeholders: ablated rows hold nothing
    return indices, values, active


class FanInLinear(_FanIn):
    """Condensed constant fan-in linear layer: every neuron reads exactly ``k`` of ``n_in`` inputs."""

    def __init__(self, n_in: int, n_out: int, sparsity: float = 0.9, bias: bool = True, seed=None, k=None):
        self._init_condensed(n_in, n_out, sparsity, k, bias, seed)

    @classmethod
    def from_dense(cls, weight, bias=None) -> "FanInLinear":
        """A layer holding exactly the non-zeros of ``weight`` (n_out, n_in); all-zero rows are ablated."""
        indices, values, active = _condensed_from_dense(cls, weight)
        n_out, n_in = np.shape(weight)
        layer = cls(n_in, n_out, k=indices.shape[1], bias=bias is not None, seed=0)
        layer.set_connectivity(indices, values, active)
        if bias is not None:
            layer.bias.data[...] = np.asarray(bias, np.float32)
        return layer

    def forward(self, x):
        x = _as_input(x, "FanInLinear")
        if x.ndim != 2 or x.shape[1] != self.n_in:
            raise ValueError(
                f"FanInLinear({self.n_in}, {self.n_out}): input has shape {x.shape}, expected (batch, {self.n_in})."
            )
        return self._condensed(x)

    def extra_repr(self):
        return f"{self.n_in}, {self.n_out}, k={self.k}, sparsity={self.sparsity:.3f}, active={int(self.active.sum())}"


class FanInConv2d(_FanIn):
    """Condensed convolution: each output channel reads ``k`` of the ``c_in*kh*kw`` taps (direct Numba kernels)."""

    def __init__(self, c_in: int, c_out: int, kernel_size, stride=1, padding=0, sparsity: float = 0.9,
                 bias: bool = True, seed=None, k=None):
        kh, kw = ops._pair(kernel_size)
        self.c_in, self.c_out = c_in, c_out
        self.kernel_size, self.stride, self.padding = (kh, kw), ops._pair(stride), ops._pair(padding)
        self._init_condensed(c_in * kh * kw, c_out, sparsity, k, bias, seed)

    @classmethod
    def from_dense(cls, weight, bias=None, stride=1, padding=0) -> "FanInConv2d":
        """A layer holding the non-zeros of ``weight`` (c_out, c_in, kh, kw)."""
        w = np.asarray(weight)
        if w.ndim != 4:
            raise ValueError(f"FanInConv2d.from_dense: weight must be (c_out, c_in, kh, kw), got shape {w.shape}.")
        indices, values, active = _condensed_from_dense(cls, w.reshape(w.shape[0], -1))
        layer = cls(w.shape[1], w.shape[0], w.shape[2:], stride, padding, k=indices.shape[1],
                    bias=bias is not None, seed=0)
        layer.set_connectivity(indices, values, active)
        if bias is not None:
            layer.bias.data[...] = np.asarray(bias, np.float32)
        return layer

    def to_dense(self) -> np.ndarray:
        """The (c_out, c_in, kh, kw) weight tensor."""
        return super().to_dense().reshape(self.c_out, self.c_in, *self.kernel_size)

    def _set_out_channels(self, n):
        self.c_out = n

    def _set_in_channels(self, removed_taps):
        self.c_in = self.n_in // (self.kernel_size[0] * self.kernel_size[1])

    def remove_input_channels(self, channels, rng, optimizers=()):
        """``remove_inputs`` for whole input channels (bool mask of length c_in): all their kh*kw taps."""
        channels = np.asarray(channels, bool)
        if channels.shape != (self.c_in,):
            raise ValueError(f"remove_input_channels: mask of shape {channels.shape} for c_in={self.c_in}.")
        return self.remove_inputs(np.repeat(channels, self.kernel_size[0] * self.kernel_size[1]), rng, optimizers)

    def forward(self, x):
        x = _as_input(x, "FanInConv2d")
        if x.ndim != 4 or x.shape[1] != self.c_in:
            raise ValueError(
                f"FanInConv2d({self.c_in}, {self.c_out}): input has shape {x.shape}, expected "
                f"(batch, {self.c_in}, height, width)."
            )
        return ops.fanin_conv2d(x, self.topology, self.effective_weight(), self.bias, capture=self.capture,
                                kernel_size=self.kernel_size, stride=self.stride, padding=self.padding)

    def extra_repr(self):
        return (f"{self.c_in}, {self.c_out}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, k={self.k}, sparsity={self.sparsity:.3f}")
