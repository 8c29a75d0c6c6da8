"""The inference kernels (fanin.kernels.infer, fanin.kernels.lowbit) against a dense NumPy twin.

Every driver -- rows (batch-1 form) serial and parallel, panels serial and parallel, panels layer by layer,
the half-width panel drivers --
on random chains of layers: shapes, fan-ins (k = 1 .. n_in), dense layers, int16/int32 indices, float32 / int8 /
4-bit weights with real-valued per-row scales, none/relu/gelu, ablated rows, batches 1 .. 300. The drivers of one
form must agree bitwise (serial or parallel is a scheduling choice, not a numerical one).
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import special

from fanin.kernels import infer, lowbit

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------ the dense twin
def dense_weights(spec):
    """(n_out, n_in) float64: the weights the layer means (scale * q computed in float32, as the contract says)."""
    v = spec["values"] if "values" in spec else spec["scale"][:, None] * spec["qvalues"].astype(np.float32)
    w = np.zeros((spec["n_out"], spec["n_in"]), np.float64)
    if spec["indices"] is None:
        w[:] = v
    else:
        np.put_along_axis(w, spec["indices"].astype(np.int64), v.astype(np.float64), 1)
    if spec.get("active") is not None:
        w[~np.asarray(spec["active"])] = 0
    return w


def reference(layers, x):
    y = x.astype(np.float64)
    for spec in layers:
        y = y @ dense_weights(spec).T + (0 if spec["bias"] is None else spec["bias"].astype(np.float64))
        if spec["act"] == "relu":
            y = np.maximum(y, 0)
        elif spec["act"] == "gelu":
            y = y * 0.5 * (1 + special.erf(y / np.sqrt(2)))
    return y


def make_layer(rng, n_in, n_out, k, kind, act, idx_dtype, dense=False, dead=0, bias=True):
    spec = {"n_in": n_in, "n_out": n_out, "act": act,
            "bias": rng.uniform(-1, 1, n_out).astype(np.float32) if bias else None}
    if dense:
        spec["indices"], k = None, n_in
    else:
        spec["indices"] = np.sort(np.stack([rng.choice(n_in, k, replace=False) for _ in range(n_out)]), 1
                                  ).astype(idx_dtype)
    if kind == "fp32":
        spec["values"] = (rng.standard_normal((n_out, k)) / np.sqrt(k)).astype(np.float32)
    else:
        bits = 8 if kind == "int8" else 4
        lim = 1 << (bits - 1)
        spec.update(qvalues=rng.integers(-lim, lim, (n_out, k)).astype(np.int8), bits=bits,
                    scale=(rng.uniform(0.5, 1.5, n_out) / (lim * np.sqrt(k))).astype(np.float32))  # not powers of 2
    if dead and not dense:
        active = np.ones(n_out, bool)
        active[rng.choice(n_out, min(dead, n_out), replace=False)] = False
        spec["active"] = active
    return spec


def run_all(layout, x):
    return {p: infer.forward(layout, x, p) for p in infer.PATHS}


def check(layers, x, scatter=True):
    layout = infer.Layout(layers, scatter=scatter)
    want = reference(layers, x)
    outs = run_all(layout, x)
    scale = max(1.0, float(np.abs(want).max()))
    for path, y in outs.items():
        assert y.shape == want.shape and y.dtype == np.float32
        np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-4 * scale, err_msg=path)
    np.testing.assert_array_equal(outs["rows"], outs["rows_serial"])
    np.testing.assert_array_equal(outs["panels"], outs["panels_serial"])
    np.testing.assert_array_equal(outs["panels"], outs["layerwise"])
    np.testing.assert_array_equal(outs["panels"], outs["half_panels_serial"])  # a sample's sums: any panel width
    np.testing.assert_array_equal(outs["panels"], outs["half_layerwise"])
    np.testing.assert_array_equal(outs["panels"], outs["half_panels"])
    return outs


# ------------------------------------------------------------------ property tests
@st.composite
def chains(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    n_layers = draw(st.integers(1, 3))
    widths = [draw(st.integers(1, 70)) for _ in range(n_layers + 1)]
    layers = []
    for i in range(n_layers):
        n_in, n_out = widths[i], widths[i + 1]
        dense = draw(st.booleans()) and draw(st.booleans())  # a quarter dense
        k = draw(st.sampled_from([1, n_in, None]))
        k = draw(st.integers(1, n_in)) if k is None else k
        layers.append(make_layer(
            rng, n_in, n_out, k, draw(st.sampled_from(["fp32", "int8", "int4"])),
            draw(st.sampled_from(["none", "relu", "gelu"])), draw(st.sampled_from([np.int16, np.int32])),
            dense=dense, dead=draw(st.sampled_from([0, 0, 1, n_out])), bias=draw(st.booleans()) or i > 0))
    batch = draw(st.sampled_from([1, 2, 3, 7, 33, 300]))
    x = rng.standard_normal((batch, widths[0])).astype(np.float32)
    return layers, x


@SETTINGS
@given(chains(), st.booleans())
def test_every_driver_equals_the_dense_twin(case, scatter):
    layers, x = case
    check(layers, x, scatter)


@pytest.mark.parametrize("kind", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("zeros", [0.2, 0.5, 0.9, 1.0])
def test_relu_zeros_are_skipped_by_the_scatter_with_the_same_result(kind, zeros):
    """After a ReLU layer the rows form scatters the non-zero inputs' columns (from a share of zeros on)."""
    rng = np.random.default_rng(int(zeros * 10))
    first = make_layer(rng, 40, 300, 7, kind, "relu", np.int16)
    # biases that zero about `zeros` of the first layer's outputs
    first["bias"] = np.where(rng.random(300) < zeros, -100, 0).astype(np.float32)
    layers = [first, make_layer(rng, 300, 200, 30, kind, "relu", np.int16),
              make_layer(rng, 200, 70, 0, kind, "relu", None, dense=True),  # dense, wide enough for W^T
              make_layer(rng, 70, 9, 0, kind, "none", None, dense=True)]  # too narrow for W^T
    layout = infer.Layout(layers, scatter=True)
    assert list(layout.tab[:, infer.F_CSC]) == [infer.CSC_NONE, infer.CSC_SPARSE, infer.CSC_DENSE, infer.CSC_NONE]
    for batch in (1, 2, 3):
        check(layers, rng.standard_normal((batch, 40)).astype(np.float32))


@pytest.mark.parametrize("kind", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("batch", [1, 2, 7, 33, 300])
def test_mlp_shapes_fan_ins_and_index_dtypes(kind, batch):
    rng = np.random.default_rng(batch)
    layers = [make_layer(rng, 96, 80, 9, kind, "relu", np.int16),
              make_layer(rng, 80, 64, 80, kind, "gelu", np.int32),      # k = n_in
              make_layer(rng, 64, 40, 1, kind, "relu", np.int16, dead=5),  # k = 1, ablated rows
              make_layer(rng, 40, 10, 0, kind, "none", None, dense=True)]
    check(layers, rng.standard_normal((batch, 96)).astype(np.float32))


def test_wide_inputs_use_int32_indices_and_the_sentinel():
    rng = np.random.default_rng(0)
    for n_in, batch in ((32767, 2), (40000, 33)):  # 32767: the largest width whose sentinel still fits int16
        layers = [make_layer(rng, n_in, 20, 30, "fp32", "relu", np.int32),
                  make_layer(rng, 20, 3, 5, "int4", "none", np.int16)]
        layout = infer.Layout(layers)
        assert layout.tab[0, infer.F_IK] == (1 if n_in > 32767 else 0)
        check(layers, rng.standard_normal((batch, n_in)).astype(np.float32))


PANEL_PATHS = ("panels", "panels_serial", "layerwise", "half_panels_serial", "half_layerwise", "half_panels")


@SETTINGS
@given(chains(), st.sampled_from([0.0005, 0.004, 0.02, 0.08]))
def test_input_tiled_layers_give_the_untiled_bits(case, share):
    """Float32 condensed layers whose panel block overflows ``TILE_L1`` of L1 run chunk after chunk of their
    inputs (``Layout._tiled``, ``_tiled_rows``). Forced onto small layers here (a tiny share: 2 .. n_in
    chunks, whatever the fan-in), every panel driver must give exactly the bits of the untiled layout, and the
    dense twin's numbers, for any shape, fan-in, activation, index dtype, bias, ablated rows, and n_out % 4."""
    layers, x = case
    with pytest.MonkeyPatch.context() as m:
        m.setattr(infer, "TILE_L1", 1e9)
        plain = infer.Layout(layers)
        m.setattr(infer, "TILE_L1", share)
        m.setattr(infer, "TILE_MIN_SLOTS", 0)  # any fan-in: one slot a chunk or none
        tiled = infer.Layout(layers)
    for spec, row in zip(layers, tiled.tab):
        chunks = min(spec["n_in"], -(-(spec["n_in"] + 1) * infer.TB * 4 // int(share * infer.l1d_bytes())))
        eligible = spec["indices"] is not None and "values" in spec and spec["n_out"] >= 4 and chunks >= 2
        assert row[infer.F_TNC] == (chunks if eligible else 0)
    assert not plain.tab[:, infer.F_TNC].any()
    for path in PANEL_PATHS:
        np.testing.assert_array_equal(infer.forward(tiled, x, path), infer.forward(plain, x, path), err_msg=path)
    want = reference(layers, x)
    np.testing.assert_allclose(infer.forward(tiled, x, "panels"), want, rtol=2e-4,
                               atol=2e-4 * max(1.0, float(np.abs(want).max())))


def test_which_layers_are_tiled(monkeypatch):
    """``tile_chunks``: chunks of at most TILE_L1 of L1 (48 KiB here), at least two, at least TILE_MIN_SLOTS
    slots a row per chunk, both blocks within a third of L2 (2 MiB here), at least 4 rows."""
    monkeypatch.setattr(infer, "l1d_bytes", lambda: 48 << 10)
    monkeypatch.setattr(infer, "l2_bytes", lambda: 2 << 20)
    monkeypatch.setattr(infer, "TILE_L1", 0.92)
    monkeypatch.setattr(infer, "TILE_MIN_SLOTS", 8)
    tb = infer.TB
    per = int(0.92 * (48 << 10)) // (tb * 4)  # rows of a block in one chunk
    assert infer.tile_chunks(per - 1, 1024, 80) == 0  # one chunk: the block fits
    assert infer.tile_chunks(784, 1024, 80) == -(-785 // per) >= 2
    assert infer.tile_chunks(784, 3, 80) == 0  # fewer rows than a quad
    nc = infer.tile_chunks(784, 1024, 80)
    assert infer.tile_chunks(784, 1024, 8 * nc) == nc and infer.tile_chunks(784, 1024, 8 * nc - 1) == 0
    third = (2 << 20) // 3 // (tb * 4)  # rows of both blocks in a third of L2
    assert infer.tile_chunks(1024, third - 1025, 500) > 0 and infer.tile_chunks(1024, third - 1024, 500) == 0
    monkeypatch.setattr(infer, "l2_bytes", lambda: 1 << 30)
    assert infer.tile_chunks(4096, 4096, 409) == -(-4097 // per)


@pytest.mark.parametrize("act", ["relu", "none", "gelu"])
def test_tiled_layers_propagate_nan_as_untiled_ones(monkeypatch, act):
    """NaN in one input: the rows that read it give NaN (nan_policy='propagate'), through ReLU too, exactly where
    and as the untiled layout does."""
    rng = np.random.default_rng(5)
    layers = [make_layer(rng, 60, 23, 9, "fp32", act, np.int16), make_layer(rng, 23, 6, 4, "fp32", "none", np.int16)]
    x = rng.standard_normal((40, 60)).astype(np.float32)
    x[3:, 11] = np.nan
    plain = infer.Layout(layers)
    monkeypatch.setattr(infer, "TILE_L1", 0.01)
    monkeypatch.setattr(infer, "TILE_MIN_SLOTS", 0)
    tiled = infer.Layout(layers)
    assert tiled.tab[0, infer.F_TNC] >= 2 and tiled.tab[1, infer.F_TNC] >= 2
    reads = (layers[0]["indices"] == 11).any(axis=1)
    for path in PANEL_PATHS:
        y0 = infer.forward(tiled, x, path)
        np.testing.assert_array_equal(y0, infer.forward(plain, x, path), err_msg=path)
    y1 = infer.forward(infer.Layout(layers[:1]), x, "panels")  # the tiled first layer alone
    assert np.isnan(y1[3:, reads]).all() and np.isfinite(y1[:, ~reads]).all() and np.isfinite(y1[:3]).all()


def test_a_tiled_layer_with_int32_indices_gives_the_untiled_bits(monkeypatch):
    """A layer wider than int16 indices hold, tiled (its chunks then take int32 indices too): ablated rows, a
    padded last quad, NaN in one sample, every panel driver -- the untiled bits."""
    rng = np.random.default_rng(11)
    layers = [make_layer(rng, 33000, 13, 40, "fp32", "relu", np.int32, dead=2),
              make_layer(rng, 13, 3, 5, "fp32", "none", np.int16)]
    x = rng.standard_normal((40, 33000)).astype(np.float32)
    x[5, 123] = np.nan
    plain = infer.Layout(layers)
    monkeypatch.setattr(infer, "l2_bytes", lambda: 1 << 40)  # both blocks "fit": the rule would refuse 4 MiB
    monkeypatch.setattr(infer, "TILE_MIN_SLOTS", 0)
    tiled = infer.Layout(layers)
    assert tiled.tab[0, infer.F_IK] == 1 and tiled.tab[0, infer.F_TNC] >= 2
    for path in PANEL_PATHS:
        np.testing.assert_array_equal(infer.forward(tiled, x, path), infer.forward(plain, x, path), err_msg=path)


@pytest.mark.parametrize("path", PANEL_PATHS)
def test_panel_drivers_count_the_panels_whose_input_is_not_finite(path):
    """Each panel driver returns how many of its panels (TB samples, TBH for the half drivers) hold NaN or Inf
    in x (the engine's NaN policy rests on it), and computes the rest all the same."""
    rng = np.random.default_rng(7)
    layers = [make_layer(rng, 20, 12, 5, "fp32", "relu", np.int16), make_layer(rng, 12, 4, 3, "fp32", "none", np.int16)]
    lay = infer.Layout(layers)
    half = infer.TBH
    drivers = {"panels": (infer.panels_forward, lay.panels_workspace, infer.TB),
               "panels_serial": (infer.panels_forward_serial, lay.panels_workspace, infer.TB),
               "layerwise": (infer.panels_layerwise, lay.layerwise_workspace, infer.TB),
               "half_panels_serial": (infer.half_panels_serial, lambda b: lay.panels_workspace(b, half), half),
               "half_layerwise": (infer.half_layerwise, lambda b: lay.layerwise_workspace(b, half), half),
               "half_panels": (infer.half_panels, lambda b: lay.panels_workspace(b, half), half)}
    fn, workspace, width = drivers[path]
    B = 3 * width + 5
    x = rng.standard_normal((B, 20)).astype(np.float32)
    clean = infer.forward(lay, x, path)
    out = np.empty((B, 4), np.float32)
    assert fn(x, out, *workspace(B), *lay.arrays) == 0
    for rows, want in (([0], 1), ([width - 1, width], 2), ([B - 1], 1), ([1, 2, 2 * width + 1, B - 1], 3)):
        bad = x.copy()
        bad[rows, rows[0] % 20] = [np.nan, np.inf, -np.inf, np.nan][:len(rows)]
        assert fn(bad, out, *workspace(B), *lay.arrays) == want, rows
        keep = np.setdiff1d(np.arange(B), rows)
        np.testing.assert_array_equal(out[keep], clean[keep])


@pytest.mark.parametrize("seed", range(4))
def test_the_tiled_copy_holds_every_slot_once(monkeypatch, seed):
    """The tiled copy of a layer: the rows in quads (each row once, the last quad padded with its last row),
    each quad's slots chunk by chunk; every (row, input, weight) of an active row appears once, in its chunk and
    in the stored order, the padding reads the sentinel with weight 0, and ablated rows have no slots."""
    rng = np.random.default_rng(seed)
    n_in, n_out, k = 97, 4 * seed + 5 + (seed == 3), 13
    spec = make_layer(rng, n_in, n_out, k, "fp32", "relu", np.int16, dead=seed % 3)
    monkeypatch.setattr(infer, "TILE_L1", 0.05)
    monkeypatch.setattr(infer, "TILE_MIN_SLOTS", 0)
    lay = infer.Layout([spec])
    row = lay.tab[0]
    nc = int(row[infer.F_TNC])
    assert nc >= 2
    G = -(-n_out // 4)
    qs = lay.i32[row[infer.F_TQOFF]:row[infer.F_TQOFF] + G * nc + 1].astype(np.int64)
    perm = lay.i32[row[infer.F_TPOFF]:row[infer.F_TPOFF] + 4 * G].reshape(G, 4)
    ti = lay.i16[row[infer.F_TIOFF]:row[infer.F_TIOFF] + 4 * qs[-1]].reshape(-1, 4)
    tw = lay.f32[row[infer.F_TWOFF]:row[infer.F_TWOFF] + 4 * qs[-1]].reshape(-1, 4)
    assert qs[0] == 0 and (np.diff(qs) >= 0).all()
    assert sorted(set(perm.ravel())) == list(range(n_out)) and len(set(perm[:-1].ravel())) == 4 * (G - 1)
    span = -(-n_in // nc)
    active = spec.get("active", np.ones(n_out, bool))
    for g in range(G):
        for q in range(4):
            j = perm[g, q]
            got = []
            for c in range(nc):
                ix, wv = ti[qs[g * nc + c]:qs[g * nc + c + 1], q], tw[qs[g * nc + c]:qs[g * nc + c + 1], q]
                real = ix != n_in
                assert (wv[~real] == 0).all() and (ix[real] // span == c).all()
                got += list(zip(ix[real], wv[real]))
            want = list(zip(spec["indices"][j], spec["values"][j])) if active[j] else []
            assert got == want, (g, q, j)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(0, 9), st.sampled_from([0, 1, 2]), st.booleans(),
       st.sampled_from([np.int16, np.int32]))
def test_qchunk_is_four_fused_multiply_add_chains(seed, n, fin, first, idx_dtype):
    """``qchunk`` (one quad over one chunk) against its NumPy twin: four lanes, each the sum in slot order of
    w * block row (starting from 0 or the partial sums in dst), then + bias and ReLU as asked; the other rows of
    dst untouched."""
    from numba import njit

    TB = infer.TB  # a compile-time constant in ``call``, as qchunk needs

    @njit
    def call(src, dst, rows, idx, ie, w, we, n, first, fin, bias):  # first and fin: constants where qchunk is called
        d0, d1, d2, d3, b0, b1, b2, b3 = rows[0] * TB, rows[1] * TB, rows[2] * TB, rows[3] * TB, *bias
        if first and fin == 0:
            infer.qchunk(src, dst, d0, d1, d2, d3, idx, ie, w, we, n, 1, 0, b0, b1, b2, b3, TB)
        elif first and fin == 1:
            infer.qchunk(src, dst, d0, d1, d2, d3, idx, ie, w, we, n, 1, 1, b0, b1, b2, b3, TB)
        elif first:
            infer.qchunk(src, dst, d0, d1, d2, d3, idx, ie, w, we, n, 1, 2, b0, b1, b2, b3, TB)
        elif fin == 0:
            infer.qchunk(src, dst, d0, d1, d2, d3, idx, ie, w, we, n, 0, 0, b0, b1, b2, b3, TB)
        elif fin == 1:
            infer.qchunk(src, dst, d0, d1, d2, d3, idx, ie, w, we, n, 0, 1, b0, b1, b2, b3, TB)
        else:
            infer.qchunk(src, dst, d0, d1, d2, d3, idx, ie, w, we, n, 0, 2, b0, b1, b2, b3, TB)

    rng = np.random.default_rng(seed)
    n_in, n_out = 11, 9
    src = rng.standard_normal((n_in + 1) * TB).astype(np.float32)
    dst = rng.standard_normal(n_out * TB).astype(np.float32)
    rows = rng.choice(n_out, 4, replace=False)
    ie, we = int(rng.integers(0, 5)), int(rng.integers(0, 5))
    idx = rng.integers(0, n_in + 1, ie + 4 * n + 8).astype(idx_dtype)
    w = rng.standard_normal(we + 4 * n + 8).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    want = dst.astype(np.float64).reshape(n_out, TB).copy()
    for q, r in enumerate(rows):
        acc = np.zeros(TB) if first else want[r].copy()
        for t in range(n):
            acc += float(w[we + 4 * t + q]) * src[idx[ie + 4 * t + q] * TB:][:TB].astype(np.float64)
        if fin:
            acc += float(bias[q])
        want[r] = np.maximum(acc, 0) if fin == 2 else acc
    call(src, dst, rows, idx, ie, w, we, n, first, fin, (bias[0], bias[1], bias[2], bias[3]))
    np.testing.assert_allclose(dst.reshape(n_out, TB), want, rtol=1e-5, atol=1e-5)


def test_ablated_rows_output_their_bias_whatever_the_input():
    rng = np.random.default_rng(1)
    spec = make_layer(rng, 12, 6, 4, "fp32", "none", np.int16)
    spec["active"] = np.array([True, False, True, False, False, True])
    layout = infer.Layout([spec])
    x = rng.standard_normal((40, 12)).astype(np.float32)
    x[:, :] = np.nan
    for path in infer.PATHS:
        for b in (1, 3, 40):
            y = infer.forward(layout, x[:b], path)
            np.testing.assert_array_equal(y[:, ~spec["active"]], np.broadcast_to(spec["bias"][~spec["active"]], (b, 3)))
            assert np.isnan(y[:, spec["active"]]).all()


def test_nan_reaches_only_the_rows_that_read_it():
    rng = np.random.default_rng(2)
    spec = make_layer(rng, 30, 25, 3, "int8", "none", np.int16)
    layout = infer.Layout([spec])
    x = rng.standard_normal((35, 30)).astype(np.float32)
    x[:, 7] = np.nan
    reads = (spec["indices"] == 7).any(axis=1)
    for path in infer.PATHS:
        for b in (1, 35):
            y = infer.forward(layout, x[:b], path)
            assert np.isnan(y[:, reads]).all() and np.isfinite(y[:, ~reads]).all(), path


def test_every_kind_of_layer_in_one_chain_and_zero_inputs():
    rng = np.random.default_rng(3)
    layers = [make_layer(rng, 50, 48, 12, "int4", "relu", np.int16),
              make_layer(rng, 48, 47, 47, "int8", "relu", np.int32),
              make_layer(rng, 47, 33, 0, "int4", "gelu", None, dense=True),
              make_layer(rng, 33, 5, 2, "fp32", "none", np.int16)]
    check(layers, np.zeros((7, 50), np.float32))
    check(layers, rng.standard_normal((65, 50)).astype(np.float32))


# ------------------------------------------------------------------ pieces
@given(st.integers(1, 40), st.integers(1, 30), st.integers(0, 2**31 - 1))
@settings(max_examples=30, deadline=None)
def test_nibbles_round_trip_and_dequantize_exactly(n, half, seed):
    rng = np.random.default_rng(seed)
    kp = 2 * half
    q = rng.integers(-8, 8, (n, kp)).astype(np.int8)
    p = lowbit.pack_nibbles(q)
    assert p.shape == (n, half) and p.dtype == np.uint8
    np.testing.assert_array_equal(lowbit.unpack_nibbles(p), q)
    scale = rng.uniform(1e-3, 2, n).astype(np.float32)
    want = scale[:, None] * q.astype(np.float32)  # the contract: exactly these float32 products
    out = np.full(n * kp + 8, np.nan, np.float32)
    lowbit.dequantize_rows_int4(np.concatenate([p.reshape(-1), np.zeros(8, np.uint8)]), 0, scale, 0, 0, n, kp, out)
    np.testing.assert_array_equal(out[:n * kp].reshape(n, kp), want)
    out[:] = np.nan
    lowbit.dequantize_rows_int8(np.concatenate([q.reshape(-1), np.zeros(8, np.int8)]), 0, scale, 0, 0, n, kp, out)
    np.testing.assert_array_equal(out[:n * kp].reshape(n, kp), want)


def test_pack_nibbles_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        lowbit.pack_nibbles(np.array([[9, 0]], np.int8))
    with pytest.raises(ValueError, match="even"):
        lowbit.pack_nibbles(np.zeros((2, 3), np.int8))


def test_transpose8_tiles():
    from numba import njit

    @njit
    def tr(src, soff, ss, dst, doff, ds):
        infer.transpose8(src, soff, ss, dst, doff, ds)

    rng = np.random.default_rng(4)
    src = rng.standard_normal(13 * 11).astype(np.float32)
    dst = np.zeros(10 * 9 + 3, np.float32)
    tr(src, 3, 13, dst, 2, 10)  # rows of 13 from 3, into rows of 10 from 2
    np.testing.assert_array_equal(dst[2:2 + 80].reshape(8, 10)[:, :8], src[3:3 + 8 * 13].reshape(8, 13)[:, :8].T)


@pytest.mark.skipif("avx2" not in infer.target_features(), reason="the hardware gather is an AVX2 instruction")
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2 ** 32 - 1), st.sampled_from(["fp32", "int8", "int4"]), st.sampled_from([np.int16, np.int32]),
       st.integers(1, 12), st.integers(1, 700))
def test_hardware_and_inserted_gathers_give_the_same_bits(seed, kind, idx_dtype, slots8, n_in):
    """gdot's two gathers (HW_GATHER picks one per CPU) build the same vectors, so the same sums bit for bit:
    which one a machine runs never changes a result. Rows of 8..96 slots (both accumulators, the odd tail)."""
    from numba import njit

    @njit
    def both(x, idx, vals, vstride, scale, kp, n, a, b):
        for j in range(n):
            a[j] = infer.gdot_insert(x, 0, idx, j * kp, vals, j * vstride, scale[j], kp)
            b[j] = infer.gdot_hardware(x, 0, idx, j * kp, vals, j * vstride, scale[j], kp)

    rng = np.random.default_rng(seed)
    n, kp = 5, 8 * slots8
    idx = rng.integers(0, n_in, (n, kp)).astype(idx_dtype)
    x = rng.standard_normal(n_in).astype(np.float32)
    scale = rng.uniform(0.1, 1, n).astype(np.float32)
    if kind == "fp32":
        vals = rng.standard_normal((n, kp)).astype(np.float32)
    else:
        q = rng.integers(-8, 8, (n, kp)).astype(np.int8)
        vals = q if kind == "int8" else lowbit.pack_nibbles(q)
    flat = np.concatenate([vals.reshape(-1), np.zeros(infer.PAD, vals.dtype)])
    a, b = np.zeros(n, np.float32), np.ones(n, np.float32)
    both(x, np.concatenate([idx.reshape(-1), np.zeros(infer.PAD, idx_dtype)]), flat,
         kp // 2 if kind == "int4" else kp, scale, kp, n, a, b)
    np.testing.assert_array_equal(a.view(np.int32), b.view(np.int32))


@pytest.mark.parametrize("kind", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("idx_dtype", [np.int16, np.int32])
def test_gathered_dot_is_exact_to_rounding(kind, idx_dtype):
    from numba import njit

    @njit
    def dots(x, idx, vals, vstride, scale, kp, n, out):
        for j in range(n):
            out[j] = infer.gdot(x, 0, idx, j * kp, vals, j * vstride, scale[j], kp)

    rng = np.random.default_rng(5)
    n, kp, n_in = 9, 40, 300
    idx = rng.integers(0, n_in, (n, kp)).astype(idx_dtype)
    x = rng.standard_normal(n_in).astype(np.float32)
    scale = rng.uniform(0.1, 1, n).astype(np.float32)
    if kind == "fp32":
        vals = w = rng.standard_normal((n, kp)).astype(np.float32)
        scale[:] = 1
    else:
        q = rng.integers(-8, 8, (n, kp)).astype(np.int8)
        vals = q if kind == "int8" else lowbit.pack_nibbles(q)
        w = scale[:, None] * q.astype(np.float32)
    flat = np.concatenate([vals.reshape(-1), np.zeros(infer.PAD, vals.dtype)])
    out = np.zeros(n, np.float32)
    dots(x, np.concatenate([idx.reshape(-1), np.zeros(infer.PAD, idx_dtype)]), flat, kp // 2 if kind == "int4" else kp,
         scale, kp, n, out)
    np.testing.assert_allclose(out, (w.astype(np.float64) * x[idx]).sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("idx_dtype", [np.int16, np.int32])
@pytest.mark.parametrize("act", [infer.ACT_NONE, infer.ACT_RELU])
def test_eight_rows_at_once_equal_the_gathered_dot_bitwise(kind, idx_dtype, act):
    """gdot8 (rows of 8 slots, eight at a time, lane sums done together) = bias + gdot, then ReLU, per row --
    bitwise, NaN and the sign of zero included (serial and parallel drivers may split rows differently)."""
    from numba import njit

    @njit
    def by_row(x, idx, vals, vstride, scale, bias, act, n, out):
        for j in range(n):
            y = bias[j] + infer.gdot(x, 0, idx, j * 8, vals, j * vstride, scale[j], 8)
            out[j] = max(y, np.float32(0)) if act == 1 else y

    @njit
    def by_eight(x, idx, vals, vstride, scale, bias, act, n, out):
        for j in range(0, n, 8):
            infer.gdot8(x, 0, idx, j * 8, vals, j * vstride, vstride, scale, j, bias, act, out, j)

    rng = np.random.default_rng(11)
    n, n_in = 64, 200
    idx = rng.integers(0, n_in, (n, 8)).astype(idx_dtype)
    x = rng.standard_normal(n_in).astype(np.float32)
    x[3], x[4] = np.nan, -0.0
    idx[5] = 3        # row 5 reads the NaN
    idx[6] = 4        # row 6 reads -0.0 only, with bias -0.0: the signed zeros go through the same sums
    scale = rng.uniform(0.1, 1, n).astype(np.float32)
    bias = rng.uniform(-1, 1, n).astype(np.float32)
    bias[6] = -0.0
    if kind == "fp32":
        vals = rng.standard_normal((n, 8)).astype(np.float32)
    else:
        q = rng.integers(-8, 8, (n, 8)).astype(np.int8)
        vals = q if kind == "int8" else lowbit.pack_nibbles(q)
    vstride = 4 if kind == "int4" else 8
    flat = np.concatenate([vals.reshape(-1), np.zeros(infer.PAD, vals.dtype)])
    fidx = np.concatenate([idx.reshape(-1), np.zeros(infer.PAD, idx_dtype)])
    want, got = np.zeros(n, np.float32), np.ones(n, np.float32)
    by_row(x, fidx, flat, vstride, scale, bias, act, n, want)
    by_eight(x, fidx, flat, vstride, scale, bias, act, n, got)
    assert np.isnan(got[5])
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    w = vals if kind == "fp32" else scale[:, None] * q.astype(np.float32)
    ref = bias + (w.astype(np.float64) * x[idx]).sum(1)
    ref = np.maximum(ref, 0) if act == infer.ACT_RELU else ref
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-5, atol=1e-5)


@given(st.integers(0, 2**31 - 1), st.integers(1, 3000), st.sampled_from([None, np.nan, np.inf, -np.inf]))
@SETTINGS
def test_all_finite_is_numpys(seed, n, special):
    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore"):  # values past float32 become inf on purpose
        x = (rng.standard_normal(n) * 10.0 ** rng.integers(-40, 39, n)).astype(np.float32)  # subnormals to huge
    if special is not None:
        x[rng.integers(0, n)] = special
    assert infer.all_finite(x) == bool(np.isfinite(x).all())
    assert infer.all_finite(x.reshape(1, -1)) == bool(np.isfinite(x).all())


@pytest.mark.parametrize("bad", ["x", "idx", "scale", "bias", "dst"])
def test_eight_row_dot_refuses_other_array_types_when_compiling(bad):
    """gdot8 types only float32 x/scale/bias/dst and int16/int32 indices: anything else is a typing error at
    compile time, never code generated for the wrong element size."""
    from numba import njit
    from numba.core.errors import TypingError

    @njit
    def call(x, idx, vals, scale, bias, dst):
        infer.gdot8(x, 0, idx, 0, vals, 0, 8, scale, 0, bias, 0, dst, 0)

    args = {"x": np.zeros(16, np.float32), "idx": np.zeros(72, np.int16), "vals": np.zeros(72, np.float32),
            "scale": np.ones(8, np.float32), "bias": np.zeros(8, np.float32), "dst": np.zeros(8, np.float32)}
    call(*args.values())  # the right types compile
    args[bad] = args[bad].astype(np.float64 if bad != "idx" else np.int64)
    with pytest.raises(TypingError):
        call(*args.values())


AVX2_CHECK = r"""
import numpy as np
from fanin.kernels import infer
import test_infer_kernels as t
assert (infer.TB, infer.TBH) == (16, 8), (infer.TB, infer.TBH)
rng = np.random.default_rng(3)
layers = [t.make_layer(rng, 40, 33, 7, "fp32", "relu", np.int16), t.make_layer(rng, 33, 24, 5, "int8", "gelu", np.int32),
          t.make_layer(rng, 24, 17, 24, "int4", "relu", np.int16, dense=True),
          t.make_layer(rng, 17, 9, 8, "fp32", "none", np.int16, dead=2)]
for batch in (1, 5, 8, 9, 40):
    t.check(layers, rng.standard_normal((batch, 40)).astype(np.float32))
infer.TILE_L1, infer.TILE_MIN_SLOTS = 0.02, 0  # input-tiled layers (16-float vectors): the untiled bits
tiled, x = infer.Layout(layers), rng.standard_normal((40, 40)).astype(np.float32)
assert tiled.tab[0, infer.F_TNC] >= 2 and tiled.tab[3, infer.F_TNC] >= 2
infer.TILE_L1 = 1e9
plain = infer.Layout(layers)
for path in t.PANEL_PATHS:
    np.testing.assert_array_equal(infer.forward(tiled, x, path), infer.forward(plain, x, path))
from fanin.kernels import w8a8  # int8 activations: the portable integer kernel, the same bits
assert not w8a8.FAST
x = rng.standard_normal((6, 40)).astype(np.float32)
q = w8a8.QLayout(layers)
np.testing.assert_array_equal(q.run(x), w8a8.reference(layers, x))
np.testing.assert_array_equal(q.run(x, parallel=True), w8a8.reference(layers, x))
for forms in ([2, 3, 0, 1], [3, 1, 2, 0]):  # every step form through the portable driver
    np.testing.assert_array_equal(w8a8.QLayout(layers, forms=forms).run(x), w8a8.reference(layers, x))
for P in (32, 64):  # the panel form with the portable row kernel
    np.testing.assert_array_equal(q.run_panels(x, P), w8a8.reference(layers, x))
print("ok")
"""


def test_the_avx2_build_panels_of_16_and_half_panels_of_8(tmp_path):
    """On a machine without AVX-512 the panels are 16 samples wide and the half drivers 8, and int8 activations
    run the portable integer kernel: the same checks as above in a process whose Numba targets AVX2 (its own
    cache), so that build is tested on this one too."""
    import os
    import pathlib
    import subprocess
    import sys

    feats = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fxsr,+lzcnt,+mmx,+movbe,+popcnt,+sse,+sse2,"
             "+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,-avx512f")
    here = pathlib.Path(__file__).resolve().parent
    env = {**os.environ, "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": feats, "NUMBA_CACHE_DIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", AVX2_CHECK], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
