"""One Python body, two compilations: ``parallel=True`` and serial.

A service may not launch parallel kernels at all times: a child forked after GNU OpenMP started dies at its
first parallel region, two threads under Numba's ``workqueue`` layer must not launch at once, and small work
loses more to waking threads than it gains (``fanin.runtime.engine``). Such callers need the same kernel
compiled without ``parallel=True``; writing it twice would let the two drift apart.
"""
from __future__ import annotations

import types as _pytypes

from numba import njit


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
