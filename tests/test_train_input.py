"""fit's arguments are checked before the first step, and a network that went NaN is divergence even when its loss
stays finite (a ReLU maps NaN to 0)."""
import numpy as np
import pytest

from fanin import models, optim
from fanin.train import fit


def data(n=64, width=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, width)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def run(**kw):
    model = models.mlp([8, 6, 2], seed=0)
    opt = optim.SGD(model.parameters(), lr=0.05)
    args = dict(epochs=1, batch_size=16, progress=False)
    args.update(kw)
    train = args.pop("train", data())
    return model, fit(model, opt, train, **args)


@pytest.mark.parametrize("kw, err, match", [
    (dict(batch_size=0), ValueError, "batch_size must be an integer >= 1"),
    (dict(batch_size=2.5), ValueError, "batch_size must be an integer >= 1"),
    (dict(epochs=-1), ValueError, "epochs must be an integer >= 0"),
    (dict(epochs=2, start_epoch=5), ValueError, r"start_epoch must be an integer in \[0, epochs\]"),
    (dict(start_epoch=-2), ValueError, "start_epoch"),
    (dict(train=(np.zeros((0, 8), np.float32), np.zeros(0, np.int64))), ValueError, "the train set is empty"),
    (dict(test=(np.zeros((0, 8), np.float32), np.zeros(0, np.int64))), ValueError, "the test set is empty"),
    (dict(train=np.zeros((4, 8), np.float32)), TypeError, "train must be a pair"),
    (dict(test=(np.zeros((4, 8)),)), TypeError, "test must be a pair"),
    (dict(train=(np.zeros((4, 8), np.float32), np.zeros(3, np.int64))), ValueError, "do not pair up"),
    (dict(hooks=[object()]), TypeError, "every hook needs a step"),
    (dict(rng="seed"), TypeError, "rng must be"),
])
def test_bad_arguments_are_refused_before_any_step(kw, err, match):
    model = models.mlp([8, 6, 2], seed=0)
    before = [p.data.copy() for p in model.parameters()]
    args = dict(epochs=1, batch_size=16, progress=False)
    args.update(kw)
    train = args.pop("train", data())
    with pytest.raises(err, match=match):
        fit(model, optim.SGD(model.parameters(), lr=0.05), train, **args)
    assert all(np.array_equal(a, p.data) for a, p in zip(before, model.parameters()))  # nothing trained


def test_nan_inputs_are_refused_and_nan_weights_are_divergence():
    x, y = data()
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="hold NaN or Inf"):
        run(train=(x, y))
    model = models.mlp([8, 6, 2], seed=0)
    model[0].weight.data[:] = np.nan  # as a resumed NaN checkpoint or a blown-up step leaves it: the loss stays finite
    with pytest.raises(FloatingPointError, match=r"0.weight holds NaN or Inf after epoch 1"):
        fit(model, optim.SGD(model.parameters(), lr=0.05), data(), epochs=1, batch_size=16, progress=False)


def test_an_integer_rng_gives_a_new_shuffle_each_epoch_as_a_seed_does():
    """fit(rng=7) shuffled every epoch the same way (a generator made anew from 7 for each epoch)."""
    seen = []

    class Spy:
        def step(self):
            pass

    import fanin.train as train_mod
    real = train_mod.batches

    def spy(x, y, batch_size, shuffle=True, rng=None):
        for xb, yb in real(x, y, batch_size, shuffle=shuffle, rng=rng):
            if shuffle:
                seen.append(yb.copy())
            yield xb, yb

    train_mod.batches, orig = spy, real
    try:
        run(epochs=2, rng=7, hooks=[Spy()])
        by_int = [np.concatenate(seen[:4]), np.concatenate(seen[4:])]
        seen.clear()
        run(epochs=2, rng=np.random.default_rng(7), hooks=[Spy()])
        by_gen = [np.concatenate(seen[:4]), np.concatenate(seen[4:])]
    finally:
        train_mod.batches = orig
    assert not np.array_equal(by_int[0], by_int[1])
    assert all(np.array_equal(a, b) for a, b in zip(by_int, by_gen))


def test_a_finished_run_resumed_has_nothing_left_to_train():
    model, history = run(epochs=2, start_epoch=2)
    assert history == []
    assert run(epochs=0)[1] == []
