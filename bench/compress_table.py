"""Reproduce the self-compression table on Fashion-MNIST: a gamma sweep from a dense and from an SRigL-90 %
start, against the float model and post-training per-channel int8 / int4 quantization of it; writes
docs/COMPRESSION.md and its two figures.

    .venv/bin/python bench/compress_table.py --model mlp --epochs 10
    .venv/bin/python bench/compress_table.py --model cnn --epochs 3 --extra --optimizer adam

Each training run is one `fanin train ... --json` subprocess (the exact command is printed and recorded);
finished runs are cached in bench/runs/ (with the float runs' final checkpoints, which the post-training
quantization reads), so an interrupted sweep continues where it stopped. Post-training quantization
needs no retraining: every output channel's weights become ``b``-bit integers with the scale that fits
its largest weight (``fanin.compress.quantize`` with ``b`` = 8 or 4, ``e = log2(max|w| / (2**(b-1) - 1))``).

    .venv/bin/python bench/compress_table.py ... --scheduler local             # the runs as Dask tasks, this machine
    .venv/bin/python bench/compress_table.py ... --scheduler tcp://host:8786   # on a Dask cluster

With --scheduler the missing runs are submitted to Dask (`fanin.distributed.run_commands`, docs/DISTRIBUTED.md),
their files written into the same cache as they finish, and the table is made from the cache as without it.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import shlex
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUNS = ROOT / "bench" / "runs"
GAMMAS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]  # log-uniform-ish: ~2x steps over two decades
STARTS = {"dense": ["--method", "dense"], "srigl90": ["--method", "srigl", "--sparsity", "0.9"]}
MLP_SIZES = {"mlp": None, "mlp-wide": "784-1024-1024-10"}


def _slug(args):
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in "-".join(a.lstrip("-") for a in args))


def cell(model, start, gamma, seed, epochs, extra):
    """(name, command, files it writes, command as shown) of one `fanin train` run (``gamma`` None: the float
    model, with its final checkpoint kept)."""
    what = "float" if gamma is None else f"g{gamma:g}"
    name = f"compress-{model}-{start}-{what}-s{seed}-e{epochs}" + (f"-{_slug(extra)}" if extra else "")
    out = RUNS / f"{name}.json"
    arch = ["--model", "cnn"] if model == "cnn" else ["--model", "mlp"] + (
        ["--sizes", MLP_SIZES[model]] if MLP_SIZES.get(model) else [])
    cmd = [sys.executable, "-m", "fanin.cli", "train", *arch, "--epochs", str(epochs), "--seed", str(seed),
           "--no-progress", "--json", str(out), *STARTS[start], *extra]
    if gamma is None:
        cmd += ["--checkpoint-every", str(epochs), "--checkpoint", str(RUNS / f"{name}.npz")]
    else:
        cmd += ["--compress", f"{gamma:g}"]
    shown = "fanin train " + " ".join(cmd[4:]).replace(str(RUNS) + "/", "bench/runs/")
    return name, cmd, [out] + ([RUNS / f"{name}.npz"] if gamma is None else []), shown


def run_one(model, start, gamma, seed, epochs, extra, cached_only=False):
    """One `fanin train` run (``gamma`` None: the float model, with its final checkpoint kept)."""
    name, cmd, (out, *_), shown = cell(model, start, gamma, seed, epochs, extra)
    if out.exists() and (gamma is not None or (RUNS / f"{name}.npz").exists()):
        return json.loads(out.read_text()), shown, RUNS / f"{name}.npz"
    if cached_only:
        return None, shown, None
    print("$", shown, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"  done in {time.perf_counter() - t0:.0f}s", flush=True)
    return json.loads(out.read_text()), shown, RUNS / f"{name}.npz"


def post_training(run, ckpt, bits=None):
    """(test accuracy, % of fp32 dense bits, % with index bits) of the float run's final model, quantized per
    channel to ``bits`` (None: as trained, 32 bits per stored weight)."""
    import fanin  # noqa: F401
    from fanin import compress, nn
    from fanin.checkpoint import load_checkpoint
    from fanin.cli import build_model, load_data
    from fanin.train import evaluate

    args = argparse.Namespace(**{k: v for k, v in run["args"].items()})
    args.sizes = [int(s) for s in args.sizes] if isinstance(args.sizes, list) else args.sizes
    model = build_model(args)
    model.load_state_dict(load_checkpoint(ckpt)["model"])
    layers = [m for m in model.modules() if isinstance(m, compress.COMPRESSIBLE)]
    dense_bits = value_bits = index_bits = 0.0
    for m in layers:
        w = m.weight_param.data
        if bits is not None:
            e = np.log2(np.maximum(np.abs(w.reshape(w.shape[0], -1)).max(axis=1), 1e-12) / (2 ** (bits - 1) - 1))
            m.weight_param.data = compress.quantize(w, np.full(w.shape[0], float(bits)), e)
        dense_bits += 32.0 * compress._dense_count(m)
        value_bits += (bits or 32) * float(compress._per_channel_weights(m).sum())
        index_bits += compress._index_bits(m)
    _, test = load_data(args.model)
    _, acc = evaluate(model, *test)
    return acc, 100 * value_bits / dense_bits, 100 * (value_bits + index_bits) / dense_bits


def rows_for(results):
    rows = []
    for (start, label), (run, extra) in results.items():
        last = run["history"][-1] if run else None
        if label in ("float", "int8", "int4"):
            acc, pct, tot = extra
            rows.append([start, label, f"{100 * acc:.2f}", f"{pct:.3f}", f"{tot:.3f}", "-", "-", "-"])
            continue
        times = [h["time"] for h in run["history"]]
        rows.append([start, label, f"{100 * last['test_acc']:.2f}", f"{last['bits_pct']:.3f}",
                     f"{last['total_bits_pct']:.3f}", f"{last['weights_pct']:.2f}",
                     "/".join(map(str, last["channels"])), f"{times[0]:.1f} -> {times[-1]:.1f}"])
    return rows


def table(rows):
    head = ["start", "gamma / baseline", "test acc %", "% of fp32 dense bits", "with index bits",
            "% of dense weights left", "channels per layer", "s / epoch, first -> last"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def plots(model, results, stem):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e .[plot]); no figures written")
        return []
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = {"dense": "C0", "srigl90": "C1"}
    for start in STARTS:
        pts = sorted((run["history"][-1]["bits_pct"], 100 * run["history"][-1]["test_acc"])
                     for (s, label), (run, _) in results.items() if s == start and label.startswith("gamma"))
        if pts:
            ax.plot(*zip(*pts), "o-", color=colors[start], label=f"self-compression from {start}")
        for label, marker in (("float", "*"), ("int8", "s"), ("int4", "^")):
            if (start, label) in results:
                acc, pct, _ = results[(start, label)][1]
                ax.plot([pct], [100 * acc], marker, color=colors[start], ms=9, mfc="none" if label != "float" else None,
                        label=f"{start} {label}" + (" (post-training)" if label != "float" else ""))
    ax.set_xscale("log")
    ax.set_xlabel("% of the fp32 dense network's weight bits (log)")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"Fashion-MNIST {model}: accuracy vs size")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    pareto = ROOT / "docs" / f"{stem}_pareto.png"
    fig.savefig(pareto, dpi=120)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for (start, label), (run, _) in results.items():
        if label.startswith("gamma"):
            ax.plot([h["epoch"] for h in run["history"]], [h["time"] for h in run["history"]], "o-",
                    color=colors[start], alpha=0.3 + 0.7 * (label == max(
                        (lbl for (s, lbl) in results if s == start and lbl.startswith("gamma")),
                        key=lambda t: float(t.split()[1]))), label=f"{start}, {label}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training time per epoch, s")
    ax.set_title(f"{model}: time per epoch while channels are removed")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    times = ROOT / "docs" / f"{stem}_epoch_time.png"
    fig.savefig(times, dpi=120)
    return [pareto, times]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp", choices=["mlp", "mlp-wide", "cnn"],
                    help="mlp: 784-300-100-10 (the CLI default); mlp-wide: 784-1024-1024-10; cnn")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--gammas", type=float, nargs="+", default=GAMMAS)
    ap.add_argument("--starts", nargs="+", default=list(STARTS), choices=list(STARTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `fanin train` arguments")
    ap.add_argument("--out", default=str(ROOT / "docs" / "COMPRESSION.md"))
    ap.add_argument("--cached-only", action="store_true", help="summarise the finished runs, start no new ones")
    ap.add_argument("--scheduler", default=None, metavar="local|tcp://HOST:8786",
                    help="run the missing cells as Dask tasks: on a LocalCluster (local) or a running scheduler")
    ap.add_argument("--workers", type=common.at_least_one, default=None, help="--scheduler local: worker processes (cores / threads)")
    ap.add_argument("--threads", type=common.at_least_one, default=1, help="--scheduler local: threads per worker (and per run)")
    ap.add_argument("--runs", default=None, help="the cache folder of finished runs (default bench/runs)")
    args = ap.parse_args(argv)
    global RUNS
    RUNS = pathlib.Path(args.runs).resolve() if args.runs else RUNS
    RUNS.mkdir(parents=True, exist_ok=True)
    if args.scheduler and not args.cached_only:
        from fanin.distributed import run_commands

        jobs = []
        for start in args.starts:
            for g in [None, *args.gammas]:
                name, cmd, outputs, _ = cell(args.model, start, g, args.seed, args.epochs, args.extra)
                jobs.append((name, cmd[1:], outputs))
        run_commands(jobs, scheduler=args.scheduler, workers=args.workers, threads=args.threads)
        args.cached_only = True  # the table from the cache, as without --scheduler
    results, commands = {}, []
    for start in args.starts:
        run, cmd, ckpt = run_one(args.model, start, None, args.seed, args.epochs, args.extra, args.cached_only)
        if run is not None:
            commands.append(cmd)
            results[(start, "float")] = (run, post_training(run, ckpt))
            for bits in (8, 4):
                results[(start, f"int{bits}")] = (run, post_training(run, ckpt, bits))
        for g in args.gammas:
            run, cmd, _ = run_one(args.model, start, g, args.seed, args.epochs, args.extra, args.cached_only)
            if run is not None:
                commands.append(cmd)
                results[(start, f"gamma {g:g}")] = (run, None)
    rows = rows_for(results)
    text = table(rows)
    print(text)
    figs = plots(args.model, results, f"compress_{args.model}")

    from fanin.distributed.sweeps import table_argv

    shown = table_argv(argv or sys.argv[1:])
    body = (common.header(f".venv/bin/python bench/compress_table.py {shlex.join(shown)}")
            + f"\n{args.epochs} epochs, seed {args.seed}" + (f", `{' '.join(args.extra)}`" if args.extra else "")
            + "; self-compression with the CLI defaults (init 8 bits, b and e by Adam lr 0.03, fixed after 60 % of the steps); % of bits against the fp32 dense network "
              "(value bits; 'with index bits' adds ceil(log2 n_in) bits per condensed connection).\n\n" + text + "\n"
            + "".join(f"\n![{f.stem}]({f.name})\n" for f in figs)
            + "\n<details><summary>commands</summary>\n\n" + "\n".join(f"    {c}" for c in commands) + "\n\n</details>\n")
    common.write_section(args.out, f"Self-compression on Fashion-MNIST ({args.model})", body)


if __name__ == "__main__":
    main()
