"""How a Network runs its plan on the CPU.

``build(plan)`` prepares the plan once. Its linear layers -- the whole network for an MLP, the classifier
head after the last convolution or pooling for a CNN -- become one ``_Chain``: their arrays laid out in the
flat form of ``fanin.kernels.infer`` (int8 kept as int8, 4-bit values packed two per byte), run by ONE
compiled call per ``run`` with bias and activation fused. Convolutions, pooling and flatten stay one step
per op (direct condensed kernels, dense ones too; no BLAS), with quantized weights used as ``scale * qvalues``,
the very float32 products training used.

Which driver runs a chain is chosen per call by the amount of work:

- batch < ``infer.SMALL_BATCH``: the rows form (gathered dot products), on the calling thread, or with the
  rows of a layer split over Numba's threads when the batch holds at least ``PARALLEL_ROWS_MACS``
  multiply-adds (a 4096x4096 layer at 90 %, the 784-1024-1024-10 MLP at 90 %: yes; a 784-512-512-10 one:
  no, waking threads would cost more than it saves), the tuner checking that it pays;
- larger batches: panels of ``infer.TB`` samples; serial below ``PARALLEL_PANELS_MACS``, else in parallel,
  each panel through all layers (one parallel region) when the panels divide evenly over the threads, else
  layer by layer over (panel, rows) tasks. Batches over ``CHUNK`` samples go in chunks (bounded buffers).
  Batches of at most ``infer.TBH`` (half a panel) run the half-width drivers: same results, half the work;
  a batch of one panel that fills a half panel per thread (17-32 samples on 2 threads) of a mostly condensed
  chain runs them in parallel, each thread its half panel through every layer (``infer.half_panels``).

Where the rule says "parallel", ``_Tuner`` checks it by timing (``ADAPTIVE``): on an oversubscribed machine
waking threads costs more than it saves, and the chain then runs serially (re-measuring now and then).
Serial and parallel runs of a form compute each output with the same code: the result does not depend on
the choice (the rows and panels forms differ only by rounding).

A guest in someone else's process (ARCHITECTURE.md): nothing here sets an environment variable, Numba's
config or its thread count. Per-thread buffers (``threading.local``, a few batch sizes each) make ``run``
safe from any number of threads. Numba's ``workqueue`` threading layer aborts the process when two threads
launch parallel kernels at once, so until the layer is known (it is after the first parallel run) and
whenever it is ``workqueue``, a parallel run needs a lock -- a thread that finds it taken runs serially
instead of waiting. A child forked after Numba started its OpenMP threads would die at its first parallel
kernel (GNU OpenMP is not fork-safe): ``os.register_at_fork`` switches such a child (and one whose state is
unknown) to the serial kernels for good; under TBB, which survives fork, the child keeps its threads.
"""
from __future__ import annotations

import collections
import threading
import time

import numba
import numpy as np

from fanin.kernels import conv as kconv
from fanin.kernels import infer, pool, w8a8
from fanin.kernels._jit import GATE

__all__ = ["build", "parallel_state", "ACTIVATIONS", "NonFinite", "PARALLEL_ROWS_MACS", "PARALLEL_PANELS_MACS", "PARALLEL_FRONT_MACS", "CHUNK"]

# rows form: multiply-adds per call from which a layer's rows may be split over the threads (the tuner checks that it
# pays). 784-1024-1024-10 MLP at SRigL 90 % (194 k multiply-adds), batch 1, 2 threads spinning between calls: on the
# Intel Xeon 52.5 us serial -> 34.5 us parallel; with the earlier 1 M it always ran serially.
PARALLEL_ROWS_MACS = 1 << 17
# panels: multiply-adds per call from which panels may run in parallel (the tuner still checks that they pay).
# Measured on the 2-core reference machine, quiet, 784-1024-1024-10 MLP at SRigL 90 % (194 k multiply-adds per
# sample; predict medians): batch 4 145 us serial panels -> 112 us layerwise over 2 threads, batch 8 130 -> 112 us;
# with the earlier 3 M, batches 4-15 always ran serially.
PARALLEL_PANELS_MACS = 1 << 19
PARALLEL_FRONT_MACS = 3 << 20   # convolutions and pooling: multiply-adds per call from which they may run in parallel
CHUNK = 64 * infer.TB           # samples per compiled call (bounds the per-thread buffers)
_CACHE_SIZES = 6                # batch shapes whose buffers each thread keeps ...
_CACHE_BYTES = 64 << 20         # ... within this many bytes (the buffers of the call at hand are always kept)
ADAPTIVE = True                 # check, by timing, that parallel runs pay (see _Tuner); False: the work rule only
EXPLORE = 32                    # _Tuner: one call in EXPLORE runs the option that looks slower
RECENT = 5                      # _Tuner: calls per option whose median is its estimate
ACTIVATIONS = ("float32", "int8")  # how the linear chain computes (int8: fanin.kernels.w8a8)
# int8 activations: below these batches, samples go in blocks of w8a8.BLOCK (qsteps_n), the blocks over the threads;
# from them on, panels of 32/64. Measured on the 2-core Intel Xeon, 784-1024-1024-10 MLP at SRigL 90 % (twelfth
# session): on 2 threads, blocks 89-108 us at batch 32 against 116 us for one panel with each layer's rows split over
# the threads (the form that was used up to 32), 144 against 192 us for panels at 48, even at 64; on 1 thread blocks
# 82 against 149 us at 16, 162 against 145 us at 32.
INT8_PANELS = 28          # one thread
INT8_PANELS_THREADS = 64  # several threads


# ------------------------------------------------------------------ parallel policy (process-wide)
# the process-wide policy (a forked child: serial for good; workqueue: one parallel launch at a time) is the
# kernels' own gate, so that the runtime and the public kernels agree
_PARALLEL = GATE


def parallel_state() -> dict:
    """The process-wide parallel policy: the threading layer (once known) and why parallel runs are off."""
    return {"threading_layer": _PARALLEL.layer, "disabled": _PARALLEL.disabled}


class _Tuner:
    """Serial or parallel for work the rule sends to threads, by measurement.

    On an idle machine the parallel run of a big batch is ~2x faster on 2 cores; on an oversubscribed one
    (other processes, or many threads of the service predicting at once) waking threads that are not
    scheduled makes it several times *slower* than serial (measured on the 2-core reference machine at
    load ~10, bench/bench_runtime.py: batch 256 of the 784-1024-1024-10 MLP 2.5 ms serial, 18 ms
    parallel). So for each (path, batch size class) the chain keeps the wall time per multiply-add of both
    options, runs the faster, and runs the other one call in EXPLORE (up to 4 x EXPLORE when it is several
    times slower; parallel two calls, the first untimed: ``decide``) to keep its estimate fresh; when that
    comes out faster than the option in use, the next calls run it again, so that a lasting change is taken
    within a few calls. Races between threads only lose an update; both options compute the same bits, so the
    choice never changes a result."""

    __slots__ = ("rate", "calls", "seen", "recent", "probe", "warm", "runs")

    def __init__(self):
        self.rate = [None, None]  # seconds per multiply-add: [serial, parallel]
        self.seen = [0, 0]
        self.recent = ([], [])    # the latest RECENT times of each option
        self.calls = 0
        self.probe = 0            # calls left that run the slower option at once: it has just measured faster
        self.warm = False         # the next call is the timed second call of a re-measurement
        self.runs = [0, 0]        # calls that ran serial, parallel (benchmarks report it; racy across threads)

    def decide(self) -> tuple:
        """(parallel, timed) for the next call: which option to run, and whether its time goes into the estimate.
        A re-measurement of parallel (serial in use) is two calls in a row of which the first is not timed: after a
        stretch of serial calls the threads have gone to sleep, and the first parallel call pays for waking them
        (SRigL-90 % MLP at batch 32 on the Intel Xeon: 373-376 us against 198-220 us for the next ones, serial
        270 us). Timed, that call made parallel look slower every time, so a tuner that had once gone serial
        stayed serial."""
        self.calls += 1
        s, p = self.rate
        if p is None or s is None:
            return p is None or self.calls % 4 == 0, True  # try parallel first, then measure serial soon
        faster = p <= s
        if self.warm:
            self.warm = False
            return not faster, True
        if self.probe:
            self.probe -= 1
            return not faster, True
        ratio = (s / p if faster else p / s) if min(s, p) > 0 else 4.0
        # the slower option is re-measured one call in EXPLORE, in up to 4 x EXPLORE when it is several times
        # slower: with BLAS threads spinning in the same process a parallel batch-1 call took ~15x a serial one
        if self.calls % (EXPLORE * min(4, max(1, int(ratio)))) == 0:
            self.warm = not faster  # re-measuring parallel (serial is faster): this call wakes the threads, untimed
            return not faster, not self.warm
        return faster, True

    def record(self, parallel: bool, seconds_per_mac: float):
        """One call's time. The first of each option is a warm-up (thread start, new buffers) and is not used;
        then the estimate is the median of the option's latest RECENT calls: a preempted call is noise, a
        change that lasts moves it within a few calls. (It used to follow any faster call at once: with a
        process that alternates fanin and BLAS calls, parallel batch-1 runs were slower than serial ones most
        of the time, 66 against 61 us on the Intel Xeon, but the odd fast one kept them chosen.)"""
        if not self.seen[parallel]:
            self.seen[parallel] = 1
            return
        r = self.recent[parallel]
        r.append(seconds_per_mac)
        if len(r) > RECENT:
            del r[0]
        mine, other = self.rate[parallel], self.rate[not parallel]
        if mine is not None and other is not None and mine > other > seconds_per_mac:
            self.probe = RECENT // 2  # the slower option measured faster: confirm (or not) in the next calls
        self.rate[parallel] = sorted(r)[len(r) // 2]


def _choose(tuners: dict, key, eligible: bool) -> tuple:
    """(token, tuner) for one call whose work the rule may send to threads (``eligible``): the tuner of its
    batch-size class says whether to try, the process's policy (``_PARALLEL``) whether it may. Token 0: serial.
    The tuner is None when the call's time is not to be recorded (``_Tuner.decide``)."""
    if not eligible:
        return 0, None
    tuner = (tuners.get(key) or tuners.setdefault(key, _Tuner())) if ADAPTIVE else None
    if tuner is None:
        return _PARALLEL.enter(), None
    parallel, timed = tuner.decide()
    tuner.runs[parallel] += 1
    return (_PARALLEL.enter() if parallel else 0), (tuner if timed else None)  # an untimed call: no tuner to tell


def _done(token: int, tuner, t0: float, work: int):
    """After a call chosen by ``_choose``: release the parallel token, tell the tuner the time per multiply-add."""
    if token:
        _PARALLEL.leave(token)
    if tuner is not None:
        tuner.record(bool(token), (time.perf_counter() - t0) / work)


# ------------------------------------------------------------------ the linear chain
def _spec(op) -> dict:
    a = op["arrays"]
    spec = {"n_in": op["n_in"], "n_out": op["n_out"], "act": op["act"], "bias": a["bias"],
            "indices": a["indices"] if op["sparse"] else None, "active": op.get("active")}
    if "values" in a:
        spec["values"] = a["values"]
    else:
        spec.update(qvalues=a["qvalues"], scale=a["scale"], bits=op["bits"])
    return spec


# the parallel drivers and what runs instead when the call goes serial
_SERIAL_OF = {"rows": "rows_serial", "panels": "panels_serial", "layerwise": "panels_serial",
              "half_layerwise": "half_panels_serial", "half_panels": "panels_serial"}
# the panel paths' drivers
_PANEL_DRIVERS = {"panels": infer.panels_forward, "panels_serial": infer.panels_forward_serial,
                  "layerwise": infer.panels_layerwise, "half_panels_serial": infer.half_panels_serial,
                  "half_layerwise": infer.half_layerwise, "half_panels": infer.half_panels}


class NonFinite(Exception):
    """Raised by an engine that checks ``x`` itself (int8 activations) when samples held NaN or Inf: ``out``
    holds the results, NaN in those samples' rows."""

    def __init__(self, out):
        super().__init__("non-finite input")
        self.out = out


class _QChain:
    """Consecutive linear ops with 8-bit activations (``fanin.kernels.w8a8``). Batches below ``INT8_PANELS``
    (``INT8_PANELS_THREADS`` with several threads) go sample by sample, in blocks of ``w8a8.BLOCK`` samples that
    share a pass over each layer (the byte-permute kernel), the blocks over the threads; larger ones in panels of 32
    or 64 samples (the VNNI panel kernel), panels over the threads when there are several. Both compute each
    sample's integers and float steps identically, so a sample's logits do not depend on the batch it came in.
    Parallel runs follow the same policy and tuner as the float chain."""

    def __init__(self, ops):
        self.layout = w8a8.QLayout([_spec(op) for op in ops])
        self.n_out = self.layout.n_out
        self._arrays = self.layout.arrays
        self._serial_below = -(-PARALLEL_PANELS_MACS // max(1, self.layout.macs))  # batches that stay serial
        self._local = threading.local()
        self._tuners = {}
        self.last_path = None

    def _buffers(self, slots, P=0):
        local = self._local
        if slots == 1 and not P:
            ws = getattr(local, "ws1", None)
            if ws is None:
                ws = local.ws1 = self.layout.workspace(1)
            return ws
        cache = getattr(local, "ws", None)
        if cache is None:
            cache = local.ws = {}
        ws = cache.get((slots, P))
        if ws is None:
            ws = cache[(slots, P)] = self.layout.panel_workspace(slots, P) if P else self.layout.workspace(slots)
        return ws

    def plan_for(self, B: int, threads: int) -> tuple:
        """(path, P) when the threads may be used: "int8_rows" sample by sample (blocks over the threads) or
        "int8_panels" panels of P over the threads. Their serial forms ("..._serial") run when ``_choose`` says
        serial."""
        if B < (INT8_PANELS_THREADS if threads > 1 else INT8_PANELS):
            return "int8_rows", 0
        return "int8_panels", (64 if B >= 64 * max(1, threads) else 32)

    def run(self, x: np.ndarray) -> np.ndarray:
        B = x.shape[0]
        out = np.empty((B, self.n_out), np.float32)
        if B < self._serial_below:  # the latency path: no thread count, no tuner, no lock
            self.last_path = "int8_rows_serial"
            ws = getattr(self._local, "ws1", None)
            if w8a8.forward_serial(x, out, self._buffers(1) if ws is None else ws, *self._arrays):
                raise NonFinite(out)
            return out
        threads = numba.get_num_threads()
        path, P = self.plan_for(B, threads)
        units = B if not P else -(-B // P)  # what the threads share
        token, tuner = _choose(self._tuners, (path, B.bit_length()), threads > 1 and units > 1)
        self.last_path = path + ("" if token else "_serial")
        t0 = time.perf_counter()
        try:
            slots = min(units, threads) if token else 1
            if P:
                fn = w8a8.panels_forward if token else w8a8.panels_forward_serial
                bad = fn(x, out, P, *self._buffers(slots, P), *self.layout.panel_arrays)
            else:
                fn = w8a8.forward if token else w8a8.forward_serial
                bad = fn(x, out, self._buffers(slots), *self.layout.arrays)
            if bad:
                raise NonFinite(out)
            return out
        finally:
            _done(token, tuner, t0, B * self.layout.macs)

    def describe(self) -> str:
        kernel = "AVX-512 VBMI/VNNI" if w8a8.FAST else "portable"
        return (f"{self.layout.n_layers} linear layer(s) with int8 activations ({kernel} kernels), one compiled call: "
                f"sample by sample in blocks of {w8a8.BLOCK} below batch {INT8_PANELS} ({INT8_PANELS_THREADS} with "
                f"several threads), in panels of 32/64 samples from it; over the threads "
                f"from {PARALLEL_PANELS_MACS} multiply-adds per call")


class _Chain:
    """Consecutive linear ops run by one compiled call."""

    def __init__(self, ops):
        self.layout = infer.Layout([_spec(op) for op in ops], scatter=True)
        self.n_out = self.layout.n_out
        self.arrays = self.layout.arrays
        self.S = self.layout.S
        # batches below this size take the rows form on this thread whatever the thread count
        self._small = min(infer.SMALL_BATCH, -(-PARALLEL_ROWS_MACS // max(1, self.layout.macs)))
        # share of the multiply-adds in condensed layers: half panels pay for those (gathered block rows, which
        # the second core would otherwise read from the first one's cache), not for dense ones (contiguous)
        tab = self.layout.tab
        macs = tab[:, infer.F_NOUT] * tab[:, infer.F_K]
        self._condensed = float(macs[tab[:, infer.F_DENSE] == 0].sum()) / max(1, int(macs.sum()))
        self._local = threading.local()
        self._tuners = {}
        self.last_path = None
        self.scan = False  # True: x is the network's input, and run raises NonFinite (after computing) when it
        # holds NaN/Inf -- the panel drivers scan it as they pack it, the rows form with all_finite

    def _buffers(self, kind, n):
        cache = getattr(self._local, "cache", None)
        if cache is None:
            cache = self._local.cache = collections.OrderedDict()
        key = (kind, n)
        ws = cache.get(key)
        if ws is None:
            lay = self.layout
            ws = (lay.rows_workspace(n) if kind == "rows" else
                  lay.panels_workspace(n * infer.TB) if kind == "panels" else
                  lay.panels_workspace(n * infer.TBH, infer.TBH) if kind == "halves" else
                  lay.layerwise_workspace(n * infer.TB))
            cache[key] = ws
            while len(cache) > 1 and (len(cache) > _CACHE_SIZES or
                                      sum(a.nbytes for w in cache.values() for a in w) > _CACHE_BYTES):
                cache.popitem(last=False)
        return ws

    def _scatter_density(self, B: int) -> float:
        """The rows form's threshold for a condensed layer's scatter (``infer._rows_forward``'s ``sd``). The
        scatter runs on one thread: only for work that is never split, whatever the thread count and the tuner's
        choice, so that serial and parallel runs compute the same sums. SRigL-90 % MLP at batch 1, Intel Xeon:
        48 us parallel with it, 36 us gathering on both threads."""
        return infer.SCATTER_DENSITY if B * self.layout.macs < PARALLEL_ROWS_MACS else -1.0

    def plan_for(self, B: int, threads: int) -> str:
        """The driver a batch of B runs on with ``threads`` threads available (no lock or fork state)."""
        work = B * self.layout.macs
        if B < infer.SMALL_BATCH:
            return "rows" if threads > 1 and work >= PARALLEL_ROWS_MACS else "rows_serial"
        half = B <= infer.TBH  # one half-width panel (infer._half_family)
        n_panels = -(-min(B, CHUNK) // infer.TB)
        if threads <= 1 or work < PARALLEL_PANELS_MACS:
            return "half_panels_serial" if half else "panels_serial"
        if half:
            return "half_layerwise"
        # a half panel per thread (infer.half_panels) when condensed layers hold most of the work. 784-1024-1024-10
        # MLP, batch 32, Intel Xeon: SRigL 90 % 155 -> 146 us; dense 0.48 ms layerwise, 0.76 ms in half panels
        if n_panels == 1 and -(-B // infer.TBH) >= threads and self._condensed >= 0.5:
            return "half_panels"
        if n_panels % threads == 0 or n_panels >= 4 * threads:
            return "panels"
        return "layerwise"

    def run(self, x: np.ndarray) -> np.ndarray:
        B = x.shape[0]
        out = np.empty((B, self.n_out), np.float32)
        if B < self._small:  # the latency path: no thread count, no tuner, no lock
            self.last_path = "rows_serial"
            wa, wb, nz = self._buffers("rows", B)
            infer.rows_forward_serial(x, out, wa, wb, nz, self.S, 1 << 30, self._scatter_density(B), *self.arrays)
            if self.scan and not infer.all_finite(x):
                raise NonFinite(out)
            return out
        path = self.plan_for(B, numba.get_num_threads())
        token, tuner = _choose(self._tuners, (path == "rows", B.bit_length()), path in _SERIAL_OF)
        if not token:
            path = _SERIAL_OF.get(path, path)
        self.last_path = path  # what the latest call ran (for benchmarks and describe(); racy across threads)
        t0 = time.perf_counter()
        try:
            arrays = self.arrays
            if path in ("rows", "rows_serial"):
                wa, wb, nz = self._buffers("rows", B)
                fn = infer.rows_forward if path == "rows" else infer.rows_forward_serial
                fn(x, out, wa, wb, nz, self.S, infer.RB if path == "rows" else 1 << 30, self._scatter_density(B),
                   *arrays)
                if self.scan and not infer.all_finite(x):
                    raise NonFinite(out)
                return out
            fn = _PANEL_DRIVERS[path]
            # a half batch fits one panel's buffers; half_panels needs a block per half panel
            kind = "layerwise" if path.endswith("layerwise") else "halves" if path == "half_panels" else "panels"
            per = infer.TBH if kind == "halves" else infer.TB
            bad = 0
            for b0 in range(0, B, CHUNK):
                xb = x[b0:b0 + CHUNK]
                ws, wq = self._buffers(kind, -(-xb.shape[0] // per))
                bad += fn(xb, out[b0:b0 + CHUNK], ws, wq, *arrays)  # panels whose input holds NaN/Inf
            if bad and self.scan:
                raise NonFinite(out)
            return out
        finally:
            _done(token, tuner, t0, B * self.layout.macs)


# ------------------------------------------------------------------ conv, pooling (one step per op)
def _weights(op) -> np.ndarray:
    a = op["arrays"]
    if "values" in a:
        return np.ascontiguousarray(a["values"], dtype=np.float32)
    return np.ascontiguousarray(a["scale"][:, None] * a["qvalues"].astype(np.float32))  # what training used


def _activate(y, act):
    if act == "relu":
        np.maximum(y, 0, out=y)
    elif act == "gelu":
        from scipy import special  # here: importing scipy.special costs a fresh process ~0.15 s (fanin.load)

        y *= 0.5 * (1.0 + special.erf(y * np.float32(1 / np.sqrt(2))))
    return y


def _out_hw(shape, kernel, stride, padding) -> tuple:
    """(Ho, Wo) of a window op on a (C, H, W) input."""
    return kconv._output_size(shape[1], shape[2], *kernel, *stride, *padding)


class _Conv:
    """A convolution, dense or condensed, by the direct condensed kernel (a dense one reads every tap).

    Not im2col + BLAS for the dense case: on this 2-core machine the direct kernel is as fast or faster
    (1 thread, 3x3, 28x28 / 14x14 planes: 0.024 vs 0.041 ms at batch 1 and 0.50 vs 3.9 ms at batch 32 for
    1->32 channels, 3.7 vs 4.8 ms for 32->64 at batch 32), and BLAS's own threads, still spinning after a
    GEMM, fought Numba's for the two cores: the dense CNN took 8 ms per sample at batch 1 that way."""

    def __init__(self, op):
        self.act, self.bias = op["act"], op["arrays"]["bias"]
        self.kernel, self.stride, self.padding = tuple(op["kernel"]), tuple(op["stride"]), tuple(op["padding"])
        self.values = _weights(op)
        self.n_out, k = self.values.shape
        if op["sparse"]:
            self.indices = np.ascontiguousarray(op["arrays"]["indices"])
        else:
            self.indices = np.ascontiguousarray(np.broadcast_to(np.arange(k, dtype=np.int32), (self.n_out, k)))

    def macs(self, shape) -> tuple:
        """(multiply-adds per sample, output shape per sample) for an input of shape (C, H, W)."""
        ho, wo = _out_hw(shape, self.kernel, self.stride, self.padding)
        return self.n_out * ho * wo * self.values.shape[1], (self.n_out, ho, wo)

    def __call__(self, x, parallel):
        relu = self.act == "relu"  # fused into the kernel's stores; other activations are a NumPy pass
        y = kconv.fanin_conv2d_forward(x, self.indices, self.values, self.bias, self.kernel, self.stride,
                                       self.padding, parallel=parallel, relu=relu)
        return y if relu else _activate(y, self.act)


class _Pool:
    def __init__(self, op):
        self.max = op["op"] == "maxpool"
        self.k, self.s, self.p = tuple(op["kernel"]), tuple(op["stride"]), tuple(op["padding"])

    def macs(self, shape) -> tuple:
        ho, wo = _out_hw(shape, self.k, self.s, self.p)
        return shape[0] * ho * wo * self.k[0] * self.k[1], (shape[0], ho, wo)

    def __call__(self, x, parallel):
        (kh, kw), (sh, sw), (ph, pw) = self.k, self.s, self.p
        ho, wo = _out_hw(x.shape[1:], self.k, self.s, self.p)
        if self.max:
            fn = pool.max_pool_values if parallel else pool.max_pool_values_serial
            return fn(x, kh, kw, sh, sw, ph, pw, ho, wo)
        xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x
        out = np.zeros((x.shape[0], x.shape[1], ho, wo), np.float32)
        for i in range(kh):
            for j in range(kw):
                out += xp[:, :, i:i + sh * ho:sh, j:j + sw * wo:sw]
        return out * np.float32(1.0 / (kh * kw))


class _Flatten:
    @staticmethod
    def macs(shape) -> tuple:
        return 0, (int(np.prod(shape)),)

    def __call__(self, x, parallel):
        return np.ascontiguousarray(x.reshape(x.shape[0], -1))


class _Engine:
    def __init__(self, plan, activations="float32"):
        ops = plan["ops"]
        head = len(ops)
        while head > 0 and ops[head - 1]["op"] == "linear":
            head -= 1
        self.steps = []
        for op in ops[:head]:
            kind = op["op"]
            if kind == "conv":
                self.steps.append(_Conv(op))
            elif kind in ("maxpool", "avgpool"):
                self.steps.append(_Pool(op))
            elif kind == "flatten":
                self.steps.append(_Flatten())
            else:  # pragma: no cover -- check() puts every linear op after the last non-linear one
                raise ValueError(f"engine: unexpected op {kind!r} before the linear head")
        self.activations = activations
        self.chain = _QChain(ops[head:]) if activations == "int8" else _Chain(ops[head:])
        if activations != "int8":
            self.chain.scan = not self.steps
        self._n_steps = head
        # multiply-adds per sample of the steps before the chain (convolutions; pooling counted as window reads)
        shape, self.front_macs = tuple(plan["input_shape"]), 0
        for step in self.steps:
            m, shape = step.macs(shape)
            self.front_macs += m
        self._tuners = {}
        self.last_front = None  # "serial" / "parallel": what the latest call's convolutions ran (racy)

    def _front(self, x):
        """The convolutions and pooling, all serial or all parallel under the process's parallel policy (a
        forked child, the workqueue lock) and, for work the rule sends to threads, the tuner's measurement."""
        B = x.shape[0]
        token, tuner = _choose(self._tuners, B.bit_length(),
                               numba.get_num_threads() > 1 and B * self.front_macs >= PARALLEL_FRONT_MACS)
        self.last_front = "parallel" if token else "serial"
        t0 = time.perf_counter()
        try:
            for step in self.steps:
                x = step(x, bool(token))
            return x
        finally:
            _done(token, tuner, t0, B * self.front_macs)

    @property
    def checks_finite(self) -> bool:
        """True when ``run`` itself finds NaN/Inf in x (raising ``NonFinite``): an MLP, whose input quantizer
        (int8 activations) or panel packing (float32) reads x anyway, so ``predict`` need not scan it first."""
        return not self.steps

    def run(self, x):
        if self.steps:
            x = self._front(x)
        return self.chain.run(x)

    def describe(self) -> str:
        head = (f"cpu: {self._n_steps} op(s) one call each, then " if self._n_steps else "cpu: ")
        if self.activations == "int8":
            return f"{head}{self.chain.describe()}; {_PARALLEL.disabled or 'parallel layer ' + (_PARALLEL.layer or 'not started yet')}"
        lay = self.chain.layout
        kinds = {infer.VK_F32: "fp32", infer.VK_I8: "int8", infer.VK_I4: "4-bit"}
        bits = "/".join(kinds[int(v)] for v in lay.tab[:, infer.F_VK])
        head = (f"{self._n_steps} op(s) one call each (serial, or parallel from {PARALLEL_FRONT_MACS} "
                f"multiply-adds per call), then " if self._n_steps else "")
        par = _PARALLEL.disabled or f"parallel layer {_PARALLEL.layer or 'not started yet'}"
        tiled = [f"{i + 1} ({int(n)} chunks)" for i, n in enumerate(lay.tab[:, infer.F_TNC]) if n]
        tiled = f" (input-tiled: layer {', '.join(tiled)})" if tiled else ""
        return (f"cpu: {head}{lay.n_layers} linear layer(s) ({bits}) in one compiled call: rows form below batch "
                f"{infer.SMALL_BATCH}, panels of {infer.TBH} up to batch {infer.TBH}, of {infer.TB} above{tiled}; "
                f"{par}; {numba.get_num_threads()} thread(s)")


def build(plan, activations: str = "float32"):
    """The prepared engine of a validated plan: ``run(x)`` for a C-contiguous float32 (B, *input_shape) x
    (B >= 1) returns a new (B, n_classes) float32 array; ``describe()`` says how it runs. ``activations``:
    "float32" (the float path), or "int8" (the linear layers with 8-bit activations, ``fanin.kernels.w8a8``)."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}.")
    return _Engine(plan, activations)
