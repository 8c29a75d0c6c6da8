"""A condensed layer's connectivity as an immutable, validated, versioned value.

``Topology(indices, n_in, active)`` checks the arrays once (dtype, shape, every index in
``[0, n_in)``, each row strictly increasing) and keeps read-only copies whose memory is an
immutable ``bytes`` object, so neither ``topology.indices[0, 0] = 1`` nor
``indices.setflags(write=True)`` can change them behind the kernels' back. Because nothing can
change, the kernels may run on a topology without scanning its indices again, and everything
derived from the indices (the transposed CSC structure the input gradient reads, the CSR row
pointers) is computed once, on first use, and cached on the value itself.

Each topology gets a process-wide unique ``version`` (a counter): caches outside it (the
runtime's compiled plans, a layer's per-version buffers) key on ``version``, never on an
array's identity. Changing connectivity means making a new ``Topology``
(``layer.set_connectivity``, SRigL's update, channel removal); nothing edits one in place.
"""
from __future__ import annotations

import itertools
import threading

import numpy as np

__all__ = ["Topology", "frozen"]

_VERSIONS = itertools.count(1)
_LOCK = threading.Lock()


def frozen(a: np.ndarray) -> np.ndarray:
    """A read-only copy of ``a`` backed by ``bytes``: it cannot be made writeable again."""
    a = np.ascontiguousarray(a)
    return np.frombuffer(a.tobytes(), dtype=a.dtype).reshape(a.shape)


def _next_version() -> int:
    with _LOCK:  # itertools.count is not guaranteed atomic without the GIL
        return next(_VERSIONS)


class Topology:
    """Validated, read-only connectivity of a condensed layer: ``indices`` (n_out, k), ``active`` (n_out,), ``n_in``.

    ``indices`` may be any integer array; it is stored in the layer's index dtype
    (``fanin.kernels.index_dtype(n_in)``). ``active`` defaults to every neuron active; rows of
    inactive neurons are placeholders (still validated, never read by a layer's value gradient).
    """

    __slots__ = ("indices", "active", "n_in", "version", "_transposed", "_row_ptr", "__weakref__")

    def __init__(self, indices, n_in: int, active=None):
        from fanin import kernels

        n_in = _positive_int("n_in", n_in)
        if n_in > np.iinfo(np.int32).max:
            raise ValueError(f"Topology: n_in={n_in} is wider than int32 indices can name (at most {2**31 - 1}).")
        idx = np.asarray(indices)
        if idx.dtype.kind not in "iu":
            raise TypeError(
                f"Topology: indices must be integers, got dtype {idx.dtype}; pass the input each weight reads "
                "as an integer array of shape (n_out, k)."
            )
        if idx.ndim != 2 or idx.shape[0] < 1:
            raise ValueError(f"Topology: indices must be 2-D (n_out, k) with n_out >= 1, got shape {idx.shape}.")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n_in):
            bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
            raise ValueError(
                f"Topology: indices hold {bad}, outside [0, {n_in}) for a layer with n_in={n_in}; "
                "every index must name one of the layer's inputs."
            )
        idx = idx.astype(kernels.index_dtype(n_in), copy=False)
        kernels.validate_indices(idx, n_in)
        n_out = idx.shape[0]
        if active is None:
            act = np.ones(n_out, bool)
        else:
            act = np.asarray(active)
            if act.shape != (n_out,):
                raise ValueError(
                    f"Topology: active must have shape ({n_out},), one flag per row of indices, got {act.shape}."
                )
            if act.dtype != np.bool_:
                if act.dtype.kind not in "biu" or not np.isin(act, (0, 1)).all():
                    raise TypeError(f"Topology: active must be booleans (one per neuron), got dtype {act.dtype}.")
                act = act.astype(bool)
        self.indices = frozen(idx)
        self.active = frozen(act)
        self.n_in = n_in
        self.version = _next_version()
        self._transposed = None
        self._row_ptr = None

    # ----------------------------------------------------------------- shape
    @property
    def n_out(self) -> int:
        return self.indices.shape[0]

    @property
    def k(self) -> int:
        """The constant fan-in."""
        return self.indices.shape[1]

    @property
    def n_active(self) -> int:
        return int(np.count_nonzero(self.active))

    @property
    def full(self) -> bool:
        """True when every row holds all ``n_in`` inputs (a dense layer stored condensed)."""
        return self.k == self.n_in

    # --------------------------------------------------------------- derived
    def transposed(self):
        """``(colptr, rows, slots)``: the CSC form (``fanin.kernels.transpose_structure``), read-only, built once."""
        t = self._transposed
        if t is None:
            from fanin.kernels import cpu

            t = tuple(frozen(a) for a in cpu.transpose_structure(self.indices, self.n_in))
            self._transposed = t  # a race builds it twice; both results are equal
        return t

    def row_ptr(self) -> np.ndarray:
        """CSR row pointers ``j * k`` (int64, n_out + 1), read-only."""
        p = self._row_ptr
        if p is None:
            p = frozen(np.arange(self.n_out + 1, dtype=np.int64) * self.k)
            self._row_ptr = p
        return p

    # ------------------------------------------------------------ comparison
    def same_as(self, other: "Topology") -> bool:
        """Equal connectivity (indices, active, n_in), whatever the versions."""
        return (isinstance(other, Topology) and self.n_in == other.n_in
                and np.array_equal(self.indices, other.indices) and np.array_equal(self.active, other.active))

    def __repr__(self):
        return (f"Topology(n_out={self.n_out}, n_in={self.n_in}, k={self.k}, active={self.n_active}, "
                f"version={self.version})")


def _positive_int(name, v) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"Topology: {name} must be a positive integer, got {v!r}.")
    return int(v)
