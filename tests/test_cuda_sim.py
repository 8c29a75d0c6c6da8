"""The CUDA backend against the CPU kernels, under Numba's CUDA simulator (no GPU needed).

The simulator must be switched on before Numba is imported, so ``test_simulator_suite`` runs this very file in a
subprocess with ``NUMBA_ENABLE_CUDASIM=1``; there the other tests run (in the parent they are skipped). The
simulator executes every thread in Python (about a million times slower than a GPU): shapes are tiny, but each
kernel path runs (batch 1 and the small-batch kernels, the shared-memory tile and panel kernels with one and two
samples per lane and the tile kernel's 8-warp configuration, k = 1, k = n_in, ablated rows, int16/int32 indices,
float32/float64).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import numpy as np
import pytest

HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"
sim = pytest.mark.skipif(not SIM, reason="runs under NUMBA_ENABLE_CUDASIM=1, in test_simulator_suite's subprocess")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ in the parent process
@pytest.mark.skipif(SIM, reason="the parent of the simulator run")
@pytest.mark.skipif(not HAVE_NUMBA_CUDA, reason="numba-cuda is not installed (the `cuda` extra: pip install -e '.[cuda]')")
def test_simulator_suite():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "--durations=5",
                        os.path.abspath(__file__)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    took = time.perf_counter() - t0
    out = r.stdout[-6000:] + r.stderr[-3000:]
    assert r.returncode == 0, f"the simulator run failed ({took:.0f} s):\n{out}"
    last = r.stdout.strip().splitlines()[-1]
    assert " passed" in last and "failed" not in last and "error" not in last, out
    print(f"simulator suite: {took:.1f} s\n{r.stdout[-1500:]}")


@pytest.mark.skipif(SIM, reason="outside the simulator only")
def test_cuda_without_gpu_is_a_clear_error():
    import fanin
    from fanin import device

    if HAVE_NUMBA_CUDA:
        from numba import cuda

        if cuda.is_available():
            pytest.skip("a CUDA GPU is present")
    with pytest.raises(device.CUDAUnavailableError, match="CUDA was asked for"):
        fanin.Tensor(np.ones((2, 3), np.float32), device="cuda")
    with pytest.raises(device.CUDAUnavailableError, match="CUDA was asked for"):
        fanin.models.mlp([4, 3], sparsity=0.5).to("cuda")
    assert device.available() is False
    # a foreign device array reaching the kernels says the same
    class Foreign:
        __cuda_array_interface__ = {"shape": (2, 4), "typestr": "<f4", "data": (0, False), "version": 3}
        shape, dtype, ndim = (2, 4), np.dtype(np.float32), 2

    f = Foreign()
    with pytest.raises(device.CUDAUnavailableError, match="CUDA was asked for"):
        fanin.kernels.fanin_forward(f, f, f)


# ------------------------------------------------------------------ helpers (simulator)
def _layer(rng, n_out, n_in, k, idt=np.int16, ablate=()):
    idx = np.stack([np.sort(rng.choice(n_in, k, replace=False)) for _ in range(n_out)]).astype(idt)
    vals = rng.standard_normal((n_out, k)).astype(np.float32)
    active = np.ones(n_out, bool)
    for j in ablate:
        active[j] = False
        vals[j] = 0
        idx[j] = np.arange(k)
    return idx, vals, active


def _dev(a):
    from numba import cuda

    return cuda.to_device(np.ascontiguousarray(a))


def _h(a):
    return a.copy_to_host()


def _close(a, b, tol=2e-5):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max(initial=0))))


# ------------------------------------------------------------------ kernels (simulator)
@sim
@pytest.mark.parametrize("B, n_out, n_in, k, idt, dt", [
    (1, 6, 10, 3, np.int16, np.float32),     # batch 1: warp per row
    (3, 5, 9, 9, np.int32, np.float32),      # k = n_in, small batch
    (9, 6, 12, 1, np.int16, np.float32),     # k = 1, tile kernel, one sample per lane
    (40, 5, 10, 4, np.int16, np.float32),    # tile kernel, two samples per lane
    (9, 5, 8, 3, np.int32, np.float64),      # float64
])
def test_forward_backward_match_cpu(B, n_out, n_in, k, idt, dt):
    from fanin import kernels as K

    rng = np.random.default_rng(B * 100 + k)
    idx, vals, active = _layer(rng, n_out, n_in, k, idt, ablate=(1,))
    topo = K.Topology(idx, n_in, active)
    vals = vals.astype(dt)
    x = rng.standard_normal((B, n_in)).astype(dt)
    bias = rng.standard_normal(n_out).astype(dt)
    dy = rng.standard_normal((B, n_out)).astype(dt)
    y = K.fanin_forward(_dev(x), topo, _dev(vals), _dev(bias))
    _close(_h(y), K.fanin_forward(x, topo, vals, bias))
    assert _h(y)[:, 1].tolist() == pytest.approx(np.broadcast_to(bias[1], (B,)).tolist())  # ablated: bias only
    dx, dv = K.fanin_backward(_dev(x), topo, _dev(vals), _dev(dy))
    rdx, rdv = K.fanin_backward(x, topo, vals, dy)
    _close(_h(dx), rdx)
    _close(_h(dv), rdv)


@sim
def test_plain_device_indices_sorted_unsorted_and_mixed_precision():
    from fanin import kernels as K

    rng = np.random.default_rng(1)
    idx, vals, _ = _layer(rng, 6, 11, 4)
    x = rng.standard_normal((9, 11)).astype(np.float32)
    ref = K.fanin_forward(x, idx, vals)
    _close(_h(K.fanin_forward(_dev(x), _dev(idx), _dev(vals))), ref)  # sorted: tile kernel
    perm = idx[:, ::-1].copy()
    vperm = vals[:, ::-1].copy()
    _close(_h(K.fanin_forward(_dev(x), _dev(perm), _dev(vperm))), ref)  # unsorted rows: the rows kernel
    _close(_h(K.fanin_backward_values(_dev(x), _dev(perm), _dev(np.ones((9, 6), np.float32)))),
           K.fanin_backward_values(x, perm, np.ones((9, 6), np.float32)))
    y64 = K.fanin_forward(_dev(x.astype(np.float64)), _dev(idx), _dev(vals))  # cast on the device, computed in f64
    assert y64.dtype == np.float64
    _close(_h(y64), K.fanin_forward(x.astype(np.float64), idx, vals))
    with pytest.raises(ValueError, match="outside"):
        K.fanin_forward(_dev(x), _dev(idx + 20), _dev(vals))
    with pytest.raises(ValueError, match="row 0"):
        K.validate_indices(_dev(perm), 11)
    lo, hi = K.cuda.index_min_max(_dev(idx))
    assert (lo, hi) == (int(idx.min()), int(idx.max()))


@sim
def test_panel_layout_matches_cpu():
    from fanin import kernels as K

    rng = np.random.default_rng(2)
    B, n_in, n_out = 9, 10, 5
    idx, vals, _ = _layer(rng, n_out, n_in, 3)
    topo = K.Topology(idx, n_in)
    x = rng.standard_normal((B, n_in)).astype(np.float32)
    dy = rng.standard_normal((B, n_out)).astype(np.float32)
    xp, dyp = K.pack_panels(x), K.pack_panels(dy)
    dxp, dyp_d = K.pack_panels(_dev(x)), K.pack_panels(_dev(dy))
    np.testing.assert_array_equal(_h(dxp), xp)
    np.testing.assert_array_equal(_h(K.unpack_panels(dxp, B)), x)
    _close(_h(K.fanin_forward_panels(dxp, B, topo, _dev(vals))), K.fanin_forward_panels(xp, B, topo, vals))
    gx, gv = K.fanin_backward_panels(dxp, topo, _dev(vals), dyp_d, B)
    rgx, rgv = K.fanin_backward_panels(xp, topo, vals, dyp, B)
    _close(_h(gx), rgx)
    _close(_h(gv), rgv)
    _close(_h(K.fanin_forward(_dev(x), topo, _dev(vals), xp=dxp)), K.fanin_forward(x, topo, vals))
    _close(_h(K.fanin_backward_input(topo, _dev(vals), _dev(dy), n_in, dyp=dyp_d)), K.fanin_backward_input(topo, vals, dy, n_in))
    assert K.pack_panels(_dev(x[:3])) is None  # below SMALL_BATCH, as on the CPU


@sim
def test_eight_warp_configurations():
    from fanin import kernels as K
    from fanin.kernels import cuda as KC

    rng = np.random.default_rng(3)
    n_out, n_in, B = 70, 12, 9
    idx, vals, _ = _layer(rng, n_out, n_in, 3)
    topo = K.Topology(idx, n_in)
    x = rng.standard_normal((B, n_in)).astype(np.float32)
    dy = rng.standard_normal((B, n_out)).astype(np.float32)
    try:
        KC.PLAN_OVERRIDE = (1, 8, 8)  # the configuration large layers get on a GPU
        _close(_h(K.fanin_forward(_dev(x), topo, _dev(vals))), K.fanin_forward(x, topo, vals))
        _close(_h(K.fanin_backward_values(_dev(x), topo, _dev(dy))), K.fanin_backward_values(x, topo, dy))
        KC.PLAN_OVERRIDE = None
        for plan in ((1, 8, 1), (1, 8, 2), (2, 8, 4)):  # fewer rows a warp: what grids smaller than the GPU get
            KC.PLAN_OVERRIDE = KC.DVALS_PLAN_OVERRIDE = plan
            _close(_h(K.fanin_forward(_dev(x), topo, _dev(vals))), K.fanin_forward(x, topo, vals))
            KC.PLAN_OVERRIDE = None
            _close(_h(K.fanin_backward_values(_dev(x), topo, _dev(dy))), K.fanin_backward_values(x, topo, dy))
    finally:
        KC.PLAN_OVERRIDE = KC.DVALS_PLAN_OVERRIDE = None


@sim
@pytest.mark.parametrize("plan, B, n_out, n_in, k, dt", [
    ((1, 2, 2, 33 * 4 * 8), 9, 11, 30, 5, np.float32),    # 4 chunks of 8 inputs, a partial batch tile and row block
    ((1, 2, 2, 33 * 4 * 8), 40, 6, 20, 20, np.float32),   # k = n_in, two batch tiles
    ((2, 1, 4, 65 * 4 * 9), 9, 7, 13, 1, np.float32),     # k = 1, two samples a lane, one warp of 4 rows
    ((1, 2, 2, 33 * 8 * 8), 9, 9, 30, 4, np.float64),     # float64
])
def test_panel_kernel_matches_cpu(plan, B, n_out, n_in, k, dt):
    """The panel kernel (large layers' batched forward and dx on a GPU), forced with PLAN_OVERRIDE on tiny shapes:
    several input chunks, partial tiles, ablated rows, row-major and panel-layout x, int8 and 4-bit weights."""
    from fanin import kernels as K
    from fanin.kernels import cuda as KC
    from fanin.kernels import lowbit

    rng = np.random.default_rng(11)
    idx, vals, active = _layer(rng, n_out, n_in, k, ablate=(1,))
    vals = vals.astype(dt)
    topo = K.Topology(idx, n_in)
    x = rng.standard_normal((B, n_in)).astype(dt)
    dy = rng.standard_normal((B, n_out)).astype(dt)
    bias = rng.standard_normal(n_out).astype(dt)
    try:
        KC.PLAN_OVERRIDE = plan
        _close(_h(K.fanin_forward(_dev(x), topo, _dev(vals), _dev(bias))), K.fanin_forward(x, topo, vals, bias))
        _close(_h(K.fanin_forward(_dev(x), topo, _dev(vals), xp=K.pack_panels(_dev(x)))), K.fanin_forward(x, topo, vals))
        _close(_h(K.fanin_backward_input(topo, _dev(vals), _dev(dy), n_in)), K.fanin_backward_input(topo, vals, dy, n_in))
        if dt == np.float32:
            q8 = rng.integers(-128, 128, (n_out, k)).astype(np.int8)
            scale = np.exp2(rng.integers(-6, 0, n_out)).astype(np.float32)
            _close(_h(K.fixed_point_forward(_dev(x), topo, _dev(q8), _dev(scale))),
                   K.fixed_point_forward(x, topo, q8, scale))
            q4 = rng.integers(-8, 8, (n_out, k + k % 2)).astype(np.int8)
            q4[:, k:] = 0
            y4 = KC.fixed_point_forward4(_dev(x), topo.indices, _dev(lowbit.pack_nibbles(q4)), k, _dev(scale))
            _close(_h(y4), K.fanin_forward(x, topo, scale[:, None] * q4[:, :k].astype(np.float32)))
    finally:
        KC.PLAN_OVERRIDE = None


@sim
def test_large_layers_get_the_panel_plan_the_gpu_allows(monkeypatch):
    """What _plan gives a large layer on a GPU (the simulator stands in; its own plan is the small one): the panel
    kernel with PANEL_PLAN's shared memory capped at the GPU's opt-in limit, the tile kernel where that is too small."""
    from fanin.kernels import cuda as KC

    monkeypatch.setattr(KC, "SIMULATOR", False)
    spl, warps, rpw, smem = KC.PANEL_PLAN
    for optin, want in ((232448, (spl, warps, rpw, smem)),      # H100 / H200: 227 KiB
                        (166912, (spl, warps, rpw, 166912)),    # A100: 163 KiB
                        (49152, None)):                         # no opt-in: the tile kernel
        monkeypatch.setattr(KC, "_OPTIN", [optin])
        monkeypatch.setattr(KC, "_plans", {})
        plan = KC._plan(4096, 256)
        if want is None:
            assert len(plan) == 3 and plan[1] == 8, plan
        else:
            assert plan == want
        assert KC._plan(300, 256) == (2, 2, 2)  # small layers keep the tile kernel
    monkeypatch.setattr(KC, "_plans", {})


@sim
def test_fixed_point_int8_and_4bit_match_cpu():
    from fanin import kernels as K
    from fanin.kernels import cuda as KC
    from fanin.kernels import lowbit

    rng = np.random.default_rng(4)
    n_out, n_in, k = 6, 12, 5
    idx, _, _ = _layer(rng, n_out, n_in, k)
    topo = K.Topology(idx, n_in)
    q8 = rng.integers(-128, 128, (n_out, k)).astype(np.int8)
    q4 = rng.integers(-8, 8, (n_out, k)).astype(np.int8)
    scale = np.exp2(rng.integers(-6, 0, n_out)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32)
    for B in (1, 9):
        x = rng.standard_normal((B, n_in)).astype(np.float32)
        y = K.fixed_point_forward(_dev(x), topo, _dev(q8), _dev(scale), _dev(bias))
        _close(_h(y), K.fixed_point_forward(x, topo, q8, scale, bias))
        packed = lowbit.pack_nibbles(np.concatenate([q4, np.zeros((n_out, 1), np.int8)], axis=1))
        y4 = KC.fixed_point_forward4(_dev(x), topo.indices, _dev(packed), k, _dev(scale), _dev(bias))
        _close(_h(y4), K.fanin_forward(x, topo, scale[:, None] * q4.astype(np.float32), bias))


@sim
def test_growth_candidates_match_cpu_exactly():
    from fanin import kernels as K

    rng = np.random.default_rng(5)
    n_out, n_in, k, B = 4, 70, 4, 3  # integer-valued inputs: |dy^T x| is exact, so the choice and ties are too
    idx, _, _ = _layer(rng, n_out, n_in, k)
    x = rng.integers(-3, 4, (B, n_in)).astype(np.float32)
    dy = rng.integers(-2, 3, (B, n_out)).astype(np.float32)
    for c, sort in ((7, True), (40, False), (n_in - k, False), (n_in, True)):
        got = K.growth_candidates(_dev(x), _dev(dy), _dev(idx), c, sort=sort, held=True)
        want = K.growth_candidates(x, dy, idx, c, sort=sort, held=True)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(_h(g), w)
    g2 = K.growth_candidates([_dev(x[:2]), _dev(x[2:])], [_dev(dy[:2]), _dev(dy[2:])], K.Topology(idx, n_in), 6,
                             block=2)
    w2 = K.growth_candidates(x, dy, idx, 6)
    for g, w in zip(g2, w2):
        np.testing.assert_array_equal(_h(g), w)
    _close(_h(K.dense_grad(_dev(x), _dev(dy))), K.dense_grad(x, dy))
    xn, dyn = x.copy(), dy.copy()  # NaN scores are never chosen; rows with too few scored inputs are padded
    dyn[:, 1] = np.nan
    xn[:, 60:] = np.nan
    # every free input wanted, so each row is padded after its scored ones (one launch: the simulator is slow)
    got = K.growth_candidates(_dev(xn), _dev(dyn), _dev(idx), n_in - k)
    want = K.growth_candidates(xn, dyn, idx, n_in - k)
    assert np.all(want[0][1] == -1) and np.all(want[0][:, -1] == -1)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(_h(g), w)


@sim
def test_im2col_col2im_match_cpu():
    from fanin import kernels as K

    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 2, 4, 5)).astype(np.float32)
    cols = K.im2col(_dev(x), 3, 2, stride=(1, 2), padding=1)
    want = K.im2col(x, 3, 2, stride=(1, 2), padding=1)
    np.testing.assert_array_equal(_h(cols), want)
    g = rng.standard_normal(want.shape).astype(np.float32)
    _close(_h(K.col2im(_dev(g), x.shape, 3, 2, stride=(1, 2), padding=1)), K.col2im(g, x.shape, 3, 2, stride=(1, 2), padding=1))


# ------------------------------------------------------------------ training and inference (simulator)
def _pair_models(sizes, sparsity, seed=0):
    import fanin

    cpu = fanin.models.mlp(sizes, sparsity=sparsity, seed=seed)
    dev = fanin.models.mlp(sizes, sparsity=sparsity, seed=seed)
    dev.to("cuda")
    return cpu, dev


def _params_close(cpu, dev, tol=2e-5):
    for (n, p), (_, q) in zip(cpu.named_parameters(), dev.named_parameters()):
        assert q.device == "cuda", n
        _close(_h(q.data), p.data, tol)


class _Transfers:
    """Counts device-to-host copies (explicit or through NumPy's __array__) while active."""

    def __enter__(self):
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        self.cls, self.n = FakeCUDAArray, 0
        self.orig = FakeCUDAArray.copy_to_host
        outer = self

        def copy_to_host(arr, *a, **kw):
            outer.n += 1
            return outer.orig(arr, *a, **kw)

        def __array__(arr, dtype=None, copy=None):
            outer.n += 1
            return np.asarray(arr._ary, dtype=dtype)

        FakeCUDAArray.copy_to_host = copy_to_host
        FakeCUDAArray.__array__ = __array__
        return self

    def __exit__(self, *exc):
        self.cls.copy_to_host = self.orig
        del self.cls.__array__


@sim
def test_training_steps_match_cpu_and_stay_on_device():
    import fanin

    rng = np.random.default_rng(7)
    sizes = [12, 10, 8, 3]
    cpu, dev = _pair_models(sizes, [0.5, 0.5, None])
    x = rng.standard_normal((9, 12)).astype(np.float32)
    y = rng.integers(0, 3, 9)
    xd = fanin.Tensor(x, device="cuda")
    assert xd.device == "cuda" and fanin.Tensor(_dev(x)).device == "cuda"
    opt_c = fanin.optim.SGD(cpu.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    opt_d = fanin.optim.SGD(dev.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    for step in range(2):
        lc = fanin.ops.cross_entropy(cpu(fanin.Tensor(x)), y)
        opt_c.zero_grad()
        lc.backward()
        opt_c.step()
        with _Transfers() as tr:
            ld = fanin.ops.cross_entropy(dev(xd), y)
            opt_d.zero_grad()
            ld.backward()
            opt_d.step()
        assert tr.n == 0, f"a training step copied {tr.n} arrays to the host"
        assert ld.item() == pytest.approx(lc.item(), rel=1e-5)
    _params_close(cpu, dev)
    assert all(a.device == "cuda" for st in opt_d.state.values() for a in [fanin.Tensor(v) for v in st.values()])
    # Adam, an element-wise loss built from ops, and the state dict back on the host
    opt_c, opt_d = fanin.optim.AdamW(cpu.parameters(), lr=1e-2), fanin.optim.AdamW(dev.parameters(), lr=1e-2)
    for model, opt, xt in ((cpu, opt_c, fanin.Tensor(x)), (dev, opt_d, xd)):
        out = model(xt)
        loss = ((out * out).mean() + (out - 1.0).sum() * 0.01 + fanin.ops.relu(-out).mean(axis=0).sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    _params_close(cpu, dev)
    sd = dev.state_dict()
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    cpu.load_state_dict(sd)
    dev.to("cpu")
    assert all(p.device == "cpu" for p in dev.parameters())


@sim
def test_full_fan_in_layer_runs_as_dense_products_on_the_device():
    """A condensed layer at k = n_in (SRigL's ERK keeps a small classifier dense) takes GEMMs on the device, as
    BLAS on the host: its value gradient is dy^T x, and ablated neurons get none."""
    import fanin
    from fanin.kernels import cuda_kernels as CK

    rng = np.random.default_rng(11)
    B, n_in, n_out = 9, 12, 5
    models = []
    for _ in range(2):
        layer = fanin.nn.FanInLinear(n_in, n_out, k=n_in, seed=0)
        active = np.ones(n_out, bool)
        active[1] = False
        layer.set_connectivity(np.tile(np.arange(n_in), (n_out, 1)),
                               rng.standard_normal((n_out, n_in)).astype(np.float32) if not models else
                               models[0].values.data.copy(), active)
        models.append(layer)
    cpu, dev = models[0], models[1].to("cuda")
    x = rng.standard_normal((B, n_in)).astype(np.float32)
    dy = rng.standard_normal((B, n_out)).astype(np.float32)
    xc, xd = fanin.Tensor(x, requires_grad=True), fanin.Tensor(x, device="cuda", requires_grad=True)
    yc = cpu(xc)
    CK.Kernel.RECORD = []
    try:
        yd = dev(xd)
        (yd * fanin.Tensor(dy, device="cuda")).sum().backward()
        launched = {key[0] for key, _ in CK.Kernel.RECORD}
    finally:
        CK.Kernel.RECORD = None
    (yc * fanin.Tensor(dy)).sum().backward()
    assert "gemm" in launched and not launched & {"tile", "dvals", "rows", "dvals_rows"}, launched
    _close(_h(yd.data), yc.data)
    _close(_h(xd.grad), xc.grad)
    _close(_h(dev.values.grad), cpu.values.grad)
    assert not _h(dev.values.grad)[1].any()
    _close(_h(dev.bias.grad), cpu.bias.grad)


@sim
def test_srigl_steps_on_the_device_match_cpu(monkeypatch):
    import fanin
    from fanin.kernels import select
    from fanin.sparsity import srigl as srigl_mod

    class _HostSelect:  # stands in for the one-line hook in srigl_update (values = fanin.device.host(...))
        def __getattr__(self, name):
            fn = getattr(select, name)
            if name != "gather_rows":
                return fn
            return lambda a, s: fn(fanin.device.host(a), s)

    monkeypatch.setattr(srigl_mod, "select", _HostSelect())
    rng = np.random.default_rng(8)
    sizes = [16, 12, 4]
    cpu, dev = _pair_models(sizes, 0.5, seed=3)
    runs = []
    for model in (cpu, dev):
        opt = fanin.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sr = fanin.sparsity.SRigL(model, opt, sparsity=0.5, distribution="uniform", delta_t=2, t_end=6, seed=0)
        runs.append((model, opt, sr))
    data = [(rng.standard_normal((9, 16)).astype(np.float32), rng.integers(0, 4, 9)) for _ in range(4)]
    for xb, yb in data:
        for model, opt, sr in runs:
            xt = fanin.Tensor(xb, device="cuda") if model is dev else fanin.Tensor(xb)
            loss = fanin.ops.cross_entropy(model(xt), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sr.step()
    (mc, _, sc), (md, od, sd) = runs
    assert len(sc.history) == len(sd.history) == 2
    for (_, lc), (_, ld) in zip(fanin.sparsity.srigl.sparse_layers(mc), fanin.sparsity.srigl.sparse_layers(md)):
        np.testing.assert_array_equal(ld.indices, lc.indices)
        np.testing.assert_array_equal(ld.active, lc.active)
        assert ld.values.device == "cuda"
        _close(_h(ld.values.data), lc.values.data, 1e-4)
        assert all(not isinstance(v, np.ndarray) for v in od.state[ld.values].values())


@sim
def test_lowbit_inference_on_the_device_matches_cpu(tmp_path):
    import fanin
    from fanin import device

    rng = np.random.default_rng(9)
    model = fanin.models.mlp([14, 10, 6, 3], sparsity=[0.6, 0.5, None], seed=1)
    net = fanin.compile(model)
    for plan_bits in (None, 8, 4):
        plan = net.plan if plan_bits is None else fanin.runtime.quantize(net.plan, plan_bits)
        cpu_net = fanin.runtime.Network(plan)
        dnet = device.to_device(cpu_net)
        for B in (1, 9):
            x = rng.standard_normal((B, 14)).astype(np.float32)
            _close(dnet.predict(x), cpu_net.predict(x), 1e-5)
        y = dnet.predict(_dev(x))  # device in, device out
        assert not isinstance(y, np.ndarray)
        _close(_h(y), cpu_net.predict(x), 1e-5)
    path = tmp_path / "m.fanin"
    fanin.save(fanin.runtime.Network(fanin.runtime.quantize(net.plan, 8)), str(path))
    d2 = device.load(str(path), "cuda")
    x = rng.standard_normal((2, 14)).astype(np.float32)
    _close(d2.predict(x), fanin.load(str(path)).predict(x), 1e-5)


@sim
def test_device_errors_name_the_arrays():
    import fanin
    from fanin import kernels as K

    rng = np.random.default_rng(10)
    idx, vals, _ = _layer(rng, 4, 6, 2)
    x = rng.standard_normal((2, 6)).astype(np.float32)
    with pytest.raises(TypeError, match=r"x on cuda, indices on cpu"):
        K.fanin_forward(_dev(x), idx, vals)
    with pytest.raises(TypeError, match=r"values on cpu"):
        K.fanin_forward(_dev(x), K.Topology(idx, 6), vals)
    with pytest.raises(TypeError, match=r"scale on cpu"):
        K.fixed_point_forward(_dev(x), _dev(idx), _dev(vals.astype(np.int8)), np.ones(4, np.float32))
    with pytest.raises(ValueError, match="xp must be pack_panels"):
        K.fanin_forward(_dev(np.ones((9, 6), np.float32)), K.Topology(idx, 6), _dev(vals),
                        xp=K.pack_panels(np.ones((9, 6), np.float32)))
    a = fanin.Tensor(x, device="cuda", requires_grad=True)
    b = fanin.Tensor(x)
    with pytest.raises(TypeError, match="b is on the cpu"):
        a + b
    with pytest.raises(TypeError, match="host ndarray"):
        a * x
    with pytest.raises(NotImplementedError, match="ops.exp is not implemented for CUDA"):
        a.exp()
    with pytest.raises(TypeError, match=r"\.to\('cpu'\)\.numpy\(\)"):
        a.numpy()
    with pytest.raises(NotImplementedError, match="BatchNorm1d has no CUDA implementation"):
        fanin.nn.Sequential(fanin.nn.Linear(3, 2), fanin.nn.BatchNorm1d(2)).to("cuda")
    model = fanin.models.mlp([6, 4], sparsity=0.5)
    model(fanin.Tensor(x)).sum().backward()
    opt = fanin.optim.SGD(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.data = fanin.device.move(p.data, "cuda")  # moved by hand, gradients left on the host
    with pytest.raises(TypeError, match="gradient is on the cpu"):
        opt.step()
    with pytest.raises(ValueError, match="unknown device"):
        fanin.Tensor(x, device="tpu")


@sim
def test_foreign_device_arrays_are_taken_without_a_copy():
    from fanin import kernels as K
    from fanin.kernels import cuda as KC

    rng = np.random.default_rng(11)
    idx, vals, _ = _layer(rng, 4, 6, 2)
    x = rng.standard_normal((2, 6)).astype(np.float32)

    class Foreign:  # another library's device array (under the simulator its memory is host memory)
        def __init__(self, a):
            self.a = a
            self.__cuda_array_interface__ = {"shape": a.shape, "typestr": a.dtype.str, "strides": None,
                                             "data": (a.ctypes.data, False), "version": 3}
            self.shape, self.dtype, self.ndim = a.shape, a.dtype, a.ndim

    fx = Foreign(x)
    assert np.shares_memory(KC.wrap(fx)._ary, x)
    y = K.fanin_forward(fx, Foreign(idx), Foreign(vals))
    _close(_h(y), K.fanin_forward(x, idx, vals))


if not SIM:  # the parent process collects only its own two tests (the rest run in test_simulator_suite's child)
    for _name in [n for n in list(globals()) if n.startswith("test_")]:
        if _name not in ("test_simulator_suite", "test_cuda_without_gpu_is_a_clear_error"):
            del globals()[_name]
    del _name
