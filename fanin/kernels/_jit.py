"""One Python body, two compilations: ``parallel=True`` and serial; and fanin's ``njit``.

A service may not launch parallel kernels at all times: a child forked after GNU OpenMP started dies at its
first parallel region, two threads under Numba's ``workqueue`` layer must not launch at once, and small work
loses more to waking threads than it gains (``fanin.runtime.engine``). Such callers need the same kernel
compiled without ``parallel=True``; writing it twice would let the two drift apart.
"""
from __future__ import annotations

import os
import threading
import types as _pytypes
import warnings

import numba


# ------------------------------------------------------------------ njit, with or without a disk cache
_CACHEABLE: dict = {}   # source file -> whether Numba can keep that file's compiled kernels on disk


def _cacheable(fn) -> bool:
    """Whether Numba finds a folder for ``fn``'s on-disk cache: next to the source (``__pycache__``), else the
    user's cache folder, else ``NUMBA_CACHE_DIR``. Decided once per source file, by Numba's own locators."""
    path = fn.__code__.co_filename
    ok = _CACHEABLE.get(path)
    if ok is None:
        try:
            from numba.core.caching import FunctionCache

            FunctionCache(fn)
            ok = True
        except (RuntimeError, OSError):  # "cannot cache function ...: no locator available for file ..."
            ok = False
            if not any(v is False for v in _CACHEABLE.values()):  # one warning a process
                warnings.warn(f"fanin: Numba cannot keep compiled kernels on disk ({os.path.dirname(path)} and the "
                              "user's cache folder are read-only): they compile in memory, in every new process. "
                              "Set NUMBA_CACHE_DIR to a writable folder to keep them.", RuntimeWarning, stacklevel=3)
        _CACHEABLE[path] = ok
    return ok


def njit(fn=None, **opts):
    """``numba.njit(**opts)``, except that ``cache=True`` falls back to an in-memory compilation (and one
    ``RuntimeWarning``) where Numba has nowhere to write its cache. Numba itself raises there, at the first use
    of a kernel: a read-only install run by a user without a writable home folder (a container's service user)
    could not run fanin at all. Setting ``NUMBA_CACHE_DIR`` for the host process would not be ours to do."""
    if fn is None:
        return lambda f: njit(f, **opts)
    if opts.get("cache") and not _cacheable(fn):
        opts = {**opts, "cache": False}
    return numba.njit(**opts)(fn)


# ------------------------------------------------------------------ the process-wide parallel policy
class Gate:
    """Whether this process may launch a parallel kernel now, and the lock the ``workqueue`` layer needs.

    Every parallel kernel fanin calls from Python goes through it (``gated``, ``pjit``; the runtime's engine
    directly): in a child forked after Numba started GNU OpenMP threads it says serial for good (a parallel region
    there kills the process), and under the ``workqueue`` layer, which aborts the process when two threads launch
    at once, one thread at a time runs in parallel while the others run serially. The lock is re-entrant, so a
    gated kernel called inside another gated call (the runtime's engine, then a kernel) does not serialize
    itself."""

    def __init__(self):
        self.lock = threading.RLock()
        self.layer = None       # Numba's threading layer, once a parallel kernel has run
        self.disabled = None    # why parallel kernels are off in this process (a forked child), or None

    def enter(self) -> int:
        """0: run serially; 1: run in parallel; 2: run in parallel holding the lock (release with ``leave``)."""
        if self.disabled is not None:
            return 0
        if self.layer in ("omp", "tbb"):
            return 1
        return 2 if self.lock.acquire(blocking=False) else 0

    def leave(self, token: int):
        if token and self.layer is None:
            try:
                self.layer = numba.threading_layer()
            except ValueError:  # no parallel kernel ran after all
                pass
        if token == 2:
            self.lock.release()

    def after_fork_in_child(self):
        self.lock = threading.RLock()  # a lock another parent thread held at the fork would never be released
        if self.disabled is not None:
            return
        try:
            from numba.np.ufunc import parallel as _np_parallel
            started = bool(_np_parallel._is_initialized)
        except Exception:  # noqa: BLE001 -- a Numba without the flag: we cannot tell, so assume started
            started = True
        if not started:
            return  # the child starts its own threads when it first needs them
        layer = self.layer
        if layer is None:
            try:
                layer = numba.threading_layer()
            except ValueError:
                layer = None
        if layer != "tbb":
            self.disabled = (f"forked after Numba started its {layer or 'unknown'} threads: serial kernels "
                             "(GNU OpenMP does not survive fork)")


GATE = Gate()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=GATE.after_fork_in_child)


def gated(par, ser, *args):
    """``par(*args)`` when ``GATE`` allows a parallel launch now, else ``ser(*args)`` (the same sums)."""
    token = GATE.enter()
    try:
        return (par if token else ser)(*args)
    finally:
        GATE.leave(token)


class Gated:
    """A parallel Numba kernel called from Python through ``GATE``, its serial twin compiled on first need (a
    forked child, a second thread under ``workqueue``). Attributes are the parallel dispatcher's. Only for
    kernels called from Python: a kernel called from another compiled function stays a plain dispatcher (and
    the caller's serial twin swaps in that kernel's serial copy, ``twins``' ``swap``)."""

    def __init__(self, par, make_serial):
        self.par = par
        self._make_serial, self._ser = make_serial, None
        self.__doc__ = getattr(par, "__doc__", None)
        self.__name__ = getattr(par, "__name__", "kernel")

    @property
    def serial(self):
        if self._ser is None:
            self._ser = self._make_serial()
        return self._ser

    def __call__(self, *args):
        return gated(self.par, self._serial_call, *args)

    def _serial_call(self, *args):  # the serial twin, compiled only when a call first needs it
        return self.serial(*args)

    def __getattr__(self, name):
        return getattr(self.par, name)


def gate(par, opts: dict, swap: dict | None = None) -> Gated:
    """The compiled kernel ``par`` (parallel, or serial with parallel kernels inside) gated; its serial twin is
    ``clone(par, "_gated_serial", swap)`` compiled with ``opts`` (no ``parallel``)."""
    return Gated(par, lambda: njit(**opts)(clone(par, "_gated_serial", swap)))


def pjit(**opts):
    """``@njit(parallel=True, **opts)`` for a kernel called from Python, gated (``Gated``)."""
    opts = {k: v for k, v in opts.items() if k != "parallel"}
    return lambda fn: gate(njit(parallel=True, **opts)(fn), opts)


def clone(fn, suffix: str, swap: dict | None = None):
    """A copy of the Python function ``fn`` (or of a Numba dispatcher's ``py_func``) named ``<name><suffix>``,
    its globals updated with ``swap`` (a module constant, or the compiled functions it calls), ready for
    ``njit``. The new name keeps its on-disk cache entry apart: Numba's cache index is named after the
    function, and its key holds neither the compile options nor the values of globals."""
    fn = getattr(fn, "py_func", fn)
    glob = fn.__globals__ if not swap else {**fn.__globals__, **swap}
    new = _pytypes.FunctionType(fn.__code__, glob, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    new.__qualname__ = fn.__qualname__ + suffix
    new.__doc__ = fn.__doc__
    new.__module__ = fn.__module__
    return new


def twins(fn, opts: dict, serial: bool = True, swap: dict | None = None):
    """``fn`` compiled with ``parallel=True`` and without: ``(parallel, serial)`` (or just the parallel one).

    The serial one is compiled from ``clone(fn, "_serial", swap)``: ``swap`` replaces globals in the serial
    copy, the compiled functions ``fn`` calls that have parallel regions of their own
    (``{"_pad": _pad_serial}``), so that the serial twin runs serially all the way down."""
    par = njit(parallel=True, **opts)(fn)
    if not serial:
        return par
    return par, njit(**opts)(clone(fn, "_serial", swap))
