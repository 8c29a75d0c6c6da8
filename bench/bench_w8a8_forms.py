"""Int8 activations, batch 1 and a block of 4: each step form of ``fanin.kernels.w8a8`` (``FORMS``) forced on one
layer of every ``bench_kernels.py`` shape and sparsity, against the form ``QLayout`` chooses (bench/RESULTS.md,
thirteenth session). Serial kernel (``forward_serial``), medians of 7 x 30 ms; every form's outputs are checked equal
to the first's (bit for bit) before timing.

    .venv/bin/python bench/bench_w8a8_forms.py [4096x4096 768x3072 ...]
"""
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from fanin import nn, runtime  # noqa: E402
from fanin.kernels import w8a8  # noqa: E402

SHAPES = [(n_out, n_in, s) for n_out, n_in in ((4096, 4096), (768, 3072), (3072, 768)) for s in (0.8, 0.9, 0.95, 0.99)]


def spec_of(layer) -> dict:
    """The layer dict ``w8a8.QLayout`` takes, from a one-layer network's plan."""
    op = runtime.lower(nn.Sequential([layer]))["ops"][0]
    a = op["arrays"]
    return {"n_in": op["n_in"], "n_out": op["n_out"], "act": "none", "bias": a["bias"], "indices": a["indices"],
            "values": a["values"]}


def serial_us(lay, batch: int) -> float:
    """Median of 7 rounds of ~30 ms of ``forward_serial`` calls, us per call."""
    x = np.random.default_rng(1).standard_normal((batch, lay.n_in)).astype(np.float32)
    ws, out = lay.workspace(1), np.empty((batch, lay.n_out), np.float32)
    for _ in range(5):
        w8a8.forward_serial(x, out, ws, *lay.arrays)
    rounds = []
    for _ in range(7):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.03:
            w8a8.forward_serial(x, out, ws, *lay.arrays)
            n += 1
        rounds.append((time.perf_counter() - t0) / n)
    return statistics.median(rounds) * 1e6


def main():
    pick = sys.argv[1:]
    forms = range(len(w8a8.FORMS))
    print(f"L2 taken as {w8a8.l2_bytes() >> 10} KiB; cells: steps / us at batch 1 / us at batch 4\n")
    print("| layer | sparsity | " + " | ".join(f"F{f} {w8a8.FORMS[f]}" for f in forms) + " | chosen |")
    print("|---|---|" + "---|" * len(forms) + "---|")
    for n_out, n_in, s in SHAPES:
        if pick and f"{n_out}x{n_in}" not in pick:
            continue
        spec = spec_of(nn.FanInLinear(n_in, n_out, sparsity=s, seed=0))
        x = np.random.default_rng(2).standard_normal((3, n_in)).astype(np.float32)
        want = w8a8.QLayout([spec], forms=[0]).run(x)
        cells = []
        for f in forms:
            lay = w8a8.QLayout([spec], forms=[f])
            assert np.array_equal(lay.run(x), want), f"form {f} differs at {n_out}x{n_in} {s}"
            cells.append(f"{lay.lt[0, w8a8.Q_STEPS]} / {serial_us(lay, 1):.1f} / {serial_us(lay, 4):.1f}")
        auto = w8a8.QLayout([spec])
        print(f"| {n_out}x{n_in} | {s:.0%} | " + " | ".join(cells) + f" | F{auto.lt[0, w8a8.Q_FORM]} |", flush=True)


if __name__ == "__main__":
    main()
