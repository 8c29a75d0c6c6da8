"""Checkpoints: atomic writes, validation, and bit-identical resume."""
import numpy as np
import pytest

from fanin import models, optim, sparsity
from fanin.checkpoint import (CheckpointError, load_checkpoint, restore_training_state, save_checkpoint,
                              training_state)
from fanin.train import fit


def synthetic(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 20)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    return x, y


def make_run(method):
    model = models.mlp([20, 24, 16, 2], sparsity=0.7 if method == "srigl" else None, dropout=0.1, seed=0)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = optim.CosineSchedule(opt, total_steps=4 * 8)
    if method == "srigl":
        upd = sparsity.SRigL(model, opt, sparsity=0.7, delta_t=3, t_end=24, grad_accumulation=2)
    else:
        upd = sparsity.RigL(model, opt, sparsity=0.7, delta_t=3, t_end=24, grad_accumulation=2)
    return model, opt, sched, upd, np.random.default_rng(0)


@pytest.mark.parametrize("method", ["srigl", "rigl"])
def test_resume_is_bit_identical(tmp_path, method):
    data = synthetic()
    model, opt, sched, upd, rng = make_run(method)
    fit(model, opt, data, epochs=4, batch_size=32, schedule=sched, hooks=[upd], progress=False, rng=rng)
    straight = model.state_dict()

    model, opt, sched, upd, rng = make_run(method)
    history = fit(model, opt, data, epochs=2, batch_size=32, schedule=sched, hooks=[upd], progress=False, rng=rng)
    save_checkpoint(tmp_path / "c.npz", training_state(model, opt, sched, upd, rng, 2, history))

    model, opt, sched, upd, rng = make_run(method)  # a fresh process, in effect
    epoch, history = restore_training_state(load_checkpoint(tmp_path / "c.npz"), model, opt, sched, upd, rng)
    assert epoch == 2 and len(history) == 2
    fit(model, opt, data, epochs=4, batch_size=32, schedule=sched, hooks=[upd], progress=False, rng=rng,
        start_epoch=epoch)
    resumed = model.state_dict()
    assert straight.keys() == resumed.keys()
    for k in straight:
        np.testing.assert_array_equal(straight[k], resumed[k], err_msg=k)


def test_atomic_write_keeps_the_old_checkpoint_on_failure(tmp_path, monkeypatch):
    import fanin.checkpoint as ck

    path = tmp_path / "c.npz"
    save_checkpoint(path, {"a": np.arange(3), "n": 1})

    def crash_mid_write(f, **arrays):
        f.write(b"PK partial data")
        raise OSError("disk full")

    monkeypatch.setattr(ck.np, "savez", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"a": np.arange(5), "n": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["n"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary left behind


def test_corrupt_or_foreign_files_are_refused(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(bad)
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "other.npz")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.npz")
