"""Sweeps on a Dask cluster: independent training runs ("cells") as tasks, each cached when it finishes, so an
interrupted sweep resumes where it stopped (docs/DISTRIBUTED.md, "Sweeps on Dask").

    from fanin.distributed import sweep
    cells = {f"srigl-{s}": dict(method="srigl", sparsity=s, epochs=10, sizes="784-1024-1024-10") for s in (0.8, 0.9)}
    results = sweep(cells, cache="runs/")                       # a LocalCluster on this machine
    results = sweep(cells, cache="runs/", scheduler="tcp://host:8786")   # a running Dask scheduler

``scheduler``: None or "local" (a ``LocalCluster`` of ``workers`` processes x ``threads`` threads), an address of
a running scheduler, or "serial" (every cell in this process, one after the other: no Dask needed).

Threads: every task pins Numba (and, for a subprocess, OpenMP and OpenBLAS) to the threads its worker was given.
On a ``LocalCluster`` each worker runs one cell at a time with its ``threads`` threads (resource ``cell=1``).
On a cluster, start workers with ``--resources cell=1`` to get the same (a cell then uses all of the worker's
``--nthreads``); without that resource each of a worker's threads runs its own cell with one thread.

Results come back to this process, which writes the cache (a cell's JSON; for ``run_commands``, the files the
command wrote): workers need the package and the data, not a shared disk.
"""
from __future__ import annotations

import collections.abc
import contextlib
import inspect
import json
import logging
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

__all__ = ["sweep", "run_commands", "train_cell", "SweepError", "table_argv"]

_THREAD_ENV = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class SweepError(RuntimeError):
    """Some cells of a sweep failed (the others are cached: run the sweep again to retry the failed ones)."""


def _dask():
    try:
        import distributed
    except ImportError:
        raise SweepError("sweeps on Dask need dask.distributed: pip install 'fanin[distributed]' "
                         "(or pass scheduler='serial').") from None
    return distributed


@contextlib.contextmanager
def client(scheduler=None, workers: int | None = None, threads: int = 1):
    """A Dask client: a ``LocalCluster`` (``scheduler`` None or "local") of ``workers`` processes (default: this
    machine's cores // ``threads``) with ``threads`` threads and resource ``cell=1`` each, or one connected to
    the scheduler at ``scheduler`` ("tcp://host:8786")."""
    workers, threads = _check_size(workers, threads)
    distributed = _dask()
    if scheduler in (None, "local"):
        n = workers or max(1, (os.cpu_count() or 1) // threads)
        with distributed.LocalCluster(n_workers=n, threads_per_worker=threads, processes=True, host="127.0.0.1",
                                      dashboard_address=None, resources={"cell": 1},
                                      silence_logs=logging.ERROR) as cluster, distributed.Client(cluster) as c:
            yield c
    else:
        with distributed.Client(scheduler) as c:
            yield c


def _per_cell_resource(c) -> bool:
    """Whether every worker declares the ``cell`` resource (then a cell gets all of its worker's threads)."""
    info = c.scheduler_info().get("workers", {})
    return bool(info) and all("cell" in (w.get("resources") or {}) for w in info.values())


def _task_threads(per_cell: bool) -> int:
    """Threads a task may use: its worker's threads when the worker runs one cell at a time, else 1."""
    if not per_cell:
        return 1
    try:
        from distributed import get_worker

        w = get_worker()
        return int(getattr(w, "nthreads", None) or w.state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return 1


def _pin(threads: int):
    """Pin this thread's Numba kernels to ``threads`` threads."""
    try:
        import numba

        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    except ImportError:
        pass


def _env(threads: int) -> dict:
    return {**os.environ, **{k: str(threads) for k in _THREAD_ENV}}


def _check_size(workers, threads):
    """``workers`` (None: the default) and ``threads`` (None: 1) as integers >= 1, else a one-line error."""
    for what, value in (("workers", workers), ("threads", threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"sweep: {what} must be an integer >= 1 (or None for the default), "
                            f"not {type(value).__name__} {value!r}.")
        if value is not None and value < 1:
            raise ValueError(f"sweep: {what}={value} must be at least 1 (or None for the default).")
    return workers, threads or 1


def _check_scheduler(scheduler, serial=True):
    if scheduler is not None and not isinstance(scheduler, str):
        raise TypeError(f"sweep: scheduler must be None, 'local', {'serial, ' if serial else ''}or an address "
                        f"such as 'tcp://host:8786', not {type(scheduler).__name__}.")
    if scheduler == "serial" and not serial:
        raise ValueError("run_commands: there is no scheduler 'serial': use None or 'local' (a LocalCluster), or "
                         "an address such as 'tcp://host:8786' (a bench sweep without --scheduler runs serially).")


def _safe(name) -> str:
    if not isinstance(name, str):
        raise TypeError(f"sweep: cell name {name!r} is a {type(name).__name__}; names must be strings (they name "
                        "the cache files: letters, digits, _.+=-).")
    if not re.fullmatch(r"[A-Za-z0-9_.+=-]+", name):
        raise ValueError(f"sweep: cell name {name!r} must be usable as a file name (letters, digits, _.+=-).")
    return name


def _check_cells(cells, files: bool = True):
    """``cells`` as ``{name: {keyword: value}}`` (with ``files``, a cache: the names valid file names), else a
    one-line error."""
    if not isinstance(cells, collections.abc.Mapping):
        raise TypeError(f"sweep: cells must be a dict of {{name: {{keyword: value}}}}, not a {type(cells).__name__} "
                        "(e.g. {'srigl-0.9': dict(method='srigl', sparsity=0.9)}).")
    for name, kwargs in cells.items():
        if files:
            _safe(name)
        if not isinstance(kwargs, collections.abc.Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise TypeError(f"sweep: cell {name!r} must be a dict of keyword arguments (str keys) for fn, "
                            f"not {kwargs!r:.80}.")


def _read_cache(cache, names) -> dict:
    """The cached results ``{name: result}`` of ``names`` in the folder ``cache`` (created if missing); an
    entry that cannot be read is an error naming it (delete it to run its cell again), before anything runs."""
    try:
        if os.path.lexists(cache) and not cache.is_dir():
            raise NotADirectoryError(0, "it is a file, not a folder")
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"sweep: cache={str(cache)!r} cannot be the cache folder ({exc.strerror or exc}): "
                         "give a folder (it is created if missing).") from None
    results, bad = {}, []
    for name in names:
        path = cache / f"{name}.json"
        if not os.path.lexists(path):
            continue
        try:
            if not path.is_file():  # a folder, a broken link, a pipe (which would block the read)
                raise OSError(0, "not a regular file")
            results[name] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            bad.append(f"{path} ({getattr(exc, 'strerror', None) or f'{type(exc).__name__}: {exc}'})")
    if bad:
        raise ValueError(f"sweep: cannot read the cached result{'s' * (len(bad) > 1)} {'; '.join(bad)}: delete "
                         f"{'them' if len(bad) > 1 else 'it'} to run the cell{'s' * (len(bad) > 1)} again.")
    return results


# ------------------------------------------------------------------ python cells
def _call(fn, kwargs, per_cell, threads=None):
    """A task: ``fn(**kwargs)`` with Numba pinned (and ``threads=`` passed when ``fn`` takes it)."""
    threads = threads or _task_threads(per_cell)
    _pin(threads)
    if "threads" in inspect.signature(fn).parameters:
        kwargs = {**kwargs, "threads": threads}
    t0 = time.perf_counter()
    result = fn(**kwargs)
    return result, {"seconds": time.perf_counter() - t0, "threads": threads, "pid": os.getpid()}


def _write(path, data: bytes):
    """Write ``data`` to ``path`` atomically (a reader sees the old file or the whole new one)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def sweep(cells: dict, fn=None, cache=None, scheduler=None, workers: int | None = None, threads: int = 1,
          log=print) -> dict:
    """Run ``fn(**cells[name])`` for every cell, as Dask tasks; returns ``{name: result}`` in ``cells``' order.

    ``cells``: ``{name: {keyword: value}}``; a name is a file name of letters, digits and ``_.+=-``.
    ``fn``: a function of the cell's keyword arguments returning something JSON can hold (default
    ``train_cell``: one ``fanin train`` run, its relative paths resolved against this process's working directory
    now); it is shipped to the workers, so it must be importable there (or pickled by value). ``cache``: a folder
    (created if missing); a cell whose ``<cache>/<name>.json`` exists is not run again, and each result is
    written there as soon as it arrives. A cached file that cannot be read (not JSON, a folder, unreadable) stops
    the sweep before anything runs, naming it: delete it to run that cell again (it is never overwritten
    silently). ``scheduler``, ``workers`` (an integer >= 1, or None), ``threads`` (an integer >= 1): see the
    module docstring. Cells that fail are reported together in a ``SweepError`` after the others have finished.
    """
    _check_cells(cells, files=cache is not None)
    if fn is not None and not callable(fn):
        raise TypeError(f"sweep: fn must be a function of a cell's keyword arguments, not {type(fn).__name__}.")
    _check_scheduler(scheduler)
    workers, threads = _check_size(workers, threads)
    fn = fn or train_cell
    cache = pathlib.Path(cache) if cache is not None else None
    results = _read_cache(cache, cells) if cache is not None else {}
    todo = {name: _train_options(kwargs, f"sweep: cell {name!r}") if fn is train_cell else dict(kwargs)
            for name, kwargs in cells.items() if name not in results}
    if todo:
        log(f"sweep: {len(todo)} of {len(cells)} cells to run ({len(cells) - len(todo)} cached)")
    failed = {}

    def done(name, result, info):
        text = json.dumps(result, indent=1, default=str)
        results[name] = json.loads(text)  # what a later run reads from the cache
        if cache is not None:
            _write(cache / f"{name}.json", text.encode())
        log(f"  {name}: done in {info['seconds']:.1f}s ({info['threads']} threads, pid {info['pid']})")

    if todo and scheduler == "serial":
        for name, kwargs in todo.items():
            try:
                done(name, *_call(fn, kwargs, False, threads))
            except Exception as exc:
                failed[name] = f"{type(exc).__name__}: {exc}"
    elif todo:
        distributed = _dask()
        with client(scheduler, workers, threads) as c:
            per_cell = _per_cell_resource(c)
            futures = {c.submit(_call, fn, kwargs, per_cell, key=f"fanin-cell-{name}-{time.time_ns()}",
                                resources={"cell": 1} if per_cell else None, pure=False): name
                       for name, kwargs in todo.items()}
            for fut in distributed.as_completed(futures):
                name = futures[fut]
                try:
                    done(name, *fut.result())
                except Exception as exc:
                    failed[name] = f"{type(exc).__name__}: {exc}"
    if failed:
        kept = "the others are cached; run again to retry" if cache is not None else "the others finished"
        raise SweepError(f"sweep: these cells failed ({kept}): " +
                         "; ".join(f"{n}: {m}" for n, m in failed.items()))
    return {name: results[name] for name in cells}


_PATHS = ("out", "checkpoint", "resume", "json")  # fanin train's file options


def _train_options(options, name="train_cell") -> dict:
    """``options`` with the relative paths of ``_PATHS`` made absolute against the working directory, and a
    checkpoint that would be lost (``checkpoint_every`` without ``checkpoint``) refused."""
    options = {k: os.path.abspath(v) if k.replace("-", "_") in _PATHS and isinstance(v, (str, os.PathLike)) else v
               for k, v in options.items()}
    given = {k.replace("-", "_"): v for k, v in options.items()}
    if given.get("checkpoint_every") and not given.get("checkpoint"):
        raise ValueError(f"{name}: checkpoint_every without checkpoint= would write the checkpoint into the cell's "
                         "scratch folder, deleted with it: give checkpoint='path/to/<cell>.npz'.")
    return options


def train_cell(threads: int = 1, **options) -> dict:
    """One ``fanin train`` run with ``options`` as its flags (``method="srigl"`` -> ``--method srigl``; True ->
    a bare flag; a list -> repeated values), in a subprocess pinned to ``threads``; returns its ``--json`` record.

    It runs in a scratch folder: relative ``out``, ``checkpoint``, ``resume`` and ``json`` paths are resolved
    against the working directory of the caller (``sweep``'s, when the sweep is submitted), and
    ``checkpoint_every`` needs an explicit ``checkpoint``. The files are written by the worker that runs the cell."""
    options = _train_options(options)
    json_path = next((options.pop(k) for k in list(options) if k.replace("-", "_") == "json"), None)
    argv = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, *(map(str, value) if isinstance(value, (list, tuple)) else [str(value)])]
    with tempfile.TemporaryDirectory(prefix="fanin-cell-") as tmp:
        out = pathlib.Path(json_path or pathlib.Path(tmp) / "run.json")
        _run([sys.executable, "-m", "fanin.cli", "train", "--no-progress", *argv, "--json", str(out)], tmp, threads)
        return json.loads(out.read_text())


def _run(argv, cwd, threads):
    proc = subprocess.run(argv, cwd=cwd, env=_env(threads), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"`{' '.join(argv[1:])}` exited with {proc.returncode}: " + " | ".join(tail))
    return proc


# ----------------------------------------------------------------- command cells
def _command(python_args, outputs, per_cell):
    """A task: ``python *python_args`` in a scratch folder, the ``outputs`` paths in it redirected there;
    returns the files' bytes (the client writes them where they belong) and the run's output."""
    threads = _task_threads(per_cell)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fanin-cell-") as tmp:
        local = {str(o): str(pathlib.Path(tmp) / f"{i}-{pathlib.Path(o).name}") for i, o in enumerate(outputs)}
        argv = [sys.executable, *[local.get(a, a) for a in python_args]]
        proc = _run(argv, tmp, threads)
        files = {o: pathlib.Path(p).read_bytes() for o, p in local.items()}
    return files, {"seconds": time.perf_counter() - t0, "threads": threads, "pid": os.getpid(),
                   "stdout": proc.stdout}


def _check_job(job):
    """A job as ``(name, [str args], [str absolute outputs named in args])``, else a one-line error."""
    try:
        name, args, outputs = job
    except (TypeError, ValueError):
        raise TypeError(f"run_commands: a job is (name, args, outputs), not {job!r:.80}.") from None
    if isinstance(args, (str, bytes)) or isinstance(outputs, (str, bytes, os.PathLike)):
        raise TypeError(f"run_commands: job {name!r}: args and outputs must be lists (of arguments, of paths).")
    args, outputs = [str(a) for a in args], [str(o) for o in outputs]
    if not outputs:
        raise ValueError(f"run_commands: job {name!r} names no outputs: list the files it writes (absolute paths "
                         "named in its args); they come back from the worker and mark the job done.")
    for o in outputs:
        if not os.path.isabs(o) or o not in args:
            raise ValueError(f"run_commands: job {name!r}: output {o!r} must be an absolute path named verbatim in "
                             "the job's args (the worker redirects it to its scratch folder).")
    return name, args, outputs


def run_commands(jobs, scheduler=None, workers: int | None = None, threads: int = 1, log=print) -> list:
    """Run ``python ARGS`` for every job ``(name, args, outputs)`` whose ``outputs`` (absolute paths, written by
    the command and named verbatim in ``args``) do not all exist yet, as Dask tasks; the files come back to
    this process and are written in place (atomically) when the job finishes. Returns the names that failed.
    A job needs at least one output (they are what comes back, and what marks it done): one without is refused,
    as is an output that is relative or not in ``args``, before anything runs.

    What the bench sweeps (bench/sparse_table.py, bench/compress_table.py) use with ``--scheduler``.
    """
    _check_scheduler(scheduler, serial=False)
    workers, threads = _check_size(workers, threads)
    jobs = [_check_job(job) for job in jobs]
    todo = [(n, a, outs) for n, a, outs in jobs if not all(pathlib.Path(o).exists() for o in outs)]
    if not todo:
        return []
    log(f"sweep: {len(todo)} of {len(jobs)} runs to do on Dask ({len(jobs) - len(todo)} cached)")
    failed = []
    distributed = _dask()
    with client(scheduler, workers, threads) as c:
        per_cell = _per_cell_resource(c)
        futures = {c.submit(_command, a, outs, per_cell, key=f"fanin-run-{n}-{time.time_ns()}", pure=False,
                            resources={"cell": 1} if per_cell else None): n for n, a, outs in todo}
        for fut in distributed.as_completed(futures):
            name = futures[fut]
            try:
                files, info = fut.result()
            except Exception as exc:
                log(f"  {name}: FAILED: {type(exc).__name__}: {exc}")
                failed.append(name)
                continue
            for path, data in sorted(files.items(), key=lambda kv: kv[0].endswith(".json")):  # the JSON last
                _write(path, data)
            log(f"  {name}: done in {info['seconds']:.0f}s ({info['threads']} threads, pid {info['pid']})")
    return failed


def table_argv(argv, options=("--scheduler", "--workers", "--threads", "--runs")):
    """A bench sweep's arguments less where and how its runs were made (``options`` and their values, and
    --cached-only), i.e. the command that makes its table; what follows --extra is kept as it is."""
    out, skip, extra = [], False, False
    for a in argv:
        extra = extra or a == "--extra"  # what follows --extra belongs to `fanin train`
        if skip:
            skip = False
        elif extra:
            out.append(a)
        elif a in options:
            skip = True
        elif a != "--cached-only" and not a.startswith(tuple(o + "=" for o in options)):
            out.append(a)
    return out
