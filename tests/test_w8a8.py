"""Int8 activations (fanin.kernels.w8a8) against their NumPy twins, and a Network built with activations="int8".

The integer kernel must give exactly the integer dot products (``qsteps`` and ``qsteps_portable`` against a
NumPy int64 product); the input quantizer exactly its twin; the whole chain exactly ``w8a8.reference`` (all
integer sums are exact, so there is no tolerance), serial and parallel alike; and the Network within the error
of 8-bit activations of the float path.
"""
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numba import njit
from numba.core.errors import TypingError

import fanin
from fanin.kernels import w8a8
from fanin.kernels._intrinsics import round_int32
from fanin.runtime import PredictError
from test_infer_kernels import make_layer

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
needs_fast = pytest.mark.skipif(not w8a8.FAST, reason="this CPU lacks AVX-512 VBMI/VNNI: the portable kernel runs")


@njit
def _fast_1(xq, qp, chb, goff, G, acc, F):
    if F == 0:
        w8a8.qsteps(xq, qp, chb, goff, G, acc, 0)
    elif F == 1:
        w8a8.qsteps(xq, qp, chb, goff, G, acc, 1)
    elif F == 2:
        w8a8.qsteps(xq, qp, chb, goff, G, acc, 2)
    else:
        w8a8.qsteps(xq, qp, chb, goff, G, acc, 3)


@njit
def _fast_n(xq, xs, qp, chb, goff, G, acc, ast, S, F):
    w8a8._steps_block_fast(xq, xs, qp, chb, goff, G, acc, ast, S, F)


def _call_fast(xq, qp, chb, goff, G, acc, F=0):
    _fast_1(xq, qp, chb, goff, G, acc, F)


def _call_fast_n(xq, xs, qp, chb, goff, G, acc, ast, S, F=0):
    _fast_n(xq, xs, qp, chb, goff, G, acc, ast, S, F)


def _one_layer(rng, n_in, n_out, k, dead, form=None):
    spec = make_layer(rng, n_in, n_out, k, "int8", "none", np.int32, dense=(k == n_in and rng.random() < 0.3),
                      dead=dead)
    return spec, w8a8.QLayout([spec], forms=None if form is None else [form])


def _integer_dots(spec, xq):
    q, _ = w8a8.layer_int8(spec)
    idx = np.arange(spec["n_in"])[None].repeat(spec["n_out"], 0) if spec["indices"] is None else spec["indices"]
    return (q.astype(np.int64) * xq[idx.astype(np.int64)].astype(np.int64)).sum(axis=1)


@st.composite
def layer_case(draw):
    n_in = draw(st.integers(1, 700))
    n_out = draw(st.integers(1, 37))
    k = draw(st.sampled_from([1, n_in, draw(st.integers(1, n_in))]))
    return n_in, n_out, k, draw(st.integers(0, 3)), draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 3))


@SETTINGS
@given(layer_case())
def test_the_integer_kernels_give_the_exact_dot_products(case):
    """Both kernels against NumPy's int64 products: every step form (``w8a8.FORMS``), any n_in (1 .. 11 chunks),
    k = 1 .. n_in, 1-37 rows (groups of 8 or 16, the last one partial), dense and sparse rows, ablated rows (zeros),
    extreme bytes and weights (255 x -128 does not saturate); one sample, and 2-4 samples in one pass
    (``qsteps_n``)."""
    n_in, n_out, k, dead, seed, form = case
    rng = np.random.default_rng(seed)
    spec, lay = _one_layer(rng, n_in, n_out, k, dead, form)
    assert lay.lt[0, w8a8.Q_FORM] == form
    R = w8a8.FORMS[form][0]
    xq = np.zeros(lay.xq_bytes, np.uint8)
    xq[:n_in] = rng.choice(np.array([0, 1, 127, 128, 254, 255], np.uint8), n_in) if seed % 2 else rng.integers(0, 256, n_in)
    want = _integer_dots(spec, xq)
    G, goff, chb = lay.lt[0, w8a8.Q_G], lay.lt[0, w8a8.Q_GS], lay.lt[0, w8a8.Q_CH]
    kernels = [w8a8.qsteps_portable] + ([_call_fast] if w8a8.FAST else [])
    for fn in kernels:
        acc = np.full(G * R, -7, np.int32)
        fn(xq, lay.qp, chb, goff, G, acc, form)
        np.testing.assert_array_equal(acc[:n_out], want, err_msg=str(fn))
    # several samples in one pass (each its own bytes and sums, at strides): each gets its own products
    S = 2 + seed % 3
    xs, ast = lay.xq_bytes + 64, G * R + 16
    xqs = np.zeros(S * xs, np.uint8)
    for j in range(S):
        xqs[j * xs:j * xs + n_in] = xq[:n_in] if j == 0 else rng.integers(0, 256, n_in)
    for fn in [w8a8.qsteps_n_portable] + ([_call_fast_n] if w8a8.FAST else []):
        accs = np.full(S * ast, -7, np.int32)
        fn(xqs, xs, lay.qp, chb, goff, G, accs, ast, S, form)
        for j in range(S):
            np.testing.assert_array_equal(accs[j * ast:j * ast + n_out], _integer_dots(spec, xqs[j * xs:(j + 1) * xs]),
                                          err_msg=f"{fn} sample {j} of {S}")


def test_a_group_takes_per_chunk_the_steps_of_its_fullest_row_and_zero_weights_take_none():
    """A hand-made layer over 5 chunks of 64 inputs (300 inputs), groups of 8 rows, 8 slots a row per step:
    group 0: row 0 has 40 slots in chunk 0 (5 steps), row 1 one in chunk 4 (1 step), rows 2 and 3 one each in
    chunk 0 (within row 0's steps), row 7 nine in chunk 1 (2 steps), rows 4-6 only zero weights: 8 steps;
    group 1: row 8 has 17 slots in chunk 2 (3 steps), row 9 one in chunk 0 (1 step), the others zeros: 4 steps;
    group 2: one ablated row, no step (sums 0). The sums are the exact products, on both kernels."""
    assert w8a8.FORMS[0] == (8, 64)  # the geometry this case is made for: 8 rows, 8 slots a row, 64-byte chunks
    rng = np.random.default_rng(5)
    n_in, n_out, k = 300, 17, 40
    idx = np.zeros((n_out, k), np.int64)
    q = rng.integers(-127, 128, (n_out, k)).astype(np.int8)
    q[q == 0] = 1
    live = {0: (0, 40), 1: (256, 1), 2: (50, 1), 3: (7, 1), 7: (64, 9), 8: (128, 17), 9: (0, 1)}
    for r in range(n_out):
        base, n = live.get(r, (r, 0))
        idx[r] = base + np.arange(k)
        q[r, n:] = 0
    spec = {"n_in": n_in, "n_out": n_out, "indices": idx.astype(np.int16), "qvalues": q,
            "scale": np.ones(n_out, np.float32), "bias": None, "act": "none"}
    lay = w8a8.QLayout([spec], forms=[0])
    assert lay.lt[0, w8a8.Q_STEPS] == (5 + 1 + 2) + (3 + 1) + 0
    xq = np.zeros(lay.xq_bytes, np.uint8)
    xq[:n_in] = rng.integers(0, 256, n_in)
    want = (q.astype(np.int64) * xq[idx]).sum(axis=1)
    G, goff, chb = lay.lt[0, w8a8.Q_G], lay.lt[0, w8a8.Q_GS], lay.lt[0, w8a8.Q_CH]
    for fn in [w8a8.qsteps_portable] + ([_call_fast] if w8a8.FAST else []):
        acc = np.full(G * 8, -7, np.int32)
        fn(xq, lay.qp, chb, goff, G, acc, 0)
        np.testing.assert_array_equal(acc[:n_out], want, err_msg=str(fn))
        assert acc[16] == 0


@pytest.mark.parametrize("form", range(len(w8a8.FORMS)))
def test_every_form_gives_exact_sums_and_writes_nothing_past_its_groups(form):
    """Each step form on layers whose widths sit at the chunk and group edges (1, 63-65, 127-129, 300 inputs; 1, 15-17,
    33 rows): both kernels give the exact products, the padding rows of the last group 0, and the int32 after the
    groups' sums stay untouched."""
    rng = np.random.default_rng(form)
    R = w8a8.FORMS[form][0]
    for n_in in (1, 63, 64, 65, 127, 128, 129, 300):
        for n_out in (1, 15, 16, 17, 33):
            k = int(rng.integers(1, n_in + 1))
            spec, lay = _one_layer(rng, n_in, n_out, k, 0, form)
            xq = np.zeros(lay.xq_bytes, np.uint8)
            xq[:n_in] = rng.integers(0, 256, n_in)
            G, goff, chb = lay.lt[0, w8a8.Q_G], lay.lt[0, w8a8.Q_GS], lay.lt[0, w8a8.Q_CH]
            for fn in [w8a8.qsteps_portable] + ([_call_fast] if w8a8.FAST else []):
                acc = np.full(G * R + 16, -7, np.int32)
                fn(xq, lay.qp, chb, goff, G, acc, form)
                np.testing.assert_array_equal(acc[:n_out], _integer_dots(spec, xq), err_msg=f"{fn} {n_in}x{n_out}")
                assert (acc[n_out:G * R] == 0).all() and (acc[G * R:] == -7).all()


def test_a_step_past_l2_costs_more_than_any_step_within():
    """The form choice must not prefer a stream that spills out of L2 (~4.8 ns a step) to one that fits (~2.1 ns,
    x FORM_COST) for having a few fewer steps."""
    n = 1000
    cached = n * w8a8.STEP_BYTES  # n steps fit, n + 1 do not
    for f in range(len(w8a8.FORMS)):
        for g in range(len(w8a8.FORMS)):
            assert w8a8._cost(n + 1, f, cached) > w8a8._cost(n, g, cached)


def test_forms_must_name_one_valid_form_per_layer():
    rng = np.random.default_rng(0)
    spec, _ = _one_layer(rng, 50, 5, 9, 0)
    for bad in ([4], [-1], [0, 0], []):
        with pytest.raises(ValueError, match="one form in 0..3 per layer"):
            w8a8.QLayout([spec], forms=bad)


def test_a_very_sparse_wide_layer_gets_the_form_of_fewest_steps():
    """4096 inputs, fan-in 41 (99 %): a row has ~0.6 slots per 64-byte chunk, so groups of 8 rows x 8 slots take a
    step in almost every chunk with ~8 % of its slots filled (the twelfth session's regression: ~2x slower than
    before). Groups of 16 rows x 4 slots over 128-byte chunks need a quarter of those steps, and are chosen; a
    dense-ish layer (784 inputs, fan-in 80) keeps 64-byte chunks (every form's steps within a few %, and a
    128-byte step costs more when samples share it)."""
    rng = np.random.default_rng(0)
    steps = {}
    for n_in, n_out, k in ((4096, 512, 41), (784, 512, 80)):
        idx = np.sort(np.argsort(rng.random((n_out, n_in)), axis=1)[:, :k], axis=1).astype(np.int16)
        spec = {"n_in": n_in, "n_out": n_out, "indices": idx, "bias": None, "act": "none",
                "values": rng.standard_normal((n_out, k)).astype(np.float32)}
        auto = w8a8.QLayout([spec])
        steps[n_in] = [int(w8a8.QLayout([spec], forms=[f]).lt[0, w8a8.Q_STEPS]) for f in range(len(w8a8.FORMS))]
        assert auto.lt[0, w8a8.Q_STEPS] == steps[n_in][auto.lt[0, w8a8.Q_FORM]]
        x = rng.standard_normal((2, n_in)).astype(np.float32)
        np.testing.assert_array_equal(auto.run(x), w8a8.reference([spec], x))
        if n_in == 4096:
            assert auto.lt[0, w8a8.Q_FORM] == 3 and steps[n_in][3] < 0.35 * steps[n_in][0]
        else:
            assert w8a8.FORMS[auto.lt[0, w8a8.Q_FORM]][1] == 64


@needs_fast
def test_the_fast_kernel_refuses_other_array_types_when_compiling():
    rng = np.random.default_rng(0)
    _, lay = _one_layer(rng, 50, 5, 9, 0)
    acc = np.zeros(8, np.int32)
    xq = np.zeros(lay.xq_bytes, np.uint8)
    with pytest.raises(TypingError):
        _call_fast(xq.astype(np.int8), lay.qp, 0, 0, 2, acc)
    with pytest.raises(TypingError):
        _call_fast(xq, lay.qp, 0, 0, 2, acc.astype(np.int64))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-2.0**100, 2.0**100, width=32) | st.sampled_from([0.0, -0.0, 1e-38, -3.0, 255.0]),
                min_size=1, max_size=300),
       st.sampled_from([None, np.nan, np.inf, -np.inf]))
def test_the_input_quantizer_is_its_numpy_twin(vals, bad):
    """Non-negative inputs (zero point 0, 255 levels) and signed ones (128, +-127), all zeros, tiny and huge
    values, signed zeros: the same bytes and scale as the twin; a NaN or Inf gives a NaN scale."""
    x = np.array(vals, np.float32)
    if bad is not None:
        x[len(x) // 2] = bad
    xq = np.full(len(x) + 8, 77, np.uint8)
    s, zp = w8a8.quantize_input(x, len(x), xq)
    q, s_ref, zp_ref = w8a8._quantize_np(x)
    if bad is not None:
        assert np.isnan(s) and q is None
        return
    assert (s, zp) == (s_ref, zp_ref)
    np.testing.assert_array_equal(xq[:len(x)], q)
    assert (xq[len(x):] == 77).all()  # nothing written past n
    if zp == 0:
        assert (x >= 0).all() and (q.max() == 255 or s == 0)
    else:
        assert (q >= 1).all() and (q <= 255).all() and (x < 0).any()


def _chain(rng, widths, kinds, acts, k_frac=0.3, dead=1):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
        dense = i == len(widths) - 2
        k = n_in if dense else max(1, int(k_frac * n_in))
        layers.append(make_layer(rng, n_in, n_out, k, kinds[i % len(kinds)], acts[i], np.int16, dense=dense,
                                 dead=0 if dense else dead, bias=i != 1))
    return layers


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 9), st.sampled_from(["fp32", "int8", "int4"]))
def test_the_chain_is_its_numpy_twin_bitwise(seed, batch, kind):
    """Random chains (sparse and dense layers, float32 / int8 / 4-bit weights, ReLU and none, ablated rows, a
    layer without bias; the step forms chosen or mixed at random), inputs of either sign: serial and parallel
    drivers (blocks of 1-4 samples over 1-3
    workers) equal the twin bit for bit, every output row written."""
    rng = np.random.default_rng(seed)
    widths = [int(w) for w in rng.integers(1, 300, 4)]
    acts = ["relu", str(rng.choice(["relu", "none"])), "none"]
    layers = _chain(rng, widths, [kind, "fp32", "int8"], acts)
    forms = None if seed % 4 == 0 else [int(f) for f in rng.integers(0, len(w8a8.FORMS), 3)]  # mixed step forms too
    lay = w8a8.QLayout(layers, forms=forms)
    x = (rng.standard_normal((batch, widths[0])) * rng.choice([1e-3, 1, 50])).astype(np.float32)
    if seed % 3 == 0:
        x = np.abs(x)
    want = w8a8.reference(layers, x)
    np.testing.assert_array_equal(lay.run(x), want)
    for fn, slots in ((w8a8.forward_serial, 1), (w8a8.forward, min(batch, 3))):  # every row written (NaN-filled)
        out = np.full_like(want, np.nan)
        assert fn(x, out, lay.workspace(slots), *lay.arrays) == 0
        np.testing.assert_array_equal(out, want)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 150), st.sampled_from([32, 64]), st.booleans())
def test_the_panel_form_gives_the_bits_of_the_one_sample_form(seed, batch, P, parallel):
    """Panels of 32/64 samples (VNNI on 4-slot interleaves, sums in the unpack order, samples found again at
    the end): for random chains, batches that fill no panel, one, or several partly, samples with NaN/Inf,
    serial and parallel -- exactly the bits of one sample at a time (and of the NumPy twin)."""
    rng = np.random.default_rng(seed)
    widths = [int(w) for w in rng.integers(1, 200, 4)]
    acts = ["relu", str(rng.choice(["relu", "none"])), "none"]
    layers = _chain(rng, widths, [str(rng.choice(["fp32", "int8", "int4"])), "int8"], acts, k_frac=rng.uniform(0.05, 1))
    lay = w8a8.QLayout(layers)
    x = (rng.standard_normal((batch, widths[0])) * rng.choice([1e-3, 1, 50])).astype(np.float32)
    if seed % 3 == 0:
        x = np.abs(x)
    if seed % 5 == 0:
        x[rng.integers(batch), rng.integers(widths[0])] = rng.choice([np.nan, np.inf])
    want = lay.run(x)
    ws = lay.panel_workspace(min(2, -(-batch // P)) if parallel else 1, P)
    out = np.empty_like(want)
    fn = w8a8.panels_forward if parallel else w8a8.panels_forward_serial
    bad = fn(x, out, P, *ws, *lay.panel_arrays)
    assert bad == int((~np.isfinite(x).all(axis=1)).sum())
    np.testing.assert_array_equal(out, want)
    if seed % 5:
        np.testing.assert_array_equal(out, w8a8.reference(layers, x))


@njit
def _vrow_fast(blk, idx, ioff, w, woff, ng, acc, aoff, P):
    if P == 64:
        w8a8.vrow64(blk, idx, ioff, w, woff, ng, acc, aoff)
    else:
        w8a8.vrow32(blk, idx, ioff, w, woff, ng, acc, aoff)


@SETTINGS
@given(st.integers(1, 300), st.integers(1, 40), st.sampled_from([32, 64]), st.integers(0, 2**32 - 1))
def test_the_panel_row_kernels_give_exact_sums_per_sample(n_in, groups, P, seed):
    """vrow64/vrow32 and their portable twin against NumPy: sum p of a row is that of sample p of the block;
    extreme bytes and weights, the largest index (the sentinel row) included. The fast kernels take groups of four
    slots in pairs (an even count: the layout pads rows to eights); the portable one any count."""
    rng = np.random.default_rng(seed)
    blk = rng.choice(np.array([0, 1, 128, 255], np.uint8), (n_in + 1) * P) if seed % 2 else \
        rng.integers(0, 256, (n_in + 1) * P).astype(np.uint8)
    idx = rng.integers(0, n_in + 1, 4 * groups).astype(np.int16)
    idx[rng.integers(4 * groups)] = n_in
    wb = rng.integers(-128, 128, 4 * groups).astype(np.int8)
    want = (wb.astype(np.int64)[:, None] * blk.reshape(n_in + 1, P)[idx.astype(np.int64)].astype(np.int64)).sum(axis=0)
    kernels = [lambda *a: w8a8.vrow_portable(*a, P)]
    if w8a8.FAST and groups % 2 == 0:
        kernels.append(lambda *a: _vrow_fast(*a, P))
    for fn in kernels:
        acc = np.full(P + 3, -9, np.int32)
        fn(blk, idx, 0, wb.view(np.int32), 0, groups, acc, 3)
        np.testing.assert_array_equal(acc[3:], want)
        assert (acc[:3] == -9).all()


def test_gelu_layers_match_the_twin_closely():
    rng = np.random.default_rng(5)
    layers = _chain(rng, [60, 40, 30, 7], ["fp32"], ["gelu", "gelu", "none"])
    x = rng.standard_normal((4, 60)).astype(np.float32)
    np.testing.assert_allclose(w8a8.QLayout(layers).run(x), w8a8.reference(layers, x), rtol=1e-6, atol=1e-6)


def test_a_sample_with_nan_gets_nan_logits_and_the_others_are_untouched():
    rng = np.random.default_rng(1)
    layers = _chain(rng, [30, 20, 5], ["int8"], ["relu", "none"])
    x = rng.standard_normal((4, 30)).astype(np.float32)
    lay = w8a8.QLayout(layers)
    assert (lay.n_in, lay.n_out, lay.n_layers) == (30, 5, 2)
    clean = lay.run(x)
    x[1, 4] = np.nan
    x[3, 0] = -np.inf
    out = np.empty((4, 5), np.float32)
    for fn, ws in ((w8a8.forward_serial, lay.workspace(1)), (w8a8.forward, lay.workspace(2))):
        assert fn(x, out, ws, *lay.arrays) == 2  # how many samples were refused
        assert np.isnan(out[[1, 3]]).all()
        np.testing.assert_array_equal(out[[0, 2]], clean[[0, 2]])


def test_one_layer_and_the_widest_layer_supported():
    """A single linear layer (logistic regression), and a layer of ``MAX_IN`` = 32,766 inputs (docs/INFERENCE.md's
    limit: the panel form's int16 indices hold n_in) reading its last input (chunk 511: a chunk number above a
    byte)."""
    rng = np.random.default_rng(8)
    one = [make_layer(rng, 50, 3, 50, "int8", "none", np.int16, dense=True)]
    x = rng.standard_normal((3, 50)).astype(np.float32)
    np.testing.assert_array_equal(w8a8.QLayout(one).run(x), w8a8.reference(one, x))
    n = 32766  # the documented limit, not read from the module: a smaller MAX_IN would refuse this layer
    assert w8a8.MAX_IN == n
    wide = [{"n_in": n, "n_out": 2, "act": "none", "bias": None, "indices": np.array([[0, n - 1], [5, n - 2]], np.int32),
             "qvalues": np.array([[3, -7], [1, 2]], np.int8), "scale": np.ones(2, np.float32), "bits": 8}]
    x = rng.standard_normal((2, n)).astype(np.float32)
    for form in (0, 3):  # 64-byte chunks (chunk 511) and 128-byte ones (chunk 255)
        np.testing.assert_array_equal(w8a8.QLayout(wide, forms=[form]).run(x), w8a8.reference(wide, x))


def test_the_l2_size_comes_from_sysfs_or_a_default(monkeypatch):
    import glob

    assert 64 << 10 <= w8a8.l2_bytes() <= 1 << 30
    monkeypatch.setattr(glob, "glob", lambda pattern: [])  # no sysfs (another OS, a sandbox)
    assert w8a8.l2_bytes() == 1 << 20


def test_a_layer_too_wide_is_refused_clearly():
    spec = {"n_in": w8a8.MAX_IN + 1, "n_out": 1, "act": "none", "bias": None, "indices": np.zeros((1, 1), np.int32),
            "values": np.ones((1, 1), np.float32)}
    with pytest.raises(ValueError, match="activations='float32'"):
        w8a8.QLayout([spec])


# ------------------------------------------------------------------ through a Network
@pytest.fixture(scope="module")
def mlp():
    model = fanin.models.mlp([96, 64, 48, 10], sparsity=0.8, seed=0)
    model.eval()
    net = fanin.compile(model)
    return net, fanin.runtime.Network(fanin.runtime.quantize(net.plan, 8))


def _specs(net):
    from fanin.runtime.engine import _spec

    return [_spec(op) for op in net.plan["ops"]]


def test_a_network_with_int8_activations_computes_the_twin_and_stays_close_to_float(mlp):
    net, q8 = mlp
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 96)).astype(np.float32)
    for base in (net, q8):
        w = fanin.compile(base, activations="int8")
        assert w.activations == "int8" and w.info()["activations"] == "int8" and "int8 activations" in w.info()["engine"]
        y = w.predict(x)
        np.testing.assert_array_equal(y, w8a8.reference(_specs(base), x))
        ref = base.predict(x)
        assert np.abs(y - ref).max() <= 0.05 * np.abs(ref).max()
        assert (y.argmax(1) == ref.argmax(1)).mean() >= 0.9
    assert fanin.compile(net).activations == "float32"


def test_a_samples_logits_do_not_depend_on_its_batch(mlp):
    w = fanin.compile(mlp[1], activations="int8")
    x = np.random.default_rng(3).standard_normal((300, 96)).astype(np.float32)
    y = w.predict(x)  # large enough for the parallel driver when the tuner lets it
    for i in (0, 7, 150, 299):
        np.testing.assert_array_equal(w.predict(x[i]), y[i])
    np.testing.assert_array_equal(w.predict(x[:5]), y[:5])


def test_eight_threads_predicting_at_once_get_the_serial_results(mlp):
    w = fanin.compile(mlp[1], activations="int8")
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((b, 96)).astype(np.float32) for b in (1, 3, 40, 1, 64, 2, 1, 200)]
    want = [w.predict(x) for x in xs]
    got, errors = [None] * 8, []

    def work(i):
        try:
            for _ in range(20):
                got[i] = w.predict(xs[i])
                np.testing.assert_array_equal(got[i], want[i])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_bad_activations_and_the_nan_policies(mlp, tmp_path):
    net, q8 = mlp
    with pytest.raises(ValueError, match="activations must be one of"):
        fanin.compile(net, activations="int4")
    with pytest.raises(ValueError, match="CPU only"):
        fanin.load(tmp_path / "missing.fanin", activations="int8", device="cuda")
    with pytest.raises(ValueError, match="CPU only"):
        fanin.compile(q8, activations="int8").to("cuda")
    assert fanin.compile(q8, activations="int8").to("cpu").activations == "int8"
    x = np.zeros((2, 96), np.float32)
    x[1, 0] = np.inf
    with pytest.raises(PredictError, match="NaN or Inf"):
        fanin.compile(q8, activations="int8").predict(x)
    y = fanin.compile(q8, activations="int8", nan_policy="propagate").predict(x)
    assert np.isfinite(y[0]).all() and np.isnan(y[1]).all()
    path = tmp_path / "m.fanin"
    fanin.save(q8, path)
    loaded = fanin.load(path, activations="int8")
    np.testing.assert_array_equal(loaded.predict(x[:1]), fanin.compile(q8, activations="int8").predict(x[:1]))


def test_the_cli_predicts_and_describes_with_int8_activations(mlp, tmp_path, capsys):
    import json

    from fanin import cli

    q8 = mlp[1]
    path, xin, out = tmp_path / "m.fanin", tmp_path / "x.npy", tmp_path / "y.npy"
    fanin.save(q8, path)
    x = np.random.default_rng(6).standard_normal((3, 96)).astype(np.float32)
    np.save(xin, x)
    assert cli.main(["predict", str(path), str(xin), "--activations", "int8", "--out", str(out)]) == 0
    np.testing.assert_array_equal(np.load(out), fanin.compile(q8, activations="int8").predict(x))
    assert not np.array_equal(np.load(out), q8.predict(x))  # the float path differs (8-bit rounding)
    capsys.readouterr()
    assert cli.main(["info", str(path), "--json", "--activations", "int8"]) == 0
    assert json.loads(capsys.readouterr().out)["activations"] == "int8"
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", str(path), str(xin), "--activations", "int4"])
    assert exc.value.code == 2


def test_the_server_config_takes_the_activation_mode():
    from fanin.serve import ServeConfig

    assert ServeConfig(activations="int8").activations == "int8"
    with pytest.raises(ValueError, match="activations must be"):
        ServeConfig(activations="int4")


@njit
def _round_all(v, out):
    for i in range(v.shape[0]):
        out[i] = round_int32(v[i])


@SETTINGS
@given(st.lists(st.floats(-2.0**30, 2.0**30, allow_nan=False), min_size=1, max_size=64), st.integers(0, 2**32 - 1))
def test_round_int32_is_rint_then_int32(values, seed):
    """The quantizers' one-step rounding (``_intrinsics.round_int32``, ``llvm.lrint``) against NumPy: rint (ties to
    even) then int32, in a vectorised loop, for values within int32 -- exact halves included, of both signs."""
    rng = np.random.default_rng(seed)
    halves = rng.integers(-1000, 1000, 16) + 0.5
    v = np.concatenate([np.asarray(values, np.float64), halves, -halves, [0.5, 1.5, 2.5, -0.5, -1.5, -0.0]])
    out = np.zeros(v.shape[0], np.int32)
    _round_all(v, out)
    np.testing.assert_array_equal(out, np.rint(v).astype(np.int32))
