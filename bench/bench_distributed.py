"""Data-parallel scaling on this machine: MLP 784-1024-1024-10, SRigL 90 %, global batch 128, Fashion-MNIST.

    .venv/bin/python bench/bench_distributed.py [--rounds 3] [--epochs 2] [--out docs/DISTRIBUTED.md]

Runs, interleaved round by round so that the host's load hits them alike, each in its own process:
1 process x 2 threads, 2 MPI ranks x 1 thread (mpiexec), and 1 process x 1 thread (the reference of the ideal
speed-up). Reports the time per epoch of training, the share of it spent in communication (the per-step
allreduce, SRigL's row exchange), the time ranks wait for each other (a barrier before the allreduce, in a
separate profiled epoch), the bytes per step, a steady-state Allreduce of that size, the time of a training
step at local batch 128/N, and from these a model of N machines (docs/DISTRIBUTED.md, "Scaling").
Needs Fashion-MNIST and the `distributed` extra.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIZES, SPARSITY, BATCH = "784-1024-1024-10", 0.9, 128
ARGS = ["train", "--model", "mlp", "--sizes", SIZES, "--method", "srigl", "--sparsity", str(SPARSITY),
        "--batch-size", str(BATCH), "--no-progress"]


# ------------------------------------------------------------------ workers
def worker_train(epochs: int, result: str):
    """Train ``epochs`` (+1 profiled) epochs as `fanin train` would; under mpiexec, data parallel."""
    from fanin import tuning

    tuning.apply()
    from fanin.distributed import launched_by_mpi, world

    dp = world(timeout=600) if launched_by_mpi() else None
    import numba
    import numpy as np

    from fanin import optim
    from fanin.cli import build_model, build_parser, build_updater, load_data
    from fanin.train import TrainConfig, fit, make_optimizer

    args = build_parser().parse_args([*ARGS, "--epochs", str(epochs)])
    train, _ = load_data("mlp")
    cfg = TrainConfig(epochs=epochs, batch_size=BATCH, lr=0.05)
    model = build_model(args)
    opt = make_optimizer(model.parameters(), cfg)
    total = epochs * -(-len(train[0]) // BATCH)
    schedule = optim.CosineSchedule(opt, total)
    srigl = build_updater(args, model, opt, total)
    update_time = [0.0]
    update = srigl.update

    def timed_update():
        t0 = time.perf_counter()
        update()
        update_time[0] += time.perf_counter() - t0

    srigl.update = timed_update
    epochs_out, marks = [], [{}, 0.0]

    def snapshot():
        return {k: list(v) for k, v in (dp.comm_stats.items() if dp else [])}

    def on_epoch_end(epoch, rng):
        now = snapshot()
        delta = {k: [a - b for a, b in zip(v, marks[0].get(k, [0, 0.0, 0]))] for k, v in now.items()}
        epochs_out.append({"comm": delta, "srigl_update_s": update_time[0] - marks[1],
                           "step_bytes": dp.step_bytes if dp else 0})
        marks[0], marks[1] = now, update_time[0]

    rng = np.random.default_rng(0)
    history = fit(model, opt, train, epochs=epochs, batch_size=BATCH, schedule=schedule, hooks=[srigl],
                  progress=False, rng=rng, on_epoch_end=on_epoch_end, comm=dp)
    if dp is not None:  # one more epoch with a barrier before each allreduce: waiting apart from transfer
        dp.profile = True
        history += fit(model, opt, train, epochs=epochs + 1, batch_size=BATCH, schedule=None, hooks=[srigl],
                       progress=False, rng=rng, on_epoch_end=on_epoch_end, comm=dp, start_epoch=epochs)
    for h, e in zip(history, epochs_out):
        e["time"] = h["time"]
    if dp is None or dp.root:
        pathlib.Path(result).write_text(json.dumps({"threads": numba.get_num_threads(),
                                                    "ranks": dp.size if dp else 1, "epochs": epochs_out}))


def worker_steps(batches, result: str):
    """Median time of one SRigL training step (no update) at each local batch size, this process's threads."""
    from fanin import tuning

    tuning.apply()
    import numba
    import numpy as np

    from fanin import Tensor, models, ops, optim, sparsity

    model = models.mlp([int(s) for s in SIZES.split("-")], sparsity=SPARSITY, seed=0)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    srigl = sparsity.SRigL(model, opt, sparsity=SPARSITY, delta_t=10 ** 9, t_end=1)
    rng = np.random.default_rng(0)
    data = {b: (rng.standard_normal((b, 784)).astype(np.float32), rng.integers(0, 10, b)) for b in batches}
    times = {b: [] for b in batches}
    for i in range(70):  # the batch sizes interleaved, so that the host's load hits them alike
        for b, (x, y) in data.items():
            t0 = time.perf_counter()
            loss = ops.cross_entropy(model(Tensor(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            srigl.step()
            if i >= 10:
                times[b].append(time.perf_counter() - t0)
    out = {b: float(np.median(t)) for b, t in times.items()}
    pathlib.Path(result).write_text(json.dumps({"threads": numba.get_num_threads(), "step_s": out}))


def worker_allreduce(nbytes: int, result: str):
    """Steady-state MPI Allreduce of ``nbytes`` of float32 between the ranks (a barrier first, median of 200)."""
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    buf = np.ones(nbytes // 4, np.float32)
    times = []
    for i in range(220):
        comm.Barrier()
        t0 = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        if i >= 20:
            times.append(time.perf_counter() - t0)
    if comm.rank == 0:
        pathlib.Path(result).write_text(json.dumps({"bytes": nbytes, "median_s": float(np.median(times)),
                                                    "min_s": float(np.min(times))}))


# ------------------------------------------------------------------- driver
def launcher():
    for cand in (pathlib.Path(sys.executable).parent / "mpiexec", shutil.which("mpiexec"), shutil.which("mpirun")):
        if cand and pathlib.Path(cand).exists():
            return str(cand)
    raise SystemExit("bench_distributed: no mpiexec; pip install -e '.[distributed]'")


def run(worker_args, threads, ranks=1):
    """A worker in its own process(es) with ``threads`` threads each; its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        result = str(pathlib.Path(tmp) / "r.json")
        cmd = [sys.executable, __file__, "--worker", *worker_args, "--result", result]
        if ranks > 1:
            cmd = [launcher(), "-n", str(ranks), *cmd]
        env = {**os.environ, **{k: str(threads) for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS",
                                                           "OPENBLAS_NUM_THREADS")}}
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        return json.loads(pathlib.Path(result).read_text())


def load_average() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2, help="training epochs per run (the first is warm-up)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "DISTRIBUTED.md"))
    ap.add_argument("--worker", nargs="+", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        kind, *rest = args.worker
        if kind == "train":
            return worker_train(int(rest[0]), args.result)
        if kind == "steps":
            return worker_steps([int(b) for b in rest], args.result)
        return worker_allreduce(int(rest[0]), args.result)

    configs = {"1 process x 2 threads": (2, 1), "2 ranks x 1 thread": (1, 2), "1 process x 1 thread": (1, 1)}
    runs = {name: [] for name in configs}
    loads = [load_average()]
    for r in range(args.rounds):
        for name, (threads, ranks) in configs.items():
            res = run(["train", str(args.epochs)], threads, ranks)
            runs[name].append(res)
            print(f"round {r + 1} {name}: epochs " + " ".join(f"{e['time']:.2f}s" for e in res["epochs"]) +
                  f" (load {load_average()})", flush=True)
            loads.append(load_average())
    steps1 = run(["steps", "128", "64", "32", "16", "8"], 1)
    steps2 = run(["steps", "128", "64", "32"], 2)
    step_bytes = runs["2 ranks x 1 thread"][0]["epochs"][0]["step_bytes"]
    ar = run(["allreduce", str(step_bytes)], 1, 2)
    loads.append(load_average())
    report = summarize(runs, args.epochs, steps1, steps2, ar, step_bytes, loads)
    print(report)
    sys.path.insert(0, str(ROOT / "bench"))
    import common

    body = common.header(f".venv/bin/python bench/bench_distributed.py --rounds {args.rounds} --epochs {args.epochs}")
    common.write_section(args.out, "Measurements", body + f"- load average (1/5/15 min) before, between and after the "
                         f"runs: {' | '.join(loads)}\n\n" + report)


def summarize(runs, epochs, steps1, steps2, ar, step_bytes, loads) -> str:
    rows = []
    base = None
    for name, results in runs.items():
        timed = [e for res in results for e in res["epochs"][1:epochs]]  # after the warm-up epoch, not profiled
        t = median([e["time"] for e in timed])
        base = base or t
        comm = [sum(e["comm"].get(k, [0, 0.0, 0])[1] for k in ("allreduce", "gather")) for e in timed]
        share = median([c / e["time"] for c, e in zip(comm, timed)]) if any(comm) else 0.0
        upd = median([e["srigl_update_s"] for e in timed])
        prof = [res["epochs"][epochs] for res in results if len(res["epochs"]) > epochs]
        wait = median([e["comm"].get("wait", [0, 0.0])[1] for e in prof]) if prof else None
        xfer = median([e["comm"].get("allreduce", [0, 0.0])[1] for e in prof]) if prof else None
        rows.append([name, f"{t:.2f}", " / ".join(f"{e['time']:.2f}" for e in timed), f"{base / t:.2f}x",
                     f"{100 * share:.1f} %" if comm and any(comm) else "-",
                     f"{wait:.2f} / {xfer:.2f}" if prof else "-", f"{upd:.2f}"])
    head = ["configuration", "s / epoch (median)", "each epoch", "vs 1 process x 2 threads",
            "communication share (allreduce + SRigL rows, incl. waiting)", "profiled epoch: wait / allreduce s",
            "SRigL updates s / epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    steps = ["| local batch | step, 1 thread (ms) | step, 2 threads (ms) |", "|---|---|---|"]
    for b, s in steps1["step_s"].items():
        s2 = steps2["step_s"].get(b)
        steps.append(f"| {b} | {1e3 * s:.2f} | " + (f"{1e3 * s2:.2f}" if s2 else "-") + " |")
    ar_line = (f"Bytes allreduced per step: **{step_bytes:,}** ({step_bytes / 4:,.0f} float32: every gradient, one "
               f"flag per parameter, the loss and correct count); a steady-state Allreduce of that size between 2 "
               f"ranks on this machine (shared memory, ranks synchronised by a barrier first, 200 times): median "
               f"**{1e3 * ar['median_s']:.3f} ms**, fastest {1e3 * ar['min_s']:.3f} ms "
               f"({2 * step_bytes / ar['min_s'] / 1e9:.2f} GB/s counted as 2 x bytes).")
    one = runs["1 process x 1 thread"]
    steps_per_epoch = -(-60000 // BATCH)
    upd = median([e["srigl_update_s"] for res in one for e in res["epochs"][1:epochs]]) / steps_per_epoch
    return ("\n".join(lines) + "\n\n" + ar_line + "\n\nOne training step (forward, backward, SGD; no SRigL update) "
            "at the local batch a rank gets (median of 50 steps, synthetic data):\n\n" + "\n".join(steps) + "\n\n"
            + model_table(steps1["step_s"], step_bytes, upd) + "\n")


LINKS = {"10 GbE": (1.1e9, 30e-6), "100 Gb/s InfiniBand": (11e9, 3e-6)}  # usable bandwidth (B/s), latency (s)
GATHER_BYTES = BATCH * ((784 + 1024) + (1024 + 1024)) * 4  # SRigL rows of the two sparse layers, per update


def model_table(step_s, step_bytes, update_s) -> str:
    """Predicted time per step and speed-up on N machines, each computing like one core of this one."""
    import math

    step_s = {int(k): v for k, v in step_s.items()}
    t1 = step_s[BATCH] + update_s
    head = ["machines N", "local batch", "compute ms/step (measured, 1 thread)"]
    head += [f"{link}: allreduce ms / step ms / speed-up" for link in LINKS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in (1, 2, 4, 8, 16):
        b = BATCH // n
        if b not in step_s:
            continue
        row = [str(n), str(b), f"{1e3 * step_s[b]:.2f}"]
        for bw, alpha in LINKS.values():
            ar = 0.0 if n == 1 else 2 * (n - 1) / n * step_bytes / bw + 2 * math.log2(n) * alpha
            gather = 0.0 if n == 1 else (n - 1) / n * GATHER_BYTES / bw / 100  # every delta_t = 100 steps
            t = step_s[b] + update_s + ar + gather
            row.append(f"{1e3 * ar:.2f} / {1e3 * t:.2f} / {t1 / t:.2f}x")
        lines.append("| " + " | ".join(row) + " |")
    return (f"Model of N machines at global batch {BATCH} (docs/DISTRIBUTED.md, \"Scaling\"): step = compute(local "
            f"batch) + SRigL updates amortised per step ({1e3 * update_s:.2f} ms here, replicated on every rank) + allreduce "
            f"2(N-1)/N x {step_bytes:,} B / bandwidth + 2 log2(N) x latency + SRigL rows (N-1)/N x {GATHER_BYTES:,} B "
            "/ bandwidth / 100:\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
