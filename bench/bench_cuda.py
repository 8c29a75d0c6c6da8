"""The condensed kernels and SRigL training on an NVIDIA GPU, against PyTorch dense (cuBLAS) and torch.sparse_csr
(cuSPARSE), in one run.

    python bench/bench_cuda.py [--quick] [--sweep] [--rounds 5] [--epochs 2] [--train-rounds 3] [--out FILE]

Output starts with ``nvidia-smi --query-gpu=name,driver_version --format=csv`` (which card and driver made the
numbers). Kernel times are CUDA-event times per call: each contender runs ``reps`` calls between two events after a
warm-up (the first call compiles), contenders are interleaved over ``--rounds`` rounds, and the table reports each
one's median round. Events on the legacy default stream, which Numba and PyTorch share, so both are measured alike;
when Python launch overhead exceeds a call's GPU work, the event time is the launch-bound time a user's loop sees.

Table (the kernel table of bench/bench_kernels.py, on the GPU): layers 4096x4096, 768x3072, 3072x768 at 90 %
(``--quick``: 4096x4096 only), batch 1 and 256:
- fanin forward (``fanin.kernels.fanin_forward`` on device arrays and a Topology),
- PyTorch dense ``F.linear`` fp32 with TF32 off (full fp32 FMA: the like-for-like baseline, bias included as
  fanin's) and TF32 on; the fp32 GEMM without a bias also feeds a target line (a bias costs PyTorch a second pass),
- ``torch.sparse_csr`` (cuSPARSE SpMM ``W_csr @ x^T``, the input given transposed),
- forward+backward at batch 256 (fanin: forward, dx, dvalues; dense: three GEMMs).
Training: epochs of the SRigL-90 % MLP 784-4096-4096-10 (fanin, SGD momentum, SRigL every 100 steps with its
update on the host) vs the dense MLP in PyTorch on the same GPU, batch 256, on Fashion-MNIST if found (else
random data of its shape, said so). Before the timed epochs a throwaway model of the same shapes runs a few steps
with SRigL updates (every kernel compiles on its first launch: that is excluded), then a few plain steps give the
cost of a step without updates; every timed epoch counts (median), PyTorch warmed up likewise.
Host overhead: the host time a call of a batch-1 forward and a batch-256 fwd+bwd with fanin's fast kernel launch
on and off (``fanin.kernels.cuda_kernels.FAST_LAUNCH``; off is Numba's own launch path), launch and pool counts, and a
cProfile of 200 batch-1 forwards at 4096x4096 (top 12 functions by own time): where the host time of a call goes.
``--sweep`` adds the batched kernels' launch plans (forward and dx: tile and panel kernels; dvalues; 4096x4096, batch
256; each checked against the CPU first), and every
kernel line is followed by the host-side time a call (Python and launches): when it is about the event time the
GPU waited for the host. Anything that cannot run is listed at the end with the reason.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

TARGETS = {"b256_dense": 2.0, "b256_csr": 15.0, "b1_dense": 3.0, "fb_dense": 1.5}
SKIPPED: list = []


def log(s=""):
    print(s, flush=True)
    LINES.append(s)


LINES: list = []


def gpu_header() -> str:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "nvidia-smi: not found"
    r = subprocess.run([exe, "--query-gpu=name,driver_version", "--format=csv"], capture_output=True, text=True)
    return (r.stdout or r.stderr).strip() or f"nvidia-smi exited {r.returncode}"


def no_gpu_reason():
    try:
        import numba_cuda  # noqa: F401
    except ImportError:
        return "numba-cuda is not installed (pip install -e '.[cuda]')"
    from fanin import device

    try:
        device.backend()
    except device.CUDAUnavailableError as exc:
        return str(exc)
    from fanin.kernels import cuda as KC

    if KC.SIMULATOR:
        return "NUMBA_ENABLE_CUDASIM=1 is set (the simulator is not a GPU)"
    return None


# ------------------------------------------------------------------ timing
class Timer:
    """CUDA-event timing of ``fn`` (``reps`` calls between two events), median over interleaved rounds."""

    def __init__(self, rounds: int):
        from numba import cuda

        self.cuda, self.rounds = cuda, rounds
        self.host: dict = {}  # name -> median host-side seconds a call (Python + launches, before the sync)

    def per_call(self, fn, reps: int, host=None) -> float:
        c = self.cuda
        try:
            start, stop = c.event(timing=True), c.event(timing=True)
        except TypeError:  # the simulator's events take no arguments
            start, stop = c.event(), c.event()
        start.record()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if host is not None:
            host.append((time.perf_counter() - t0) / reps)
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3 / reps

    def compare(self, fns: dict, target_s: float = 0.05) -> dict:
        """Median event time a call of each fn; ``self.host[name]``: its host-side time a call. When the two are
        about equal the GPU waited for the host (launch-bound), not the other way round."""
        reps = {}
        for name, fn in fns.items():  # warm-up (compiles), then size reps to ~target_s per round
            fn()
            fn()
            self.cuda.synchronize()
            t = self.per_call(fn, 3)
            reps[name] = int(max(3, min(2000, target_s / max(t, 1e-7)))) if self.rounds > 1 else 1
        times = {name: [] for name in fns}
        host = {name: [] for name in fns}
        for _ in range(self.rounds):
            for name, fn in fns.items():
                times[name].append(self.per_call(fn, reps[name], host[name]))
        self.host.update({name: float(np.median(v)) for name, v in host.items()})
        return {name: float(np.median(v)) for name, v in times.items()}


def us(s):
    return f"{s * 1e6:.1f}"


def ratio(a, b):
    return f"{b / a:.2f}x" if a and b and np.isfinite(a) and np.isfinite(b) else "-"


# ------------------------------------------------------------------ kernels
def layer(n_out, n_in, sparsity, rng):
    from fanin import kernels as K

    k = max(1, int(n_in * (1 - sparsity)))
    idx = np.argsort(rng.random((n_out, n_in), dtype=np.float32), axis=1)[:, :k]
    idx.sort(axis=1)
    vals = (rng.standard_normal((n_out, k)) / np.sqrt(k)).astype(np.float32)
    w = np.zeros((n_out, n_in), np.float32)
    np.put_along_axis(w, idx, vals, axis=1)
    return K.Topology(idx.astype(K.index_dtype(n_in)), n_in), vals, w


def kernel_table(shapes, batches, timer, torch):
    from numba import cuda

    from fanin import kernels as K

    rng = np.random.default_rng(0)
    rows = []
    for n_out, n_in in shapes:
        topo, vals, w = layer(n_out, n_in, 0.9, rng)
        dvals = cuda.to_device(vals)
        bias = cuda.to_device(np.zeros(n_out, np.float32))
        tw = torch.from_numpy(w).cuda() if torch else None
        tb = torch.zeros(n_out, device="cuda") if torch else None
        tcsr = None
        if torch:
            try:
                tcsr = tw.to_sparse_csr()
            except Exception as exc:  # noqa: BLE001
                SKIPPED.append(f"torch.sparse_csr {n_out}x{n_in}: {exc}")
        K.fanin_forward(cuda.to_device(np.zeros((1, n_in), np.float32)), topo, dvals, bias)  # device copies of topo
        for B in batches:
            x = rng.standard_normal((B, n_in)).astype(np.float32)
            dx = cuda.to_device(x)
            fns = {"fanin": lambda dx=dx: K.fanin_forward(dx, topo, dvals, bias)}
            if torch:
                tx = torch.from_numpy(x).cuda()
                txt = tx.t().contiguous()

                def dense_off(tx=tx):
                    torch.backends.cuda.matmul.allow_tf32 = False
                    return torch.nn.functional.linear(tx, tw, tb)

                def dense_tf32(tx=tx):
                    torch.backends.cuda.matmul.allow_tf32 = True
                    return torch.nn.functional.linear(tx, tw, tb)

                def dense_nobias(tx=tx):  # the bare GEMM: F.linear with a bias adds a pass over the output
                    torch.backends.cuda.matmul.allow_tf32 = False
                    return torch.nn.functional.linear(tx, tw)

                fns["dense"] = dense_off
                fns["dense_nobias"] = dense_nobias
                fns["dense_tf32"] = dense_tf32
                if tcsr is not None:
                    fns["csr"] = lambda txt=txt: torch.mm(tcsr, txt)
            t = timer.compare(fns)
            torch and setattr(torch.backends.cuda.matmul, "allow_tf32", False)
            row = {"layer": f"{n_out}x{n_in}", "B": B, **t}
            if B >= 8:
                dy = cuda.to_device(rng.standard_normal((B, n_out)).astype(np.float32))

                def fb():
                    K.fanin_forward(dx, topo, dvals, bias)
                    K.fanin_backward(dx, topo, dvals, dy)

                fb_fns = {"fanin_fb": fb}
                if torch:
                    tdy = torch.randn(B, n_out, device="cuda")

                    def dense_fb(tf32):
                        def go():
                            torch.backends.cuda.matmul.allow_tf32 = tf32
                            torch.nn.functional.linear(tx, tw, tb)
                            torch.mm(tdy, tw)
                            torch.mm(tdy.t(), tx)
                        return go

                    fb_fns["dense_fb"] = dense_fb(False)
                    fb_fns["dense_fb_tf32"] = dense_fb(True)
                row.update(timer.compare(fb_fns))
                torch and setattr(torch.backends.cuda.matmul, "allow_tf32", False)
            rows.append(row)
            log(f"  {row['layer']} B={B}: " + ", ".join(f"{k} {us(v)} us" for k, v in row.items()
                                                          if isinstance(v, float)))
            log(f"    host side a call (Python + launches; about the event time = launch-bound): fanin "
                f"{us(timer.host['fanin'])} us" + (f", fanin_fb {us(timer.host['fanin_fb'])} us" if B >= 8 else "")
                + (f", dense {us(timer.host['dense'])} us" if 'dense' in timer.host else ""))
    return rows


SWEEP_PLANS = [None, (1, 8, 8),  # the default, then the tile kernel's plan before the panel kernel
               (2, 8, 8, 96 * 1024), (2, 16, 4, 96 * 1024), (2, 16, 8, 160 * 1024), (2, 16, 8, 200 * 1024),
               (2, 16, 8, 224 * 1024), (2, 32, 4, 200 * 1024), (2, 16, 16, 200 * 1024), (1, 16, 8, 200 * 1024),
               (2, 24, 8, 200 * 1024)]


def plan_sweep(timer, n=4096, B=256, simulate=False, torch=None):
    """Launch plans of the forward and dx (``fanin.kernels.cuda.PLAN_OVERRIDE``: (spl, warps, rows a warp) is the
    tile kernel, (spl, warps, rows a warp, shared bytes) the panel kernel) and the value gradient's
    (DVALS_PLAN_OVERRIDE) at n x n, 90 %, batch B: each result checked against the CPU kernels first (largest
    difference relative to the largest output), then timed, interleaved with cuBLAS fp32 (PyTorch ``F.linear``,
    TF32 off) when torch has CUDA, so each plan's ratio to it comes from the same rounds."""
    from numba import cuda

    from fanin import kernels as K
    from fanin.kernels import cuda as KC

    plans = SWEEP_PLANS
    if simulate:
        n, B = 40, 9
        plans = [None, (1, 2, 2), (2, 2, 2, 65 * 4 * 8)]
    rng = np.random.default_rng(1)
    topo, vals, w = layer(n, n, 0.9, rng)
    dvals = cuda.to_device(vals)
    x = rng.standard_normal((B, n)).astype(np.float32)
    dy = rng.standard_normal((B, n)).astype(np.float32)
    dx, ddy = cuda.to_device(x), cuda.to_device(dy)
    ref_y, ref_g = K.fanin_forward(x, topo, vals), K.fanin_backward_input(topo, vals, dy, n)
    dv = [None, (2, 8, 8), (2, 8, 2)] if not simulate else [None]
    lines = [f"plan sweep {n}x{n} at 90 %, batch {B} (None = the default: {KC._plan(n, B)} fwd/dx, "
             f"{KC._dvals_plan(n, B)} dvalues); error = max |gpu - cpu| / max |cpu|:"]
    fns = {}
    if torch is not None:
        tw, tx = torch.from_numpy(w).cuda(), torch.from_numpy(x).cuda()

        def dense():
            torch.backends.cuda.matmul.allow_tf32 = False
            return torch.nn.functional.linear(tx, tw)
        fns["cuBLAS fp32 (dense)"] = dense
    try:
        for plan in plans:
            KC.PLAN_OVERRIDE = plan
            try:
                ey = np.abs(K.fanin_forward(dx, topo, dvals).copy_to_host() - ref_y).max() / np.abs(ref_y).max()
                eg = np.abs(K.fanin_backward_input(topo, dvals, ddy, n).copy_to_host() - ref_g).max() / np.abs(
                    ref_g).max()
            except Exception as exc:  # noqa: BLE001 - a plan this GPU refuses: say so, time the others
                lines.append(f"  {plan}: failed: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            lines.append(f"  {plan}: error fwd {ey:.1e}, dx {eg:.1e}")

            def f(plan=plan):
                KC.PLAN_OVERRIDE = plan
                K.fanin_forward(dx, topo, dvals)

            def g(plan=plan):
                KC.PLAN_OVERRIDE = plan
                K.fanin_backward_input(topo, dvals, ddy, n)
            fns[f"fwd {plan}"] = f
            fns[f"dx {plan}"] = g
        for plan in dv:
            def h(plan=plan):
                KC.PLAN_OVERRIDE = None  # (the fwd/dx contenders leave theirs set; it would force dvalues too)
                KC.DVALS_PLAN_OVERRIDE = plan
                K.fanin_backward_values(dx, topo, ddy)
            fns[f"dvalues {plan}"] = h
        t = timer.compare(fns)
    finally:
        KC.PLAN_OVERRIDE = KC.DVALS_PLAN_OVERRIDE = None
    base = t.get("cuBLAS fp32 (dense)")
    for name, v in t.items():
        lines.append(f"  {name}: {us(v)} us" + (f" ({base / v:.2f}x cuBLAS fp32)" if base else ""))
    return lines


def _host_per_call(fn, calls: int, rounds: int = 5) -> float:
    """Median host seconds a call of fn over ``rounds`` loops of ``calls`` (the GPU synchronised, and Numba's
    pending frees flushed, before each loop: a flush inside would wait for the GPU)."""
    from numba import cuda

    times = []
    for _ in range(rounds):
        cuda.synchronize()
        try:
            cuda.current_context().deallocations.clear()
        except Exception:  # noqa: BLE001 - the simulator has no deallocation queue
            pass
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls)
    cuda.synchronize()
    return float(np.median(times))


def host_profile(n=4096, calls=200, top=12, simulate=False) -> list:
    """Where the host time of a call goes: ``fanin_forward`` at n x n, 90 %, batch 1 (device arrays, a Topology),
    timed with the fast launch path (cuda_kernels.Kernel) on and off, fwd+bwd at batch 256 likewise, then cProfile
    of ``calls`` batch-1 forwards (top functions by own time)."""
    import cProfile
    import pstats

    from numba import cuda

    from fanin import kernels as K
    from fanin.kernels import cuda_kernels as CK

    if simulate:
        n, calls = 40, 3
    rng = np.random.default_rng(2)
    topo, vals, _ = layer(n, n, 0.9, rng)
    dvals = cuda.to_device(vals)
    bias = cuda.to_device(np.zeros(n, np.float32))
    x1 = cuda.to_device(rng.standard_normal((1, n)).astype(np.float32))
    B = 9 if simulate else 256
    xb = cuda.to_device(rng.standard_normal((B, n)).astype(np.float32))
    dyb = cuda.to_device(rng.standard_normal((B, n)).astype(np.float32))

    def fwd():
        K.fanin_forward(x1, topo, dvals, bias)

    def fb():
        K.fanin_forward(xb, topo, dvals, bias)
        K.fanin_backward(xb, topo, dvals, dyb)

    from fanin.kernels import cuda as KC

    lines = [f"host overhead: fanin_forward {n}x{n} at 90 %, batch 1, and fwd+bwd at batch {B} (device arrays, a "
             f"Topology); host us a call, medians of 5 loops:"]
    fast, pool = CK.FAST_LAUNCH, KC.POOL_LIMIT
    configs = [("Numba's launch, Numba's allocation", False, 0), ("fast launch, Numba's allocation", True, 0),
               ("fast launch, fanin's pool", True, pool)]
    if not fast:  # fast launches switched off (FANIN_FAST_LAUNCH=0, or the simulator)
        configs = configs[:1]
    try:
        for name, on, limit in configs:
            CK.FAST_LAUNCH, KC.POOL_LIMIT = on, limit
            fwd(), fb(), fwd(), fb()  # compiled, fast-launch entries made
            a, b = _host_per_call(fwd, calls), _host_per_call(fb, max(2, calls // 10))
            lines.append(f"  {name}: forward B=1 {us(a)} us, fwd+bwd B={B} {us(b)} us")
        CK.FAST_LAUNCH, KC.POOL_LIMIT = fast, pool
        st = CK.FAST_STATS
        lines.append(f"  so far: {st['fast']} fast launches, {st['numba']} through Numba; fast-launch entries "
                     f"{st['entries']}, refused {st['refused']}" + (f" (first: {CK._REFUSED[0]})" if CK._REFUSED else "")
                     + f"; pool hits {KC.POOL_STATS['hits']}, misses {KC.POOL_STATS['misses']}")
        fwd()
        cuda.synchronize()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(calls):
            fwd()
        pr.disable()
        cuda.synchronize()
    finally:
        CK.FAST_LAUNCH, KC.POOL_LIMIT = fast, pool
    stats = pstats.Stats(pr).stats
    total = sum(v[2] for v in stats.values())
    lines.append(f"  cProfile of {calls} batch-1 forwards (profiled: {us(total / calls)} us a call; top {top} by own "
                 "time; us a call, own / with callees, calls a call):")
    for (fname, line, func), (cc, nc, tt, ct, _) in sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]:
        where = func if fname == "~" else f"{'/'.join(fname.split('/')[-2:])}:{line}({func})"
        lines.append(f"    {us(tt / calls):>7} {us(ct / calls):>8} {nc / calls:6.1f}  {where}")
    return lines


def kernel_markdown(rows) -> str:
    head = ["layer (90 %)", "batch", "fanin fwd us", "dense fp32 us", "dense TF32 us", "cuSPARSE us",
            "vs dense fp32", "vs TF32", "vs cuSPARSE", "fwd+bwd fanin us", "fwd+bwd dense fp32 us", "fwd+bwd vs dense"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        f = r["fanin"]
        cells = [r["layer"], r["B"], us(f), us(r.get("dense", np.nan)), us(r.get("dense_tf32", np.nan)),
                 us(r.get("csr", np.nan)), ratio(f, r.get("dense")), ratio(f, r.get("dense_tf32")),
                 ratio(f, r.get("csr")), us(r["fanin_fb"]) if "fanin_fb" in r else "-",
                 us(r["dense_fb"]) if "dense_fb" in r else "-",
                 ratio(r.get("fanin_fb"), r.get("dense_fb")) if "fanin_fb" in r else "-"]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out)


def targets(rows) -> list:
    big = {r["B"]: r for r in rows if r["layer"] == "4096x4096"}
    res = []
    if 256 in big and "dense" in big[256]:
        r = big[256]
        res.append(("forward B=256 >= 2x cuBLAS fp32", r["dense"] / r["fanin"], TARGETS["b256_dense"]))
        if "dense_nobias" in r:
            res.append(("forward B=256 >= 2x cuBLAS fp32 GEMM without bias (stricter)", r["dense_nobias"] / r["fanin"],
                        TARGETS["b256_dense"]))
        if "csr" in r:
            res.append(("forward B=256 >= 15x cuSPARSE", r["csr"] / r["fanin"], TARGETS["b256_csr"]))
        if "dense_fb" in r:
            res.append(("fwd+bwd B=256 >= 1.5x dense fp32", r["dense_fb"] / r["fanin_fb"], TARGETS["fb_dense"]))
    if 1 in big and "dense" in big[1]:
        res.append(("forward B=1 >= 3x dense", big[1]["dense"] / big[1]["fanin"], TARGETS["b1_dense"]))
    return res


# ------------------------------------------------------------------ training
def training(epochs, rounds, batch, torch, data_dir=None, sizes=(784, 4096, 4096, 10), max_steps=None):
    import fanin
    from fanin.kernels import select
    from fanin.sparsity import srigl as srigl_mod

    try:
        from fanin import data

        images, labels = data.load_fashion_mnist("train", data_dir)
        x = data.normalize(images, flatten=True)
        y = labels
        source = "Fashion-MNIST train (60000)"
    except Exception as exc:  # noqa: BLE001
        rng = np.random.default_rng(0)
        x = rng.standard_normal((60000, 784)).astype(np.float32)
        y = rng.integers(0, 10, 60000)
        source = f"random data of Fashion-MNIST's shape (the dataset was not found: {exc})"
    n = (x.shape[0] // batch) * batch
    if max_steps:
        n = min(n, max_steps * batch)
    steps = n // batch
    x = np.ascontiguousarray(x[:, : sizes[0]])
    from numba import cuda

    xd, yd = cuda.to_device(x[:n]), cuda.to_device(y[:n].astype(np.int64))
    sizes = list(sizes)
    model = fanin.models.mlp(sizes, sparsity=0.9, seed=0).to("cuda")
    opt = fanin.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    # SRigL's update reads the layers' values on the host; until srigl_update takes them with
    # fanin.device.host(...) (the hook asked for), hand its row gather host copies
    if not getattr(srigl_mod, "DEVICE_AWARE", False):
        class _HostSelect:
            def __getattr__(self, name):
                fn = getattr(select, name)
                return (lambda a, s: fn(fanin.device.host(a), s)) if name == "gather_rows" else fn

        srigl_mod.select = _HostSelect()
    sr = fanin.sparsity.SRigL(model, opt, sparsity=0.9, distribution="erk", delta_t=min(100, max(1, steps // 2)),
                              total_steps=steps * max(1, epochs * rounds))

    def run_steps(model, opt, sr, n_steps):
        for i in range(n_steps):
            xb = fanin.Tensor(xd[i * batch:(i + 1) * batch])
            loss = fanin.ops.cross_entropy(model(xb), yd[i * batch:(i + 1) * batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sr.step()
        cuda.synchronize()

    def fanin_epoch():
        run_steps(model, opt, sr, steps)

    # warm-up outside the timing: the first launch of each kernel compiles it (seconds each), and so does the first
    # SRigL update's (growth scores, selection); a throwaway model of the same shapes with an update at step 2
    # compiles every kernel an epoch launches, leaving the timed model's schedule untouched
    t = time.perf_counter()
    wm = fanin.models.mlp(sizes, sparsity=0.9, seed=1).to("cuda")
    wo = fanin.optim.SGD(wm.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    ws = fanin.sparsity.SRigL(wm, wo, sparsity=0.9, distribution="erk", delta_t=2, total_steps=8)
    run_steps(wm, wo, ws, min(4, steps))
    warm = time.perf_counter() - t
    ws.update_enabled = False  # then plain steps of the warm model: what an epoch costs without SRigL updates
    run_steps(wm, wo, ws, 2)
    n_plain = min(20, steps)
    t = time.perf_counter()
    run_steps(wm, wo, ws, n_plain)
    per_step = (time.perf_counter() - t) / n_plain
    del wm, wo, ws
    log(f"  warm-up (compiles every kernel of a step and of an SRigL update; not timed): {warm:.2f} s; then "
        f"{per_step * 1e3:.2f} ms a step without SRigL updates ({per_step * steps:.2f} s for {steps} steps)")

    torch_epoch = None
    if torch:
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        tm = torch.nn.Sequential(*layers[:-1]).cuda()
        topt = torch.optim.SGD(tm.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        tx, ty = torch.from_numpy(x[:n]).cuda(), torch.from_numpy(y[:n].astype(np.int64)).cuda()

        def torch_steps(n_steps):
            torch.backends.cuda.matmul.allow_tf32 = False
            for i in range(n_steps):
                out = tm(tx[i * batch:(i + 1) * batch])
                loss = torch.nn.functional.cross_entropy(out, ty[i * batch:(i + 1) * batch])
                topt.zero_grad(set_to_none=True)
                loss.backward()
                topt.step()
            torch.cuda.synchronize()

        def torch_epoch():
            torch_steps(steps)

        torch_steps(min(5, steps))  # warm-up: cuBLAS handles and workspaces, the optimizer's state

    times = {"fanin SRigL-90 %": [], "PyTorch dense fp32": []}
    for r in range(rounds):
        for _ in range(epochs):
            t = time.perf_counter()
            fanin_epoch()
            times["fanin SRigL-90 %"].append(time.perf_counter() - t)
            if torch_epoch:
                t = time.perf_counter()
                torch_epoch()
                times["PyTorch dense fp32"].append(time.perf_counter() - t)
        log(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items() if v))
    med = {k: float(np.median(v)) for k, v in times.items() if v}  # after the warm-up: every epoch counts
    return med, source, steps, sr.status()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, fewer rounds")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per measurement (median reported)")
    ap.add_argument("--epochs", type=int, default=1, help="training epochs per round")
    ap.add_argument("--train-rounds", type=int, default=3, help="rounds of training epochs (0: skip training)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--data", default=None, help="folder with Fashion-MNIST's four .gz files")
    ap.add_argument("--out", help="write a 'GPU (bench_cuda.py)' section into this markdown file")
    ap.add_argument("--sweep", action="store_true", help="also time the tile kernels' launch configurations at "
                    "4096x4096, batch 256 (forward, dx, dvalues)")
    ap.add_argument("--simulate", action="store_true", help=argparse.SUPPRESS)  # tiny shapes under the simulator:
    # exercises this script's code without a GPU (its numbers mean nothing)
    args = ap.parse_args(argv)

    log(gpu_header())
    log(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    why = no_gpu_reason()
    if args.simulate and why and "simulator" in why:
        why = None
    if why is not None:
        log(f"no GPU: {why}")
        log("nothing was measured: the kernel table, the targets and the training epochs need a CUDA GPU.")
        return 0
    try:
        import torch

        if not torch.cuda.is_available():
            SKIPPED.append("PyTorch baselines: torch has no CUDA here")
            torch = None
    except ImportError:
        SKIPPED.append("PyTorch baselines: torch is not installed")
        torch = None
    import numba

    from fanin.kernels import cuda as KC

    log(f"numba {numba.__version__}, numba-cuda {__import__('importlib').metadata.version('numba-cuda')}, "
        f"torch {torch.__version__ if torch else '-'}")
    timer = Timer(3 if args.quick else args.rounds)
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (768, 3072), (3072, 768)]
    batches = (1, 256)
    if args.simulate:
        shapes, batches, timer.rounds = [(40, 30)], (1, 9), 1
    log("\nkernels (CUDA events, median of interleaved rounds):")
    rows = kernel_table(shapes, batches, timer, torch)
    md = [kernel_markdown(rows), ""]
    log("\n" + md[0])
    log("\ntargets (4096x4096 at 90 %):")
    for name, got, want in targets(rows):
        line = f"- {name}: {got:.2f}x ({'met' if got >= want else 'NOT met'})"
        log(line)
        md.append(line)
    log("")
    prof = host_profile(simulate=args.simulate)
    for ln in prof:
        log(ln)
    md += ["", "```"] + prof + ["```"]
    if args.sweep:
        log("")
        for ln in plan_sweep(timer, simulate=args.simulate, torch=torch):
            log(ln)
    if args.train_rounds:
        log(f"\ntraining: MLP {'-'.join(map(str, (30, 20, 20, 10) if args.simulate else (784, 4096, 4096, 10)))}, "
            f"batch {9 if args.simulate else args.batch}:")
        extra = dict(sizes=(30, 20, 20, 10), max_steps=2) if args.simulate else {}
        med, source, steps, status = training(args.epochs, args.train_rounds, args.batch if not args.simulate else 9,
                                              torch, args.data, **extra)
        lines = [f"- data: {source}; {steps} steps an epoch; SRigL status {status}"]
        lines += [f"- {k}: {v:.2f} s an epoch (median)" for k, v in med.items()]
        if len(med) == 2:
            a, b = med["fanin SRigL-90 %"], med["PyTorch dense fp32"]
            lines.append(f"- SRigL epoch faster than PyTorch dense GPU: {b / a:.2f}x ({'met' if a < b else 'NOT met'})")
        for ln in lines:
            log(ln)
        md += [""] + lines
    if SKIPPED:
        log("\ncould not run:")
        for s in SKIPPED:
            log(f"- {s}")
        md += ["", "Could not run:"] + [f"- {s}" for s in SKIPPED]
    if args.out:
        import common

        body = f"```\n{LINES[0]}\n```\n\n" + "\n".join(md)
        common.write_section(args.out, "GPU (bench_cuda.py)", body)
    assert KC is not None
    return 0


if __name__ == "__main__":
    sys.exit(main())
