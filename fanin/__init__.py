"""fanin: sparse, low-bit neural networks on NumPy + Numba — condensed constant fan-in layers,
SRigL dynamic sparse training, and self-compression."""
import os

# Numba's OpenMP threads spin-wait ~300k iterations after each parallel region by default;
# interleaved with OpenBLAS's threads on a small machine that spinning steals the cores BLAS
# needs (measured on 2 cores: a GEMM followed by a parallel update took 9 ms instead of 1.4 ms),
# while sleeping at once (OMP_WAIT_POLICY=PASSIVE) costs ~55 us to wake the threads for every
# kernel. A short spin keeps both fast (bench/RESULTS.md, "Threading"). Must be set before Numba
# loads its OpenMP runtime; a user's own setting wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "3000"
# The converse: OpenBLAS's idle threads busy-wait (with sched_yield) for 2**28 cycles by default after
# each GEMM, and starve the Numba kernels that follow (measured: an SRigL step whose classifier runs on
# BLAS took 11.9 ms instead of 6.3 ms). 2**16 cycles (~20 us) keeps back-to-back GEMMs fast. Read
# when NumPy loads OpenBLAS, so it only applies if fanin is imported before NumPy.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "16")


def _tune_malloc():
    """Keep freed memory in the heap instead of returning it to the OS at once (glibc only).

    A training step allocates and frees the same few hundred-KiB activation arrays every step;
    with glibc's defaults the heap top is trimmed and regrown each time, so every step pays page
    faults (measured: an SRigL MLP step 6.0 -> 4.9 ms, bench/RESULTS.md). The heap then stays at
    its high-water mark. Set FANIN_MALLOC_TUNING=0 to leave malloc alone.
    """
    if os.environ.get("FANIN_MALLOC_TUNING", "1") == "0":
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt, Windows)
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt(m_mmap_threshold, 32 << 20)  # arrays up to 32 MiB come from the heap
    mallopt(m_trim_threshold, 1 << 30)
    mallopt(m_top_pad, 64 << 20)


_tune_malloc()

from fanin import compress, data, kernels, models, nn, ops, optim, sparsity  # noqa: E402
from fanin.io import load, save  # noqa: E402
from fanin.runtime import Network, compile  # noqa: E402
from fanin.tensor import Tensor, no_grad  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Tensor", "no_grad", "kernels", "ops", "nn", "optim", "sparsity", "compress", "data", "models",
           "compile", "load", "save", "Network", "__version__"]
