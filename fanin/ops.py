"""Differentiable ops: each one a forward and, beside it, its backward.

Every op takes Tensors (or array-likes, treated as constants) and returns a Tensor made with
``Tensor._make(out, parents, backward)``; ``backward(g)`` returns one gradient per parent
(``None`` where a parent needs none). Nothing else lives here.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import special

from fanin import tensor as _tm
from fanin.tensor import Tensor, as_array

__all__ = [
    "add", "sub", "mul", "div", "pow", "neg", "abs", "matmul", "linear", "sum", "mean", "reshape",
    "transpose", "getitem", "concat", "flatten", "relu", "gelu", "exp", "log", "log_softmax",
    "cross_entropy", "dropout", "conv2d", "max_pool2d", "avg_pool2d", "batch_norm", "fanin_linear", "fanin_conv2d",
    "quantize",
]


def _t(x, like=None) -> Tensor:
    """``x`` as a Tensor; constants take the dtype of ``like`` when given."""
    if _tm._CUDA and _tm.on_cuda(x):  # ops with a device twin dispatch before they get here
        _cuda_unsupported()
    if isinstance(x, Tensor):
        return x
    return Tensor(as_array(x, None if like is None else like.data.dtype))


def _cuda():
    from fanin import device

    return device


def _cuda_unsupported():
    import sys

    _cuda().unsupported(f"ops.{sys._getframe(2).f_code.co_name}")


def _binary_operands(a, b):
    if isinstance(a, Tensor):
        return a, _t(b, a)
    b = _t(b)
    return _t(a, b), b


def _unbroadcast(g: np.ndarray, shape) -> np.ndarray:
    """Sum ``g`` down to ``shape`` (the reverse of NumPy broadcasting)."""
    if g.shape == shape:
        return g
    extra = g.ndim - len(shape)
    if extra > 0:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


def _check_broadcast(op, a, b):
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(
            f"{op}: shapes {a.shape} and {b.shape} cannot be broadcast together; "
            "make trailing dimensions equal or 1."
        ) from None


# ------------------------------------------------------------------ arithmetic
def add(a, b) -> Tensor:
    if _tm._CUDA and _tm.on_cuda(a, b):
        return _cuda().add(a, b)
    a, b = _binary_operands(a, b)
    _check_broadcast("add", a, b)

    def backward(g):
        return _unbroadcast(g, a.shape), _unbroadcast(g, b.shape)

    return Tensor._make(a.data + b.data, (a, b), backward)


def sub(a, b) -> Tensor:
    if _tm._CUDA and _tm.on_cuda(a, b):
        return _cuda().sub(a, b)
    a, b = _binary_operands(a, b)
    _check_broadcast("sub", a, b)

    def backward(g):
        return _unbroadcast(g, a.shape), _unbroadcast(-g, b.shape)

    return Tensor._make(a.data - b.data, (a, b), backward)


def mul(a, b) -> Tensor:
    if _tm._CUDA and _tm.on_cuda(a, b):
        return _cuda().mul(a, b)
    a, b = _binary_operands(a, b)
    _check_broadcast("mul", a, b)

    def backward(g):
        ga = _unbroadcast(g * b.data, a.shape) if a.requires_grad else None
        gb = _unbroadcast(g * a.data, b.shape) if b.requires_grad else None
        return ga, gb

    return Tensor._make(a.data * b.data, (a, b), backward)


def div(a, b) -> Tensor:
    a, b = _binary_operands(a, b)
    _check_broadcast("div", a, b)

    def backward(g):
        ga = _unbroadcast(g / b.data, a.shape) if a.requires_grad else None
        # -g a / b^2 as (g (a / b)) / b: b * b underflows to 0 for |b| < ~1e-19 in float32 (and overflows past 1.8e19)
        gb = _unbroadcast(-(g * (a.data / b.data)) / b.data, b.shape) if b.requires_grad else None
        return ga, gb

    return Tensor._make(a.data / b.data, (a, b), backward)


def pow(a, exponent) -> Tensor:
    """``a ** exponent`` for a constant (Python number) exponent."""
    a = _t(a)
    if isinstance(exponent, Tensor):
        raise TypeError("pow: the exponent must be a Python number, not a Tensor.")
    p = float(exponent)

    def backward(g):
        if p == 0:  # d/da a^0 = 0 everywhere (0 * 0^-1 would be NaN at a = 0)
            return (np.zeros_like(g * a.data),)
        return (g * (p * a.data ** (p - 1)),)

    return Tensor._make(a.data ** p, (a,), backward)


def neg(a) -> Tensor:
    if _tm._CUDA and _tm.on_cuda(a):
        return _cuda().neg(a)
    a = _t(a)
    return Tensor._make(-a.data, (a,), lambda g: (-g,))


def abs(a) -> Tensor:  # noqa: A001 (mirrors NumPy)
    """|a|, with gradient sign(a) (0 at 0)."""
    a = _t(a)
    return Tensor._make(np.abs(a.data), (a,), lambda g: (g * np.sign(a.data),))


def exp(a) -> Tensor:
    a = _t(a)
    out = np.exp(a.data)
    return Tensor._make(out, (a,), lambda g: (g * out,))


def log(a) -> Tensor:
    a = _t(a)
    return Tensor._make(np.log(a.data), (a,), lambda g: (g / a.data,))


# --------------------------------------------------------------------- matmul
def matmul(a, b) -> Tensor:
    """``a @ b`` for 1-D/2-D operands and batched (N-D @ 2-D) left operands."""
    a, b = _binary_operands(a, b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError("matmul: operands must have at least one dimension; use mul for scalars.")
    if a.shape[-1] != b.shape[0 if b.ndim == 1 else -2]:
        raise ValueError(
            f"matmul: shapes {a.shape} and {b.shape} do not match (inner dimensions "
            f"{a.shape[-1]} != {b.shape[0 if b.ndim == 1 else -2]})."
        )
    if b.ndim > 2:
        raise ValueError(f"matmul: the right operand must be 1-D or 2-D, got shape {b.shape}.")

    def backward(g):
        A, B = a.data, b.data
        g2 = g.reshape(-1, 1) if b.ndim == 1 else g.reshape(-1, B.shape[-1])
        A2 = A.reshape(1, -1) if A.ndim == 1 else A.reshape(-1, A.shape[-1])
        B2 = B.reshape(-1, 1) if B.ndim == 1 else B
        ga = (g2 @ B2.T).reshape(A.shape) if a.requires_grad else None
        gb = (A2.T @ g2).reshape(B.shape) if b.requires_grad else None
        return ga, gb

    return Tensor._make(a.data @ b.data, (a, b), backward)


def linear(x, weight, bias=None) -> Tensor:
    """``x @ weight.T + bias``: the fused affine map of a dense layer (weight is (out, in))."""
    if _tm._CUDA and _tm.on_cuda(x, weight, bias):
        return _cuda().linear(x, weight, bias)
    x = _t(x)
    if x.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear: input of shape {x.shape} does not fit weight of shape {weight.shape}; "
            f"the input must be (batch, {weight.shape[1]})."
        )
    out = x.data @ weight.data.T
    if bias is not None:
        out += bias.data
    parents = (x, weight) if bias is None else (x, weight, bias)

    def backward(g):
        gx = g @ weight.data if x.requires_grad else None
        gw = None
        if weight.requires_grad:  # batch 1: an outer product (BLAS's k=1 GEMM path is slow)
            gw = g.T * x.data if g.shape[0] == 1 else g.T @ x.data
        if bias is None:
            return gx, gw
        return gx, gw, g.sum(axis=0)

    return Tensor._make(out, parents, backward)


# ------------------------------------------------------------------ reductions
def _norm_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(ax % ndim for ax in axes)


def sum(a, axis=None, keepdims=False) -> Tensor:  # noqa: A001 (mirrors NumPy)
    if _tm._CUDA and _tm.on_cuda(a):
        return _cuda().sum(a, axis, keepdims)
    a = _t(a)
    axes = _norm_axes(axis, a.ndim)
    out = np.sum(a.data, axis=axes, keepdims=keepdims)

    def backward(g):
        if not keepdims:
            g = np.expand_dims(g, axes)
        return (np.broadcast_to(g, a.shape),)

    return Tensor._make(np.asarray(out), (a,), backward)


def mean(a, axis=None, keepdims=False) -> Tensor:
    if _tm._CUDA and _tm.on_cuda(a):
        return _cuda().mean(a, axis, keepdims)
    a = _t(a)
    axes = _norm_axes(axis, a.ndim)
    count = math.prod(a.shape[ax] for ax in axes)
    out = np.mean(a.data, axis=axes, keepdims=keepdims)

    def backward(g):
        if not keepdims:
            g = np.expand_dims(g, axes)
        return (np.broadcast_to(g / count, a.shape),)

    return Tensor._make(np.asarray(out, dtype=a.dtype), (a,), backward)


# ----------------------------------------------------------------- reshaping
def reshape(a, shape) -> Tensor:
    if _tm._CUDA and _tm.on_cuda(a):
        return _cuda().reshape(a, shape)
    a = _t(a)
    try:
        out = a.data.reshape(shape)
    except ValueError:
        raise ValueError(
            f"reshape: cannot reshape a tensor of shape {a.shape} ({a.size} elements) to {tuple(shape)}."
        ) from None
    return Tensor._make(out, (a,), lambda g: (g.reshape(a.shape),))


def flatten(a, start_dim=1) -> Tensor:
    """Merge every dimension from ``start_dim`` on into one."""
    if _tm._CUDA and _tm.on_cuda(a):
        return _cuda().reshape(a, tuple(a.shape[:start_dim]) + (-1,))
    a = _t(a)
    return reshape(a, a.shape[:start_dim] + (-1,))


def transpose(a, axes=None) -> Tensor:
    a = _t(a)
    if axes is not None:  # negative axes counted from the end, so that the inverse permutation is right
        axes = tuple(int(ax) + a.ndim if int(ax) < 0 else int(ax) for ax in axes)
    out = np.transpose(a.data, axes)
    inverse = None if axes is None else tuple(np.argsort(axes))
    return Tensor._make(out, (a,), lambda g: (np.transpose(g, inverse),))


def _is_advanced(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, (list, np.ndarray, Tensor)) for i in items)


def _index(i):
    """An index part as NumPy takes it. A Tensor is refused: it holds floats, so a boolean mask made into a Tensor
    reads as the integers 0 and 1, and would pick the wrong rows without a word."""
    if isinstance(i, Tensor):
        raise TypeError("getitem: index with a NumPy integer or boolean array (or slices), not a Tensor: a Tensor "
                        "holds floats, and a mask in one would read as the indices 0 and 1.")
    return i


def getitem(a, index) -> Tensor:
    """``a[index]`` for slices, integers and integer/boolean arrays."""
    a = _t(a)
    index = tuple(_index(i) for i in index) if isinstance(index, tuple) else _index(index)
    out = a.data[index]
    advanced = _is_advanced(index)

    def backward(g):
        ga = np.zeros_like(a.data)
        if advanced:
            np.add.at(ga, index, g)
        else:
            ga[index] = g
        return (ga,)

    return Tensor._make(np.array(out, copy=advanced) if advanced else out, (a,), backward)


def concat(tensors, axis=0) -> Tensor:
    tensors = [_t(t) for t in tensors]
    try:
        out = np.concatenate([t.data for t in tensors], axis=axis)
    except ValueError:
        shapes = [t.shape for t in tensors]
        raise ValueError(
            f"concat: shapes {shapes} differ outside axis {axis}; all other dimensions must match."
        ) from None
    bounds = np.cumsum([t.shape[axis] for t in tensors])[:-1]
    return Tensor._make(out, tuple(tensors), lambda g: tuple(np.split(g, bounds, axis=axis)))


# ---------------------------------------------------------------- activations
def relu(a) -> Tensor:
    from fanin import kernels
    from fanin.kernels import activation, memory
    from fanin.tensor import Panels, make_panels, panels_of

    if _tm._CUDA and _tm.on_cuda(a):
        return _cuda().relu(a)
    a = _t(a)
    ap = panels_of(a)
    if ap is not None:  # a packed activation stays packed (ReLU(0) = 0 keeps the padding zero)
        outp = activation.relu(ap, memory.empty(ap.shape, ap.dtype))  # read at random rows next: huge pages

        batch = a.shape[0]

        def backward(g):  # (refers to outp, never to the output Tensor: no reference cycle holding the buffers)
            if isinstance(g, Panels):
                return (Panels(activation.relu_grad(g.array, outp, memory.empty(outp.shape, outp.dtype)), batch),)
            return (activation.relu_grad(g, kernels.unpack_panels(outp, batch)),)

        backward.takes_panels = True
        return make_panels(outp, batch, (a,), backward)
    out = activation.relu(a.data)
    return Tensor._make(out, (a,), lambda g: (activation.relu_grad(g, out),))


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu(a) -> Tensor:
    """Exact GELU: ``x * Phi(x)`` with the normal CDF."""
    a = _t(a)
    x = a.data
    cdf = 0.5 * (1.0 + special.erf(x * _SQRT_HALF))
    cdf = cdf.astype(x.dtype, copy=False)

    def backward(g):
        pdf = np.exp(-0.5 * x * x) * _INV_SQRT_2PI
        return (g * (cdf + x * pdf.astype(x.dtype, copy=False)),)

    return Tensor._make(x * cdf, (a,), backward)


def log_softmax(a, axis=-1) -> Tensor:
    a = _t(a)
    shifted = a.data - a.data.max(axis=axis, keepdims=True)
    out = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))

    def backward(g):
        return (g - np.exp(out) * g.sum(axis=axis, keepdims=True),)

    return Tensor._make(out, (a,), backward)


def cross_entropy(logits, labels) -> Tensor:
    """Mean cross-entropy of ``logits`` (N, C) against integer ``labels`` (N,)."""
    if _tm._CUDA and _tm.on_cuda(logits):
        return _cuda().cross_entropy(logits, labels)
    logits = _t(logits)
    labels = np.asarray(labels.data if isinstance(labels, Tensor) else labels)
    if isinstance(labels, np.ndarray) and labels.dtype.kind == "f" and np.array_equal(labels, np.round(labels)):
        labels = labels.astype(np.int64)  # a Tensor stores whole-number labels as floats
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: logits must be (batch, classes), got shape {logits.shape}.")
    if labels.shape != (logits.shape[0],):
        raise ValueError(
            f"cross_entropy: labels of shape {labels.shape} do not fit logits of shape "
            f"{logits.shape}; pass one integer label per row, shape ({logits.shape[0]},)."
        )
    if labels.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: labels must be integers, got dtype {labels.dtype}.")
    n, c = logits.shape
    if n and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(f"cross_entropy: labels must lie in [0, {c}), got {labels.min()}..{labels.max()}.")
    z = logits.data
    shifted = z - z.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(n)
    loss = -logp[rows, labels].mean()

    def backward(g):
        d = np.exp(logp)
        d[rows, labels] -= 1
        return (d * (g / n),)

    return Tensor._make(np.asarray(loss, dtype=z.dtype), (logits,), backward)


def dropout(a, p: float, rng: np.random.Generator, training: bool = True) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by ``1/(1-p)`` (training only)."""
    a = _t(a)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}.")
    if not training or p == 0.0:
        return a
    mask = (rng.random(a.shape, dtype=np.float32) >= p).astype(a.dtype) * a.dtype.type(1.0 / (1.0 - p))
    return Tensor._make(a.data * mask, (a,), lambda g: (g * mask,))


# ---------------------------------------------------------------- convolution
def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def conv_output_size(h, w, kh, kw, stride, padding):
    """Spatial output size of a convolution or pooling window."""
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


def conv2d(x, weight, bias=None, stride=1, padding=0) -> Tensor:
    """2-D convolution (cross-correlation) of x (B, C, H, W) with weight (O, C, kh, kw), via im2col: one product
    of patch rows, or (few patch entries: ``kernels.im2col_layout``) a product per image on patch planes."""
    from fanin import kernels

    x = _t(x)
    if x.ndim != 4:
        raise ValueError(f"conv2d: input must be (batch, channels, height, width), got shape {x.shape}.")
    o, c, kh, kw = weight.shape
    if x.shape[1] != c:
        raise ValueError(
            f"conv2d: input of shape {x.shape} has {x.shape[1]} channels but weight of shape "
            f"{weight.shape} expects {c}."
        )
    stride, padding = _pair(stride), _pair(padding)
    b = x.shape[0]
    ho, wo = conv_output_size(x.shape[2], x.shape[3], kh, kw, stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"conv2d: a {kh}x{kw} kernel does not fit input of shape {x.shape} with padding {padding}.")
    parents = (x, weight) if bias is None else (x, weight, bias)
    wmat = weight.data.reshape(o, -1)
    if kernels.im2col_layout(c, kh, kw) == "planes":
        cols = kernels.im2col_planes(x.data, kh, kw, stride, padding)  # (B, C*kh*kw, Ho*Wo)
        out = np.matmul(wmat, cols)  # (B, O, Ho*Wo): NCHW as it comes
        if bias is not None:
            out += bias.data[:, None]

        def backward(g):
            g3 = np.ascontiguousarray(g).reshape(b, o, ho * wo)
            gx = (kernels.col2im_planes(np.matmul(wmat.T, g3), x.shape, kh, kw, stride, padding)
                  if x.requires_grad else None)
            gw = None
            if weight.requires_grad:
                gw = np.matmul(g3, cols.transpose(0, 2, 1)).sum(axis=0).reshape(weight.shape)
            if bias is None:
                return gx, gw
            return gx, gw, g3.sum(axis=(0, 2))

        return Tensor._make(out.reshape(b, o, ho, wo), parents, backward)
    cols = kernels.im2col(x.data, kh, kw, stride, padding)  # (B*Ho*Wo, C*kh*kw)
    out = cols @ wmat.T
    if bias is not None:
        out += bias.data
    out = out.reshape(b, ho, wo, o).transpose(0, 3, 1, 2)

    def backward(g):
        g2 = g.transpose(0, 2, 3, 1).reshape(-1, o)
        gx = kernels.col2im(g2 @ wmat, x.shape, kh, kw, stride, padding) if x.requires_grad else None
        gw = (g2.T @ cols).reshape(weight.shape) if weight.requires_grad else None
        if bias is None:
            return gx, gw
        return gx, gw, g2.sum(axis=0)

    return Tensor._make(np.ascontiguousarray(out), parents, backward)


def _windows(x, kh, kw, stride, padding, fill):
    """A (B, C, Ho, Wo, kh, kw) strided view of the padded input."""
    (sh, sw), (ph, pw) = stride, padding
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    b, c, h, w = x.shape
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    s = x.strides
    view = np.lib.stride_tricks.as_strided(
        x, (b, c, ho, wo, kh, kw), (s[0], s[1], s[2] * sh, s[3] * sw, s[2], s[3]), writeable=False
    )
    return view, x.shape


def _scatter_windows(gw, padded_shape, x_shape, stride, padding):
    """Adjoint of ``_windows``: add a (B, C, Ho, Wo, kh, kw) gradient back onto the input."""
    (sh, sw), (ph, pw) = stride, padding
    _, _, ho, wo, kh, kw = gw.shape
    gx = np.zeros(padded_shape, dtype=gw.dtype)
    for i in range(kh):
        for j in range(kw):
            gx[:, :, i:i + sh * ho:sh, j:j + sw * wo:sw] += gw[:, :, :, :, i, j]
    return gx[:, :, ph:ph + x_shape[2], pw:pw + x_shape[3]]


def _pool_args(x, kernel_size, stride, padding, op):
    x = _t(x)
    if x.ndim != 4:
        raise ValueError(f"{op}: input must be (batch, channels, height, width), got shape {x.shape}.")
    k = _pair(kernel_size)
    s = k if stride is None else _pair(stride)
    p = _pair(padding)
    if x.shape[2] + 2 * p[0] < k[0] or x.shape[3] + 2 * p[1] < k[1]:
        raise ValueError(f"{op}: a {k[0]}x{k[1]} window does not fit input of shape {x.shape}.")
    return x, k, s, p


def max_pool2d(x, kernel_size, stride=None, padding=0) -> Tensor:
    """Maximum over windows (the gradient goes to the first maximum of each window)."""
    from fanin.kernels import pool
    from fanin.kernels._jit import gated

    x, (kh, kw), (sh, sw), (ph, pw) = _pool_args(x, kernel_size, stride, padding, "max_pool2d")
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"max_pool2d: padding {(ph, pw)} must be at most half the window {(kh, kw)}.")
    b, c, h, w = x.shape
    ho, wo = conv_output_size(h, w, kh, kw, (sh, sw), (ph, pw))
    xd = np.ascontiguousarray(x.data)
    if not (_tm.is_grad_enabled() and x.requires_grad):  # evaluation: the maxima alone, no argmax to keep
        return Tensor._make(gated(pool.max_pool_values, pool.max_pool_values_serial, xd, kh, kw, sh, sw, ph, pw,
                                  ho, wo), (x,), None)
    out, arg = gated(pool.max_pool_forward, pool.max_pool_forward_serial, xd, kh, kw, sh, sw, ph, pw, ho, wo)
    return Tensor._make(out, (x,), lambda g: (pool.max_pool_backward(np.ascontiguousarray(g), arg, h, w),))


def avg_pool2d(x, kernel_size, stride=None, padding=0) -> Tensor:
    """Average over windows; padded positions count as zeros (PyTorch's count_include_pad)."""
    x, (kh, kw), s, p = _pool_args(x, kernel_size, stride, padding, "avg_pool2d")
    view, padded_shape = _windows(x.data, kh, kw, s, p, 0.0)
    out = view.mean(axis=(4, 5), dtype=x.dtype)
    scale = x.dtype.type(1.0 / (kh * kw))

    def backward(g):
        gw = np.broadcast_to((g * scale)[..., None, None], view.shape)
        return (_scatter_windows(gw, padded_shape, x.shape, s, p),)

    return Tensor._make(out, (x,), backward)


# ----------------------------------------------------------------- batch norm
def batch_norm(x, gamma, beta, running_mean, running_var, training, momentum=0.1, eps=1e-5) -> Tensor:
    """Batch norm over every axis but 1 (features/channels); updates running stats in training.

    Fused kernels (``fanin.kernels.norm``): two passes forward, two backward, per-channel sums in float64."""
    from fanin.kernels import norm

    x = _t(x)
    if x.ndim < 2:
        raise ValueError(f"batch_norm: input must be (batch, features, ...), got shape {x.shape}.")
    if x.shape[1] != gamma.shape[0]:
        raise ValueError(
            f"batch_norm: input of shape {x.shape} has {x.shape[1]} features but the layer has {gamma.shape[0]}."
        )
    xd = x.data if x.data.dtype in (np.float32, np.float64) else x.data.astype(np.float64)
    if training:
        count = x.size // x.shape[1]
        if count < 2:
            raise ValueError(
                "batch_norm: training needs more than one value per channel; use a batch larger "
                "than 1 or call model.eval()."
            )
        mu, var = norm.batch_stats(xd)
        running_mean *= 1 - momentum
        running_mean += momentum * mu
        running_var *= 1 - momentum
        running_var += momentum * var * (count / (count - 1))
    else:
        mu, var = np.asarray(running_mean, np.float64), np.asarray(running_var, np.float64)
    inv = (1.0 / np.sqrt(var + eps)).astype(xd.dtype)
    out = norm.bn_forward(xd, mu, inv, gamma.data, beta.data)

    def backward(g):
        return norm.bn_backward(xd, mu, inv, gamma.data, g, training)

    return Tensor._make(out.astype(x.dtype, copy=False), (x, gamma, beta), backward)


# ------------------------------------------------------- condensed fan-in ops
def _zero_ablated(w, active):
    """``w``, or a copy with the rows of ablated neurons zeroed where they hold values: SPEC section 1 gives an ablated
    neuron its bias alone. The layers keep those rows at zero; a direct call of the op with values there gets them
    ignored (and no gradient through them), not added."""
    if active is None or active.all():
        return w
    off = ~active
    if not w[off].any():
        return w
    w = w.copy()
    w[off] = 0
    return w


def _as_topology(fname, indices, active, n_in):
    """A layer's ``Topology`` as it is; plain index arrays are validated into one (every call)."""
    from fanin import kernels

    if isinstance(indices, kernels.Topology):
        if active is not None and not np.array_equal(np.asarray(active, bool), indices.active):
            raise ValueError(f"{fname}: active disagrees with the topology's; pass one or the other.")
        if indices.n_in != n_in:
            raise ValueError(f"{fname}: the topology was built for n_in={indices.n_in}, but the input has {n_in}.")
        return indices
    return kernels.Topology(indices, n_in, active)


def _linear_topology(x, indices, values, active, dense):
    """Check ``fanin_linear``'s operands (host or device: shapes only); returns its Topology and whether the
    layer runs as a dense product (``dense`` None: when every row reads every input)."""
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"fanin_linear: input must be (batch, n_in), got shape {x.shape}.")
    topo = _as_topology("fanin_linear", indices, active, x.shape[1])
    if tuple(values.shape) != tuple(topo.indices.shape):
        raise ValueError(f"fanin_linear: values of shape {values.shape} must have the shape of the indices "
                         f"{topo.indices.shape}.")
    if dense and not topo.full:
        raise ValueError(f"fanin_linear: dense=True needs fan-in == n_in, got indices {topo.indices.shape} for input "
                         f"{x.shape}.")
    return topo, (topo.full if dense is None else bool(dense))


def fanin_linear(x, indices, values, bias=None, active=None, capture=None, dense=None) -> Tensor:
    """Condensed constant fan-in layer: ``y[b, j] = bias[j] + sum_t values[j, t] * x[b, indices[j, t]]``.

    ``indices``: a ``fanin.kernels.Topology`` (what layers pass: validated once, immutable, with
    its cached transposed structure), or a plain (n_out, k) index array with ``active``, which is
    validated into a Topology on every call. Ablated neurons (``active`` False) get no value
    gradient, so they stay empty; ``capture``, a list, receives ``(x, dy)`` in backward (SRigL's
    growth scores read it). A layer at full fan-in (every row ``0..n_in-1``, e.g. the classifier
    ERK keeps dense) runs on BLAS with ``values`` as the dense weight (``dense=False`` forces the
    condensed kernels).

    From batch ``kernels.cpu.SMALL_BATCH`` on, a sparse layer's output and its input gradient stay
    in the packed panel layout (``tensor.Panels``): the next sparse layer, a ReLU, or a dense layer
    reads them without packing, and ``.data`` unpacks only if something else asks.
    """
    from fanin import kernels
    from fanin.kernels import memory
    from fanin.kernels.cpu import SMALL_BATCH
    from fanin.tensor import Panels, make_panels, panels_of

    if _tm._CUDA and _tm.on_cuda(x, values, bias):
        return _cuda().fanin_linear(x, indices, values, bias, active, capture, dense)
    x = _t(x)
    topo, dense = _linear_topology(x, indices, values, active, dense)
    B, n_in = x.shape
    active = topo.active
    w = _zero_ablated(values.data, active)
    xp = panels_of(x)  # packed activations exist only from batch SMALL_BATCH on
    if xp is not None and xp.dtype != w.dtype:
        xp = None
    parents = (x, values) if bias is None else (x, values, bias)
    bias_d = None if bias is None else bias.data

    def grads(gx, gv, g_sum):
        """The backward's result: ablated neurons get no value gradient; the bias one is ``g_sum()``."""
        if gv is not None and active is not None and not active.all():
            gv[~active] = 0
        return (gx, gv) if bias is None else (gx, gv, g_sum())

    if dense:  # BLAS, reading a packed input in place (xp[:, :B] is x^T)
        xd = xp[:, :B].T if xp is not None else np.ascontiguousarray(x.data)
        out = xd @ (w.T if xd.dtype == w.dtype else w.T.astype(xd.dtype))
        if bias_d is not None:
            out += bias_d

        def backward(g):
            g = np.ascontiguousarray(g)
            if capture is not None:
                capture.append((np.ascontiguousarray(xd), g))
            gx = None
            if x.requires_grad:
                if xp is not None:  # hand the packed producer its gradient packed: gx^T = W^T g^T
                    gxp = memory.empty(xp.shape, g.dtype)  # the producer's kernels gather its rows
                    gxp[:, B:] = 0
                    np.matmul(w.T, g.T, out=gxp[:, :B])
                    gx = Panels(gxp, B)
                else:
                    gx = g @ w
            return grads(gx, g.T @ xd if values.requires_grad else None, lambda: g.sum(axis=0))

        return Tensor._make(out, parents, backward)

    packed = B >= SMALL_BATCH and x.dtype == w.dtype
    if not packed:  # small batches (or mixed dtypes): the row kernels
        xd = np.ascontiguousarray(x.data)
        out = kernels.fanin_forward(xd, topo, w, bias_d)

        def backward(g):
            g = np.ascontiguousarray(g)
            if capture is not None:
                capture.append((xd, g))
            gx = kernels.fanin_backward_input(topo, w, g, n_in) if x.requires_grad else None
            gv = kernels.fanin_backward_values(xd, topo, g) if values.requires_grad else None
            return grads(gx, gv, lambda: g.sum(axis=0))

        return Tensor._make(out, parents, backward)

    if xp is None:  # pack once: the forward and the value gradient both read it
        xp = kernels.pack_panels(np.ascontiguousarray(x.data))
    outp = kernels.fanin_forward_panels(xp, B, topo, w, bias_d)

    def backward(g):
        gp = g.array if isinstance(g, Panels) else kernels.pack_panels(np.ascontiguousarray(g, dtype=w.dtype))
        if capture is not None:  # SRigL's growth scores read rows (every delta_t steps)
            rows = g.rows() if isinstance(g, Panels) else np.ascontiguousarray(g)
            capture.append((kernels.unpack_panels(xp, B), rows))
        gxp, gv = kernels.fanin_backward_panels(xp, topo, w, gp, B, need_dx=x.requires_grad)
        gx = Panels(gxp, B) if gxp is not None else None
        return grads(gx, gv if values.requires_grad else None, lambda: gp.sum(axis=1))  # the padding is zero

    backward.takes_panels = True
    return make_panels(outp, B, parents, backward)


def fanin_conv2d(x, indices, values, bias=None, active=None, capture=None, kernel_size=3, stride=1,
                 padding=0) -> Tensor:
    """Condensed convolution with direct kernels (no im2col): indices (C_out, k) into taps (c*kh+dy)*kw+dx.

    ``indices``: a ``Topology`` over ``C_in*kh*kw`` taps (or a plain index array with ``active``,
    validated every call); ablated neurons get no value gradient; ``capture``, a list, receives
    ``(cols, dy2d)`` = (im2col(x), dy as (B*Ho*Wo, C_out)) in backward for SRigL's growth scores
    (im2col is built only then).
    """
    from fanin import kernels
    from fanin.kernels import conv as kconv

    x = _t(x)
    if x.ndim != 4:
        raise ValueError(f"fanin_conv2d: input must be (batch, channels, height, width), got shape {x.shape}.")
    kh, kw, stride, padding, _, _ = kernels._conv_geometry("fanin_conv2d", x.shape, *_pair(kernel_size), stride,
                                                           padding)
    topo = _as_topology("fanin_conv2d", indices, active, x.shape[1] * kh * kw)
    if tuple(values.shape) != tuple(topo.indices.shape):
        raise ValueError(f"fanin_conv2d: values of shape {values.shape} must have the shape of the indices "
                         f"{topo.indices.shape}.")
    indices, active = topo.indices, topo.active
    w = _zero_ablated(values.data, active)
    out = kconv.fanin_conv2d_forward(x.data, indices, w, None if bias is None else bias.data, (kh, kw), stride,
                                     padding)
    parents = (x, values) if bias is None else (x, values, bias)

    def backward(g):
        g = np.ascontiguousarray(g)
        if capture is not None:
            cols = kernels.im2col(x.data, kh, kw, stride, padding)
            capture.append((cols, g.transpose(0, 2, 3, 1).reshape(-1, g.shape[1])))
        tr = topo.transposed() if x.requires_grad else None
        gx, gv = kconv.fanin_conv2d_backward(x.data, indices, w, g, (kh, kw), stride, padding, tr,
                                             need_dx=x.requires_grad)
        if not values.requires_grad:
            gv = None
        elif active is not None and not active.all():
            gv[~active] = 0
        if bias is None:
            return gx, gv
        return gx, gv, g.sum(axis=(0, 2, 3))

    return Tensor._make(out, parents, backward)


# ------------------------------------------------------------- self-compression
def quantize(w, b, e) -> Tensor:
    """Self-compression's quantizer (SPEC.md §3), per output channel (the first axis of ``w``):
    ``2**e * rint(clamp(2**-e * w, -2**(b-1), 2**(b-1) - 1))``, zero where ``b <= 0``.

    Straight-through backward (``fanin.compress`` derives the gradients to ``w``, ``b`` and ``e``);
    one fused Numba pass each way (``fanin.kernels.quant``).
    """
    from fanin.kernels import memory, quant

    w, b, e = _t(w), _t(b), _t(e)
    n = w.shape[0] if w.ndim else 0
    if w.ndim < 2 or b.shape != (n,) or e.shape != (n,):
        raise ValueError(
            f"quantize: w must have one row per channel (2-D or more) and b, e one value per channel; got w "
            f"{w.shape}, b {b.shape}, e {e.shape}."
        )
    dt = w.dtype
    w2 = np.ascontiguousarray(w.data.reshape(n, -1))
    bd = np.ascontiguousarray(b.data, dtype=dt)
    s, t = quant.scales(e.data, dt)
    lo, hi = quant.bounds(bd, dt)
    out = memory.empty(w2.shape, dt)  # pooled: a fresh 4 MiB array each step paid its page faults every step
    quant.quantize_rows(w2, bd, s, t, lo, hi, out)

    def backward(g):
        # dw gets a buffer of its own: written into g's (in place), the kernel's loop ran scalar, because LLVM's
        # runtime overlap check between dw and g then fails (1.97 ms against 0.29 ms for 1024x1024, Intel Xeon)
        g2 = np.ascontiguousarray(g, dtype=dt).reshape(n, -1)
        dw = np.empty(w.shape, dt)  # owns its data in w's shape: taken as w.grad without a copy (a view is copied)
        db, de = np.empty(n, dt), np.empty(n, dt)
        quant.quantize_rows_backward(g2, w2, bd, s, t, lo, hi, dw.reshape(n, -1), db, de)
        return (dw if w.requires_grad else None,
                db.astype(b.dtype, copy=False) if b.requires_grad else None,
                de.astype(e.dtype, copy=False) if e.requires_grad else None)

    return Tensor._make(out.reshape(w.shape), (w, b, e), backward)
