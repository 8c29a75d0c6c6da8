"""fanin: sparse, low-bit neural networks on NumPy + Numba — condensed constant fan-in layers,
SRigL dynamic sparse training, self-compression, and a lean inference runtime.

``import fanin`` is cheap and changes nothing in the process (no environment variables, allocator
options or thread settings): submodules load on first use. Training on a small machine is faster
with ``fanin.tuning.apply()`` (opt-in; ``fanin train`` applies it).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# every public module, loaded on first use (``fanin.serve`` and ``fanin.distributed`` import their extras only when a
# name that needs them is used, so reaching them costs nothing without the extras)
_SUBMODULES = ("checkpoint", "cli", "compress", "convert", "data", "device", "distributed", "io", "kernels", "models",
               "nn", "ops", "optim", "runtime", "serve", "sparsity", "tensor", "train", "tuning")
_NAMES = {"Tensor": "fanin.tensor", "no_grad": "fanin.tensor", "compile": "fanin.runtime", "Network": "fanin.runtime",
          "load": "fanin.io", "save": "fanin.io", "FormatError": "fanin.io", "debug": "fanin.kernels"}
__all__ = ["Tensor", "no_grad", "compile", "load", "save", "Network", "FormatError", "debug", *_SUBMODULES,
           "__version__"]


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"fanin.{name}")
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fanin' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
