"""Self-compression (SPEC.md §3): learned bit depth and exponent per channel; channels that reach 0 bits go.

The quantizer
-------------
Each output channel ``i`` of a compressible layer carries a bit depth ``b_i >= 0`` and an exponent
``e_i`` (both real, learned). Its weights ``w`` are used as

    q(w; b, e) = 2**e * rint(clamp(2**-e * w, -2**(b-1), 2**(b-1) - 1)),    q = 0 where b <= 0.

Gradients (the straight-through estimator: ``d rint(u)/du := 1``). Write ``y = 2**-e * w``,
``lo = -2**(b-1)``, ``hi = 2**(b-1) - 1`` and ``c = clamp(y, lo, hi)``, so ``q = 2**e * rint(c)``:

- ``dq/dw = 2**e * dc/dy * 2**-e = 1`` inside ``[lo, hi]``, 0 where the clamp is active;
- ``dq/db = 2**e * dc/db``: ``dc/db = d hi/db = ln2 * 2**(b-1)`` above the range, ``d lo/db =
  -ln2 * 2**(b-1)`` below it, 0 inside;
- ``dq/de = ln2 * 2**e * rint(c) + 2**e * dc/de``. Inside, ``dc/de = dy/de = -ln2 * y``, so
  ``dq/de = ln2 * (q - w)``; where clamped ``dc/de = 0`` and ``dq/de = ln2 * q``.

``fanin.ops.quantize`` is the differentiable op (one fused Numba pass each way,
``fanin.kernels.quant``); ``quantize`` here is the same map on plain arrays. ``b`` is kept ``>= 0``
by projection after every update; at ``b <= 0`` all of a channel's gradients are 0.

Initialisation (``init_bits``, default 8): ``b = init_bits`` and ``e = log2(max|w_i| / (2**(b-1) - 1))``,
the exponent at which the channel's largest weight just fits the range. At 8 bits the quantized
network computes nearly what the float one does (int8 loses < 0.4 % of a channel's largest weight
per value), so training starts from the float model's function and the size term then lowers ``b``
channel by channel; a smaller init saves a few steps but starts from a damaged network.

The size term
-------------
``Q = sum over layers and channels of b_i * n_i`` with ``n_i`` the weights channel ``i`` still
has (``in_features`` for a dense neuron, ``c_in * kh * kw`` for a dense filter, ``k`` for an
active condensed neuron, 0 for an ablated one); the training loss gains ``gamma * Q / N`` with ``N``
the number of weights in the compressed layers when self-compression was attached.
``SelfCompression`` keeps ``b`` and ``e`` in its own Adam optimizer (``lr``), so the model's
optimizer (SGD by default, with weight decay) never touches them. With ``t_end``, bits, exponents
and channels stay fixed after that many steps and the weights fine-tune to them.

``cost='macs'`` counts compute instead of storage: each layer's ``b_i * n_i`` is multiplied by its output
positions per sample ``P`` (``Ho * Wo`` for a convolution, 1 for a linear layer; from ``input_shape``) and the
term is ``gamma * Q_macs / N_macs``, the bit-operations of one forward pass relative to those at attach time.
With storage as the cost, a CNN's convolutions hold a few percent of the weights but most of the work, so the
size term hardly moves their bits and the epochs do not get faster; weighed by compute they shrink first.
``'bits+macs'`` adds the two terms.

Channel removal
---------------
When ``b_i`` reaches 0 the channel's weights are all 0 and it outputs a constant: its bias, through
the modules between it and the next weight layer (batch norm, ReLU/GELU, pooling, dropout,
flatten). ``step()`` removes such channels physically — the layer's rows, ``b``, ``e``, bias, the
batch-norm parameters and running statistics, the optimizer state of all of them — and every
consumer's inputs: a dense consumer loses the columns; a condensed one is re-indexed and the slots
that read a removed input are refilled with other live inputs at weight 0, so every active neuron
keeps exactly ``k`` distinct inputs. The constant's contribution is folded into the consumer's bias,
computed with batch norm in eval mode, where that is exact: a linear consumer (after a flatten or
not), a convolution without padding. In eval mode the network's function is unchanged; in training
mode a channel that went through batch norm produced ``act(beta)`` before removal (a constant
channel normalises to 0) and produces the eval-mode constant after it — a small change that training
absorbs. Where folding is not exact — a convolution with padding (the border taps read zeros, not
the constant), average pooling with padding, a consumer without a bias — the channel is kept with
``b = 0`` and an L1 penalty ``l1 * |constant|`` (training-mode constant) joins the size term;
it is removed once its constant is exactly 0 in both modes (typically a ReLU of a negative value),
when removal changes nothing. Channels of the network's output layer are never removed, and every
layer keeps at least one channel.

Removal understands models that are a ``Sequential`` (nested ones are flattened) of weight layers
and per-channel modules; for other models quantization and the size term work but channels stay
(``removal_reason`` says why). With SRigL (``srigl=``), the updater is told about every resized
layer, so its budgets follow the new shapes (the density of each layer stays what it was).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from fanin import nn, ops, optim
from fanin.kernels import quant
from fanin.tensor import Tensor

__all__ = ["quantize", "SelfCompression", "COMPRESSIBLE", "DEFAULT_GAMMA", "integer_weights"]

COMPRESSIBLE = (nn.Linear, nn.Conv2d, nn.FanInLinear, nn.FanInConv2d)
WEIGHT_LAYERS = COMPRESSIBLE
PER_CHANNEL = (nn.ReLU, nn.GELU, nn.BatchNorm1d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Flatten)
DEFAULT_GAMMA = 0.1  # the CLI default (`fanin train --compress`): chosen on the MLP, docs/COMPRESSION.md


# ------------------------------------------------------------------ quantizer
def quantize(w, b, e) -> np.ndarray:
    """``q(w; b, e)`` on arrays: ``w`` (n, ...) float32/float64, ``b`` and ``e`` (n,) one per channel (row)."""
    w = np.asarray(w)
    if w.dtype not in (np.float32, np.float64):
        raise TypeError(f"quantize: w must be float32 or float64, got {w.dtype}.")
    if w.ndim < 2:
        raise ValueError(f"quantize: w must have one row per channel (2-D or more), got shape {w.shape}.")
    n = w.shape[0]
    b, e = np.asarray(b, np.float64), np.asarray(e, np.float64)
    if b.shape != (n,) or e.shape != (n,):
        raise ValueError(f"quantize: b and e need one value per channel ({n},), got {b.shape} and {e.shape}.")
    for name, a in (("b", b), ("e", e)):
        if not np.all(np.isfinite(a)):
            row = int(np.flatnonzero(~np.isfinite(a))[0])
            raise ValueError(f"quantize: {name} holds NaN or Inf (channel {row}); bit depths and exponents must be "
                             "finite.")
    if w.size == 0:
        return w.copy()
    w2 = np.ascontiguousarray(w.reshape(n, -1))
    s, t = quant.scales(e, w.dtype)
    lo, hi = quant.bounds(b, w.dtype)
    out = np.empty_like(w2)
    quant.quantize_rows(w2, b.astype(w.dtype), s, t, lo, hi, out)
    return out.reshape(w.shape)


def integer_weights(w, b, e):
    """(r, s): integers ``r`` (int8, w's shape) and per-channel scales ``s`` with ``q(w; b, e) == s * r``
    bit for bit (in w's dtype). ``ceil(b_i)`` bits hold row i's integers; b <= 0 gives r = 0."""
    w = np.asarray(w)
    n = w.shape[0]
    b64 = np.asarray(b, np.float64)
    if np.any(b64 > 8):
        raise ValueError(f"integer_weights: a channel has {b64.max():.2f} bits; int8 holds at most 8.")
    s, t = quant.scales(e, w.dtype)
    lo, hi = quant.bounds(b64, w.dtype)
    y = np.clip(w.reshape(n, -1) * t[:, None], lo[:, None], hi[:, None])
    r = np.where(b64[:, None] > 0, np.rint(y), 0).astype(np.int8)
    return r.reshape(w.shape), s


def _init_exponent(w: np.ndarray, bits: float) -> np.ndarray:
    top = np.abs(w.reshape(w.shape[0], -1)).max(axis=1).astype(np.float64)
    top = np.where(top > 0, top, 1e-8)
    return np.log2(top / max(2.0 ** (bits - 1) - 1, 0.5))


# ----------------------------------------------------------- model structure
def _leaves(module):
    """The modules a Sequential runs, in order (nested Sequentials flattened); None if not a Sequential chain."""
    if isinstance(module, nn.Sequential):
        out = []
        for m in module:
            sub = _leaves(m)
            if sub is None:
                return None
            out += sub
        return out
    if any(True for _ in module.named_children()):
        return None  # a container whose forward we cannot see
    return [module]


@dataclasses.dataclass
class _Link:
    """A producer layer, the per-channel modules after it, and the weight layer that consumes its channels."""

    between: list
    consumer: object | None
    consumer_name: str | None
    flatten: bool


COSTS = ("bits", "macs", "bits+macs")


def _positions(model, input_shape) -> dict:
    """id(layer) -> output positions per sample (Ho*Wo for a convolution, 1 for a linear layer), by walking the
    Sequential chain from one sample's ``input_shape`` (C, H, W) or (features,)."""
    leaves = _leaves(model)
    if leaves is None:
        raise ValueError("SelfCompression: cost='macs' needs a Sequential model (to follow the spatial sizes).")
    shape, out = tuple(int(v) for v in input_shape), {}
    for m in leaves:
        if isinstance(m, (nn.Conv2d, nn.FanInConv2d, nn.MaxPool2d)):
            k = ops._pair(m.kernel_size)
            if len(shape) != 3:
                raise ValueError(f"SelfCompression: input_shape {tuple(input_shape)} does not reach "
                                 f"{type(m).__name__} as (C, H, W).")
            ho, wo = ops.conv_output_size(shape[1], shape[2], *k, m.stride if m.stride is not None else k, m.padding)
            c = m.weight_param.shape[0] if isinstance(m, (nn.Conv2d, nn.FanInConv2d)) else shape[0]
            shape = (c, ho, wo)
            if isinstance(m, (nn.Conv2d, nn.FanInConv2d)):
                out[id(m)] = ho * wo
        elif isinstance(m, nn.Flatten):
            shape = (int(np.prod(shape)),)
        elif isinstance(m, (nn.Linear, nn.FanInLinear)):
            out[id(m)] = 1
            shape = (m.weight_param.shape[0],)
    return out


def _out_channels(layer) -> int:
    return layer.weight_param.shape[0]


def _dense_count(layer) -> int:
    """Weights of the dense layer this one stands for (its original architecture)."""
    if isinstance(layer, nn.FanInConv2d):
        return layer.c_out * layer.c_in * layer.kernel_size[0] * layer.kernel_size[1]
    if isinstance(layer, nn.FanInLinear):
        return layer.n_out * layer.n_in
    return int(layer.weight.size)


def _per_channel_weights(layer) -> np.ndarray:
    """n_i: the weights each output channel of ``layer`` holds now."""
    if isinstance(layer, (nn.FanInLinear, nn.FanInConv2d)):
        return layer.k * layer.active.astype(np.float64)
    return np.full(_out_channels(layer), float(np.prod(layer.weight.shape[1:])))


def _index_bits(layer) -> float:
    """Bits of a condensed layer's indices at ceil(log2 n_in) bits each (0 for dense layers)."""
    if not isinstance(layer, (nn.FanInLinear, nn.FanInConv2d)):
        return 0.0
    return float(layer.k * int(layer.active.sum()) * max(1, math.ceil(math.log2(max(2, layer.n_in)))))


class SelfCompression:
    """Learned per-channel bit depths and exponents for a model's weight layers, a size loss, and removal
    of the channels that reach 0 bits (module docstring).

    Per step::

        loss = task_loss + sc.size_loss()
        opt.zero_grad(); loss.backward(); opt.step(); [srigl.step();] sc.step()

    ``layers``: None (every Linear, Conv2d, FanInLinear, FanInConv2d), or names / modules to compress.
    ``optimizer``: the model's optimizer, whose state is shrunk with the layers (create it before
    this object: it must not hold ``b``/``e``). ``srigl``: the SRigL updater, if any.
    """

    def __init__(self, model, gamma: float = DEFAULT_GAMMA, layers=None, init_bits: float = 8.0, optimizer=None,
                 lr: float = 0.03, srigl=None, l1: float = 1e-3, remove: bool = True, t_end: int | None = None,
                 seed=0, cost: str = "bits", input_shape=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"SelfCompression: model must be a fanin.nn.Module (e.g. fanin.models.mlp(...)), got "
                            f"{type(model).__name__}.")
        gamma = float(gamma)
        if cost not in COSTS:
            raise ValueError(f"SelfCompression: cost must be one of {', '.join(COSTS)}, got {cost!r}.")
        if not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"SelfCompression: gamma must be a finite number >= 0, got {gamma}; it weighs the size "
                             "term (0 keeps the bits as they start).")
        init_bits = float(init_bits)
        if not 1.0 <= init_bits <= 16.0:
            raise ValueError(f"SelfCompression: init_bits must be in [1, 16], got {init_bits}; 8 starts from an "
                             "int8-like network.")
        if not lr > 0 or not l1 >= 0:
            raise ValueError(f"SelfCompression: lr must be > 0 and l1 >= 0, got lr={lr}, l1={l1}.")
        if t_end is not None and (int(t_end) != t_end or t_end < 0):
            raise ValueError(f"SelfCompression: t_end must be a step count >= 0 (or None), got {t_end}.")
        self.t_end = None if t_end is None else int(t_end)
        self.model, self.gamma, self.l1, self.remove_channels = model, gamma, float(l1), bool(remove)
        self.main_optimizer, self.srigl = optimizer, srigl
        self.rng = np.random.default_rng(seed)
        self.layers = self._select(model, layers)
        all_weight = [(n.rstrip("."), m) for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]
        self.fp32_dense_bits = 32.0 * sum(_dense_count(m) for _, m in all_weight)
        self._other = [(n, m) for n, m in all_weight if all(m is not layer for _, layer in self.layers)]
        params = []
        for name, layer in self.layers:
            w = layer.weight_param.data
            layer.bits = nn.Parameter(np.full(w.shape[0], init_bits, w.dtype), name=f"{name}.bits")
            layer.exponent = nn.Parameter(_init_exponent(w, init_bits).astype(w.dtype), name=f"{name}.exponent")
            params += [layer.bits, layer.exponent]
            if optimizer is not None and (optimizer.holds(layer.bits) or optimizer.holds(layer.exponent)):
                raise ValueError("SelfCompression: the model's optimizer holds b/e; create it before SelfCompression.")
        self.optimizer = optim.Adam(params, lr=lr)
        self.n_weights = float(sum(_per_channel_weights(layer).sum() for _, layer in self.layers))
        # the size term's weight per bit of each layer: 1/N (storage), and/or positions/N_macs (compute)
        self.cost = cost
        convs = any(isinstance(layer, (nn.Conv2d, nn.FanInConv2d)) for _, layer in self.layers)
        if cost != "bits" and convs and input_shape is None:
            raise ValueError("SelfCompression: cost='macs' on a convolutional model needs input_shape=(C, H, W) "
                             "of one sample, e.g. (1, 28, 28), to count each filter's output positions.")
        self._pos = (_positions(model, input_shape) if cost != "bits" and input_shape is not None
                     else {id(layer): 1 for _, layer in self.layers})  # every linear layer: one position
        self.n_macs = float(sum(self._pos[id(layer)] * _per_channel_weights(layer).sum() for _, layer in self.layers))
        self.original_channels = {name: _out_channels(layer) for name, layer in self.layers}
        self.channel_ids = {name: np.arange(_out_channels(layer)) for name, layer in self.layers}
        self.pending = {name: np.zeros(_out_channels(layer), bool) for name, layer in self.layers}
        self.t = 0
        self.history: list = []
        self.links, self.removal_reason = self._links()

    # ------------------------------------------------------------- set-up
    @staticmethod
    def _select(model, layers):
        found = [(n.rstrip("."), m) for n, m in model.named_modules() if isinstance(m, COMPRESSIBLE)]
        if layers is None:
            chosen = found
        else:
            names = dict(model.named_modules())
            chosen = []
            for item in layers:
                name, mod = (item.rstrip("."), names.get(item) or names.get(item + ".")) if isinstance(item, str) \
                    else (next((n.rstrip(".") for n, m in names.items() if m is item), None), item)
                if mod is None or name is None:
                    raise ValueError(f"SelfCompression: {item!r} is not a layer of this model.")
                if not isinstance(mod, COMPRESSIBLE):
                    raise TypeError(f"SelfCompression: layer '{name}' is a {type(mod).__name__}, which cannot be "
                                    "compressed; compressible: Linear, Conv2d, FanInLinear, FanInConv2d.")
                chosen.append((name, mod))
        if not chosen:
            raise ValueError("SelfCompression: the model has no compressible layers (Linear, Conv2d, FanInLinear, "
                             "FanInConv2d).")
        for name, mod in chosen:
            if mod.bits is not None:
                raise ValueError(f"SelfCompression: layer '{name}' is already compressed by another SelfCompression.")
        return chosen

    def _links(self):
        """Producer name -> _Link for every compressed layer whose channels can be removed."""
        leaves = _leaves(self.model)
        if leaves is None:
            return {}, "the model is not a Sequential chain; channels are quantized but never removed"
        names = {id(m): n.rstrip(".") for n, m in self.model.named_modules()}
        links = {}
        for name, layer in self.layers:
            i = next(i for i, m in enumerate(leaves) if m is layer)
            between, consumer, flatten, ok = [], None, False, True
            for m in leaves[i + 1:]:
                if isinstance(m, WEIGHT_LAYERS):
                    consumer = m
                    break
                if not isinstance(m, PER_CHANNEL):
                    ok = False
                    break
                flatten |= isinstance(m, nn.Flatten)
                between.append(m)
            if ok and consumer is not None:  # the output layer (no consumer) keeps every channel
                links[name] = _Link(between, consumer, names[id(consumer)], flatten)
        return links, None

    # ---------------------------------------------------------------- size
    def size_bits_per_layer(self) -> dict:
        """Q of each compressed layer: sum of b_i * n_i (b clamped at 0)."""
        return {name: float(np.maximum(layer.bits.data, 0).astype(np.float64) @ _per_channel_weights(layer))
                for name, layer in self.layers}

    def size_bits(self) -> float:
        """Q: the value bits of the compressed layers (SPEC.md §3)."""
        return float(sum(self.size_bits_per_layer().values()))

    def _per_bit(self, layer) -> float:
        """The size term's weight of one bit of one weight of ``layer``: 1/N for cost 'bits', P/N_macs for
        'macs' (P: the layer's output positions per sample), their sum for 'bits+macs'."""
        w = 0.0
        if self.cost in ("bits", "bits+macs"):
            w += 1.0 / max(self.n_weights, 1.0)
        if self.cost in ("macs", "bits+macs"):
            w += self._pos[id(layer)] / max(self.n_macs, 1.0)
        return w

    def size_loss(self) -> Tensor:
        """``gamma * Q / N`` as a Tensor (gradients to every ``b``), plus the L1 push on pending channels
        (0 once frozen: nothing moves the bits any more). With ``cost='macs'`` each layer's bits count once per
        output position (bit-operations per sample, ``gamma * Q_macs / N_macs``); ``'bits+macs'`` adds both."""
        if self.frozen:
            return Tensor(np.zeros((), np.float32))
        loss = None
        for name, layer in self.layers:
            per_bit = self._per_bit(layer)
            term = (layer.bits * Tensor((_per_channel_weights(layer) * per_bit).astype(layer.bits.dtype))).sum()
            loss = term if loss is None else loss + term
        loss = loss * self.gamma
        for name, layer in self.layers:
            if self.pending[name].any():
                idx = np.flatnonzero(self.pending[name])
                loss = loss + ops.abs(self._train_constant(name, layer, idx)).sum() * self.l1
        return loss

    # -------------------------------------------------------------- report
    def report(self) -> dict:
        """Bits per layer, % of the fp32 dense network, channels and weights left; index bits separately."""
        rows, value_bits, index_bits, stored = [], 0.0, 0.0, 0.0
        per_layer = self.size_bits_per_layer()
        for name, layer in self.layers:
            n = _per_channel_weights(layer)
            bits = layer.bits.data.astype(np.float64)
            live = (bits > 0) & (n > 0)
            weights = float(n[live].sum())
            rows.append({"layer": name, "channels": int(_out_channels(layer)),
                         "channels_original": self.original_channels[name],
                         "mean_bits": float(bits[live].mean()) if live.any() else 0.0,
                         "weights": int(weights), "value_bits": per_layer[name], "index_bits": _index_bits(layer)})
            value_bits += per_layer[name]
            index_bits += _index_bits(layer)
            stored += weights
        for name, layer in self._other:  # weight layers left in float32
            w = float(_per_channel_weights(layer).sum())
            rows.append({"layer": name, "channels": int(_out_channels(layer)), "channels_original": None,
                         "mean_bits": 32.0, "weights": int(w), "value_bits": 32.0 * w, "index_bits": _index_bits(layer)})
            value_bits += 32.0 * w
            index_bits += _index_bits(layer)
            stored += w
        dense = self.fp32_dense_bits
        return {"layers": rows, "size_bits": value_bits, "index_bits": index_bits,
                "bits_pct": 100.0 * value_bits / dense, "total_bits_pct": 100.0 * (value_bits + index_bits) / dense,
                "weights_pct": 100.0 * stored / (dense / 32.0), "fp32_dense_bits": dense,
                "channels": [r["channels"] for r in rows[:len(self.layers)]]}

    def status(self) -> dict:
        """Per-epoch fields (progress line, ``--json`` history): value bits, % of the fp32 dense weight bits
        (without and with index bits), % of the dense weights left, channels per compressed layer."""
        r = self.report()
        return {"size_bits": round(r["size_bits"], 1), "bits_pct": round(r["bits_pct"], 4),
                "total_bits_pct": round(r["total_bits_pct"], 4), "weights_pct": round(r["weights_pct"], 3),
                "channels": r["channels"]}

    # ---------------------------------------------------------------- step
    @property
    def frozen(self) -> bool:
        """True after ``t_end`` steps: bits and exponents stay as they are while the weights fine-tune."""
        return self.t_end is not None and self.t >= self.t_end

    def step(self):
        """After the model's optimizer step: update b and e, keep b >= 0, remove channels at 0 bits."""
        if self.frozen:
            for _, layer in self.layers:
                layer.bits.grad = layer.exponent.grad = None
            return
        self.t += 1
        self.optimizer.step()
        for _, layer in self.layers:
            np.maximum(layer.bits.data, 0, out=layer.bits.data)
            layer.bits.grad = layer.exponent.grad = None
        if self.remove_channels:
            for name, layer in self.layers:
                if name in self.links:
                    self._remove_zero_channels(name, layer)

    def _remove_zero_channels(self, name, layer):
        zero = layer.bits.data <= 0
        if not zero.any():
            return
        link = self.links[name]
        idx = np.flatnonzero(zero)
        const = self._eval_constant(layer, link, idx)
        train_const = self._train_constant(name, layer, idx).data.astype(np.float64)
        exact_zero = (const == 0) & (train_const == 0)
        foldable = self._foldable(link) if np.isfinite(const).all() else False
        remove = exact_zero | foldable
        if remove.all() and len(idx) == _out_channels(layer):
            remove[0] = False  # a layer keeps at least one channel (at 0 bits it outputs a constant)
        self.pending[name][idx] = ~remove
        if remove.any():
            self._remove(name, layer, link, idx[remove], const[remove])

    def _foldable(self, link) -> bool:
        """Whether a removed channel's constant can be folded exactly into the consumer's bias."""
        c = link.consumer
        if getattr(c, "bias", None) is None:
            return False
        if any(isinstance(m, nn.AvgPool2d) and m.padding not in (0, (0, 0)) for m in link.between):
            return False
        if isinstance(c, (nn.Conv2d, nn.FanInConv2d)):
            return tuple(c.padding) == (0, 0)
        return True

    def _eval_constant(self, layer, link, idx) -> np.ndarray:
        """The eval-mode output of channels ``idx`` once their weights are 0, through the modules after them."""
        bias = getattr(layer, "bias", None)
        v = bias.data[idx].astype(np.float64) if bias is not None else np.zeros(len(idx))
        for m in link.between:
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                scale, shift = m.eval_affine()
                v = v * scale[idx] + shift[idx]
            elif isinstance(m, nn.ReLU):
                v = np.maximum(v, 0.0)
            elif isinstance(m, nn.GELU):
                from scipy import special
                v = v * 0.5 * (1.0 + special.erf(v / math.sqrt(2.0)))
        return v

    def _train_constant(self, name, layer, idx) -> Tensor:
        """The training-mode output of channels ``idx`` at weight 0, as a Tensor of the parameters it depends on
        (batch norm of a constant channel is its beta)."""
        link = self.links.get(name)
        bias = getattr(layer, "bias", None)
        v = bias[idx] if bias is not None else Tensor(np.zeros(len(idx), layer.bits.dtype))
        for m in (link.between if link else []):
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                v = m.bias[idx]
            elif isinstance(m, nn.ReLU):
                v = ops.relu(v)
            elif isinstance(m, nn.GELU):
                v = ops.gelu(v)
        return v

    def _optimizers(self):
        return [o for o in (self.main_optimizer, self.optimizer) if o is not None]

    def _remove(self, name, layer, link, idx, const):
        """Remove output channels ``idx`` of ``layer`` (eval-mode constants ``const``) and the consumer's inputs."""
        n_before = _out_channels(layer)
        consumer = link.consumer
        # 1. fold the constants into the consumer's bias (zero constants add nothing)
        if np.any(const != 0):
            self._fold(consumer, link, n_before, idx, const)
        keep = np.ones(n_before, bool)
        keep[idx] = False
        opts = self._optimizers()
        # 2. the producer, the batch norms between, the consumer's inputs
        layer.select_outputs(keep, opts)
        for m in link.between:
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.select(keep, opts)
        cols = self._consumer_columns(consumer, n_before, keep)
        if isinstance(consumer, nn.FanInConv2d):
            consumer.remove_input_channels(~keep, self.rng, opts)
        elif isinstance(consumer, nn.FanInLinear):
            consumer.remove_inputs(~cols, self.rng, opts)
        else:
            consumer.select_inputs(keep if isinstance(consumer, nn.Conv2d) else cols, opts)
        for m in (layer, consumer):
            if self.srigl is not None and hasattr(self.srigl, "resized"):
                self.srigl.resized(m)
        removed = self.channel_ids[name][idx]
        self.channel_ids[name] = self.channel_ids[name][keep]
        self.pending[name] = self.pending[name][keep]
        self.history.append({"step": self.t, "layer": name, "channels": [int(c) for c in removed],
                             "folded": [float(c) for c in const], "consumer": link.consumer_name})

    @staticmethod
    def _consumer_columns(consumer, n_channels, keep):
        """The consumer's input columns to keep (a flattened channel covers in_features / channels columns)."""
        n_in = consumer.n_in if isinstance(consumer, (nn.FanInLinear, nn.FanInConv2d)) else \
            getattr(consumer, "in_features", getattr(consumer, "in_channels", None))
        if isinstance(consumer, (nn.Conv2d, nn.FanInConv2d)):
            return keep
        per = n_in // n_channels
        if per * n_channels != n_in:
            raise RuntimeError(f"SelfCompression: the consumer has {n_in} inputs for {n_channels} channels.")
        return np.repeat(keep, per)

    def _fold(self, consumer, link, n_channels, idx, const):
        """Add the removed channels' constant contribution to the consumer's bias (exact: see _foldable)."""
        w = consumer.effective_weight().data.astype(np.float64)  # what the forward multiplies by
        if isinstance(consumer, (nn.FanInLinear, nn.FanInConv2d)):
            per_tap = 1 if isinstance(consumer, nn.FanInLinear) else consumer.kernel_size[0] * consumer.kernel_size[1]
            per = consumer.n_in // n_channels if isinstance(consumer, nn.FanInLinear) else per_tap
            channel_of = consumer.indices.astype(np.int64) // per  # the producer channel each slot reads
            c_full = np.zeros(n_channels)
            c_full[idx] = const
            delta = (w * c_full[channel_of] * consumer.active[:, None]).sum(axis=1)
        elif isinstance(consumer, nn.Linear):
            per = consumer.in_features // n_channels
            c_cols = np.zeros(consumer.in_features)
            for i, c in zip(idx, const):
                c_cols[i * per:(i + 1) * per] = c
            delta = w @ c_cols
        else:  # Conv2d without padding: every tap of input channel c reads the constant
            delta = w[:, idx].sum(axis=(2, 3)) @ const
        consumer.bias.data += delta.astype(consumer.bias.data.dtype)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Step, b/e optimizer state, removal history, channel ids, pending channels, RNG."""
        return {"t": self.t, "optimizer": self.optimizer.state_dict(), "history": self.history,
                "channel_ids": {n: a.copy() for n, a in self.channel_ids.items()},
                "pending": {n: a.copy() for n, a in self.pending.items()}, "rng": self.rng.bit_generator.state}

    def check_state(self, sd: dict):
        """Refuse (``ValueError``) a ``state_dict()`` of another model, checked against the layers as built, before
        the model takes the state's shrunk shapes: in each layer the channels kept plus those its removal history
        lists must be the layer's channels (a state of a 784-64-10 run would otherwise make a 784-128-10 model look
        as if compression had removed 64 channels)."""
        ids, history = sd.get("channel_ids"), sd.get("history")
        if not isinstance(ids, dict) or not isinstance(history, list):
            raise ValueError("SelfCompression: the state has no channel ids or removal history: it is corrupt.")
        for name, _ in self.layers:
            n = self.original_channels[name]  # as built: the live layer may have shrunk already (a rewind)
            kept = np.asarray(ids.get(name, ()))
            removed = sum(len(h.get("channels", ())) for h in history if isinstance(h, dict) and h.get("layer") == name)
            ok = kept.ndim == 1 and kept.dtype.kind in "iu" and len(np.unique(kept)) == kept.size and \
                (kept.size == 0 or 0 <= kept.min() and kept.max() < n)
            if not ok or kept.size + removed != n:
                raise ValueError(f"SelfCompression: layer '{name}' has {n} channels, but the state keeps {kept.size} "
                                 f"and removed {removed}: it comes from another model; resume with the run's --sizes "
                                 "and --model.")

    def load_state_dict(self, sd: dict):
        """Load ``state_dict()`` output; load the model's state (its shrunk shapes) first."""
        for name, layer in self.layers:
            if len(sd["channel_ids"][name]) != _out_channels(layer):
                raise ValueError(f"SelfCompression.load_state_dict: layer '{name}' has {_out_channels(layer)} channels "
                                 f"but the state {len(sd['channel_ids'][name])}; load the model's state first.")
        self.t = int(sd["t"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.history = list(sd["history"])
        self.channel_ids = {n: np.asarray(a, np.int64) for n, a in sd["channel_ids"].items()}
        self.pending = {n: np.asarray(a, bool) for n, a in sd["pending"].items()}
        self.rng.bit_generator.state = sd["rng"]
