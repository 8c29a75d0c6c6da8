"""How a Network runs its plan on the CPU: one prepared step per op.

``build(plan)`` prepares each op once: a condensed layer gets its ``Topology`` (validated, with the
transposed structure cached) and its weights; quantized layers are used as ``scale * qvalues``, the
very float32 products training used. ``run(x)`` walks the steps with no autograd.
"""
from __future__ import annotations

import numpy as np
from scipy import special

from fanin import kernels
from fanin.kernels import conv as kconv
from fanin.kernels import pool

__all__ = ["build"]


def _weights(op) -> np.ndarray:
    a = op["arrays"]
    if "values" in a:
        return np.ascontiguousarray(a["values"], dtype=np.float32)
    return np.ascontiguousarray(a["scale"][:, None] * a["qvalues"].astype(np.float32))  # what training used


def _activate(y, act):
    if act == "relu":
        np.maximum(y, 0, out=y)
    elif act == "gelu":
        y *= 0.5 * (1.0 + special.erf(y * np.float32(1 / np.sqrt(2))))
    return y


class _Linear:
    def __init__(self, op):
        self.act, self.bias = op["act"], op["arrays"]["bias"]
        w = _weights(op)
        if op["sparse"]:
            self.topo = kernels.Topology(op["arrays"]["indices"], op["n_in"])
            self.values = w
        else:
            self.topo, self.wt = None, np.ascontiguousarray(w.T)

    def __call__(self, x):
        if self.topo is not None:
            y = kernels.fanin_forward(x, self.topo, self.values, self.bias)
        else:
            y = x @ self.wt
            y += self.bias
        return _activate(y, self.act)


class _Conv:
    def __init__(self, op):
        self.act, self.bias = op["act"], op["arrays"]["bias"]
        self.kernel, self.stride, self.padding = tuple(op["kernel"]), tuple(op["stride"]), tuple(op["padding"])
        w = _weights(op)
        self.n_out = op["n_out"]
        if op["sparse"]:
            self.indices, self.values = np.ascontiguousarray(op["arrays"]["indices"]), w
        else:
            self.indices, self.wmat = None, np.ascontiguousarray(w)

    def __call__(self, x):
        if self.indices is not None:
            y = kconv.fanin_conv2d_forward(x, self.indices, self.values, self.bias, self.kernel, self.stride,
                                           self.padding)
        else:
            kh, kw = self.kernel
            b = x.shape[0]
            ho = (x.shape[2] + 2 * self.padding[0] - kh) // self.stride[0] + 1
            wo = (x.shape[3] + 2 * self.padding[1] - kw) // self.stride[1] + 1
            cols = kernels.im2col(x, kh, kw, self.stride, self.padding)
            y = cols @ self.wmat.T
            y += self.bias
            y = np.ascontiguousarray(y.reshape(b, ho, wo, self.n_out).transpose(0, 3, 1, 2))
        return _activate(y, self.act)


class _Pool:
    def __init__(self, op):
        self.max = op["op"] == "maxpool"
        self.k, self.s, self.p = tuple(op["kernel"]), tuple(op["stride"]), tuple(op["padding"])

    def __call__(self, x):
        (kh, kw), (sh, sw), (ph, pw) = self.k, self.s, self.p
        ho, wo = (x.shape[2] + 2 * ph - kh) // sh + 1, (x.shape[3] + 2 * pw - kw) // sw + 1
        if self.max:
            return pool.max_pool_forward(x, kh, kw, sh, sw, ph, pw, ho, wo)[0]
        xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x
        out = np.zeros((x.shape[0], x.shape[1], ho, wo), np.float32)
        for i in range(kh):
            for j in range(kw):
                out += xp[:, :, i:i + sh * ho:sh, j:j + sw * wo:sw]
        return out * np.float32(1.0 / (kh * kw))


class _Engine:
    def __init__(self, plan):
        self.steps = []
        for op in plan["ops"]:
            kind = op["op"]
            if kind == "linear":
                self.steps.append(_Linear(op))
            elif kind == "conv":
                self.steps.append(_Conv(op))
            elif kind in ("maxpool", "avgpool"):
                self.steps.append(_Pool(op))
            else:
                self.steps.append(lambda x: x.reshape(x.shape[0], -1))

    def run(self, x):
        for step in self.steps:
            x = step(x)
        return x

    def describe(self) -> str:
        return "cpu: one kernel call per op"


def build(plan):
    """The prepared steps of a validated plan."""
    return _Engine(plan)
