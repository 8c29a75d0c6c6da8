"""Reproduce the sparse-training table on Fashion-MNIST: dense, static, RigL, SRigL, SRigL without
ablation, over sparsities and seeds; writes docs/RESULTS.md and docs/sparse_accuracy.png.

    .venv/bin/python bench/sparse_table.py --model mlp --epochs 10 --seeds 0 1
    .venv/bin/python bench/sparse_table.py --model cnn --epochs 3 --sparsities 0.9 --seeds 0

Each run is one `fanin train ... --json` subprocess (the exact command is printed and recorded);
finished runs are cached in bench/runs/ so an interrupted sweep continues where it stopped.

    .venv/bin/python bench/sparse_table.py ... --scheduler local               # the runs as Dask tasks, this machine
    .venv/bin/python bench/sparse_table.py ... --scheduler tcp://host:8786     # on a Dask cluster

With --scheduler the missing runs are submitted to Dask (`fanin.distributed.run_commands`, docs/DISTRIBUTED.md),
written into the same cache as they finish, and the table is made from the cache as without it.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUNS = ROOT / "bench" / "runs"
METHODS = {
    "dense": ["--method", "dense"],
    "static": ["--method", "static"],
    "rigl": ["--method", "rigl"],
    "srigl": ["--method", "srigl"],
    "srigl-no-ablation": ["--method", "srigl", "--no-ablation"],
}


def cell(model, method, sparsity, seed, epochs, extra):
    """(name, command, JSON path, command as shown) of one `fanin train` run; ``method`` is a key of METHODS."""
    name = f"{model}-{method}-{'dense' if method == 'dense' else sparsity}-s{seed}-e{epochs}"
    if extra:  # runs with other training arguments are cached under their own names
        name += "-" + "".join(c if c.isalnum() or c in ".-" else "-" for c in "-".join(a.lstrip("-") for a in extra))
    out = RUNS / f"{name}.json"
    cmd = [sys.executable, "-m", "fanin.cli", "train", "--model", model, "--epochs", str(epochs), "--seed", str(seed),
           "--no-progress", "--json", str(out), *METHODS[method], *extra]
    if method != "dense":
        cmd += ["--sparsity", str(sparsity)]
    if model == "mlp":
        cmd += ["--sizes", "784-1024-1024-10"]
    shown = "fanin train " + " ".join(cmd[4:]).replace(str(out), f"bench/runs/{name}.json")
    return name, cmd, out, shown


def run_one(model, method, sparsity, seed, epochs, extra, cached_only=False):
    """One `fanin train` run (or its cached JSON); ``method`` is a key of METHODS."""
    name, cmd, out, shown = cell(model, method, sparsity, seed, epochs, extra)
    if out.exists():
        return json.loads(out.read_text()), shown
    if cached_only:
        return None, shown
    print("$", shown, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"  done in {time.perf_counter() - t0:.0f}s", flush=True)
    return json.loads(out.read_text()), shown


def summarize(model, results):
    """Markdown table: mean test accuracy (per seed), ablated neurons, fan-ins, epoch time."""
    rows = []
    for (method, sparsity), runs in sorted(results.items(), key=lambda kv: (kv[0][1] or 0, kv[0][0])):
        accs = [r["history"][-1]["test_acc"] for r in runs]
        last = runs[0]["history"][-1]
        times = [h["time"] for r in runs for h in r["history"]]
        rows.append([method, "-" if sparsity is None else f"{sparsity:.0%}",
                     f"{100 * sum(accs) / len(accs):.2f}", " / ".join(f"{100 * a:.2f}" for a in accs),
                     last.get("ablated", "-"), last.get("fan_in", "-"), f"{sum(times) / len(times):.1f}"])
    head = ["method", "sparsity", "test acc % (mean)", "per seed", "ablated neurons / layer (seed 0)",
            "final fan-ins (seed 0)", "s / epoch (shared machine: not a benchmark)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def plot(model, results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e .[plot]); no figure written")
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    dense = [r["history"][-1]["test_acc"] for (m, _), runs in results.items() if m == "dense" for r in runs]
    if dense:
        ax.axhline(100 * sum(dense) / len(dense), color="k", ls="--", label="dense")
    for method in METHODS:
        if method == "dense":
            continue
        pts = sorted((s, sum(r["history"][-1]["test_acc"] for r in runs) / len(runs))
                     for (m, s), runs in results.items() if m == method)
        if pts:
            ax.plot([100 * s for s, _ in pts], [100 * a for _, a in pts], "o-", label=method)
    ax.set_xlabel("sparsity %")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"Fashion-MNIST, {'MLP 784-1024-1024-10' if model == 'mlp' else 'CNN'} (mean over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.99])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `fanin train` arguments")
    ap.add_argument("--out", default=str(ROOT / "docs" / "RESULTS.md"))
    ap.add_argument("--cached-only", action="store_true", help="summarise the finished runs, start no new ones")
    ap.add_argument("--tag", default=None, help="a side study: its own section of --out (title + tag), no figure")
    ap.add_argument("--gamma-sal", type=float, nargs="+", default=[],
                    help="also run SRigL with these gamma_sal values (rows 'srigl, gamma_sal G')")
    ap.add_argument("--scheduler", default=None, metavar="local|tcp://HOST:8786",
                    help="run the missing cells as Dask tasks: on a LocalCluster (local) or a running scheduler")
    ap.add_argument("--workers", type=common.at_least_one, default=None, help="--scheduler local: worker processes (cores / threads)")
    ap.add_argument("--threads", type=common.at_least_one, default=1, help="--scheduler local: threads per worker (and per run)")
    ap.add_argument("--runs", default=None, help="the cache folder of finished runs (default bench/runs)")
    args = ap.parse_args(argv)
    global RUNS
    RUNS = pathlib.Path(args.runs).resolve() if args.runs else RUNS
    RUNS.mkdir(parents=True, exist_ok=True)
    results, commands = {}, []
    variants = [(m, m, args.extra) for m in args.methods]  # (row label, method, extra arguments)
    variants += [(f"srigl, gamma_sal {g}", "srigl", ["--gamma-sal", str(g), *args.extra]) for g in args.gamma_sal]
    cells = [(label, method, s, seed, extra) for seed in args.seeds for label, method, extra in variants
             for s in ([None] if method == "dense" else args.sparsities)]
    if args.scheduler and not args.cached_only:
        from fanin.distributed import run_commands

        jobs = []
        for label, method, s, seed, extra in cells:
            name, cmd, out, _ = cell(args.model, method, s, seed, args.epochs, extra)
            jobs.append((name, cmd[1:], [out]))
        run_commands(jobs, scheduler=args.scheduler, workers=args.workers, threads=args.threads)
    for label, method, s, seed, extra in cells:
        res, cmd = run_one(args.model, method, s, seed, args.epochs, extra, args.cached_only or bool(args.scheduler))
        if res is not None:
            results.setdefault((label, s), []).append(res)
            commands.append(cmd)
    table = summarize(args.model, results)
    print(table)
    (ROOT / "docs").mkdir(exist_ok=True)
    fig = ROOT / "docs" / f"sparse_accuracy_{args.model}.png"
    has_fig = plot(args.model, results, fig) if args.tag is None else False

    from fanin.distributed.sweeps import table_argv

    shown_args = table_argv(argv or sys.argv[1:])  # the command that makes the runs
    body = (common.header(f".venv/bin/python bench/sparse_table.py {shlex.join(shown_args)}")
            + f"\n{args.epochs} epochs, " + ("`" + " ".join(args.extra) + "`, " if args.extra else "SGD + Nesterov momentum 0.9, lr 0.05 ")
            + "cosine schedule, batch 128, weight decay 5e-4; "
            "SRigL/RigL: ERK, delta_t 100, alpha 0.3, t_end 75 %, gamma_sal 0.3.\n\n" + table + "\n"
            + (f"\n![accuracy vs sparsity](sparse_accuracy_{args.model}.png)\n" if has_fig else "")
            + "\n<details><summary>commands</summary>\n\n" + "\n".join(f"    {c}" for c in commands) + "\n\n</details>\n")
    title = f"Sparse training on Fashion-MNIST ({args.model})" + (f": {args.tag}" if args.tag else "")
    common.write_section(args.out, title, body)


if __name__ == "__main__":
    main()
