"""RigL (unstructured) and static sparse training on masked dense layers: the baselines.

Layers stay ``Linear`` / ``Conv2d``; a boolean mask per layer zeroes the absent weights after
every optimizer step. Same schedule and scores as SRigL, but pruning and growth range over the
whole layer with no per-neuron constraint and no ablation.
"""
from __future__ import annotations

import math

import numpy as np

from fanin.kernels import select
from fanin.nn import Conv2d, Linear
from fanin.sparsity.distribution import check_sparsity, drop_fraction, end_step, layer_densities

__all__ = ["RigL", "masked_layers", "rigl_masks"]


def masked_layers(model, skip=()):
    """(name, layer) of every dense Linear/Conv2d in ``model`` whose name is not in ``skip``."""
    return [(n.rstrip("."), m) for n, m in model.named_modules()
            if isinstance(m, (Linear, Conv2d)) and n.rstrip(".") not in skip]


def rigl_masks(weight: np.ndarray, grad: np.ndarray, mask: np.ndarray, frac: float):
    """New mask after one RigL update, and the mask of newly grown connections."""
    n_ones = int(mask.sum())
    n_prune = int(n_ones * frac)
    n_keep = n_ones - n_prune
    drop = np.where(mask, np.abs(weight), 0.0)
    nonzero = int(np.count_nonzero(drop))
    if nonzero < n_keep:
        n_keep, n_prune = nonzero, n_ones - nonzero
    keep = select.top_mask(np.where(mask & (drop > 0), drop, -np.inf), n_keep)
    grow_scores = np.where(keep, -np.inf, np.abs(grad))
    grow = select.top_mask(grow_scores, n_ones - n_keep)
    new_mask = keep | grow
    return new_mask, new_mask & ~mask


class RigL:
    """RigL (Evci et al.) on masked dense layers; ``static=True`` keeps the random mask forever.

    Call ``step()`` after every ``optimizer.step()``.
    """

    def __init__(self, model, optimizer, sparsity: float = 0.9, distribution: str = "erk", delta_t: int = 100,
                 alpha: float = 0.3, t_end: int | None = None, grad_accumulation: int = 1,
                 total_steps: int | None = None, dense_first: bool = False, power: float = 1.0,
                 static: bool = False, skip=(), seed=0):
        self.sparsity = check_sparsity(sparsity)
        if int(delta_t) != delta_t or delta_t < 1:
            raise ValueError(f"RigL: delta_t must be an integer >= 1, got {delta_t}.")
        if grad_accumulation < 1:
            raise ValueError(f"RigL: grad_accumulation must be >= 1, got {grad_accumulation}.")
        if t_end is None and (total_steps is not None or static):
            t_end = int(0.75 * (total_steps or 1))
        self.layers = masked_layers(model, skip)
        if not self.layers:
            raise ValueError("RigL: the model has no Linear/Conv2d layers to sparsify.")
        for name, layer in self.layers:
            if not optimizer.holds(layer.weight):
                raise ValueError(f"RigL: the optimizer does not hold the weight of layer '{name}'; create the "
                                 "optimizer from model.parameters() after building the model.")
        self.model, self.optimizer = model, optimizer
        self.delta_t, self.alpha, self.static = int(delta_t), alpha, static
        self.t_end = None if t_end is None else max(1, int(t_end))  # None: set by plan() (fit does) before updates
        self.grad_accumulation = int(grad_accumulation)
        self.t = 0
        self.history: list = []
        shapes = [layer.weight.shape for _, layer in self.layers]
        self.densities = layer_densities(shapes, self.sparsity, distribution, [0] if dense_first else (), power)
        rng = np.random.default_rng(seed)
        self.masks, self._grad_sum = [], [None] * len(self.layers)
        for (name, layer), d in zip(self.layers, self.densities):
            w = layer.weight.data
            n = int(w.size * d + 1e-6)
            if n == 0:  # the layer would output its bias alone: the network could not learn (as SRigL's fan-in 0)
                raise ValueError(f"RigL: layer '{name}' would keep no weight at density {d:.4g}; lower the sparsity.")
            mask = np.zeros(w.size, bool)
            mask[rng.choice(w.size, n, replace=False)] = True
            mask = mask.reshape(w.shape)
            w *= np.float32(1 / math.sqrt(d))  # initialised for the sparse fan-in
            w *= mask
            self.masks.append(mask)
            optimizer.reset_state(layer.weight)

    def plan(self, total_steps: int):
        """The run's length in optimizer steps (``fit`` tells its hooks before the first step): ``t_end`` becomes 75 %
        of it when neither ``t_end`` nor ``total_steps`` was given."""
        if self.t_end is None:
            self.t_end = max(1, int(0.75 * total_steps))

    def apply_masks(self):
        for (_, layer), mask in zip(self.layers, self.masks):
            layer.weight.data *= mask

    def step(self):
        """Re-apply masks after the optimizer step; update them when the schedule says so."""
        self.t += 1
        updating = not self.static and (self.t_end is None or self.t <= self.t_end)
        nxt = -(-self.t // self.delta_t) * self.delta_t
        if updating and nxt - self.t < self.grad_accumulation:
            for i, (_, layer) in enumerate(self.layers):
                g = layer.weight.grad
                if g is not None:
                    self._grad_sum[i] = g.copy() if self._grad_sum[i] is None else self._grad_sum[i] + g
        if updating and self.t % self.delta_t == 0 and self.t <= end_step(self):
            self.update()
        self.apply_masks()

    def update(self):
        frac = drop_fraction(self.t, self.t_end, self.alpha)
        record = {"step": self.t, "drop_fraction": frac, "layers": []}
        for i, (name, layer) in enumerate(self.layers):
            grad = self._grad_sum[i]
            if grad is None:
                raise RuntimeError(f"RigL: no gradient for layer '{name}' at step {self.t}; call rigl.step() "
                                   "after every optimizer.step().")
            new_mask, grown = rigl_masks(layer.weight.data, grad, self.masks[i], frac)
            layer.weight.data[grown] = 0
            self.optimizer.reset_state(layer.weight, ~new_mask | grown)
            record["layers"].append({"name": name, "n_grow": int(grown.sum())})
            self.masks[i] = new_mask
            self._grad_sum[i] = None
        self.history.append(record)

    def status(self) -> dict:
        total = sum(m.size for m in self.masks)
        return {"sparsity": round(1 - sum(int(m.sum()) for m in self.masks) / total, 4)}

    def state_dict(self) -> dict:
        sd = {"t": self.t, "history": self.history}
        sd.update({f"mask{i}": m for i, m in enumerate(self.masks)})
        sd.update({f"grad_sum{i}": g for i, g in enumerate(self._grad_sum) if g is not None})
        return sd

    def load_state_dict(self, sd: dict):
        t = sd.get("t")
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
            raise ValueError(f"{type(self).__name__}.load_state_dict: the step {t!r} is not an integer >= 0: the "
                             "state is corrupt.")
        self.t = int(t)
        self.history = list(sd.get("history", []))
        for i in range(len(self.masks)):
            self.masks[i] = np.asarray(sd[f"mask{i}"], bool)
            self._grad_sum[i] = np.array(sd[f"grad_sum{i}"]) if f"grad_sum{i}" in sd else None
