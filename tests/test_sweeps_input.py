"""Bad input to the Dask sweeps (fanin.distributed.sweeps) is refused with one clear line before anything starts;
relative paths of a ``fanin train`` cell are kept. No Dask cluster is started: ``_dask`` fails the test if reached."""
import json
import os
import pathlib

import pytest

from fanin.distributed import sweeps
from fanin.distributed.sweeps import SweepError, run_commands, sweep, train_cell

QUIET = {"log": lambda *a: None}


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch):
    def started(*a, **k):
        raise AssertionError("a Dask cluster was started")

    monkeypatch.setattr(sweeps, "_dask", started)


def cell(**kw):
    return {"got": kw}


def never(**kw):
    raise AssertionError("a cell ran")


# ------------------------------------------------------------------ 1. workers, threads
@pytest.mark.parametrize("option, error, match", [
    ({"workers": -1}, ValueError, "workers=-1 must be at least 1"),
    ({"workers": 0}, ValueError, "workers=0 must be at least 1"),
    ({"threads": -1}, ValueError, "threads=-1 must be at least 1"),
    ({"threads": 0}, ValueError, "threads=0 must be at least 1"),
    ({"workers": 1.5}, TypeError, "workers must be an integer"),
    ({"workers": True}, TypeError, "workers must be an integer"),
    ({"threads": "2"}, TypeError, "threads must be an integer"),
])
def test_workers_and_threads_are_checked_before_a_cluster_starts(option, error, match):
    with pytest.raises(error, match=match):
        sweep({"x": {}}, never, **option, **QUIET)
    with pytest.raises(error, match=match):
        run_commands([("x", ["-c", "pass", "/nonexistent/out.json"], ["/nonexistent/out.json"])], **option, **QUIET)
    assert sweep({"x": {"a": 1}}, cell, scheduler="serial", workers=None, threads=None, **QUIET) == {
        "x": {"got": {"a": 1}}}  # None: the defaults


# ------------------------------------------------------------------ 2. the cache
def test_corrupt_cache_entry_names_the_file_and_runs_nothing(tmp_path):
    (tmp_path / "a.json").write_text('{"ok": 1}')
    (tmp_path / "b.json").write_text('{"trunc')
    with pytest.raises(ValueError, match=r"b\.json .*delete it to run the cell again"):
        sweep({"a": {}, "b": {}, "c": {}}, never, cache=tmp_path, scheduler="serial", **QUIET)
    (tmp_path / "b.json").unlink()
    (tmp_path / "b.json").mkdir()
    with pytest.raises(ValueError, match=r"b\.json \(not a regular file\).*delete it"):
        sweep({"a": {}, "b": {}}, never, cache=tmp_path, scheduler="serial", **QUIET)


def test_cache_that_is_a_file_is_refused_before_any_cell_runs(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(ValueError, match="cache=.*runs.* cannot be the cache folder .*give a folder"):
        sweep({"a": {}}, never, cache=tmp_path / "runs", scheduler="serial", **QUIET)


def test_failures_without_a_cache_do_not_claim_the_others_are_cached():
    with pytest.raises(SweepError, match=r"\(the others finished\)"):
        sweep({"a": {}}, never, scheduler="serial", **QUIET)


# ------------------------------------------------------------------ 3. cells
@pytest.mark.parametrize("cells, error, match", [
    (["a", "b"], TypeError, "cells must be a dict of {name: {keyword: value}}, not a list"),

    ({"a": 3}, TypeError, "cell 'a' must be a dict of keyword arguments"),
    ({"a": {1: 2}}, TypeError, "cell 'a' must be a dict of keyword arguments"),
])
def test_cells_must_be_a_dict_of_named_keyword_dicts(cells, error, match):
    with pytest.raises(error, match=match):
        sweep(cells, never, scheduler="serial", **QUIET)


@pytest.mark.parametrize("cells, error, match", [
    ({1: {}}, TypeError, "cell name 1 is a int; names must be strings"),
    ({"a/b": {}}, ValueError, r"cell name 'a/b' must be usable as a file name"),
])
def test_cached_cells_are_named_like_files_and_uncached_ones_may_be_named_anything(tmp_path, cells, error, match):
    with pytest.raises(error, match=match):
        sweep(cells, never, cache=tmp_path / "runs", scheduler="serial", **QUIET)
    assert sweep({"srigl 90%": {"a": 1}, ("dense", 0): {"a": 2}}, lambda a: a * 10, scheduler="serial",
                 **QUIET) == {"srigl 90%": 10, ("dense", 0): 20}


# ------------------------------------------------------------------ 4. train_cell's paths
@pytest.fixture
def fake_train(monkeypatch):
    """``fanin train`` replaced: records its argv and writes its --json record (the last --json, as argparse)."""
    calls = []

    def run(argv, cwd, threads):
        calls.append(argv)
        record = argv[max(i for i, a in enumerate(argv) if a == "--json") + 1]
        pathlib.Path(record).write_text(json.dumps({"argv": argv}))

    monkeypatch.setattr(sweeps, "_run", run)
    return calls


def _value(argv, flag):
    return argv[argv.index(flag) + 1]


def test_train_cell_resolves_relative_paths_against_the_callers_folder(tmp_path, monkeypatch, fake_train):
    monkeypatch.chdir(tmp_path)
    train_cell(out="model.fanin", checkpoint="ck/run.npz", checkpoint_every=1, resume="old.npz", json="rec.json")
    argv = fake_train[-1]
    for flag, rel in [("--out", "model.fanin"), ("--checkpoint", "ck/run.npz"), ("--resume", "old.npz")]:
        assert _value(argv, flag) == str(tmp_path / rel)
    assert argv.count("--json") == 1 and json.loads((tmp_path / "rec.json").read_text())["argv"] == argv


def test_sweep_resolves_train_cell_paths_when_submitted(tmp_path, monkeypatch, fake_train):
    call = sweeps._call

    def on_a_worker(fn, kwargs, *a):  # a worker's working directory is not the caller's
        os.chdir(worker)
        return call(fn, kwargs, *a)

    worker = tmp_path / "worker"
    worker.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweeps, "_call", on_a_worker)
    sweep({"a": {"out": "model.fanin", "epochs": 1}}, scheduler="serial", **QUIET)
    assert _value(fake_train[-1], "--out") == str(tmp_path / "model.fanin")


def test_a_checkpoint_that_would_be_lost_is_refused(fake_train):
    with pytest.raises(ValueError, match="checkpoint_every without checkpoint="):
        train_cell(checkpoint_every=1)
    with pytest.raises(ValueError, match="cell 'a': checkpoint_every without checkpoint="):
        sweep({"a": {"checkpoint_every": 2}}, scheduler="serial", **QUIET)
    assert fake_train == []


# ------------------------------------------------------------------ 5. run_commands' jobs
@pytest.mark.parametrize("job, error, match", [
    (("x", ["-c", "pass"], []), ValueError, "job 'x' names no outputs: list the files it writes"),
    (("x", ["-c", "pass", "out.json"], ["out.json"]), ValueError, "output 'out.json' must be an absolute path"),
    (("x", ["-c", "pass"], ["/nonexistent/o.json"]), ValueError, "named verbatim in the job's args"),
    (("x", ["-c", "pass", "/nonexistent/o.json"], "/nonexistent/o.json"), TypeError, "must be lists"),
    (("x", ["-c"]), TypeError, r"a job is \(name, args, outputs\)"),
])
def test_run_commands_refuses_jobs_it_cannot_bring_back(job, error, match):
    with pytest.raises(error, match=match):
        run_commands([job], **QUIET)


def test_run_commands_has_no_serial_scheduler():
    with pytest.raises(ValueError, match="no scheduler 'serial'"):
        run_commands([("x", ["-c", "pass", "/nonexistent/o.json"], ["/nonexistent/o.json"])], scheduler="serial",
                     **QUIET)
