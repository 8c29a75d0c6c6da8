"""Tensor and the reverse-mode tape.

A ``Tensor`` wraps a NumPy array. An op (see ``ops.py``) builds its output with
``Tensor._make(data, parents, backward)``, where ``backward(g)`` returns the gradient for
each parent. ``Tensor.backward()`` sorts the tape topologically and walks it once in reverse.

Gradient ownership: an op's backward may hand the same array to several parents (``add``
returns ``g`` twice) or pass its incoming ``g`` on unchanged. Every leaf's ``.grad`` is an
array no other tensor holds: the tape adopts an op's result without a copy only when nothing
else in the pass refers to it, and copies otherwise, so accumulating into one leaf's gradient
(a second ``backward()``, weight decay, clipping) never changes another's.

Grad mode (``no_grad()``) is per thread and per asyncio task (a ``contextvars`` variable): a
service that predicts under ``no_grad`` in one thread does not switch off recording in a thread
that trains. A new thread starts with recording on.
"""
from __future__ import annotations

import contextlib
import contextvars

import numpy as np

__all__ = ["Tensor", "Panels", "no_grad", "enable_grad", "is_grad_enabled", "as_array"]

_GRAD_ENABLED = contextvars.ContextVar("fanin_grad_enabled", default=True)
_CUDA = False  # set by fanin.device once CUDA is in use: until then no op looks for device arrays


def _is_device_array(a) -> bool:
    return bool(getattr(a, "__cuda_ndarray__", False)) or hasattr(a, "__cuda_array_interface__")


def on_cuda(*xs) -> bool:
    """True when any operand is a tensor on the CUDA device (or a device array); only asked once CUDA is in use."""
    for x in xs:
        if isinstance(x, Tensor):
            if type(x) is not _PanelTensor and _is_device_array(x.data):
                return True
        elif _is_device_array(x):
            return True
    return False


def is_grad_enabled() -> bool:
    """Whether new ops are recorded on the tape (in this thread / task)."""
    return _GRAD_ENABLED.get()


@contextlib.contextmanager
def _grad_mode(on: bool):
    token = _GRAD_ENABLED.set(on)
    try:
        yield
    finally:
        _GRAD_ENABLED.reset(token)


def no_grad():
    """Context in which ops are not recorded (inference, optimizer updates); affects this thread only."""
    return _grad_mode(False)


def enable_grad():
    """Context in which ops are recorded again (e.g. inside a ``no_grad`` block); this thread only."""
    return _grad_mode(True)


def as_array(data, dtype=None) -> np.ndarray:
    """``data`` as a floating NumPy array: float32 unless it already is float32/float64."""
    if isinstance(data, Tensor):
        data = data.data
    arr = np.asarray(data)
    if dtype is not None:
        if np.dtype(dtype) not in (np.float32, np.float64):  # an integer Tensor would truncate values and gradients
            raise TypeError(f"a Tensor holds float32 or float64, not {np.dtype(dtype)}; pass dtype=np.float32 "
                            "(the default) or np.float64.")
        return arr.astype(dtype, copy=False)
    if arr.dtype == np.float32 or arr.dtype == np.float64:
        return arr
    if arr.dtype.kind in "biuf":
        return arr.astype(np.float32)
    raise TypeError(
        f"cannot make a Tensor from an array of dtype {arr.dtype}; pass numbers "
        "(they are stored as float32, or float64 if you give float64)."
    )


class Tensor:
    """An array that remembers the op that made it, for reverse-mode differentiation."""

    __slots__ = ("data", "grad", "requires_grad", "_parents", "_backward", "__weakref__")
    __array_priority__ = 100.0  # make ndarray <op> Tensor dispatch to Tensor's reflected ops

    def __init__(self, data, requires_grad: bool = False, dtype=None, device=None):
        if device is None and not _is_device_array(data) and not (_CUDA and isinstance(data, Tensor)
                                                                   and data.device == "cuda"):
            self.data = as_array(data, dtype)
        else:  # a device array, or device= given: fanin.device places it (CUDA is imported only then)
            from fanin import device as _device

            self.data = _device.tensor_data(data, dtype, device)
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._parents = ()
        self._backward = None

    @classmethod
    def _make(cls, data, parents, backward):
        """Output of an op: recorded on the tape when grad mode is on and a parent needs grad."""
        out = Tensor.__new__(Tensor)
        out.data = data
        return _record(out, parents, backward)

    # ----------------------------------------------------------------- basics
    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self):
        return self.data.size

    def __len__(self):
        return len(self.data)

    @property
    def device(self) -> str:
        """'cpu', or 'cuda' when the data is a device array."""
        return "cuda" if _is_device_array(self.data) else "cpu"

    def to(self, device) -> "Tensor":
        """This tensor on ``device`` ('cpu' or 'cuda'): itself when it is there, else a new leaf with a copy."""
        from fanin import device as _device

        device = _device.normalize(device)
        if self.device == device:
            return self
        return Tensor(_device.move(self.data, device), requires_grad=self.requires_grad)

    def numpy(self) -> np.ndarray:
        """The underlying array (not a copy); a TypeError for a tensor on the GPU (``.to('cpu').numpy()``)."""
        if _is_device_array(self.data):
            raise TypeError("numpy(): this tensor is on cuda; copy it to the host first with .to('cpu').numpy().")
        return self.data

    def item(self) -> float:
        if _is_device_array(self.data):  # one element from the device
            from fanin import device as _device

            return _device.host(self.data).item()
        return self.data.item()

    def detach(self) -> "Tensor":
        """The same data, cut from the tape."""
        return Tensor(self.data)

    def __repr__(self):
        flag = ", requires_grad=True" if self.requires_grad else ""
        where = ", device='cuda'" if self.device != "cpu" else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{where}{flag})"

    # ------------------------------------------------------------------- tape
    def backward(self, grad=None):
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf that requires grad."""
        if _CUDA and type(self) is not _PanelTensor and _is_device_array(self.data):
            from fanin import device as _device

            return _device.backward(self, grad)
        if not self.requires_grad:
            raise RuntimeError(
                "backward() called on a tensor that does not require grad; make sure an input "
                "or parameter has requires_grad=True and that you are not inside no_grad()."
            )
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward() without an argument needs a scalar, but this tensor has shape "
                    f"{self.shape}; reduce it first (e.g. loss.sum() or loss.mean()) or pass "
                    "grad= with the same shape."
                )
            grad = np.ones_like(self.data)
        else:
            grad = as_array(grad, self.data.dtype)
            if grad.shape != self.shape:
                raise ValueError(
                    f"backward(grad) needs grad of shape {self.shape}, got {grad.shape}."
                )
        order = _topological_order(self)
        grads = {id(self): grad}
        # How many pending gradient slots hold each array (by id; the slots keep the arrays alive),
        # and the arrays already adopted as a leaf's .grad in this pass: an array is adopted without
        # a copy only when no other slot holds it and no leaf has it. The caller's grad is never adopted.
        holders = {id(grad): 2}
        adopted = set()
        for node in reversed(order):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            holders[id(g)] -= 1
            if node._backward is None:  # a leaf
                if isinstance(g, Panels):
                    g = g.rows()
                    holders.setdefault(id(g), 0)
                if node.grad is None:
                    exclusive = holders[id(g)] == 0 and id(g) not in adopted
                    owned = exclusive and g.flags.owndata and g.flags.writeable and g.dtype == node.data.dtype
                    node.grad = g if owned else np.array(g, dtype=node.data.dtype, copy=True)
                    adopted.add(id(node.grad))
                else:
                    node.grad += g
                continue
            if isinstance(g, Panels) and not getattr(node._backward, "takes_panels", False):
                g = g.rows()
            parent_grads = node._backward(g)
            for parent, pg in zip(node._parents, parent_grads):
                if pg is None or not parent.requires_grad:
                    continue
                key = id(parent)
                if key in grads:
                    old = grads[key]
                    holders[id(old)] -= 1
                    pg = old + pg
                grads[key] = pg
                holders[id(pg)] = holders.get(id(pg), 0) + 1

    def zero_grad(self):
        self.grad = None

    # ------------------------------------------------ operators (see ops.py)
    def __add__(self, other):
        return _ops.add(self, other)

    def __radd__(self, other):
        return _ops.add(other, self)

    def __sub__(self, other):
        return _ops.sub(self, other)

    def __rsub__(self, other):
        return _ops.sub(other, self)

    def __mul__(self, other):
        return _ops.mul(self, other)

    def __rmul__(self, other):
        return _ops.mul(other, self)

    def __truediv__(self, other):
        return _ops.div(self, other)

    def __rtruediv__(self, other):
        return _ops.div(other, self)

    def __pow__(self, exponent):
        return _ops.pow(self, exponent)

    def __neg__(self):
        return _ops.neg(self)

    def __matmul__(self, other):
        return _ops.matmul(self, other)

    def __rmatmul__(self, other):
        return _ops.matmul(other, self)

    def __getitem__(self, index):
        return _ops.getitem(self, index)

    def sum(self, axis=None, keepdims=False):
        return _ops.sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims=False):
        return _ops.mean(self, axis, keepdims)

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return _ops.reshape(self, shape)

    def transpose(self, *axes):
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return _ops.transpose(self, axes or None)

    @property
    def T(self):
        return _ops.transpose(self, None)

    def flatten(self, start_dim=1):
        return _ops.flatten(self, start_dim)

    def relu(self):
        return _ops.relu(self)

    def exp(self):
        return _ops.exp(self)

    def log(self):
        return _ops.log(self)


class Panels:
    """A (batch, n) gradient held in the kernels' packed layout: ``array`` (n, Bp) is its transpose
    with the batch zero-padded to whole panels (``fanin.kernels.pack_panels``).

    Ops whose backward is marked ``takes_panels`` (the condensed layers, ReLU) receive and return
    gradients in this form, so a sparse network's backward never packs between layers; the tape
    hands every other op (and every leaf) ``rows()``, the ordinary array.
    """

    __slots__ = ("array", "batch")
    __array_ufunc__ = None  # ndarray + Panels -> Panels.__radd__

    def __init__(self, array: np.ndarray, batch: int):
        self.array, self.batch = array, int(batch)

    @property
    def shape(self):
        return (self.batch, self.array.shape[0])

    def rows(self) -> np.ndarray:
        from fanin import kernels

        return kernels.unpack_panels(self.array, self.batch)

    def __add__(self, other):
        if isinstance(other, Panels):
            return Panels(self.array + other.array, self.batch)
        return self.rows() + other

    __radd__ = __add__


class _PanelTensor(Tensor):
    """An op's output kept in the packed layout (``panels`` (n, Bp) for ``batch`` rows).

    Panel-aware ops (``fanin_linear``, ``relu``) read ``panels``; ``data``, the ordinary (batch, n)
    array, is made from it the first time anything asks (then kept).
    """

    __slots__ = ("panels", "batch", "_rows")

    @property
    def data(self):
        if self._rows is None:
            from fanin import kernels

            self._rows = kernels.unpack_panels(self.panels, self.batch)
        return self._rows

    @data.setter
    def data(self, value):  # replacing the data drops the packed copy
        self._rows, self.panels = value, None

    @property
    def shape(self):
        return (self.batch, self.panels.shape[0]) if self.panels is not None else self._rows.shape

    @property
    def ndim(self):
        return 2

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def dtype(self):
        return self.panels.dtype if self.panels is not None else self._rows.dtype

    @property
    def size(self):
        return self.shape[0] * self.shape[1]

    def __len__(self):
        return self.shape[0]


def make_panels(panels: np.ndarray, batch: int, parents, backward) -> Tensor:
    """Like ``Tensor._make`` for an output held in the packed layout (see ``_PanelTensor``)."""
    out = _PanelTensor.__new__(_PanelTensor)
    out.panels, out.batch, out._rows = panels, int(batch), None
    return _record(out, parents, backward)


def _record(out, parents, backward):
    """Put a new op output on the tape when grad mode is on and a parent needs grad."""
    out.grad = None
    needs = _GRAD_ENABLED.get() and any(p.requires_grad for p in parents)
    out.requires_grad = needs
    out._parents = tuple(parents) if needs else ()
    out._backward = backward if needs else None
    return out


def panels_of(t) -> np.ndarray | None:
    """The packed array of a Tensor kept in the panel layout, else None."""
    return getattr(t, "panels", None)


def _topological_order(root):
    """Nodes reachable from ``root`` through recorded parents, parents before children."""
    order, seen = [], set()
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        for parent in node._parents:
            if id(parent) not in seen:
                stack.append((parent, False))
    return order


from fanin import ops as _ops  # noqa: E402  (ops needs Tensor defined first)
