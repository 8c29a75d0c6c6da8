"""Training and loading on the CUDA device through the user-facing entry points: ``fit``/``evaluate`` on a model
moved with ``.to("cuda")`` (SRigL included, with no test-side patching), ``fanin.load(path, device="cuda")``,
``Network.to``, and ``fanin train --device cuda``'s errors.

The device tests run under Numba's CUDA simulator in a subprocess (``test_simulator_run``; the simulator must be
switched on before Numba is imported), on tiny shapes; the error tests run in this process without a GPU.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sim = pytest.mark.skipif(not SIM, reason="runs under NUMBA_ENABLE_CUDASIM=1, in test_simulator_run's subprocess")


def _gpu_present() -> bool:
    if not HAVE_NUMBA_CUDA or SIM:
        return False
    from numba import cuda

    return cuda.is_available()


@pytest.mark.skipif(SIM, reason="the parent of the simulator run")
@pytest.mark.skipif(not HAVE_NUMBA_CUDA, reason="numba-cuda is not installed (the `cuda` extra)")
def test_simulator_run():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", os.path.abspath(__file__)],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    out = r.stdout[-4000:] + r.stderr[-2000:]
    assert r.returncode == 0, out
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("3 passed") and "failed" not in last, out  # every @sim test ran


def _data(rng, n, n_in, classes):
    return rng.standard_normal((n, n_in)).astype(np.float32), rng.integers(0, classes, n)


@sim
def test_fit_with_srigl_on_the_device_matches_the_cpu():
    import fanin
    from fanin import device
    from fanin.sparsity.srigl import sparse_layers
    from fanin.train import evaluate, fit

    rng = np.random.default_rng(3)
    train, test = _data(rng, 24, 16, 4), _data(rng, 10, 16, 4)
    runs = []
    for dev in ("cpu", "cuda"):
        model = fanin.models.mlp([16, 12, 4], sparsity=0.5, seed=2)
        if dev == "cuda":
            model.to("cuda")
        opt = fanin.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sr = fanin.sparsity.SRigL(model, opt, sparsity=0.5, distribution="uniform", delta_t=1, t_end=3, seed=0)
        hist = fit(model, opt, train, test, epochs=1, batch_size=8, hooks=[sr], progress=False, seed=0)
        runs.append((model, opt, sr, hist))
    (mc, _, sc, hc), (md, od, sd, hd) = runs
    assert len(sc.history) == len(sd.history) >= 2  # SRigL updated the device model (its rows on the host)
    for (_, lc), (_, ld) in zip(sparse_layers(mc), sparse_layers(md)):
        np.testing.assert_array_equal(ld.indices, lc.indices)
        assert ld.values.device == "cuda"
        np.testing.assert_allclose(device.host(ld.values.data), lc.values.data, rtol=1e-4, atol=1e-5)
    assert abs(hd[0]["loss"] - hc[0]["loss"]) < 1e-4 and hd[0]["acc"] == hc[0]["acc"]
    assert hd[0]["test_acc"] == hc[0]["test_acc"]
    assert evaluate(md, *test) == pytest.approx(evaluate(mc, *test), abs=1e-5)
    assert all(not isinstance(v, np.ndarray) for st in od.state.values() for v in st.values())


@sim
def test_load_on_the_device_and_network_to(tmp_path):
    import fanin
    from fanin import device

    model = fanin.models.mlp([10, 8, 3], sparsity=[0.5, None], seed=1)
    path = tmp_path / "m.fanin"
    fanin.save(model, str(path), input_shape=(10,))
    x = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)
    want = fanin.load(str(path)).predict(x)
    for net in (fanin.load(str(path), device="cuda"), fanin.load(str(path)).to("cuda")):
        assert isinstance(net, device.DeviceNetwork)
        np.testing.assert_allclose(net.predict(x), want, rtol=1e-5, atol=1e-5)
    cpu = fanin.load(str(path))
    assert cpu.to("cpu") is cpu


@pytest.mark.skipif(SIM, reason="outside the simulator only")
def test_load_with_a_bad_device_or_no_gpu_is_a_clear_error(tmp_path):
    import fanin

    model = fanin.models.mlp([6, 3], seed=0)
    path = tmp_path / "m.fanin"
    fanin.save(model, str(path), input_shape=(6,))
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        fanin.load(str(path), device="tpu")
    if not _gpu_present():
        with pytest.raises(Exception, match="CUDA|numba-cuda|cuda"):
            fanin.load(str(path), device="cuda")


@pytest.mark.skipif(SIM, reason="outside the simulator only")
@pytest.mark.parametrize("extra, fragment", [
    (["--compress"], "does not support --compress"),
    (["--checkpoint-every", "1"], "does not support --checkpoint-every"),
    ([], None),  # no GPU here: the device error, one line
])
def test_cli_device_cuda_errors_are_one_line(extra, fragment, capsys):
    from fanin import cli, data

    try:
        data.load_fashion_mnist("test")
    except Exception:
        pytest.skip("Fashion-MNIST is not installed (make data)")
    if fragment is None and _gpu_present():
        pytest.skip("a CUDA GPU is present")
    code = cli.main(["train", "--model", "mlp", "--sizes", "784-8-10", "--epochs", "1", "--limit", "64",
                     "--no-progress", "--device", "cuda", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("fanin: "), err
    if fragment is not None:
        assert fragment in err
    else:
        assert "cuda" in err.lower() or "CUDA" in err


@sim
def test_optimizer_state_follows_the_model_back_to_the_cpu():
    import fanin

    rng = np.random.default_rng(5)
    x, y = _data(rng, 8, 6, 3)
    results = []
    for hop in (False, True):
        model = fanin.models.mlp([6, 5, 3], sparsity=[0.5, None], seed=4)
        opt = fanin.optim.Adam(model.parameters(), lr=0.01)
        for step in range(2):
            if hop:
                model.to("cuda" if step == 0 else "cpu")
            xt = fanin.Tensor(x, device="cuda") if hop and step == 0 else fanin.Tensor(x)
            loss = fanin.ops.cross_entropy(model(xt), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert all(isinstance(v, np.ndarray) for st in opt.state.values() for v in st.values())
        results.append([np.array(p.data) for p in model.parameters()])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
