# TEMPORARY NumPy shim (lead) until the Numba kernels land; helper-1 replaces this file.
import numpy as np
def index_dtype(n_in): return np.int16 if n_in <= 32767 else np.int32
def validate_indices(indices, n_in):
    if indices.min() < 0 or indices.max() >= n_in: raise ValueError("index out of range")
    if indices.shape[1] > 1 and np.any(np.diff(indices.astype(np.int64), axis=1) <= 0): raise ValueError("indices must be sorted and distinct")
def fanin_forward(x, indices, values, bias=None, check=True):
    y = np.einsum("bjt,jt->bj", x[:, indices.astype(np.int64)], values).astype(np.float32)
    return y + bias if bias is not None else y
def fanin_backward_values(x, indices, dy, check=True):
    return np.einsum("bj,bjt->jt", dy, x[:, indices.astype(np.int64)]).astype(x.dtype)
def fanin_backward_input(indices, values, dy, n_in, check=True):
    dx = np.zeros((dy.shape[0], n_in), dy.dtype)
    for t in range(indices.shape[1]):
        np.add.at(dx.T, indices[:, t].astype(np.int64), (dy * values[:, t]).T)
    return dx
def fanin_backward(x, indices, values, dy):
    return fanin_backward_input(indices, values, dy, x.shape[1]), fanin_backward_values(x, indices, dy)
def dense_grad(x, dy): return dy.T @ x
def growth_candidates(x, dy, indices, c, block=None):
    g = np.abs(dy.T @ x).astype(np.float32)
    g[np.arange(g.shape[0])[:, None], indices.astype(np.int64)] = -np.inf
    order = np.argsort(-g, axis=1, kind="stable")[:, :c]
    sc = np.take_along_axis(g, order, 1)
    return np.where(np.isfinite(sc), order, -1).astype(np.int32), sc
def im2col(x, kh, kw, stride, padding):
    (sh, sw), (ph, pw) = stride, padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    b, c, h, w = xp.shape
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    s = xp.strides
    v = np.lib.stride_tricks.as_strided(xp, (b, ho, wo, c, kh, kw), (s[0], s[2] * sh, s[3] * sw, s[1], s[2], s[3]))
    return np.ascontiguousarray(v).reshape(b * ho * wo, c * kh * kw)
def col2im(cols, x_shape, kh, kw, stride, padding):
    (sh, sw), (ph, pw) = stride, padding
    b, c, h, w = x_shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    g = cols.reshape(b, ho, wo, c, kh, kw)
    out = np.zeros((b, c, h + 2 * ph, w + 2 * pw), cols.dtype)
    for i in range(kh):
        for j in range(kw):
            out[:, :, i:i + sh * ho:sh, j:j + sw * wo:sw] += g[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return out[:, :, ph:ph + h, pw:pw + w]
