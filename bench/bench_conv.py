"""Convolution speed: FanInConv2d against fanin's dense Conv2d (same run), and the im2col choice.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_conv.py [--out bench/RESULTS.md]

Target (issue 3): a 3x3 FanInConv2d 64->64 on 16x16 maps, batch 32, 90 % sparse, >= 2x faster than the
dense Conv2d. Issue 2 asked to measure im2col as a Numba kernel against NumPy stride tricks.
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

from fanin import Tensor, nn  # noqa: E402


def im2col_strided(x, kh, kw, stride, padding):
    """im2col with stride tricks and one copy (the alternative to the Numba kernel)."""
    (sh, sw), (ph, pw) = stride, padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    b, c, h, w = xp.shape
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    s = xp.strides
    v = np.lib.stride_tricks.as_strided(xp, (b, ho, wo, c, kh, kw), (s[0], s[2] * sh, s[3] * sw, s[1], s[2], s[3]))
    return np.ascontiguousarray(v).reshape(b * ho * wo, c * kh * kw)


def conv_times(layer, x, min_time):
    xt = Tensor(x, requires_grad=True)

    def fwd():
        with fanin.no_grad():
            layer(xt)

    def fwd_bwd():
        out = layer(xt)
        out.backward(np.ones(out.shape, np.float32))
        xt.grad = None
        for p in layer.parameters():
            p.grad = None

    return common.median_time(fwd, min_time), common.median_time(fwd_bwd, min_time)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--min-time", type=float, default=0.5)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for c, hw, b in [(64, 16, 32), (32, 14, 128)]:
        x = rng.standard_normal((b, c, hw, hw)).astype(np.float32)
        dense = nn.Conv2d(c, c, 3, padding=1, seed=0)
        df, dfb = conv_times(dense, x, args.min_time)
        for s in (0.8, 0.9, 0.95):
            sparse = nn.FanInConv2d(c, c, 3, padding=1, sparsity=s, seed=0)
            sf, sfb = conv_times(sparse, x, args.min_time)
            rows.append([f"{c}->{c} {hw}x{hw} b{b}", f"{s:.0%}", f"{df * 1e3:.2f}", f"{sf * 1e3:.2f}", f"{df / sf:.2f}",
                         f"{dfb * 1e3:.2f}", f"{sfb * 1e3:.2f}", f"{dfb / sfb:.2f}"])
            print(rows[-1], flush=True)
    x = rng.standard_normal((128, 32, 14, 14)).astype(np.float32)
    t_numba = common.median_time(lambda: fanin.kernels.im2col(x, 3, 3, 1, 1), args.min_time)
    t_strided = common.median_time(lambda: im2col_strided(x, 3, 3, (1, 1), (1, 1)), args.min_time)
    np.testing.assert_array_equal(fanin.kernels.im2col(x, 3, 3, 1, 1), im2col_strided(x, 3, 3, (1, 1), (1, 1)))
    body = (common.header("env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_conv.py")
            + "\n3x3 convolutions, padding 1; dense = fanin's Conv2d (im2col + BLAS GEMM); times are medians.\n"
            "Target: 64->64 on 16x16, batch 32, 90 %: >= 2x.\n\n"
            + common.table(rows, ["layer", "sparsity", "dense fwd ms", "fan-in fwd ms", "fwd speed-up",
                                  "dense fwd+bwd ms", "fan-in fwd+bwd ms", "fwd+bwd speed-up"])
            + f"\n\nim2col of (128, 32, 14, 14), 3x3, padding 1: Numba kernel {t_numba * 1e3:.2f} ms, "
              f"NumPy stride tricks + copy {t_strided * 1e3:.2f} ms ({t_strided / t_numba:.2f}x) - "
              "fanin uses the Numba kernel (and its race-free col2im).\n")
    print(body)
    if args.out:
        common.write_section(args.out, "Convolutions (issues 2 and 3)", body)


if __name__ == "__main__":
    main()
