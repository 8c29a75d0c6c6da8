"""SRigL / RigL: hand-worked updates, invariants under random updates, distributions, bad input."""
import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fanin import Tensor, models, nn, ops, optim, sparsity
from fanin.sparsity import srigl_update


def hand_layer():
    """4 neurons x 6 inputs, fan-in 3 (sparsity 0.5, budget 12)."""
    w = np.zeros((4, 6), np.float32)
    w[0, [0, 1, 2]] = [0.9, 0.8, 0.1]
    w[1, [1, 3, 5]] = [0.7, 0.05, 0.02]
    w[2, [0, 2, 4]] = [0.01, 0.03, 0.04]
    w[3, [2, 3, 4]] = [0.6, 0.5, 0.4]
    return nn.FanInLinear.from_dense(w)


# |G| = |dy^T x| with x = identity: dy = G^T
G = np.array([
    [0.0, 0.0, 0.05, 0.9, 0.3, 0.0],
    [0.8, 0.0, 0.7, 0.0, 0.6, 0.0],
    [0.0, 0.01, 0.0, 0.0, 0.0, 0.02],
    [0.5, 0.4, 0.0, 0.0, 0.0, 0.35],
], np.float32)
X = np.eye(6, dtype=np.float32)
DY = np.ascontiguousarray(G.T)


def padded(pad):
    """The hand-worked layer, gradient and input with ``pad`` extra inputs of tiny gradient (never chosen)."""
    layer = hand_layer()
    if not pad:
        return layer, X, DY
    w = np.concatenate([layer.to_dense(), np.zeros((4, pad), np.float32)], axis=1)
    g = np.concatenate([G, 1e-4 * np.random.default_rng(0).random((4, pad), np.float32)], axis=1)
    return nn.FanInLinear.from_dense(w), np.eye(6 + pad, dtype=np.float32), np.ascontiguousarray(g.T)


@pytest.mark.parametrize("exact,pad", [(True, 0), (False, 0), (True, 300), (False, 300)])
def test_hand_worked_update(exact, pad):
    # pad 300: n_in - k = 303 > 32, so exact=False scores each neuron's 32 best free inputs only
    layer, x, dy = padded(pad)
    # drop fraction 0.5: n_ones 12, n_prune 6, n_keep 6.
    # keep (6 largest |W|): (0,0) (0,1) (1,1) (3,2) (3,3) (3,4)
    # grow-salient (6 largest |G|): (0,3) (1,0) (1,2) (1,4) (3,0) (3,1)
    # salient counts: [3, 4, 0, 5]; threshold max(1, floor(0.3*3)) = 1 -> neuron 2 ablated
    # k' = 12 // 3 = 4; grow: n0 +{3,4}, n1 +{0,2,4}, n3 +{0}
    idx, vals, active, src, info = srigl_update(layer, x, dy, budget=12, k0=3, frac=0.5, gamma_sal=0.3,
                                                ablation=True, exact=exact)
    assert info.exact is exact
    assert active.tolist() == [True, True, False, True]
    assert info.k_new == 4 and info.ablated == 1
    assert idx[0].tolist() == [0, 1, 3, 4]
    assert idx[1].tolist() == [0, 1, 2, 4]
    assert idx[3].tolist() == [0, 2, 3, 4]
    np.testing.assert_allclose(vals[0], [0.9, 0.8, 0, 0])
    np.testing.assert_allclose(vals[1], [0, 0.7, 0, 0])
    np.testing.assert_allclose(vals[3], [0, 0.6, 0.5, 0.4])
    assert np.all(vals[2] == 0)
    assert info.n_grow == 6 and info.n_prune == 6
    # src: kept connections come from their old slot, grown ones are new (-1)
    assert src[0].tolist() == [0, 1, -1, -1]
    assert src[1].tolist() == [-1, 0, -1, -1]
    assert src[3].tolist() == [-1, 0, 1, 2]
    assert np.all(src[2] == -1)


def test_hand_worked_minimum_active_guard():
    layer = hand_layer()
    # gamma_sal 1 with k0 5: threshold 5 would leave only neuron 3 (salience 5) active;
    # min_active = ceil(12 / 6) = 2 lowers the threshold to the 2nd largest count (4):
    # neurons 0 (3) and 2 (0) are ablated, k' = 12 // 2 = 6 = the dense fan-in.
    idx, vals, active, src, info = srigl_update(layer, X, DY, budget=12, k0=5, frac=0.5, gamma_sal=1.0,
                                                ablation=True, exact=True)
    assert active.tolist() == [False, True, False, True]
    assert info.k_new == 6
    assert idx[1].tolist() == list(range(6)) and idx[3].tolist() == list(range(6))
    # with neurons 0 and 2 ablated, the 6 largest |W| left are all of neurons 1 and 3: all kept
    np.testing.assert_allclose(vals[1], [0, 0.7, 0, 0.05, 0, 0.02])
    assert src[1].tolist() == [-1, 0, -1, 1, -1, 2]


def test_no_ablation_keeps_every_neuron_and_fanin():
    layer = hand_layer()
    idx, vals, active, src, info = srigl_update(layer, X, DY, budget=12, k0=3, frac=0.5, gamma_sal=0.3,
                                                ablation=False, exact=True)
    assert active.all() and info.k_new == 3
    # neuron 2 keeps nothing (its weights are the smallest) and regrows its 3 best: inputs 5, 1 then 0
    assert idx[2].tolist() == [0, 1, 5] and np.all(vals[2] == 0)


@settings(max_examples=30, deadline=None)
@given(n_out=st.integers(2, 12), n_in=st.integers(3, 30), s=st.floats(0.3, 0.9), frac=st.floats(0, 0.5),
       gamma=st.floats(0, 1), b=st.integers(1, 6), seed=st.integers(0, 9999), ablation=st.booleans(),
       exact=st.booleans())
def test_update_invariants(n_out, n_in, s, frac, gamma, b, seed, ablation, exact):
    budget = int(n_out * n_in * (1 - s))
    k0 = budget // n_out
    if k0 < 1:
        return
    rng = np.random.default_rng(seed)
    layer = nn.FanInLinear(n_in, n_out, k=k0, seed=seed)
    x = rng.standard_normal((b, n_in)).astype(np.float32)
    dy = rng.standard_normal((b, n_out)).astype(np.float32)
    for _ in range(3):  # several updates in a row, ablated neurons included
        idx, vals, active, src, info = srigl_update(layer, x, dy, budget, k0, frac, gamma, ablation, exact)
        k_new = idx.shape[1]
        assert 1 <= k_new <= n_in
        assert int(active.sum()) * k_new <= budget
        assert active.sum() >= min(n_out, math.ceil(budget / n_in))
        rows = idx[active]
        assert np.all(np.diff(rows, axis=1) > 0) and rows.min() >= 0 and rows.max() < n_in
        assert np.all(vals[~active] == 0)
        if not ablation:
            assert active.all()
        layer.set_connectivity(idx, vals + rng.standard_normal(vals.shape).astype(np.float32) * active[:, None],
                               active)


@pytest.mark.parametrize("n_in,n_out,sp,ablation", [(40, 16, 0.75, True), (300, 24, 0.97, True),
                                                     (300, 24, 0.97, False), (500, 8, 0.9, True)])
def test_exact_and_blockwise_scores_agree(n_in, n_out, sp, ablation):
    """exact=False scores each neuron's c = min(n_in - k, max(k0 + 16, 32)) best free inputs; with
    gradients spread over the neurons (no neuron needs more than c), the result is identical."""
    rng = np.random.default_rng(1)
    layer = nn.FanInLinear(n_in, n_out, sparsity=sp, seed=0)
    k0 = layer.k
    budget = n_out * k0
    x = rng.standard_normal((8, n_in)).astype(np.float32)
    dy = rng.standard_normal((8, n_out)).astype(np.float32)
    for frac in (0.3, 0.5):
        a = srigl_update(layer, x, dy, budget, k0, frac, 0.3, ablation, exact=True)
        b = srigl_update(layer, x, dy, budget, k0, frac, 0.3, ablation, exact=False)
        assert a[4].exact and not b[4].exact
        for u, v in zip(a[:4], b[:4]):
            np.testing.assert_array_equal(u, v)
        assert a[4] == dataclasses.replace(b[4], exact=True)
    assert n_in - k0 <= 32 or (a[3] < 0).sum() > 0


# --------------------------------------------------------------- distributions
def test_erk_meets_budget_and_favours_small_layers():
    shapes = [(1024, 784), (1024, 1024), (10, 1024)]
    dens = sparsity.layer_densities(shapes, 0.9, "erk")
    total = sum(math.prod(s) for s in shapes)
    assert sum(d * math.prod(s) for d, s in zip(dens, shapes)) == pytest.approx(0.1 * total)
    assert dens[2] > dens[0] > dens[1]
    assert all(0 < d <= 1 for d in dens)


def test_erk_caps_dense_layers_and_resolves():
    shapes = [(4, 3), (1000, 1000), (10, 1000)]
    dens = sparsity.layer_densities(shapes, 0.8, "erk")
    assert dens[0] == 1.0
    total = sum(math.prod(s) for s in shapes)
    assert sum(d * math.prod(s) for d, s in zip(dens, shapes)) == pytest.approx(0.2 * total)


def test_uniform_accounts_for_dense_first_layer():
    shapes = [(100, 100), (100, 100)]
    assert sparsity.layer_densities(shapes, 0.25, "uniform", dense=[0]) == [1.0, pytest.approx(0.5)]
    with pytest.raises(ValueError, match="too high"):
        sparsity.layer_densities(shapes, 0.6, "uniform", dense=[0])


@settings(max_examples=30, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=5),
       s=st.floats(0.05, 0.99), dist=st.sampled_from(["uniform", "erk"]))
def test_densities_meet_global_budget(shapes, s, dist):
    dens = sparsity.layer_densities(shapes, s, dist)
    total = sum(math.prod(sh) for sh in shapes)
    assert sum(d * math.prod(sh) for d, sh in zip(dens, shapes)) == pytest.approx((1 - s) * total, rel=1e-9)
    assert all(0 < d <= 1 + 1e-12 for d in dens)


def test_drop_fraction_schedule():
    assert sparsity.drop_fraction(0, 100, 0.3) == pytest.approx(0.3)
    assert sparsity.drop_fraction(50, 100, 0.3) == pytest.approx(0.15)
    assert sparsity.drop_fraction(100, 100, 0.3) == pytest.approx(0.0)


# ------------------------------------------------------------- training objects
def _train_steps(model, opt, updater, steps, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((64, 20)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    for _ in range(steps):
        loss = ops.cross_entropy(model(Tensor(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        updater.step()
    return loss.item()


def test_srigl_end_to_end_keeps_invariants_and_resizes_optimizer_state():
    # every layer condensed, the output layer too (uniform: 16 -> 8 at fan-in 3); gamma_sal 1 ablates
    # hidden neurons, and would ablate output neurons if the output layer were not exempt
    model = models.mlp([20, 32, 16, 8], sparsity=0.8, seed=0)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    srigl = sparsity.SRigL(model, opt, sparsity=0.8, distribution="uniform", delta_t=5, t_end=40, gamma_sal=1.0)
    out = model[-1]
    assert isinstance(out, nn.FanInLinear) and srigl.output_layer is out and out.k < out.n_in
    first = _train_steps(model, opt, srigl, 1)
    hidden_ablated = 0
    for _ in range(49):
        last = _train_steps(model, opt, srigl, 1)
        assert out.active.all()  # the output layer is never ablated
        hidden_ablated = max(hidden_ablated, sum(int((~m.active).sum()) for _, m in srigl.layers[:-1]))
        for (name, layer), budget in zip(srigl.layers, srigl.budgets):
            assert layer.k * int(layer.active.sum()) <= budget, name
            assert np.all(layer.values.data[~layer.active] == 0)
            mom = opt.state[layer.values]["momentum"]
            assert mom.shape == layer.values.shape and np.all(mom[~layer.active] == 0)
    assert last < first
    assert len(srigl.history) == 8  # updates at steps 5, 10, ..., 40
    assert hidden_ablated > 0  # so ablation did run: the output layer was spared, not skipped
    assert all(rec["layers"][-1]["ablated"] == 0 and rec["layers"][-1]["name"] == "4" for rec in srigl.history)
    assert any(rec["layers"][-1]["n_grow"] > 0 for rec in srigl.history)  # the output layer was updated


def test_rigl_masks_stay_at_budget_and_grown_weights_start_at_zero():
    model = models.mlp([20, 32, 2], seed=0)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rigl = sparsity.RigL(model, opt, sparsity=0.7, distribution="uniform", delta_t=3, t_end=30)
    counts = [int(m.sum()) for m in rigl.masks]
    _train_steps(model, opt, rigl, 20)
    assert [int(m.sum()) for m in rigl.masks] == counts
    for (_, layer), m in zip(rigl.layers, rigl.masks):
        assert np.all(layer.weight.data[~m] == 0)


def test_rigl_update_rule_by_hand():
    w = np.array([[0.9, 0.0, 0.1], [0.0, 0.5, 0.2]], np.float32)
    g = np.array([[0.0, 0.3, 0.0], [0.8, 0.0, 0.0]], np.float32)
    # 4 connections, drop fraction 0.5: keep 0.9 and 0.5, grow the 2 best others: (1,0) 0.8, (0,1) 0.3
    new, grown = sparsity.rigl_masks(w, g, w != 0, 0.5)
    assert new.tolist() == [[True, True, False], [True, True, False]]
    assert grown.tolist() == [[False, True, False], [True, False, False]]


def test_bad_arguments_name_the_problem():
    model = models.mlp([20, 8, 2], sparsity=0.5, seed=0)
    opt = optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"sparsity must be in \(0, 1\)"):
        sparsity.SRigL(model, opt, sparsity=1.0, t_end=10)
    with pytest.raises(ValueError, match="delta_t"):
        sparsity.SRigL(model, opt, sparsity=0.5, delta_t=0, t_end=10)
    with pytest.raises(ValueError, match="t_end must be >= 1"):
        sparsity.SRigL(model, opt, sparsity=0.5, t_end=0)
    assert sparsity.SRigL(model, opt, sparsity=0.5).t_end is None  # fit's plan() sets it (test below)
    other = optim.SGD(models.mlp([20, 8, 2], sparsity=0.5).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="does not hold the values of layer '0'"):
        sparsity.SRigL(model, other, sparsity=0.5, t_end=10)
    tiny = models.mlp([4, 3, 2], sparsity=0.5)
    with pytest.raises(ValueError, match="layer '0' would get fan-in 0"):
        sparsity.SRigL(tiny, optim.SGD(tiny.parameters(), lr=0.1), sparsity=0.9, distribution="uniform", t_end=10)
    tiny = models.mlp([4, 3, 2])  # RigL and static the same: a layer with no weight left is refused, not trained
    for static in (False, True):
        with pytest.raises(ValueError, match="layer '0' would keep no weight"):
            sparsity.RigL(tiny, optim.SGD(tiny.parameters(), lr=0.1), sparsity=0.95, distribution="uniform",
                          t_end=10, static=static)
    with pytest.raises(ValueError, match="no FanInLinear"):
        dense = models.mlp([4, 3, 2])
        sparsity.SRigL(dense, optim.SGD(dense.parameters(), lr=0.1), sparsity=0.5, t_end=10)


def test_output_layer_is_the_last_weight_layer_of_the_model():
    mlp = models.mlp([20, 8, 4], sparsity=0.5, seed=0)
    s1 = sparsity.SRigL(mlp, optim.SGD(mlp.parameters(), lr=0.1), sparsity=0.5, t_end=10)
    assert s1.output_layer is mlp[-1]
    cnn = models.cnn(channels=(4, 8), hidden=16, sparsity=0.5, seed=0)  # dense classifier after the sparse hidden
    s2 = sparsity.SRigL(cnn, optim.SGD(cnn.parameters(), lr=0.1), sparsity=0.5, t_end=10)
    assert s2.output_layer is None  # so the hidden FanInLinear may be ablated


def test_srigl_trains_a_sparse_cnn():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 1, 12, 12)).astype(np.float32)
    y = (x[:, 0, :6].mean(axis=(1, 2)) > 0).astype(np.int64)
    model = models.cnn(channels=(4, 8), hidden=16, num_classes=2, image_size=12, dropout=0, sparsity=0.7, seed=0)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    srigl = sparsity.SRigL(model, opt, sparsity=0.7, delta_t=3, t_end=20, gamma_sal=1.0)
    conv = [m for _, m in srigl.layers if isinstance(m, nn.FanInConv2d)][0]
    before = conv.indices.copy()
    losses, conv_ablated = [], 0
    for _ in range(21):
        loss = ops.cross_entropy(model(Tensor(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        srigl.step()
        losses.append(loss.item())
        conv_ablated = max(conv_ablated, int((~conv.active).sum()))
        for (name, layer), budget in zip(srigl.layers, srigl.budgets):
            assert layer.k * int(layer.active.sum()) <= budget, name
            rows = layer.indices[layer.active].astype(int)
            assert np.all(np.diff(rows, axis=1) > 0) and rows.min() >= 0 and rows.max() < layer.n_in
            assert np.all(layer.values.data[~layer.active] == 0)
            assert opt.state[layer.values]["momentum"].shape == layer.values.shape
    assert len(srigl.history) == 6 and losses[-1] < losses[0]
    assert conv_ablated > 0  # ablation fired in the convolution
    assert not np.array_equal(conv.indices, before) or conv.indices.shape != before.shape  # connectivity moved
    rec = [li for r in srigl.history for li in r["layers"] if li["name"] == srigl.layers[0][0]]
    assert any(li["ablated"] > 0 for li in rec) and all(li["k_new"] * 1 >= 1 for li in rec)


# ------------------------------------------------- contracts the mutation run found untested
def test_argument_boundaries_of_srigl_and_rigl():
    model = models.mlp([20, 8, 2], sparsity=0.5, seed=0)
    opt = optim.SGD(model.parameters(), lr=0.1)
    s = sparsity.SRigL(model, opt, sparsity=0.5, delta_t=1, t_end=1)  # the smallest valid values
    assert s.delta_t == 1 and s.t_end == 1
    assert sparsity.SRigL(model, opt, sparsity=0.5, total_steps=100).t_end == 75  # default: 75 % of the steps
    with pytest.raises(ValueError, match="alpha"):
        sparsity.SRigL(model, opt, sparsity=0.5, alpha=-0.5, t_end=10)
    for bad in (0.0, -0.5):
        with pytest.raises(ValueError, match=r"sparsity must be in \(0, 1\)"):
            sparsity.SRigL(model, opt, sparsity=bad, t_end=10)
    dense = models.mlp([20, 8, 2], seed=0)
    dopt = optim.SGD(dense.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="delta_t"):
        sparsity.RigL(dense, dopt, sparsity=0.5, delta_t=0.5, t_end=10)
    assert sparsity.RigL(dense, dopt, sparsity=0.5).t_end is None  # fit's plan() sets it
    assert sparsity.RigL(dense, dopt, sparsity=0.5, static=True).t_end == 1  # static needs no schedule
    assert sparsity.RigL(dense, dopt, sparsity=0.5, total_steps=100).t_end == 75
    other = optim.SGD(models.mlp([20, 8, 2], seed=1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="does not hold the weight of layer '0'"):
        sparsity.RigL(dense, other, sparsity=0.5, t_end=10)


def test_rigl_starts_exactly_at_budget():
    dense = models.mlp([50, 40, 10], seed=0)
    r = sparsity.RigL(dense, optim.SGD(dense.parameters(), lr=0.1), sparsity=0.9, distribution="uniform", t_end=10)
    for (_, layer), mask, d in zip(r.layers, r.masks, r.densities):
        assert int(mask.sum()) == int(layer.weight.size * d + 1e-6)  # drawn without replacement
        assert np.count_nonzero(layer.weight.data) == int(mask.sum())


def test_a_dense_condensed_layer_before_a_sparse_one_does_not_stop_the_update():
    from fanin import nn

    model = nn.Sequential(nn.FanInLinear(6, 5, k=6, seed=0), nn.ReLU(), nn.FanInLinear(5, 30, k=2, seed=1),
                          nn.ReLU(), nn.Linear(30, 2, seed=2))
    opt = optim.SGD(model.parameters(), lr=0.1)
    s = sparsity.SRigL(model, opt, sparsity=0.5, distribution="uniform", delta_t=1, t_end=5, dense_first=True)
    assert model[0].k == 6
    x = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    from fanin import Tensor, ops
    ops.cross_entropy(model(Tensor(x)), np.zeros(8, np.int64)).backward()
    opt.step()
    s.step()
    assert [entry["name"] for entry in s.history[-1]["layers"]] == ["2"]  # the dense first layer is skipped


def test_resized_layers_get_budget_and_fan_in_for_their_new_shape():
    model = models.mlp([30, 40, 20, 3], sparsity=0.7, seed=0)
    opt = optim.SGD(model.parameters(), lr=0.1)
    s = sparsity.SRigL(model, opt, sparsity=0.7, distribution="uniform", t_end=10)
    layer = model[2]
    layer.select_outputs(np.arange(20) < 13, [opt])
    s.resized(layer)
    i = [l for _, l in s.layers].index(layer)
    assert s.budgets[i] == int(13 * 40 * s.densities[i] + 1e-6)
    assert s.k0[i] == s.budgets[i] // 13 and s._shapes[i] == (13, 40)


def test_srigl_takes_whole_numbers_of_any_integer_type_for_delta_t():
    from fanin import models, optim, sparsity

    for dt in (np.int64(4), 4.0, np.float32(4.0)):
        model = models.mlp([8, 6, 3], sparsity=0.5, seed=0)
        opt = optim.SGD(model.parameters(), lr=0.1)
        sr = sparsity.SRigL(model, opt, sparsity=0.5, delta_t=dt, t_end=8)
        assert sr.delta_t == 4
    for bad in (2.5, 0, -1):
        model = models.mlp([8, 6, 3], sparsity=0.5, seed=0)
        with pytest.raises(ValueError, match="delta_t"):
            sparsity.SRigL(model, optim.SGD(model.parameters(), lr=0.1), sparsity=0.5, delta_t=bad, t_end=8)


# ------------------------------------------------- survivors of the 2026-11-26 sparsity mutation run
def test_rigl_keeps_the_largest_weights_of_the_mask_and_grows_the_best_gradients_outside_it():
    rng = np.random.default_rng(3)
    w = rng.uniform(0.1, 1.0, (12, 10)).astype(np.float32)
    mask = rng.random((12, 10)) < 0.5
    g = np.where(mask, 0.0, rng.uniform(0.1, 1.0, (12, 10))).astype(np.float32)  # gradient only outside the mask
    n_ones = int(mask.sum())
    n_prune = int(n_ones * 0.25)
    new, grown = sparsity.rigl_masks(np.where(mask, w, 0), g, mask, 0.25)
    kept_expected = np.zeros(w.size, bool)
    kept_expected[np.argsort(np.where(mask, w, -1).ravel())[::-1][:n_ones - n_prune]] = True
    grown_expected = np.zeros(w.size, bool)
    grown_expected[np.argsort(g.ravel())[::-1][:n_prune]] = True
    assert np.array_equal((new & mask).ravel(), kept_expected)  # no unmasked entry is "kept"
    assert np.array_equal(grown.ravel(), grown_expected)
    assert int(new.sum()) == n_ones


def test_update_counts_reactivated_neurons_only():
    # two rounds on the hand-worked layer: the first ablates neuron 2, the second (gradients that favour it) may
    # bring it back; in both, `reactivated` counts neurons that were inactive and are active now, nothing else
    layer = hand_layer()
    idx, vals, active, _, info = srigl_update(layer, X, DY, budget=12, k0=3, frac=0.5, gamma_sal=0.3, ablation=True)
    assert info.reactivated == 0 and info.ablated == 1  # every neuron was active before: none reactivated
    layer.set_connectivity(idx, vals, active)
    g2 = np.ones((4, 6), np.float32)
    idx, vals, active2, _, info2 = srigl_update(layer, X, np.ascontiguousarray(g2.T), budget=12, k0=3, frac=0.5,
                                                gamma_sal=0.3, ablation=False)
    assert active2.all()
    assert info2.reactivated == int((active2 & ~active).sum()) == 1


def test_gamma_sal_takes_the_closed_interval_and_rejects_negatives():
    model = models.mlp([20, 8, 2], sparsity=0.5, seed=0)
    opt = optim.SGD(model.parameters(), lr=0.1)
    for ok in (0.0, 1.0):
        assert sparsity.SRigL(model, opt, sparsity=0.5, gamma_sal=ok, t_end=10).gamma_sal == ok
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError, match="gamma_sal"):
            sparsity.SRigL(model, opt, sparsity=0.5, gamma_sal=bad, t_end=10)


def _step(model, opt, s, x, y, backwards=1):
    opt.zero_grad()
    for _ in range(backwards):
        ops.cross_entropy(model(Tensor(x)), y).backward()
    opt.step()
    s.step()


def _resize_case():
    """An SRigL-trained 30-40-20-3 MLP that updates every 2 steps, a batch, and the rng that made it."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 30)).astype(np.float32)
    y = rng.integers(0, 3, 16)
    model = models.mlp([30, 40, 20, 3], sparsity=0.7, seed=0)
    opt = optim.SGD(model.parameters(), lr=0.1)
    s = sparsity.SRigL(model, opt, sparsity=0.7, distribution="uniform", delta_t=2, t_end=10, gamma_sal=0.0)
    return rng, x, y, model, opt, s


def test_resized_drops_gradients_captured_for_the_old_shape_and_the_next_update_skips_only_that_layer():
    rng, x, y, model, opt, s = _resize_case()
    first, second = s.layers[0][1], s.layers[1][1]
    assert first.capture is None  # step 1 is not scored (delta_t 2)
    s.resized(first)  # nothing captured: nothing to drop, nothing to skip
    assert first.capture is None and not s._resized
    _step(model, opt, s, x, y)  # t = 1: capture armed for the step-2 update
    assert first.capture == []
    ops.cross_entropy(model(Tensor(x)), y).backward()  # step 2's backward captures (x, dy) in both layers
    assert len(first.capture) == 1 and len(second.capture) == 1
    first.select_outputs(np.arange(first.n_out) < 30, [opt])
    s.resized(first)
    assert first.capture == []  # the old-shape pair is gone
    first.capture = []
    before = second.indices.copy()
    opt.step()
    s.step()  # t = 2: update
    names = [li["name"] for li in s.history[-1]["layers"]]
    skipped = {"name": s.layers[0][0], "skipped": "resized since its gradients were captured"}
    assert s.history[-1]["layers"][0] == skipped
    assert names == [s.layers[0][0], s.layers[1][0], s.layers[2][0]]  # the later layers are still updated
    assert "k_new" in s.history[-1]["layers"][1] and not np.array_equal(second.indices, before)


def test_update_scores_only_the_last_grad_accumulation_batches(monkeypatch):
    from fanin.sparsity import srigl as srigl_module

    rng = np.random.default_rng(1)
    model = models.mlp([30, 40, 3], sparsity=0.7, seed=0)
    opt = optim.SGD(model.parameters(), lr=0.1)
    s = sparsity.SRigL(model, opt, sparsity=0.7, distribution="uniform", delta_t=3, t_end=10, grad_accumulation=2)
    seen = []
    real = srigl_module.srigl_update

    def spy(layer, x, dy, *args, **kw):
        seen.append(x.shape[0])
        return real(layer, x, dy, *args, **kw)

    monkeypatch.setattr(srigl_module, "srigl_update", spy)
    for _ in range(3):  # three backward passes per step of 8 rows each: captures pile up beyond 2
        _step(model, opt, s, rng.standard_normal((8, 30)).astype(np.float32), rng.integers(0, 3, 8), backwards=3)
    assert len(s.history) == 1
    assert seen == [16, 16]  # per layer: the last 2 captured batches, not all 6 captured since step 2


def test_a_sparsity_that_is_not_a_number_is_a_value_error_naming_it():
    from fanin.sparsity.distribution import check_sparsity

    for bad in (None, "ninety", [0.9], object()):
        with pytest.raises(ValueError, match=r"sparsity must be a number in \(0, 1\), got"):
            check_sparsity(bad)
    with pytest.raises(ValueError, match=r"density must be a number"):
        check_sparsity("x", what="density")
    assert check_sparsity("0.5") == 0.5 and check_sparsity(np.float32(0.25)) == 0.25


# ------------------------------------------------- survivors of the seed-1 sparsity sample (2026-11-26)
def test_status_reports_the_global_sparsity_ablations_and_fan_ins():
    model = models.mlp([30, 40, 20, 3], sparsity=0.7, seed=0)
    s = sparsity.SRigL(model, optim.SGD(model.parameters(), lr=0.1), sparsity=0.7, distribution="uniform", t_end=10)
    layer = s.layers[0][1]
    act = layer.active.copy()
    act[:3] = False  # three ablated neurons
    layer.set_connectivity(layer.indices, np.where(act[:, None], layer.values.data, 0), act)
    total = sum(l.n_out * l.n_in for _, l in s.layers)
    nnz = sum(l.k * int(l.active.sum()) for _, l in s.layers)
    st = s.status()
    assert st["sparsity"] == round(1 - nnz / total, 4)
    assert st["ablated"] == "3/0/0" and st["fan_in"] == "/".join(str(l.k) for _, l in s.layers)
    dense = models.mlp([30, 40, 20, 3], seed=0)
    r = sparsity.RigL(dense, optim.SGD(dense.parameters(), lr=0.1), sparsity=0.71, distribution="uniform", t_end=10)
    kept = sum(int(m.sum()) for m in r.masks)
    want = 1 - kept / sum(m.size for m in r.masks)  # 0.710194...: four decimals shown
    assert r.status()["sparsity"] == round(want, 4) == 0.7102


def test_rigl_regrows_the_full_budget_even_where_gradients_are_zero():
    rng = np.random.default_rng(2)
    w = rng.uniform(0.1, 1.0, (8, 10)).astype(np.float32)
    mask = rng.random((8, 10)) < 0.4
    for g in (np.zeros((8, 10), np.float32), np.where(mask, 1.0, 0.0).astype(np.float32)):
        new, grown = sparsity.rigl_masks(np.where(mask, w, 0), g, mask, 0.5)
        assert int(new.sum()) == int(mask.sum())  # kept entries never count as grown ones
        assert not np.any(grown & mask)


def test_a_short_row_from_the_selection_is_an_error_not_a_corrupt_layer(monkeypatch):
    from fanin.kernels import select

    real = select.assemble_rows

    def short(*args):
        new_idx, src, filled = real(*args)
        filled = filled.copy()
        filled[1] -= 1  # a bug in the merge would leave a row with a slot it did not fill
        return new_idx, src, filled

    monkeypatch.setattr(select, "assemble_rows", short)
    layer = hand_layer()
    with pytest.raises(RuntimeError, match="neuron 1 received"):
        srigl_update(layer, X, DY, budget=12, k0=3, frac=0.5, gamma_sal=0.3, ablation=False)


def test_a_resized_layer_that_captured_again_is_updated_not_skipped():
    rng, x, y, model, opt, s = _resize_case()
    first, second = s.layers[0][1], s.layers[1][1]
    _step(model, opt, s, x, y)  # t = 1: capture armed for the step-2 update
    first.select_outputs(np.arange(first.n_out) < 30, [opt])  # what self-compression does: 10 neurons go ...
    second.remove_inputs(np.arange(second.n_in) >= 30, rng, [opt])  # ... and so do their consumer's inputs
    s.resized(first)
    s.resized(second)
    before = first.indices.copy()
    _step(model, opt, s, x, y)  # t = 2: this step's backward captured the new shape; the update uses it
    rec = s.history[-1]["layers"][0]
    assert rec["name"] == s.layers[0][0] and "skipped" not in rec and "k_new" in rec
    assert first.indices.shape[0] == 30 and not np.array_equal(first.indices, before)


def test_a_state_without_captured_gradients_loads_and_delta_t_one_is_valid_for_rigl():
    model = models.mlp([30, 40, 3], sparsity=0.7, seed=0)
    s = sparsity.SRigL(model, optim.SGD(model.parameters(), lr=0.1), sparsity=0.7, delta_t=5, t_end=20)
    s.load_state_dict({"t": 3, "history": []})  # a state saved before captures were kept (or with none)
    assert s.t == 3 and all(layer.capture is None for _, layer in s.layers)
    s.load_state_dict({"t": 4, "history": [], "capture": None})
    assert s.t == 4 and all(layer.capture == [] for _, layer in s.layers)  # step 5 updates: armed again
    dense = models.mlp([30, 40, 3], seed=0)
    r = sparsity.RigL(dense, optim.SGD(dense.parameters(), lr=0.1), sparsity=0.7, delta_t=1, t_end=5)
    assert r.delta_t == 1


@pytest.mark.parametrize("cls", ["SRigL", "RigL"])
def test_an_updater_built_without_its_end_takes_it_from_fit_or_says_what_to_pass(cls):
    """ARCHITECTURE.md's call, SRigL(model, opt, ..., t_end=None) with no total_steps: fit() tells the updater the
    run's length (t_end = 75 % of it, as total_steps would); a loop of one's own that never says gets, at the first
    update, a message naming the three ways to say it - not a wrong schedule."""
    from fanin.train import fit

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 12)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)

    def build(**kw):
        model = models.mlp([12, 16, 2], sparsity=0.5 if cls == "SRigL" else None, seed=0)
        opt = optim.SGD(model.parameters(), lr=0.05)
        return model, opt, getattr(sparsity, cls)(model, opt, sparsity=0.5, delta_t=2, t_end=None, **kw)

    model, opt, upd = build()
    fit(model, opt, (x, y), epochs=2, batch_size=16, hooks=[upd], progress=False)
    model2, opt2, told = build(total_steps=8)
    fit(model2, opt2, (x, y), epochs=2, batch_size=16, hooks=[told], progress=False)
    assert upd.t_end == told.t_end == 6 and len(upd.history) == len(told.history) == 3
    np.testing.assert_array_equal(model[0].to_dense() if cls == "SRigL" else model[0].weight.data,
                                  model2[0].to_dense() if cls == "SRigL" else model2[0].weight.data)
    model, opt, upd = build()
    for _ in range(2):  # a loop of one's own: the first update (step 2) needs the end
        loss = ops.cross_entropy(model(Tensor(x[:16])), y[:16])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if _ == 0:
            upd.step()
    with pytest.raises(ValueError, match=r"last update step is unknown: pass t_end= or total_steps="):
        upd.step()
