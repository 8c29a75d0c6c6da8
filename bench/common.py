"""Shared benchmark helpers: timing, machine description, BLAS report, RESULTS.md sections."""
from __future__ import annotations

import datetime
import os
import pathlib
import platform
import re
import subprocess
import sys
import time

import numpy as np


def at_least_one(text: str) -> int:
    """argparse type of --workers / --threads: an integer >= 1 (a usage line, not a traceback, otherwise)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return n


def median_time(fn, min_time: float = 0.3, min_reps: int = 5, warmup: int = 2) -> float:
    """Median seconds per call of ``fn`` over at least ``min_reps`` calls and ``min_time`` seconds."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) > 10000:
            break
    return float(np.median(times))


def machine() -> str:
    """CPU model and core count, from lscpu."""
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        model = m.group(1).strip() if m else model
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def blas_info() -> str:
    """Which BLAS NumPy runs (threadpoolctl), and whether the OpenBLAS core-type overrides are set."""
    try:
        from threadpoolctl import threadpool_info

        libs = [f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')}, {i.get('num_threads')} threads)"
                for i in threadpool_info() if i.get("user_api") == "blas"]
        blas = "; ".join(libs) or "unknown"
    except ImportError:
        blas = "threadpoolctl not installed"
    overrides = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    return blas + (f"; WARNING overrides set: {overrides}" if overrides else "")


def header(command: str) -> str:
    return (f"- command: `{command}`\n- machine: {machine()}\n- date: {datetime.date.today().isoformat()}\n"
            f"- numpy BLAS: {blas_info()}\n- python {sys.version.split()[0]}, numpy {np.__version__}\n")


def write_section(path, title: str, body: str):
    """Replace (or append) the ``## title`` section of the markdown file at ``path``."""
    path = pathlib.Path(path)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"## {title}\n\n{body.rstrip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: block + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    path.write_text(text)


def table(rows, headers) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
