"""Data-parallel training over MPI (2 ranks through the installed mpiexec) and sweeps on Dask (docs/DISTRIBUTED.md).

The MPI tests start this file under ``mpiexec -n 2 python tests/test_distributed.py SCENARIO DIR``: every rank
runs ``scenario_*`` below and leaves what it ended with in DIR, which the test compares with a single process.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from fanin.train import fit

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
EPOCHS, BATCH, N = 3, 32, 250  # 8 steps per epoch, the last batch 26 rows (13 per rank)
SPLIT = 1                      # the checkpoint after epoch 1 holds a captured batch (grad_accumulation 2)


def _launcher():
    """The MPI launcher next to this Python (the `mpich` wheel of the distributed extra), else one on PATH."""
    for cand in (pathlib.Path(sys.executable).parent / "mpiexec", shutil.which("mpiexec"), shutil.which("mpirun")):
        if cand and pathlib.Path(cand).exists():
            return str(cand)
    return None


def _mpi_problem():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install -e '.[distributed]')"
    if _launcher() is None:
        return "no MPI launcher (pip install -e '.[distributed]' brings MPICH's mpiexec)"
    return None


needs_mpi = pytest.mark.skipif(_mpi_problem() is not None, reason=str(_mpi_problem()))


# ----------------------------------------------------------------- the run
def synthetic(n=N, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 20)).astype(np.float32)
    y = ((x[:, 0] > 0).astype(np.int64) * 2 + (x[:, 1] + 0.5 * x[:, 2] > 0)).astype(np.int64)
    return x, y


def make_run():
    """SRigL (ablating: gamma_sal 0.9) + self-compression that removes channels within a few steps."""
    from fanin import models, optim, sparsity
    from fanin.compress import SelfCompression

    model = models.mlp([20, 32, 24, 4], sparsity=0.7, seed=0)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = optim.CosineSchedule(opt, total_steps=EPOCHS * 8)
    srigl = sparsity.SRigL(model, opt, sparsity=0.7, delta_t=3, t_end=20, grad_accumulation=2, gamma_sal=0.9)
    sc = SelfCompression(model, gamma=1.0, init_bits=2.0, optimizer=opt, lr=0.2, srigl=srigl)
    return model, opt, sched, srigl, sc, np.random.default_rng(0)


def train(run, epochs, comm=None, start_epoch=0, on_epoch_end=None):
    model, opt, sched, srigl, sc, rng = run
    return fit(model, opt, synthetic(), epochs=epochs, batch_size=BATCH, schedule=sched, hooks=[srigl, sc],
               loss_terms=[sc.size_loss], progress=False, rng=rng, comm=comm, start_epoch=start_epoch,
               on_epoch_end=on_epoch_end)


def snapshot(run) -> dict:
    """Weights, topology, bits and decisions of a run, as arrays and JSON."""
    from fanin import nn

    model, _, _, srigl, sc, _ = run
    out = {f"p:{n}": p.data.copy() for n, p in model.named_parameters()}
    for i, m in enumerate(m for m in model.modules() if isinstance(m, nn.FanInLinear)):
        out[f"indices{i}"], out[f"active{i}"] = np.array(m.indices), m.active.copy()
    out["srigl"] = np.frombuffer(json.dumps(srigl.history).encode(), np.uint8)
    out["removed"] = np.frombuffer(json.dumps(sc.history).encode(), np.uint8)
    return out


def assert_same_run(a, b, exact=False):
    """Topology, SRigL decisions and removed channels equal; weights (bits too) equal, or to float tolerance."""
    assert sorted(a) == sorted(b)
    for k in a:
        if k == "removed" and not exact:  # the constants folded into the consumers' biases are floats
            ra, rb = json.loads(bytes(a[k])), json.loads(bytes(b[k]))
            assert [{**r, "folded": None} for r in ra] == [{**r, "folded": None} for r in rb]
            np.testing.assert_allclose(sum((r["folded"] for r in ra), []), sum((r["folded"] for r in rb), []),
                                       rtol=2e-4, atol=2e-6)
        elif k.startswith("p:") and not exact:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=2e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def scenario_train(out):
    """2 ranks x 3 epochs, debug checks on; a checkpoint after epoch 1 (written by rank 0)."""
    from mpi4py import MPI

    from fanin.checkpoint import save_checkpoint, training_state

    run = make_run()
    model, opt, sched, srigl, sc, rng = run

    def on_epoch_end(epoch, rng_):
        if epoch == SPLIT:
            state = training_state(model, opt, sched, srigl, rng_, epoch, [], sc)  # every rank: gathers rows
            if MPI.COMM_WORLD.rank == 0:
                save_checkpoint(out / "ckpt.npz", state)

    train(run, EPOCHS, MPI.COMM_WORLD, on_epoch_end=on_epoch_end)
    np.savez(out / f"rank{MPI.COMM_WORLD.rank}.npz", **snapshot(run))


def resume(path, comm=None):
    from fanin.checkpoint import load_checkpoint, restore_training_state
    from fanin.distributed import data_parallel

    run = make_run()
    model, opt, sched, srigl, sc, rng = run
    if comm is not None:
        comm = data_parallel(comm)
        comm.attach([srigl, sc])  # before loading: SRigL keeps this rank's share of the checkpoint's captured rows
    epoch, _ = restore_training_state(load_checkpoint(path), model, opt, sched, srigl, rng, sc)
    train(run, EPOCHS, comm, start_epoch=epoch)
    return run


def scenario_resume(out):
    from mpi4py import MPI

    run = resume(out / "ckpt.npz", MPI.COMM_WORLD)
    np.savez(out / f"resumed{MPI.COMM_WORLD.rank}.npz", **snapshot(run))


class _Fail:
    """A hook that makes rank 1 fail at step 3: ``how`` = kill (SIGKILL, as the OOM killer), raise, hang."""

    def __init__(self, how, rank):
        self.how, self.rank, self.t = how, rank, 0

    def step(self):
        self.t += 1
        if self.rank == 1 and self.t == 3:
            if self.how == "kill":
                os.kill(os.getpid(), 9)
            if self.how == "raise":
                raise RuntimeError("rank 1 lost its data")
            time.sleep(120)


def scenario_fail(out, how):
    from mpi4py import MPI

    from fanin.distributed import DataParallel

    model, opt, sched, srigl, sc, rng = make_run()
    MPI.COMM_WORLD.Barrier()  # both ranks ready: the watchdog then times only the steps
    dp = DataParallel(MPI.COMM_WORLD, timeout=5.0)
    fit(model, opt, synthetic(), epochs=1, batch_size=BATCH, hooks=[srigl, _Fail(how, dp.rank)], progress=False,
        comm=dp)
    (out / "finished").write_text("the job should not have finished")


# ------------------------------------------------------------------ helpers
def mpiexec(scenario, out, n=2, timeout=90, env=None):
    cmd = [_launcher(), "-n", str(n), sys.executable, str(HERE / "test_distributed.py"), scenario, str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                               "OPENBLAS_NUM_THREADS": "1", **(env or {})})
    return proc, time.perf_counter() - t0


def load(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-rank run of the scenario (shared by the tests that read it)."""
    if _mpi_problem():
        pytest.skip(_mpi_problem())
    out = tmp_path_factory.mktemp("dp")
    proc, _ = mpiexec("train", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


# -------------------------------------------------------------------- tests
@needs_mpi
def test_two_ranks_match_one_process(two_ranks):
    """2 ranks with global batch 32 end with the weights, topology, bits and removed channels of 1 process
    with batch 32, and both ranks made the same SRigL decisions (and removals) at every update."""
    ranks = [load(two_ranks / f"rank{r}.npz") for r in (0, 1)]
    assert_same_run(ranks[0], ranks[1], exact=True)  # the ranks are bit-identical
    single = make_run()
    train(single, EPOCHS)
    alone = snapshot(single)
    assert_same_run(ranks[0], alone)
    history = json.loads(bytes(ranks[0]["srigl"]))
    assert len(history) == 6 and any(layer.get("ablated") for rec in history for layer in rec["layers"])
    assert json.loads(bytes(ranks[0]["removed"])), "the scenario should remove channels"


@needs_mpi
def test_checkpoint_from_two_ranks_resumes_on_one_and_two(two_ranks):
    """The checkpoint (written by rank 0) holds both ranks' rows of the batch captured for the next update, and
    resumes bit for bit on 2 ranks, and on 1 process to float tolerance with the same decisions."""
    from fanin.checkpoint import load_checkpoint

    captured = [pair for layer in load_checkpoint(two_ranks / "ckpt.npz")["updater"]["capture"] for pair in layer]
    assert len(captured) == 3 and all(len(x) == len(dy) == N - 7 * BATCH for x, dy in captured)  # 13 + 13 rows
    proc, _ = mpiexec("resume", two_ranks)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    straight = load(two_ranks / "rank0.npz")
    assert_same_run(load(two_ranks / "resumed0.npz"), straight, exact=True)  # same ranks: bit for bit
    assert_same_run(load(two_ranks / "resumed1.npz"), straight, exact=True)
    assert_same_run(snapshot(resume(two_ranks / "ckpt.npz")), straight)  # 1 process: float tolerance


@needs_mpi
@pytest.mark.parametrize("how, expect", [("kill", ("BAD TERMINATION", "signal 9")),
                                         ("raise", ("RuntimeError: rank 1 lost its data -- aborting all ranks",)),
                                         ("hang", ("waited more than 5 s in check at step 3",))])
def test_a_failing_rank_ends_the_job(tmp_path, how, expect):
    """A rank killed (the launcher ends the job), raising (it aborts the job) or hanging (the others' watchdog
    aborts it): the job ends with an error within seconds instead of hanging."""
    proc, seconds = mpiexec(f"fail-{how}", tmp_path, timeout=60)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not (tmp_path / "finished").exists(), text
    assert any(e in text for e in expect), text
    assert seconds < 30, f"{seconds:.0f}s: {text}"


def test_distributed_outside_a_launcher_says_how_to_launch(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI", "PMIX", "OMPI", "MPI_LOCAL"))}
    proc = subprocess.run([sys.executable, "-m", "fanin.cli", "train", "--distributed", "--epochs", "1"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and "mpiexec -n" in line, line
    if _mpi_problem() is None:
        assert "not started by an MPI launcher" in line, line


def test_distributed_without_mpi4py_says_how_to_install(monkeypatch):
    import importlib.util

    from fanin import distributed

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mpi4py" else find(name, *a))
    with pytest.raises(distributed.DistributedError, match=r"pip install 'fanin\[distributed\]'.*mpiexec -n 2"):
        distributed.world()


def _have_data():
    from fanin import data

    try:
        data.find_fashion_mnist()
        return True
    except data.DatasetNotFound:
        return False


@needs_mpi
@pytest.mark.integration
def test_cli_rank0_prints_and_writes_once_and_its_checkpoint_resumes_alone(tmp_path):
    if not _have_data():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    train = [sys.executable, "-m", "fanin.cli", "train", "--limit", "640", "--sizes", "784-64-10", "--method",
             "srigl", "--delta-t", "3", "--batch-size", "64", "--no-progress"]
    two = [_launcher(), "-n", "2", *train, "--distributed", "--epochs", "2", "--checkpoint-every", "1", "--checkpoint",
           "c.npz", "--json", "h.json", "--out", "m.fanin"]
    proc = subprocess.run(two, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 MPI ranks x 1 threads" in proc.stdout
    for line in ("test accuracy", "model written to", "train time"):
        assert proc.stdout.count(line) == 1, proc.stdout
    assert all((tmp_path / f).exists() for f in ("c.npz", "h.json", "m.fanin"))
    alone = subprocess.run([*train, "--epochs", "3", "--resume", "c.npz"], capture_output=True, text=True,
                           cwd=tmp_path, env=env, timeout=120)
    assert alone.returncode == 0 and "resumed from c.npz after epoch 2" in alone.stdout, alone.stdout + alone.stderr
    small = subprocess.run([_launcher(), "-n", "2", *train, "--distributed", "--batch-size", "1"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert small.returncode == 2 and small.stderr.strip().count("\n") == 0, small.stderr
    assert "batch size of at least 2" in small.stderr


@needs_mpi
@pytest.mark.integration
def test_cli_errors_under_mpi_are_one_line_and_end_every_rank_at_once(tmp_path):
    """A diverging run: the ranks' one-line reason, exit 2, no traceback. A failure on rank 0 alone (its --out
    cannot be written; only rank 0 writes) ends the job at once, not after --mpi-timeout. Ranks started with
    different --limit are refused at start-up, not left to an MPI truncation error."""
    if not _have_data():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    train = [sys.executable, "-m", "fanin.cli", "train", "--limit", "640", "--sizes", "784-32-10", "--epochs", "1",
             "--no-progress", "--distributed", "--mpi-timeout", "60"]
    t0 = time.perf_counter()
    runs = {"diverged": [_launcher(), "-n", "2", *train, "--lr", "1e30"],
            "rank 0": [_launcher(), "-n", "2", *train, "--out", "/proc/version/x.fanin"],
            "limits": [_launcher(), "-n", "1", *train, ":", "-n", "1", *train[:5], "320", *train[6:]]}
    for name, cmd in runs.items():
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
        text = proc.stdout + proc.stderr
        assert proc.returncode == 2, f"{name}: {text}"
        assert "Traceback" not in text and "fanin: " in text, f"{name}: {text}"
        assert time.perf_counter() - t0 < 45, f"{name} waited for the watchdog: {text}"
        assert {"diverged": "training diverged", "rank 0": "--out /proc/version/x.fanin",
                "limits": "disagree on the training samples"}[name] in text, text


def test_shards_cover_the_batch_and_batch_smaller_than_ranks_is_refused():
    from fanin.distributed.mpi import DataParallel

    for n, size in [(26, 2), (7, 3), (128, 4), (2, 3)]:
        rows = []
        for rank in range(size):
            dp = DataParallel.__new__(DataParallel)
            dp.rank, dp.size = rank, size
            rows += list(dp.shard(np.arange(n)))
        assert rows == list(range(n))
    dp = DataParallel.__new__(DataParallel)
    dp.rank, dp.size = 0, 4
    with pytest.raises(ValueError, match="batch size of at least 4"):
        dp.check_batch(3)


# -------------------------------------------------------------------- Dask
def tiny_cell(method, sparsity, seed, threads=1):
    """A sweep cell: a few SGD steps on synthetic data; JSON-able metrics (and the threads it was pinned to)."""
    import numba

    from fanin import models, optim
    from fanin.sparsity import SRigL
    from fanin.train import evaluate

    x, y = synthetic(128, seed)
    model = models.mlp([20, 16, 4], sparsity=sparsity if method == "srigl" else None, seed=seed)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hooks = [SRigL(model, opt, sparsity=sparsity, delta_t=2, t_end=6)] if method == "srigl" else []
    fit(model, opt, (x, y), epochs=2, batch_size=32, hooks=hooks, progress=False)
    loss, acc = evaluate(model, x, y)
    return {"loss": round(loss, 6), "acc": acc, "threads": numba.get_num_threads(), "asked": threads}


def _table(results):
    return "\n".join(f"| {name} | {r['loss']:.6f} | {r['acc']:.4f} |" for name, r in results.items())


def test_dask_sweep_matches_the_serial_loop_and_resumes(tmp_path):
    pytest.importorskip("distributed", reason="dask.distributed is not installed (pip install -e '.[distributed]')")
    import cloudpickle

    from fanin.distributed import SweepError, sweep

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    cells = {f"{m}-s{s}": {"method": m, "sparsity": 0.8, "seed": s} for m in ("dense", "srigl") for s in (0, 1)}
    serial = {name: tiny_cell(**kw) for name, kw in cells.items()}
    on_dask = sweep(cells, tiny_cell, cache=tmp_path, workers=2, threads=1, log=lambda *a: None)
    assert _table(on_dask) == _table(serial)
    assert all(r["threads"] == 1 for r in on_dask.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.json" for n in cells)

    def broken(**kw):
        raise AssertionError("a cached cell ran again")

    assert sweep(cells, broken, cache=tmp_path, log=lambda *a: None) == on_dask  # no cluster: all cached
    (tmp_path / "srigl-s1.json").unlink()  # an interrupted sweep: the missing cell runs, and only it
    with pytest.raises(SweepError, match="srigl-s1"):
        sweep(cells, broken, cache=tmp_path, scheduler="serial", log=lambda *a: None)


if __name__ == "__main__":  # a rank of an mpiexec job started by the tests above
    scenario, out = sys.argv[1], pathlib.Path(sys.argv[2])
    import fanin

    fanin.kernels.debug(True)  # every step: the ranks compare digests of their topology and weights
    if scenario.startswith("fail-"):
        scenario_fail(out, scenario[len("fail-"):])
    else:
        {"train": scenario_train, "resume": scenario_resume}[scenario](out)
