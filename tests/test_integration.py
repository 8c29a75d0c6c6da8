"""End-to-end runs on the real Fashion-MNIST (marked `integration`; skipped when the data is absent)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from fanin import data, models, optim, sparsity
from fanin.train import evaluate, fit

try:
    data.find_fashion_mnist()
    HAVE_DATA = True
except data.DatasetNotFound:
    HAVE_DATA = False

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")]


@pytest.fixture(scope="module")
def fmnist():
    xtr, ytr = data.load_fashion_mnist("train")
    xte, yte = data.load_fashion_mnist("test")
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28)
    assert set(np.unique(ytr)) == set(range(10))
    return (data.normalize(xtr[:20000], True), ytr[:20000]), (data.normalize(xte, True), yte)


def test_dense_mlp_learns(fmnist):
    train, test = fmnist
    model = models.mlp([784, 300, 100, 10], seed=0)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    fit(model, opt, train, epochs=2, batch_size=128, progress=False)
    _, acc = evaluate(model, *test)
    assert acc > 0.80


def test_srigl_mlp_learns_and_stays_constant_fanin(fmnist):
    train, test = fmnist
    model = models.mlp([784, 256, 256, 10], sparsity=0.9, seed=0)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    srigl = sparsity.SRigL(model, opt, sparsity=0.9, delta_t=50, total_steps=2 * 157)
    fit(model, opt, train, epochs=2, batch_size=128, hooks=[srigl], progress=False)
    _, acc = evaluate(model, *test)
    assert acc > 0.80
    assert len(srigl.history) >= 4
    for (name, layer), budget in zip(srigl.layers, srigl.budgets):
        assert layer.k * int(layer.active.sum()) <= budget, name


def test_cli_train_prints_test_accuracy_and_is_reproducible(tmp_path):
    def run():
        out = tmp_path / "h.json"
        res = subprocess.run([sys.executable, "-m", "fanin.cli", "train", "--model", "mlp", "--epochs", "1",
                              "--limit", "3000", "--method", "srigl", "--sparsity", "0.8", "--delta-t", "5",
                              "--no-progress", "--json", str(out)], capture_output=True, text=True, check=True)
        assert "test accuracy: 0." in res.stdout
        return json.loads(out.read_text())["history"][-1]["test_acc"]

    assert run() == run()


def test_cli_validation_holds_out_the_last_training_images(monkeypatch):
    from fanin import cli

    (xtr, ytr), (xva, yva) = cli.load_data("mlp", limit=500, validation=1000)
    raw, labels = data.load_fashion_mnist("train")
    assert xtr.shape == (500, 784) and xva.shape == (1000, 784)
    np.testing.assert_array_equal(yva, labels[-1000:])  # the evaluation set is the held-out tail ...
    np.testing.assert_array_equal(xva, data.normalize(raw[-1000:], True))
    np.testing.assert_array_equal(ytr, labels[:500])  # ... and training starts at the head
    res = subprocess.run([sys.executable, "-m", "fanin.cli", "train", "--model", "mlp", "--epochs", "1", "--limit",
                          "500", "--validation", "1000", "--no-progress"], capture_output=True, text=True)
    assert res.returncode == 0 and "validation accuracy (last 1000 training images): 0." in res.stdout
    assert "test accuracy" not in res.stdout
    bad = subprocess.run([sys.executable, "-m", "fanin.cli", "train", "--validation", "60000"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "leaves no training images" in bad.stderr and "Traceback" not in bad.stderr
