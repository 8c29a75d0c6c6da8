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
