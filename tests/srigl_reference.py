"""A slow, dense, independent NumPy reference of one SRigL / RigL layer update (SPEC.md §2).

Written straight from the SPEC's steps on a dense weight matrix and a boolean connection mask, with
no code shared with ``fanin.sparsity``: the tests compare the condensed implementation against it.

Tie-breaking here (the SPEC defines none): "the n largest of the layer" takes ties at the earlier
position in row-major order; per-neuron choices take ties at the lower input index. The implementation
lists a neuron's held slots before its free inputs, so a tie between a pruned slot and a free input
may resolve differently: ``first=`` reproduces that order where a comparison cannot avoid ties.
"""
from __future__ import annotations

import math

import numpy as np


def top_n(scores: np.ndarray, eligible: np.ndarray, n: int, first=None) -> np.ndarray:
    """Mask of the ``n`` largest ``scores`` among ``eligible`` entries (2-D). Ties go to the earlier
    row-major position, except that within a row, positions marked in ``first`` precede the others."""
    rows, cols = np.nonzero(eligible)
    s = scores[rows, cols].astype(np.float64)
    f = np.zeros(rows.size, bool) if first is None else first[rows, cols]
    order = np.lexsort((cols, ~f, rows, -s))[:max(0, int(n))]
    out = np.zeros(scores.shape, bool)
    out[rows[order], cols[order]] = True
    return out


def top_in_row(scores: np.ndarray, eligible: np.ndarray, n: int, first=None) -> np.ndarray:
    """1-D: mask of the ``n`` largest eligible scores of one row; ties to ``first``, then the lower index."""
    return top_n(scores[None], eligible[None], n, None if first is None else first[None])[0]


def salient_counts(W, held, G, frac, first=None):
    """Steps 1-4: (n_keep, n_prune, salient count per neuron)."""
    n_ones = int(held.sum())
    n_prune = int(n_ones * frac)
    n_keep = n_ones - n_prune
    nonzero = held & (W != 0)
    if int(nonzero.sum()) < n_keep:  # keep every non-zero, prune the rest
        n_keep = int(nonzero.sum())
        n_prune = n_ones - n_keep
    keep_sal = top_n(np.abs(W), nonzero, n_keep)
    grow_sal = top_n(np.abs(G), np.ones(G.shape, bool), n_prune, first)  # every position of the layer
    return n_keep, n_prune, (keep_sal | grow_sal).sum(axis=1)


def srigl_reference(W, held, G, budget, k0, frac, gamma_sal, ablation, first=None):
    """One SRigL update of a dense layer.

    ``W`` (n_out, n_in) weights (0 where not held), ``held`` its connection mask (ablated neurons'
    rows are empty), ``G`` the dense gradient dL/dW. Returns a dict: ``held`` (new mask), ``W``
    (new weights), ``active``, ``kept`` (connections carried over with weight and optimizer state),
    ``grown`` (new connections: weight 0, state 0), ``k_new``, ``n_keep``, ``n_prune``, ``salient``.
    Equal grow scores go to the lower input index; ``first`` (n_out, n_in), optional, marks positions
    that win ties within their neuron (the implementation lists a neuron's slots, held or placeholder,
    before its free inputs), for comparisons whose gradients have ties (e.g. zero columns).
    """
    W = np.asarray(W, np.float64)
    n_out, n_in = W.shape
    n_keep, n_prune, salient = salient_counts(W, held, G, frac, first)
    # 5: ablation, with the minimum-active guard
    active = np.ones(n_out, bool)
    if ablation:
        threshold = max(1, math.floor(gamma_sal * k0))
        # the SPEC says floor(budget / n_in); the implementation uses ceil (so that k' <= n_in), and so do we
        min_active = min(n_out, max(1, math.ceil(budget / n_in)))
        if int((salient >= threshold).sum()) < min_active:
            threshold = int(sorted(salient, reverse=True)[min_active - 1])
        active = salient >= threshold
    n_active = int(active.sum())
    # 6
    k_new = budget // n_active
    assert 1 <= k_new <= n_in, "the reference does not model the error path"
    # 7: prune: the n_keep largest |W| of the layer over the neurons that stay active, then cap each at k'
    nonzero = held & (W != 0) & active[:, None]
    keep = top_n(np.abs(W), nonzero, n_keep)
    for j in range(n_out):
        if keep[j].sum() > k_new:
            keep[j] = top_in_row(np.abs(W[j]), keep[j], k_new)
    # 8: grow every active neuron back to k' by |G| among inputs it does not hold (after pruning)
    grown = np.zeros_like(keep)
    for j in np.flatnonzero(active):
        grown[j] = top_in_row(np.abs(G[j]), ~keep[j], k_new - int(keep[j].sum()),
                              None if first is None else first[j])
    new_held = keep | grown
    assert np.all(new_held[active].sum(axis=1) == k_new) and not new_held[~active].any()
    return {"held": new_held, "W": np.where(keep, W, 0.0), "active": active, "kept": keep, "grown": grown,
            "k_new": k_new, "n_keep": n_keep, "n_prune": n_prune, "salient": salient}


def rigl_reference(W, mask, G, frac):
    """One RigL update: (new mask, kept mask, regrown mask). Growth ranges over every position not kept,
    so a connection just pruned may be regrown (whether it then keeps its weight is the caller's question)."""
    n_ones = int(mask.sum())
    n_prune = int(n_ones * frac)
    n_keep = n_ones - n_prune
    nonzero = mask & (W != 0)
    if int(nonzero.sum()) < n_keep:
        n_keep = int(nonzero.sum())
    keep = top_n(np.abs(W), nonzero, n_keep)
    grown = top_n(np.abs(G), ~keep, n_ones - n_keep)
    return keep | grown, keep, grown


def layer_dense(layer):
    """(W, held) of a condensed layer, as float64 / bool dense (n_out, n_in) arrays."""
    W = np.zeros((layer.n_out, layer.n_in))
    held = np.zeros((layer.n_out, layer.n_in), bool)
    rows = np.flatnonzero(layer.active)
    idx = np.asarray(layer.indices, np.int64)
    held[rows[:, None], idx[rows]] = True
    W[rows[:, None], idx[rows]] = layer.values.data[rows]
    return W, held


def implementation_dense(old_indices, old_values, result, n_in):
    """Dense view of ``srigl_update``'s result (new_indices, new_values, active, src, ...), after
    checking ``src`` is consistent: a carried-over connection stays at its input with its old value,
    a new one starts at 0, ablated neurons hold nothing. Returns a dict like ``srigl_reference``'s."""
    new_indices, new_values, active, src = result[:4]
    n_out, k_new = new_indices.shape
    old_indices = np.asarray(old_indices, np.int64)
    new_indices = np.asarray(new_indices, np.int64)
    rows = np.arange(n_out)[:, None]
    has_src = src >= 0
    safe = np.where(has_src, src, 0)
    assert np.all(old_indices[rows, safe][has_src] == new_indices[has_src]), "src points at another input"
    assert np.array_equal(new_values[has_src], old_values[rows, safe][has_src]), "a kept value changed"
    assert np.all(new_values[~has_src] == 0), "a new connection does not start at 0"
    assert not has_src[~active].any() and np.all(new_values[~active] == 0), "an ablated neuron holds weights"
    act = np.flatnonzero(active)
    assert np.all(np.diff(new_indices[act], axis=1) > 0), "indices not sorted and distinct"
    held = np.zeros((n_out, n_in), bool)
    kept = np.zeros((n_out, n_in), bool)
    W = np.zeros((n_out, n_in))
    held[act[:, None], new_indices[act]] = True
    kept[act[:, None], new_indices[act]] = has_src[act]
    W[act[:, None], new_indices[act]] = new_values[act]
    return {"held": held, "kept": kept, "grown": held & ~kept, "W": W, "active": np.asarray(active, bool),
            "k_new": k_new}
