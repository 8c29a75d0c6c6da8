"""CUDA backend: the drivers of ``fanin.kernels.cpu`` for device arrays (``numba.cuda``; the ``cuda`` extra).

``fanin.kernels`` imports this module only when an argument is a device array (anything with
``__cuda_array_interface__``: Numba, CuPy, PyTorch; or a simulator array), so ``import fanin`` never needs
numba-cuda. Importing it without numba-cuda, or without a GPU and driver (outside Numba's simulator), raises
``fanin.device.CUDAUnavailableError`` with what to do.

The drivers have the names and arguments of ``cpu.py``'s and return device arrays (Numba ``DeviceNDArray``).
Arrays from other libraries are wrapped without a copy (``cuda.as_cuda_array``). Layer topologies arrive as the
host arrays of a ``Topology`` (immutable, validated): their device copies, CSR row pointers, chunk segments and
transposed (CSC) structure are built once and cached, keyed on the host array (dropped with it). Launch
configurations and the bytes/FLOPs of each kernel: ``fanin.kernels.cuda_kernels``.

Paths:
- forward, batch < ``SMALL_BATCH``: ``rows_kernel`` (warp per neuron); otherwise ``panel_kernel`` (from 512 rows on
  a GPU: large x tiles in opted-in dynamic shared memory) or ``tile_kernel`` (smaller layers), reading x row-major
  (or packed panels) through shared-memory tiles. Rows must be sorted for the tiles (a Topology's are); plain
  device indices are checked once per call and unsorted ones fall back to ``rows_kernel``.
- dx: the same kernels over the transposed structure (CSC) -- a gather per input, no atomics, deterministic.
  The structure depends on the topology only and is built once on the host (O(nnz), ``cpu.transpose_structure``)
  then kept on the device; each call permutes the values into its order (``k_take``, nnz reads and writes).
- dvalues: ``dvals_tile_kernel`` (deterministic, no atomics); ``dvals_rows_kernel`` below ``SMALL_BATCH``. Its grid
  is rows only, so its plan (``_dvals_plan``) takes fewer rows a block until the grid covers the SMs; the tile
  kernels' (``_plan``) do the same when batch tiles x row blocks fall short of them.
- growth candidates: ``gemm_kernel`` for ``|dy^T x|`` one block of neurons at a time (~64 MiB of scores), held
  inputs marked, ``topc_kernel`` per row. ``sort=True`` sorts the (n_out, c) result on the host; float64 inputs
  run the whole selection on the host (gradient checks only).
"""
from __future__ import annotations

import functools
import os
import threading
import weakref

import numpy as np

from fanin.device import CUDAUnavailableError

try:
    from numba import cuda
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise CUDAUnavailableError(
        f"CUDA was asked for, but numba-cuda is not installed ({exc}); install the extra: pip install 'fanin[cuda]'."
    ) from None

def _simulator() -> bool:
    try:
        from numba.cuda.core import config as _config
    except ImportError:  # pragma: no cover - older layouts
        from numba import config as _config
    return bool(getattr(_config, "ENABLE_CUDASIM", 0))


SIMULATOR = _simulator()
if SIMULATOR:
    from fanin.kernels import _cudasim

    _cudasim.install()
elif not cuda.is_available():
    try:
        cuda.detect()
        why = "no CUDA device was found"
    except Exception as exc:  # noqa: BLE001 - the driver's reason, whatever it is
        why = " ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip().strip(":")) or type(exc).__name__
    raise CUDAUnavailableError(
        f"CUDA was asked for, but no usable NVIDIA GPU/driver is present ({why}); keep the arrays on the host "
        "(device='cpu'), or run on a machine with an NVIDIA GPU and driver."
    )

from fanin.kernels import cpu  # noqa: E402
from fanin.kernels import cuda_kernels as K  # noqa: E402

# Numba frees device memory in batches: by default every 10 dropped arrays it calls cuMemFree, which waits for the
# device to go idle. A training step drops ~30 temporaries, so the host stopped to wait for the GPU several times a
# step and could not queue the next launches meanwhile. Freeing every DEALLOCS_COUNT arrays instead (still at most
# NUMBA_CUDA_MAX_PENDING_DEALLOCS_RATIO of the memory pending, and flushed on an out-of-memory retry) keeps the
# launch queue full. Left alone when the user set the variable.
DEALLOCS_COUNT = 256
if not SIMULATOR and "NUMBA_CUDA_MAX_PENDING_DEALLOCS_COUNT" not in os.environ:
    os.environ["NUMBA_CUDA_MAX_PENDING_DEALLOCS_COUNT"] = str(DEALLOCS_COUNT)  # survives Numba's config reloads
    try:
        from numba.core import config as _numba_config
    except ImportError:  # pragma: no cover - numba-cuda without numba.core
        from numba.cuda.core import config as _numba_config
    if getattr(_numba_config, "CUDA_DEALLOCS_COUNT", None) is not None:
        _numba_config.CUDA_DEALLOCS_COUNT = max(int(_numba_config.CUDA_DEALLOCS_COUNT), DEALLOCS_COUNT)

# Launches skip Numba's per-call dispatch on a GPU (cuda_kernels.Kernel); FANIN_FAST_LAUNCH=0 keeps Numba's path.
K.ON_GPU = not SIMULATOR
K.enable_fast_launch(not SIMULATOR and os.environ.get("FANIN_FAST_LAUNCH", "1") not in ("", "0"))

TB = cpu.TB
SMALL_BATCH = cpu.SMALL_BATCH
ROWS_WARPS = 4  # warps (rows) per block of the latency kernel
# (spl, warps, rpw) forced for every tile launch (forward, dx and dvalues), e.g. by tests or a benchmark sweep;
# None: chosen from shapes. DVALS_PLAN_OVERRIDE forces the value-gradient kernel's alone (it wins over PLAN_OVERRIDE).
PLAN_OVERRIDE = None
DVALS_PLAN_OVERRIDE = None
# The panel kernel's plan for large layers (spl, warps, rows a warp, shared-memory bytes; see _plan); None: the tile
# kernel everywhere.
PANEL_PLAN = K.DEFAULT_PANEL_PLAN


# ================================================================ arrays
def is_device(a) -> bool:
    return getattr(a, "__cuda_ndarray__", False) or hasattr(a, "__cuda_array_interface__")


class _HostInterface:
    """A simulator stand-in for foreign device memory: its 'device' pointer is host memory."""

    def __init__(self, cai):
        self.__array_interface__ = {"shape": tuple(cai["shape"]), "typestr": cai["typestr"],
                                    "data": cai["data"], "strides": cai.get("strides"), "version": 3}


def wrap(a):
    """A Numba device array for ``a`` (no copy): Numba arrays as they are, others through
    ``__cuda_array_interface__``."""
    if a is None or getattr(a, "__cuda_ndarray__", False):
        return a
    if hasattr(a, "__cuda_array_interface__"):
        if SIMULATOR:
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

            return FakeCUDAArray(np.asarray(_HostInterface(a.__cuda_array_interface__)))
        return cuda.as_cuda_array(a)
    return a


_CTX = []  # (thread id, context) of the thread that made the first array
if SIMULATOR:
    _DNA = None
else:
    from numba.cuda.cudadrv.devicearray import DeviceNDArray as _DNA
    from numba.cuda.cudadrv.driver import MemoryPointer as _MemoryPointer

    class _PoolPointer(_MemoryPointer):
        """The owner of one array's pooled buffer (a Numba ``MemoryPointer`` whose finalizer returns the buffer to
        the pool). The ctypes pointer is kept as an attribute, as Numba's own ``OwnedPointer`` does (the base class
        rebuilds it on every access, and every launch reads it)."""

        device_ctypes_pointer = None  # shadows the base class's property: set per instance

        def __init__(self, entry, nbytes, finalizer):
            super().__init__(entry[2], entry[1], nbytes, finalizer=finalizer)
            self.device_ctypes_pointer = entry[3]


def _context():
    """The CUDA context of this thread's arrays, or None. Looked up once, in the first thread that allocates
    (``cuda.device_array`` asks the driver for the current context on every allocation); other threads (whose
    context may not be current) keep Numba's lookup."""
    if not _CTX:
        from numba.cuda.cudadrv import devices

        _CTX.append((threading.get_ident(), devices.get_context()))
    tid, ctx = _CTX[0]
    return ctx if tid == threading.get_ident() else None


# A pool of device buffers, by exact size (a training step allocates the same shapes every step). Numba allocates
# each array with cuMemAlloc and frees it with cuMemFree (which waits for the GPU) in batches, with several Python
# objects of bookkeeping per array; here a buffer whose last array (and view) is dropped goes back to the pool and
# the next request of its size takes it. Reuse is ordered by the stream: every fanin launch and copy is on the
# default stream, so work queued on a buffer before its release runs before work queued after its reuse. Idle
# buffers are kept up to POOL_LIMIT bytes (FANIN_CUDA_POOL_MB, default 1024; 0 turns the pool off) and released
# when an allocation runs out of memory. Only in the thread that owns the context (``_context``).
POOL_LIMIT = int(os.environ.get("FANIN_CUDA_POOL_MB", "1024")) << 20
POOL_STATS = {"hits": 0, "misses": 0}
_pool: dict = {}  # nbytes -> [(numba allocation, device pointer, context, ctypes pointer), ...] idle
_pool_bytes = [0]


def _release(entry, nbytes):
    """A pooled buffer's array is gone: keep the buffer for the next request of its size (or let Numba free it)."""
    if _pool_bytes[0] + nbytes <= POOL_LIMIT:
        _pool.setdefault(nbytes, []).append(entry)
        _pool_bytes[0] += nbytes


def release_pool():
    """Give the idle pooled buffers back to Numba (freed with its next batch of deallocations)."""
    _pool.clear()
    _pool_bytes[0] = 0


def _memalloc(ctx, nbytes):
    if POOL_LIMIT <= 0:
        return ctx.memalloc(nbytes)
    idle = _pool.get(nbytes)
    if idle:
        entry = idle.pop()
        _pool_bytes[0] -= nbytes
        POOL_STATS["hits"] += 1
    else:
        try:
            mem = ctx.memalloc(nbytes)
        except Exception:  # noqa: BLE001 - out of memory (or any failure): give the idle buffers back, try once more
            if not _pool:
                raise
            release_pool()
            ctx.deallocations.clear()
            mem = ctx.memalloc(nbytes)
        entry = (mem, mem.device_pointer, mem.context, mem.device_ctypes_pointer)
        POOL_STATS["misses"] += 1
    # a fresh owner per array: when it (every array and view on it) is collected, its finalizer returns the buffer
    return _PoolPointer(entry, nbytes, functools.partial(_release, entry, nbytes))


def empty(shape, dtype):
    """An uninitialised C-contiguous device array (``cuda.device_array`` without its per-call context lookup, its
    memory from the pool)."""
    dtype = np.dtype(dtype)
    if SIMULATOR:
        return cuda.device_array(shape, dtype)
    ctx = _context()
    if ctx is None:
        return cuda.device_array(shape, dtype)
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    else:
        shape = tuple(int(s) for s in shape)
    n = 1
    for s in shape:
        n *= s
    if n <= 0:
        return cuda.device_array(shape, dtype)
    strides = []
    st = dtype.itemsize
    for s in reversed(shape):
        strides.append(st)
        st *= s
    return _DNA(shape, tuple(reversed(strides)), dtype, gpu_data=_memalloc(ctx, n * dtype.itemsize))


def zeros(shape, dtype):
    out = empty(shape, dtype)
    n = out.size
    if n:
        K.k_fill[K.ew_grid(n), K.EW_THREADS](_view1(out), n, np.dtype(dtype).type(0))
    return out


def full(shape, dtype, value):
    out = empty(shape, dtype)
    n = out.size
    if n:
        K.k_fill[K.ew_grid(n), K.EW_THREADS](_view1(out), n, np.dtype(dtype).type(value))
    return out


def to_device(a):
    return cuda.to_device(np.ascontiguousarray(a))


def to_host(a) -> np.ndarray:
    return a.copy_to_host() if is_device(a) else np.asarray(a)


def _view1(a):
    """``a.reshape(-1)`` of a C-contiguous device array, the view built directly (``reshape`` goes through Numba's
    dummy-array machinery: several microseconds a call, and the hot paths make a few views per kernel call)."""
    if a.ndim == 1:
        return a
    if SIMULATOR or type(a) is not _DNA:
        return a.reshape(-1)
    d = a.__dict__  # kept on the array (its shape and memory never change): weights and inputs are reused
    v = d.get("_fanin_1d")
    if v is None:
        if not a.size or not a.is_c_contiguous():
            return a.reshape(-1)
        v = d["_fanin_1d"] = _DNA((a.size,), (a.dtype.itemsize,), a.dtype, gpu_data=a.gpu_data)
    return v


def flat(a):
    """A 1-D view of a C-contiguous device array (a copy if it is not contiguous)."""
    a = wrap(a)
    if not a.is_c_contiguous():
        a = copy(a)
    return _view1(a)


def copy(a, dtype=None):
    """A new C-contiguous device array with a's data (cast to ``dtype``)."""
    a = wrap(a)
    dtype = a.dtype if dtype is None else np.dtype(dtype)
    out = empty(a.shape, dtype)
    n = a.size
    if n:
        src = a if a.is_c_contiguous() else cuda.to_device(a.copy_to_host())
        K.k_copy[K.ew_grid(n), K.EW_THREADS](_view1(src), _view1(out), n)
    return out


def astype(a, dtype):
    a = wrap(a)
    return a if a.dtype == np.dtype(dtype) else copy(a, dtype)


_consts: dict = {}


def _const(n: int, dtype, value):
    """A cached read-only-by-convention device vector of ``value`` (scale 1 / bias 0 of plain products)."""
    key = (int(n), np.dtype(dtype).str, float(value))
    a = _consts.get(key)
    if a is None:
        if len(_consts) > 64:
            _consts.clear()
        a = _consts[key] = full((int(n),), dtype, value)
    return a


# ================================================================ topology cache
class _DevStructure:
    """A CSR structure on the device: ``ptr`` (n_rows+1, int64), ``idx`` (nnz), sortedness and chunk segments."""

    __slots__ = ("ptr", "idx", "n_rows", "sorted", "segs", "slots", "__weakref__")

    def __init__(self, ptr, idx, n_rows, sorted_, slots=None):
        self.ptr, self.idx, self.n_rows, self.sorted, self.segs, self.slots = ptr, idx, n_rows, sorted_, {}, slots

    def seg(self, ch: int, n_in: int):
        n_chunks = max(1, -(-int(n_in) // ch))
        s = self.segs.get((ch, n_chunks))
        if s is None:
            s = empty(self.n_rows * (n_chunks + 1), np.int64)
            n = s.size
            K.k_seg[K.ew_grid(n) if n < 4096 * 256 else (n + 255) // 256, 256](
                self.ptr, self.idx, self.n_rows, ch, n_chunks, s)
            self.segs[(ch, n_chunks)] = s
        return s, n_chunks


_topos: dict = {}  # id(host array) -> (weakref to it, structure)


def _cached(host, make):
    key = id(host)
    hit = _topos.get(key)
    if hit is not None and hit[0]() is host:
        return hit[1]
    value = make()
    _topos[key] = (weakref.ref(host, lambda _r, k=key: _topos.pop(k, None)), value)
    return value


def _rows_sorted_host(idx2d: np.ndarray) -> bool:
    return idx2d.shape[1] < 2 or bool(np.all(np.diff(idx2d.astype(np.int64), axis=1) > 0))


def _forward_structure(indices) -> _DevStructure:
    """The (n_out, k) condensed structure as CSR on the device. Host arrays come from a Topology: cached."""
    n_rows, k = int(indices.shape[0]), int(indices.shape[1])
    if isinstance(indices, np.ndarray):
        def make():
            ptr = to_device(np.arange(n_rows + 1, dtype=np.int64) * k)
            sorted_ = (not indices.flags.writeable) or _rows_sorted_host(indices)  # a Topology's are sorted
            return _DevStructure(ptr, to_device(_view1(indices)), n_rows, sorted_)
        return _cached(indices, make)
    d = wrap(indices)
    ptr = _row_ptr(n_rows, k)
    st = _DevStructure(ptr, flat(d), n_rows, True)
    st.sorted = rows_strictly_increasing(d) < 0
    return st


_ptrs: dict = {}


def _row_ptr(n_rows: int, k: int):
    key = (n_rows, k)
    p = _ptrs.get(key)
    if p is None:
        if len(_ptrs) > 64:
            _ptrs.clear()
        p = _ptrs[key] = to_device(np.arange(n_rows + 1, dtype=np.int64) * k)
    return p


def _transposed_structure(indices, n_in: int, transposed) -> _DevStructure:
    """The CSC structure (rows = inputs) on the device, with the slots that permute values into its order."""
    if transposed is not None and isinstance(transposed[0], np.ndarray):  # a Topology's (host, frozen): cache
        colptr, rows, slots = transposed
        return _cached(colptr, lambda: _DevStructure(to_device(colptr), to_device(rows), int(n_in), True,
                                                     to_device(slots)))
    if transposed is not None:
        colptr, rows, slots = (wrap(a) for a in transposed)
        return _DevStructure(colptr, rows, int(n_in), True, slots)
    return _host_transposed(to_host(indices), n_in)


def _host_transposed(idx_host, n_in):
    colptr, rows, slots = cpu.transpose_structure(np.ascontiguousarray(idx_host), int(n_in))
    return _DevStructure(to_device(colptr), to_device(rows), int(n_in), True, to_device(slots))


# ================================================================ plans
_SMS = []


def _sm_count() -> int:
    """Streaming multiprocessors of the current GPU (read once)."""
    if not _SMS:
        try:
            _SMS.append(int(cuda.get_current_device().MULTIPROCESSOR_COUNT))
        except Exception:  # noqa: BLE001 - no device attribute (simulator): a mid-size GPU
            _SMS.append(108)
    return _SMS[0]


def _rows_per_warp(n_rows: int, batch_tiles: int) -> int:
    """The most rows per warp (8, 4, 2, 1; 8 warps a block) whose grid still gives every SM a block: fewer rows
    per block re-read more x tiles from L2, but a grid smaller than the GPU leaves SMs idle (a 4096-row value
    gradient, whose grid is rows only, had 64 blocks on a 132-SM H100)."""
    sms = _sm_count()
    for rpw in (8, 4, 2):
        if batch_tiles * -(-n_rows // (8 * rpw)) >= sms:
            return rpw
    return 1


def _smem_optin() -> int:
    """Bytes of shared memory one block may opt in to on this GPU (227 KiB on an H100); 48 KiB when unknown."""
    if not _OPTIN:
        try:
            _OPTIN.append(int(cuda.get_current_device().MAX_SHARED_MEMORY_PER_BLOCK_OPTIN))
        except Exception:  # noqa: BLE001 - no such attribute (simulator, old driver): the default limit
            _OPTIN.append(48 * 1024)
    return _OPTIN[0]


_OPTIN: list = []


def _panel_fits(plan, smem: int) -> bool:
    """Whether the panel kernel's plan leaves enough input rows a chunk with smem bytes (float64 halves them)."""
    try:
        K.panel_geometry(*plan[:3], smem, np.float64)
        return True
    except ValueError:
        return False


def _plan(n_rows: int, bx: int):
    """The launch plan of the batched sparse product for n_rows outputs and a batch extent bx (see cuda_kernels):
    ``(spl, warps, rpw)`` for ``tile_kernel``, ``(spl, warps, rpw, smem_bytes)`` for ``panel_kernel``.

    From 512 rows on a GPU: the panel kernel with PANEL_PLAN, its shared memory capped at what a block may opt in
    to on this GPU (227 KiB on an H100/H200, 163 KiB on an A100); the tile kernel where even that leaves too few
    chunk rows. Measured on an H200 at 4096x4096, 90 %, batch 256 (bench_cuda.py --sweep, medians of interleaved
    rounds; forward / dx): tile kernel (1, 8, 8) 688 / 690 us; panel (2, 8, 8, 96 KiB) 269 / 306; (2, 16, 4, 96 KiB)
    230 / 248; (2, 16, 8, 200 KiB), the default, 204 / 243; (2, 32, 4, 200 KiB) 176 / 194 -- the fastest, not the
    default yet because the device tests ran on (2, 16, 8) and 1024-thread blocks may not launch where a kernel
    needs more registers (float64). More warps an SM hide the shared-memory and shuffle latency; more rows a block
    re-read fewer x tiles from L2; 4 samples a lane halved the grid and lost (370-509 us).

    The tile kernel (small layers, the simulator): 8 warps of 8 rows (RB 64) unless that grid is smaller than the
    GPU's SM count; then fewer rows per warp (``_rows_per_warp``), one sample per lane from 512 rows."""
    if PLAN_OVERRIDE is not None:
        return PLAN_OVERRIDE
    key = (n_rows, bx)
    plan = _plans.get(key)
    if plan is None:
        if SIMULATOR or n_rows < 512:
            plan = (1 if bx <= 32 else 2), 2, 2
        else:
            plan = 1, 8, _rows_per_warp(n_rows, -(-int(bx) // 32))
            if PANEL_PLAN is not None:
                smem = min(PANEL_PLAN[3], _smem_optin())
                if _panel_fits(PANEL_PLAN, smem):
                    plan = (*PANEL_PLAN[:3], smem)
        if len(_plans) > 1024:
            _plans.clear()
        _plans[key] = plan
    return plan


_plans: dict = {}
_dvals_plans: dict = {}


def _dvals_plan(n_rows: int, bx: int):
    """(spl, warps, rpw) of ``dvals_tile_kernel``: its grid is ``ceil(n_rows / RB)`` blocks (each block loops over
    the batch tiles, so its rows' sums stay in one block: deterministic), so RB is chosen to cover the SMs."""
    if DVALS_PLAN_OVERRIDE is not None:
        return DVALS_PLAN_OVERRIDE
    if PLAN_OVERRIDE is not None and len(PLAN_OVERRIDE) == 3:
        return PLAN_OVERRIDE
    key = (n_rows, bx)
    plan = _dvals_plans.get(key)
    if plan is None:
        spl = 1 if bx <= 32 else 2
        plan = (spl, 2, 2) if SIMULATOR or n_rows < 512 else (spl, 8, _rows_per_warp(n_rows, 1))
        if len(_dvals_plans) > 1024:
            _dvals_plans.clear()
        _dvals_plans[key] = plan
    return plan


def _dt(a):
    return np.dtype(np.float64) if a.dtype == np.float64 else np.dtype(np.float32)


def _bits_of(vals) -> int:
    return 8 if vals.dtype == np.int8 else 4 if vals.dtype == np.uint8 else 32


def _spmm(st: _DevStructure, vals, rb, scale, bias, x, sb, si, b_in, n_in, out, ob, oj, b_out, b_valid):
    """Launch the batched kernel its plan names over structure ``st`` (x and out strided; see cuda_kernels)."""
    dt = _dt(out)
    plan = _plan(st.n_rows, b_out)
    if len(plan) == 4 and st.idx.size < 2 ** 31:  # the panel kernel (32-bit entry offsets)
        spl, warps, rpw, smem = plan
        bt, ld, rb_rows, ch = K.panel_geometry(spl, warps, rpw, smem, dt)
        kern = K.panel_kernel(spl, warps, rpw, ch, _bits_of(vals), dt)
        shared = (0, ch * ld * dt.itemsize)  # (stream, dynamic shared bytes) of the launch configuration
    else:
        spl, warps, rpw = plan[:3]
        bt, _, rb_rows, ch = K.tile_geometry(spl, warps, rpw, dt)
        kern = K.tile_kernel(spl, warps, rpw, _bits_of(vals), dt)
        shared = ()
    seg, n_chunks = st.seg(ch, n_in)
    grid = (max(1, -(-b_out // bt)), max(1, -(-st.n_rows // rb_rows)))
    kern[(grid, 32 * warps, *shared)](x, sb, si, b_in, st.ptr, st.idx, vals, rb, scale, bias, seg, n_chunks, n_in,
                                      out, ob, oj, b_out, b_valid, st.n_rows)


def _rows(st: _DevStructure, vals, rb, scale, bias, x2d, out2d):
    """Launch the latency kernel: out (B, n_rows) row-major from x (B, n_in) row-major."""
    B, n_in = x2d.shape
    kern = K.rows_kernel(_bits_of(vals), _dt(out2d))
    threads = 32 * ROWS_WARPS
    grid = max(1, -(-st.n_rows // ROWS_WARPS))
    kern[grid, threads](_view1(x2d), B, n_in, st.ptr, st.idx, vals, rb, scale, bias, _view1(out2d),
                        st.n_rows)


# ================================================================ checks the validators ask for
def index_min_max(indices):
    d = flat(indices)
    out = empty(2, np.int64)
    K.k_minmax[1, 256](d, d.size, out)
    lo, hi = out.copy_to_host()
    return int(lo), int(hi)


def rows_strictly_increasing(indices):
    """Index of the first row whose indices are not strictly increasing, or -1."""
    n_rows, k = int(indices.shape[0]), int(indices.shape[1])
    if k < 2 or n_rows == 0:
        return -1
    out = to_device(np.array([n_rows], np.int64))
    K.k_first_unsorted[max(1, -(-n_rows // 256)), 256](_row_ptr(n_rows, k), flat(indices), n_rows, out)
    r = int(out.copy_to_host()[0])
    return -1 if r >= n_rows else r


# ================================================================ layouts
def panels_shape(B: int, n: int) -> tuple:
    return cpu.panels_shape(B, n)


def _transpose(src2d, rows, cols, lds, dst_flat, ldd, rpad):
    kern = K.transpose_kernel(_dt(dst_flat))
    grid = (max(1, -(-cols // 32)), max(1, -(-rpad // 32)))
    kern[grid, (32, 8)](_view1(src2d), dst_flat, rows, cols, lds, ldd, rpad)


def pack_panels(x):
    """x (B, n) -> (n, Bp) transposed and zero-padded, as the CPU's; None below SMALL_BATCH."""
    x = wrap(x)
    B, n = x.shape
    if B < SMALL_BATCH:
        return None
    shape = panels_shape(B, n)
    xp = empty(shape, x.dtype)
    _transpose(x, B, n, n, _view1(xp), shape[1], shape[1])
    return xp


def unpack_panels(xp, B):
    xp = wrap(xp)
    n, bp = xp.shape
    out = empty((int(B), n), xp.dtype)
    _transpose(xp, n, int(B), bp, _view1(out), n, n)
    return out


def transpose(x):
    x = wrap(x)
    r, c = x.shape
    out = empty((c, r), x.dtype)
    _transpose(x, r, c, c, _view1(out), r, r)
    return out


# ================================================================ sparse products
def _scale_bias(n, dtype, scale, bias):
    scale = _const(n, dtype, 1.0) if scale is None else flat(scale)
    bias = _const(n, dtype, 0.0) if bias is None else flat(bias)
    return scale, bias


def _forward(x, indices, vals_flat, rb, scale, bias, xp=None):
    x = wrap(x)
    B = int(x.shape[0])
    n_out = int(indices.shape[0])
    dt = _dt(x)
    scale, bias = _scale_bias(n_out, dt, scale, bias)
    out = empty((B, n_out), dt)
    if B == 0 or n_out == 0:
        return out
    st = _forward_structure(indices)
    if B < SMALL_BATCH or not st.sorted:
        _rows(st, vals_flat, rb, scale, bias, x, out)
        return out
    if xp is not None:
        xp = wrap(xp)
        _spmm(st, vals_flat, rb, scale, bias, _view1(xp), 1, xp.shape[1], xp.shape[1], int(x.shape[1]),
              _view1(out), n_out, 1, B, B)
    else:
        _spmm(st, vals_flat, rb, scale, bias, _view1(x), int(x.shape[1]), 1, B, int(x.shape[1]),
              _view1(out), n_out, 1, B, B)
    return out


def fanin_forward(x, indices, values, bias=None, scale=None, xp=None):
    """y (B, n_out) = bias + scale * sum_t values * x[:, indices]; the path chosen by batch size."""
    x = wrap(x)
    values = wrap(values)
    if values.dtype != x.dtype and values.dtype.kind == "f":
        values = astype(values, x.dtype)
    return _forward(x, indices, flat(values), 0, scale, bias, xp)


def fixed_point_forward(x, indices, qvalues, scale, bias=None):
    """y = bias + sum_t (scale[j] * q[j, t]) * x[:, indices[j, t]] with int8 q (the exact float32 weights)."""
    return _forward(wrap(x), indices, flat(qvalues), 0, wrap(scale), bias)


def fixed_point_forward4(x, indices, packed, k, scale, bias=None):
    """The 4-bit twin: ``packed`` (n_out, kp/2) uint8 from ``lowbit.pack_nibbles`` (two slots a byte)."""
    packed = wrap(packed)
    return _forward(wrap(x), indices, flat(packed), int(packed.shape[1]), wrap(scale), bias)


def _values_transposed(values_flat, st: _DevStructure, dtype):
    n = st.slots.size
    out = empty(n, dtype)
    if n:
        K.k_take[K.ew_grid(n), K.EW_THREADS](values_flat, st.slots, out, n)
    return out


def fanin_backward_input(indices, values, dy, n_in, dyp=None, transposed=None):
    """dx (B, n_in) = dy @ W: a forward over the transposed structure (gather per input, no atomics)."""
    dy = wrap(dy)
    B = int(dy.shape[0])
    n_in = int(n_in)
    dt = _dt(dy)
    out = empty((B, n_in), dt)
    if B == 0:
        return out
    st = _transposed_structure(indices, n_in, transposed)
    vt = _values_transposed(flat(astype(values, dt)), st, dt)
    one, zero = _const(n_in, dt, 1.0), _const(n_in, dt, 0.0)
    n_out = int(indices.shape[0])
    if B < SMALL_BATCH:
        _rows(st, vt, 0, one, zero, dy, out)
    elif dyp is not None:
        dyp = wrap(dyp)
        _spmm(st, vt, 0, one, zero, _view1(dyp), 1, dyp.shape[1], dyp.shape[1], n_out, _view1(out), n_in, 1,
              B, B)
    else:
        _spmm(st, vt, 0, one, zero, _view1(dy), n_out, 1, B, n_out, _view1(out), n_in, 1, B, B)
    return out


def _dvalues(st: _DevStructure, k, x, sb, si, b_in, n_in, dy, db, dj, out_flat):
    dt = _dt(out_flat)
    spl, warps, rpw = _dvals_plan(st.n_rows, b_in)
    bt, _, rb_rows, ch = K.tile_geometry(spl, warps, rpw, dt)
    seg, n_chunks = st.seg(ch, n_in)
    kern = K.dvals_tile_kernel(spl, warps, rpw, dt)
    kern[max(1, -(-st.n_rows // rb_rows)), 32 * warps](x, sb, si, b_in, dy, db, dj, st.ptr, st.idx, seg, n_chunks,
                                                       n_in, max(1, -(-b_in // bt)), out_flat, st.n_rows)


def fanin_backward_values(x, indices, dy, xp=None, dyp=None):
    """dvalues[j, t] = sum_b dy[b, j] * x[b, indices[j, t]]."""
    x, dy = wrap(x), wrap(dy)
    dt = _dt(x)
    n_out, k = int(indices.shape[0]), int(indices.shape[1])
    out = empty((n_out, k), dt)
    B, n_in = int(x.shape[0]), int(x.shape[1])
    if out.size == 0:
        return out
    st = _forward_structure(indices)
    if B == 0:
        K.k_fill[K.ew_grid(out.size), K.EW_THREADS](_view1(out), out.size, dt.type(0))
        return out
    if B < SMALL_BATCH or not st.sorted:
        n = n_out * k
        K.dvals_rows_kernel(dt)[max(1, -(-n // 256)), 256](_view1(x), B, n_in, _view1(dy), n_out, st.idx, k,
                                                           _view1(out))
        return out
    if xp is not None and dyp is not None:  # both packed: the padded sample extent Bp
        xp, dyp = wrap(xp), wrap(dyp)
        bp = int(xp.shape[1])
        xs, dys = (_view1(xp), 1, bp, bp), (_view1(dyp), 1, bp)
    else:
        xs, dys = (_view1(x), n_in, 1, B), (_view1(dy), n_out, 1)
    _dvalues(st, k, xs[0], xs[1], xs[2], xs[3], n_in, dys[0], dys[1], dys[2], _view1(out))
    return out


def fanin_backward(x, indices, values, dy, transposed=None, xp=None, dyp=None):
    """(dx, dvalues) of the condensed forward."""
    return (fanin_backward_input(indices, values, dy, int(x.shape[1]), dyp, transposed),
            fanin_backward_values(x, indices, dy, xp, dyp))


# ------------------------------------------------ panel-layout drivers
def forward_panels(xp, B, indices, values, bias=None, row_ptr=None):
    """fanin_forward on packed input xp (n_in, Bp); the output packed, (n_out, Bp), zero past B."""
    xp = wrap(xp)
    n_in, bp = int(xp.shape[0]), int(xp.shape[1])
    n_out = int(indices.shape[0])
    dt = _dt(xp)
    out = empty((n_out, bp), dt)
    scale, bias = _scale_bias(n_out, dt, None, bias)
    st = _forward_structure(indices)
    vals = flat(wrap(values))
    if not st.sorted:  # unsorted plain indices: rows kernel on rows, then pack
        return pack_panels(_forward(unpack_panels(xp, B), indices, vals, 0, None, bias))
    _spmm(st, vals, 0, scale, bias, _view1(xp), 1, bp, bp, n_in, _view1(out), 1, bp, bp, int(B))
    return out


def backward_input_panels(indices, values, dyp, B, n_in, transposed=None):
    """fanin_backward_input on packed dy (n_out, Bp); dx packed, (n_in, Bp)."""
    dyp = wrap(dyp)
    n_out, bp = int(dyp.shape[0]), int(dyp.shape[1])
    dt = _dt(dyp)
    st = _transposed_structure(indices, int(n_in), transposed)
    vt = _values_transposed(flat(astype(values, dt)), st, dt)
    out = empty((int(n_in), bp), dt)
    _spmm(st, vt, 0, _const(n_in, dt, 1.0), _const(n_in, dt, 0.0), _view1(dyp), 1, bp, bp, n_out,
          _view1(out), 1, bp, bp, int(B))
    return out


def backward_values_panels(xp, indices, dyp):
    """fanin_backward_values from packed x (n_in, Bp) and dy (n_out, Bp)."""
    xp, dyp = wrap(xp), wrap(dyp)
    n_in, bp = int(xp.shape[0]), int(xp.shape[1])
    n_out, k = int(indices.shape[0]), int(indices.shape[1])
    dt = _dt(xp)
    out = empty((n_out, k), dt)
    st = _forward_structure(indices)
    if not st.sorted:
        return fanin_backward_values(unpack_panels(xp, bp), indices, unpack_panels(dyp, bp))
    _dvalues(st, k, _view1(xp), 1, bp, bp, n_in, _view1(dyp), 1, bp, _view1(out))
    return out


def transpose_structure(indices, n_in):
    """(colptr, rows, slots) on the device: built on the host (O(nnz), once per topology), then copied."""
    colptr, rows, slots = cpu.transpose_structure(np.ascontiguousarray(to_host(indices)), int(n_in))
    return to_device(colptr), to_device(rows), to_device(slots)


# ================================================================ dense
def gemm(a, sam, sak, b, sbk, sbn, c, ldc, M, N, K_, bias=None, beta=0):
    """C = A @ B (+ beta*C) (+ bias): strided flat operands; see cuda_kernels.gemm_kernel."""
    dt = _dt(c)
    kern = K.gemm_kernel(dt)
    has_bias = bias is not None
    b_arr = flat(bias) if has_bias else _const(1, dt, 0.0)
    grid = (max(1, -(-int(N) // 64)), max(1, -(-int(M) // 64)))
    kern[grid, 256](a, sam, sak, b, sbk, sbn, c, ldc, int(M), int(N), int(K_), b_arr, has_bias, int(beta))


def dense_grad(x, dy):
    """G = dy^T x, shape (n_out, n_in)."""
    x, dy = wrap(x), wrap(dy)
    B, n_in = int(x.shape[0]), int(x.shape[1])
    n_out = int(dy.shape[1])
    dt = _dt(x)
    out = empty((n_out, n_in), dt)
    gemm(flat(dy), 1, n_out, flat(x), n_in, 1, _view1(out), n_in, n_out, n_in, B)
    return out


def growth_candidates(x, dy, indices, c, block=None, sort=True, held=False):
    """Per neuron, the c largest |dy^T x| outside indices[j]; blockwise over neurons (see the module doc)."""
    x, dy = wrap(x), wrap(dy)
    n_out, k = int(indices.shape[0]), int(indices.shape[1])
    B, n_in = int(x.shape[0]), int(x.shape[1])
    if _dt(x) == np.float64:  # gradient checks: the host's exact selection
        res = cpu.growth_candidates(to_host(x), to_host(dy), np.ascontiguousarray(to_host(indices)), c, block,
                                    sort, held)
        return tuple(to_device(a) for a in res)
    st = _forward_structure(indices)
    cand_idx = empty((n_out, c), np.int32)
    cand_score = empty((n_out, c), np.float32)
    held_score = empty((n_out, k), np.float32)
    if block is None:  # ~64 MiB of scores per block
        block = max(64, min(n_out, (1 << 24) // max(1, n_in)))
    g = empty((min(block, n_out), n_in), np.float32)
    dyf, xf = flat(dy), flat(x)
    m = max(0, min(c, n_in - k))
    for j0 in range(0, n_out, block):
        j1 = min(n_out, j0 + block)
        rows = j1 - j0
        gf = _view1(g)[: rows * n_in]
        # G[j0:j1] = dy[:, j0:j1]^T x
        gemm(dyf[j0:], 1, n_out, xf, n_in, 1, gf, n_in, rows, n_in, B)
        idx_blk = st.idx[j0 * k: j1 * k]
        nk = rows * k
        if nk:
            K.k_abs_held[max(1, -(-nk // 256)), 256](gf, n_in, idx_blk, k, rows, _view1(held_score)[j0 * k:])
        K.k_abs[K.ew_grid(rows * n_in), K.EW_THREADS](gf, rows * n_in)
        if nk:
            K.k_mark[max(1, -(-nk // 256)), 256](gf, n_in, idx_blk, k, rows)
        if c:
            nt = 32 if SIMULATOR else 256
            K.topc_kernel(nt)[rows, nt](gf.view(np.uint32), gf, n_in, c, m, _view1(cand_idx)[j0 * c:],
                                _view1(cand_score)[j0 * c:])
    if sort and c:  # (n_out, c) on the host: score descending, ties by input index
        ci, cs = cand_idx.copy_to_host(), cand_score.copy_to_host()
        order = np.lexsort((ci, -cs), axis=1)
        cand_idx = to_device(np.take_along_axis(ci, order, axis=1))
        cand_score = to_device(np.take_along_axis(cs, order, axis=1))
    return (cand_idx, cand_score, held_score) if held else (cand_idx, cand_score)


# ================================================================ im2col
def im2col(x, kh, kw, stride, padding, ho, wo):
    x = wrap(x)
    B, C, H, W = (int(s) for s in x.shape)
    cols = empty((B * ho * wo, C * kh * kw), x.dtype)
    n = cols.size
    if n:
        K.k_im2col[K.ew_grid(n), K.EW_THREADS](flat(x), B, C, H, W, kh, kw, stride[0], stride[1], padding[0],
                                               padding[1], ho, wo, _view1(cols))
    return cols


def col2im(cols, x_shape, kh, kw, stride, padding, ho, wo):
    cols = wrap(cols)
    B, C, H, W = x_shape
    out = empty(tuple(x_shape), cols.dtype)
    n = out.size
    if n:
        K.k_col2im[K.ew_grid(n), K.EW_THREADS](flat(cols), B, C, H, W, kh, kw, stride[0], stride[1], padding[0],
                                               padding[1], ho, wo, _view1(out))
    return out


def concat_rows(parts):
    """The (B, n) device arrays of ``parts`` stacked along the batch axis (gradient accumulation's lists)."""
    parts = [wrap(p) for p in parts]
    n = int(parts[0].shape[1])
    dt = np.result_type(*[p.dtype for p in parts])
    out = empty((sum(int(p.shape[0]) for p in parts), n), dt)
    b0 = 0
    for p in parts:
        b1 = b0 + int(p.shape[0])
        if p.size:
            K.k_copy[K.ew_grid(p.size), K.EW_THREADS](flat(p), _view1(out[b0:b1]), p.size)
        b0 = b1
    return out


# ================================================================ element-wise, reductions, loss, updates
def _ew(kern, n, *args):
    if n:
        kern[K.ew_grid(n), K.EW_THREADS](*args)


def binary(a, b, op: int):
    """a (op) b with b broadcast over a's leading axes (or a over b's): op 0 add, 1 sub, 2 mul."""
    a, b = wrap(a), wrap(b)
    if a.size >= b.size:
        out = empty(a.shape, _dt(a) if a.dtype.kind == "f" else a.dtype)
        _ew(K.k_binary, a.size, flat(a), flat(b), _view1(out), a.size, max(1, b.size), op)
    else:
        out = empty(b.shape, b.dtype)
        _ew(K.k_rbinary, b.size, flat(a), flat(b), _view1(out), b.size, max(1, a.size), op)
    return out


def axpy(y, x, alpha=1.0):
    """y += alpha * x, in place."""
    _ew(K.k_axpy, y.size, flat(y), flat(x), y.size, y.dtype.type(alpha))
    return y


def scale_scalar(g, shape, dtype, factor):
    """An array of ``shape`` filled with g[0] * factor (g a one-element device array)."""
    out = empty(shape, dtype)
    _ew(K.k_scale_scalar, out.size, flat(g), _view1(out), out.size, np.dtype(dtype).type(factor))
    return out


def relu(x):
    x = wrap(x)
    out = empty(x.shape, x.dtype)
    _ew(K.k_relu, x.size, flat(x), _view1(out), x.size)
    return out


def relu_grad(g, y):
    g, y = wrap(g), wrap(y)
    gx = empty(y.shape, y.dtype)
    _ew(K.k_relu_grad, y.size, flat(astype(g, y.dtype)), flat(y), _view1(gx), y.size)
    return gx


def colsum(g):
    """g (B, n) summed over the batch: (n,)."""
    g = wrap(g)
    B, n = int(g.shape[0]), int(g.shape[1])
    out = empty((n,), g.dtype)
    if n:
        K.k_colsum[max(1, -(-n // 256)), 256](flat(g), B, n, out)
    return out


def total(a, factor=1.0):
    """factor * sum(a) as a 0-d device array (deterministic single-block reduction)."""
    a = wrap(a)
    out = empty((1,), a.dtype)
    K.k_sum[1, 256](flat(a), a.size, out, float(factor))
    return out.reshape(())


def cross_entropy(z, labels):
    """(loss 0-d, logp (n, C)): mean cross-entropy of logits z against integer labels (a device int64 vector)."""
    z = wrap(z)
    n, C = int(z.shape[0]), int(z.shape[1])
    logp = empty((n, C), z.dtype)
    rowloss = empty((n,), z.dtype)
    if n:
        K.k_ce_rows[max(1, -(-n // 128)), 128](flat(z), labels, n, C, _view1(logp), rowloss)
    return total(rowloss, 1.0 / max(1, n)), logp


def cross_entropy_backward(logp, labels, g):
    n, C = int(logp.shape[0]), int(logp.shape[1])
    dz = empty((n, C), logp.dtype)
    _ew(K.k_ce_back, n * C, _view1(logp), labels, flat(g), n, C, _view1(dz))
    return dz


def zero_rows(a, active_dev):
    """Zero the rows of a (n_rows, k) device array where active is 0, in place."""
    n_rows, k = int(a.shape[0]), int(a.shape[1])
    _ew(K.k_zero_rows, n_rows * k, _view1(a), k, n_rows, active_dev)
    return a


def mask_of(active: np.ndarray):
    """A cached device uint8 copy of a Topology's (read-only) active mask."""
    return _cached(active, lambda: to_device(active.astype(np.uint8)))


def device_structure(indices):
    """The cached device copy of a Topology's index array (for callers that launch kernels themselves)."""
    return _forward_structure(indices)


def sgd_update(p, g, buf, lr, momentum, weight_decay, nesterov):
    p = flat(p)
    dt = p.dtype.type
    has = momentum != 0.0
    bf = flat(buf) if has else p
    _ew(K.k_sgd, p.size, p, flat(astype(g, p.dtype)), bf, p.size, dt(lr), dt(momentum), dt(weight_decay),
        bool(nesterov), has)


def adam_update(p, g, m, v, step_size, beta1, beta2, eps, l2, decay):
    p = flat(p)
    dt = p.dtype.type
    _ew(K.k_adam, p.size, p, flat(astype(g, p.dtype)), flat(m), flat(v), p.size, dt(step_size), dt(beta1),
        dt(beta2), dt(eps), dt(l2), dt(decay))


def synchronize():
    cuda.synchronize()
