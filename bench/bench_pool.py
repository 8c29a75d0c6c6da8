"""The huge-page pool's cost and benefit: pool off (np.empty), the current pool, and optionally another pool module.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_pool.py [--old PATH]

``--old PATH`` loads a second implementation of ``fanin/kernels/memory.py`` from a file (for instance the
previous version, ``git show HEAD:fanin/kernels/memory.py > /tmp/memory_old.py``) and swaps it in as
``fanin.kernels.memory.empty`` for its turns; the kernels look ``memory.empty`` up at every call.

1. The hot path: ``empty`` of a 512 KiB packed operand and its release, bare and with the array filled
   (which pays the page faults if the allocator handed the memory back to the OS).
2. The SRigL-90 % MLP training step of bench_hugepages.py, one identical model per variant, chunks of
   steps in a rotating order so a slow spell of the shared machine hits every variant.
Set ``FANIN_MALLOC_TUNING=0`` to measure against glibc's default malloc settings. Prints only.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
import time

import fanin.tuning  # noqa: E402
fanin.tuning.apply()  # before NumPy loads OpenBLAS: the training tuning (opt-in since import fanin sets nothing)
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_hugepages import make, steps  # noqa: E402
from bench_srigl import epoch_data  # noqa: E402

from fanin.kernels import memory  # noqa: E402

NEW_EMPTY = memory.empty


def load_old(path):
    spec = importlib.util.spec_from_file_location("fanin_memory_other", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def use(variant, old):
    """Route fanin.kernels.memory.empty to the variant's implementation."""
    memory._ENABLED = variant != "off"
    memory.empty = old.empty if variant == "old" else NEW_EMPTY


def hot_path(empty, fill, n=3000, repeats=7):
    """Median microseconds for one empty((1024, 128), float32) (+ fill) and its release."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            a = empty((1024, 128), np.float32)
            if fill:
                a.fill(0.0)
            del a
        times.append((time.perf_counter() - t0) / n)
    return float(np.median(times)) * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default=None, help="path of another memory.py to compare (e.g. the previous version)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=40, help="steps per chunk")
    args = ap.parse_args(argv)
    if not memory.enabled():
        sys.exit("huge pages are not available here (FANIN_HUGEPAGES=0 or no MADV_HUGEPAGE): nothing to compare.")
    old = load_old(args.old) if args.old else None
    variants = ["off", "new"] + (["old"] if old else [])
    print(common.header("env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_pool.py"
                        + (f" --old {args.old}" if old else "")))
    print(f"FANIN_MALLOC_TUNING={os.environ.get('FANIN_MALLOC_TUNING', '(unset: tuned)')}\n")

    impl = {"off": lambda shape, dtype: np.empty(shape, dtype), "new": NEW_EMPTY}
    if old:
        impl["old"] = old.empty
    rows = []
    for v in variants:
        rows.append([v, f"{hot_path(impl[v], False):.2f}", f"{hot_path(impl[v], True):.2f}"])
    print(common.table(rows, ["variant", "us per empty + free", "us per empty + fill + free"]) + "\n")

    x, y, source = epoch_data()
    models = {v: make() for v in variants}
    for v in variants:  # warm-up: compile, fill the pool
        use(v, old)
        steps(*models[v], x, y, 10, 0)
    times = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            use(v, old)
            times[v].append(steps(*models[v], x, y, args.chunk, r * args.chunk))
    use("new", old)
    t = {v: np.array(times[v]) for v in variants}

    def ratio(a, b):
        q = t[a] / t[b]
        return f"{np.median(q):.3f}x ({np.percentile(q, 25):.3f}-{np.percentile(q, 75):.3f})"

    rows = [[v, f"{np.median(t[v]) * 1e3:.3f}", ratio("off", v)] for v in variants]
    print(f"SRigL-90 % MLP training step ({source}, batch 128), {args.rounds} rounds of {args.chunk} steps each:\n")
    print(common.table(rows, ["variant", "ms / step (median)", "speed-up vs off, median of rounds (IQR)"]))
    if old:
        print(f"\nnew vs old pool, median of per-round ratios old/new: {ratio('old', 'new')}")
    print(f"\nnew pool: {memory.stats()}")
    if old:
        print(f"old pool: {old.stats()}")


if __name__ == "__main__":
    main()
