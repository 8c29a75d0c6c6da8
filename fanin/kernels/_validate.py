"""Argument checks shared by the kernel wrappers: one sentence per problem, saying what to do.

Checks look only at ``.shape``/``.dtype``/``.ndim`` (device-neutral) except the index scans,
which ask the backend for ``index_min_max`` / ``rows_strictly_increasing``.
"""
from __future__ import annotations

import importlib

import numpy as np

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
INDEX_DTYPES = (np.dtype(np.int16), np.dtype(np.int32))

_backends: dict = {}


def plain(*arrays):
    """The arrays with any fanin ``Tensor``/``Parameter`` replaced by its ``.data`` (no copy), and device arrays of
    other libraries (``__cuda_array_interface__``: CuPy, PyTorch) wrapped as Numba device arrays, also without a
    copy, when the CUDA backend can be loaded."""
    from fanin.tensor import Tensor

    out = tuple(a.data if isinstance(a, Tensor) else a for a in arrays)
    for a in out:
        if isinstance(a, np.ma.MaskedArray):
            raise TypeError("fanin.kernels: got a masked array, whose mask the kernels would ignore; fill the "
                            "masked entries first (a.filled(0)) or pass a.data.")
    if any(isinstance(a, np.ndarray) and not a.dtype.isnative for a in out):  # '>f4' from a file: native order
        out = tuple(a.astype(a.dtype.newbyteorder("=")) if isinstance(a, np.ndarray) and not a.dtype.isnative
                    else a for a in out)
    if any(_foreign(a) for a in out):
        try:
            be = backend("fanin.kernels", probe=out[[_foreign(a) for a in out].index(True)])
        except Exception:  # noqa: BLE001 - no usable backend: the device checks below say so, naming the arrays
            return out
        out = tuple(be.wrap(a) if _foreign(a) else a for a in out)
    return out


def _foreign(a) -> bool:
    return (a is not None and not isinstance(a, np.ndarray) and not getattr(a, "__cuda_ndarray__", False)
            and hasattr(a, "__cuda_array_interface__"))


def device_of(fname: str, name: str, a) -> str:
    """'cpu' for NumPy arrays, 'cuda' for CUDA device arrays; a TypeError for anything else."""
    if isinstance(a, np.ndarray):
        return "cpu"
    if hasattr(a, "__cuda_array_interface__") or getattr(a, "__cuda_ndarray__", False):  # (or a simulator array)
        return "cuda"
    raise TypeError(
        f"{fname}: {name} must be a NumPy array (or a fanin Tensor/Parameter), got {type(a).__name__}; "
        f"wrap it with np.asarray({name}, dtype=np.float32) (or the index dtype for indices)."
    )


def backend(fname: str, **arrays):
    """The kernel module for the arrays' device (all must share it); None entries are skipped."""
    devices = {name: device_of(fname, name, a) for name, a in arrays.items() if a is not None}
    kinds = set(devices.values())
    if len(kinds) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise TypeError(f"{fname}: all arrays must be on the same device, got {listing}; move them to one device first.")
    device = kinds.pop() if kinds else "cpu"
    if device not in _backends:
        try:
            _backends[device] = importlib.import_module(f"fanin.kernels.{device}")
        except ImportError as exc:
            from fanin.device import CUDAUnavailableError

            raise CUDAUnavailableError(
                f"{fname}: got device arrays, but the {device.upper()} backend cannot be imported ({exc}); install "
                "the extra (pip install 'fanin[cuda]'), or copy the arrays to the host to use the CPU kernels."
            ) from None
        if device == "cuda":
            from fanin import tensor

            tensor._CUDA = True
    return _backends[device]


def host(a):
    """A NumPy view or copy of an array from either device (for error messages and host-side checks)."""
    return a if isinstance(a, np.ndarray) else np.asarray(a.copy_to_host() if hasattr(a, "copy_to_host") else a)


def is_c_contiguous(a) -> bool:
    return a.flags.c_contiguous if isinstance(a, np.ndarray) else bool(a.is_c_contiguous())


def contiguous(a):
    """A C-contiguous version of a NumPy array (copies only when needed); device arrays as given."""
    return np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a


def float_array(fname: str, name: str, a, ndim: int, what: str):
    """Check a float32/float64 array of ``ndim`` dimensions (``what`` names them)."""
    if a.dtype not in FLOATS:
        raise TypeError(
            f"{fname}: {name} has dtype {a.dtype}, but the kernels take float32 (or float64); "
            f"convert it with {name}.astype(np.float32)."
        )
    if a.ndim != ndim:
        hint = f" (reshape a single sample with {name}[None, :])" if ndim == 2 and a.ndim == 1 else ""
        raise ValueError(f"{fname}: {name} must be {ndim}-D {what}, got shape {tuple(a.shape)}{hint}.")
    return contiguous(a)


def common_float(*arrays):
    """float64 if any array is float64, else float32."""
    return np.dtype(np.float64) if any(a is not None and a.dtype == np.float64 for a in arrays) else np.dtype(np.float32)


def cast(a, dtype):
    if a is None or a.dtype == dtype:
        return a
    if not isinstance(a, np.ndarray):  # a device array: cast on the device
        return _backends["cuda"].astype(a, dtype)
    return a.astype(dtype)


def index_array(fname: str, indices):
    """Check the (n_out, k) int16/int32 index array."""
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(
            f"{fname}: indices have dtype {indices.dtype}, but the kernels take int16 or int32; "
            "cast them with indices.astype(fanin.kernels.index_dtype(n_in))."
        )
    if indices.ndim != 2:
        raise ValueError(f"{fname}: indices must be 2-D (n_out, k), got shape {tuple(indices.shape)}.")
    return contiguous(indices)


def same_shape(fname: str, name: str, a, indices):
    if tuple(a.shape) != tuple(indices.shape):
        raise ValueError(
            f"{fname}: {name} of shape {tuple(a.shape)} must have the shape of indices {tuple(indices.shape)} "
            "(one value per index)."
        )


def per_neuron(fname: str, name: str, a, n_out: int):
    if a is not None and tuple(a.shape) != (n_out,):
        raise ValueError(
            f"{fname}: {name} must have shape ({n_out},), one entry per neuron (indices have {n_out} rows), "
            f"got {tuple(a.shape)}."
        )


def index_range(fname: str, be, indices, n_in: int, x_name: str, x_shape):
    """Every index must lie in [0, n_in): one vectorised min/max scan."""
    if indices.size == 0:
        return
    lo, hi = be.index_min_max(indices)
    if lo < 0 or hi >= n_in:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{fname}: indices of shape {tuple(indices.shape)} hold {bad}, outside [0, {n_in}) for "
            f"{x_name} of shape {tuple(x_shape)}; the layer's n_in and the input's width must agree."
        )


def transposed(fname: str, t, indices, n_in: int):
    """A ``transpose_structure(indices, n_in)`` result: (colptr (n_in+1,), rows (nnz,), slots (nnz,)).

    Checks shapes, dtypes and the total count (O(1)); the content is trusted: it must have been
    made from these very indices (a layer rebuilds it whenever its indices change).
    """
    if t is None:
        return
    on_host = isinstance(t, tuple) and len(t) == 3 and all(isinstance(a, np.ndarray) for a in t)
    on_dev = isinstance(t, tuple) and len(t) == 3 and all(hasattr(a, "__cuda_array_interface__")
                                                          or getattr(a, "__cuda_ndarray__", False) for a in t)
    ok = on_host or on_dev
    if ok:
        colptr, rows, slots = t
        nnz = indices.shape[0] * indices.shape[1]
        ok = (tuple(colptr.shape) == (n_in + 1,) and tuple(rows.shape) == (nnz,) and tuple(slots.shape) == (nnz,)
              and colptr.dtype == np.int64 and rows.dtype == np.int32 and slots.dtype in (np.int32, np.int64)
              and all(is_c_contiguous(a) for a in t) and (on_dev or int(colptr[-1]) == nnz))
    if not ok:
        raise ValueError(
            f"{fname}: transposed must be transpose_structure(indices, n_in) of these indices "
            f"{tuple(indices.shape)} and n_in={n_in}; rebuild it after the indices change (or pass None)."
        )


def transposed_content(fname: str, t, indices, n_in: int):
    """Debug check: ``t`` is exactly ``transpose_structure(indices, n_in)`` (O(nnz))."""
    from fanin.kernels import cpu

    want = cpu.transpose_structure(host(indices), n_in)
    if not all(np.array_equal(host(a), b) for a, b in zip(t, want)):
        raise ValueError(
            f"{fname}: transposed does not match indices {tuple(indices.shape)} (debug check); it was built from "
            "other indices. Rebuild it with transpose_structure(indices, n_in), or pass a Topology."
        )


def panels(fname: str, name: str, packed, a, a_name: str, be):
    """A ``pack_panels(a)`` result passed back in (``xp=``/``dyp=``): None, or an array of the packed
    shape and of a's dtype. Checked in O(1); the content is trusted to be ``pack_panels(a)``.
    A packed array whose dtype differs from the computation's (mixed float32/float64) is not used."""
    if packed is None:
        return None
    want = be.panels_shape(*a.shape)
    same_kind = isinstance(packed, np.ndarray) == isinstance(a, np.ndarray) and (
        isinstance(packed, np.ndarray) or hasattr(packed, "__cuda_array_interface__")
        or getattr(packed, "__cuda_ndarray__", False))
    if not same_kind or tuple(packed.shape) != tuple(want) or not is_c_contiguous(packed):
        got = tuple(packed.shape) if hasattr(packed, "shape") else type(packed).__name__
        raise ValueError(
            f"{fname}: {name} must be pack_panels({a_name}) for {a_name} of shape {tuple(a.shape)}, i.e. a "
            f"C-contiguous array of shape {tuple(want)}; got {got}. Pass None to let the kernel pack it."
        )
    return packed if packed.dtype == a.dtype else None


def packed(fname: str, name: str, xp, batch: int, be):
    """A transposed panel array (n, Bp) holding ``batch`` samples (``pack_panels`` or a panel kernel's output)."""
    if isinstance(batch, (bool, np.bool_)) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"{fname}: batch must be a positive integer, got {batch!r}.")
    xp = float_array(fname, name, xp, 2, "(n, padded batch)")
    want = be.panels_shape(int(batch), xp.shape[0])
    if tuple(xp.shape) != tuple(want) or not is_c_contiguous(xp):
        raise ValueError(
            f"{fname}: {name} of shape {tuple(xp.shape)} is not the panel layout of a batch of {batch}; it must be "
            f"a C-contiguous {tuple(want)} array, as pack_panels(x) of a ({batch}, {xp.shape[0]}) x returns."
        )
    return xp


def same_dtype(fname: str, **arrays):
    """The panel kernels do not convert: every float array must share one dtype."""
    dts = {n: a.dtype for n, a in arrays.items() if a is not None}
    if len(set(dts.values())) > 1:
        listing = ", ".join(f"{n} {d}" for n, d in dts.items())
        raise TypeError(f"{fname}: the arrays must share one float dtype, got {listing}; cast them with .astype().")
