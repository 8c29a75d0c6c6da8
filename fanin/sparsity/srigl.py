"""SRigL: dynamic sparse training with constant fan-in and neuron ablation (SPEC.md §2).

The layers are ``FanInLinear`` / ``FanInConv2d``: an update rewrites their condensed arrays
directly; no dense mask exists. Growth scores come from the layer's captured (input, output
gradient) pairs: exactly from the dense gradient for small layers, and for large ones from each
neuron's best candidates computed blockwise (``kernels.growth_candidates``).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from fanin import kernels
from fanin.kernels import select
from fanin.nn import Conv2d, FanInConv2d, FanInLinear, Linear, kaiming_normal, random_fanin_indices
from fanin.sparsity.distribution import check_sparsity, drop_fraction, end_step, layer_densities


def _gather_rows(a, src):
    """select.gather_rows on the host: a layer or optimizer state on the GPU is copied over first (the update
    runs on the host; set_connectivity and the optimizer put the result back on the parameter's device)."""
    if not isinstance(a, np.ndarray):
        from fanin import device

        a = device.host(a)
    return select.gather_rows(a, src)

__all__ = ["SRigL", "LayerUpdate", "srigl_update", "sparse_layers", "dense_shape"]

# layers up to this many dense weights use the exact dense gradient for growth scores
EXACT_LIMIT = 1 << 22


def sparse_layers(model):
    """(name, layer) of every condensed layer in ``model``, in forward-definition order."""
    return [(n.rstrip("."), m) for n, m in model.named_modules() if isinstance(m, (FanInLinear, FanInConv2d))]


def dense_shape(layer):
    """The dense weight shape a condensed layer stands for."""
    if isinstance(layer, FanInConv2d):
        return (layer.c_out, layer.c_in, *layer.kernel_size)
    return (layer.n_out, layer.n_in)


@dataclasses.dataclass
class LayerUpdate:
    """What one SRigL update did to one layer."""

    k_old: int
    k_new: int
    n_prune: int
    n_grow: int
    ablated: int
    reactivated: int
    exact: bool


def _growth_pool(layer, x, dy, c, exact):
    """Grow scores of held slots ``|dL/dvalues|`` and each row's best ``c`` non-held candidates
    (``exact``: every non-held input, in input order), from blockwise ``dy^T x``."""
    c = layer.n_in - layer.k if exact else c
    cand, score, held = kernels.growth_candidates(x, dy, layer.topology, c, sort=False, held=True)
    return held, cand, score  # rows with fewer free inputs than c are padded with -1 / -inf


def srigl_update(layer, x, dy, budget: int, k0: int, frac: float, gamma_sal: float, ablation: bool,
                 exact: bool | None = None, name: str = "?"):
    """One SRigL connectivity update of ``layer`` from its input ``x`` and output gradient ``dy``.

    Returns ``(new_indices, new_values, new_active, src, LayerUpdate)``; ``src[j, t]`` is the old slot
    of each new connection, or -1 for a newly grown one (weight 0, optimizer state 0).
    A connection pruned and regrown in the same update counts as newly grown (weight 0).
    """
    n_out, n_in, k = layer.n_out, layer.n_in, layer.k
    active = layer.active.copy()
    if exact is None:
        exact = n_out * n_in <= EXACT_LIMIT
    values = layer.values.data
    # 1-2: how many connections to replace
    n_ones = int(active.sum()) * k
    n_prune = int(n_ones * frac)
    n_keep = n_ones - n_prune
    drop = np.where(active[:, None], np.abs(values), np.float32(-np.inf))
    positive = drop > 0
    nonzero = int(np.count_nonzero(positive))
    if nonzero < n_keep:
        n_keep, n_prune = nonzero, n_ones - nonzero
    # 3: grow scores, held slots and best non-held candidates per neuron
    c = n_in - k if exact else min(n_in - k, max(k0 + 16, 32))
    held_g, cand, cand_g = _growth_pool(layer, x, dy, c, exact)
    # 4: salience = among the n_keep largest |W| or among the n_prune largest |G| of the layer
    magnitude = np.where(positive, drop, -np.inf)
    keep_sal = select.top_mask(magnitude, n_keep)
    scores = np.concatenate([held_g, cand_g], axis=1)  # (n_out, k + c): held slots, then candidates
    grow_sal = select.top_mask(scores, n_prune)
    # a truncated list whose every candidate is salient may hide more of the layer's top n_prune: widen
    # those lists (x4 each time, at most to every free input) until some candidate of each row is not salient
    while not exact and c < n_in - k and np.any(grow_sal[:, k:].sum(axis=1) >= c):
        c = min(n_in - k, 4 * c)
        held_g, cand, cand_g = _growth_pool(layer, x, dy, c, exact)
        scores = np.concatenate([held_g, cand_g], axis=1)
        grow_sal = select.top_mask(scores, n_prune)
    salient = (keep_sal | grow_sal[:, :k]).sum(axis=1) + grow_sal[:, k:].sum(axis=1)
    # 5: ablation with the minimum-active guard
    new_active = np.ones(n_out, bool)
    if ablation:
        threshold = max(1, int(gamma_sal * k0))
        min_active = min(n_out, max(1, -(-budget // n_in)))
        at_rank = int(np.sort(salient)[::-1][min_active - 1])
        threshold = min(threshold, at_rank)
        new_active = salient >= threshold
    n_active = int(new_active.sum())
    # 6: the new constant fan-in
    k_new = budget // n_active
    if not 1 <= k_new <= n_in:
        raise ValueError(
            f"SRigL: layer '{name}' would get fan-in {k_new} with {n_active} active "
            f"neurons (it must be in [1, {n_in}]); lower the sparsity or gamma_sal."
        )
    # 7: prune — the n_keep largest |W| of the layer (ablated neurons keep nothing), at most k_new per neuron
    if np.all(new_active | ~positive.any(axis=1)):
        drop_now, keep = magnitude, keep_sal  # no neuron with weights was ablated: the same selection
    else:
        drop_now = np.where(new_active[:, None], magnitude, -np.inf)
        keep = select.top_mask(drop_now, n_keep)
    over = keep.sum(axis=1) > k_new
    if over.any():
        keep[over] = select.top_per_row(np.where(keep[over], drop_now[over], -np.inf),
                                        np.full(int(over.sum()), k_new, np.int64))
    # 8: grow each active neuron back to exactly k_new by grow score (held-but-pruned slots compete too)
    kept = keep.sum(axis=1)
    need = np.where(new_active, k_new - kept, 0).astype(np.int64)
    # every row lists min(c, n_in - k) candidates (all rows have n_in - k free inputs)
    if not exact and c < n_in - k and np.any(need > c):
        # the best need[j] non-kept inputs of a row are among its pruned slots and its c best free
        # inputs only when need[j] <= c: score it again with a list of need.max()
        c = min(n_in - k, int(need.max()))
        held_g, cand, cand_g = _growth_pool(layer, x, dy, c, exact)
        scores = np.concatenate([held_g, cand_g], axis=1)
    pool = scores
    np.copyto(pool[:, :k], -np.inf, where=keep)  # kept slots are not regrown; pruned held slots compete
    chosen = select.top_per_row(pool, need)
    regrown_held = chosen[:, :k]
    old_idx = layer.indices.astype(np.int32)
    # grown connections are new (weight 0, state 0) even where they were just pruned (SPEC.md §2 step 9)
    new_idx, src, filled = select.assemble_rows(
        old_idx, keep, np.concatenate([old_idx, cand], axis=1), chosen, k_new, ~new_active)
    if np.any(filled != k_new):
        bad = int(np.nonzero(filled != k_new)[0][0])
        raise RuntimeError(f"SRigL: neuron {bad} received {filled[bad]} connections instead of {k_new} (a bug).")
    new_values = _gather_rows(values, src)
    # keep and regrown_held are disjoint; every chosen connection is new (src -1), need[j] of them per row
    info = LayerUpdate(
        k_old=k, k_new=k_new, n_prune=int((k - kept - regrown_held.sum(axis=1))[active].sum()),
        n_grow=int(need.sum()),
        ablated=int((~new_active).sum()), reactivated=int((new_active & ~active).sum()), exact=bool(exact))
    return new_idx, new_values, new_active, src, info


class SRigL:
    """Structured RigL: every ``delta_t`` optimizer steps until ``t_end``, prune by magnitude and
    regrow by gradient under constant fan-in, ablating neurons with too few salient connections.

    Call ``step()`` after every ``optimizer.step()``. ``t_end`` defaults to 75 % of
    ``total_steps``; with neither, ``fanin.train.fit`` sets it from the run's length before the first step
    (``plan``), and a loop of your own must call ``plan(total_steps)`` before the first update. On construction, each condensed layer is re-initialised (random constant
    fan-in, Kaiming for the sparse fan-in) to the density the ``distribution`` gives it.
    """

    def __init__(self, model, optimizer, sparsity: float = 0.9, distribution: str = "erk", delta_t: int = 100,
                 alpha: float = 0.3, t_end: int | None = None, gamma_sal: float = 0.3, ablation: bool = True,
                 grad_accumulation: int = 1, total_steps: int | None = None, dense_first: bool = False,
                 power: float = 1.0, update: bool = True, exact: bool | None = None, seed=0):
        self.sparsity = check_sparsity(sparsity)
        if int(delta_t) != delta_t or delta_t < 1:
            raise ValueError(f"SRigL: delta_t must be an integer >= 1 (optimizer steps between updates), got {delta_t}.")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"SRigL: alpha must be in [0, 1], got {alpha}.")
        if not 0.0 <= gamma_sal <= 1.0:
            raise ValueError(f"SRigL: gamma_sal must be in [0, 1], got {gamma_sal}.")
        if grad_accumulation < 1:
            raise ValueError(f"SRigL: grad_accumulation must be >= 1, got {grad_accumulation}.")
        if t_end is None and total_steps is not None:
            t_end = int(0.75 * total_steps)
        if t_end is not None and t_end < 1:
            raise ValueError(f"SRigL: t_end must be >= 1, got {t_end}.")
        self.layers = sparse_layers(model)
        if not self.layers:
            raise ValueError("SRigL: the model has no FanInLinear/FanInConv2d layers; build it with sparsity= "
                             "(e.g. fanin.models.mlp(sizes, sparsity=0.9)).")
        for name, layer in self.layers:
            if not optimizer.holds(layer.values):
                raise ValueError(f"SRigL: the optimizer does not hold the values of layer '{name}'; create the "
                                 "optimizer from model.parameters() after building the model.")
        self.model, self.optimizer = model, optimizer
        self.distribution, self.delta_t, self.alpha = distribution, int(delta_t), alpha
        self.t_end = None if t_end is None else int(t_end)  # None: set by plan() (fit does) before the first update
        self.gamma_sal, self.ablation, self.grad_accumulation = gamma_sal, ablation, int(grad_accumulation)
        self.update_enabled, self.exact = update, exact
        self.t = 0
        self.history: list = []
        self._resized: set = set()
        # data-parallel training (fanin.distributed): gathers every rank's captured rows of the update's batches,
        # so each rank scores the global batch and makes the same decisions; None in a single process
        self.exchange = None
        shapes = [dense_shape(layer) for _, layer in self.layers]
        self.densities = layer_densities(shapes, self.sparsity, distribution, [0] if dense_first else (), power)
        self.budgets, self.k0, self._shapes = [], [], []
        rng = np.random.default_rng(seed)
        for (name, layer), d in zip(self.layers, self.densities):
            budget = int(layer.n_out * layer.n_in * d + 1e-6)
            k0 = budget // layer.n_out
            if k0 < 1:
                raise ValueError(f"SRigL: layer '{name}' would get fan-in 0 at density {d:.4g}; lower the sparsity.")
            self.budgets.append(budget)
            self.k0.append(k0)
            self._shapes.append((layer.n_out, layer.n_in))
            if layer.k != k0 or not layer.active.all():
                self._reinitialise(layer, k0, rng)
        # the network's output layer (never ablated) is its last weight layer, if that one is condensed
        weight_layers = [m for m in model.modules() if isinstance(m, (FanInLinear, FanInConv2d, Linear, Conv2d))]
        self.output_layer = weight_layers[-1] if weight_layers[-1] is self.layers[-1][1] else None
        self._arm_capture()

    # ------------------------------------------------------------- schedule
    def plan(self, total_steps: int):
        """The run's length in optimizer steps (``fit`` tells its hooks before the first step): ``t_end`` becomes 75 %
        of it when neither ``t_end`` nor ``total_steps`` was given."""
        if self.t_end is None:
            self.t_end = max(1, int(0.75 * total_steps))
            self._arm_capture()

    def _reinitialise(self, layer, k, rng):
        idx = random_fanin_indices(layer.n_out, layer.n_in, k, rng)
        layer.set_connectivity(idx, kaiming_normal((layer.n_out, k), k, rng), np.ones(layer.n_out, bool))
        self.optimizer.remap_state(layer.values, lambda a: np.zeros((layer.n_out, k), a.dtype))

    def _next_update(self, t: int):
        """The first update step >= t, or None when updates are over."""
        nxt = -(-t // self.delta_t) * self.delta_t
        nxt = max(nxt, self.delta_t)
        return nxt if self.update_enabled and (self.t_end is None or nxt <= self.t_end) else None

    def _arm_capture(self):
        """Capture (x, dy) in the layers during the backward passes the next update will score."""
        nxt = self._next_update(self.t + 1)
        want = nxt is not None and nxt - (self.t + 1) < self.grad_accumulation
        for _, layer in self.layers:
            if want and layer.capture is None:
                layer.capture = []
            elif not want:
                layer.capture = None

    def step(self):
        """Advance one optimizer step; update connectivity when the schedule says so."""
        self.t += 1
        if self.update_enabled and self.t % self.delta_t == 0 and self.t <= end_step(self):
            self.update()
        self._arm_capture()

    def resized(self, layer):
        """Follow a layer whose shape changed (self-compression removed channels): its budget keeps the layer's
        density on the new shape, and gradients captured for the old shape are dropped (the next update skips
        the layer if none are captured again in time)."""
        for i, (_, own) in enumerate(self.layers):
            if own is layer:
                self._rebudget(i)
                if layer.capture is not None:
                    layer.capture = []
                    self._resized.add(id(layer))

    def _rebudget(self, i):
        """Budget and initial fan-in of layer i for its current shape, at its density (at least 1 per neuron)."""
        layer, d = self.layers[i][1], self.densities[i]
        self.budgets[i] = max(int(layer.n_out * layer.n_in * d + 1e-6), layer.n_out)
        self.k0[i] = max(1, min(layer.n_in, self.budgets[i] // layer.n_out))
        self._shapes[i] = (layer.n_out, layer.n_in)

    def update(self):
        """Update every layer's connectivity now (SPEC.md §2 steps 1-9)."""
        frac = drop_fraction(self.t, self.t_end, self.alpha)
        record = {"step": self.t, "drop_fraction": frac, "layers": []}
        resized, self._resized = self._resized, set()
        for (name, layer), budget, k0 in zip(self.layers, self.budgets, self.k0):
            if layer.k >= layer.n_in and layer.active.all():
                continue  # a dense layer: nothing to prune or grow
            if not layer.capture and id(layer) in resized:
                record["layers"].append({"name": name, "skipped": "resized since its gradients were captured"})
                continue
            if not layer.capture:
                raise RuntimeError(
                    f"SRigL: layer '{name}' has no captured gradients at step {self.t}; call srigl.step() once "
                    "after every optimizer.step(), after loss.backward()."
                )
            pairs = layer.capture[-self.grad_accumulation:]
            if self.exchange is not None:
                pairs = self.exchange.gather_pairs(pairs)
            x = np.concatenate([a for a, _ in pairs])
            dy = np.concatenate([b for _, b in pairs])
            ablate = self.ablation and layer is not self.output_layer
            idx, vals, act, src, info = srigl_update(layer, x, dy, budget, k0, frac, self.gamma_sal, ablate,
                                                     self.exact, name)
            layer.set_connectivity(idx, vals, act)
            self.optimizer.remap_state(layer.values, lambda a, s=src: _gather_rows(a, s))
            layer.capture = None
            record["layers"].append({"name": name, **dataclasses.asdict(info)})
        self.history.append(record)

    # --------------------------------------------------------------- report
    def status(self) -> dict:
        """Current global sparsity, ablated neurons and fan-ins, for progress lines."""
        total = sum(math.prod(dense_shape(layer)) for _, layer in self.layers)
        nnz = sum(layer.k * int(layer.active.sum()) for _, layer in self.layers)
        return {
            "sparsity": round(1 - nnz / total, 4),
            "ablated": "/".join(str(int((~layer.active).sum())) for _, layer in self.layers),
            "fan_in": "/".join(str(layer.k) for _, layer in self.layers),
        }

    def state_dict(self) -> dict:
        """Step, update history and any gradients captured for the next update."""
        capture = [[list(pair) for pair in (layer.capture if self.exchange is None else
                                            self.exchange.gather_pairs(layer.capture))]
                   if layer.capture is not None else None for _, layer in self.layers]  # data parallel: all rows
        return {"t": self.t, "history": self.history, "capture": capture}

    def load_state_dict(self, sd: dict):
        """Load ``state_dict()`` output (after the model's state, whose shapes the budgets follow)."""
        for i, (_, layer) in enumerate(self.layers):
            if (layer.n_out, layer.n_in) != self._shapes[i]:
                self._rebudget(i)
        t = sd.get("t")
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
            raise ValueError(f"{type(self).__name__}.load_state_dict: the step {t!r} is not an integer >= 0: the "
                             "state is corrupt.")
        self.t = int(t)
        self.history = list(sd.get("history", []))
        self._arm_capture()
        for (_, layer), cap in zip(self.layers, sd.get("capture") or [None] * len(self.layers)):
            if cap is not None:  # data parallel: the state holds every rank's rows, this rank keeps its own
                layer.capture = [tuple(pair) if self.exchange is None else
                                 tuple(self.exchange.local_rows(a) for a in pair) for pair in cap]
