"""Warp shuffles for Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), which has none (numba-cuda 0.30.4).

The simulator runs every thread of a block as a Python thread. ``install()`` gives its fake ``cuda`` module
``shfl_sync``, ``shfl_xor_sync``, ``shfl_down_sync`` and ``shfl_up_sync`` with the hardware's semantics for a full
mask: the 32 lanes of a warp meet at a barrier, each posts its value, each reads its source lane's value, and a
second barrier keeps the next shuffle from overwriting values not yet read. Out-of-range sources of ``down``/``up``
return the caller's own value, as on the device. A lane that never arrives (divergent shuffles, a bug the device
would also punish) breaks the barrier after ``TIMEOUT`` seconds instead of hanging the test run.

Used only by the CUDA backend under the simulator; never on a real device.
"""
from __future__ import annotations

import threading

TIMEOUT = 120.0
_LOCK = threading.Lock()
_WARPS: dict = {}


class _Warp:
    __slots__ = ("barrier", "vals")

    def __init__(self):
        self.barrier = threading.Barrier(32)
        self.vals = [None] * 32


def _exchange(value, pick):
    t = threading.current_thread()
    lane = t.thread_id % 32
    key = (id(t._manager), tuple(t.blockIdx), t.thread_id // 32)
    with _LOCK:
        w = _WARPS.get(key)
        if w is None:
            w = _WARPS[key] = _Warp()
    w.vals[lane] = value
    w.barrier.wait(TIMEOUT)
    src = pick(lane)
    out = w.vals[src] if 0 <= src < 32 else value
    w.barrier.wait(TIMEOUT)
    return out


def install() -> None:
    """Add the shuffles to the simulator's fake ``cuda`` module (idempotent)."""
    from numba.cuda.simulator import kernelapi

    mod = kernelapi.FakeCUDAModule
    if getattr(mod, "_fanin_shuffles", False):
        return
    mod.shfl_sync = lambda self, mask, value, src: _exchange(value, lambda lane: int(src) % 32)
    mod.shfl_xor_sync = lambda self, mask, value, m: _exchange(value, lambda lane: lane ^ int(m))
    mod.shfl_down_sync = lambda self, mask, value, d: _exchange(value, lambda lane: lane + int(d))
    mod.shfl_up_sync = lambda self, mask, value, d: _exchange(value, lambda lane: lane - int(d))
    mod.syncwarp = lambda self, mask=0xFFFFFFFF: _exchange(0, lambda lane: lane)
    mod._fanin_shuffles = True
