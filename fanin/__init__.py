"""fanin: sparse, low-bit neural networks on NumPy + Numba — condensed constant fan-in layers,
SRigL dynamic sparse training, and self-compression."""
from fanin import data, kernels, models, nn, ops, optim
from fanin.tensor import Tensor, no_grad

__version__ = "0.1.0"
__all__ = ["Tensor", "no_grad", "kernels", "ops", "nn", "optim", "data", "models", "__version__"]
