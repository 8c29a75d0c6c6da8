"""Optimizers (SGD, Adam, AdamW) and learning-rate schedules.

State is kept per parameter, as arrays shaped like the parameter, in ``optimizer.state[param]``.
When a layer changes shape or connectivity (SRigL, channel removal), ``reset_state`` zeroes
entries and ``remap_state`` rebuilds every state array of a parameter with one function (call
it after the parameter took its new shape; ``select_state`` is the common case of keeping some
rows or columns). Nothing resets silently: a state array whose shape no longer matches its
parameter is an error (``StateShapeError``) that names the parameter and says what to call.
"""
from __future__ import annotations

import math

import numpy as np

from fanin import tensor as _tm
from fanin.kernels import update
from fanin.tensor import Tensor

_EMPTY = {"f": np.zeros(0, np.float32), "d": np.zeros(0, np.float64)}


def _flat(a: np.ndarray, dtype=None) -> np.ndarray:
    """A contiguous 1-D view of ``a`` (a copy only if ``a`` is not contiguous or has another dtype)."""
    if dtype is not None and a.dtype != dtype:
        a = a.astype(dtype)
    return a.reshape(-1) if a.flags.c_contiguous else np.ascontiguousarray(a).reshape(-1)

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "CosineSchedule", "StateShapeError"]


def _dev():
    from fanin import device

    return device


class StateShapeError(ValueError):
    """An optimizer state array no longer has its parameter's shape (the parameter was resized)."""


class Optimizer:
    """Holds the parameters, their per-parameter state, and a learning rate ``lr``."""

    _state_names: tuple = ()

    def __init__(self, params, lr: float):
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list; pass model.parameters().")
        names = {}
        if all(isinstance(p, tuple) and len(p) == 2 for p in params):  # model.named_parameters()
            names = {id(p): n for n, p in params}
            params = [p for _, p in params]
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer: parameter {i} is a {type(p).__name__}, not a Tensor/Parameter.")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("optimizer: a parameter appears more than once in the list.")
        if not lr > 0:
            raise ValueError(f"optimizer: lr must be positive, got {lr}.")
        self.params = params
        self._names = names
        self.lr = float(lr)
        self.state: dict = {}
        self.steps = 0

    def holds(self, param) -> bool:
        return any(p is param for p in self.params)

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def param_name(self, param) -> str:
        """How errors name ``param``: its model name where known, else its position and shape."""
        name = self._names.get(id(param)) or getattr(param, "name", None)
        pos = next((i for i, p in enumerate(self.params) if p is param), None)
        where = f"parameter {pos}" if pos is not None else "a parameter"
        return f"'{name}' ({where}, shape {tuple(param.data.shape)})" if name else \
            f"{where} of shape {tuple(param.data.shape)}"

    def _mismatch(self, param, name, shape, hint):
        return StateShapeError(
            f"optimizer: the '{name}' state of {self.param_name(param)} has shape {tuple(shape)}; the parameter "
            f"changed shape without its state. {hint}"
        )

    def _slot(self, p, name):
        st = self.state.setdefault(p, {})
        a = st.get(name)
        if a is None:
            a = st[name] = np.zeros_like(p.data) if isinstance(p.data, np.ndarray) else _dev().zeros_like(p.data)
        elif _tm._CUDA and isinstance(a, np.ndarray) != isinstance(p.data, np.ndarray):  # state follows its param
            a = st[name] = _dev().move(a, "cpu" if isinstance(p.data, np.ndarray) else "cuda")
        if tuple(a.shape) != tuple(p.data.shape):
            raise self._mismatch(p, name, a.shape, "Call optimizer.remap_state(param, fn) (or select_state) right "
                                                   "after resizing the parameter, to carry its state over.")
        return a

    def step(self):
        """Update every parameter that has a gradient."""
        self.steps += 1
        for p in self.params:
            if p.grad is None:
                continue
            if tuple(p.grad.shape) != tuple(p.data.shape):
                raise ValueError(
                    f"optimizer: gradient of shape {p.grad.shape} does not match parameter of shape "
                    f"{p.data.shape}; did the layer change shape without calling remap_state()?"
                )
            if _tm._CUDA and not isinstance(p.data, np.ndarray):  # on the device: the CUDA twin of the update
                if isinstance(p.grad, np.ndarray):
                    raise TypeError(f"optimizer: {self.param_name(p)} is on cuda but its gradient is on the cpu; "
                                    "zero_grad() after moving the model, then run backward() again.")
                self._update(p, p.grad)
                continue
            if not (p.data.flags.c_contiguous and p.data.flags.writeable):
                # updated in place: a strided or read-only array (np.load(mmap_mode="r")) becomes the parameter's
                # own contiguous copy, which the update then writes
                p.data = np.array(p.data, order="C")
            self._update(p, p.grad)

    def _update(self, p, g):
        raise NotImplementedError

    # ------------------------------------------------------- resizable state
    def reset_state(self, param, where=None):
        """Zero the state of ``param`` (everywhere, or where the boolean mask ``where`` is True)."""
        st = self.state.get(param, {})
        for name, arr in st.items():
            if not isinstance(arr, np.ndarray):  # on the device: through the host (SRigL's schedule, rare)
                h = _dev().host(arr)
                h[... if where is None else where] = 0
                st[name] = _dev().move(h, "cuda")
            elif where is None:
                arr[...] = 0
            else:
                arr[where] = 0

    def remap_state(self, param, fn):
        """Replace each state array ``a`` of ``param`` by ``fn(a)``, after ``param`` was resized.

        Every result must have the parameter's new shape (else ``StateShapeError``, nothing changed).
        """
        st = self.state.get(param)
        if not st:
            return
        dev = not isinstance(param.data, np.ndarray)  # on the device, fn runs on host copies (SRigL: every delta_t)
        new = {name: np.ascontiguousarray(fn(_dev().host(a) if dev or not isinstance(a, np.ndarray) else a),
                                          dtype=param.data.dtype) for name, a in st.items()}
        for name, a in new.items():
            if a.shape != tuple(param.data.shape):
                raise self._mismatch(param, name, a.shape, "remap_state's function must return arrays of the "
                                                           "parameter's new shape; resize the parameter first.")
        st.update({name: _dev().move(a, "cuda") for name, a in new.items()} if dev else new)

    def select_state(self, param, keep, axis: int = 0):
        """Keep the state entries ``keep`` (indices or a boolean mask) along ``axis``: the state of a parameter
        whose rows (``axis=0``) or columns were removed, e.g. by channel removal. Call after resizing ``param``."""
        self.remap_state(param, lambda a: np.take(a, np.flatnonzero(keep) if np.asarray(keep).dtype == bool
                                                  else np.asarray(keep), axis=axis))

    def state_dict(self) -> dict:
        """Hyper-parameters and state arrays, keyed by parameter position."""
        index = {id(p): i for i, p in enumerate(self.params)}
        return {
            "lr": self.lr,
            "steps": self.steps,
            "state": {index[id(p)]: {k: v.copy() if isinstance(v, np.ndarray) else _dev().host(v) for k, v in st.items()}
                      for p, st in self.state.items()},
        }

    def load_state_dict(self, sd: dict):
        """Load ``state_dict()`` output; every state array must fit its parameter's current shape."""
        state = {}
        for i, st in sd["state"].items():
            if not 0 <= int(i) < len(self.params):
                raise ValueError(f"optimizer.load_state_dict: state for parameter {i}, but this optimizer holds "
                                 f"{len(self.params)}; it must come from an optimizer over the same parameters.")
            p = self.params[int(i)]
            state[p] = {k: np.array(v, dtype=p.data.dtype, copy=True) for k, v in st.items()}
            for k, v in state[p].items():
                if v.shape != tuple(p.data.shape):
                    raise self._mismatch(p, k, v.shape, "Load the model's state (its shapes) before the optimizer's.")
            if not isinstance(p.data, np.ndarray):  # the state lives where its parameter lives
                state[p] = {k: _dev().move(v, "cuda") for k, v in state[p].items()}
        self.lr = float(sd["lr"])
        self.steps = int(sd["steps"])
        self.state = state


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov momentum and weight decay."""

    def __init__(self, params, lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(params, lr)
        if momentum < 0 or weight_decay < 0:
            raise ValueError("SGD: momentum and weight_decay must be >= 0.")
        if nesterov and momentum == 0:
            raise ValueError("SGD: nesterov=True needs momentum > 0.")
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay

    def _update(self, p, g):
        if not isinstance(p.data, np.ndarray):
            buf = self._slot(p, "momentum") if self.momentum else None
            _dev().backend().sgd_update(p.data, g, buf, self.lr, self.momentum, self.weight_decay, self.nesterov)
            return
        buf = self._slot(p, "momentum") if self.momentum else _EMPTY[p.data.dtype.char]
        dt = p.data.dtype.type
        update.sgd_update(_flat(p.data), _flat(g, p.data.dtype), _flat(buf), dt(self.lr), dt(self.momentum),
                          dt(self.weight_decay), self.nesterov)


class Adam(Optimizer):
    """Adam; with ``decoupled=True`` (AdamW) weight decay shrinks weights directly.

    The bias correction of a parameter counts the steps that updated it (``counts``), as PyTorch's does: a
    parameter that first gets a gradient after some steps (a branch unused at first, a layer unfrozen later)
    starts with the correction of its first step, not of the optimizer's."""

    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"Adam: betas must lie in [0, 1), got {betas}.")
        self.betas, self.eps, self.weight_decay = (b1, b2), eps, weight_decay
        self.counts = {}  # parameter -> the steps that updated it

    def state_dict(self) -> dict:
        sd = super().state_dict()
        index = {id(p): i for i, p in enumerate(self.params)}
        sd["counts"] = {index[id(p)]: t for p, t in self.counts.items()}
        return sd

    def load_state_dict(self, sd: dict):
        super().load_state_dict(sd)
        if "counts" in sd:
            self.counts = {self.params[int(i)]: int(t) for i, t in sd["counts"].items()
                           if 0 <= int(i) < len(self.params)}
        else:  # written before the counts were kept: every parameter with state had counted every step
            self.counts = {p: self.steps for p in self.state}

    def _update(self, p, g):
        b1, b2 = self.betas
        m, v = self._slot(p, "m"), self._slot(p, "v")
        t = self.counts[p] = self.counts.get(p, 0) + 1
        dt = p.data.dtype.type
        step = self.lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        l2 = 0.0 if self.decoupled else self.weight_decay
        decay = 1.0 - self.lr * self.weight_decay if self.decoupled else 1.0
        # lr * m_hat / (sqrt(v_hat) + eps) == step * m / (sqrt(v) + eps * sqrt(1 - b2^t))
        eps = self.eps * math.sqrt(1 - b2 ** t)
        if not isinstance(p.data, np.ndarray):
            _dev().backend().adam_update(p.data, g, m, v, step, b1, b2, eps, l2, decay)
            return
        update.adam_update(_flat(p.data), _flat(g, p.data.dtype), _flat(m), _flat(v), dt(step), dt(b1), dt(b2),
                           dt(eps), dt(l2), dt(decay))


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter)."""

    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr, betas, eps, weight_decay)


class CosineSchedule:
    """Linear warm-up to ``base_lr``, then cosine decay to ``min_lr`` at ``total_steps``."""

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
                 base_lr: float | None = None):
        if total_steps < 1 or warmup_steps < 0 or warmup_steps > total_steps:
            raise ValueError(
                f"CosineSchedule: need 0 <= warmup_steps <= total_steps and total_steps >= 1, "
                f"got warmup_steps={warmup_steps}, total_steps={total_steps}."
            )
        self.optimizer = optimizer
        self.total_steps, self.warmup_steps, self.min_lr = total_steps, warmup_steps, min_lr
        self.base_lr = optimizer.lr if base_lr is None else base_lr
        self.t = 0
        optimizer.lr = self.lr_at(0)

    def lr_at(self, t: int) -> float:
        """The learning rate for step ``t`` (0-based)."""
        if t < 0:
            raise ValueError(f"CosineSchedule: step {t} is negative; steps count from 0.")
        if t < self.warmup_steps:
            return self.base_lr * (t + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (t - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * progress))

    def step(self):
        """Advance one step and set the optimizer's lr."""
        self.t += 1
        self.optimizer.lr = self.lr_at(self.t)
