"""Per-row selection kernels for sparse-topology updates (SRigL): pure functions on arrays.

Ties are broken by position (the earlier slot wins), so an update is deterministic.
"""
import numba as nb
import numpy as np
from numba import prange


@nb.njit(parallel=True, cache=True)
def top_per_row(scores, counts):
    """Boolean mask choosing, in each row j, the ``counts[j]`` largest finite scores.

    O(m) per row: a partition finds the cut value, then entries above it and (in order) equal
    to it are taken.
    """
    n, m = scores.shape
    out = np.zeros((n, m), dtype=np.bool_)
    for j in prange(n):
        row = scores[j]
        finite = 0
        for t in range(m):
            if np.isfinite(row[t]):
                finite += 1
        want = min(counts[j], finite)
        if want <= 0:
            continue
        work = np.empty(finite, dtype=scores.dtype)
        q = 0
        for t in range(m):
            if np.isfinite(row[t]):
                work[q] = row[t]
                q += 1
        cut = np.partition(work, finite - want)[finite - want]
        taken = 0
        for t in range(m):
            if np.isfinite(row[t]) and row[t] > cut:
                out[j, t] = True
                taken += 1
        for t in range(m):
            if taken >= want:
                break
            if row[t] == cut:
                out[j, t] = True
                taken += 1
    return out


@nb.njit(parallel=True, cache=True)
def assemble_rows(old_idx, keep, cand_idx, grow_cand, k_new, placeholder):
    """New (indices, source slot) per row: kept old slots plus grown candidates, sorted by index.

    ``keep`` (n, k) marks old slots that stay; ``grow_cand`` (n, c) marks candidates added;
    rows where ``placeholder[j]`` get indices 0..k_new-1 with no source (ablated neurons).
    ``src[j, t]`` is the old slot a new connection comes from, or -1 for a new one;
    ``filled[j]`` counts the connections row j received (the caller checks it equals ``k_new``).
    """
    n, k = old_idx.shape
    c = cand_idx.shape[1]
    new_idx = np.empty((n, k_new), dtype=np.int32)
    src = np.full((n, k_new), -1, dtype=np.int32)
    filled = np.zeros(n, dtype=np.int64)
    for j in prange(n):
        if placeholder[j]:
            for t in range(k_new):
                new_idx[j, t] = t
            filled[j] = k_new
            continue
        vals = np.empty(k + c, dtype=np.int64)
        srcs = np.empty(k + c, dtype=np.int64)
        m = 0
        for t in range(k):
            if keep[j, t]:
                vals[m] = old_idx[j, t]
                srcs[m] = t
                m += 1
        for t in range(c):
            if grow_cand[j, t]:
                vals[m] = cand_idx[j, t]
                srcs[m] = -1
                m += 1
        filled[j] = m
        order = np.argsort(vals[:m])
        for t in range(min(m, k_new)):
            new_idx[j, t] = vals[order[t]]
            src[j, t] = srcs[order[t]]
        for t in range(m, k_new):
            new_idx[j, t] = -1
    return new_idx, src, filled


@nb.njit(parallel=True, cache=True)
def gather_rows(a, src):
    """``out[j, t] = a[j, src[j, t]]``, or 0 where ``src`` is -1 (state of new connections)."""
    n, m = src.shape
    out = np.zeros((n, m), dtype=a.dtype)
    for j in prange(n):
        for t in range(m):
            s = src[j, t]
            if s >= 0:
                out[j, t] = a[j, s]
    return out


def top_mask(scores: np.ndarray, n: int) -> np.ndarray:
    """Boolean mask (same shape) of the ``n`` largest finite entries; ties go to the earlier position.

    O(size): a partition finds the n-th largest value, then equal values are taken in order.
    """
    flat = np.ascontiguousarray(scores).ravel()
    mask = np.zeros(flat.shape, bool)
    finite = np.isfinite(flat)
    n = min(int(n), int(finite.sum()))
    if n <= 0:
        return mask.reshape(scores.shape)
    work = np.where(finite, flat, -np.inf) if not finite.all() else flat
    cut = np.partition(work, work.size - n)[work.size - n]  # the n-th largest value
    above = work > cut
    mask[above] = True
    rest = n - int(above.sum())
    if rest > 0:
        mask[np.flatnonzero(work == cut)[:rest]] = True
    return mask.reshape(scores.shape)
