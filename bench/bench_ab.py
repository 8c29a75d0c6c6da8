"""Before/after A/B of fanin itself: the same workloads timed on an earlier revision and on the working tree.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_ab.py [--before HEAD] [--rounds 6]
        [--only CNN] [--out bench/RESULTS.md --title "..."]

The earlier revision is exported with ``git archive`` into a temporary folder. Each round starts one
fresh process per side (alternating A, B, B, A, ... so a slow spell of the shared machine hits both
sides) that imports fanin from its tree and times every workload (median of repeated calls after a
warm-up); both use the Numba cache of their own tree. Reported per workload: the median time of each
side over the rounds and the median of the per-round ratios after/before (1.00 = no change; below 1
is faster).

Workloads: the training step of ``bench_train.py`` (dense MLP 784-1024-1024-10, SGD momentum, batch
128 and 1), a sparse training step (the same MLP at 90 % constant fan-in, batch 128), CNN training steps
(Adam, batch 128; the full CNN, and the channels a compressing run ends with), and the
kernels of ``bench_kernels.py`` at 90 % on 4096x4096 (forward at batch 1 and 256, forward+backward
at batch 128) and 3072x768 at batch 1, called as a user calls them (validated wrappers), and
``Network.predict`` of the SRigL-90 % MLP at batch 1, 32 and 256 (float32, and int8 weights with int8
activations).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- worker side
def _median_time(fn, min_time):
    for _ in range(3):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < 7 or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _workloads():
    import fanin  # first, as every bench script does

    if "tuning" in getattr(fanin, "_SUBMODULES", ()):  # since `import fanin` stopped tuning the process
        fanin.tuning.apply()
    import numpy as np

    from fanin import kernels, ops

    rng = np.random.default_rng(0)
    out = {}

    def train_step(model, batch, sample=(784,), adam=False):  # SGD with momentum, or Adam (the CNN's optimizer)
        x = rng.standard_normal((batch, *sample)).astype(np.float32)
        y = rng.integers(0, 10, batch)
        opt = (fanin.optim.Adam(model.parameters(), lr=1e-3) if adam
               else fanin.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))

        def step():
            loss = ops.cross_entropy(model(fanin.Tensor(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    out["dense MLP step, batch 128"] = train_step(fanin.models.mlp([784, 1024, 1024, 10], seed=0), 128)
    out["dense MLP step, batch 1"] = train_step(fanin.models.mlp([784, 1024, 1024, 10], seed=0), 1)
    out["90 % MLP step, batch 128"] = train_step(fanin.models.mlp([784, 1024, 1024, 10], sparsity=0.9, seed=0), 128)

    def layer(n_out, n_in, k):
        idx = np.sort(np.argsort(rng.random((n_out, n_in)), axis=1)[:, :k], axis=1).astype(kernels.index_dtype(n_in))
        return idx, rng.standard_normal((n_out, k)).astype(np.float32)

    # the CNN as it starts, and with the channels a compressing run ends with (--compress 0.5 --compress-cost
    # bits+macs: 24/32 and 22/64 convolution channels, 33/128 hidden units)
    for name, channels, hidden in (("dense CNN", (32, 64), 128), ("CNN 24/22/33 channels", (24, 22), 33)):
        out[f"{name} step, batch 128"] = train_step(fanin.models.cnn(channels=channels, hidden=hidden, seed=0), 128,
                                                    (1, 28, 28), adam=True)

    def op_step(fn, shapes, grads):  # one op forward and backward on random inputs
        ts = [fanin.Tensor(rng.standard_normal(s).astype(np.float32), requires_grad=r) for s, r in zip(shapes, grads)]
        g = None

        def step():
            nonlocal g
            y = fn(*ts)
            g = rng.standard_normal(y.shape).astype(np.float32) if g is None else g
            y.backward(g)
        return step

    rm, rv = np.zeros(32, np.float32), np.ones(32, np.float32)
    out["CNN op: batch norm (128, 32, 28, 28), forward+backward"] = op_step(
        lambda x, w, b: ops.batch_norm(x, w, b, rm, rv, True), [(128, 32, 28, 28), (32,), (32,)], [True] * 3)
    out["CNN op: conv2d 1->24 28x28 batch 128, forward+backward (a first layer)"] = op_step(
        lambda x, w: ops.conv2d(x, w, None, 1, 1), [(128, 1, 28, 28), (24, 1, 3, 3)], [False, True])
    out["CNN op: conv2d 22->24 14x14 batch 128, forward+backward"] = op_step(
        lambda x, w: ops.conv2d(x, w, None, 1, 1), [(128, 22, 14, 14), (24, 22, 3, 3)], [True, True])
    out["CNN op: max pool 2x2 (128, 24, 28, 28), forward+backward"] = op_step(
        lambda x: ops.max_pool2d(x, 2), [(128, 24, 28, 28)], [True])

    idx, vals = layer(4096, 4096, 410)
    for b in (1, 256):
        x = rng.standard_normal((b, 4096)).astype(np.float32)
        out[f"fanin_forward 4096x4096 90 %, batch {b}"] = lambda x=x: kernels.fanin_forward(x, idx, vals)
    x = rng.standard_normal((128, 4096)).astype(np.float32)
    dy = rng.standard_normal((128, 4096)).astype(np.float32)

    def fwd_bwd():
        kernels.fanin_forward(x, idx, vals)
        kernels.fanin_backward(x, idx, vals, dy)
    out["forward+backward 4096x4096 90 %, batch 128"] = fwd_bwd
    idx2, vals2 = layer(3072, 768, 76)
    x2 = rng.standard_normal((1, 768)).astype(np.float32)
    out["fanin_forward 3072x768 90 %, batch 1"] = lambda: kernels.fanin_forward(x2, idx2, vals2)

    # inference: the SRigL-90 % MLP of bench_inference.py through a Network (float32, and int8 weights with int8
    # activations), random weights of the same shapes
    from fanin import runtime

    plan = runtime.lower(fanin.models.mlp([784, 1024, 1024, 10], sparsity=[0.898, 0.911, None], seed=0))
    nets = {"fp32": runtime.Network(plan), "w8a8": runtime.Network(runtime.quantize(plan, 8), activations="int8")}
    for b in (1, 32, 256):
        xb = rng.standard_normal((b, 784)).astype(np.float32)
        for kind, net in nets.items():
            out[f"predict SRigL-90 % MLP {kind}, batch {b}"] = lambda net=net, xb=xb: net.predict(xb)
    return out


def worker(min_time: float, only: str | None):
    import fanin

    result = {name: _median_time(fn, min_time) for name, fn in _workloads().items() if not only or only in name}
    print(json.dumps({"_fanin": fanin.__file__, **result}))


# ----------------------------------------------------------------- driver side
def export(rev: str, dest: pathlib.Path):
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "fanin"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def run_side(tree: pathlib.Path, min_time: float, only: str | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", "--min-time", str(min_time)]
    if only:
        cmd += ["--only", only]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    if out.returncode:
        raise SystemExit(f"bench_ab: the worker for {tree} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not pathlib.Path(result.pop("_fanin")).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"bench_ab: the worker for {tree} imported fanin from elsewhere; check PYTHONPATH.")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="HEAD", help="git revision to compare against (default HEAD)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--min-time", type=float, default=0.4, help="seconds per workload per round")
    ap.add_argument("--out", help="write a section into this markdown file")
    ap.add_argument("--title", default="A/B against an earlier revision")
    ap.add_argument("--only", help="run only the workloads whose name contains this text (e.g. CNN)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.min_time, args.only)
    sys.path.insert(0, str(ROOT / "bench"))
    import common

    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.before], check=True,
                         capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="fanin_ab_") as tmp:
        before = pathlib.Path(tmp)
        export(rev, before)
        sides = {"before": before, "after": ROOT}
        times = {"before": [], "after": []}
        for r in range(args.rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for side in order:
                times[side].append(run_side(sides[side], args.min_time, args.only))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    for name in times["before"][0]:
        b = [t[name] for t in times["before"]]
        a = [t[name] for t in times["after"]]
        ratios = [x / y for x, y in zip(a, b)]
        rows.append([name, f"{statistics.median(b) * 1e3:.3f}", f"{statistics.median(a) * 1e3:.3f}",
                     f"{statistics.median(ratios):.3f}", f"{min(ratios):.2f}-{max(ratios):.2f}"])
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "fanin"], capture_output=True,
                           text=True).stdout.strip()
    after = "the working tree" + (" (uncommitted changes in fanin/)" if dirty else f" ({_head()})")
    only = f" --only {args.only}" if args.only else ""
    body = (common.header(f"env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_ab.py "
                          f"--before {args.before} --rounds {args.rounds}{only}")
            + f"\nbefore = {rev}, after = {after}; {args.rounds} rounds, fresh processes alternating.\n\n"
            + common.table(rows, ["workload", "before ms", "after ms", "after / before (median)", "range"]))
    print(body)
    if args.out:
        common.write_section(args.out, args.title, body)


def _head():
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


if __name__ == "__main__":
    main()
