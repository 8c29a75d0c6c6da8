"""``Network``: a validated plan with its arrays, run forward with no autograd.

A Network is made by ``fanin.compile(model)`` or ``fanin.load(path)``; it never changes after that
(its arrays are read-only), so any number of threads may call ``predict`` at once. Each call checks
only ``x``: its dtype (float32; float64 and float16 are converted, anything else refused), its shape
(``(batch, *input_shape)``, or one sample of ``input_shape``), and by default that every value is
finite (``nan_policy="raise"``; ``"propagate"`` skips the scan). An empty batch gives an empty result.

``activations="int8"`` runs the linear layers with 8-bit activations quantized per sample and per layer and
integer dot products (``fanin.kernels.w8a8``: what ONNX Runtime's dynamic int8 quantization does; float32
layers get per-neuron int8 weights): ~4x faster at batch 1 and ~2x at batch 256 on AVX-512 VBMI/VNNI CPUs,
results within the error of 8-bit activations of the float path, a sample's logits independent of its batch.
Under ``nan_policy="propagate"`` a sample holding NaN/Inf then gets NaN logits.
"""
from __future__ import annotations

import math

import numpy as np

from fanin.kernels import infer
from fanin.runtime import engine
from fanin.runtime.plan import check

__all__ = ["Network", "PredictError"]

NAN_POLICIES = ("raise", "propagate")
_F32 = np.dtype(np.float32)


def as_float32(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x`` as C-contiguous float32, and the rows (axis 0) whose values are finite in ``x`` but beyond float32's
    range (empty unless the cast made something non-finite). ``predict`` and ``fanin serve`` name those rows
    instead of calling them NaN or Inf."""
    if x.dtype == _F32:
        return np.ascontiguousarray(x), np.empty(0, np.intp)
    with np.errstate(over="ignore", invalid="ignore"):
        x32 = np.ascontiguousarray(x, dtype=np.float32)
    if not x32.size or infer.all_finite(x32):
        return x32, np.empty(0, np.intp)
    big = np.isfinite(x) & ~np.isfinite(x32)
    return x32, np.flatnonzero(big.reshape(len(x), -1).any(axis=1))


class PredictError(ValueError):
    """``predict`` was given an input it cannot take (the message says what to change)."""


class Network:
    """A compiled, autograd-free network: ``predict`` (logits), ``predict_proba``, ``info``."""

    def __init__(self, plan: dict, meta: dict | None = None, *, validated: bool = False, nan_policy: str = "raise",
                 activations: str = "float32"):
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"Network: nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}.")
        if activations not in engine.ACTIVATIONS:
            raise ValueError(f"Network: activations must be one of {engine.ACTIVATIONS}, got {activations!r} "
                             "('int8': 8-bit activations, see fanin.kernels.w8a8).")
        if not validated:
            check(plan)
        self.plan = plan
        self.meta = dict(meta or {})
        self.nan_policy = nan_policy
        self.activations = activations
        self.input_shape = tuple(int(s) for s in plan["input_shape"])
        self.n_classes = int(plan["ops"][-1]["n_out"])
        for op in plan["ops"]:
            for a in op.get("arrays", {}).values():
                a.setflags(write=False)  # a Network never changes: threads may share it
        self._engine = engine.build(plan, activations)
        self._scans_x = self._engine.checks_finite  # the engine finds NaN/Inf in x itself

    # ---------------------------------------------------------------- predict
    def _input(self, x) -> tuple[np.ndarray, bool]:
        if not isinstance(x, np.ndarray):
            if hasattr(x, "__cuda_array_interface__"):
                raise PredictError("predict: x is a GPU array; this Network runs on the CPU (copy x to the host).")
            x = np.asarray(x)
        if isinstance(x, np.ma.MaskedArray):
            raise PredictError("predict: x is a masked array, whose mask predict would ignore; fill the masked "
                               "entries first (x.filled(0)) or pass x.data.")
        if x.dtype.kind != "f":
            raise PredictError(f"predict: x has dtype {x.dtype}; pass floats (float32; float64/float16 are converted), "
                               "normalized as in training.")
        single = x.shape == self.input_shape
        if single:
            x = x[None]
        if x.ndim != len(self.input_shape) + 1 or x.shape[1:] != self.input_shape:
            raise PredictError(
                f"predict: x has shape {x.shape}; this network takes (batch, {', '.join(map(str, self.input_shape))}) "
                f"or one sample of shape {self.input_shape}."
            )
        x, rows = as_float32(x)
        if self.nan_policy == "raise" and rows.size:  # finite as given, but not in float32: say so, not "NaN or Inf"
            raise PredictError(f"predict: sample(s) {rows[:5].tolist()}{' ...' if rows.size > 5 else ''} hold values "
                               "beyond float32's range (|x| > 3.4e38); the network computes in float32: rescale the "
                               "input.")
        if self.nan_policy == "raise" and x.size and not self._scans_x and not infer.all_finite(x):
            self._refuse_non_finite(x)
        return x, single

    @staticmethod
    def _refuse_non_finite(x):
        bad = np.flatnonzero(~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1))
        raise PredictError(f"predict: sample(s) {bad[:5].tolist()}{' ...' if bad.size > 5 else ''} hold NaN or "
                           "Inf; clean the input (or build the Network with nan_policy='propagate').")

    def predict(self, x) -> np.ndarray:
        """Logits, (batch, n_classes) float32 — or (n_classes,) for one sample of ``input_shape``."""
        if (type(x) is np.ndarray and x.dtype is _F32 and x.shape[1:] == self.input_shape and x.shape[0]
                and x.flags.c_contiguous and (self._scans_x or self.nan_policy != "raise")):
            single = False  # the common case, checked in a few attribute reads: at batch 1 they are ~5 % of a call
        else:
            x, single = self._input(x)
            if x.shape[0] == 0:
                return np.empty((0, self.n_classes), np.float32)
        try:
            y = self._engine.run(x)
        except engine.NonFinite as exc:  # an engine that scans its linear head's input found NaN/Inf
            if self.nan_policy == "raise" and not infer.all_finite(x):
                self._refuse_non_finite(x)
            y = exc.out  # (x is finite: a layer before the head overflowed, and its logits say so)
        return y[0] if single else y

    def predict_proba(self, x) -> np.ndarray:
        """Class probabilities (softmax of the logits), same shapes as ``predict``."""
        z = self.predict(x).astype(np.float32, copy=True)
        z -= z.max(axis=-1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=-1, keepdims=True)
        return z

    __call__ = predict

    def to(self, device):
        """This network on ``device``: itself for 'cpu'; for 'cuda' a ``fanin.device.DeviceNetwork`` with the
        weights copied to the GPU once (MLP plans; the cuda extra and an NVIDIA GPU; float32 activations)."""
        from fanin import device as _device

        if self.activations != "float32" and _device.normalize(device) == "cuda":
            raise ValueError("Network.to('cuda'): int8 activations run on the CPU only; build the Network with "
                             "activations='float32' (the default) to run it on the GPU.")
        return _device.to_device(self, device)

    # ------------------------------------------------------------------ info
    def info(self) -> dict:
        """Layers, fan-ins, bits and sizes (against the fp32 dense network of the same shapes)."""
        layers, stored, dense_bits, value_bits, index_bits = [], 0, 0, 0, 0
        for op in self.plan["ops"]:
            if op["op"] not in ("linear", "conv"):
                layers.append({"op": op["op"]})
                continue
            a = op["arrays"]
            k = a["indices"].shape[1] if op["sparse"] else op["n_in"]
            n = op["n_out"] * k
            active = op.get("active")
            weights = n if active is None else k * int(sum(active))
            dense = op["n_out"] * op["n_in"]
            ib = weights * max(1, math.ceil(math.log2(max(2, op["n_in"])))) if op["sparse"] else 0
            layers.append({"op": op["op"], "sparse": op["sparse"], "n_in": op["n_in"], "n_out": op["n_out"],
                           "fan_in": k, "bits": op["bits"], "act": op["act"], "weights": weights,
                           "density": round(weights / dense, 6)})
            stored += weights
            dense_bits += 32 * dense
            value_bits += op["bits"] * weights
            index_bits += ib
        return {"input_shape": list(self.input_shape), "classes": self.n_classes, "layers": layers,
                "weights": stored, "value_bits": value_bits, "index_bits": index_bits,
                "fp32_dense_bits": dense_bits, "bits_pct": round(100 * value_bits / dense_bits, 4),
                "total_bits_pct": round(100 * (value_bits + index_bits) / dense_bits, 4),
                "activations": self.activations, "engine": self._engine.describe(), "meta": self.meta}

    def __repr__(self):
        i = self.info()
        return (f"Network(input={i['input_shape']}, classes={i['classes']}, layers={sum(1 for l in i['layers'] if 'n_in' in l)}, "
                f"weights={i['weights']}, bits={i['bits_pct']:.2f} % of fp32 dense)")
