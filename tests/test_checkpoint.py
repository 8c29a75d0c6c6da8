"""Checkpoints: atomic writes, validation, and bit-identical resume."""
import numpy as np
import pytest

from fanin import Tensor, models, nn, optim, sparsity
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
    if method == "srigl":  # gamma_sal 0.9: neurons are ablated, so fan-ins change
        upd = sparsity.SRigL(model, opt, sparsity=0.7, delta_t=3, t_end=24, grad_accumulation=2, gamma_sal=0.9)
    else:
        upd = sparsity.RigL(model, opt, sparsity=0.7, delta_t=3, t_end=24, grad_accumulation=2)
    return model, opt, sched, upd, np.random.default_rng(0)


def assert_same_tree(a, b, path="state"):
    """Nested dicts / lists / arrays / scalars, equal exactly (arrays bit for bit, dtypes aside)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(map(str, a)) == set(map(str, b)), path
        bs = {str(k): v for k, v in b.items()}
        for k, v in a.items():
            assert_same_tree(v, bs[str(k)], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same_tree(u, v, f"{path}/{i}")
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)
        assert np.shape(a) == np.shape(b), path
    else:
        assert a == b, path


def topology(model):
    return [(np.array(m.indices), m.active.copy(), m.values.data.copy()) for m in model.modules()
            if isinstance(m, (nn.FanInLinear, nn.FanInConv2d))]


# save after epoch 1 (step 8: one of the two batches the step-9 update scores is captured, or summed),
# epoch 2 (step 16: capture armed, nothing captured yet) and epoch 3 (step 24: the last update just ran)
@pytest.mark.parametrize("split", [1, 2, 3])
@pytest.mark.parametrize("method", ["srigl", "rigl"])
def test_resume_is_bit_identical(tmp_path, method, split):
    """Train 4 epochs straight, or `split` epochs, save, load into fresh objects and finish: the same
    weights, topology, optimizer state, updater state (step, history, captured gradients) and RNGs."""
    data = synthetic()
    model, opt, sched, upd, rng = make_run(method)
    fit(model, opt, data, epochs=4, batch_size=32, schedule=sched, hooks=[upd], progress=False, rng=rng)
    straight = training_state(model, opt, sched, upd, rng, 4, [])
    assert len(upd.history) == 8  # updates at steps 3, 6, ..., 24

    model, opt, sched, upd, rng = make_run(method)
    initial = topology(model)
    history = fit(model, opt, data, epochs=split, batch_size=32, schedule=sched, hooks=[upd], progress=False,
                  rng=rng)
    saved = training_state(model, opt, sched, upd, rng, split, history)
    saved_topology = topology(model)
    if split == 1 and method == "srigl":  # the update at step 9 will score a batch captured before the save
        assert [len(c) for c in upd.state_dict()["capture"]] == [1, 1, 1]
    if split == 1 and method == "rigl":
        assert all(f"grad_sum{i}" in upd.state_dict() for i in range(3))
    save_checkpoint(tmp_path / "c.npz", saved)

    model, opt, sched, upd, rng = make_run(method)  # a fresh process, in effect
    epoch, history = restore_training_state(load_checkpoint(tmp_path / "c.npz"), model, opt, sched, upd, rng)
    assert epoch == split and len(history) == split
    # the fresh objects now hold exactly what was saved: nothing dropped on the way
    assert_same_tree(saved, training_state(model, opt, sched, upd, rng, epoch, history))
    if method == "srigl":
        assert any(a[0].shape != b[0].shape or not np.array_equal(a[0], b[0]) for a, b in zip(initial, saved_topology))
        for (i0, a0, v0), (i1, a1, v1) in zip(saved_topology, topology(model)):
            np.testing.assert_array_equal(i0, i1)
            np.testing.assert_array_equal(a0, a1)
            np.testing.assert_array_equal(v0, v1)
    fit(model, opt, data, epochs=4, batch_size=32, schedule=sched, hooks=[upd], progress=False, rng=rng,
        start_epoch=epoch)
    resumed = training_state(model, opt, sched, upd, rng, 4, [])
    assert_same_tree(straight, resumed)


def test_loaded_model_takes_the_saved_topology(tmp_path):
    """A model whose SRigL updates ablated neurons and changed fan-ins loads into a freshly built one
    (other random topology) with its exact indices, active set and values: same outputs."""
    data = synthetic()
    model, opt, sched, upd, rng = make_run("srigl")
    fit(model, opt, data, epochs=2, batch_size=32, schedule=sched, hooks=[upd], progress=False, rng=rng)
    assert any(not m.active.all() for _, m in upd.layers)
    save_checkpoint(tmp_path / "m.npz", {"model": model.state_dict()})
    fresh = models.mlp([20, 24, 16, 2], sparsity=0.7, dropout=0.1, seed=5)
    fresh.load_state_dict(load_checkpoint(tmp_path / "m.npz")["model"])
    for a, b in zip(topology(model), topology(fresh)):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    model.eval()
    fresh.eval()
    x = data[0][:16]
    np.testing.assert_array_equal(model(Tensor(x)).data, fresh(Tensor(x)).data)


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
    with pytest.raises(CheckpointError, match="not an .npz archive"):
        load_checkpoint(bad)
    bad.write_bytes(b"PK\x03\x04 a zip header, then garbage")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(bad)
    bad.write_bytes(b"FANIN\x00\r\n and the rest of a model file")
    with pytest.raises(CheckpointError, match="is a .fanin model file"):
        load_checkpoint(bad)
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "other.npz")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.npz")


def test_atomic_writes_follow_links_refuse_devices_and_get_the_umask_permissions(tmp_path):
    import os
    import stat

    from fanin._atomic import write_atomic

    target = tmp_path / "real.bin"
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    write_atomic(link, lambda f: f.write(b"one"))
    assert link.is_symlink() and target.read_bytes() == b"one"  # the link stays and its target is written
    mode = stat.S_IMODE(os.stat(target).st_mode)
    assert mode & 0o444 == 0o444 & ~_umask_now(), oct(mode)  # readable as a plain open() file, not 0600
    for bad, says in (("/dev/null", "not a regular file"), (tmp_path, "is a directory"), ("", "empty")):
        with pytest.raises((ValueError, OSError), match=says):
            write_atomic(bad, lambda f: f.write(b"x"))
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.bin", "real.bin"]  # no temporary file left


def _umask_now() -> int:
    from fanin._atomic import _umask

    return _umask()


def _saved_state(tmp_path, method="srigl", epochs=1):
    data = synthetic()
    model, opt, sched, upd, rng = make_run(method)
    fit(model, opt, data, epochs=epochs, batch_size=32, schedule=sched, hooks=[upd], progress=False, rng=rng)
    save_checkpoint(tmp_path / "c.npz", training_state(model, opt, sched, upd, rng, epochs, []))
    return load_checkpoint(tmp_path / "c.npz")


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.update(epoch=-1), "epoch -1"),
    (lambda s: s.update(epoch=1.5), "'epoch' is 1.5"),
    (lambda s: s.update(epoch=True), "'epoch' is True"),
    (lambda s: s.update(history="abc"), "'history' is 'abc'"),
    (lambda s: s.update(history=[{}, {}]), "history of 2 epochs"),
    (lambda s: s.update(schedule_t=10 ** 9), "schedule step 1000000000 lies outside this run's 0..32"),
    (lambda s: s.update(schedule_t=-100), "schedule step -100"),
    (lambda s: s.pop("rng"), "'rng' is missing"),
    (lambda s: s["model"].pop("0.values"), "missing keys"),
    (lambda s: s["updater"].update(t=-50), "step -50 is not an integer >= 0"),
    (lambda s: s["model"]["3.values"].__setitem__((0, 0), np.nan), "3.values holds NaN or Inf"),
])
def test_a_checkpoint_with_impossible_numbers_is_refused_before_training(tmp_path, edit, match):
    """Edited or corrupt checkpoints: a negative epoch trained an extra epoch, a history string became the history's
    entries, a huge schedule step left the learning rate at its end, a negative one divided by zero."""
    state = _saved_state(tmp_path)
    edit(state)
    model, opt, sched, upd, rng = make_run("srigl")
    with pytest.raises(ValueError, match=match):
        restore_training_state(state, model, opt, sched, upd, rng)


def test_a_state_that_does_not_flatten_to_distinct_arrays_is_refused(tmp_path):
    with pytest.raises(ValueError, match="both stored as 'a/b'"):
        save_checkpoint(tmp_path / "c.npz", {"a/b": np.arange(3), "a": {"b": np.arange(5)}})
    with pytest.raises(ValueError, match="__meta__"):
        save_checkpoint(tmp_path / "c.npz", {"__meta__": np.arange(3)})
    with pytest.raises(ValueError, match="Python objects"):
        save_checkpoint(tmp_path / "c.npz", {"x": np.array([{}, 1], dtype=object)})
    assert not (tmp_path / "c.npz").exists()


def test_a_compressed_runs_state_does_not_fit_a_model_of_other_sizes(tmp_path):
    """Resumed with compression, the model adopts the checkpoint's shrunk shapes; a 20-24-16-2 run's state must not
    make a 20-48-16-2 model look as if compression had removed 24 of its channels."""
    from fanin.compress import SelfCompression

    def run(sizes):
        model = models.mlp(sizes, seed=0)
        opt = optim.SGD(model.parameters(), lr=0.05)
        return model, opt, optim.CosineSchedule(opt, total_steps=32), SelfCompression(model, gamma=0.01)

    model, opt, sched, sc = run([20, 24, 16, 2])
    rng = np.random.default_rng(0)
    fit(model, opt, synthetic(), epochs=1, batch_size=32, schedule=sched, hooks=[sc], loss_terms=[sc.size_loss],
        progress=False, rng=rng)
    state = training_state(model, opt, sched, None, rng, 1, [], sc)
    model2, opt2, sched2, sc2 = run([20, 48, 16, 2])
    with pytest.raises(ValueError, match="has 48 channels, but the state keeps 24 and removed 0"):
        restore_training_state(state, model2, opt2, sched2, None, np.random.default_rng(0), sc2)
    model3, opt3, sched3, sc3 = run([20, 24, 16, 2])  # the same sizes resume
    assert restore_training_state(state, model3, opt3, sched3, None, np.random.default_rng(0), sc3)[0] == 1


def test_a_compressed_run_rewinds_to_its_own_earlier_checkpoint(tmp_path):
    """The live objects of a run whose layers already shrank take its earlier checkpoint: the state is checked
    against the layers as built, not as they are now."""
    from fanin.compress import SelfCompression

    rng = np.random.default_rng(3)
    x = rng.standard_normal((256, 12)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)
    model = models.mlp([12, 40, 24, 3], seed=0)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = optim.CosineSchedule(opt, total_steps=4 * 8)
    sc = SelfCompression(model, gamma=0.5, init_bits=3, optimizer=opt, lr=0.2)
    gen = np.random.default_rng(0)

    def save(epoch, r):
        if epoch == 2:
            save_checkpoint(tmp_path / "c.npz", training_state(model, opt, sched, None, r, epoch, [], sc))

    fit(model, opt, (x, y), epochs=4, batch_size=32, schedule=sched, hooks=[sc], loss_terms=[sc.size_loss],
        progress=False, rng=gen, on_epoch_end=save)
    state = load_checkpoint(tmp_path / "c.npz")
    later = [h for h in sc.history if h["step"] > 16]
    assert later, "the run should remove channels after the checkpoint"
    assert restore_training_state(state, model, opt, sched, None, gen, sc)[0] == 2
    assert len(sc.history) == len(state["compressor"]["history"])
