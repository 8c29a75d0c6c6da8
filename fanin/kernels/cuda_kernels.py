"""The ``numba.cuda`` kernels behind ``fanin.kernels.cuda`` (imported only when CUDA is asked for).

Pure kernels on flat device arrays; ``fanin.kernels.cuda`` chooses the launch configuration from the shapes and
owns every layout. Kernels whose shape of work is a compile-time choice (samples per lane, warps per block, rows
per warp, weight encoding, float width) come from small factories, cached per key, so each variant is one
specialised kernel with its shared-memory tiles sized at compile time.

Notation: a *row* is an output of the sparse product: a neuron for the forward, an input for dx (the transposed,
CSC structure), so both run the same kernel. ``ptr`` (n_rows + 1) are CSR row pointers into ``idx``/``vals``
(``ptr[j] = j*k`` for a condensed layer). Samples are read through strides, ``x[b, i] = x[b*sb + i*si]``: row-major
``(B, n)`` has ``(sb, si) = (n, 1)``, the transposed panel layout ``(n, Bp)`` has ``(1, Bp)``.

Launch configurations (derived in ``fanin.kernels.cuda``; numbers for a 4096x4096 layer at 90 %, k = 409):

``rows_kernel`` -- small batches (B < 8), the latency path. One warp per row, 4 warps (128 threads) per block,
  ``ceil(n_rows / 4)`` blocks. Lanes stride over the row's entries (coalesced ``idx``/``vals`` reads), gather
  ``x[b, idx]`` (L1/L2 hits: x is 16 KiB at batch 1), and reduce with 5 shuffles per sample. Bytes: the layer's
  ``nnz * (2 + 4)`` (int16 indices + float32 values; 1 or 0.5 bytes a value for int8 / 4-bit) read once:
  10 MB at batch 1, ~3 us at H100 HBM bandwidth, against 67 MB for a dense float32 GEMV. FLOPs: 2 * nnz * B.

``tile_kernel`` -- batched forward (and dx over the transposed structure). Grid ``(ceil(B / BT), ceil(n_rows /
  RB))``, ``32 * WARPS`` threads. A block owns ``RB = WARPS * RPW`` rows and a batch tile of ``BT = 32 * SPL``
  samples. It walks the inputs in chunks of ``CH`` rows: the block loads the chunk's ``CH x BT`` tile of x into
  shared memory (coalesced along whichever axis is contiguous; row stride ``BT + 1`` so both the transposing store
  and the reads are bank-conflict free; row-major x goes warp per sample, lanes along inputs, with no integer
  division in the index math: a 64-bit division per element cost more than the multiply-adds), then each warp
  takes its rows one by one: the row's entries that fall in the chunk (``seg``, from sorted rows) are read 32 at a
  time with one coalesced load of ``idx`` and ``vals``, broadcast by ``shfl`` (offset and weight), and each lane
  accumulates ``SPL`` samples ``a[q] += w * xs[off, 32q + lane]`` -- a conflict-free shared load per 32
  multiply-adds. Per-row sums live in a shared ``RB x BT`` accumulator tile, written out once at the end
  (coalesced along rows for a row-major output, along samples for the panel layout, whose padding columns are
  written as zeros).
  Traffic at B = 256 (SPL 2, WARPS 8, RPW 8: RB 64, CH 125, 256 blocks): shared-memory loads 429 M = nnz * B (one
  per multiply-add, 4 B each, the floor for a gather formulation, ~60 us at 128 B/clk/SM), shuffles 2 per entry
  per 64 samples, x tiles from L2 ``n_rows / RB * B * n_in * 4`` = 256 MB, idx+vals 4 * 6 * nnz = 40 MB.
  FLOPs 2 * nnz * B = 0.86 GFLOP (dense: 8.6 GFLOP).

``panel_kernel`` -- the batched forward and dx of large layers (from 512 rows, on a GPU whose blocks may opt in to
  more than 48 KiB of shared memory: ``fanin.kernels.cuda.PANEL_PLAN``). The tile kernel's scheme with what held it
  back removed: the x tile lives in *dynamic* shared memory sized at launch, each thread keeps its rows' running
  sums in its own storage for the whole pass (a local array: registers, or L1-cached local memory touched once per
  row and chunk where NVVM keeps it there; no shared accumulator tile, so all of the shared memory holds x), the tile is
  staged with four independent loads in flight per thread (the tile kernel's load-then-store loop waited for every
  load), the warp's rows' chunk segments, scales and first entries are read with one load each and broadcast by
  ``shfl``, and the inner loop takes two entries a step into two sets of sums, with unsigned shared offsets (Numba
  adds a negative-index wrap-around to signed ones: four more instructions per load). Sums are staged through the
  tile at the end and written coalesced as the tile kernel writes them. Above 48 KiB a kernel must opt in
  (``opt_in_shared``, once per signature).
  Default (2 samples a lane, 16 warps, 8 rows a warp, 200 KiB): BT 64, RB 128, CH 787 input rows (6 chunks at
  n_in = 4096, against the tile kernel's 33), one 512-thread block an SM; grid at 4096 rows, batch 256:
  4 x 32 = 128 blocks. Traffic there: x tiles from L2 ``n_rows / RB * B * n_in * 4`` = 128 MB; shared loads and
  shuffles 13.4 M warp instructions each (one load per 32 multiply-adds, two shuffles per entry per 64 samples),
  about 100 us of an H200's shared-memory pipe (1 wavefront a clock an SM, 132 SMs, 1.98 GHz) -- the floor of this
  formulation; measured 204 us (bench/RESULTS.md). Halving the shuffles (one 64-bit broadcast of offset and weight
  staged in shared memory) is the next step.

``dvals_tile_kernel`` -- value gradient ``dv[e] = sum_b dy[b, row] * x[b, idx[e]]``. Grid ``ceil(n_rows / RB)``
  blocks that loop over batch tiles and input chunks (deterministic: a block owns its rows' outputs; no atomics).
  RB is chosen so the grid covers the SMs (4096 rows on a 132-SM H100: 2 rows a warp, RB 16, 256 blocks).
  The block stages its rows' dy tile and the chunk's x tile in shared memory; per entry a lane forms
  ``SPL`` products of its samples, and four entries at a time are summed across the warp in 11 shuffles (a joint
  butterfly: halves exchange different partial sums, so four totals cost about one full reduction). Loads: one
  conflict-free shared load per 32 multiply-adds, as the forward.

``gemm_kernel`` -- dense ``C = A @ B (+ C) (+ bias)`` with arbitrary strides (dense layers, ``dense_grad``, growth
  scores ``dy^T x``): 64 x 64 output tiles, K in steps of 16 through shared memory, 256 threads with 4 x 4 outputs
  each, grid ``(ceil(N/64), ceil(M/64))``. A plain SIMT SGEMM (not tuned; cuBLAS is ~3-5x faster): it serves the
  small classifier layers and the per-update growth scores.

``topc_kernel`` -- growth candidates: one block (256 threads) per neuron row of ``|G|``. A 4-pass, 8-bit radix
  select over the float bits (non-negative floats order as their bit patterns) finds the c-th largest free score;
  a block-wide scan then writes, in input order, every score above it and the first ties by input index (the CPU's
  tie rule). Held inputs were marked -1 (never selected). Work O(n_in) per row.

Element-wise kernels: grid-stride loops, 256 threads, ``min(ceil(n / 256), 4096)`` blocks. Reductions that must be
deterministic (the loss) use one block and a shared-memory tree.
"""
from __future__ import annotations

import ctypes
import functools
import math
import threading

import numba
import numpy as np
from numba import cuda

FULL = 0xFFFFFFFF
SMEM_BYTES = 48 * 1024  # static shared memory per block without an opt-in
# panel_kernel's plan for large layers: samples a lane, warps, rows a warp, dynamic shared bytes (fanin.kernels.cuda
# uses it as PANEL_PLAN; the measurements behind it: its _plan)
DEFAULT_PANEL_PLAN = (2, 16, 8, 200 * 1024)
EW_THREADS = 256

_cache: dict = {}


class Kernel:
    """A launchable kernel with a key that rebuilds it (``build(key)``): ``kernel[grid, block](*args)``.

    ``Kernel.RECORD``, when a list, receives ``(key, argument types)`` of every launch (the PTX tests compile
    exactly the signatures the dispatcher uses); ``Kernel.DRY`` skips the launches themselves.

    On a GPU (``FAST_LAUNCH``, set by ``fanin.kernels.cuda`` outside the simulator) a launch skips Numba's per-call
    dispatch: Numba's own path types every argument (``typeof``), looks up the overload, builds a strided-memory-view
    shim per array, converts every argument with ``_prepare_args`` (importing four modules per array) and makes a
    new ``LaunchConfig``: tens of microseconds per launch, growing with the arguments (19 for the tile kernel),
    more than the kernel itself at batch 1 (a batch-1 forward, one launch, took 196 us of host time on an H100
    machine with Numba's path; ``bench/bench_cuda.py`` prints both paths' host time). ``_Launch`` objects are cached
    per launch configuration; the first launch of each argument signature goes through Numba (it compiles), then the
    resolved kernel, its cuda.core ``LaunchConfig`` and stream are kept and later launches marshal the arguments
    directly (``_marshal``: one pass, the same parameter list ``_prepare_args`` produces, checked against it when
    the entry is made: on any difference that signature keeps Numba's path)."""

    RECORD = None
    DRY = False
    __slots__ = ("key", "kern", "_launches")

    def __init__(self, key, kern):
        self.key, self.kern = key, kern
        self._launches = {}

    def __getitem__(self, config):
        try:
            return self._launches[config]
        except KeyError:
            if len(self._launches) > 256:
                self._launches.clear()
            launch = self._launches[config] = _Launch(self, config)
            return launch
        except TypeError:  # an unhashable configuration (lists): not cached
            return _Launch(self, config)


# Fast launches (see Kernel): on by default on a GPU; FANIN_FAST_LAUNCH=0 in the environment turns them off.
FAST_LAUNCH = False
_FAST_THREAD = None  # the thread whose context the entries' kernels were loaded in: other threads take Numba's path
FAST_STATS = {"fast": 0, "numba": 0, "entries": 0, "refused": 0}
_REFUSED: list = []  # (kernel key, reason) of signatures kept on Numba's path (at most 32)


class _Launch:
    __slots__ = ("k", "config", "cfg", "fast", "smem")

    def __init__(self, k, config):
        self.k, self.config = k, config
        self.cfg = None  # Numba's configured launcher, made on first use
        self.fast = {}  # signature key -> (cuda.core kernel, LaunchConfig, stream) or None (Numba's path)
        # dynamic shared memory past the 48 KiB every kernel may use: the kernel must opt in (Numba does not)
        big = isinstance(config, tuple) and len(config) >= 4 and config[3] > SMEM_BYTES
        self.smem = int(config[3]) if big else 0

    def __call__(self, *args):
        if Kernel.RECORD is not None:
            Kernel.RECORD.append((self.k.key, tuple(_describe(a) for a in args)))
        if Kernel.DRY:
            return
        if FAST_LAUNCH and threading.get_ident() == _FAST_THREAD:
            sig, params = _marshal(args)
            if sig is not None:
                entry = self.fast.get(sig, False)
                if entry:
                    _core_launch(entry[2], entry[1], entry[0], *params)
                    FAST_STATS["fast"] += 1
                    return
            cfg = self.cfg
            if cfg is None:  # Numba's configured launcher (immutable on a GPU; the simulator's is the kernel itself)
                cfg = self.cfg = self.k.kern[self.config]
            if self.smem:
                opt_in_shared(self.k.kern, args, self.smem)
            cfg(*args)
            FAST_STATS["numba"] += 1
            if sig is not None and entry is False:
                self.fast[sig] = _fast_entry(self.k, cfg, args, params)
            return
        if self.smem and ON_GPU:
            opt_in_shared(self.k.kern, args, self.smem)
        self.k.kern[self.config](*args)
        FAST_STATS["numba"] += 1




# True when fanin.kernels.cuda runs on a real GPU (it sets this; the simulator and PTX-only use leave it False)
ON_GPU = False
_OPTED: set = set()


def opt_in_shared(disp, args, nbytes: int):
    """Let the kernel ``disp`` compiles for ``args`` launch with ``nbytes`` of dynamic shared memory: above 48 KiB
    the driver refuses a launch unless the function's CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES was raised,
    and Numba's launcher does not raise it (numba-cuda issue #94). Compiles the kernel if needed; once per
    (kernel, argument types, size)."""
    argtypes = tuple(disp.typeof_pyval(a) for a in args)
    key = (id(disp), argtypes, int(nbytes))
    if key in _OPTED:
        return
    from numba.cuda.cudadrv import driver as drv

    fn = disp.compile(argtypes)._codelibrary.get_cufunc()
    attr = drv.binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    drv.driver.cuKernelSetAttribute(attr, int(nbytes), fn.handle, fn.device.id)
    _OPTED.add(key)


_core_launch = None  # cuda.core's launch, as Numba's dispatcher imports it (set by _fast_entry)
_DeviceNDArray = None
_C_INT = {}  # numba integer type name -> ctypes class


def _marshal(args):
    """(signature key, kernel parameters) of a launch, or (None, None) when an argument is not one the fast path
    knows (then Numba launches it). The parameters are those Numba's ``_Kernel._prepare_args`` produces: per array
    meminfo 0, parent 0, size, itemsize, data pointer, shape, strides (bytes); Python ints as ctypes int64, floats
    as double, NumPy scalars as their ctypes type, booleans as they are."""
    if _DeviceNDArray is None:
        return None, None
    sig = []
    params = []
    for a in args:
        t = type(a)
        if t is _DeviceNDArray:
            d = a.__dict__  # an array's shape, strides and memory never change: its part is kept on it
            c = d.get("_fanin_kp")
            if c is None:
                c = d["_fanin_kp"] = _array_part(a)
            if c is False:
                return None, None
            sig += c[0]
            params += c[1]
        elif t is int:
            sig.append(int)
            params.append(ctypes.c_int64(a))
        elif t is bool or t is np.bool_:
            sig.append(t)
            params.append(a)
        elif t is float or t is np.float64:
            sig.append(t)
            params.append(ctypes.c_double(a))
        elif t is np.float32:
            sig.append(t)
            params.append(ctypes.c_float(a))
        elif t is np.int64 or t is np.int32 or t is np.uint32 or t is np.uint64:
            sig.append(t)
            params.append(_C_INT[t](a))
        else:
            return None, None
    return tuple(sig), params


def _array_part(a):
    """(signature items, parameters) of a device array argument, or False (0-d: Numba's path)."""
    strides = a.strides
    nd = len(strides)
    if nd == 1:
        n = a.size
        s = strides[0]
        itemsize = a.dtype.itemsize
        layout = "C" if (n == 0 or s == itemsize or (n == 1 and s != 0)) else "A"
        return (a.dtype, layout), (0, 0, n, itemsize, a.device_ctypes_pointer.value, n, s)
    if nd == 0:
        return False
    return ((a.dtype, a._numba_type_),
            (0, 0, a.size, a.dtype.itemsize, a.device_ctypes_pointer.value, *a.shape, *strides))


def _sig_mismatch(args, argtypes):
    """Why the signature key ``_marshal`` made for args would not name exactly ``argtypes`` (Numba's typing of
    them), or '' -- so one key never stands for two overloads (e.g. a strided 1-D array is layout 'A')."""
    want = {int: "int64", bool: "bool", np.bool_: "bool", float: "float64", np.float64: "float64",
            np.float32: "float32", np.int64: "int64", np.int32: "int32", np.uint32: "uint32", np.uint64: "uint64"}
    for i, (a, ty) in enumerate(zip(args, argtypes)):
        if type(a) is _DeviceNDArray:
            if not isinstance(ty, numba.types.Array) or ty.ndim != a.ndim or ty.dtype != numba.from_dtype(a.dtype):
                return f"argument {i}: {ty} is not the array type the key assumes"
            if a.ndim == 1:
                n, s, itemsize = a.size, a.strides[0], a.dtype.itemsize
                layout = "C" if (n == 0 or s == itemsize or (n == 1 and s != 0)) else "A"
                if ty.layout != layout:
                    return f"argument {i}: layout {ty.layout}, key {layout}"
        elif str(ty) != want.get(type(a)):
            return f"argument {i}: {type(a).__name__} typed {ty}"
    return ""


def _same_param(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, ctypes._SimpleCData):
        return a.value == b.value
    return a == b


def _fast_entry(k: Kernel, cfg, args, params):
    """The fast-launch entry of a signature just launched through Numba, or None (it stays on Numba's path)."""
    global _core_launch
    try:
        from numba.cuda import dispatcher as nd

        disp = k.kern
        if (disp.specialized or getattr(disp, "_launch_config_sensitive", False) or disp.targetoptions.get("extensions")
                or cfg.pre_launch_callbacks):
            return _refuse(k, "dispatcher not plain (specialized, launch-config sensitive or with extensions)")
        argtypes = tuple(disp.typeof_pyval(a) for a in args)
        kern = disp.overloads.get(argtypes)
        if kern is None:
            return _refuse(k, "no exact overload for the argument types")
        if kern.debug or kern.cooperative or kern.extensions:
            return _refuse(k, "debug, cooperative or extended kernel")
        bad = _sig_mismatch(args, argtypes)
        if bad:
            return _refuse(k, bad)
        ref, retr = [], []
        for ty, v in zip(kern.argument_types, args):
            kern._prepare_args(ty, v, cfg.stream, retr, ref)
        if retr or len(ref) != len(params) or not all(_same_param(a, b) for a, b in zip(ref, params)):
            return _refuse(k, f"parameters differ from Numba's: {ref!r} vs {params!r}"[:300])
        cufunc = kern._codelibrary.get_cufunc()
        if nd.CUDA_CORE_GE_1_0:
            lc = nd.LaunchConfig(grid=cfg.griddim, block=cfg.blockdim, shmem_size=cfg.sharedmem,
                                 is_cooperative=False)
        else:
            lc = nd.LaunchConfig(grid=cfg.griddim, block=cfg.blockdim, shmem_size=cfg.sharedmem,
                                 cooperative_launch=False)
        _core_launch = nd.launch
        FAST_STATS["entries"] += 1
        return (cufunc.kernel, lc, cfg.stream)
    except Exception as exc:  # noqa: BLE001 - any surprise in Numba's internals: keep Numba's path
        return _refuse(k, f"{type(exc).__name__}: {exc}"[:300])


def _refuse(k, why):
    FAST_STATS["refused"] += 1
    if len(_REFUSED) < 32:
        _REFUSED.append((k.key, why))
    return None


def enable_fast_launch(on: bool = True) -> bool:
    """Turn the fast launch path on (on a GPU; never under the simulator) or off; returns the setting."""
    global FAST_LAUNCH, _DeviceNDArray, _FAST_THREAD
    if on:
        _FAST_THREAD = threading.get_ident()
        from numba.cuda.cudadrv.devicearray import DeviceNDArray

        _DeviceNDArray = DeviceNDArray
        _C_INT.update({np.int64: ctypes.c_int64, np.int32: ctypes.c_int32, np.uint32: ctypes.c_uint32,
                       np.uint64: ctypes.c_uint64})
    FAST_LAUNCH = bool(on)
    return FAST_LAUNCH


def _describe(a):
    """A picklable description of an argument's Numba type (what the dispatcher specialises on)."""
    if isinstance(a, (bool, np.bool_)):
        return ("scalar", "boolean")
    if isinstance(a, (int, np.integer)) and not isinstance(a, np.generic):
        return ("scalar", "int64")
    if isinstance(a, np.generic):
        return ("scalar", str(numba.from_dtype(a.dtype)))
    if isinstance(a, float):
        return ("scalar", "float64")
    t = numba.typeof(a)
    return ("array", np.dtype(str(t.dtype) if str(t.dtype) != "bool" else "bool").str, int(t.ndim), t.layout)


def signature(desc):
    """The Numba signature tuple of a ``_describe`` list."""
    out = []
    for d in desc:
        if d[0] == "scalar":
            out.append(getattr(numba.types, d[1]))
        else:
            out.append(numba.types.Array(numba.from_dtype(np.dtype(d[1])), d[2], d[3]))
    return tuple(out)


def build(key):
    """The kernel a ``Kernel.key`` names (rebuilt in this process: e.g. outside the simulator, for PTX)."""
    name, *params = key
    if name.startswith("k_"):
        return globals()[name]
    factory = {"rows": rows_kernel, "tile": tile_kernel, "panel": panel_kernel, "dvals": dvals_tile_kernel, "dvals_rows": dvals_rows_kernel,
               "transpose": transpose_kernel, "gemm": gemm_kernel, "topc": topc_kernel}[name]
    return factory(*params)


def ew_grid(n: int) -> int:
    """Blocks for an element-wise grid-stride kernel over n elements."""
    return max(1, min((int(n) + EW_THREADS - 1) // EW_THREADS, 4096))


def _nbtype(dtype):
    return numba.float64 if np.dtype(dtype) == np.float64 else numba.float32


_front: dict = {}


def _fronted(factory):
    """Cache a kernel factory on its raw arguments: a hit costs one dict lookup (the factories normalise the dtype,
    size the tiles and build the weight decoder before their own memo: microseconds on every launch)."""
    name = factory.__name__

    @functools.wraps(factory)
    def cached(*args):
        key = (name, *args)
        try:
            return _front[key]
        except KeyError:
            k = _front[key] = factory(*args)
            return k
        except TypeError:  # an unhashable argument
            return factory(*args)
    return cached


def _memo(key, make):
    k = _cache.get(key)
    if k is None:
        k = _cache[key] = make()
    return k


# ------------------------------------------------------------------ weight decoding (compile-time choice)
def _weight_fn(bits: int, DT):
    """Device function ``w(vals, e, t, rb, r, s)``: the float weight of entry e (slot t of row r), times s.

    32: float values; 8: int8 values; 4: two's-complement nibbles, row r's slot t in byte ``r*rb + t//2`` (low
    nibble first). The product ``s * q`` is the exact float32 weight the runtime uses (lowbit.py's contract)."""
    def make():
        if bits == 32:
            @cuda.jit(device=True, inline="always")
            def w(vals, e, t, rb, r, s):
                return vals[e] * s
        elif bits == 8:
            @cuda.jit(device=True, inline="always")
            def w(vals, e, t, rb, r, s):
                return s * DT(vals[e])
        else:
            @cuda.jit(device=True, inline="always")
            def w(vals, e, t, rb, r, s):
                v = numba.int32(vals[r * rb + (t >> 1)])
                v = (v >> ((t & 1) * 4)) & 15
                v = v - ((v & 8) << 1)
                return s * DT(v)
        return w
    return _memo(("w", bits, DT), make)


# ------------------------------------------------------------------ sparse products
@_fronted
def rows_kernel(bits: int, dtype):
    """Latency path: one warp per row; see the module doc."""
    DT = _nbtype(dtype)
    W = _weight_fn(bits, DT)

    def make():
        @cuda.jit
        def k_rows(x, B, n_in, ptr, idx, vals, rb, scale, bias, out, n_rows):
            gw = (cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x) >> 5
            lane = cuda.threadIdx.x & 31
            if gw < n_rows:
                e0 = ptr[gw]
                e1 = ptr[gw + 1]
                s = scale[gw]
                for b in range(B):
                    acc = DT(0.0)
                    xb = b * n_in
                    for e in range(e0 + lane, e1, 32):
                        acc += W(vals, e, e - e0, rb, gw, s) * x[xb + idx[e]]
                    acc += cuda.shfl_down_sync(FULL, acc, 16)
                    acc += cuda.shfl_down_sync(FULL, acc, 8)
                    acc += cuda.shfl_down_sync(FULL, acc, 4)
                    acc += cuda.shfl_down_sync(FULL, acc, 2)
                    acc += cuda.shfl_down_sync(FULL, acc, 1)
                    if lane == 0:
                        out[b * n_rows + gw] = bias[gw] + acc
        return Kernel(("rows", bits, np.dtype(dtype).name), k_rows)
    return _memo(("rows", bits, DT), make)


def _tile_writer(RB: int, BT: int, LD: int, NT: int, DT):
    """Device function ``write(tile, tid, r0, b0, bias, out, ob, oj, B_out, B_valid, n_rows)``: a block's RB x BT
    sums, staged in shared memory at ``tile[rl * LD + s]``, plus the bias, written to ``out`` coalesced -- along rows
    for a row-major output (B, n_rows) (``oj == 1``), along samples for the panel layout (n_rows, Bp), whose padding
    columns (``B_valid <= b < B_out``) get zeros. The tile and panel kernels end with it."""
    def make():
        @cuda.jit(device=True, inline="always")
        def write(tile, tid, r0, b0, bias, out, ob, oj, B_out, B_valid, n_rows):
            for q in range(tid, RB * BT, NT):
                if oj == 1:  # row-major output: consecutive threads write consecutive rows
                    s = q // RB
                    rl = q - s * RB
                else:  # panel output: consecutive threads write consecutive samples
                    rl = q // BT
                    s = q - rl * BT
                r = r0 + rl
                b = b0 + s
                if r < n_rows and b < B_out:
                    v = DT(0.0)
                    if b < B_valid:
                        v = bias[r] + tile[rl * LD + s]
                    out[b * ob + r * oj] = v  # both layouts: row-major passes oj == 1
        return write
    return _memo(("write", RB, BT, LD, NT, DT), make)


@functools.lru_cache(maxsize=256)
def tile_geometry(spl: int, warps: int, rpw: int, dtype, staged_rows: bool = True):
    """(BT, LD, RB, CH): batch tile, padded row stride, rows per block, input rows per chunk."""
    bt = 32 * spl
    ld = bt + 1
    rb = warps * rpw
    cap = SMEM_BYTES // np.dtype(dtype).itemsize
    ch = (cap - rb * ld) // ld
    if ch < 8:
        raise ValueError(f"tile configuration spl={spl} warps={warps} rpw={rpw} leaves {ch} chunk rows")
    return bt, ld, rb, ch


@_fronted
def tile_kernel(spl: int, warps: int, rpw: int, bits: int, dtype):
    """Batched sparse product (forward, dx over the transposed structure); see the module doc."""
    DT = _nbtype(dtype)
    W = _weight_fn(bits, DT)
    BT, LD, RB, CH = tile_geometry(spl, warps, rpw, dtype)
    NT = 32 * warps
    SPL, RPW, WARPS = spl, rpw, warps
    X_SIZE, R_SIZE = CH * LD, RB * LD  # shared tiles: compile-time sizes
    WRITE = _tile_writer(RB, BT, LD, NT, DT)

    def make():
        @cuda.jit
        def k_tile(x, sb, si, B_in, ptr, idx, vals, rb, scale, bias, seg, n_chunks, n_in,
                   out, ob, oj, B_out, B_valid, n_rows):
            xs = cuda.shared.array(X_SIZE, DT)
            acs = cuda.shared.array(R_SIZE, DT)
            a = cuda.local.array(SPL, DT)
            tid = cuda.threadIdx.x
            lane = tid & 31
            w = tid >> 5
            b0 = cuda.blockIdx.x * BT
            r0 = cuda.blockIdx.y * RB
            for i in range(tid, RB * LD, NT):
                acs[i] = 0
            for c in range(n_chunks):
                c0 = c * CH
                nr = min(CH, n_in - c0)
                cuda.syncthreads()
                if si == 1:  # row-major x: a warp reads 32 consecutive inputs of one sample (no division)
                    for s in range(w, BT, WARPS):
                        ok = b0 + s < B_in
                        xb = (b0 + s) * sb + c0
                        for i in range(lane, nr, 32):
                            v = DT(0.0)
                            if ok:
                                v = x[xb + i]
                            xs[i * LD + s] = v
                else:  # panel layout: consecutive threads read consecutive samples
                    for q in range(tid, BT * nr, NT):
                        i = q // BT
                        s = q - i * BT
                        v = DT(0.0)
                        if b0 + s < B_in:
                            v = x[(c0 + i) * si + (b0 + s) * sb]
                        xs[i * LD + s] = v
                cuda.syncthreads()
                for rr in range(RPW):
                    rl = w * RPW + rr
                    r = r0 + rl
                    if r < n_rows:
                        lo = seg[r * (n_chunks + 1) + c]
                        hi = seg[r * (n_chunks + 1) + c + 1]
                        if lo < hi:
                            for q in range(SPL):
                                a[q] = 0
                            sr = scale[r]
                            e_row = ptr[r]
                            for e0 in range(lo, hi, 32):
                                e = e0 + lane
                                off = numba.int32(0)
                                wv = DT(0.0)
                                if e < hi:
                                    off = numba.int32((idx[e] - c0) * LD)
                                    wv = W(vals, e, e - e_row, rb, r, sr)
                                n = min(32, hi - e0)
                                for m in range(n):
                                    o = cuda.shfl_sync(FULL, off, m)
                                    v = cuda.shfl_sync(FULL, wv, m)
                                    for q in range(SPL):
                                        a[q] += v * xs[o + q * 32 + lane]
                            for q in range(SPL):
                                acs[rl * LD + q * 32 + lane] += a[q]
            cuda.syncthreads()
            WRITE(acs, tid, r0, b0, bias, out, ob, oj, B_out, B_valid, n_rows)
        return Kernel(("tile", spl, warps, rpw, bits, np.dtype(dtype).name), k_tile)
    return _memo(("tile", spl, warps, rpw, bits, DT), make)


@functools.lru_cache(maxsize=256)
def panel_geometry(spl: int, warps: int, rpw: int, smem_bytes: int, dtype):
    """(BT, LD, RB, CH) of ``panel_kernel``: its x tile of CH input rows fills ``smem_bytes`` of dynamic shared
    memory (rounded down to whole rows); CH >= RB because the tile is reused to stage the block's outputs."""
    bt = 32 * spl
    ld = bt + 1
    rb = warps * rpw
    ch = int(smem_bytes) // (ld * np.dtype(dtype).itemsize)
    if ch < max(8, rb):
        raise ValueError(f"panel configuration spl={spl} warps={warps} rpw={rpw} with {smem_bytes} bytes of shared "
                         f"memory leaves {ch} chunk rows (at least {max(8, rb)} needed)")
    return bt, ld, rb, ch


@_fronted
def panel_kernel(spl: int, warps: int, rpw: int, ch: int, bits: int, dtype):
    """Batched sparse product with large x tiles in dynamic shared memory and per-thread running sums (see the module
    doc): the tile kernel's successor for large layers."""
    DT = _nbtype(dtype)
    W = _weight_fn(bits, DT)
    BT, LD, RB = 32 * spl, 32 * spl + 1, warps * rpw
    CH, NT, SPL, RPW, WARPS = ch, 32 * warps, spl, rpw, warps
    ACC = rpw * spl
    if CH < RB or 2 * RPW > 32:
        raise ValueError(f"panel kernel: {CH} chunk rows for {RB} rows a block, {RPW} rows a warp")
    WRITE = _tile_writer(RB, BT, LD, NT, DT)

    def make():
        @cuda.jit
        def k_panel(x, sb, si, B_in, ptr, idx, vals, rb, scale, bias, seg, n_chunks, n_in,
                    out, ob, oj, B_out, B_valid, n_rows):
            xs = cuda.shared.array(0, DT)  # dynamic: CH * LD values (the launch's shared-memory size)
            acc = cuda.local.array(ACC, DT)
            a0 = cuda.local.array(SPL, DT)
            a1 = cuda.local.array(SPL, DT)
            pf = cuda.local.array(4, DT)
            tid = cuda.threadIdx.x
            lane = tid & 31
            ulane = numba.uint32(lane)
            w = tid >> 5
            b0 = cuda.blockIdx.x * BT
            r0 = cuda.blockIdx.y * RB
            rw = r0 + w * RPW  # the warp's rows: rw .. rw + RPW - 1
            for i in range(ACC):
                acc[i] = 0
            # per row of the warp, read once: lane t < RPW holds row t's scale and first entry
            srl = DT(0.0)
            epl = numba.int32(0)
            if lane < RPW and rw + lane < n_rows:
                srl = scale[rw + lane]
                epl = numba.int32(ptr[rw + lane])
            ns = n_chunks + 1
            for c in range(n_chunks):
                c0 = c * CH
                nr = min(CH, n_in - c0)
                # this chunk's segment of each row: lane t < RPW its start, lane RPW + t its end (rows past the
                # end: 0, 0 = empty)
                sv = numba.int32(0)
                if lane < 2 * RPW:
                    t = lane
                    hi_side = 0
                    if t >= RPW:
                        t -= RPW
                        hi_side = 1
                    if rw + t < n_rows:
                        sv = numba.int32(seg[(rw + t) * ns + c + hi_side])
                cuda.syncthreads()
                if si == 1:  # row-major x: a warp reads consecutive inputs of one sample, four loads in flight
                    for s in range(w, BT, WARPS):
                        bi = b0 + s
                        if bi < B_in:
                            xb = bi * sb + c0
                            for i in range(lane, nr, 128):
                                v0 = x[xb + i]
                                v1 = DT(0.0)
                                v2 = DT(0.0)
                                v3 = DT(0.0)
                                if i + 32 < nr:
                                    v1 = x[xb + i + 32]
                                if i + 64 < nr:
                                    v2 = x[xb + i + 64]
                                if i + 96 < nr:
                                    v3 = x[xb + i + 96]
                                xs[i * LD + s] = v0
                                if i + 32 < nr:
                                    xs[(i + 32) * LD + s] = v1
                                if i + 64 < nr:
                                    xs[(i + 64) * LD + s] = v2
                                if i + 96 < nr:
                                    xs[(i + 96) * LD + s] = v3
                        else:
                            for i in range(lane, nr, 32):
                                xs[i * LD + s] = 0
                else:  # panel layout: consecutive threads read consecutive samples, four loads in flight
                    tot = BT * nr
                    for q in range(tid, tot, 4 * NT):
                        for u in range(4):
                            qq = q + u * NT
                            pf[u] = 0
                            if qq < tot:
                                i = qq // BT
                                s = qq - i * BT
                                if b0 + s < B_in:
                                    pf[u] = x[(c0 + i) * si + (b0 + s) * sb]
                        for u in range(4):
                            qq = q + u * NT
                            if qq < tot:
                                i = qq // BT
                                s = qq - i * BT
                                xs[i * LD + s] = pf[u]
                cuda.syncthreads()
                for rr in range(RPW):
                    lo = cuda.shfl_sync(FULL, sv, rr)
                    hi = cuda.shfl_sync(FULL, sv, RPW + rr)
                    sr = cuda.shfl_sync(FULL, srl, rr)
                    e_row = cuda.shfl_sync(FULL, epl, rr)
                    if lo < hi:  # the same for the whole warp
                        r = rw + rr
                        for q in range(SPL):
                            a0[q] = 0
                            a1[q] = 0
                        for e0 in range(lo, hi, 32):
                            e = e0 + lane
                            off = numba.int32(0)
                            wv = DT(0.0)
                            if e < hi:
                                off = numba.int32((idx[e] - c0) * LD)
                                wv = W(vals, e, e - e_row, rb, r, sr)
                            n = min(32, hi - e0)
                            m = 0
                            # unsigned offsets: Numba adds no negative-index wrap-around to the shared loads
                            while m + 1 < n:  # two entries a step, two sets of sums (independent FMA chains)
                                o = numba.uint32(cuda.shfl_sync(FULL, off, m)) + ulane
                                wa = cuda.shfl_sync(FULL, wv, m)
                                o2 = numba.uint32(cuda.shfl_sync(FULL, off, m + 1)) + ulane
                                wb = cuda.shfl_sync(FULL, wv, m + 1)
                                for q in range(SPL):
                                    a0[q] += wa * xs[o + numba.uint32(q * 32)]
                                    a1[q] += wb * xs[o2 + numba.uint32(q * 32)]
                                m += 2
                            if m < n:
                                o = numba.uint32(cuda.shfl_sync(FULL, off, m)) + ulane
                                wa = cuda.shfl_sync(FULL, wv, m)
                                for q in range(SPL):
                                    a0[q] += wa * xs[o + numba.uint32(q * 32)]
                        for q in range(SPL):
                            acc[rr * SPL + q] += a0[q] + a1[q]
            # stage the block's sums in the tile (CH >= RB rows), then write them coalesced
            cuda.syncthreads()
            for rr in range(RPW):
                rl = w * RPW + rr
                for q in range(SPL):
                    xs[rl * LD + q * 32 + lane] = acc[rr * SPL + q]
            cuda.syncthreads()
            WRITE(xs, tid, r0, b0, bias, out, ob, oj, B_out, B_valid, n_rows)
        return Kernel(("panel", spl, warps, rpw, ch, bits, np.dtype(dtype).name), k_panel)
    return _memo(("panel", spl, warps, rpw, ch, bits, DT), make)


@_fronted
def dvals_tile_kernel(spl: int, warps: int, rpw: int, dtype):
    """Value gradient over shared-memory tiles; see the module doc."""
    DT = _nbtype(dtype)
    BT, LD, RB, CH = tile_geometry(spl, warps, rpw, dtype)
    NT = 32 * warps
    SPL, RPW, WARPS = spl, rpw, warps
    X_SIZE, R_SIZE = CH * LD, RB * LD  # shared tiles: compile-time sizes

    def make():
        @cuda.jit
        def k_dvals(x, sb, si, B_in, dy, db, dj, ptr, idx, seg, n_chunks, n_in, n_btiles, out, n_rows):
            xs = cuda.shared.array(X_SIZE, DT)
            ds = cuda.shared.array(R_SIZE, DT)
            dv = cuda.local.array(SPL, DT)
            tid = cuda.threadIdx.x
            lane = tid & 31
            w = tid >> 5
            r0 = cuda.blockIdx.x * RB
            hi16 = (lane & 16) != 0
            h8 = (lane & 8) != 0
            for bt in range(n_btiles):
                b0 = bt * BT
                cuda.syncthreads()
                if dj == 1:  # dy row-major (B, n_rows)
                    for q in range(tid, RB * BT, NT):
                        s = q // RB
                        rl = q - s * RB
                        v = DT(0.0)
                        if r0 + rl < n_rows and b0 + s < B_in:
                            v = dy[(b0 + s) * db + r0 + rl]
                        ds[rl * LD + s] = v
                else:  # dy panels (n_rows, Bp)
                    for q in range(tid, RB * BT, NT):
                        rl = q // BT
                        s = q - rl * BT
                        v = DT(0.0)
                        if r0 + rl < n_rows and b0 + s < B_in:
                            v = dy[(r0 + rl) * dj + (b0 + s) * db]
                        ds[rl * LD + s] = v
                for c in range(n_chunks):
                    c0 = c * CH
                    nr = min(CH, n_in - c0)
                    cuda.syncthreads()
                    if si == 1:  # row-major x: as the forward's (no division)
                        for s in range(w, BT, WARPS):
                            ok = b0 + s < B_in
                            xb = (b0 + s) * sb + c0
                            for i in range(lane, nr, 32):
                                v = DT(0.0)
                                if ok:
                                    v = x[xb + i]
                                xs[i * LD + s] = v
                    else:
                        for q in range(tid, BT * nr, NT):
                            i = q // BT
                            s = q - i * BT
                            v = DT(0.0)
                            if b0 + s < B_in:
                                v = x[(c0 + i) * si + (b0 + s) * sb]
                            xs[i * LD + s] = v
                    cuda.syncthreads()
                    for rr in range(RPW):
                        rl = w * RPW + rr
                        r = r0 + rl
                        if r < n_rows:
                            lo = seg[r * (n_chunks + 1) + c]
                            hi = seg[r * (n_chunks + 1) + c + 1]
                            if lo < hi:
                                for q in range(SPL):
                                    dv[q] = ds[rl * LD + q * 32 + lane]
                                for e0 in range(lo, hi, 32):
                                    e = e0 + lane
                                    off = numba.int32(0)
                                    if e < hi:
                                        off = numba.int32((idx[e] - c0) * LD)
                                    n = min(32, hi - e0)
                                    mine = DT(0.0)
                                    for m0 in range(0, n, 4):
                                        o0 = cuda.shfl_sync(FULL, off, m0)
                                        o1 = cuda.shfl_sync(FULL, off, (m0 + 1) & 31)
                                        o2 = cuda.shfl_sync(FULL, off, (m0 + 2) & 31)
                                        o3 = cuda.shfl_sync(FULL, off, (m0 + 3) & 31)
                                        p0 = DT(0.0)
                                        p1 = DT(0.0)
                                        p2 = DT(0.0)
                                        p3 = DT(0.0)
                                        for q in range(SPL):
                                            d = dv[q]
                                            col = q * 32 + lane
                                            p0 += d * xs[o0 + col]
                                            p1 += d * xs[o1 + col]
                                            p2 += d * xs[o2 + col]
                                            p3 += d * xs[o3 + col]
                                        # joint butterfly: lanes 8i..8i+7 end with the total of entry m0+i
                                        sa = p0 if hi16 else p2
                                        sb_ = p1 if hi16 else p3
                                        ka = p2 if hi16 else p0
                                        kb = p3 if hi16 else p1
                                        ra = ka + cuda.shfl_xor_sync(FULL, sa, 16)
                                        rb_ = kb + cuda.shfl_xor_sync(FULL, sb_, 16)
                                        snd = ra if h8 else rb_
                                        kp = rb_ if h8 else ra
                                        v = kp + cuda.shfl_xor_sync(FULL, snd, 8)
                                        v += cuda.shfl_xor_sync(FULL, v, 4)
                                        v += cuda.shfl_xor_sync(FULL, v, 2)
                                        v += cuda.shfl_xor_sync(FULL, v, 1)
                                        t = cuda.shfl_sync(FULL, v, ((lane - m0) & 3) * 8)
                                        if lane >= m0 and lane < m0 + 4:
                                            mine = t
                                    if e < hi:
                                        if bt == 0:
                                            out[e] = mine
                                        else:
                                            out[e] += mine
        return Kernel(("dvals", spl, warps, rpw, np.dtype(dtype).name), k_dvals)
    return _memo(("dvals", spl, warps, rpw, DT), make)


@_fronted
def dvals_rows_kernel(dtype):
    """Small batches (and unsorted rows): one thread per entry, ``dv[j*k+t] = sum_b dy[b, j] * x[b, idx]``."""
    DT = _nbtype(dtype)

    def make():
        @cuda.jit
        def k_dvals_rows(x, B, n_in, dy, n_rows, idx, k, out):
            e = cuda.grid(1)
            if e < n_rows * k:
                j = e // k
                i = idx[e]
                acc = DT(0.0)
                for b in range(B):
                    acc += dy[b * n_rows + j] * x[b * n_in + i]
                out[e] = acc
        return Kernel(("dvals_rows", np.dtype(dtype).name), k_dvals_rows)
    return _memo(("dvals_rows", DT), make)


@cuda.jit
def k_seg(ptr, idx, n_rows, ch, n_chunks, seg):
    """seg[r*(n_chunks+1) + c] = first entry of row r whose input is >= c*ch (rows sorted); the last = ptr[r+1]."""
    q = cuda.grid(1)
    if q < n_rows * (n_chunks + 1):
        r = q // (n_chunks + 1)
        c = q - r * (n_chunks + 1)
        lo = ptr[r]
        hi = ptr[r + 1]
        if c == n_chunks:
            seg[q] = hi
        else:
            key = c * ch
            while lo < hi:
                mid = (lo + hi) >> 1
                if idx[mid] < key:
                    lo = mid + 1
                else:
                    hi = mid
            seg[q] = lo


@cuda.jit
def k_first_unsorted(ptr, idx, n_rows, out):
    """out[0] = min over rows whose entries are not strictly increasing (unchanged when all are)."""
    r = cuda.grid(1)
    if r < n_rows:
        for e in range(ptr[r] + 1, ptr[r + 1]):
            if idx[e] <= idx[e - 1]:
                cuda.atomic.min(out, 0, r)
                break


@cuda.jit
def k_minmax(a, n, out):
    """One block of 256 threads: out = [min(a), max(a)] (int64)."""
    smin = cuda.shared.array(256, numba.int64)
    smax = cuda.shared.array(256, numba.int64)
    tid = cuda.threadIdx.x
    lo = numba.int64(2 ** 62)
    hi = numba.int64(-(2 ** 62))
    for i in range(tid, n, 256):
        v = numba.int64(a[i])
        lo = min(lo, v)
        hi = max(hi, v)
    smin[tid] = lo
    smax[tid] = hi
    cuda.syncthreads()
    step = 128
    while step > 0:
        if tid < step:
            smin[tid] = min(smin[tid], smin[tid + step])
            smax[tid] = max(smax[tid], smax[tid + step])
        cuda.syncthreads()
        step >>= 1
    if tid == 0:
        out[0] = smin[0]
        out[1] = smax[0]


# ------------------------------------------------------------------ layouts
@_fronted
def transpose_kernel(dtype):
    """dst[c*ldd + r] = src[r*lds + c] for r < R, c < C, and 0 for R <= r < Rpad: a 32x33 shared tile, block (32, 8),
    grid (ceil(C/32), ceil(Rpad/32)). Packs (B, n) into panels (n, Bp) and back."""
    DT = _nbtype(dtype)

    def make():
        @cuda.jit
        def k_transpose(src, dst, R, C, lds, ldd, Rpad):
            tile = cuda.shared.array((32, 33), DT)
            bx = cuda.blockIdx.x * 32
            by = cuda.blockIdx.y * 32
            tx = cuda.threadIdx.x
            ty = cuda.threadIdx.y
            for j in range(ty, 32, 8):
                r = by + j
                c = bx + tx
                v = DT(0.0)
                if r < R and c < C:
                    v = src[r * lds + c]
                tile[j, tx] = v
            cuda.syncthreads()
            for j in range(ty, 32, 8):
                c = bx + j
                r = by + tx
                if c < C and r < Rpad:
                    dst[c * ldd + r] = tile[tx, j]
        return Kernel(("transpose", np.dtype(dtype).name), k_transpose)
    return _memo(("transpose", DT), make)


# ------------------------------------------------------------------ dense GEMM
@_fronted
def gemm_kernel(dtype):
    """C[m*ldc + n] = beta*C + sum_k A[m*sam + k*sak] * B[k*sbk + n*sbn] (+ bias[n]); see the module doc."""
    DT = _nbtype(dtype)

    def make():
        @cuda.jit
        def k_gemm(A, sam, sak, Bm, sbk, sbn, C, ldc, M, N, K, bias, has_bias, beta):
            As = cuda.shared.array((16, 64), DT)
            Bs = cuda.shared.array((16, 64), DT)
            acc = cuda.local.array(16, DT)
            tid = cuda.threadIdx.x
            tx = tid % 16
            ty = tid // 16
            m0 = cuda.blockIdx.y * 64
            n0 = cuda.blockIdx.x * 64
            for i in range(16):
                acc[i] = 0
            for k0 in range(0, K, 16):
                for l in range(4):
                    e = tid + l * 256
                    if sak == 1:
                        mm = e // 16
                        kk = e - mm * 16
                    else:
                        kk = e // 64
                        mm = e - kk * 64
                    m = m0 + mm
                    kq = k0 + kk
                    v = DT(0.0)
                    if m < M and kq < K:
                        v = A[m * sam + kq * sak]
                    As[kk, mm] = v
                    if sbn == 1:
                        kk = e // 64
                        nn = e - kk * 64
                    else:
                        nn = e // 16
                        kk = e - nn * 16
                    n = n0 + nn
                    kq = k0 + kk
                    v = DT(0.0)
                    if n < N and kq < K:
                        v = Bm[kq * sbk + n * sbn]
                    Bs[kk, nn] = v
                cuda.syncthreads()
                for kk in range(16):
                    for i in range(4):
                        av = As[kk, ty + 16 * i]
                        for j in range(4):
                            acc[i * 4 + j] += av * Bs[kk, tx + 16 * j]
                cuda.syncthreads()
            for i in range(4):
                m = m0 + ty + 16 * i
                if m < M:
                    for j in range(4):
                        n = n0 + tx + 16 * j
                        if n < N:
                            v = acc[i * 4 + j]
                            if has_bias:
                                v += bias[n]
                            if beta != 0:
                                v += C[m * ldc + n]
                            C[m * ldc + n] = v
        return Kernel(("gemm", np.dtype(dtype).name), k_gemm)
    return _memo(("gemm", DT), make)


# ------------------------------------------------------------------ growth candidates
@cuda.jit
def k_abs_held(G, n_in, idx, k, n_rows, held):
    """held[r*k + t] = |G[r, idx[r*k + t]]| for the rows of one block of G."""
    e = cuda.grid(1)
    if e < n_rows * k:
        r = e // k
        held[e] = abs(G[r * n_in + idx[e]])


@cuda.jit
def k_abs(a, n):
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        a[i] = abs(a[i])


@cuda.jit
def k_mark(G, n_in, idx, k, n_rows):
    """G[r, idx[r, t]] = -1: held inputs are never candidates."""
    e = cuda.grid(1)
    if e < n_rows * k:
        r = e // k
        G[r * n_in + idx[e]] = -1.0


@_fronted
def topc_kernel(nt: int = 256):
    """Growth candidates, one block of ``nt`` threads per row; see the module doc."""
    NT = nt

    def make():
        @cuda.jit
        def k_topc(Gb, Gf, n_in, c, m, cand_idx, cand_score):
            """The m largest scores of row blockIdx.x (float32, held ones -1; NaN never chosen), in input order,
            ties to the lower input; the slots after them padded with -1 / -inf. ``Gb`` is ``Gf`` viewed as
            uint32."""
            hist = cuda.shared.array(256, numba.int32)
            sc = cuda.shared.array(NT, numba.int32)
            sh = cuda.shared.array(4, numba.int64)
            r = cuda.blockIdx.x
            tid = cuda.threadIdx.x
            base_row = r * n_in
            written = numba.int64(0)  # fewer than m when free scores are NaN (never chosen, as on the CPU)
            if m > 0:
                if tid == 0:
                    sh[0] = 0
                    sh[1] = m
                for p in range(4):
                    shift = 24 - 8 * p
                    for q in range(tid, 256, NT):
                        hist[q] = 0
                    cuda.syncthreads()
                    prefix = sh[0]
                    for i in range(tid, n_in, NT):
                        bits = numba.int64(Gb[base_row + i])
                        kk = numba.int64(0) if bits > 2139095040 else bits + 1  # held (-1) or NaN: 0
                        if kk > 0 and (p == 0 or (kk >> (shift + 8)) == (prefix >> (shift + 8))):
                            cuda.atomic.add(hist, (kk >> shift) & 255, 1)
                    cuda.syncthreads()
                    if tid == 0:
                        want = sh[1]
                        cum = numba.int64(0)
                        d = 255
                        while d > 0:
                            h = hist[d]
                            if cum + h >= want:
                                break
                            cum += h
                            d -= 1
                        sh[0] = prefix | (numba.int64(d) << shift)
                        sh[1] = want - cum
                    cuda.syncthreads()
                T = sh[0]
                ties = sh[1]
                sel_base = numba.int64(0)
                tie_base = numba.int64(0)
                for i0 in range(0, n_in, NT):
                    i = i0 + tid
                    kk = numba.int64(0)
                    if i < n_in:
                        bits = numba.int64(Gb[base_row + i])
                        kk = numba.int64(0) if bits > 2139095040 else bits + 1
                    is_tie = 1 if (kk == T and kk > 0) else 0
                    sc[tid] = is_tie
                    cuda.syncthreads()
                    off = 1
                    while off < NT:  # inclusive scan (Hillis-Steele)
                        v = sc[tid]
                        if tid >= off:
                            v += sc[tid - off]
                        cuda.syncthreads()
                        sc[tid] = v
                        cuda.syncthreads()
                        off <<= 1
                    tie_rank = tie_base + sc[tid] - is_tie
                    tie_total = sc[NT - 1]
                    sel = 1 if (kk > T or (is_tie == 1 and tie_rank < ties)) else 0
                    cuda.syncthreads()
                    sc[tid] = sel
                    cuda.syncthreads()
                    off = 1
                    while off < NT:
                        v = sc[tid]
                        if tid >= off:
                            v += sc[tid - off]
                        cuda.syncthreads()
                        sc[tid] = v
                        cuda.syncthreads()
                        off <<= 1
                    if sel == 1:
                        pos = sel_base + sc[tid] - 1
                        cand_idx[r * c + pos] = i
                        cand_score[r * c + pos] = Gf[base_row + i]
                    sel_base += sc[NT - 1]
                    tie_base += tie_total
                    cuda.syncthreads()
                written = sel_base
            for p in range(written + tid, c, NT):
                cand_idx[r * c + p] = -1
                cand_score[r * c + p] = -math.inf
        return Kernel(("topc", nt), k_topc)
    return _memo(("topc", nt), make)


# ------------------------------------------------------------------ element-wise
@cuda.jit
def k_fill(a, n, v):
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        a[i] = v


@cuda.jit
def k_copy(src, dst, n):
    """dst = src (casting to dst's dtype)."""
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        dst[i] = src[i]


@cuda.jit
def k_binary(a, b, out, n, nb, op):
    """out[i] = a[i] (op) b[i % nb]: op 0 add, 1 sub, 2 mul; nb = b.size (b broadcast over a's leading axes)."""
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        bv = b[i % nb]
        if op == 0:
            out[i] = a[i] + bv
        elif op == 1:
            out[i] = a[i] - bv
        else:
            out[i] = a[i] * bv


@cuda.jit
def k_rbinary(a, b, out, n, na, op):
    """out[i] = a[i % na] (op) b[i]: the left operand broadcast."""
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        av = a[i % na]
        if op == 0:
            out[i] = av + b[i]
        elif op == 1:
            out[i] = av - b[i]
        else:
            out[i] = av * b[i]


@cuda.jit
def k_axpy(y, x, n, alpha):
    """y += alpha * x."""
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        y[i] += alpha * x[i]


@cuda.jit
def k_scale_scalar(g, out, n, factor):
    """out[i] = g[0] * factor (the backward of a sum / mean)."""
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        out[i] = g[0] * factor


@cuda.jit
def k_relu(x, y, n):
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        v = x[i]
        y[i] = v if v > 0 else 0


@cuda.jit
def k_relu_grad(g, y, gx, n):
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        gx[i] = g[i] if y[i] > 0 else 0


@cuda.jit
def k_colsum(g, B, n, out):
    """out[j] = sum_b g[b*n + j] (bias gradients): one thread per column, coalesced across threads."""
    j = cuda.grid(1)
    if j < n:
        acc = 0.0
        for b in range(B):
            acc += g[b * n + j]
        out[j] = acc


@cuda.jit
def k_sum(a, n, out, factor):
    """One block of 256 threads: out[0] = factor * sum(a) (deterministic tree)."""
    s = cuda.shared.array(256, numba.float64)
    tid = cuda.threadIdx.x
    acc = 0.0
    for i in range(tid, n, 256):
        acc += a[i]
    s[tid] = acc
    cuda.syncthreads()
    step = 128
    while step > 0:
        if tid < step:
            s[tid] += s[tid + step]
        cuda.syncthreads()
        step >>= 1
    if tid == 0:
        out[0] = s[0] * factor


@cuda.jit
def k_zero_rows(a, k, n_rows, active):
    """a[j*k + t] = 0 where active[j] == 0 (ablated neurons get no value gradient)."""
    for e in range(cuda.grid(1), n_rows * k, cuda.gridsize(1)):
        if active[e // k] == 0:
            a[e] = 0


@cuda.jit
def k_take(a, slots, out, n):
    """out[e] = a[slots[e]] (values in the transposed structure's order)."""
    for e in range(cuda.grid(1), n, cuda.gridsize(1)):
        out[e] = a[slots[e]]


@cuda.jit
def k_ce_rows(z, labels, n, C, logp, rowloss):
    """Per row (one thread): logp = z - logsumexp(z), rowloss = -logp[label]."""
    r = cuda.grid(1)
    if r < n:
        base = r * C
        mx = z[base]
        for c in range(1, C):
            mx = max(mx, z[base + c])
        s = 0.0
        for c in range(C):
            s += math.exp(z[base + c] - mx)
        lse = mx + math.log(s)
        for c in range(C):
            logp[base + c] = z[base + c] - lse
        rowloss[r] = lse - z[base + labels[r]]


@cuda.jit
def k_ce_back(logp, labels, g, n, C, dz):
    """dz = (softmax - onehot(label)) * g[0] / n."""
    for i in range(cuda.grid(1), n * C, cuda.gridsize(1)):
        r = i // C
        c = i - r * C
        v = math.exp(logp[i])
        if c == labels[r]:
            v -= 1
        dz[i] = v * (g[0] / n)


@cuda.jit
def k_sgd(p, g, buf, n, lr, momentum, weight_decay, nesterov, has_momentum):
    """fanin.kernels.update.sgd_update on the device."""
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        gi = g[i] + weight_decay * p[i]
        if has_momentum:
            b = momentum * buf[i] + gi
            buf[i] = b
            gi = gi + momentum * b if nesterov else b
        p[i] -= lr * gi


@cuda.jit
def k_adam(p, g, m, v, n, step_size, beta1, beta2, eps, l2, decay):
    """fanin.kernels.update.adam_update on the device."""
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        gi = g[i] + l2 * p[i]
        mi = beta1 * m[i] + (1 - beta1) * gi
        vi = beta2 * v[i] + (1 - beta2) * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay - step_size * mi / (math.sqrt(vi) + eps)


@cuda.jit
def k_im2col(x, B, C, H, W, kh, kw, sh, sw, ph, pw, ho, wo, cols):
    """cols[(b*ho + oy)*wo + ox, (c*kh + dy)*kw + dx] = x[b, c, oy*sh - ph + dy, ox*sw - pw + dx] (0 outside)."""
    ncol = C * kh * kw
    total = B * ho * wo * ncol
    for q in range(cuda.grid(1), total, cuda.gridsize(1)):
        row = q // ncol
        col = q - row * ncol
        b = row // (ho * wo)
        rem = row - b * ho * wo
        oy = rem // wo
        ox = rem - oy * wo
        c = col // (kh * kw)
        t = col - c * kh * kw
        dy = t // kw
        dx = t - dy * kw
        iy = oy * sh - ph + dy
        ix = ox * sw - pw + dx
        v = 0.0
        if 0 <= iy < H and 0 <= ix < W:
            v = x[((b * C + c) * H + iy) * W + ix]
        cols[q] = v


@cuda.jit
def k_col2im(cols, B, C, H, W, kh, kw, sh, sw, ph, pw, ho, wo, out):
    """Adjoint of im2col as a gather (one thread per pixel, no atomics): sums every patch entry of the pixel."""
    ncol = C * kh * kw
    total = B * C * H * W
    for q in range(cuda.grid(1), total, cuda.gridsize(1)):
        ix = q % W
        t = q // W
        iy = t % H
        t //= H
        c = t % C
        b = t // C
        acc = 0.0
        for dy in range(kh):
            ny = iy + ph - dy
            if ny >= 0 and ny % sh == 0:
                oy = ny // sh
                if oy < ho:
                    for dx in range(kw):
                        nx = ix + pw - dx
                        if nx >= 0 and nx % sw == 0:
                            ox = nx // sw
                            if ox < wo:
                                acc += cols[((b * ho + oy) * wo + ox) * ncol + (c * kh + dy) * kw + dx]
        out[q] = acc


MODULE_KERNELS = ("k_seg", "k_first_unsorted", "k_minmax", "k_abs_held", "k_abs", "k_mark", "k_fill", "k_copy",
                  "k_binary", "k_rbinary", "k_axpy", "k_scale_scalar", "k_relu", "k_relu_grad", "k_colsum", "k_sum",
                  "k_zero_rows", "k_take", "k_ce_rows", "k_ce_back", "k_sgd", "k_adam", "k_im2col", "k_col2im")
for _name in MODULE_KERNELS:
    globals()[_name] = Kernel((_name,), globals()[_name])
del _name
