"""Huge-page buffers for the arrays the kernels gather from.

The batched kernels read rows of a packed operand (``pack_panels``) at random: each connection
``(j, t)`` loads 128 bytes from row ``indices[j, t]``. With 4 KiB pages every such load needs its
own TLB entry, and a 512 KiB operand spans 128 pages, more than the first-level TLB holds; the
misses cost a quarter of the kernel time (measured on the reference machine, 1024x1024 layer,
fan-in 91, batch 128: forward 388 -> 284 us, value gradient 363 -> 270 us, input gradient
475 -> 360 us, bench/RESULTS.md "Huge pages"). With 2 MiB pages the whole operand is one entry.

Linux gives an anonymous mapping transparent huge pages when it is ``madvise(MADV_HUGEPAGE)``d
(the default ``enabled=madvise`` policy), but NumPy only asks for them from 4 MiB on, and a fresh
mapping per step would pay a 2 MiB page fault per step. So ``empty`` hands out pieces of a few
huge-page regions and takes a piece back as soon as the NumPy array on it (and every view of it)
is gone: the piece's owner object (``_Piece``, the array's base) returns it when it dies.

Design (a best-fit allocator with coalescing under a per-size cache):

* Size classes. A request is rounded up to the next size with at most ``CLASS_BITS + 1``
  significant bits (8 classes per power of two), so a piece is less than 1/8 (12.5 %) larger
  than the array on it, and nearby sizes (batch 100 and 104, say) share pieces.
* Regions. Memory is mapped in regions: 2 MiB-aligned, a whole number of huge pages, at least
  ``CHUNK`` (8 MiB), ``madvise(MADV_HUGEPAGE)``d. Each region keeps its free space as maximal
  blocks (neighbours are merged when a piece comes back); a piece is cut from the smallest free
  block that holds it (best fit), at the block's start, so pieces stay 8 KiB-aligned.
* The cache. A freed piece first goes to a LIFO list for its class: training asks for the same
  few sizes every step, and a request is then served by one dict lookup and one list pop. The
  cached pieces go back into their regions' free space (and coalesce) only when a request finds
  neither a cached piece nor a free block, and on ``trim()``; so pieces never stay stranded in a
  class nobody asks for any more.
* Growth and the cap. When no free block holds a request even after the cache went back, every
  wholly free region is unmapped and one new region is mapped that is as large as all of them
  together, or as the request (rounded to huge pages), or ``CHUNK``, whichever is largest: so
  ``mapped`` only grows when the regions that hold live pieces, plus the request, need more than
  is mapped, and a loop of any sizes freed one by one keeps a single region. ``mapped`` never
  exceeds ``FANIN_HUGEPAGE_POOL_MB`` (default 256); what cannot be served within it falls back
  to ``np.empty``. ``trim()`` unmaps every wholly free region and returns the bytes released:
  ``mapped`` drops to the regions that hold live pieces.
* Waste bound: a piece is < 1/8 larger than its array; a region's free space is lost to a
  request only while it is split by live pieces (external fragmentation, bounded by the cap).
* Threads. Every pool structure is guarded by one lock. Returning a piece happens in
  ``_Piece.__del__``, in whatever thread drops the last reference, possibly while this same
  thread is inside ``take`` (the garbage collector runs anywhere): it only appends to a
  ``collections.deque`` (atomic, never blocks), and ``take``/``trim``/``stats`` drain that
  deque under the lock before they look at anything. Nothing depends on the GIL.
* A region is unmapped only when no piece of it is out (cached or free pieces have no array on
  them); the pool keeps no buffer export of its mappings, so ``mmap.close`` can always unmap,
  and every ``_Piece`` holds its pool, so the mappings outlive the arrays even at exit.

Small arrays (under ``MIN_BYTES``), object and structured dtypes, requests the cap cannot serve,
systems without ``MADV_HUGEPAGE`` (non-Linux) and ``FANIN_HUGEPAGES=0`` get a plain ``np.empty``.
The environment variables are only read, at import.
"""
from __future__ import annotations

import collections
import ctypes
import math
import mmap
import os
import threading

import numpy as np

__all__ = ["empty", "enabled", "stats", "trim"]

HUGE_PAGE = 2 << 20
CHUNK = 8 << 20       # the smallest region mapped (four huge pages)
ALIGN = 64            # every piece starts on a cache line (in fact on 8 KiB: classes from 64 KiB on)
MIN_BYTES = 64 << 10  # smaller arrays span few pages: plain np.empty
CLASS_BITS = 3        # 2**CLASS_BITS size classes per power of two: a piece is < 1/8 larger than asked


def _env_enabled() -> bool:
    return os.environ.get("FANIN_HUGEPAGES", "1") != "0" and hasattr(mmap, "MADV_HUGEPAGE")


def size_class(nbytes: int) -> int:
    """The piece size for a request of ``nbytes``: rounded up to CLASS_BITS + 1 significant bits
    (and to a multiple of ALIGN)."""
    q = 1 << max(nbytes.bit_length() - 1 - CLASS_BITS, ALIGN.bit_length() - 1)
    return -(-nbytes // q) * q


class _Region:
    """One 2 MiB-aligned mapping; its free space as maximal blocks ``start -> end`` (and ``end -> start``)."""

    __slots__ = ("map", "base", "span", "by_start", "by_end", "held")

    def __init__(self, m: mmap.mmap, base: int, span: int):
        self.map, self.base, self.span = m, base, span
        self.by_start = {base: base + span}
        self.by_end = {base + span: base}
        self.held = 0  # bytes cut out of the free space: pieces out, on their way back, or cached

    def best_fit(self, size: int):
        """(block length, start) of the smallest free block of at least ``size`` bytes, or None."""
        best = None
        for start, end in self.by_start.items():
            n = end - start
            if n >= size and (best is None or (n, start) < best):
                best = (n, start)
        return best

    def cut(self, start: int, size: int) -> int:
        end = self.by_start.pop(start)
        del self.by_end[end]
        if start + size < end:
            self.by_start[start + size] = end
            self.by_end[end] = start + size
        self.held += size
        return start

    def release(self, start: int, size: int):
        end = start + size
        if end in self.by_start:  # merge with the block after
            nxt = self.by_start.pop(end)
            del self.by_end[nxt]
            end = nxt
        if start in self.by_end:  # and the one before
            prev = self.by_end.pop(start)
            del self.by_start[prev]
            start = prev
        self.by_start[start] = end
        self.by_end[end] = start
        self.held -= size


class _Pool:
    """Huge-page regions, a best-fit coalescing free space in each, and a per-class cache of freed pieces."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.mapped = 0           # bytes of the regions (2 MiB-aligned spans)
        self.in_use = 0           # bytes of the pieces arrays hold
        self.cached = 0           # bytes of freed pieces in the per-class cache
        self.fallbacks = 0        # requests this pool could not serve (np.empty instead)
        self._regions: list[_Region] = []
        self._cache: dict[int, list[int]] = {}
        self._returned = collections.deque()  # (addr, size) from give(): appended lock-free, drained under the lock
        self._lock = threading.Lock()

    # -- the two hot paths --------------------------------------------------------------------

    def take(self, size: int):
        """The address of a free piece of ``size`` bytes (a ``size_class``), or None if the pool is full."""
        with self._lock:
            if self._returned:
                self._drain()
            lst = self._cache.get(size)
            if lst:
                addr = lst.pop()
                self.cached -= size
            else:
                addr = self._take_new(size)
                if addr is None:
                    self.fallbacks += 1
                    return None
            self.in_use += size
            return addr

    def give(self, size: int, addr: int):
        """Return a piece. Runs in ``__del__``: any thread, any moment; never blocks, touches nothing but the deque."""
        self._returned.append((addr, size))

    def empty(self, shape: tuple, dtype: np.dtype, nbytes: int) -> np.ndarray:
        size = size_class(nbytes)
        addr = self.take(size)
        if addr is None:
            return np.empty(shape, dtype)
        return np.asarray(_Piece(self, addr, size, shape, dtype))

    # -- under the lock -------------------------------------------------------------------------

    def _drain(self):
        returned, cache = self._returned, self._cache
        while returned:
            addr, size = returned.popleft()
            lst = cache.get(size)
            if lst is None:
                cache[size] = lst = []
            lst.append(addr)
            self.in_use -= size
            self.cached += size

    def _flush(self):
        """Every cached piece back into its region's free space."""
        for size, lst in self._cache.items():
            for addr in lst:
                self._region_of(addr).release(addr, size)
        self._cache.clear()
        self.cached = 0

    def _region_of(self, addr: int) -> _Region:
        for r in self._regions:
            if r.base <= addr < r.base + r.span:
                return r
        raise AssertionError(f"address {addr:#x} is in no region of the pool")

    def _cut(self, size: int):
        best, region = None, None
        for r in self._regions:
            fit = r.best_fit(size)
            if fit is not None and (best is None or fit < best):
                best, region = fit, r
        return None if region is None else region.cut(best[1], size)

    def _take_new(self, size: int):
        addr = self._cut(size)
        if addr is None and self.cached:
            self._flush()
            addr = self._cut(size)
        if addr is None:
            region = self._grow(size)
            if region is not None:
                addr = region.cut(region.base, size)
        return addr

    def _grow(self, size: int):
        """Replace the wholly free regions (none of which holds ``size``) by one new region that holds
        them all and ``size``, within the limit; None if even ``size`` alone does not fit under it."""
        idle = [r for r in self._regions if r.held == 0]  # the cache is empty here: _take_new flushed it
        spare = sum(r.span for r in idle)
        room = (self.limit - (self.mapped - spare)) // HUGE_PAGE * HUGE_PAGE
        need = -(-size // HUGE_PAGE) * HUGE_PAGE
        if need > room:
            return None
        for r in idle:
            self._unmap(r)
        span = min(max(CHUNK, need, spare), room)
        if self.mapped + span > self.limit:  # a region failed to unmap
            span = need
            if self.mapped + span > self.limit:
                return None
        return self._map(span)

    def _map(self, span: int):
        try:
            m = mmap.mmap(-1, span + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, ValueError):
            return None
        probe = ctypes.c_char.from_buffer(m)  # a buffer export, dropped at once: close() must stay possible
        addr = ctypes.addressof(probe)
        del probe
        start = addr + (-addr) % HUGE_PAGE
        try:
            m.madvise(mmap.MADV_HUGEPAGE, start - addr, span)
        except (OSError, AttributeError):  # THP not available: still a valid buffer, just 4 KiB pages
            pass
        region = _Region(m, start, span)
        self._regions.append(region)
        self.mapped += span
        return region

    def _unmap(self, region: _Region) -> int:
        try:
            region.map.close()
        except BufferError:  # someone holds a buffer export of the mapping: keep it
            return 0
        self._regions.remove(region)
        self.mapped -= region.span
        return region.span

    # -- maintenance ----------------------------------------------------------------------------

    def trim(self) -> int:
        """Unmap every region no array points into; the bytes released."""
        with self._lock:
            if self._returned:
                self._drain()
            self._flush()
            return sum(self._unmap(r) for r in [r for r in self._regions if r.held == 0])

    def stats(self) -> dict:
        with self._lock:
            if self._returned:
                self._drain()
            return {"mapped": self.mapped, "in_use": self.in_use, "cached": self.cached,
                    "regions": len(self._regions), "fallbacks": self.fallbacks, "limit": self.limit}


class _Piece:
    """Owner of one piece of a pool: the base of the array ``empty`` returns; gives the piece back when freed."""

    __slots__ = ("__array_interface__", "_pool", "_size", "_addr")

    def __init__(self, pool: _Pool, addr: int, size: int, shape: tuple, dtype: np.dtype):
        self._pool, self._addr, self._size = pool, addr, size
        self.__array_interface__ = {"data": (addr, False), "shape": shape, "typestr": dtype.str, "version": 3}

    def __del__(self):
        self._pool._returned.append((self._addr, self._size))  # = _Pool.give, without the call


_POOL = _Pool(int(os.environ.get("FANIN_HUGEPAGE_POOL_MB", "256")) << 20)
_ENABLED = _env_enabled()


def _new_pool_after_fork():
    """A forked child starts a pool of its own: another thread of the parent may have held the lock (or been
    half-way through an update) at the fork. Arrays the child inherited keep their pieces, which go back to
    the parent's pool object, never reused in the child."""
    global _POOL
    _POOL = _Pool(_POOL.limit)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_pool_after_fork)


def enabled() -> bool:
    """True if ``empty`` may hand out huge-page memory in this process."""
    return _ENABLED


def empty(shape, dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` (C order), backed by transparent huge pages where possible.

    For operands a kernel reads at random rows (packed panels). Small arrays, a full pool, or a
    system without ``MADV_HUGEPAGE`` get a plain ``np.empty``.
    """
    dtype = np.dtype(dtype)
    shape = tuple(map(int, shape)) if isinstance(shape, (tuple, list)) else (int(shape),)
    nbytes = dtype.itemsize * math.prod(shape)
    if not _ENABLED or nbytes < MIN_BYTES or dtype.kind in "OV":  # objects need initialising; records, a descr
        return np.empty(shape, dtype)
    return _POOL.empty(shape, dtype, nbytes)


def trim() -> int:
    """Unmap the pool's regions that no live array points into; returns the bytes released."""
    return _POOL.trim()


def stats() -> dict:
    """Bytes mapped for the pool, held by live arrays (``in_use``, whole size classes) and cached for
    reuse, the number of regions, requests that fell back to ``np.empty``, and the limit."""
    return {"enabled": _ENABLED, **_POOL.stats()}
