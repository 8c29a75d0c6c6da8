"""The CUDA kernels on a real GPU against the CPU kernels, up to 4096x4096 layers and batch 256.

Skipped without numba-cuda or without a GPU (and under the simulator, which ``test_cuda_sim.py`` covers). The
simulator cannot show races that only parallel hardware has, so these run the large configurations (the panel
kernel's 16-warp blocks with up to 227 KiB of shared memory from 512 rows, the tile kernel's below; many blocks,
chunked inputs) and check that repeated runs agree bit for bit (no atomics anywhere).

    make test-gpu      # or: python -m pytest -q -p no:cacheprovider tests/test_cuda_device.py -ra
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"


def _gpu_reason():
    if SIM:
        return "under the simulator (tests/test_cuda_sim.py covers it)"
    if not HAVE_NUMBA_CUDA:
        return "numba-cuda is not installed (the `cuda` extra)"
    from numba import cuda

    return None if cuda.is_available() else "no CUDA GPU/driver on this machine"


REASON = _gpu_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

SHAPES = [(4096, 4096, 0.9), (768, 3072, 0.9), (3072, 768, 0.9), (1000, 784, 0.99), (300, 1024, 0.5)]
BATCHES = [1, 3, 8, 33, 256]


def _layer(rng, n_out, n_in, sparsity, ablate=0):
    from fanin import kernels as K

    k = max(1, int(n_in * (1 - sparsity)))
    idx = np.argsort(rng.random((n_out, n_in)), axis=1)[:, :k]
    idx.sort(axis=1)
    # cast after scaling: float32 / np.sqrt(k) (a NumPy float64 scalar) is float64 under NumPy 2's promotion rules,
    # which made every product below a float64 one (mixed float32/float64 arrays compute in float64)
    vals = (rng.standard_normal((n_out, k)) / np.sqrt(k)).astype(np.float32)
    active = np.ones(n_out, bool)
    active[:ablate] = False
    vals[~active] = 0
    idx[~active] = np.arange(k)
    return K.Topology(idx.astype(K.index_dtype(n_in)), n_in, active), vals


def _close(got, want, tol=1e-4):
    got = got.copy_to_host() if hasattr(got, "copy_to_host") else np.asarray(got)
    scale = max(1.0, float(np.abs(want).max(initial=0)))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("n_out, n_in, sparsity", SHAPES)
def test_forward_backward_match_cpu(n_out, n_in, sparsity):
    from numba import cuda

    from fanin import kernels as K

    rng = np.random.default_rng(n_out + n_in)
    topo, vals = _layer(rng, n_out, n_in, sparsity, ablate=3)
    bias = rng.standard_normal(n_out).astype(np.float32)
    dvals, dbias = cuda.to_device(vals), cuda.to_device(bias)
    for B in BATCHES:
        x = rng.standard_normal((B, n_in)).astype(np.float32)
        dy = rng.standard_normal((B, n_out)).astype(np.float32)
        dx_, ddy = cuda.to_device(x), cuda.to_device(dy)
        y = K.fanin_forward(dx_, topo, dvals, dbias)
        _close(y, K.fanin_forward(x, topo, vals, bias))
        gx, gv = K.fanin_backward(dx_, topo, dvals, ddy)
        assert (y.dtype, gx.dtype, gv.dtype) == (np.float32,) * 3, "float32 in, float32 out"
        rgx, rgv = K.fanin_backward(x, topo, vals, dy)
        _close(gx, rgx)
        _close(gv, rgv, 2e-4)
        # no atomics: a second run is bitwise identical, and fanin_backward is its two halves
        np.testing.assert_array_equal(K.fanin_forward(dx_, topo, dvals, dbias).copy_to_host(), y.copy_to_host())
        gx2, gv2 = K.fanin_backward(dx_, topo, dvals, ddy)
        np.testing.assert_array_equal(gx2.copy_to_host(), gx.copy_to_host())
        np.testing.assert_array_equal(gv2.copy_to_host(), gv.copy_to_host())
        np.testing.assert_array_equal(K.fanin_backward_values(dx_, topo, ddy).copy_to_host(), gv.copy_to_host())
        np.testing.assert_array_equal(K.fanin_backward_input(topo, dvals, ddy, n_in).copy_to_host(), gx.copy_to_host())
        if B >= 8:  # the packed-panel path of training
            xp, dyp = K.pack_panels(dx_), K.pack_panels(ddy)
            _close(K.fanin_forward_panels(xp, B, topo, dvals, dbias), K.fanin_forward_panels(K.pack_panels(x), B, topo,
                                                                                             vals, bias))
            px, pv = K.fanin_backward_panels(xp, topo, dvals, dyp, B)
            rpx, rpv = K.fanin_backward_panels(K.pack_panels(x), topo, vals, K.pack_panels(dy), B)
            _close(px, rpx)
            _close(pv, rpv, 2e-4)


def test_fixed_point_int8_and_4bit_match_cpu():
    from numba import cuda

    from fanin import kernels as K
    from fanin.kernels import cuda as KC
    from fanin.kernels import lowbit

    rng = np.random.default_rng(1)
    topo, _ = _layer(rng, 4096, 4096, 0.9)
    n_out, k = topo.indices.shape
    q8 = rng.integers(-128, 128, (n_out, k)).astype(np.int8)
    q4 = rng.integers(-8, 8, (n_out, k)).astype(np.int8)
    scale = np.exp2(rng.integers(-9, -4, n_out)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32)
    packed = lowbit.pack_nibbles(np.concatenate([q4, np.zeros((n_out, k % 2), np.int8)], axis=1))
    for B in (1, 256):
        x = rng.standard_normal((B, 4096)).astype(np.float32)
        y = K.fixed_point_forward(cuda.to_device(x), topo, cuda.to_device(q8), cuda.to_device(scale),
                                  cuda.to_device(bias))
        _close(y, K.fanin_forward(x, topo, scale[:, None] * q8.astype(np.float32), bias))
        y4 = KC.fixed_point_forward4(cuda.to_device(x), topo.indices, cuda.to_device(packed), k,
                                     cuda.to_device(scale), cuda.to_device(bias))
        _close(y4, K.fanin_forward(x, topo, scale[:, None] * q4.astype(np.float32), bias))


def test_growth_candidates_match_cpu():
    from numba import cuda

    from fanin import kernels as K

    rng = np.random.default_rng(2)
    topo, _ = _layer(rng, 1024, 2048, 0.9)
    x = rng.integers(-3, 4, (64, 2048)).astype(np.float32)  # integer-valued: |dy^T x| exact, the same choice
    dy = rng.integers(-2, 3, (64, 1024)).astype(np.float32)
    for c, sort in ((221, False), (64, True)):
        got = K.growth_candidates(cuda.to_device(x), cuda.to_device(dy), topo, c, sort=sort, held=True)
        want = K.growth_candidates(x, dy, topo, c, sort=sort, held=True)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g.copy_to_host(), w)
    _close(K.dense_grad(cuda.to_device(x), cuda.to_device(dy)), K.dense_grad(x, dy))


def _mlp(sizes, classifier):
    import fanin

    model = fanin.models.mlp(sizes, sparsity=[0.9, 0.9, None], seed=0)
    if classifier == "full fan-in":  # a condensed classifier at k = n_in (what SRigL's ERK gives), one neuron ablated
        n_in, n_out = sizes[-2], sizes[-1]
        layer = fanin.nn.FanInLinear(n_in, n_out, k=n_in, seed=0)
        active = np.ones(n_out, bool)
        active[1] = False
        layer.set_connectivity(np.tile(np.arange(n_in), (n_out, 1)), fanin.device.host(model[-1].weight.data), active)
        model.layers[-1] = layer
    return model


@pytest.mark.parametrize("classifier", ["dense", "full fan-in"])
def test_training_steps_match_cpu(classifier):
    import fanin

    rng = np.random.default_rng(3)
    sizes = [784, 1024, 1024, 10]
    cpu = _mlp(sizes, classifier)
    dev = _mlp(sizes, classifier).to("cuda")
    oc = fanin.optim.SGD(cpu.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    od = fanin.optim.SGD(dev.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    for _ in range(3):
        x = rng.standard_normal((256, 784)).astype(np.float32)
        y = rng.integers(0, 10, 256)
        for model, opt, xt in ((cpu, oc, fanin.Tensor(x)), (dev, od, fanin.Tensor(x, device="cuda"))):
            loss = fanin.ops.cross_entropy(model(xt), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (n, p), (_, q) in zip(cpu.named_parameters(), dev.named_parameters()):
        _close(q.data, p.data, 2e-4)


def test_lowbit_network_on_the_gpu_matches_cpu():
    import fanin
    from fanin import device

    rng = np.random.default_rng(4)
    model = fanin.models.mlp([784, 4096, 4096, 10], sparsity=[0.9, 0.9, None], seed=1)
    net = fanin.compile(model)
    for bits in (None, 8, 4):
        cpu_net = net if bits is None else fanin.runtime.Network(fanin.runtime.quantize(net.plan, bits))
        dnet = device.to_device(cpu_net)
        for B in (1, 256):
            x = rng.standard_normal((B, 784)).astype(np.float32)
            _close(dnet.predict(x), cpu_net.predict(x), 2e-4)


def test_torch_tensors_are_taken_without_a_copy():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch without CUDA")
    from fanin import kernels as K
    from fanin.kernels import cuda as KC

    rng = np.random.default_rng(5)
    topo, vals = _layer(rng, 512, 1024, 0.9)
    x = torch.randn(64, 1024, device="cuda")
    w = torch.from_numpy(vals).cuda()
    assert KC.wrap(x).device_ctypes_pointer.value == x.data_ptr()
    y = K.fanin_forward(x, topo, w)
    _close(y, K.fanin_forward(x.cpu().numpy(), topo, vals))


def test_launches_take_the_fast_path_with_the_same_results():
    """After a signature's first launch (through Numba, which compiles it) the kernels launch on the fast path
    (cuda_kernels.Kernel), with parameters checked against Numba's; results equal Numba's own launches bit for bit."""
    from numba import cuda

    from fanin import kernels as K
    from fanin.kernels import cuda_kernels as CK

    if not CK.FAST_LAUNCH:
        pytest.skip("fast launches are off (FANIN_FAST_LAUNCH=0)")
    rng = np.random.default_rng(6)
    topo, vals = _layer(rng, 1024, 1024, 0.9)
    dvals = cuda.to_device(vals)
    outs = {}
    for fast in (False, True, True):
        CK.FAST_LAUNCH = fast
        before = dict(CK.FAST_STATS)
        got = []
        for B in (1, 64):
            x = cuda.to_device(np.random.default_rng(B).standard_normal((B, 1024)).astype(np.float32))
            dy = cuda.to_device(np.random.default_rng(B + 1).standard_normal((B, 1024)).astype(np.float32))
            got.append(K.fanin_forward(x, topo, dvals).copy_to_host())
            got += [a.copy_to_host() for a in K.fanin_backward(x, topo, dvals, dy)]
        outs.setdefault(fast, []).append(got)
        if fast:
            assert CK.FAST_STATS["refused"] == before["refused"], CK._REFUSED
    CK.FAST_LAUNCH = True
    assert CK.FAST_STATS["fast"] > 0, CK.FAST_STATS
    for a, b, c in zip(outs[False][0], outs[True][0], outs[True][1]):
        np.testing.assert_array_equal(b, a)
        np.testing.assert_array_equal(c, a)
