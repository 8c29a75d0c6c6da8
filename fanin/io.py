"""The ``.fanin`` model file: save and load, validated, no pickle.

Layout (little-endian):

    bytes 0-7    magic  b"FANIN\\x00\\r\\n"  (the \\r\\n catches text-mode mangling)
    8-11         format version (u32)               12-15  flags (u32, 0)
    16-23        header offset (u64, = 96)          24-31  header length (u64)
    32-39        data offset (u64, 64-aligned)      40-47  data length (u64)
    48-55        file length (u64)                  56-63  reserved (0)
    64-95        SHA-256 of bytes 0-63 and of everything from byte 96 to the end
    96-          the header: UTF-8 JSON — the plan (``fanin.runtime.plan``) with every array replaced by
                 a reference into the table ``arrays``: name -> dtype, shape, encoding, offset, length —,
                 training metadata (``meta``)
    data offset- the arrays, each starting on a 64-byte boundary

Encodings: ``raw`` (the array's bytes, C order: memory-mappable), ``nibbles`` (4-bit integers, two
per byte: an SRigL + self-compressed layer's values at <= 4 bits), ``rice`` (the indices of a
condensed layer as Rice-coded gaps between the sorted inputs of each row: about log2(n_in / k) + 1.5
bits per index instead of 16).

``load`` checks everything before any kernel sees an array: magic, version (a newer file says so),
every length and offset against the file's size, the checksum, the JSON, the array table (dtypes,
shapes, bounds, no overlaps), each decoded array, and then the whole plan (``plan.check``: shapes,
index ranges, strictly increasing rows, bit ranges, finite values). Anything wrong raises
``FormatError`` (a ``ValueError``) saying what; nothing half-loaded is ever returned.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap as _mmap
import os
import pathlib
import stat
import struct

import numpy as np

from fanin._atomic import write_atomic
from fanin.kernels._jit import njit
from fanin.runtime.plan import FormatError, check

__all__ = ["save", "load", "FormatError", "FORMAT_VERSION", "read_header"]

MAGIC = b"FANIN\x00\r\n"
FORMAT_VERSION = 1
FIXED = 96
ALIGN = 64
MAX_HEADER = 16 << 20
_FIXED_FMT = "<8sIIQQQQQQ"  # magic, version, flags, header off/len, data off/len, file len, reserved
_DTYPES = {"int8", "int16", "int32", "uint8", "float32"}


# ------------------------------------------------------------------ encodings
@njit(cache=True)
def _rice_encode(idx, r, out):
    """Rice-code the gaps of each row of ``idx`` into ``out`` (uint8, zeroed, big enough); returns bytes used."""
    pos = 0  # bit position
    for j in range(idx.shape[0]):
        prev = -1
        for t in range(idx.shape[1]):
            g = np.int64(idx[j, t]) - prev - 1
            prev = np.int64(idx[j, t])
            q = g >> r
            for _ in range(q):  # q ones, then a zero
                out[pos >> 3] |= np.uint8(1 << (pos & 7))
                pos += 1
            pos += 1
            for b in range(r):  # then r low bits, least significant first
                if (g >> b) & 1:
                    out[pos >> 3] |= np.uint8(1 << (pos & 7))
                pos += 1
    return (pos + 7) >> 3


@njit(cache=True)
def _rice_decode(data, r, n_in, out):
    """Decode rows of ``out`` (n, k) from ``data``; returns 0, or -1 for data that does not decode to rows of
    strictly increasing inputs in [0, n_in) within ``data`` (never reads outside it)."""
    n_bits = data.size * 8
    pos = 0
    for j in range(out.shape[0]):
        prev = -1
        for t in range(out.shape[1]):
            q = 0
            while True:
                if pos >= n_bits:
                    return -1
                bit = (data[pos >> 3] >> (pos & 7)) & 1
                pos += 1
                if bit == 0:
                    break
                q += 1
                if q > n_in:
                    return -1
            g = np.int64(q) << r
            for b in range(r):
                if pos >= n_bits:
                    return -1
                g |= np.int64((data[pos >> 3] >> (pos & 7)) & 1) << b
                pos += 1
            v = prev + 1 + g
            if v >= n_in:
                return -1
            out[j, t] = v
            prev = v
    return 0


def _rice_parameter(idx, n_in) -> int:
    k = idx.shape[1]
    mean_gap = max(n_in / max(k, 1) - 1.0, 0.5)
    return int(max(0, min(15, round(math.log2(mean_gap * math.log(2))))))


def _encode(name, a: np.ndarray, spec: dict):
    """(bytes, table entry) of one array."""
    enc = spec.get("encoding", "raw")
    entry = {"dtype": a.dtype.name, "shape": list(a.shape), "encoding": enc}
    if enc == "raw":
        return np.ascontiguousarray(a).tobytes(), entry
    if enc == "nibbles":
        flat = np.ascontiguousarray(a, np.int8).reshape(-1)
        if flat.size % 2:
            flat = np.concatenate([flat, np.zeros(1, np.int8)])
        u = flat.view(np.uint8) & 0x0F
        return (u[0::2] | (u[1::2] << 4)).astype(np.uint8).tobytes(), entry
    if enc == "rice":
        r = _rice_parameter(a, spec["n_in"])
        bound = a.size * ((spec["n_in"] >> r) + 2 + r) // 8 + 16
        buf = np.zeros(bound, np.uint8)
        used = _rice_encode(np.ascontiguousarray(a), r, buf)
        entry.update(rice=r, n_in=int(spec["n_in"]))
        return buf[:used].tobytes(), entry
    raise ValueError(f"unknown encoding {enc!r} for {name}")


def _decode(name, entry, buf, mmapped):
    """The array an entry describes, from its bytes ``buf`` (a memoryview slice); FormatError if it does not fit."""
    where = f"array '{name}'"
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: its table entry must be an object.")
    dtype, shape, enc = entry.get("dtype"), entry.get("shape"), entry.get("encoding", "raw")
    if dtype not in _DTYPES:
        raise FormatError(f"{where}: dtype {dtype!r} is not one of {sorted(_DTYPES)}.")
    if (not isinstance(shape, list) or len(shape) > 4
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= 1 << 28 for s in shape)):
        raise FormatError(f"{where}: shape {shape!r} must be a list of up to 4 sizes.")
    count = math.prod(shape)
    dt = np.dtype(dtype).newbyteorder("<")
    if enc == "raw":
        if len(buf) != count * dt.itemsize:
            raise FormatError(f"{where}: {len(buf)} bytes for a {dtype} array of shape {shape}.")
        a = np.frombuffer(buf, dt, count).reshape(shape)
        if not dt.isnative:  # a big-endian host: the kernels want native order
            return a.astype(dt.newbyteorder("="))
        return a if mmapped else a.copy()
    if enc == "nibbles":
        if dtype != "int8" or len(buf) != (count + 1) // 2:
            raise FormatError(f"{where}: nibble-packed data must be int8 with {(count + 1) // 2} bytes.")
        u = np.frombuffer(buf, np.uint8)
        out = np.empty(2 * u.size, np.int8)
        out[0::2] = ((u & 0x0F) ^ 8).astype(np.int8) - 8
        out[1::2] = ((u >> 4) ^ 8).astype(np.int8) - 8
        return out[:count].reshape(shape)
    if enc == "rice":
        r, n_in = entry.get("rice"), entry.get("n_in")
        if (dtype not in ("int16", "int32") or len(shape) != 2 or not isinstance(r, int) or not 0 <= r <= 15
                or not isinstance(n_in, int) or not 1 <= n_in <= np.iinfo(dtype).max + 1):
            raise FormatError(f"{where}: a Rice-coded index array needs a 2-D int16/int32 shape, 'rice' in [0, 15] "
                              "and 'n_in'.")
        if count * (r + 1) > 8 * len(buf):  # every code takes >= r + 1 bits: refuse before allocating
            raise FormatError(f"{where}: {len(buf)} bytes cannot hold {count} Rice-coded indices of shape {shape}.")
        out = np.empty(shape, np.int64)
        if count and _rice_decode(np.frombuffer(buf, np.uint8), r, n_in, out) != 0:
            raise FormatError(f"{where}: the Rice-coded indices are corrupt (they do not decode to rows of strictly "
                              f"increasing inputs in [0, {n_in})).")
        return out.astype(dtype)
    raise FormatError(f"{where}: unknown encoding {enc!r}.")


# ----------------------------------------------------------------------- save
def _pad(n):
    return -n % ALIGN


def save(obj, path, *, input_shape=None, meta=None) -> pathlib.Path:
    """Write a model (compiled first; ``input_shape`` for convolutional models) or a ``Network`` to ``path``:
    atomically (a temporary file in the same folder, fsync, rename), checksummed, no pickle."""
    from fanin.runtime import Network, compile as compile_model

    net = obj if isinstance(obj, Network) else compile_model(obj, input_shape=input_shape)
    plan, arrays, parts, offset = _plan_refs(net.plan)
    header = {"format": "fanin", "version": FORMAT_VERSION, "plan": plan, "arrays": arrays,
              "meta": {**net.meta, **(meta or {})}}
    hjson = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    data_off = FIXED + len(hjson) + _pad(FIXED + len(hjson))
    body = hjson + b"\0" * _pad(FIXED + len(hjson)) + b"".join(parts)
    total = FIXED + len(body)
    fixed = struct.pack(_FIXED_FMT, MAGIC, FORMAT_VERSION, 0, FIXED, len(hjson), data_off, offset, total, 0)
    digest = hashlib.sha256(fixed + body).digest()
    return write_atomic(path, lambda f: f.write(fixed + digest + body))


def _plan_refs(plan):
    """The plan with arrays replaced by names, the array table, the data parts and the data length."""
    ops, table, parts, offset = [], {}, [], 0
    for i, op in enumerate(plan["ops"]):
        op = dict(op)
        if "arrays" in op:
            refs = {}
            for key, a in op["arrays"].items():
                name = f"{i}/{key}"
                spec = {}
                if key == "indices":
                    spec = {"encoding": "rice", "n_in": op["n_in"]}
                elif key == "qvalues" and op["bits"] == 4:
                    spec = {"encoding": "nibbles"}
                data, entry = _encode(name, a, spec)
                if spec.get("encoding") == "rice" and len(data) >= a.nbytes:  # Rice coding did not pay: raw
                    data, entry = _encode(name, a, {})
                entry.update(offset=offset, length=len(data))
                table[name] = entry
                parts += [data, b"\0" * _pad(len(data))]
                offset += len(data) + _pad(len(data))
                refs[key] = name
            op["arrays"] = refs
        ops.append(op)
    return {"input_shape": list(plan["input_shape"]), "ops": ops}, table, parts, offset


# ----------------------------------------------------------------------- load
def read_header(buf) -> tuple[dict, int]:
    """(header JSON, data offset) of a model file's bytes, after checking its frame and checksum."""
    n = len(buf)
    if n < FIXED:
        raise FormatError(f"the file is {n} bytes long, shorter than a fanin model file's {FIXED}-byte frame "
                          "(truncated, or not a model file).")
    magic, version, flags, h_off, h_len, d_off, d_len, f_len, reserved = struct.unpack_from(_FIXED_FMT, buf, 0)
    if magic != MAGIC:
        raise FormatError("not a fanin model file (wrong magic bytes); export one with fanin.save or `fanin export`.")
    if version > FORMAT_VERSION:
        raise FormatError(f"the file has format version {version}, written by a newer fanin; this fanin reads up to "
                          f"version {FORMAT_VERSION}: upgrade fanin to load it.")
    if version < 1 or flags != 0 or reserved != 0:
        raise FormatError(f"unsupported format version {version} / flags {flags} (corrupt frame).")
    if f_len != n:
        raise FormatError(f"the file is {n} bytes long but says it has {f_len} (truncated or extended).")
    if (h_off != FIXED or not 2 <= h_len <= MAX_HEADER or d_off != FIXED + h_len + _pad(FIXED + h_len)
            or d_off + d_len != n):
        raise FormatError("the file's header and data lengths do not add up (corrupt frame).")
    digest = hashlib.sha256(bytes(buf[:64])).copy()
    digest.update(buf[FIXED:])
    if digest.digest() != bytes(buf[64:96]):
        raise FormatError("the checksum does not match: the file is corrupted (re-export or re-download it).")
    try:
        header = json.loads(bytes(buf[FIXED:FIXED + h_len]).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, a 5000-digit integer (all ValueErrors)
        raise FormatError(f"the header is not valid JSON ({exc}).") from None
    if not isinstance(header, dict) or header.get("format") != "fanin" or header.get("version") != version:
        raise FormatError("the header does not describe a fanin model of this version.")
    return header, d_off


def load(path, *, mmap: bool = True, nan_policy: str = "raise", device: str = "cpu", activations: str = "float32"):
    """The ``Network`` stored at ``path``, validated completely first (module docstring).

    ``activations="int8"``: run it with 8-bit activations (``fanin.runtime.Network``; CPU only).

    ``device="cuda"``: the network on the GPU (``Network.to("cuda")``: a ``fanin.device.DeviceNetwork``).

    ``mmap=True`` maps the file and uses the float arrays in place (workers of a pre-fork server share
    the pages; the file must then not be modified in place while it is in use — fanin.save never does,
    it replaces files atomically); index arrays are always decoded into private memory.
    """
    from fanin.runtime import Network

    if device not in ("cpu", "cuda"):
        raise ValueError(f"load: device must be 'cpu' or 'cuda', got {device!r}.")
    if activations != "float32" and device != "cpu":
        raise ValueError("load: activations='int8' runs on the CPU only; use device='cpu'.")
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):  # /dev/zero would be read for ever
                raise FormatError(f"{path} is not a regular file (a device, FIFO or socket); give a model file.")
            size = st.st_size
            if mmap and size >= FIXED:
                buf = memoryview(_mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ))
            else:
                buf = memoryview(f.read())
    except IsADirectoryError:
        raise FormatError(f"{path} is a directory, not a model file.") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"no model file at {path}; check the path (fanin export writes one).") from None
    except PermissionError:
        raise PermissionError(f"{path}: permission denied; this user cannot read the model file.") from None
    try:
        header, d_off = read_header(buf)
        plan = _resolve(header, buf, d_off, mmapped=mmap)
        meta = header.get("meta", {})
        if not isinstance(meta, dict):
            raise FormatError("'meta' must be an object.")
        net = Network(plan, meta, nan_policy=nan_policy, activations=activations)
    except FormatError as exc:
        raise FormatError(f"{path}: {exc}") from None
    return net if device == "cpu" else net.to(device)


def _resolve(header, buf, d_off, mmapped):
    table, plan = header.get("arrays"), header.get("plan")
    if not isinstance(table, dict) or not isinstance(plan, dict) or not isinstance(plan.get("ops"), list):
        raise FormatError("the header must hold 'plan' (with 'ops') and 'arrays'.")
    data_len = len(buf) - d_off
    spans = []
    for name, e in table.items():
        off, length = (e.get("offset"), e.get("length")) if isinstance(e, dict) else (None, None)
        if (not isinstance(off, int) or not isinstance(length, int) or isinstance(off, bool) or off < 0 or length < 0
                or off % ALIGN or off + length > data_len):
            raise FormatError(f"array '{name}': offset {off!r} / length {length!r} fall outside the data.")
        spans.append((off, off + length, name))
    spans.sort()
    for (a0, a1, na), (b0, b1, nb_) in zip(spans, spans[1:]):
        if b0 < a1:
            raise FormatError(f"arrays '{na}' and '{nb_}' overlap.")
    used = set()
    ops = []
    for i, op in enumerate(plan["ops"]):
        if not isinstance(op, dict):
            raise FormatError(f"op {i} must be an object.")
        op = dict(op)
        if "arrays" in op:
            refs = op["arrays"]
            if not isinstance(refs, dict):
                raise FormatError(f"op {i}: 'arrays' must map names to array references.")
            arrays = {}
            for key, name in refs.items():
                if not isinstance(name, str) or name not in table or name in used:
                    raise FormatError(f"op {i}: array reference {name!r} is unknown or used twice.")
                used.add(name)
                e = table[name]
                arrays[key] = _decode(name, e, buf[d_off + e["offset"]:d_off + e["offset"] + e["length"]], mmapped)
            op["arrays"] = arrays
        ops.append(op)
    plan = {**plan, "ops": ops}
    check(plan)
    return plan
