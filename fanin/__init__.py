"""fanin: sparse, low-bit neural networks on NumPy + Numba — condensed constant fan-in layers,
SRigL dynamic sparse training, and self-compression."""
import os

# Numba's OpenMP threads spin-wait after each parallel region by default; interleaved with
# OpenBLAS's threads on a small machine that spinning steals the cores BLAS needs (measured: a
# GEMM followed by a parallel update took 9 ms instead of 1.4 ms on 2 cores). Sleep instead,
# unless the user chose a policy. Must happen before Numba loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from fanin import data, kernels, models, nn, ops, optim, sparsity  # noqa: E402
from fanin.tensor import Tensor, no_grad  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Tensor", "no_grad", "kernels", "ops", "nn", "optim", "sparsity", "data", "models", "__version__"]
