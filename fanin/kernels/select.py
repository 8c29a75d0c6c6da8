"""Per-row selection kernels for sparse-topology updates (SRigL): pure functions on arrays.

Ties are broken by position (the earlier slot wins), so an update is deterministic.
"""
import numpy as np
from numba import prange

from fanin.kernels._jit import njit, pjit


@njit(cache=True)
def kth_smallest(a, kth):
    """The value ``np.partition(a, kth)[kth]`` would give, for a 1-D array without NaN.

    Quickselect with a median-of-three pivot, in place (``a`` is scratch). Numba's np.partition
    took 4-10 us on the few-hundred-element rows of the growth-score and regrowth selections;
    this takes about a fifth of that.
    """
    lo = 0
    hi = a.size - 1
    while hi > lo:
        mid = (lo + hi) >> 1
        x, y, z = a[lo], a[mid], a[hi]
        pivot = max(min(x, y), min(max(x, y), z))
        i = lo
        j = hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                t = a[i]
                a[i] = a[j]
                a[j] = t
                i += 1
                j -= 1
        if kth <= j:
            hi = j
        elif kth >= i:
            lo = i
        else:
            return a[kth]
    return a[kth]


SMALL_WANT = 64  # up to this many per row, the cut value comes from a sorted buffer instead of a partition


@njit(cache=True)
def _cut_by_buffer(row, want, buf):
    """The ``want``-th largest finite value of ``row`` (which holds more than ``want`` finite values).

    One pass keeping the ``want`` largest values seen, ascending, in ``buf``: a value enters only if
    it beats ``buf[0]``, which after the first few hundred entries is rare and well predicted
    (a regrowth row picks ~10-30 of ~1000 scores: 3-5x faster than a quickselect's branchy passes).
    """
    n = 0
    for t in range(row.size):
        v = row[t]
        if not np.isfinite(v):
            continue
        if n < want:
            i = n
            while i > 0 and buf[i - 1] > v:
                buf[i] = buf[i - 1]
                i -= 1
            buf[i] = v
            n += 1
        elif v > buf[0]:
            i = 0
            while i + 1 < want and buf[i + 1] < v:
                buf[i] = buf[i + 1]
                i += 1
            buf[i] = v
    return buf[0]


@pjit(cache=True)
def top_per_row(scores, counts):
    """Boolean mask choosing, in each row j, the ``counts[j]`` largest finite scores.

    O(m) per row: the cut value (the counts[j]-th largest) comes from a sorted buffer when few are
    wanted, else from a partition of the finite entries; then entries above it and (in order)
    equal to it are taken.
    """
    n, m = scores.shape
    out = np.zeros((n, m), dtype=np.bool_)
    for j in prange(n):
        if counts[j] <= 0:
            continue
        row = scores[j]
        finite = 0
        for t in range(m):
            finite += np.isfinite(row[t])
        want = min(counts[j], finite)
        if want <= 0:
            continue
        if want == finite:
            for t in range(m):
                out[j, t] = np.isfinite(row[t])
            continue
        if want <= SMALL_WANT:
            cut = _cut_by_buffer(row, want, np.empty(want, dtype=scores.dtype))
        else:
            work = np.empty(m, dtype=scores.dtype)
            f = 0
            for t in range(m):  # gather the finite entries, branch-free (f <= t: in bounds)
                v = row[t]
                work[f] = v
                f += np.isfinite(v)
            cut = kth_smallest(work[:finite], finite - want)
        taken = 0
        for t in range(m):
            v = row[t]
            hit = np.isfinite(v) and v > cut
            out[j, t] = hit
            taken += hit
        for t in range(m):
            if taken >= want:
                break
            if row[t] == cut:
                out[j, t] = True
                taken += 1
    return out


@pjit(cache=True)
def assemble_rows(old_idx, keep, cand_idx, grow_cand, k_new, placeholder):
    """New (indices, source slot) per row: kept old slots plus grown candidates, sorted by index.

    ``keep`` (n, k) marks old slots that stay; ``grow_cand`` (n, c) marks candidates added;
    rows where ``placeholder[j]`` get indices 0..k_new-1 with no source (ablated neurons).
    ``src[j, t]`` is the old slot a new connection comes from, or -1 for a new one;
    ``filled[j]`` counts the connections row j received (the caller checks it equals ``k_new``; -1 fills the rest).
    Rows of ``old_idx`` are increasing (a layer's invariant); the chosen candidates are sorted
    if they are not already (the growth kernels list them in input order), then the two
    increasing lists are merged: O(k + c) per row.
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
        grown = np.empty(c + 1, dtype=np.int64)
        m = 0
        for t in range(c):  # branch-free compaction of the chosen candidates
            grown[m] = cand_idx[j, t]
            m += grow_cand[j, t]
        ordered = True
        for t in range(1, m):
            ordered &= grown[t - 1] < grown[t]
        if not ordered:
            grown[:m] = np.sort(grown[:m])
        q = 0  # next output slot
        a = 0  # next old slot
        b = 0  # next grown candidate
        while True:
            while a < k and not keep[j, a]:
                a += 1
            if a >= k and b >= m:
                break
            take_old = b >= m or (a < k and old_idx[j, a] < grown[b])
            if q < k_new:
                if take_old:
                    new_idx[j, q] = old_idx[j, a]
                    src[j, q] = a
                else:
                    new_idx[j, q] = grown[b]
            q += 1
            if take_old:
                a += 1
            else:
                b += 1
        filled[j] = q
        for t in range(q, k_new):
            new_idx[j, t] = -1
    return new_idx, src, filled


@pjit(cache=True)
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


_BITS = 12  # histogram buckets: sign, exponent and 3 mantissa bits of float32 (8 per octave)


@njit(cache=True)
def _bucket(v):
    """The top _BITS of an order-preserving key of float32(v): a > b implies bucket(a) >= bucket(b)."""
    b = np.uint32(np.float32(v).view(np.uint32))
    key = b ^ np.uint32(0xFFFFFFFF) if b >> np.uint32(31) else b | np.uint32(0x80000000)
    return np.intp(key >> np.uint32(32 - _BITS))


@pjit(cache=True)
def _top_mask_flat(flat, n, mask):
    """mask[i] = flat[i] is among the n largest finite entries (ties: earlier first); 0 < n <= #finite.

    Radix select: a parallel histogram of bucket keys finds the bucket holding the n-th largest
    value; a partition of that bucket's values gives it exactly; then one parallel pass marks
    everything above it and an ordered pass over chunks marks the first ties.
    """
    size = flat.size
    n_chunks = min(size, 32)
    per = (size + n_chunks - 1) // n_chunks
    hist = np.zeros((n_chunks, 1 << _BITS), np.int64)
    for ch in prange(n_chunks):
        for i in range(ch * per, min(size, ch * per + per)):
            v = flat[i]
            if np.isfinite(v):
                hist[ch, _bucket(v)] += 1
    total = hist.sum(axis=0)
    above = 0
    bucket = (1 << _BITS) - 1
    while above + total[bucket] < n:
        above += total[bucket]
        bucket -= 1
    start = np.zeros(n_chunks + 1, np.int64)
    for ch in range(n_chunks):
        start[ch + 1] = start[ch] + hist[ch, bucket]
    inside = np.empty(start[n_chunks], flat.dtype)
    for ch in prange(n_chunks):
        q = start[ch]
        for i in range(ch * per, min(size, ch * per + per)):
            v = flat[i]
            if np.isfinite(v) and _bucket(v) == bucket:
                inside[q] = v
                q += 1
    q = inside.size
    want = n - above  # the want-th largest of the bucket is the cut
    cut = kth_smallest(inside, q - want)
    greater = np.zeros(n_chunks, np.int64)
    ties = np.zeros(n_chunks, np.int64)
    for ch in prange(n_chunks):
        for i in range(ch * per, min(size, ch * per + per)):
            v = flat[i]
            if np.isfinite(v) and v > cut:
                mask[i] = True
                greater[ch] += 1
            elif v == cut:
                ties[ch] += 1
    rest = n - greater.sum()
    for ch in range(n_chunks):
        if rest <= 0:
            break
        if ties[ch] == 0:
            continue
        for i in range(ch * per, min(size, ch * per + per)):
            if rest <= 0:
                break
            if flat[i] == cut:
                mask[i] = True
                rest -= 1


def top_mask(scores: np.ndarray, n: int) -> np.ndarray:
    """Boolean mask (same shape) of the ``n`` largest finite entries; ties go to the earlier position.

    O(size), parallel (radix select on the float bits, ``_top_mask_flat``).
    """
    flat = np.ascontiguousarray(scores).ravel()
    mask = np.zeros(flat.shape, bool)
    n = min(int(n), int(np.count_nonzero(np.isfinite(flat))))
    if n > 0:
        _top_mask_flat(flat, n, mask)
    return mask.reshape(scores.shape)
