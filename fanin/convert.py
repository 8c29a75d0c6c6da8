"""Masked dense weights trained elsewhere -> a fanin model (``fanin convert``).

Pruning tools, the SRigL reference code among them, save a sparse model as *dense* tensors with zeros:
a PyTorch ``state_dict`` (``torch.save``; ``.pt``) or a safetensors file. ``convert`` reads one, maps its
keys onto an architecture (``mlp:784,1024,1024,10`` — a ``torch.nn.Sequential`` of ``Linear`` and ``ReLU``
— or ``cnn``, the layer order of ``fanin.models.cnn``: conv, batch norm, ReLU, max-pool per block, then
flatten, linear, ReLU, linear) and builds the fanin model:

- a weight layer with a zero anywhere becomes condensed (``FanInLinear.from_dense`` /
  ``FanInConv2d.from_dense``): every row that is not all zero must hold the same number of non-zeros
  (all-zero rows are ablated neurons), else ``ConvertError`` names the layer and the rows;
- a layer without zeros stays dense;
- ``torch.nn.utils.prune``'s ``weight_orig`` x ``weight_mask`` pairs are multiplied out; ``module.`` and
  ``_orig_mod.`` prefixes (DataParallel, torch.compile) are dropped; batch norms bring their running
  statistics (PyTorch's eps, 1e-5, is fanin's).

Layers are taken in the file's order (safetensors files, which keep no order, by their names with numbers
compared as numbers: ``2.weight`` before ``10.weight``), and every shape is checked against the
architecture. torch and safetensors are optional imports (the ``convert`` extra).
"""
from __future__ import annotations

import dataclasses
import pathlib
import re

import numpy as np

__all__ = ["ConvertError", "Arch", "parse_arch", "read_state_dict", "build_model", "convert"]


class ConvertError(ValueError):
    """Weights that cannot become a fanin model (the message says which layer and why)."""


@dataclasses.dataclass(frozen=True)
class Arch:
    """An architecture to map weights onto: ``kind`` "mlp" (``sizes``) or "cnn" (``widths``: channels..., hidden,
    classes; empty: read from the weights)."""

    kind: str
    sizes: tuple = ()
    widths: tuple = ()
    text: str = ""


def parse_arch(text: str) -> Arch:
    """``mlp:784,1024,1024,10``, ``cnn`` or ``cnn:32,64,128,10`` (channels of each block, hidden, classes)."""
    kind, _, rest = text.strip().partition(":")
    kind = kind.lower()
    try:
        nums = tuple(int(v) for v in re.split(r"[,\-x]", rest) if v.strip()) if rest.strip() else ()
    except ValueError:
        raise ConvertError(f"--arch {text!r}: the widths must be integers, e.g. mlp:784,1024,1024,10.") from None
    if any(n < 1 for n in nums):
        raise ConvertError(f"--arch {text!r}: every width must be positive.")
    if kind == "mlp":
        if len(nums) < 2:
            raise ConvertError(f"--arch {text!r}: an MLP needs its widths, input first, e.g. mlp:784,1024,1024,10.")
        return Arch("mlp", sizes=nums, text=text)
    if kind == "cnn":
        if nums and len(nums) < 3:
            raise ConvertError(f"--arch {text!r}: cnn:C1,...,Cn,HIDDEN,CLASSES (e.g. cnn:32,64,128,10), or just cnn.")
        return Arch("cnn", widths=nums, text=text)
    raise ConvertError(f"--arch {text!r}: the architecture must be mlp:W0,W1,...,Wn or cnn.")


# ------------------------------------------------------------------ reading
def read_state_dict(path) -> dict:
    """The tensors of a PyTorch ``state_dict`` file or a safetensors file, as float32 NumPy arrays by name."""
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        raise ConvertError(f"no weights file at {path}.") from None
    except OSError as exc:
        raise ConvertError(f"cannot read {path} ({exc.strerror or exc}).") from None
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (100 << 20):
        state, ordered = _read_safetensors(path), False
    else:
        state, ordered = _read_torch(path), True
    if not state:
        raise ConvertError(f"{path}: no tensors found.")
    for k, a in state.items():
        if np.asarray(a).dtype.kind == "c":  # the imaginary part would be dropped without a word
            raise ConvertError(f"{path}: tensor '{k}' holds complex numbers; weights must be real.")
    return state if ordered else dict(sorted(state.items(), key=lambda kv: _natural(kv[0])))


def _read_safetensors(path) -> dict:
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise ConvertError(f"{path} is a safetensors file: reading it needs the safetensors package "
                           "(pip install 'fanin[convert]' or pip install safetensors).") from None
    try:
        return {k: v for k, v in load_file(str(path)).items()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ConvertError(f"{path}: cannot read it as safetensors ({_one_line(exc)}); bfloat16 files need "
                           "converting to float32 first.") from None


def _read_torch(path) -> dict:
    try:
        import torch
    except ImportError:
        raise ConvertError(f"{path} looks like a PyTorch file: reading it needs torch (pip install torch, or "
                           "save the weights with safetensors, which fanin reads without torch).") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip/torch errors of all kinds
        raise ConvertError(f"{path}: cannot read it as a PyTorch state_dict ({_one_line(exc)}); save "
                           "model.state_dict() with torch.save.") from None
    state = _find_state_dict(obj, torch)
    if state is None:
        raise ConvertError(f"{path}: holds a {type(obj).__name__}, not a state_dict (a mapping of names to tensors, "
                           "possibly under 'state_dict' or 'model').")
    out = {}
    for k, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.layout != torch.strided:
            raise ConvertError(f"{path}: tensor '{k}' is stored {t.layout} (sparse); save dense tensors with zeros "
                               "(t.to_dense()).")
        if t.device.type == "meta":
            raise ConvertError(f"{path}: tensor '{k}' is on the meta device and holds no values; save the trained "
                               "weights.")
        out[str(k)] = (t.detach().to(torch.float32) if t.is_floating_point() else t.detach()).numpy()
    return out


def _find_state_dict(obj, torch):
    if isinstance(obj, dict):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in ("state_dict", "model_state_dict", "model", "net", "weights"):
            found = _find_state_dict(obj.get(key), torch) if key in obj else None
            if found is not None:
                return found
    return None


def _natural(name: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def _one_line(exc) -> str:
    return " ".join(str(exc).split())[:200]


# ------------------------------------------------------------------ mapping
@dataclasses.dataclass
class _Module:
    name: str
    params: dict

    @property
    def kind(self) -> str:
        p = self.params
        if "running_mean" in p and "running_var" in p:
            return "batchnorm"
        w = p.get("weight")
        if w is not None and w.ndim == 2:
            return "linear"
        if w is not None and w.ndim == 4:
            return "conv"
        return "other"


def _modules(state: dict) -> list:
    """The parameter-holding modules of a state_dict, in order (prune masks applied, wrapper prefixes dropped)."""
    state = {_strip(k): v for k, v in state.items()}
    for key in [k for k in state if k.endswith(".weight_orig")]:
        base = key[: -len("_orig")]
        mask = state.pop(base + "_mask", None)
        orig = state.pop(key)
        state[base] = orig * mask if mask is not None else orig
    mods = {}
    for key, value in state.items():
        name, _, param = key.rpartition(".")
        mods.setdefault(name, _Module(name, {})).params[param] = value
    return [m for m in mods.values() if m.kind != "other"]


def _strip(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def build_model(state: dict, arch: Arch, image_size: int = 28):
    """(fanin ``Sequential``, input shape) holding the weights of ``state`` in the layout ``arch`` names."""
    mods = _modules(state)
    if arch.kind == "mlp":
        return _mlp(mods, arch), None
    return _cnn(mods, arch, image_size)


def _mlp(mods, arch):
    from fanin import nn

    bad = [m.name for m in mods if m.kind != "linear"]
    if bad:
        raise ConvertError(f"--arch {arch.text}: an MLP holds only Linear layers, but the weights have "
                           f"{_kind_list(mods, bad)}; is this --arch cnn?")
    sizes = arch.sizes
    _expect_count(mods, len(sizes) - 1, "Linear layers", arch)
    layers = []
    for i, m in enumerate(mods):
        _expect_shape(m, (sizes[i + 1], sizes[i]), arch)
        layers.append(_linear(m))
        if i < len(mods) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(layers)


def _cnn(mods, arch, image_size):
    from fanin import nn

    convs = [m for m in mods if m.kind == "conv"]
    linears = [m for m in mods if m.kind == "linear"]
    expected = [k for c in convs for k in ("conv", "batchnorm")] + ["linear", "linear"]
    got = [m.kind for m in mods]
    if not convs or got != expected:
        raise ConvertError(f"--arch {arch.text}: fanin.models.cnn's layers are (conv, batch norm) per block, then two "
                           f"linear layers; the weights have {', '.join(f'{m.name} ({m.kind})' for m in mods)}.")
    widths = arch.widths or (*[c.params["weight"].shape[0] for c in convs], *[m.params["weight"].shape[0] for m in linears])
    if len(widths) != len(convs) + 2:
        raise ConvertError(f"--arch {arch.text} names {len(widths) - 2} conv blocks but the weights hold {len(convs)}.")
    c_in, size, layers = convs[0].params["weight"].shape[1], image_size, []
    input_shape = (int(c_in), image_size, image_size)
    for i, conv in enumerate(convs):
        w = conv.params["weight"]
        _expect_shape(conv, (widths[i], c_in, w.shape[2], w.shape[3]), arch)
        bn = mods[mods.index(conv) + 1]
        _expect_shape(bn, (widths[i],), arch, key="running_mean")
        layers += [_conv(conv, padding=((w.shape[2] - 1) // 2, (w.shape[3] - 1) // 2)), _batch_norm(bn),
                   nn.ReLU(), nn.MaxPool2d(2)]
        c_in, size = widths[i], size // 2
    flat = int(c_in * size * size)
    hidden, out = linears
    if hidden.params["weight"].shape[1] != flat:
        raise ConvertError(f"layer '{hidden.name}' reads {hidden.params['weight'].shape[1]} inputs but {c_in} channels "
                           f"of {size}x{size} after the conv blocks make {flat}: is --image-size {image_size} right?")
    _expect_shape(hidden, (widths[-2], flat), arch)
    _expect_shape(out, (widths[-1], widths[-2]), arch)
    layers += [nn.Flatten(), _linear(hidden), nn.ReLU(), _linear(out)]
    return nn.Sequential(layers), input_shape


def _kind_list(mods, names):
    kinds = {m.name: m.kind for m in mods}
    return ", ".join(f"'{n}' ({kinds[n]})" for n in names[:4]) + (" ..." if len(names) > 4 else "")


def _expect_count(mods, n, what, arch):
    if len(mods) != n:
        raise ConvertError(f"--arch {arch.text} has {n} {what} but the weights hold {len(mods)} "
                           f"({', '.join(m.name for m in mods)}).")


def _expect_shape(m, shape, arch, key="weight"):
    got = tuple(m.params[key].shape)
    if got != tuple(shape):
        raise ConvertError(f"layer '{m.name}': {key} has shape {got} but --arch {arch.text} needs {tuple(shape)}.")


def _float(m, key):
    v = m.params.get(key)
    return None if v is None else np.ascontiguousarray(v, dtype=np.float32)


def _condensed(cls, m, *args):
    """``cls.from_dense`` of module ``m``'s weight, its errors naming the layer."""
    try:
        return cls.from_dense(_float(m, "weight"), _float(m, "bias"), *args)
    except (ValueError, TypeError) as exc:
        msg, prefix = str(exc), f"{cls.__name__}.from_dense: "
        msg = msg[len(prefix):] if msg.startswith(prefix) else msg
        raise ConvertError(f"layer '{m.name}' (weight {tuple(m.params['weight'].shape)}): {msg}") from None


def _linear(m):
    from fanin import nn

    w, b = _float(m, "weight"), _float(m, "bias")
    if np.count_nonzero(w) < w.size:
        return _condensed(nn.FanInLinear, m)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, seed=0)
    layer.weight.data[...] = w
    if b is not None:
        layer.bias.data[...] = b
    return layer


def _conv(m, padding):
    from fanin import nn

    w, b = _float(m, "weight"), _float(m, "bias")
    if np.count_nonzero(w) < w.size:
        return _condensed(nn.FanInConv2d, m, 1, padding)
    layer = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], padding=padding, bias=b is not None, seed=0)
    layer.weight.data[...] = w
    if b is not None:
        layer.bias.data[...] = b
    return layer


def _batch_norm(m):
    from fanin import nn

    n = m.params["running_mean"].shape[0]
    bn = nn.BatchNorm2d(n)
    for key in ("weight", "bias", "running_mean", "running_var"):
        v = _float(m, key)
        if key == "running_var" and v is not None and not np.all(v >= 0):  # a variance: NaN or < 0 is corrupt
            raise ConvertError(f"batch norm of {n} channels: running_var holds a negative or NaN value; the "
                               "statistics are corrupt (re-save them from the trained model).")
        if v is not None:
            target = getattr(bn, key)  # a Parameter (weight, bias) or a NumPy buffer (running statistics)
            (target if isinstance(target, np.ndarray) else target.data)[...] = v
    return bn


# ------------------------------------------------------------------ all of it
def convert(src, arch, out, *, image_size: int = 28, quantize: int | None = None):
    """Read ``src``, build the model for ``arch`` (text or ``Arch``), write ``out``; returns the ``Network``."""
    import fanin
    from fanin import runtime
    from fanin.io import save

    arch = parse_arch(arch) if isinstance(arch, str) else arch
    model, input_shape = build_model(read_state_dict(src), arch, image_size)
    plan = runtime.lower(model, input_shape)
    if quantize:
        plan = runtime.quantize(plan, quantize)
    net = runtime.Network(plan, {"fanin": fanin.__version__, "converted_from": pathlib.Path(src).name,
                                 "arch": arch.text, "quantize": f"int{quantize}" if quantize else None})
    save(net, out)
    return net
