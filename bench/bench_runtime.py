"""Micro-benchmark of the inference runtime (issue 12): ``Network.predict`` against NumPy dense, same run.

    .venv/bin/python bench/bench_runtime.py [--rounds 9] [--batches 1,32,256] [--cold] [--fork] [--threads]

Networks: the SRigL-90 % MLP 784-1024-1024-10 (ERK fan-ins 79/91, a dense 1024->10 classifier), as float32,
post-training int8 and post-training 4-bit (``fanin.runtime.quantize``); and one 4096x4096 layer at 90 %
(fan-in 409) at batch 1. The NumPy twin is the dense chain ``x @ W.T + b`` (ReLU between), weights
transposed once, outside the timing.

Timing: interleaved rounds (every contender once per round, in turn, so a slow spell of the shared machine
hits all of them); per round and contender, the mean over enough calls to take ~20 ms; reported: the median
over rounds of the wall time per call and of the calling thread's CPU time (``time.thread_time``: what the
call cost when the thread was not descheduled -- the serial paths' honest cost on a loaded machine), and the
median of the per-round ratios. ``uptime``'s load average is printed at the start and the end.

``--cold``: also batch 1 with the caches flushed between calls (a 64 MiB buffer is read first): what a
service that predicts now and then sees. ``--fork``: predict in a child forked after the parent predicted
(serial kernels there when the parent's OpenMP threads had started) against the parent. ``--threads``:
8 Python threads predicting at once against one thread doing the same calls one after another.
``--host-blas``: batch 1 alternated call by call with a NumPy GEMV (BLAS threads) in one process, default
(tuner) and serial. ``--cnn-steps``: the CNN's predict split into its steps (each convolution, pooling, the
linear chain), serial and parallel. ``--no-adaptive``: the work rule alone chooses serial or parallel (no timing tuner). ``--one-thread``: everything
on one thread (fanin's serial kernels, BLAS limited with threadpoolctl): the per-core cost, comparable
on a loaded machine.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numba  # noqa: E402
import numpy as np  # noqa: E402

from fanin import models, runtime  # noqa: E402
from fanin.kernels import infer  # noqa: E402


def load() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def mlp_plan(seed=0):
    return runtime.lower(models.mlp([784, 1024, 1024, 10], sparsity=[0.898, 0.911, None], seed=seed))


def dense_twin(plan):
    """NumPy's dense chain of a float32 plan: [(W.T, b, relu)]."""
    layers = []
    for op in plan["ops"]:
        a = op["arrays"]
        w = a["values"] if "values" in a else a["scale"][:, None] * a["qvalues"].astype(np.float32)
        if op["sparse"]:
            d = np.zeros((op["n_out"], op["n_in"]), np.float32)
            np.put_along_axis(d, a["indices"].astype(np.int64), w, 1)
            w = d
        layers.append((np.ascontiguousarray(w.T), a["bias"], op["act"] == "relu"))

    def run(x):
        for wt, b, relu in layers:
            x = x @ wt
            x += b
            if relu:
                np.maximum(x, 0, out=x)
        return x
    return run


def model_bytes(net) -> int:
    """Bytes of indices and values the engine reads per sample at batch 1 (its own layout, padding included)."""
    lay = net._engine.chain.layout
    total = 0
    for row in lay.tab:
        n_out, kp, dense, ik, vk = (int(row[f]) for f in (infer.F_NOUT, infer.F_KP, infer.F_DENSE, infer.F_IK,
                                                          infer.F_VK))
        total += n_out * kp * ({infer.VK_F32: 4, infer.VK_I8: 1, infer.VK_I4: 0.5}[vk] + (0 if dense else 2 + 2 * ik))
        total += n_out * 8  # scale and bias
    return int(total)


def read_bandwidth(nbytes: int) -> float:
    """Bytes/s of a vectorized read of an array of ``nbytes`` (in cache when it fits), one thread."""
    from numba import njit

    @njit(fastmath=True, cache=False)
    def total(a):
        s = np.float32(0)
        for i in range(a.size):
            s += a[i]
        return s

    a = np.ones(nbytes // 4, np.float32)
    total(a)
    best = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(20):
            total(a)
        best.append((time.perf_counter() - t0) / 20)
    return nbytes / min(best)


SETTLE = 0.15  # s of sleep before each contender's turn in ``interleaved``


def interleaved(contenders: dict, rounds: int, target_s: float = 0.02, flush=None):
    """{name: (median wall s, median thread-CPU s)}, and per-round times, over interleaved rounds. Each turn starts
    after SETTLE s of sleep, so that the previous contender's threads are asleep: OpenBLAS's spin ~0.1 s after a
    call, and next to them a parallel fanin call at batch 1 took 5-8 ms (one scheduler time slice) against ~40 us,
    which measured the GEMV's threads, not the layer (``--host-blas`` measures fanin next to BLAS calls on purpose)."""
    for fn in contenders.values():
        fn()
        fn()
    reps = {}
    # calls per round: ~target_s each, from the median of 5 calls (one call could be a slow one: next to spinning
    # BLAS threads a parallel batch-1 call can take 100x its usual time, and the contender would then get 1-2 calls
    # a round, all of them its first after the others ran)
    for name, fn in contenders.items():
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        dt = max(statistics.median(ts), 1e-6)
        reps[name] = 1 if flush else max(1, min(2000, int(target_s / dt)))
    wall = {n: [] for n in contenders}
    cpu = {n: [] for n in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            time.sleep(SETTLE)
            n = reps[name]
            if flush is not None:
                w = c = 0.0
                for _ in range(max(1, int(target_s / 0.002))):
                    flush()
                    t0, c0 = time.perf_counter(), time.thread_time()
                    fn()
                    w += time.perf_counter() - t0
                    c += time.thread_time() - c0
                    n = max(1, int(target_s / 0.002))
                wall[name].append(w / n)
                cpu[name].append(c / n)
                continue
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(n):
                fn()
            wall[name].append((time.perf_counter() - t0) / n)
            cpu[name].append((time.thread_time() - c0) / n)
    return wall, cpu


def ratio(per_round, a, b):
    """Median over rounds of per_round[a] / per_round[b]."""
    return statistics.median(x / y for x, y in zip(per_round[a], per_round[b]))


def fmt_us(s):
    return f"{s * 1e6:.1f}"


def section_mlp(args):
    plan = mlp_plan()
    nets = {"fp32": runtime.Network(plan), "int8": runtime.Network(runtime.quantize(plan, 8)),
            "4-bit": runtime.Network(runtime.quantize(plan, 4))}
    twin = dense_twin(plan)
    macs = nets["fp32"]._engine.chain.layout.macs
    fan_ins = [o["arrays"]["indices"].shape[1] for o in plan["ops"] if o["sparse"]]
    print(f"\n## MLP 784-1024-1024-10, SRigL 90 % (fan-ins {fan_ins}"
          f", dense classifier): {macs} multiply-adds per sample")
    rows = []
    for B in args.batches:
        x = np.random.default_rng(0).standard_normal((B, 784)).astype(np.float32)
        for net in nets.values():  # each network equals its own dense twin: a sanity check, outside the timing
            want = dense_twin(net.plan)(x)
            np.testing.assert_allclose(net.predict(x), want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
        con = {f"fanin {k}": (lambda n=n: n.predict(x)) for k, n in nets.items()}
        con["numpy dense"] = lambda: twin(x)
        wall, cpu = interleaved(con, args.rounds)
        for name in con:
            if name.startswith("fanin"):
                ch = nets[name.split()[1]]._engine.chain
                path = f"{ch.plan_for(B, numba.get_num_threads())}, last ran {ch.last_path}"
            w = statistics.median(wall[name])
            rows.append((B, name, path if name.startswith("fanin") else "BLAS", fmt_us(w),
                         fmt_us(statistics.median(cpu[name])),
                         f"{ratio(wall, 'numpy dense', name):.2f}x", f"{ratio(wall, 'fanin fp32', name):.2f}x",
                         f"{ratio(cpu, 'fanin fp32', name):.2f}x", f"{B * macs / w / 1e9:.1f}"))
    print("\n| batch | contender | path | wall us (median) | thread CPU us | vs numpy dense (wall) "
          "| vs fanin fp32 (wall) "
          "| vs fanin fp32 (CPU) | GMAC/s (wall, sparse work) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")

    bw = read_bandwidth(model_bytes(nets["fp32"]))
    print(f"\nBatch-1 bandwidth bound: a vectorized read of {model_bytes(nets['fp32']) / 1e6:.2f} MB "
          f"(the fp32 layout's indices+values) runs at {bw / 1e9:.1f} GB/s on one thread here (cache-resident).")
    x1 = np.random.default_rng(0).standard_normal((1, 784)).astype(np.float32)
    con = {f"fanin {k}": (lambda n=n: n.predict(x1)) for k, n in nets.items()}
    wall, cpu = interleaved(con, args.rounds)
    for k, n in nets.items():
        b = model_bytes(n)
        t = statistics.median(cpu[f"fanin {k}"])
        print(f"- {k}: {b / 1e6:.2f} MB of indices+values; bound {b / bw * 1e6:.1f} us; measured {t * 1e6:.1f} us "
              f"(thread CPU) = {b / t / 1e9:.1f} GB/s, {100 * (b / bw) / t:.0f} % of the read bandwidth")

    if args.cold:
        junk = np.ones(64 << 18, np.float32)

        def flush():
            junk.sum()
        wall, cpu = interleaved(con, max(3, args.rounds // 2), target_s=0.05, flush=flush)
        print("\nBatch 1 with caches flushed before every call (64 MiB read first; the call alone is timed):")
        for k in nets:
            print(f"- {k}: wall {fmt_us(statistics.median(wall['fanin ' + k]))} us "
                  f"(vs fp32 {ratio(wall, 'fanin fp32', 'fanin ' + k):.2f}x), thread CPU "
                  f"{fmt_us(statistics.median(cpu['fanin ' + k]))} us "
                  f"(vs fp32 {ratio(cpu, 'fanin fp32', 'fanin ' + k):.2f}x)")


def section_big(args):
    from fanin import nn

    layer = nn.FanInLinear(4096, 4096, sparsity=0.9, seed=0)
    plan = runtime.lower(nn.Sequential([layer]))
    net = runtime.Network(plan)
    net8 = runtime.Network(runtime.quantize(plan, 8))
    twin = dense_twin(plan)
    x = np.random.default_rng(0).standard_normal((1, 4096)).astype(np.float32)
    con = {"fanin fp32": lambda: net.predict(x), "fanin int8": lambda: net8.predict(x), "numpy dense": lambda: twin(x)}
    wall, cpu = interleaved(con, args.rounds)
    path = f"{net._engine.chain.plan_for(1, numba.get_num_threads())}, last ran {net._engine.chain.last_path}"
    # how often the tuner ran fp32 calls in parallel: a serial choice (a busy core measured parallel slower) is
    # what a low ratio here has meant
    serial, parallel = (sum(t.runs[i] for t in net._engine.chain._tuners.values()) for i in (0, 1))
    path += f"; fp32 calls: {parallel} parallel, {serial} serial"
    print(f"\n## One 4096x4096 layer at 90 % (fan-in {plan['ops'][0]['arrays']['indices'].shape[1]}), batch 1 "
          f"(path {path})\n")
    print("| contender | wall us (median) | thread CPU us | vs numpy dense |")
    print("|---|---|---|---|")
    for name in con:
        print(f"| {name} | {fmt_us(statistics.median(wall[name]))} | {fmt_us(statistics.median(cpu[name]))} | "
              f"{ratio(wall, 'numpy dense', name):.2f}x |")


def section_layers(args):
    """Batch 1 through a one-layer Network at every layer shape and sparsity of bench_kernels.py, against SciPy
    CSR (``W_csr @ x``, the structure built once, outside the timing) and NumPy dense; also the same layer with
    int8 activations (``activations="int8"``: int8 weights per neuron, the input quantized per call; its error is
    checked against the float result, <= 5 % of the largest output). Targets (issue 12): never slower than SciPy
    CSR; the 4096x4096 layer at 90 % >= 5x NumPy dense."""
    import scipy.sparse as sp

    from fanin import nn

    print("\n## One layer through a Network, batch 1, against SciPy CSR and NumPy dense\n")
    print("| layer (out x in) | sparsity | fan-in | fanin us | scipy csr us | numpy dense us | vs scipy csr | "
          "vs numpy dense | int8 act. us | int8 act. vs scipy csr | int8 act. vs numpy dense |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    worst = worst8 = None
    target = {}
    for n_out, n_in in [(4096, 4096), (768, 3072), (3072, 768)]:
        for s in [0.8, 0.9, 0.95, 0.99]:
            layer = nn.FanInLinear(n_in, n_out, sparsity=s, seed=0)
            plan = runtime.lower(nn.Sequential([layer]))
            net = runtime.Network(plan)
            net8 = runtime.Network(plan, activations="int8")
            twin = dense_twin(plan)
            a = plan["ops"][0]["arrays"]
            idx, vals = np.asarray(a["indices"]), np.asarray(a["values"], np.float32)
            bias = np.asarray(a.get("bias", np.zeros(n_out)), np.float32)
            csr = sp.csr_matrix((vals.ravel(), idx.ravel().astype(np.int32), np.arange(0, idx.size + 1, idx.shape[1])),
                                shape=(n_out, n_in))
            x = np.random.default_rng(1).standard_normal((1, n_in)).astype(np.float32)
            xt = np.ascontiguousarray(x[0])
            ref = csr @ xt + bias
            np.testing.assert_allclose(net.predict(x)[0], ref, rtol=1e-4, atol=1e-4)
            err8 = float(np.abs(net8.predict(x)[0] - ref).max() / max(1e-30, float(np.abs(ref).max())))
            assert err8 <= 0.05, f"int8 activations off by {err8:.3g} of the largest output at {n_out}x{n_in} {s}"
            con = {"fanin": lambda: net.predict(x), "int8": lambda: net8.predict(x), "scipy csr": lambda: csr @ xt + bias,
                   "numpy": lambda: twin(x)}
            wall, _ = interleaved(con, args.rounds)
            r, r8 = ratio(wall, "scipy csr", "fanin"), ratio(wall, "scipy csr", "int8")
            worst = r if worst is None else min(worst, r)
            worst8 = r8 if worst8 is None else min(worst8, r8)
            if (n_out, n_in, s) == (4096, 4096, 0.9):
                target = {"fanin": ratio(wall, "numpy", "fanin"), "int8": ratio(wall, "numpy", "int8")}
            print(f"| {n_out}x{n_in} | {s:.0%} | {idx.shape[1]} | {fmt_us(statistics.median(wall['fanin']))} | "
                  f"{fmt_us(statistics.median(wall['scipy csr']))} | {fmt_us(statistics.median(wall['numpy']))} | "
                  f"{r:.2f}x | {ratio(wall, 'numpy', 'fanin'):.2f}x | {fmt_us(statistics.median(wall['int8']))} | "
                  f"{r8:.2f}x | {ratio(wall, 'numpy', 'int8'):.2f}x |", flush=True)
    print(f"\nworst ratio against SciPy CSR: {worst:.2f}x float32 ({'met' if worst >= 1 else 'MISSED'}: never slower), "
          f"{worst8:.2f}x int8 activations ({'met' if worst8 >= 1 else 'MISSED'})")
    if target:
        print(f"4096x4096 at 90 % vs NumPy dense (target >= 5x): {target['fanin']:.2f}x float32 "
              f"({'met' if target['fanin'] >= 5 else 'MISSED'}), {target['int8']:.2f}x int8 activations "
              f"({'met' if target['int8'] >= 5 else 'MISSED'})")
    print("(int8 activations: max error against the float result "
          "<= 5 % of the largest output, checked at every shape before timing)")


def section_host_blas(args):
    """Batch 1 alternated call by call with a NumPy GEMV (784x1024, BLAS threads) in one process: what a host
    that mixes fanin and BLAS sees. fanin's tuner may split batch 1 over the threads (the default) or keep it
    serial (``numba.set_num_threads(1)`` in this thread); per mode, each side's median over the calls."""
    net = runtime.Network(mlp_plan())
    x1 = np.random.default_rng(0).standard_normal((1, 784)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal((784, 1024)).astype(np.float32)
    n = 400 * max(1, args.rounds)
    print("\n## Batch 1 next to BLAS calls in the same process (medians of %d alternating calls)" % n)
    print("\n| fanin batch 1 | fanin alone us | NumPy GEMV alone us | fanin interleaved us | GEMV interleaved us | path |")
    print("|---|---|---|---|---|---|")
    saved = numba.get_num_threads()
    for mode in ("default (tuner)", "serial (set_num_threads(1))"):
        numba.set_num_threads(1 if mode.startswith("serial") else saved)
        try:
            alone_f = statistics.median(_once(lambda: net.predict(x1)) for _ in range(n))
            alone_g = statistics.median(_once(lambda: x1 @ w) for _ in range(n))
            tf, tg = [], []
            for _ in range(n):
                tf.append(_once(lambda: net.predict(x1)))
                tg.append(_once(lambda: x1 @ w))
            print(f"| {mode} | {alone_f * 1e6:.1f} | {alone_g * 1e6:.1f} | {statistics.median(tf) * 1e6:.1f} | "
                  f"{statistics.median(tg) * 1e6:.1f} | {net._engine.chain.last_path} |")
        finally:
            numba.set_num_threads(saved)


def section_fork(args):
    import multiprocessing as mp

    net = runtime.Network(mlp_plan())
    x = np.random.default_rng(0).standard_normal((256, 784)).astype(np.float32)
    want = net.predict(x)

    def timed():
        ts = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for _ in range(5):
                net.predict(x)
            ts.append((time.perf_counter() - t0) / 5)
        return statistics.median(ts)

    parent = timed()
    ctx = mp.get_context("fork")
    q = ctx.Queue()

    def child():
        from fanin.runtime import engine
        q.put((timed(), bool(np.array_equal(net.predict(x), want)), engine.parallel_state()))

    p = ctx.Process(target=child)
    p.start()
    child_t, same, state = q.get(timeout=300)
    p.join(60)
    print(f"\n## Fork: batch 256 in the parent {parent * 1e3:.2f} ms, in a forked child {child_t * 1e3:.2f} ms "
          f"({child_t / parent:.2f}x; same result: {same}; child state: {state})")


def section_threads(args):
    net = runtime.Network(mlp_plan())
    for B in (1, 256):
        xs = [np.random.default_rng(i).standard_normal((B, 784)).astype(np.float32) for i in range(8)]
        reps = max(1, 2000 // B)

        def work(x):
            for _ in range(reps):
                net.predict(x)
        t0 = time.perf_counter()
        for x in xs:
            work(x)
        serial = time.perf_counter() - t0
        ths = [threading.Thread(target=work, args=(x,)) for x in xs]
        t0 = time.perf_counter()
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        conc = time.perf_counter() - t0
        print(f"- batch {B}: 8 threads x {reps} predicts: one after another {serial * 1e3:.0f} ms, "
              f"8 threads at once {conc * 1e3:.0f} ms")


def section_cnn_steps(args):
    """The CNN's predict split into its steps (convolution with its fused activation, pooling, flatten, the
    linear chain), each timed serial and parallel on the previous step's real output: where a CNN's time goes."""
    import fanin

    print("\n## CNN steps (ms per call, median of rounds; 'par': the step's parallel kernel)")
    print("| network | batch | predict | " + " | ".join(f"{n} ser / par" for n in
                                                          ("conv1", "pool1", "conv2", "pool2", "flatten", "chain"))
          + " |")
    print("|---|---|---|" + "---|" * 6)
    rng = np.random.default_rng(0)
    for sparsity in (None, 0.9):
        net = fanin.compile(models.cnn(sparsity=sparsity, seed=0), (1, 28, 28))
        eng = net._engine
        for B in args.batches:
            x = rng.random((B, 1, 28, 28), dtype=np.float32)
            reps = max(1, int(0.02 / max(1e-6, _once(lambda: net.predict(x)))))

            def med(fn):
                fn()
                return statistics.median(_once(fn, reps) for _ in range(args.rounds)) * 1e3

            cells, y = [], x
            for step in eng.steps:
                inp = y
                cells.append(f"{med(lambda: step(inp, False)):.3f} / {med(lambda: step(inp, True)):.3f}")
                y = step(inp, False)
            cells.append(f"{med(lambda: eng.chain.run(y)):.3f}")
            name = "CNN dense" if sparsity is None else "CNN 90 %"
            print(f"| {name} | {B} | {med(lambda: net.predict(x)):.3f} | " + " | ".join(cells) + " |")


def _once(fn, reps=1) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--layers", action="store_true", help="batch 1, one layer per bench_kernels shape, vs SciPy CSR")
    ap.add_argument("--fork", action="store_true")
    ap.add_argument("--host-blas", action="store_true", help="batch 1 alternated with NumPy GEMV calls")
    ap.add_argument("--threads", action="store_true")
    ap.add_argument("--cnn-steps", action="store_true", help="the CNN's predict split into its steps, serial / parallel")
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--no-adaptive", action="store_true", help="the work rule alone picks serial or parallel")
    ap.add_argument("--one-thread", action="store_true",
                    help="fanin (numba.set_num_threads(1), this thread only) and NumPy's BLAS on one thread")
    args = ap.parse_args()
    if args.one_thread:
        numba.set_num_threads(1)
        try:
            from threadpoolctl import threadpool_limits
            args._blas_limit = threadpool_limits(1, user_api="blas")
        except ImportError:
            print("(threadpoolctl missing: NumPy's BLAS keeps its threads)")
    if args.no_adaptive:
        from fanin.runtime import engine
        engine.ADAPTIVE = False
    args.batches = [int(b) for b in args.batches.split(",")]
    import platform

    print(f"# bench_runtime: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"numba {numba.__version__} ({numba.get_num_threads()} threads), numpy {np.__version__}; "
          f"load average at start {load()}")
    section_mlp(args)
    if not args.skip_big:
        section_big(args)
    if args.layers:
        section_layers(args)
    if args.cnn_steps:
        section_cnn_steps(args)
    if args.fork:
        section_fork(args)
    if args.host_blas:
        section_host_blas(args)
    if args.threads:
        print("\n## Threads")
        section_threads(args)
    from fanin.runtime import engine
    print(f"\nthreading layer: {engine.parallel_state()}; load average at end {load()}")


if __name__ == "__main__":
    main()
