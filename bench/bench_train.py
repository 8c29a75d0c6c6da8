"""Training-step speed: fanin's engine against PyTorch CPU on the same MLP, in the same run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_train.py [--out bench/RESULTS.md]

One step = forward, cross-entropy, backward, SGD (momentum 0.9) update, for the MLP
784-1024-1024-10 at batch 128 (throughput) and batch 1 (per-op overhead).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import fanin.tuning  # noqa: E402
fanin.tuning.apply()  # before NumPy loads OpenBLAS: the training tuning (opt-in since import fanin sets nothing)
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402


try:
    import torch  # noqa: F401
except ImportError:
    pass
from fanin import ops  # noqa: E402

SIZES = [784, 1024, 1024, 10]


def fanin_step(model, opt, x, y):
    def step():
        loss = ops.cross_entropy(model(fanin.Tensor(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def torch_step(x, y, threads):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(SIZES) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    lossf = torch.nn.CrossEntropyLoss()

    def step():
        loss = lossf(model(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def run(batch: int, min_time: float):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, SIZES[0])).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int64)
    model = fanin.models.mlp(SIZES, seed=0)
    opt = fanin.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ours = common.median_time(fanin_step(model, opt, x, y), min_time)
    try:
        theirs = common.median_time(torch_step(x, y, 2), min_time)
    except ImportError:
        theirs = float("nan")
    return ours, theirs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write a section into this markdown file")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    args = ap.parse_args(argv)
    rows = []
    for batch in (128, 1):
        ours, theirs = run(batch, args.min_time)
        rows.append([batch, f"{ours * 1e3:.3f}", f"{theirs * 1e3:.3f}", f"{ours / theirs:.2f}"])
        print(f"batch {batch:4d}: fanin {ours * 1e3:8.3f} ms/step   torch {theirs * 1e3:8.3f} ms/step   "
              f"fanin/torch = {ours / theirs:.2f}", flush=True)
    body = (common.header("env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_train.py")
            + "\nMLP 784-1024-1024-10, one SGD-momentum training step (median). Target: fanin/torch <= 1.5 at batch 128.\n\n"
            + common.table(rows, ["batch", "fanin ms/step", "torch ms/step", "fanin / torch"]))
    print(body)
    if args.out:
        common.write_section(args.out, "Dense training step (issue 2)", body)


if __name__ == "__main__":
    main()
