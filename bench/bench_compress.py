"""What self-compression costs per training step: the quantizer's share of a step, and the step with and without it.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_compress.py [--out bench/RESULTS.md]

MLP 784-1024-1024-10 at batch 128 (dense, and SRigL-90 % condensed), SGD momentum. Three contenders
timed in interleaved rounds in one process: the float step; the same step with ``SelfCompression``
attached (quantized forward, straight-through backward, size loss, b/e Adam update; gamma 0 so no
channel goes and shapes stay fixed); and the quantizer alone (``ops.quantize`` forward + backward on
every layer's weights, what the step with compression adds in kernels). Target (issue 11): the
quantizer at most 15 % of a training step.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import fanin.tuning  # noqa: E402
fanin.tuning.apply()  # before NumPy loads OpenBLAS: the training tuning (opt-in since import fanin sets nothing)
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

from fanin import Tensor, compress, models, ops, optim  # noqa: E402

SIZES = [784, 1024, 1024, 10]


def make(sparsity, compressed):
    model = models.mlp(SIZES, sparsity=sparsity, seed=0)
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sc = compress.SelfCompression(model, gamma=0.0, optimizer=opt) if compressed else None
    return model, opt, sc


def step_fn(model, opt, sc, x, y):
    def step():
        loss = ops.cross_entropy(model(Tensor(x)), y)
        if sc is not None:
            loss = loss + sc.size_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sc is not None:
            sc.step()
    return step


def quantizer_fn(sc):
    layers = [layer for _, layer in sc.layers]
    grads = [np.ones_like(layer.weight_param.data) for layer in layers]

    def run():
        for layer, g in zip(layers, grads):
            q = ops.quantize(layer.weight_param, layer.bits, layer.exponent)
            q.backward(g)
        for layer in layers:
            layer.weight_param.grad = layer.bits.grad = layer.exponent.grad = None
    return run


def measure(fns: dict, rounds: int, per_round: float) -> dict:
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # compile and warm
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(common.median_time(fn, min_time=per_round, min_reps=5, warmup=1))
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--per-round", type=float, default=0.5)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 784)).astype(np.float32)
    y = rng.integers(0, 10, 128)
    rows = []
    for label, sparsity in (("dense", None), ("SRigL-90 % layers (k = 78)", 0.9)):
        model_f, opt_f, _ = make(sparsity, False)
        model_c, opt_c, sc = make(sparsity, True)
        times = measure({"float step": step_fn(model_f, opt_f, None, x, y),
                         "compressed step": step_fn(model_c, opt_c, sc, x, y),
                         "quantizer fwd+bwd": quantizer_fn(sc)}, args.rounds, args.per_round)
        med = {k: statistics.median(v) for k, v in times.items()}
        share = [q / c for q, c in zip(times["quantizer fwd+bwd"], times["compressed step"])]
        rows.append([label, f"{med['float step'] * 1e3:.2f}", f"{med['compressed step'] * 1e3:.2f}",
                     f"{med['quantizer fwd+bwd'] * 1e3:.2f}", f"{100 * statistics.median(share):.1f} %",
                     f"{med['compressed step'] / med['float step']:.2f}"])
        print(" | ".join(rows[-1]), flush=True)
    body = (common.header("env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_compress.py")
            + f"\nMLP 784-1024-1024-10, batch 128, SGD momentum; medians of {args.rounds} interleaved rounds. "
              "Target: quantizer <= 15 % of a training step.\n\n"
            + common.table(rows, ["layers", "float step ms", "step with self-compression ms", "quantizer fwd+bwd ms",
                                  "quantizer / compressed step (median of rounds)", "compressed / float step"]))
    print(body)
    if args.out:
        common.write_section(args.out, "Self-compression cost per step (issue 11)", body)


if __name__ == "__main__":
    main()
