"""Huge pages for the kernels' gathered operands: the same training step with the pool on and off.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_hugepages.py [--out bench/RESULTS.md]

One process, two identical SRigL-90 % MLPs (784-1024-1024-10, ERK, batch 128, no connectivity updates);
chunks of training steps alternate between "4 KiB pages" (``fanin.kernels.memory`` off: plain np.empty)
and "huge pages" (the pool), so a slow spell of the shared machine hits both. Reports the median step
time of each and the median of the per-chunk-pair ratios.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import fanin.tuning  # noqa: E402
fanin.tuning.apply()  # before NumPy loads OpenBLAS: the training tuning (opt-in since import fanin sets nothing)
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_srigl import _model, epoch_data  # noqa: E402

from fanin import ops  # noqa: E402
from fanin.kernels import memory  # noqa: E402


def make():
    model, opt, _ = _model("srigl", delta_t=100, total_steps=4690)  # bench_srigl's ERK MLP; no updates run here
    return model, opt


def steps(model, opt, x, y, n, start, batch=128):
    t0 = time.perf_counter()
    for i in range(n):
        s = (start + i) * batch % (len(x) - batch)
        loss = ops.cross_entropy(model(fanin.Tensor(x[s:s + batch])), y[s:s + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=40, help="steps per chunk")
    args = ap.parse_args(argv)
    if not memory.enabled():
        sys.exit("huge pages are not available here (FANIN_HUGEPAGES=0 or no MADV_HUGEPAGE): nothing to compare.")
    x, y, source = epoch_data()
    small, huge = make(), make()
    for on, (model, opt) in ((False, small), (True, huge)):  # warm-up: compile, fill the pool
        memory._ENABLED = on
        steps(model, opt, x, y, 10, 0)
    t_small, t_huge = [], []
    for r in range(args.rounds):
        memory._ENABLED = False
        t_small.append(steps(*small, x, y, args.chunk, r * args.chunk))
        memory._ENABLED = True
        t_huge.append(steps(*huge, x, y, args.chunk, r * args.chunk))
    ratio = np.array(t_small) / np.array(t_huge)
    body = common.header("env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_hugepages.py")
    body += (f"\n\nSRigL-90 % MLP training step ({source}, batch 128), {args.rounds} alternating chunks of "
             f"{args.chunk} steps:\n\n")
    body += common.table([
        ["4 KiB pages (pool off)", f"{np.median(t_small) * 1e3:.3f}", "1.00"],
        ["huge pages (pool on)", f"{np.median(t_huge) * 1e3:.3f}",
         f"{np.median(ratio):.2f}x (interquartile {np.percentile(ratio, 25):.2f}-{np.percentile(ratio, 75):.2f})"],
    ], ["operands", "ms / step", "speed-up, median of chunk pairs"])
    st = memory.stats()
    body += (f"\n\nThe pool after the run: {st['mapped'] >> 20} MiB mapped in {st['regions']} region(s), "
             f"{st['in_use'] >> 10} KiB in use, {st['cached'] >> 10} KiB cached for reuse, "
             f"{st['fallbacks']} requests fell back to np.empty.")
    print(body)
    if args.out:
        common.write_section(args.out, "Huge pages: training step A/B", body)


if __name__ == "__main__":
    main()
