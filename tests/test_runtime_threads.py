"""The runtime as a guest: many threads predicting at once, children forked after the parent predicted,
the workqueue threading layer -- always the serial results, never a crash or a hang."""
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import threading
import time

import numba
import numpy as np
import pytest

import fanin
from fanin import models
from fanin.kernels import infer
from fanin.runtime import engine

# the parallel paths need enough work: panels from PARALLEL_PANELS_MACS, rows from PARALLEL_ROWS_MACS
SMALL, LARGE = 1, 256


@pytest.fixture(autouse=True)
def rule_only(monkeypatch):
    """The work rule alone picks the path (the timing tuner could choose serial runs on a busy machine, and
    these tests are about the parallel ones)."""
    monkeypatch.setattr(engine, "ADAPTIVE", False)


@pytest.fixture(scope="module")
def net():
    return fanin.compile(models.mlp([784, 512, 512, 10], sparsity=0.9, seed=0))


@pytest.fixture(scope="module")
def wide():
    """One wide layer: its batch-1 forward splits the rows over threads."""
    return fanin.compile(models.mlp([4096, 4096, 10], sparsity=[0.9, None], seed=1))


def inputs(n_in, batch, seed):
    return np.random.default_rng(seed).standard_normal((batch, n_in)).astype(np.float32)


def serial(net, x):
    saved = numba.get_num_threads()
    numba.set_num_threads(1)  # thread-local in Numba: only this thread's calls run serially
    try:
        return net.predict(x)
    finally:
        numba.set_num_threads(saved)


def test_paths_are_chosen_by_work(net, wide):
    threads = max(2, numba.get_num_threads())
    assert net._engine.chain.plan_for(SMALL, threads) == "rows_serial"
    assert net._engine.chain.plan_for(LARGE, threads) in ("panels", "layerwise")
    assert wide._engine.chain.plan_for(1, threads) == "rows"
    assert net._engine.chain.plan_for(LARGE, 1) == "panels_serial"
    half = infer.TBH  # a batch that fits half a panel runs the half-width drivers
    assert net._engine.chain.plan_for(half, threads) == "half_layerwise"
    assert net._engine.chain.plan_for(half, 1) == "half_panels_serial"
    assert net._engine.chain.plan_for(half + 1, 1) == "panels_serial"
    # one full panel that fills a half panel per thread: the half panels, one per thread
    assert net._engine.chain.plan_for(infer.TB, 2) == "half_panels"
    assert net._engine.chain.plan_for(half + 1, 2) == "half_panels"
    assert net._engine.chain.plan_for(infer.TB, 3) == "layerwise"
    assert net._engine.chain.plan_for(infer.TB + 1, 2) == "panels"


@pytest.mark.parametrize("batch", [SMALL, 3, 8, 24, 32, 33, LARGE])
def test_parallel_equals_serial_bitwise(net, batch):
    x = inputs(784, batch, 0)
    np.testing.assert_array_equal(net.predict(x), serial(net, x))


def test_eight_threads_at_once_give_the_serial_results(net, wide):
    cases = [(net, inputs(784, b, s)) for s, b in enumerate([SMALL, LARGE, 8, 40, LARGE, 2, LARGE, SMALL])]
    cases += [(wide, inputs(4096, 1, 10 + s)) for s in range(4)]
    want = [serial(n, x) for n, x in cases]
    errors, barrier = [], threading.Barrier(len(cases))

    def work(i):
        n, x = cases[i]
        try:
            barrier.wait(timeout=60)
            for _ in range(5):
                y = n.predict(x)
                if not np.array_equal(y, want[i]):
                    errors.append(f"case {i}: results differ")
                    return
        except Exception as exc:  # noqa: BLE001 -- reported below
            errors.append(f"case {i}: {exc!r}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a predicting thread hung"
    assert not errors, errors


def _child(net, xs, q):
    try:
        q.put(([net.predict(x) for x in xs], engine.parallel_state()))
    except Exception as exc:  # noqa: BLE001
        q.put((repr(exc), None))


def test_the_tuner_takes_the_faster_option_and_keeps_measuring():
    t = engine._Tuner()
    picks = [t.decide()[0] for _ in range(4)]
    assert picks[0]  # parallel first: the work rule said it pays
    for _ in range(2):  # the first call of each option is a warm-up, not counted
        t.record(True, 10e-9)
        t.record(False, 1e-9)  # serial measured 10x faster (an oversubscribed machine)
    window = 4 * engine.EXPLORE  # the re-measuring period of an option 4x (or more) slower

    def parallel_picks(n):
        return sum(t.decide()[0] for _ in range(n))

    assert parallel_picks(4 * window) == 8  # parallel only to re-measure it: two calls each time
    t.record(True, 0.1e-9)  # one fast parallel call: re-measured in the next calls ...
    assert [t.decide()[0] for _ in range(engine.RECENT // 2)] == [True] * (engine.RECENT // 2)
    t.record(True, 20e-9)  # ... which were slow: an accident, serial stays
    assert parallel_picks(window) == 2
    for _ in range(engine.RECENT // 2 + 1):  # the machine got idle: parallel keeps measuring 10x faster than serial
        t.record(True, 0.1e-9)
    t.probe = 0
    assert parallel_picks(window) == window - 1  # serial re-measured by one call
    for _ in range(engine.RECENT):  # serial got 2x faster than parallel; one slow serial call changes nothing
        t.record(False, 0.05e-9)
    t.record(False, 50e-9)
    t.probe = 0
    assert parallel_picks(window) == 4  # 2x slower: re-measured (two calls) once in 2 x EXPLORE calls


def test_a_re_measurement_does_not_time_its_first_call(monkeypatch):
    """After a stretch of serial calls the first parallel call wakes the threads and is slow; it is run but not
    timed, the next one is. So a tuner that went serial while the machine was busy comes back to parallel once
    parallel is faster again, even though every first call after the stretch is slower than serial."""
    t = engine._Tuner()
    t.decide()
    for _ in range(2):  # warm-ups, then serial faster (a busy moment)
        t.record(True, 10e-9)
        t.record(False, 2e-9)
    for _ in range(engine.RECENT):
        t.record(False, 2e-9)
    picks = []
    for _ in range(8 * engine.EXPLORE):
        parallel, timed = t.decide()
        picks.append((parallel, timed))
        if timed:  # (an untimed call, slower had it been timed, is not reported: the engine gives it no tuner)
            t.record(parallel, 1e-9 if parallel else 2e-9)
    first = picks.index((True, False))
    assert picks[first + 1] == (True, True)  # the re-measurement's timed call follows at once
    # and parallel, measured 2x faster, took over (serial re-measured by one call in 2 x EXPLORE calls)
    assert sum(p for p, _ in picks[-2 * engine.EXPLORE:]) == 2 * engine.EXPLORE - 1
    # the engine: an untimed call gets no tuner to report to
    monkeypatch.setattr(engine, "ADAPTIVE", True)
    tuners = {"k": engine._Tuner()}
    tuners["k"].warm = False
    tuners["k"].rate = [1e-9, 2e-9]
    tuners["k"].calls = engine.EXPLORE * 2 - 1
    token, tuner = engine._choose(tuners, "k", True)
    assert tuner is None and tuners["k"].warm
    engine._done(token, tuner, 0.0, 1)
    token, tuner = engine._choose(tuners, "k", True)
    assert tuner is tuners["k"]
    engine._done(token, tuner, time.perf_counter(), 1000)


@pytest.fixture(scope="module")
def cnn():
    """A dense-and-condensed CNN: its convolutions and pooling run before the linear chain."""
    m = models.cnn(channels=(8, 16), hidden=32, sparsity=0.8, seed=2)
    m.eval()
    return fanin.compile(m, input_shape=(1, 28, 28))


def cnn_inputs(batch, seed):
    return np.random.default_rng(seed).standard_normal((batch, 1, 28, 28)).astype(np.float32)


def test_convolutions_run_serially_on_small_work_and_in_parallel_on_large(cnn):
    eng = cnn._engine
    small = max(1, engine.PARALLEL_FRONT_MACS // eng.front_macs // 2)
    big = -(-engine.PARALLEL_FRONT_MACS // eng.front_macs)
    assert small * eng.front_macs < engine.PARALLEL_FRONT_MACS <= big * eng.front_macs
    cnn.predict(cnn_inputs(small, 0))
    assert eng.last_front == "serial"
    got = cnn.predict(cnn_inputs(big, 1))
    if numba.get_num_threads() > 1 and engine.parallel_state()["disabled"] is None:
        assert eng.last_front == "parallel"
    np.testing.assert_array_equal(got, serial(cnn, cnn_inputs(big, 1)))  # same bits either way
    with pytest.raises(ValueError):
        cnn.predict(cnn_inputs(1, 0)[:, :, :27])


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_a_child_forked_after_the_parent_predicted_predicts_the_same(which, net, cnn):
    if which == "mlp":
        xs = [inputs(784, b, 20 + b) for b in (SMALL, LARGE)]
    else:
        net = cnn
        xs = [cnn_inputs(b, 20 + b) for b in (SMALL, 64)]
    want = [net.predict(x) for x in xs]  # the large batch starts Numba's threads in the parent
    if sys.platform == "win32" or "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(net, xs, q))
    p.start()
    try:
        got, state = q.get(timeout=120)
    finally:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    assert p.exitcode == 0, f"the child died (exit code {p.exitcode})"
    assert not isinstance(got, str), got
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    layer = engine.parallel_state()["threading_layer"]
    if layer is not None and layer != "tbb":
        assert state["disabled"] and "fork" in state["disabled"]


WORKQUEUE = textwrap.dedent("""
    import threading, numpy as np, fanin
    from fanin import models
    from fanin.runtime import engine
    engine.ADAPTIVE = False
    net = fanin.compile(models.mlp([784, 512, 512, 10], sparsity=0.9, seed=0))
    xs = [np.random.default_rng(i).standard_normal((256, 784)).astype(np.float32) for i in range(6)]
    want = [net.predict(x) for x in xs]
    assert engine.parallel_state()["threading_layer"] == "workqueue", engine.parallel_state()
    bad = []
    def work(i):
        for _ in range(4):
            if not np.array_equal(net.predict(xs[i]), want[i]):
                bad.append(i)
    ts = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    [t.start() for t in ts]; [t.join() for t in ts]
    print("ok" if not bad else f"differ {bad}")
""")


def test_workqueue_layer_is_never_launched_twice_at_once(tmp_path):
    """Numba's workqueue layer aborts on concurrent parallel launches: the engine serializes them."""
    script = tmp_path / "wq.py"
    script.write_text(WORKQUEUE)
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}  # the test's own child process, not fanin's doing
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok", done.stdout + done.stderr[-2000:]
