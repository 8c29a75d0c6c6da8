"""Benchmark the condensed fan-in kernels against dense BLAS and CSR, in one run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_kernels.py [--quick] [--out bench/RESULTS.md]

Baselines: NumPy dense ``x @ W.T`` (BLAS reported via threadpoolctl), SciPy CSR (the faster of
``W_csr @ x.T`` and ``x @ W_csr.T``), and PyTorch dense / ``torch.sparse_csr`` when torch imports.
Every number is the median of repeated calls (>= 0.2 s per measurement, after warm-up).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import fanin.tuning  # noqa: E402
fanin.tuning.apply()  # before NumPy loads OpenBLAS: the training tuning (opt-in since import fanin sets nothing)
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import common  # noqa: E402  (bench/common.py)
import scipy.sparse as sp  # noqa: E402

import fanin.kernels as K  # noqa: E402

try:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
except ImportError:
    torch = None

MIN_TIME = 0.2
TARGETS = {"b1_dense": 4.0, "b1_csr": 2.5, "b256_dense": 2.5, "b256_csr": 4.0, "fb_dense": 3.0, "bw": 0.6}


ROUNDS = 3


def t(fn) -> float:
    return common.median_time(fn, min_time=MIN_TIME, min_reps=5, warmup=2)


def compare(fns: dict) -> dict:
    """Min over ROUNDS round-robin rounds of each function's median time.

    Interleaving the contenders and keeping each one's best round makes a burst of load from
    another process (this VM is shared) hit every contender alike or be discarded.
    """
    best = {name: np.inf for name in fns}
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            best[name] = min(best[name], common.median_time(fn, min_time=MIN_TIME / ROUNDS, min_reps=3, warmup=1))
    return best


def make_layer(n_out, n_in, sparsity, rng):
    k = max(1, int(round(n_in * (1 - sparsity))))
    idx = np.sort(np.argsort(rng.random((n_out, n_in), dtype=np.float32), axis=1)[:, :k], axis=1)
    idx = idx.astype(K.index_dtype(n_in))
    vals = rng.standard_normal((n_out, k), dtype=np.float32)
    w = np.zeros((n_out, n_in), np.float32)
    np.put_along_axis(w, idx.astype(np.int64), vals, axis=1)
    return idx, vals, w


def forward_times(idx, vals, w, x):
    """Best-of-rounds median seconds of each forward implementation for input x (B, n_in)."""
    csr = sp.csr_matrix(w)
    csr_t = sp.csr_matrix(w.T)
    xt = np.ascontiguousarray(x.T)
    fns = {"ours": lambda: K.fanin_forward(x, idx, vals, check=False), "numpy": lambda: x @ w.T,
           "csr": lambda: csr @ xt}
    if x.shape[0] > 1:
        fns["csr_right"] = lambda: x @ csr_t
    if torch is not None:
        tw, tx = torch.from_numpy(w), torch.from_numpy(x)
        tcsr = tw.to_sparse_csr()
        txt = tx.T.contiguous()
        fns["torch"] = lambda: torch.nn.functional.linear(tx, tw)
        fns["torch_csr"] = lambda: torch.sparse.mm(tcsr, txt)
    with torch.no_grad() if torch is not None else _nullcontext():
        out = compare(fns)
    out["csr"] = min(out["csr"], out.pop("csr_right", np.inf))
    return out


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def fwd_bwd_times(idx, vals, w, x, dy):
    """Forward + backward (dx and dW / dvalues).

    Ours uses the transposed structure the way a layer does: built once per topology (outside
    the timed loop; its one-off cost is reported separately), reused on every step.
    """
    tr = K.transpose_structure(idx, x.shape[1])

    def ours():
        K.fanin_forward(x, idx, vals, check=False)
        K.fanin_backward(x, idx, vals, dy, check=False, transposed=tr)

    def dense():
        x @ w.T
        dy @ w
        dy.T @ x

    fns = {"ours": ours, "numpy": dense}
    if torch is not None:
        tw, tx, tdy = torch.from_numpy(w), torch.from_numpy(x), torch.from_numpy(dy)

        def tdense():
            tx @ tw.T
            tdy @ tw
            tdy.T @ tx

        fns["torch"] = tdense
    with torch.no_grad() if torch is not None else _nullcontext():
        out = compare(fns)
    out["transpose_once"] = common.median_time(lambda: K.transpose_structure(idx, x.shape[1], check=False),
                                               min_time=0.05, min_reps=3, warmup=1)
    return out


def stream_read_bandwidth(nbytes: int) -> dict:
    """Bytes/s of reading an array of nbytes: np.sum and a Numba parallel sum (best of the two)."""
    import numba

    @numba.njit(parallel=True, fastmath=True)
    def psum(a):
        s = np.float32(0)
        for i in numba.prange(a.size):
            s += a[i]
        return s

    a = np.ones(nbytes // 4, np.float32)
    psum(a)
    best = compare({"np.sum": lambda: a.sum(), "numba": lambda: psum(a)})
    return {name: nbytes / sec for name, sec in best.items()}


FIRST_CALL = textwrap.dedent("""
    import time, numpy as np
    t0 = time.perf_counter()
    import fanin.kernels as K
    t1 = time.perf_counter()
    rng = np.random.default_rng(0)
    idx = np.sort(rng.permuted(np.tile(np.arange(512), (256, 1)), axis=1)[:, :51], axis=1).astype(np.int16)
    vals = rng.standard_normal(idx.shape, dtype=np.float32)
    res = {}
    for b in (1, 64):
        x = rng.standard_normal((b, 512), dtype=np.float32); dy = rng.standard_normal((b, 256), dtype=np.float32)
        s = time.perf_counter(); K.fanin_forward(x, idx, vals); K.fanin_backward(x, idx, vals, dy)
        res[b] = time.perf_counter() - s
    print(t1 - t0, res[1], res[64])
""")


def launch_overhead_us() -> float:
    """Microseconds of an empty two-iteration Numba prange: the cost of waking the thread team."""
    import numba

    @numba.njit(parallel=True)
    def nop(a):
        for i in numba.prange(a.size):
            a[i] = i

    a = np.zeros(2)
    nop(a)
    return compare({"nop": lambda: nop(a)})["nop"] * 1e6


def first_call_times(cache_dir=None):
    """(import s, first fwd+bwd batch-1 s, first fwd+bwd batch-64 s) in a fresh process."""
    env = dict(os.environ)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    root = pathlib.Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", FIRST_CALL], capture_output=True, text=True, env=env, cwd=root, check=True)
    return tuple(float(v) for v in r.stdout.split())


def ms(s):
    return f"{s * 1e3:.3f}"


def ratio(a, b):
    return f"{a / b:.2f}x" if np.isfinite(a) else "-"


def chart(fwd_rows, path) -> bool:
    """Speed-up over NumPy dense per layer and batch, one line per sparsity (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    layers = sorted({r[0] for r in fwd_rows}, key=lambda n: [r[0] for r in fwd_rows].index(n))
    for ax, layer in zip(axes, layers):
        for s in sorted({r[1] for r in fwd_rows}):
            pts = [(r[2], float(r[8].rstrip("x"))) for r in fwd_rows if r[0] == layer and r[1] == s]
            ax.plot([str(b) for b, _ in pts], [v for _, v in pts], "o-", label=f"{s:.0%} sparse")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(f"{layer} (out x in)")
        ax.set_xlabel("batch")
        ax.set_yscale("log")
    axes[0].set_ylabel("speed-up vs NumPy dense (x)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="90 %% sparsity only")
    ap.add_argument("--out", help="write a 'Kernels' section into this markdown file")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    shapes = [(768, 3072), (3072, 768), (4096, 4096)]
    sparsities = [0.9] if args.quick else [0.8, 0.9, 0.95, 0.99]
    batches = [1, 32, 256]
    load0 = os.getloadavg()[0]
    lines = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    import tempfile

    with tempfile.TemporaryDirectory(prefix="fanin_numba_cold_") as empty_cache:
        first_cold = first_call_times(cache_dir=empty_cache)
    K.fanin_forward(np.ones((1, 8), np.float32), np.zeros((1, 1), np.int16), np.ones((1, 1), np.float32))
    first_warm = first_call_times()

    fwd_rows, fb_rows, checks = [], [], []
    for n_out, n_in in shapes:
        for s in sparsities:
            idx, vals, w = make_layer(n_out, n_in, s, rng)
            for b in batches:
                x = rng.standard_normal((b, n_in), dtype=np.float32)
                r = forward_times(idx, vals, w, x)
                row = [f"{n_out}x{n_in}", s, b, ms(r["ours"]), ms(r["numpy"]), ms(r["csr"])]
                row += [ms(r["torch"]), ms(r["torch_csr"])] if torch is not None else ["-", "-"]
                row += [ratio(r["numpy"], r["ours"]), ratio(r["csr"], r["ours"])]
                row += [ratio(r["torch"], r["ours"]), ratio(r["torch_csr"], r["ours"])] if torch is not None else ["-", "-"]
                fwd_rows.append(row)
                print(" | ".join(str(c) for c in row), flush=True)
                if s == 0.9 and b in (1, 256):
                    checks.append((f"batch {b} vs NumPy dense", f"{n_out}x{n_in}", r["numpy"] / r["ours"], TARGETS[f"b{b}_dense"]))
                    checks.append((f"batch {b} vs SciPy CSR", f"{n_out}x{n_in}", r["csr"] / r["ours"], TARGETS[f"b{b}_csr"]))
            x = rng.standard_normal((128, n_in), dtype=np.float32)
            dy = rng.standard_normal((128, n_out), dtype=np.float32)
            if s in (0.9, 0.99) or not args.quick:
                r = fwd_bwd_times(idx, vals, w, x, dy)
                row = [f"{n_out}x{n_in}", s, 128, ms(r["ours"]), ms(r["numpy"]), ms(r.get("torch", np.nan)),
                       ratio(r["numpy"], r["ours"]), ratio(r.get("torch", np.nan), r["ours"]), ms(r["transpose_once"])]
                fb_rows.append(row)
                print("fwd+bwd", " | ".join(str(c) for c in row), flush=True)
                if s == 0.9:
                    checks.append(("fwd+bwd batch 128 vs NumPy dense", f"{n_out}x{n_in}", r["numpy"] / r["ours"], TARGETS["fb_dense"]))

    # batch-1 bandwidth on 4096x4096 at 90 %
    idx, vals, w = make_layer(4096, 4096, 0.9, rng)
    x = rng.standard_normal((1, 4096), dtype=np.float32)
    nbytes = idx.nbytes + vals.nbytes + x.nbytes + 4096 * 4
    bw = stream_read_bandwidth(nbytes)
    ours = compare({"ours": lambda: K.fanin_forward(x, idx, vals, check=False)})["ours"]
    best_stream = max(bw.values())
    checks.append(("batch-1 bytes/s vs streaming read", "4096x4096", (nbytes / ours) / best_stream, TARGETS["bw"]))

    log(common.header("env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_kernels.py"
                      + (" --quick" if args.quick else "")))
    log(f"- numba {__import__('numba').__version__}, threading layer {__import__('numba').threading_layer()}, "
        f"{__import__('numba').get_num_threads()} threads; torch {torch.__version__ if torch else 'not installed'}"
        f"{f' ({torch.get_num_threads()} threads)' if torch else ''}")
    log(f"- OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} (set by fanin/__init__.py unless given), "
        f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}, "
        f"OPENBLAS_THREAD_TIMEOUT={os.environ.get('OPENBLAS_THREAD_TIMEOUT')}")
    log(f"- load average (1 min) at start / end: {load0:.2f} / {os.getloadavg()[0]:.2f} (the end value includes "
        "this benchmark's own two threads)")
    if load0 > 0.7:
        log("- WARNING: another process was using the CPUs during this run. OpenBLAS's threads sched_yield() to it while"
            " waiting (even to a nice-19 process), so the NumPy dense baselines (and so the 'vs numpy' ratios and target"
            " checks) can be wildly off (seen: 8 ms for a 0.07 ms gemv); re-run on a quiet machine before trusting them")
    log("- times in ms: each contender's median over ~0.07 s, best of 3 interleaved rounds; ratios are baseline time / our time (> 1: we are faster)")
    log()
    log("### Forward")
    log()
    log(common.table(fwd_rows, ["layer (out x in)", "sparsity", "batch", "ours", "numpy dense", "scipy csr",
                                "torch dense", "torch csr", "vs numpy", "vs csr", "vs torch", "vs torch csr"]))
    log()
    if chart(fwd_rows, pathlib.Path(__file__).resolve().parent / "kernels_speedup.png"):
        log("![forward speed-up over NumPy dense](kernels_speedup.png)")
        log()
    log("### Forward + backward (dx and dvalues; dense: y = x W^T, dx = dy W, dW = dy^T x)")
    log()
    log("dx is a forward over the transposed (CSC) structure, `K.transpose_structure(indices, n_in)`, built once per"
        " topology outside the timed loop as a layer caches it; its one-off cost is the last column.")
    log()
    log(common.table(fb_rows, ["layer", "sparsity", "batch", "ours", "numpy dense", "torch dense", "vs numpy", "vs torch",
                               "transpose (once)"]))
    log()
    log("### Batch-1 bandwidth, 4096x4096 at 90 %")
    log()
    log(f"- bytes moved (indices + values + x + y): {nbytes / 1e6:.2f} MB in {ms(ours)} ms = {nbytes / ours / 1e9:.1f} GB/s")
    log(f"- streaming read of the same number of bytes: np.sum {bw['np.sum'] / 1e9:.1f} GB/s, "
        f"Numba parallel sum {bw['numba'] / 1e9:.1f} GB/s")
    log()
    log("### First call (fresh process: import, then forward+backward at batch 1 and 64)")
    log()
    log(f"- cold cache (compiles): import {first_cold[0]:.2f} s, batch 1 {first_cold[1]:.2f} s, batch 64 {first_cold[2]:.2f} s")
    log(f"- warm cache (`cache=True`): import {first_warm[0]:.2f} s, batch 1 {first_warm[1]:.3f} s, batch 64 {first_warm[2]:.3f} s")
    log()
    log("### Notes")
    log()
    log(f"- an empty Numba parallel loop costs {launch_overhead_us():.1f} us here (waking the OpenMP team);"
        " with OMP_WAIT_POLICY=PASSIVE and no GOMP_SPINCOUNT that is ~60 us, so batch-1 layers under ~1M"
        " multiply-adds run on one thread instead")
    log("- batch 1 is bound by the gathers x[idx] (about one element per cycle per core), not by bytes;"
        " the smaller layers' dense matrices (9.4 MB) sit in the 32 MB L3, where BLAS gemv streams ~150 GB/s")
    log()
    log("### Targets (90 % sparsity)")
    log()
    log(common.table([[what, layer, f"{got:.2f}", f">= {want}", "met" if got >= want else f"MISSED by {want / got:.2f}x"]
                      for what, layer, got, want in checks], ["target", "layer", "measured", "wanted", "status"]))
    if args.out:
        common.write_section(args.out, "Kernels", "\n".join(lines))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
