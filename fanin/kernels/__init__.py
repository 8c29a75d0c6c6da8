"""Kernels for condensed constant fan-in layers (SPEC.md §1), with validating wrappers.

Each public function validates its arguments once (shapes, dtypes, index range), then hands
them to the backend for their device: NumPy arrays go to ``fanin.kernels.cpu``; CUDA device
arrays (``__cuda_array_interface__``: Numba, CuPy, PyTorch; taken without a copy) go to
``fanin.kernels.cuda``, imported only then (without numba-cuda or a GPU,
``fanin.device.CUDAUnavailableError`` says what to do). A ``Topology`` is device-neutral: the
CUDA backend keeps a device copy of it. Validation never touches the hot loops.

Conventions:
- floats are float32 (the fast path) or float64 (for gradient checks); when float32 and
  float64 arrays are mixed, the computation and the result are float64;
- ``indices`` are int16 or int32 (``index_dtype(n_in)`` picks the SPEC's choice);
- non-contiguous inputs are copied to C order first (they work, a little slower);
- ``indices`` may be a ``Topology`` (validated once, immutable): the kernels then skip the
  O(n_out*k) index scan (an O(1) check that its ``n_in`` fits x remains) and use its cached
  transposed structure. This is how layers call the kernels.
- with a plain index array, ``check=None`` follows the module flag ``CHECK_INDICES``;
  ``check=False`` skips the index-range scan. Unchecked out-of-range indices read or write out
  of bounds: skip the scan only for indices you validated, or turn on ``debug(True)`` (or set
  ``FANIN_DEBUG=1`` before importing fanin), which makes every kernel call check every index it
  will load (``check=False`` is then ignored) and verify the content of a ``transposed=``
  structure and of packed ``xp=``/``dyp=`` operands.
"""
from __future__ import annotations

import os

import numpy as np

from fanin.kernels import _validate as _v
from fanin.kernels.topology import Topology

__all__ = [
    "Topology", "debug", "CHECK_INDICES", "index_dtype", "validate_indices", "pack_panels", "fanin_forward", "fanin_backward",
    "fanin_backward_values", "fanin_backward_input", "transpose_structure", "growth_candidates", "dense_grad",
    "fixed_point_forward", "im2col", "col2im", "im2col_planes", "col2im_planes", "im2col_layout", "unpack_panels",
    "fanin_forward_panels", "fanin_backward_panels",
]

CHECK_INDICES = True
_DEBUG = os.environ.get("FANIN_DEBUG", "0") not in ("", "0")  # read once, at import


def debug(on: bool | None = None) -> bool:
    """Turn debug checks on or off (``None``: leave as is); returns the setting now in force.

    With debug on, every kernel call validates every index it will load before the kernel runs
    (``check=False`` is ignored; index arrays, ``Topology`` widths, the content of ``transposed=``
    structures and of packed ``xp=``/``dyp=`` operands), so a bad index is a ``ValueError`` naming
    the array instead of an out-of-bounds read or write. The kernels' own loads stay unchecked
    (they use a no-bounds-check intrinsic for vector gathers); every address they form comes from
    the arrays checked here. Costs O(n_out*k) per call: for finding bugs, not for production.
    Also settable with ``FANIN_DEBUG=1`` in the environment before ``import fanin``.
    """
    global _DEBUG
    if on is not None:
        _DEBUG = bool(on)
    return _DEBUG


def index_dtype(n_in: int):
    """np.int16 when every index of an n_in-input layer fits in int16, else np.int32."""
    return np.int16 if n_in <= np.iinfo(np.int16).max else np.int32


def _check(check) -> bool:
    if _DEBUG:
        return True
    return CHECK_INDICES if check is None else bool(check)


def _topology(indices):
    """(index array, Topology or None) of an ``indices`` argument."""
    if isinstance(indices, Topology):
        return indices.indices, indices
    return indices, None


def _on(indices, topo):
    """What decides the device of a call: plain index arrays do; a Topology is device-neutral (an immutable host
    value: the CUDA backend keeps its device copy)."""
    return None if topo is not None else indices


def _index_range(fname, be, indices, topo, check, n_in, x_name, x_shape):
    """The index check of a call: O(1) for a Topology (its n_in must be the input width), else a scan."""
    if topo is not None:
        if topo.n_in != n_in:
            raise ValueError(
                f"{fname}: the topology was built for n_in={topo.n_in} inputs but {x_name} of shape "
                f"{tuple(x_shape)} has {n_in}; the layer's n_in and the input's width must agree."
            )
        if not _DEBUG:
            return
    if _check(check):
        _v.index_range(fname, be, indices, n_in, x_name, x_shape)


def _transposed(fname, transposed, indices, topo, n_in):
    """The caller's transposed structure (checked; by content in debug mode), or the topology's."""
    if transposed is None and topo is not None:
        return topo.transposed()
    _v.transposed(fname, transposed, indices, n_in)
    if _DEBUG and transposed is not None:
        _v.transposed_content(fname, transposed, indices, n_in)
    return transposed


def _width(fname: str, n_in) -> int:
    """``n_in`` as an int >= 1; a float, string or bool is refused (``int()`` would truncate 100.7 or parse "5")."""
    if isinstance(n_in, (bool, np.bool_)) or not isinstance(n_in, (int, np.integer)) or n_in < 1:
        raise ValueError(f"{fname}: n_in must be a positive integer (the layer's input width), got {n_in!r}.")
    return int(n_in)


def validate_indices(indices, n_in: int) -> None:
    """Raise unless indices is (n_out, k) int16/int32 with each row strictly increasing in [0, n_in)."""
    fname = "validate_indices"
    indices, = _v.plain(indices)
    indices, topo = _topology(indices)
    if topo is not None:  # validated when it was made; only its width can disagree
        if topo.n_in != int(n_in):
            raise ValueError(f"{fname}: the topology has n_in={topo.n_in}, not {n_in}.")
        return
    be = _v.backend(fname, indices=indices)
    indices = _v.index_array(fname, indices)
    n_in = _width(fname, n_in)
    if indices.shape[1] > n_in:
        raise ValueError(f"{fname}: indices of shape {tuple(indices.shape)} hold more than n_in={n_in} inputs per row.")
    _v.index_range(fname, be, indices, int(n_in), "a layer", (n_in,))
    row = be.rows_strictly_increasing(indices)
    if row >= 0:
        r = _v.host(indices[row])
        dup = np.flatnonzero(np.diff(r.astype(np.int64)) <= 0)[0]
        problem = "repeats" if r[dup] == r[dup + 1] else "is out of order at"
        raise ValueError(
            f"{fname}: row {row} of indices {problem} input {int(r[dup + 1])} (position {dup + 1}); "
            "each row must hold distinct inputs in increasing order (use np.sort and drop duplicates)."
        )


def _layer(fname, x, indices, values, bias, check, values_kind="float"):
    """Validate (x, indices, values, bias) of a forward-like call; returns them converted."""
    indices, topo = _topology(indices)
    be = _v.backend(fname, x=x, indices=_on(indices, topo), values=values, bias=bias)
    x = _v.float_array(fname, "x", x, 2, "(batch, n_in)")
    indices = _v.index_array(fname, indices)
    _v.same_shape(fname, "values", values, indices)
    _v.per_neuron(fname, "bias", bias, indices.shape[0])
    if values_kind == "float":
        values = _v.float_array(fname, "values", values, 2, "(n_out, k)")
    if bias is not None:
        bias = _v.float_array(fname, "bias", bias, 1, "(n_out,)")
    _index_range(fname, be, indices, topo, check, x.shape[1], "x", x.shape)
    return be, x, indices, topo, _v.contiguous(values), bias


def pack_panels(x):
    """x (batch, n) in the batch-innermost panel layout the batched kernels read, or None when the
    batch is small enough that they read x directly.

    The forward and both backward kernels pack their (batch, n) operands themselves; a caller that
    uses the same x (or dy) in several calls packs it once and passes it as ``xp=`` / ``dyp=``
    (``fanin.ops.fanin_linear`` keeps the forward's packed input for the backward).
    """
    fname = "pack_panels"
    x, = _v.plain(x)
    be = _v.backend(fname, x=x)
    return be.pack_panels(_v.float_array(fname, "x", x, 2, "(batch, n)"))


def fanin_forward(x, indices, values, bias=None, *, check=None, xp=None):
    """y (B, n_out) with y[b, j] = bias[j] + sum_t values[j, t] * x[b, indices[j, t]].

    ``xp``: ``pack_panels(x)``, if the caller keeps it for several calls.
    """
    fname = "fanin_forward"
    x, indices, values, bias, xp = _v.plain(x, indices, values, bias, xp)
    be, x, indices, _, values, bias = _layer(fname, x, indices, values, bias, check)
    dt = _v.common_float(x, values, bias)
    x = _v.cast(x, dt)
    xp = _panels(fname, "xp", xp, x, "x", be)
    return be.fanin_forward(x, indices, _v.cast(values, dt), _v.cast(bias, dt), xp=xp)


def fixed_point_forward(x, indices, qvalues, scale, bias=None, *, check=None):
    """y[b, j] = bias[j] + scale[j] * sum_t qvalues[j, t] * x[b, indices[j, t]] with int8 qvalues."""
    fname = "fixed_point_forward"
    x, indices, qvalues, scale, bias = _v.plain(x, indices, qvalues, scale, bias)
    be, x, indices, _, qvalues, bias = _layer(fname, x, indices, qvalues, bias, check, values_kind="int8")
    if qvalues.dtype != np.int8:
        raise TypeError(
            f"{fname}: qvalues have dtype {qvalues.dtype}, but the fixed-point kernel takes int8; "
            "quantise to integers in [-128, 127] and cast with .astype(np.int8)."
        )
    _v.backend(fname, x=x, scale=scale)
    scale = _v.float_array(fname, "scale", scale, 1, "(n_out,)")
    _v.per_neuron(fname, "scale", scale, indices.shape[0])
    dt = _v.common_float(x, bias)
    return be.fixed_point_forward(_v.cast(x, dt), indices, qvalues, _v.cast(scale, dt), _v.cast(bias, dt))


def _dy(fname, dy, batch: int, n_out: int, x_shape=None):
    dy = _v.float_array(fname, "dy", dy, 2, "(batch, n_out)")
    if dy.shape[1] != n_out or (batch is not None and dy.shape[0] != batch):
        against = f"x of shape {tuple(x_shape)} and " if x_shape is not None else ""
        raise ValueError(
            f"{fname}: dy of shape {tuple(dy.shape)} does not match {against}indices with {n_out} rows; "
            f"it must be ({batch if batch is not None else 'batch'}, {n_out})."
        )
    return dy


def fanin_backward_values(x, indices, dy, *, check=None, xp=None, dyp=None):
    """dvalues (n_out, k): dvalues[j, t] = sum_b dy[b, j] * x[b, indices[j, t]].

    ``xp``, ``dyp``: ``pack_panels(x)``, ``pack_panels(dy)`` if the caller has them.
    """
    fname = "fanin_backward_values"
    x, indices, dy, xp, dyp = _v.plain(x, indices, dy, xp, dyp)
    indices, topo = _topology(indices)
    be = _v.backend(fname, x=x, indices=_on(indices, topo), dy=dy)
    x = _v.float_array(fname, "x", x, 2, "(batch, n_in)")
    indices = _v.index_array(fname, indices)
    dy = _dy(fname, dy, x.shape[0], indices.shape[0], x.shape)
    _index_range(fname, be, indices, topo, check, x.shape[1], "x", x.shape)
    dt = _v.common_float(x, dy)
    x, dy = _v.cast(x, dt), _v.cast(dy, dt)
    xp, dyp = _panels(fname, "xp", xp, x, "x", be), _panels(fname, "dyp", dyp, dy, "dy", be)
    return be.fanin_backward_values(x, indices, dy, xp=xp, dyp=dyp)


def transpose_structure(indices, n_in: int, *, check=None):
    """The CSC form of a layer's structure, for ``fanin_backward_input(..., transposed=...)``.

    Returns ``(colptr, rows, slots)``: for input i, the entries ``e`` in ``colptr[i]:colptr[i+1]``
    name the neurons ``rows[e]`` (increasing) that read input i and the flat positions
    ``slots[e] = j*k + t`` of their weights in ``values``. It depends on ``indices`` only (not on
    the values), so a layer computes it once per topology and reuses it every step.
    """
    fname = "transpose_structure"
    indices, = _v.plain(indices)
    indices, topo = _topology(indices)
    be = _v.backend(fname, indices=_on(indices, topo))
    indices = _v.index_array(fname, indices)
    n_in = _width(fname, n_in)
    _index_range(fname, be, indices, topo, check, n_in, "n_in", (n_in,))
    if topo is not None:
        return topo.transposed()
    return be.transpose_structure(indices, n_in)


def fanin_backward_input(indices, values, dy, n_in: int, *, check=None, transposed=None, dyp=None):
    """dx (B, n_in) = dy @ W, W the dense (n_out, n_in) matrix of (indices, values).

    ``transposed``: ``transpose_structure(indices, n_in)`` of these very indices, if the caller
    keeps it (it is rebuilt on every call otherwise, from batch 8 on); ``dyp``: ``pack_panels(dy)``.
    """
    fname = "fanin_backward_input"
    indices, values, dy, dyp = _v.plain(indices, values, dy, dyp)
    indices, topo = _topology(indices)
    be = _v.backend(fname, indices=_on(indices, topo), values=values, dy=dy)
    indices = _v.index_array(fname, indices)
    _v.same_shape(fname, "values", values, indices)
    values = _v.float_array(fname, "values", values, 2, "(n_out, k)")
    dy = _dy(fname, dy, None, indices.shape[0])
    n_in = _width(fname, n_in)
    _index_range(fname, be, indices, topo, check, n_in, "n_in", (n_in,))
    transposed = _transposed(fname, transposed, indices, topo, n_in)
    dt = _v.common_float(values, dy)
    dy = _v.cast(dy, dt)
    dyp = _panels(fname, "dyp", dyp, dy, "dy", be)
    return be.fanin_backward_input(indices, _v.cast(values, dt), dy, n_in, dyp=dyp, transposed=transposed)


def fanin_backward(x, indices, values, dy, *, check=None, transposed=None, xp=None, dyp=None):
    """(dx, dvalues) of fanin_forward: dx (B, n_in) = dy @ W, dvalues as fanin_backward_values.

    ``transposed`` as in ``fanin_backward_input``; ``xp``, ``dyp``: ``pack_panels`` of x and dy.
    """
    fname = "fanin_backward"
    x, indices, values, dy, xp, dyp = _v.plain(x, indices, values, dy, xp, dyp)
    be, x, indices, topo, values, _ = _layer(fname, x, indices, values, None, check)
    dy = _dy(fname, dy, x.shape[0], indices.shape[0], x.shape)
    transposed = _transposed(fname, transposed, indices, topo, x.shape[1])
    dt = _v.common_float(x, values, dy)
    x, dy = _v.cast(x, dt), _v.cast(dy, dt)
    xp, dyp = _panels(fname, "xp", xp, x, "x", be), _panels(fname, "dyp", dyp, dy, "dy", be)
    return be.fanin_backward(x, indices, _v.cast(values, dt), dy, transposed=transposed, xp=xp, dyp=dyp)


# ------------------------------------------------------------- panel layout end to end
# Training keeps a sparse layer's activations and their gradients in the packed layout (x^T, the
# batch zero-padded to whole panels): the forward writes the next layer's packed input and dx the
# previous layer's packed dy, so nothing is packed or unpacked between layers.
def unpack_panels(xp, batch: int):
    """The (batch, n) rows of a packed array (the inverse of ``pack_panels``)."""
    fname = "unpack_panels"
    xp, = _v.plain(xp)
    be = _v.backend(fname, xp=xp)
    return be.unpack_panels(_packed(fname, "xp", xp, batch, be), int(batch))


def fanin_forward_panels(xp, batch: int, indices, values, bias=None, *, check=None):
    """``fanin_forward`` from packed input to packed output: xp (n_in, Bp) -> (n_out, Bp), zero past ``batch``."""
    fname = "fanin_forward_panels"
    xp, indices, values, bias = _v.plain(xp, indices, values, bias)
    indices, topo = _topology(indices)
    be = _v.backend(fname, xp=xp, indices=_on(indices, topo), values=values, bias=bias)
    xp = _packed(fname, "xp", xp, batch, be)
    indices = _v.index_array(fname, indices)
    _v.same_shape(fname, "values", values, indices)
    _v.per_neuron(fname, "bias", bias, indices.shape[0])
    values = _v.contiguous(_v.float_array(fname, "values", values, 2, "(n_out, k)"))
    if bias is not None:
        bias = _v.float_array(fname, "bias", bias, 1, "(n_out,)")
    _index_range(fname, be, indices, topo, check, xp.shape[0], "xp", xp.shape)
    _v.same_dtype(fname, xp=xp, values=values, bias=bias)
    return be.forward_panels(xp, int(batch), indices, values, bias,
                             row_ptr=None if topo is None else topo.row_ptr())


def fanin_backward_panels(xp, indices, values, dyp, batch: int, *, need_dx=True, check=None, transposed=None):
    """(dx packed (n_in, Bp) or None, dvalues (n_out, k)) from packed x and dy (``fanin_backward``'s layout twin).

    ``transposed`` as in ``fanin_backward_input``; ``need_dx=False`` skips dx (a first layer).
    """
    fname = "fanin_backward_panels"
    xp, indices, values, dyp = _v.plain(xp, indices, values, dyp)
    indices, topo = _topology(indices)
    be = _v.backend(fname, xp=xp, indices=_on(indices, topo), values=values, dyp=dyp)
    xp, dyp = _packed(fname, "xp", xp, batch, be), _packed(fname, "dyp", dyp, batch, be)
    indices = _v.index_array(fname, indices)
    _v.same_shape(fname, "values", values, indices)
    values = _v.contiguous(_v.float_array(fname, "values", values, 2, "(n_out, k)"))
    if dyp.shape[0] != indices.shape[0]:
        raise ValueError(f"{fname}: dyp has {dyp.shape[0]} rows but indices has {indices.shape[0]} neurons; "
                         "they must agree.")
    n_in = xp.shape[0]
    _index_range(fname, be, indices, topo, check, n_in, "xp", xp.shape)
    transposed = _transposed(fname, transposed, indices, topo, n_in) if need_dx else None
    _v.same_dtype(fname, xp=xp, values=values, dyp=dyp)
    dx = be.backward_input_panels(indices, values, dyp, int(batch), n_in, transposed) if need_dx else None
    return dx, be.backward_values_panels(xp, indices, dyp)


def _panels(fname, name, packed, a, a_name, be):
    """A caller's ``pack_panels(a)`` (``xp=``/``dyp=``): shape-checked; in debug mode, content-checked."""
    packed = _v.panels(fname, name, packed, a, a_name, be)
    if _DEBUG and packed is not None:
        want = be.pack_panels(a)
        if want is not None and not np.array_equal(packed, want):
            raise ValueError(f"{fname}: {name} is not pack_panels({a_name}) of this {a_name} (debug check); "
                             "pass the packed array made from the same data, or None.")
    return packed


def _packed(fname, name, xp, batch, be):
    """A transposed panel array of ``batch`` samples; in debug mode its padding must be zero."""
    xp = _v.packed(fname, name, xp, batch, be)
    if _DEBUG and xp.shape[1] > int(batch) and np.any(xp[:, int(batch):]):
        raise ValueError(f"{fname}: the padding columns {int(batch)}: of {name} are not zero (debug check); "
                         "a panel array must come from pack_panels or a panel kernel.")
    return xp


def _batches(fname, name, a):
    """An array, or a list/tuple of arrays stacked along the batch axis."""
    if isinstance(a, (list, tuple)):
        if not a:
            raise ValueError(f"{fname}: {name} is an empty list; pass at least one batch.")
        for i, part in enumerate(a):
            _v.device_of(fname, f"{name}[{i}]", part)
            _v.float_array(fname, f"{name}[{i}]", part, 2, "(batch, features)")
        widths = {p.shape[1] for p in a}
        if len(widths) > 1:
            raise ValueError(f"{fname}: the batches in {name} have different widths {sorted(widths)}; they must agree.")
        devices = {_v.device_of(fname, f"{name}[{i}]", p) for i, p in enumerate(a)}
        if devices == {"cuda"}:  # stacked on the device
            return _v.backend(fname, **{name: a[0]}).concat_rows(list(a))
        if len(devices) > 1:
            raise TypeError(f"{fname}: the batches in {name} are on different devices; move them to one first.")
        return np.concatenate([np.asarray(p) for p in a], axis=0)
    return a


def dense_grad(x, dy):
    """G (n_out, n_in) = dy^T x (x and dy may be lists of batches: G = sum_i dy_i^T x_i)."""
    fname = "dense_grad"
    x, dy = _v.plain(x, dy)
    x, dy = _batches(fname, "x", x), _batches(fname, "dy", dy)
    be = _v.backend(fname, x=x, dy=dy)
    x = _v.float_array(fname, "x", x, 2, "(batch, n_in)")
    dy = _v.float_array(fname, "dy", dy, 2, "(batch, n_out)")
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"{fname}: x of shape {tuple(x.shape)} and dy of shape {tuple(dy.shape)} must have the same batch size.")
    dt = _v.common_float(x, dy)
    return be.dense_grad(_v.cast(x, dt), _v.cast(dy, dt))


def growth_candidates(x, dy, indices, c: int, block=None, *, sort=True, held=False, check=None):
    """Per neuron j, the c inputs not in indices[j] with the largest |G[j, i]|, G = dy^T x.

    Returns ``cand_idx`` (n_out, c) int32 and ``cand_score`` (n_out, c) = |G| (float32, or float64
    for float64 inputs), each row sorted by score descending; rows with fewer than c free
    inputs are padded with index -1 and score -inf. x (B, n_in) and dy (B, n_out) may each be a
    list of batches (gradient accumulation: G = sum_i dy_i^T x_i). G is computed ``block``
    neurons at a time (default: about 4 MiB of scores), never as a dense n_out x n_in array.
    Ties between equal scores go to the lower input index. ``sort=False`` returns each row's
    candidates in input order instead (the same set, cheaper; SRigL needs only the set).
    ``held=True`` also returns ``held_score`` (n_out, k) = |G[j, indices[j, t]]|, the gradient
    magnitudes of the existing connections, read from the same blocks.
    """
    fname = "growth_candidates"
    x, dy, indices = _v.plain(x, dy, indices)
    x, dy = _batches(fname, "x", x), _batches(fname, "dy", dy)
    indices, topo = _topology(indices)
    be = _v.backend(fname, x=x, dy=dy, indices=_on(indices, topo))
    x = _v.float_array(fname, "x", x, 2, "(batch, n_in)")
    indices = _v.index_array(fname, indices)
    dy = _dy(fname, dy, x.shape[0], indices.shape[0], x.shape)
    if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)) or c < 0:
        raise ValueError(f"{fname}: c must be a non-negative integer number of candidates per neuron, got {c!r}.")
    if block is not None and (not isinstance(block, (int, np.integer)) or block < 1):
        raise ValueError(f"{fname}: block must be a positive number of neurons per block (or None), got {block!r}.")
    _index_range(fname, be, indices, topo, check, x.shape[1], "x", x.shape)
    dt = _v.common_float(x, dy)
    return be.growth_candidates(_v.cast(x, dt), _v.cast(dy, dt), indices, int(c), None if block is None else int(block),
                                bool(sort), bool(held))


def _pair(fname, name, v):
    t = (v, v) if isinstance(v, (int, np.integer)) else tuple(v)
    if len(t) != 2 or not all(isinstance(a, (int, np.integer)) for a in t):
        raise ValueError(f"{fname}: {name} must be an int or a pair of ints, got {v!r}.")
    return int(t[0]), int(t[1])


def _conv_geometry(fname, shape, kh, kw, stride, padding):
    (sh, sw), (ph, pw) = _pair(fname, "stride", stride), _pair(fname, "padding", padding)
    kh, kw = int(kh), int(kw)
    if kh < 1 or kw < 1 or sh < 1 or sw < 1 or ph < 0 or pw < 0:
        raise ValueError(
            f"{fname}: kernel ({kh}, {kw}) and stride ({sh}, {sw}) must be positive and padding ({ph}, {pw}) "
            "non-negative."
        )
    ho = (shape[2] + 2 * ph - kh) // sh + 1
    wo = (shape[3] + 2 * pw - kw) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(
            f"{fname}: a {kh}x{kw} window does not fit an input of shape {tuple(shape)} with padding ({ph}, {pw}); "
            "use a smaller kernel or more padding."
        )
    return kh, kw, (sh, sw), (ph, pw), ho, wo


def _patches_input(fname, x, kh, kw, stride, padding):
    """(backend, x checked, kh, kw, stride, padding, ho, wo) for im2col / im2col_planes."""
    x, = _v.plain(x)
    be = _v.backend(fname, x=x)
    x = _v.float_array(fname, "x", x, 4, "(batch, channels, height, width)")
    return (be, x) + _conv_geometry(fname, x.shape, kh, kw, stride, padding)


def _patches_gradient(fname, dcols, x_shape, kh, kw, stride, padding, planes):
    """(backend, dcols checked, x_shape, kh, kw, stride, padding, ho, wo) for col2im (planes False: dcols as rows
    (B*Ho*Wo, C*kh*kw)) and col2im_planes (planes True: (B, C*kh*kw, Ho*Wo))."""
    dcols, = _v.plain(dcols)
    be = _v.backend(fname, dcols=dcols)
    dcols = _v.float_array(fname, "dcols", dcols, 3 if planes else 2,
                           "(B, C*kh*kw, Ho*Wo)" if planes else "(B*Ho*Wo, C*kh*kw)")
    x_shape = tuple(int(s) for s in x_shape)
    if len(x_shape) != 4 or min(x_shape[1:]) < 1 or x_shape[0] < 0:
        raise ValueError(f"{fname}: x_shape must be (batch, channels, height, width) with positive sizes (the batch "
                         f"may be 0), got {x_shape}.")
    kh, kw, stride, padding, ho, wo = _conv_geometry(fname, x_shape, kh, kw, stride, padding)
    k = x_shape[1] * kh * kw
    want = (x_shape[0], k, ho * wo) if planes else (x_shape[0] * ho * wo, k)
    if tuple(dcols.shape) != want:
        source = "im2col_planes" if planes else "im2col"
        raise ValueError(
            f"{fname}: dcols of shape {tuple(dcols.shape)} does not match {source} of an input of shape {x_shape} "
            f"with a {kh}x{kw} kernel, which has shape {want}."
        )
    return be, dcols, x_shape, kh, kw, stride, padding, ho, wo


def _host_only(fname, be):
    if not hasattr(be, fname):
        raise NotImplementedError(f"{fname}: runs on host (NumPy) arrays only; on a device use im2col / col2im.")
    return getattr(be, fname)


def im2col(x, kh, kw, stride=1, padding=0):
    """Patches of x (B, C, H, W) as rows: (B*Ho*Wo, C*kh*kw), columns ordered (c, dy, dx)."""
    be, *args = _patches_input("im2col", x, kh, kw, stride, padding)
    return be.im2col(*args)


def im2col_layout(c, kh, kw) -> str:
    """'planes' (``im2col_planes`` and a product per image) or 'rows' (``im2col`` and one product): how a dense
    convolution of c input channels with a kh x kw kernel runs faster on the host, by the patch size."""
    from fanin.kernels import cpu

    return cpu.im2col_layout(int(c), int(kh), int(kw))


def im2col_planes(x, kh, kw, stride=1, padding=0):
    """Patches of x (B, C, H, W) as planes: (B, C*kh*kw, Ho*Wo), rows ordered (c, dy, dx). ``w.reshape(O, -1) @
    cols[b]`` is image b's convolution in (O, Ho*Wo) order: batched products give NCHW outputs directly."""
    be, *args = _patches_input("im2col_planes", x, kh, kw, stride, padding)
    return _host_only("im2col_planes", be)(*args)


def col2im_planes(dcols, x_shape, kh, kw, stride=1, padding=0):
    """Adjoint of im2col_planes: dx of shape x_shape, summing overlapping patches."""
    be, *args = _patches_gradient("col2im_planes", dcols, x_shape, kh, kw, stride, padding, planes=True)
    return _host_only("col2im_planes", be)(*args)


def col2im(dcols, x_shape, kh, kw, stride=1, padding=0):
    """Adjoint of im2col: dx of shape x_shape, summing overlapping patches."""
    be, *args = _patches_gradient("col2im", dcols, x_shape, kh, kw, stride, padding, planes=False)
    return be.col2im(*args)
