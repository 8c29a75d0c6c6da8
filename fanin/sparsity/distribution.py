"""Layer-wise sparsity: how a global budget of non-zeros is shared between layers, and the
cosine drop-fraction schedule of RigL/SRigL."""
from __future__ import annotations

import math

import numpy as np

__all__ = ["drop_fraction", "layer_densities", "check_sparsity"]


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    """``sparsity`` as a float in (0, 1), or a ValueError saying what it must be."""
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number in (0, 1), got {sparsity!r}.") from None
    if not 0.0 < s < 1.0:
        raise ValueError(
            f"{what} must be in (0, 1) — the fraction of weights removed (0.9 keeps 10 %) — got {s}."
        )
    return s


def end_step(updater) -> int:
    """``updater.t_end``, which must be known once an update is due: a (S)RigL built with neither ``t_end`` nor
    ``total_steps`` learns it from ``plan(total_steps)`` (``fanin.train.fit`` calls it)."""
    if updater.t_end is None:
        name = type(updater).__name__
        raise ValueError(f"{name}: an update is due at step {updater.t} but the last update step is unknown: pass "
                         f"t_end= or total_steps= to {name}(...), call {name.lower()}.plan(total_steps) before "
                         "training, or train with fanin.train.fit (which does).")
    return updater.t_end


def drop_fraction(t: int, t_end: int, alpha: float) -> float:
    """Fraction of a layer's connections replaced at step ``t``: ``alpha/2 * (1 + cos(pi t / t_end))``."""
    return alpha / 2.0 * (1.0 + math.cos(math.pi * min(t, t_end) / t_end))


def layer_densities(shapes, sparsity: float, distribution: str = "erk", dense=(), power: float = 1.0):
    """Density (1 - sparsity) of each layer so that the total non-zero count is ``(1-sparsity) * total``.

    ``shapes``: each layer's dense weight shape, e.g. (n_out, n_in) or (c_out, c_in, kh, kw).
    ``dense``: positions of layers kept dense (they are counted in the budget).
    ``uniform`` gives every other layer the same density; ``erk`` makes density proportional to
    ``(sum(shape) / prod(shape)) ** power`` and makes dense (then re-solves) any layer that would
    exceed density 1.
    """
    s = check_sparsity(sparsity)
    if distribution not in ("uniform", "erk"):
        raise ValueError(f"distribution must be 'uniform' or 'erk', got {distribution!r}.")
    sizes = np.array([math.prod(sh) for sh in shapes], dtype=np.float64)
    budget = (1.0 - s) * sizes.sum()
    is_dense = np.zeros(len(shapes), bool)
    is_dense[list(dense)] = True
    if distribution == "uniform":
        weights = np.ones(len(shapes))
    else:
        weights = np.array([(sum(sh) / math.prod(sh)) ** power for sh in shapes])
    while True:
        remaining = budget - sizes[is_dense].sum()
        if remaining <= 0 or is_dense.all():
            raise ValueError(
                f"sparsity {s} is too high for the layers kept dense ({int(sizes[is_dense].sum())} of "
                f"{int(sizes.sum())} weights): lower the sparsity or keep fewer layers dense."
            )
        free = ~is_dense
        eps = remaining / float((weights[free] * sizes[free]).sum())
        dens = np.where(is_dense, 1.0, eps * weights)
        over = free & (dens > 1.0)
        if not over.any():
            return [float(d) for d in dens]
        if distribution == "uniform":  # a single density > 1 means the budget exceeds every layer
            raise ValueError(f"sparsity {s} leaves more weights than the sparse layers hold.")
        is_dense |= over
