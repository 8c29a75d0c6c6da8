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
huge-page chunks that live for the process and recycles a piece as soon as the NumPy array on it
(and every view of it) is gone. Training asks for the same few sizes every step, so the pool
stays small; it never grows past ``FANIN_HUGEPAGE_POOL_MB`` (default 256) and falls back to
``np.empty`` beyond that, and everywhere huge pages are unavailable (non-Linux; ``FANIN_HUGEPAGES=0``
turns the pool off).
"""
from __future__ import annotations

import mmap
import os
import threading

import numpy as np

__all__ = ["empty", "enabled", "stats"]

HUGE_PAGE = 2 << 20
CHUNK = 8 << 20       # mapped at a time (four huge pages)
ALIGN = 64            # every piece starts on a cache line
MIN_BYTES = 64 << 10  # smaller arrays span few pages: plain np.empty


def _env_enabled() -> bool:
    return os.environ.get("FANIN_HUGEPAGES", "1") != "0" and hasattr(mmap, "MADV_HUGEPAGE")


class _Pool:
    """Bump allocation in huge-page chunks plus one free list per piece size (no unmapping)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.mapped = 0
        self._maps = []          # the mmap objects and their byte views, kept for the process lifetime
        self._cur = self._end = 0
        self._tail = 0           # bytes left unused at the ends of earlier chunks
        self._free: dict[int, list[int]] = {}
        self._lock = threading.Lock()  # only for the bump pointer; give() must never block (it runs in __del__)

    def take(self, size: int):
        """The address of a free piece of ``size`` bytes (a multiple of ALIGN), or None if the pool is full."""
        lst = self._free.get(size)
        if lst:
            try:
                return lst.pop()
            except IndexError:  # another thread took the last one
                pass
        with self._lock:
            if self._cur + size > self._end and not self._grow(size):
                return None
            addr = self._cur
            self._cur += size
            return addr

    def _grow(self, size: int) -> bool:
        span = max(CHUNK, -(-size // HUGE_PAGE) * HUGE_PAGE)
        if self.mapped + span > self.limit:
            return False
        try:
            m = mmap.mmap(-1, span + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, ValueError):
            return False
        view = np.frombuffer(m, np.uint8)
        start = view.ctypes.data + (-view.ctypes.data) % HUGE_PAGE
        try:
            m.madvise(mmap.MADV_HUGEPAGE, start - view.ctypes.data, span)
        except OSError:  # THP not available: still a valid buffer, just 4 KiB pages
            pass
        self._maps.append((m, view))
        self.mapped += span
        self._tail += self._end - self._cur  # the rest of the previous chunk is left unused
        self._cur, self._end = start, start + span
        return True

    def give(self, size: int, addr: int):
        self._free.setdefault(size, []).append(addr)

    def in_use(self) -> int:
        free = sum(size * len(lst) for size, lst in self._free.items())
        return self.mapped - (self._end - self._cur) - self._tail - free


class _Piece:
    """Owner of one piece of the pool: the base of the array ``empty`` returns; gives the piece back when freed."""

    __slots__ = ("__array_interface__", "_size", "_addr")

    def __init__(self, addr: int, size: int, shape: tuple, dtype: np.dtype):
        self._addr, self._size = addr, size
        self.__array_interface__ = {"data": (addr, False), "shape": shape, "typestr": dtype.str, "version": 3}

    def __del__(self):
        _POOL.give(self._size, self._addr)


_POOL = _Pool(int(os.environ.get("FANIN_HUGEPAGE_POOL_MB", "256")) << 20)
_ENABLED = _env_enabled()


def enabled() -> bool:
    """True if ``empty`` may hand out huge-page memory in this process."""
    return _ENABLED


def empty(shape, dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` (C order), backed by transparent huge pages where possible.

    For operands a kernel reads at random rows (packed panels). Small arrays, a full pool, or a
    system without ``MADV_HUGEPAGE`` get a plain ``np.empty``.
    """
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in (shape if isinstance(shape, tuple) else (shape,)))
    nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if not _ENABLED or nbytes < MIN_BYTES:
        return np.empty(shape, dtype)
    size = -(-nbytes // ALIGN) * ALIGN
    addr = _POOL.take(size)
    if addr is None:
        return np.empty(shape, dtype)
    return np.asarray(_Piece(addr, size, shape, dtype))


def stats() -> dict:
    """Bytes mapped for the pool and bytes currently held by live arrays."""
    return {"enabled": _ENABLED, "mapped": _POOL.mapped, "in_use": _POOL.in_use(), "limit": _POOL.limit}
