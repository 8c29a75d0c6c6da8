"""Process-wide tuning that speeds up training on small machines. Opt-in: ``import fanin`` never applies it.

    import fanin.tuning; fanin.tuning.apply()   # first thing, before NumPy is imported
    import numpy as np, fanin

``fanin train`` applies it (it owns its process); a library user opts in the same way, or not at all.
What it does, each measured on the 2-core reference machine (bench/RESULTS.md, "Threading"):

- ``GOMP_SPINCOUNT=3000`` (unless ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is set): Numba's OpenMP
  workers spin ~300k iterations after each parallel region by default and, interleaved with
  OpenBLAS's threads, steal the cores BLAS needs (a GEMM followed by a parallel update took 9 ms
  instead of 1.4 ms); sleeping at once costs ~55 us to wake them per kernel. Read when the OpenMP
  runtime loads (the first parallel kernel), so it must be set before that.
- ``OPENBLAS_THREAD_TIMEOUT=16`` (unless set): OpenBLAS's idle threads busy-wait for 2**28 cycles
  after each GEMM and starve the Numba kernels that follow (an SRigL step with a BLAS classifier:
  11.9 ms instead of 6.3 ms). Read when NumPy loads OpenBLAS: call ``apply`` before importing NumPy.
- glibc ``mallopt``: no heap trimming, arrays up to 32 MiB from the heap. A training step frees and
  re-allocates the same activation arrays; with glibc's defaults each step paid the page faults again
  (an SRigL MLP step 6.0 -> 4.9 ms). The heap then stays at its high-water mark.
"""
from __future__ import annotations

import os
import sys

__all__ = ["apply"]


def apply(threads: bool = True, malloc: bool = True) -> dict:
    """Apply the tuning (see the module docstring); returns what was changed. Safe to call twice."""
    changed = {}
    if threads:
        if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
            os.environ["GOMP_SPINCOUNT"] = changed["GOMP_SPINCOUNT"] = "3000"
        if "OPENBLAS_THREAD_TIMEOUT" not in os.environ:
            os.environ["OPENBLAS_THREAD_TIMEOUT"] = changed["OPENBLAS_THREAD_TIMEOUT"] = "16"
        if "numpy" in sys.modules and "OPENBLAS_THREAD_TIMEOUT" in changed:
            changed["note"] = "NumPy was imported already: OPENBLAS_THREAD_TIMEOUT applies to processes started now"
    if malloc and _tune_malloc():
        changed["malloc"] = "no trimming, mmap threshold 32 MiB"
    return changed


def _tune_malloc() -> bool:
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt, Windows)
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 1 << 30)
    mallopt(m_top_pad, 64 << 20)
    return True
