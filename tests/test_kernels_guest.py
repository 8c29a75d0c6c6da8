"""The public kernels and training as a guest (ARCHITECTURE.md): a child forked after the parent ran parallel
kernels trains on (serial kernels: GNU OpenMP does not survive fork), and several threads training at once under
Numba's ``workqueue`` layer (which aborts the process when two threads launch parallel kernels together) finish
with the results of one thread. The runtime's own guarantees are in test_runtime_threads.py."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fanin.kernels import _jit

# a few SGD steps of a small condensed CNN (convolutions, batch norm, pooling, ReLU, linear layers) and of an
# SRigL MLP (growth candidates, row selection): every parallel kernel family of a training step
TRAIN = textwrap.dedent("""
    import numpy as np, fanin
    from fanin import models, ops, optim, sparsity, Tensor

    def train(seed, steps=3):
        rng = np.random.default_rng(seed)
        out = []
        cnn = models.cnn(channels=(8, 16), hidden=32, sparsity=0.8, seed=seed)
        opt = optim.SGD(cnn.parameters(), lr=0.05, momentum=0.9)
        x = rng.standard_normal((64, 1, 28, 28)).astype(np.float32)
        y = rng.integers(0, 10, 64)
        for _ in range(steps):
            loss = ops.cross_entropy(cnn(Tensor(x)), y)
            opt.zero_grad(); loss.backward(); opt.step()
            out.append(float(loss.data))
        mlp = models.mlp([300, 256, 10], sparsity=0.9, seed=seed)
        opt = optim.Adam(mlp.parameters(), lr=1e-3)
        sr = sparsity.SRigL(mlp, opt, sparsity=0.9, delta_t=1, total_steps=4)
        x = rng.standard_normal((256, 300)).astype(np.float32)
        y = rng.integers(0, 10, 256)
        for _ in range(steps):
            loss = ops.cross_entropy(mlp(Tensor(x)), y)
            opt.zero_grad(); loss.backward(); opt.step(); sr.step()
            out.append(float(loss.data))
        return np.array(out + [float(np.abs(p.data).sum()) for p in cnn.parameters() + mlp.parameters()])
""")


def _run(code: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TRAIN + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_child_forked_after_parallel_training_trains_the_same():
    r = _run("""
        import os, sys
        from fanin.kernels import _jit
        want = train(0)  # starts Numba's threads in the parent
        assert _jit.GATE.layer is not None, _jit.GATE.layer
        rd, wr = os.pipe()
        pid = os.fork()
        if pid == 0:
            got = train(0)
            os.write(wr, np.array([np.allclose(got, want, rtol=1e-4, atol=1e-5),
                                   _jit.GATE.disabled is not None or _jit.GATE.layer == "tbb"], float).tobytes())
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("exit", os.waitstatus_to_exitcode(status), np.frombuffer(os.read(rd, 16)).tolist())
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "exit 0 [1.0, 1.0]" in r.stdout, (r.stdout, r.stderr[-2000:])


def test_threads_training_at_once_under_workqueue_give_one_threads_results():
    r = _run("""
        import threading, numba
        want = [train(s) for s in range(3)]
        assert numba.threading_layer() == "workqueue", numba.threading_layer()
        got = [None] * 3
        def work(s):
            got[s] = train(s)
        ts = [threading.Thread(target=work, args=(s,)) for s in range(3)]
        [t.start() for t in ts]; [t.join() for t in ts]
        print("same" if all(np.allclose(g, w, rtol=1e-4, atol=1e-5) for g, w in zip(got, want)) else "differ")
    """, env={"NUMBA_THREADING_LAYER": "workqueue"})
    assert r.returncode == 0, r.stderr[-2000:]  # an abort ("Terminating: ...") gives -6
    assert "same" in r.stdout, r.stdout


def test_the_gate_runs_serially_when_told_and_its_twin_computes_the_same(monkeypatch):
    from fanin.kernels import cpu

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 30)).astype(np.float32)
    calls = []
    kern = cpu._k_transpose  # a gated kernel: x (B, n) -> out (n, B)
    par_out = np.empty((30, 40), np.float32)
    kern(x, par_out)
    monkeypatch.setattr(_jit.GATE, "disabled", "a test")
    serial = kern.serial
    monkeypatch.setattr(kern, "_ser", lambda *a: calls.append(1) or serial(*a))
    ser_out = np.empty((30, 40), np.float32)
    kern(x, ser_out)
    assert calls == [1]
    np.testing.assert_array_equal(ser_out, par_out)
    np.testing.assert_array_equal(ser_out, x.T)
    assert _jit.GATE.enter() == 0
