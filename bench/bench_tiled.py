"""Float32 panels: input-tiled layers (``fanin.kernels.infer``, ``Layout._tiled``, ``tile_chunks``) against the
same layers untiled, in the same run (bench/RESULTS.md, fourteenth session).

1. One layer of every ``bench_kernels.py`` shape and sparsity, and the SRigL-90 % MLP's two condensed layers:
   ``panels_forward_serial`` at batch 32 (one panel), tiled as ``tile_chunks`` decides and forced untiled.
2. The SRigL-90 % MLP 784-1024-1024-10 through ``panels_forward`` (the engine's driver from batch 64 on) on the
   threads Numba has, batches 64 / 128 / 256.

Times: medians over interleaved rounds (``bench_runtime.interleaved``: a pause before each turn, ~50-100 ms of
calls a turn); the speed-up is the median of per-round ratios (untiled time / tiled time). Outputs are checked bit
for bit equal before timing.

    .venv/bin/python bench/bench_tiled.py [--rounds 7] [--threads 2]
"""
import argparse
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numba  # noqa: E402
import numpy as np  # noqa: E402

import bench_runtime  # noqa: E402
from fanin import nn, runtime  # noqa: E402
from fanin.kernels import infer  # noqa: E402
from fanin.runtime import engine  # noqa: E402

LAYERS = [(n_out, n_in, s) for n_out, n_in in ((768, 3072), (3072, 768), (4096, 4096), (1024, 784))
          for s in (0.8, 0.9, 0.95, 0.99)]


def layouts(specs):
    """(tiled as the rule says, untiled) layouts of the same layers."""
    tiled = infer.Layout(specs)
    keep = infer.TILE_L1
    infer.TILE_L1 = 1e9  # no layer's block overflows a billion L1s
    try:
        plain = infer.Layout(specs)
    finally:
        infer.TILE_L1 = keep
    return tiled, plain


def compare(tiled, plain, x, driver, ws_of, n, seconds):
    outs = {}
    calls = {}
    for name, lay in (("untiled", plain), ("tiled", tiled)):
        out = np.empty((x.shape[0], lay.n_out), np.float32)
        ws = ws_of(lay)
        driver(x, out, *ws, *lay.arrays)
        outs[name] = out.copy()
        calls[name] = (lambda d=driver, o=out, w=ws, a=lay.arrays: d(x, o, *w, *a))
    assert np.array_equal(outs["tiled"], outs["untiled"]), "tiled and untiled outputs differ"
    t, _ = bench_runtime.interleaved(calls, n, seconds)
    return statistics.median(t["untiled"]), statistics.median(t["tiled"]), bench_runtime.ratio(t, "untiled", "tiled")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    args = ap.parse_args()
    numba.set_num_threads(args.threads)
    print(f"L1d {infer.l1d_bytes() >> 10} KiB, L2 {infer.l2_bytes() >> 10} KiB, TB {infer.TB}, TILE_L1 "
          f"{infer.TILE_L1}, TILE_MIN_SLOTS {infer.TILE_MIN_SLOTS}, {args.threads} thread(s) for part 2\n")
    print("1. One layer, batch 32, panels_forward_serial\n")
    print("| layer | sparsity | fan-in | chunks | untiled us | tiled us | speed-up |")
    print("|---|---|---|---|---|---|---|")
    x_rng = np.random.default_rng(0)
    for n_out, n_in, s in LAYERS:
        spec = engine._spec(runtime.lower(nn.Sequential([nn.FanInLinear(n_in, n_out, sparsity=s, seed=0)]))["ops"][0])
        tiled, plain = layouts([spec])
        nc = int(tiled.tab[0, infer.F_TNC])
        x = x_rng.standard_normal((32, n_in)).astype(np.float32)
        u, t, r = compare(tiled, plain, x, infer.panels_forward_serial, lambda lay: lay.panels_workspace(32),
                          args.rounds, 0.05)
        print(f"| {n_out}x{n_in} | {s:.0%} | {spec['indices'].shape[1]} | {nc or '-'} | {u * 1e6:.1f} | "
              f"{t * 1e6:.1f} | {r:.2f}x |", flush=True)
    print("\n2. SRigL-90 % MLP 784-1024-1024-10, panels_forward\n")
    print("| batch | untiled ms | tiled ms | speed-up |")
    print("|---|---|---|---|")
    specs = [engine._spec(op) for op in bench_runtime.mlp_plan()["ops"]]
    tiled, plain = layouts(specs)
    for B in (64, 128, 256):
        x = x_rng.standard_normal((B, 784)).astype(np.float32)
        u, t, r = compare(tiled, plain, x, infer.panels_forward, lambda lay, b=B: lay.panels_workspace(b),
                          args.rounds, 0.1)
        print(f"| {B} | {u * 1e3:.3f} | {t * 1e3:.3f} | {r:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
