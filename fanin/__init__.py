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

from fanin import data, kernels, models, nn, ops, optim, sparsity  # noqa: E402
from fanin.tensor import Tensor, no_grad  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Tensor", "no_grad", "kernels", "ops", "nn", "optim", "sparsity", "data", "models", "__version__"]
