"""`import fanin` changes nothing in the host process; the training tuning is opt-in (fanin.tuning)."""
import os
import subprocess
import sys

KEYS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT")


def run(code, **env):
    base = {k: v for k, v in os.environ.items() if k not in KEYS}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_import_leaves_the_environment_numpy_and_malloc_alone():
    code = ("import os, sys; before = dict(os.environ); import fanin; "
            "print(dict(os.environ) == before, 'numpy' in sys.modules, 'numba' in sys.modules); "
            "fanin.nn, fanin.kernels, fanin.compile; print(dict(os.environ) == before)")
    assert run(code) == ["True", "False", "False", "True"]


def test_the_package_still_exposes_its_api_lazily():
    code = "import fanin; print(fanin.Tensor.__name__, fanin.nn.FanInLinear.__name__, callable(fanin.load), fanin.__version__)"
    assert run(code) == ["Tensor", "FanInLinear", "True", "0.1.0"]
    # the modules the docs reach through the package (fanin.distributed.sweep, fanin.serve.create_app, ...)
    code = ("import fanin; print(*(m.__name__ for m in (fanin.convert, fanin.device, fanin.distributed, fanin.serve)), "
            "callable(fanin.distributed.DataParallel), callable(fanin.serve.create_app))")
    assert run(code) == ["fanin.convert", "fanin.device", "fanin.distributed", "fanin.serve", "True", "True"]


def test_tuning_is_opt_in_and_a_users_settings_win():
    show = "import fanin.tuning as t; c = t.apply(malloc=False); import os; " \
           "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OPENBLAS_THREAD_TIMEOUT'), sorted(c))"
    assert run(show) == ["3000", "16", "['GOMP_SPINCOUNT',", "'OPENBLAS_THREAD_TIMEOUT']"]
    assert run(show, OPENBLAS_THREAD_TIMEOUT="20", GOMP_SPINCOUNT="10") == ["10", "20", "[]"]
    assert run(show, OMP_WAIT_POLICY="PASSIVE")[:2] == ["None", "16"]


def test_fanin_train_opts_in(monkeypatch):
    import fanin.cli
    import fanin.tuning

    calls = []
    monkeypatch.setattr(fanin.tuning, "apply", lambda **kw: calls.append(kw) or {})
    assert fanin.cli.main(["info", "/nonexistent.fanin"]) == 2 and calls == []  # only training tunes its process
    assert fanin.cli.main(["train", "--epochs", "1", "--limit", "256", "--no-progress", "--batch-size", "64"]) in (0, 2)
    assert calls == [{}]


def test_a_read_only_install_compiles_in_memory_with_one_warning():
    """Where Numba finds no folder for its cache (a read-only install, a service user without a writable home:
    simulated by taking Numba's cache locators away), fanin still runs: kernels compile in memory, one warning says
    so and what to set. Numba itself raises "no locator available" at a kernel's first use there."""
    code = """
import warnings
from numba.core.caching import CacheImpl
CacheImpl._locator_classes = []
import numpy as np, fanin
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    layer = fanin.nn.FanInLinear(8, 4, sparsity=0.5, seed=0)
    y = fanin.kernels.fanin_forward(x, layer.indices, layer.values)
net = fanin.compile(fanin.models.mlp([8, 6, 3], sparsity=0.5, seed=0))
mine = [str(w.message) for w in caught if "NUMBA_CACHE_DIR" in str(w.message)]
print(len(mine), np.allclose(y, x @ layer.to_dense().T, atol=1e-5), net.predict(x).shape)
"""
    assert run(code) == ["1", "True", "(3,", "3)"]
