"""SRigL / RigL against an independent dense reference (tests/srigl_reference.py, SPEC.md §2).

``srigl_update`` must give exactly the reference's new connections, weights, active set and
``src`` mapping; the ``SRigL`` / ``RigL`` classes must apply it on schedule, from the right
gradients, and move (or reset) optimizer state with each connection.

Growth scores in the direct tests come from ``x = I``, ``dy = G^T`` (so ``dy^T x == G`` exactly) with
continuous random values: no ties, so tie-breaking conventions never decide a comparison (ties have
their own test).
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from srigl_reference import implementation_dense, layer_dense, rigl_reference, srigl_reference

from fanin import Tensor, models, nn, ops, optim, sparsity
from fanin.sparsity import srigl_update

KEYS = ("active", "held", "kept", "grown", "W")


def make_layer(n_out, n_in, k, rng, zero_frac=0.0, n_ablated=0):
    """A FanInLinear with random sorted indices, normal values (some exactly 0) and some ablated rows."""
    layer = nn.FanInLinear(n_in, n_out, k=k, seed=0)
    idx = np.stack([np.sort(rng.choice(n_in, k, replace=False)) for _ in range(n_out)])
    vals = rng.standard_normal((n_out, k)).astype(np.float32)
    vals[rng.random(vals.shape) < zero_frac] = 0  # e.g. connections grown at the last update
    active = np.ones(n_out, bool)
    active[rng.choice(n_out, min(n_ablated, n_out - 1), replace=False)] = False
    layer.set_connectivity(idx, vals, active)
    return layer


def gradient(rng, n_out, n_in, spread):
    """A continuous random |G| whose rows differ in scale by ~exp(spread) (concentrates growth)."""
    scale = np.exp(spread * rng.standard_normal((n_out, 1)))
    return (rng.standard_normal((n_out, n_in)) * scale).astype(np.float32)


def update_both(layer, G, budget, k0, frac, gamma, ablation, exact):
    """(reference, implementation, raw result) of one update of ``layer`` with gradient ``G``."""
    n_in = layer.n_in
    W, held = layer_dense(layer)
    ref = srigl_reference(W, held, G, budget, k0, frac, gamma, ablation)
    x = np.eye(n_in, dtype=np.float32)
    dy = np.ascontiguousarray(G.T)
    old_idx, old_vals = np.array(layer.indices), layer.values.data.copy()
    res = srigl_update(layer, x, dy, budget, k0, frac, gamma, ablation, exact=exact)
    imp = implementation_dense(old_idx, old_vals, res, n_in)
    return ref, imp, res


def assert_same(ref, imp, what=""):
    assert imp["k_new"] == ref["k_new"], what
    for key in KEYS:
        np.testing.assert_array_equal(imp[key], ref[key], err_msg=f"{what} {key}")


# ----------------------------------------------------------------------------------- srigl_update
@settings(max_examples=60, deadline=None)
@given(n_out=st.integers(2, 16), n_in=st.integers(2, 60), kf=st.floats(0.05, 1.0), frac=st.floats(0, 0.7),
       gamma=st.floats(0, 1), slack=st.floats(0.5, 1.0), ablation=st.booleans(), zero_frac=st.sampled_from([0, 0.4]),
       n_ablated=st.integers(0, 3), spread=st.sampled_from([0.0, 1.5]), seed=st.integers(0, 2**31))
def test_update_matches_dense_reference(n_out, n_in, kf, frac, gamma, slack, ablation, zero_frac, n_ablated,
                                        spread, seed):
    """Exact growth scores: identical to the dense reference, over two updates in a row
    (the second starts from the first's zero-valued grown weights and ablated neurons)."""
    rng = np.random.default_rng(seed)
    k0 = max(1, int(kf * n_in))
    budget = n_out * k0
    if ablation:  # a budget below n_out * k0 makes ablation's k' = budget // n_active vary more
        budget = max(n_out, int(budget * slack))
        k0 = budget // n_out
    layer = make_layer(n_out, n_in, k0, rng, zero_frac, n_ablated if ablation else 0)
    for step in range(2):
        G = gradient(rng, n_out, n_in, spread)
        ref, imp, res = update_both(layer, G, budget, k0, frac, gamma, ablation, exact=True)
        assert_same(ref, imp, f"update {step}")
        info = res[4]
        assert info.k_new == ref["k_new"] and info.n_grow == int(ref["grown"].sum())
        assert info.ablated == int((~ref["active"]).sum())
        layer.set_connectivity(res[0], res[1], res[2])


@settings(max_examples=40, deadline=None)
@given(n_out=st.integers(2, 20), k=st.integers(1, 16), extra=st.integers(33, 200), frac=st.floats(0, 0.6),
       gamma=st.floats(0, 1), ablation=st.booleans(), zero_frac=st.sampled_from([0, 0.5]),
       spread=st.sampled_from([0.0, 1.0, 3.0]), seed=st.integers(0, 2**31))
def test_truncated_candidates_match_reference(n_out, k, extra, frac, gamma, ablation, zero_frac, spread, seed):
    """n_in - k > 32, so exact=False first scores only each neuron's c best free inputs
    (c = min(n_in - k, max(k0 + 16, 32))) and widens the lists where they cannot hold everything the
    update needs (spread 3: gradients concentrated on a few neurons, which often need more): always
    the reference's result."""
    rng = np.random.default_rng(seed)
    n_in = k + extra
    budget = n_out * k
    layer = make_layer(n_out, n_in, k, rng, zero_frac, 2 if ablation else 0)
    G = gradient(rng, n_out, n_in, spread)
    ref, imp, res = update_both(layer, G, budget, k, frac, gamma, ablation, exact=False)
    assert res[4].exact is False
    assert_same(ref, imp)


def _heavy_regrowth_layer(n_in=300, k=10, seed=0):
    """4 neurons x 300 inputs, fan-in 10; neuron 0 has 3 weights and 7 zero-valued slots and by far
    the largest gradient (small on its held slots); with gamma_sal 1 the others are ablated, so
    neuron 0 alone takes the budget: k' = 40, and it keeps 3 and grows 37."""
    rng = np.random.default_rng(seed)
    n_out = 4
    idx = np.stack([np.sort(rng.choice(n_in, k, replace=False)) for _ in range(n_out)])
    vals = rng.uniform(0.5, 1, (n_out, k)).astype(np.float32)
    vals[0, 3:] = 0
    layer = nn.FanInLinear(n_in, n_out, k=k, seed=0)
    layer.set_connectivity(idx, vals, np.ones(n_out, bool))
    G = rng.uniform(0.0, 0.001, (n_out, n_in)).astype(np.float32)
    G[0] = rng.uniform(1, 2, n_in)
    G[0, idx[0]] = rng.uniform(0.01, 0.02, k)  # its pruned zero-valued slots score low
    return layer, G


def test_truncated_candidates_widen_when_a_neuron_regrows_more_than_listed():
    """A neuron that must regrow more than c = 32 connections is scored again with a wider list:
    2 of 40 neurons survive gamma_sal 1 and each grows 38 (no pruned slot of theirs to regrow)."""
    rng = np.random.default_rng(3)
    n_out, n_in, k = 40, 300, 2
    idx = np.stack([np.sort(rng.choice(n_in, k, replace=False)) for _ in range(n_out)])
    vals = np.zeros((n_out, k), np.float32)
    vals[:2] = rng.uniform(1, 2, (2, k))  # neurons 0 and 1: the largest weights and gradients
    vals[2:, 0] = rng.uniform(0.01, 0.02, n_out - 2)  # the others: one small weight each
    layer = nn.FanInLinear(n_in, n_out, k=k, seed=0)
    layer.set_connectivity(idx, vals, np.ones(n_out, bool))
    G = rng.uniform(0, 0.001, (n_out, n_in)).astype(np.float32)
    G[:2] = rng.uniform(1, 2, (2, n_in))
    ref, imp, res = update_both(layer, G, n_out * k, k, 0.5, 1.0, True, exact=False)
    assert ref["active"].sum() == 2 and ref["k_new"] == 40 and ref["kept"].sum() == 4  # 38 grown per neuron
    assert_same(ref, imp)
    assert_same(ref, update_both(layer, G, n_out * k, k, 0.5, 1.0, True, exact=True)[1])


def test_truncated_candidates_regrowth_needing_more_than_c_free_inputs():
    """Regression: the list was widened only when need > pruned slots + c, but the best `need` are
    among the pruned slots and the c best free inputs only when need <= c (here 37 > 32, with 7 pruned
    slots that score low: the truncated path regrew 5 of them instead of better free inputs)."""
    layer, G = _heavy_regrowth_layer()
    ref, exact, _ = update_both(layer, G, 40, 10, 0.5, 1.0, True, exact=True)
    assert ref["k_new"] == 40 and ref["kept"][0].sum() == 3  # needs 37 > c = 32, the 7 pruned slots score low
    assert_same(ref, exact)
    assert_same(ref, update_both(layer, G, 40, 10, 0.5, 1.0, True, exact=False)[1])


def test_truncated_candidates_salience_with_concentrated_gradient():
    """Regression: grow salience (the layer's n_prune best grow scores) taken over truncated lists let a
    neuron holding more than k + c of them spill salience onto others, which then escaped ablation:
    neuron 0 holds all 50, and neuron 1 (4 salient, threshold 5) must be ablated on both paths."""
    rng = np.random.default_rng(5)
    n_out, n_in, k = 10, 300, 10
    idx = np.stack([np.sort(rng.choice(n_in, k, replace=False)) for _ in range(n_out)])
    vals = rng.uniform(0.5, 1.5, (n_out, k)).astype(np.float32)
    vals[0] = rng.uniform(10, 11, k)
    vals[1, :4] = rng.uniform(5, 6, 4)  # neuron 1: 4 keep-salient weights, 1 short of gamma_sal * k = 5
    vals[1, 4:] = rng.uniform(0.001, 0.002, 6)
    layer = nn.FanInLinear(n_in, n_out, k=k, seed=0)
    layer.set_connectivity(idx, vals, np.ones(n_out, bool))
    G = rng.uniform(0, 0.01, (n_out, n_in)).astype(np.float32)
    G[0] = rng.uniform(100, 200, n_in)  # all 50 grow-salient connections are neuron 0's
    G[1] = rng.uniform(10, 20, n_in)  # the next best: neuron 1's
    ref, exact, _ = update_both(layer, G, 100, 10, 0.5, 0.5, True, exact=True)
    assert ref["salient"][1] == 4 and not ref["active"][1]
    assert_same(ref, exact)
    assert_same(ref, update_both(layer, G, 100, 10, 0.5, 0.5, True, exact=False)[1])


def test_ties_are_broken_deterministically():
    """All |W| and all |G| equal: the result is the same every time and for both score paths;
    ties keep the earliest connections (row-major) and every invariant holds."""
    n_out, n_in, k = 6, 50, 5
    rng = np.random.default_rng(0)
    layer = make_layer(n_out, n_in, k, rng)
    layer.set_connectivity(np.array(layer.indices), np.where(rng.random((n_out, k)) < 0.5, -1, 1).astype(np.float32),
                           np.ones(n_out, bool))
    x = np.eye(n_in, dtype=np.float32)
    dy = np.ones((n_in, n_out), np.float32)
    runs = [srigl_update(layer, x, dy, n_out * k, k, 0.5, 0.3, True, exact=e) for e in (True, True, False)]
    for r in runs[1:]:
        for a, b in zip(r[:4], runs[0][:4]):
            np.testing.assert_array_equal(a, b)
    idx, vals, active, src, info = runs[0]
    # n_keep = 15 of 30 equal weights: the first 15 in row-major order, all of neurons 0, 1, 2; the 15
    # grow-salient scores all fall in neuron 0: neurons 3-5 have no salient connection and are ablated
    assert active.tolist() == [True] * 3 + [False] * 3 and info.k_new == 10
    old = np.asarray(layer.indices)
    for j in range(3):
        assert np.array_equal(np.sort(idx[j][src[j] >= 0]), old[j])  # every weight kept
        free = np.setdiff1d(np.arange(n_in), old[j])
        assert np.array_equal(idx[j][src[j] < 0], free[:5])  # equal grow scores: the lowest free inputs
    assert np.all(vals[3:] == 0) and np.all(src[3:] == -1)


def test_salience_threshold_boundary_keeps_neurons_at_the_threshold():
    """floor(gamma_sal * k0) = 2: a neuron with salient count 2 stays, one with 1 is ablated
    (min_active = ceil(9 / 10) = 1, so the guard does not interfere)."""
    w = np.zeros((3, 10), np.float32)
    w[0, [0, 1, 2]] = [0.9, 0.8, 0.7]
    w[1, [0, 1, 2]] = [0.6, 0.05, 0.04]
    w[2, [0, 1, 2]] = [0.5, 0.03, 0.02]
    layer = nn.FanInLinear.from_dense(w)
    G = 1e-3 * np.arange(1, 31, dtype=np.float32).reshape(3, 10)[::-1]  # neuron 0 has the largest gradient
    # n_ones 9, n_prune 3, n_keep 6: keep-salient 0.9 0.8 0.7 | 0.6 0.05 | 0.5; grow-salient: neuron 0's inputs 7-9
    ref, imp, _ = update_both(layer, np.ascontiguousarray(G), 9, 3, 0.34, 0.7, True, exact=True)
    assert ref["salient"].tolist() == [6, 2, 1]
    assert ref["active"].tolist() == [True, True, False] and ref["k_new"] == 4
    assert_same(ref, imp)


# ------------------------------------------------------------------------------------ SRigL class
def _snapshot(srigl):
    out = []
    for _, layer in srigl.layers:
        W, held = layer_dense(layer)
        state = {n: a.copy() for n, a in srigl.optimizer.state.get(layer.values, {}).items()}
        cap = [(np.array(a), np.array(b)) for a, b in layer.capture] if layer.capture else []
        out.append({"W": W, "held": held, "idx": np.array(layer.indices, np.int64), "active": layer.active.copy(),
                    "state": state, "capture": cap})
    return out


def _dense_state(state, idx, active, n_in):
    dense = np.zeros((idx.shape[0], n_in))
    rows = np.flatnonzero(active)
    dense[rows[:, None], np.asarray(idx, np.int64)[rows]] = state[rows]
    return dense


def _check_update(srigl, snap, output_layer, alpha, t_end, accumulation, gamma):
    """The update just done equals the reference's, layer by layer, with optimizer state moved."""
    t = srigl.t
    frac = alpha / 2 * (1 + math.cos(math.pi * t / t_end))
    record = srigl.history[-1]
    assert record["step"] == t and record["drop_fraction"] == pytest.approx(frac, abs=1e-12)
    ablated_any = False
    for (name, layer), before, budget, k0 in zip(srigl.layers, snap, srigl.budgets, srigl.k0):
        # the last `accumulation` backward passes, and only those, were captured
        assert len(before["capture"]) == accumulation, name
        x = np.concatenate([a for a, _ in before["capture"]]).astype(np.float32)
        dy = np.concatenate([b for _, b in before["capture"]]).astype(np.float32)
        G = np.ascontiguousarray(dy.T) @ x  # the same float32 product the implementation scores
        # ablated inputs give all-zero gradient columns: ties, which the implementation gives to a neuron's slots
        slots = np.zeros(before["held"].shape, bool)
        slots[np.arange(slots.shape[0])[:, None], before["idx"]] = True
        ref = srigl_reference(before["W"], before["held"], G, budget, k0, frac, gamma, layer is not output_layer,
                              first=slots)
        W, held = layer_dense(layer)
        np.testing.assert_array_equal(layer.active, ref["active"], err_msg=name)
        np.testing.assert_array_equal(held, ref["held"], err_msg=name)
        np.testing.assert_array_equal(W, ref["W"], err_msg=name)  # kept weights unchanged, grown ones 0
        assert layer.capture is None  # captured pairs are dropped after use
        assert before["state"], "the optimizer holds no state for this layer yet"
        st = srigl.optimizer.state[layer.values]
        assert st.keys() == before["state"].keys()
        for s_name, old in before["state"].items():
            assert np.any(old != 0)
            new = st[s_name]
            assert new.shape == layer.values.shape, (name, s_name)
            want = np.where(ref["kept"], _dense_state(old, before["idx"], before["active"], layer.n_in), 0)
            got = _dense_state(new, np.asarray(layer.indices, np.int64), layer.active, layer.n_in)
            np.testing.assert_array_equal(got, want, err_msg=f"{name} {s_name}")
            assert np.all(new[~layer.active] == 0)
        ablated_any |= not layer.active.all()
    return ablated_any


def _batches(rng, n_in, n_classes, steps, batch=16):
    for _ in range(steps):
        x = rng.standard_normal((batch, n_in)).astype(np.float32)
        yield x, (x[:, 0] + x[:, 1] > 0).astype(np.int64) % n_classes


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_srigl_class_updates_match_reference_and_move_optimizer_state(opt_name):
    """An MLP whose output layer is condensed too (and would be ablated if it were not exempt), two
    accumulated batches per update, ablation firing: every update equals the reference's."""
    model = models.mlp([12, 40, 24, 6], sparsity=0.75, seed=0)
    opt = (optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if opt_name == "sgd"
           else optim.Adam(model.parameters(), lr=0.01))
    alpha, t_end, delta_t, gamma = 0.4, 15, 3, 1.0
    srigl = sparsity.SRigL(model, opt, sparsity=0.75, distribution="uniform", delta_t=delta_t, alpha=alpha,
                           t_end=t_end, gamma_sal=gamma, grad_accumulation=2, seed=1)
    output_layer = model[-1]
    assert isinstance(output_layer, nn.FanInLinear) and output_layer.k < output_layer.n_in
    rng = np.random.default_rng(0)
    updates, ablated_any = [], False
    for t, (x, y) in enumerate(_batches(rng, 12, 6, 20), start=1):
        loss = ops.cross_entropy(model(Tensor(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        snap = _snapshot(srigl)
        before = len(srigl.history)
        srigl.step()
        assert srigl.t == t
        if len(srigl.history) > before:
            updates.append(t)
            ablated_any |= _check_update(srigl, snap, output_layer, alpha, t_end, 2, gamma)
        assert output_layer.active.all()
        # capture is armed only for the 2 steps before an update
        nxt = -(-(t + 1) // delta_t) * delta_t
        armed = nxt <= t_end and nxt - (t + 1) < 2
        assert all((layer.capture is not None) == armed for _, layer in srigl.layers), t
    assert updates == [3, 6, 9, 12, 15]
    assert ablated_any  # the hidden layers did ablate, so the exemption was tested


def test_srigl_class_on_a_cnn_ablates_channels_and_matches_reference():
    """Conv and hidden linear layers (the classifier is dense, so both may ablate): ablation fires in
    the convolution, every update equals the reference, and ablated channels stay empty in training."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 1, 8, 8)).astype(np.float32)
    y = (x[:, 0, :4].mean(axis=(1, 2)) > 0).astype(np.int64)
    model = models.cnn(channels=(4, 8), hidden=12, num_classes=2, image_size=8, sparsity=0.7, seed=0)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    srigl = sparsity.SRigL(model, opt, sparsity=0.7, delta_t=2, t_end=8, gamma_sal=1.0, alpha=0.5)
    conv = [m for _, m in srigl.layers if isinstance(m, nn.FanInConv2d)][0]
    assert srigl.output_layer is None
    conv_ablated = 0
    for _ in range(10):
        loss = ops.cross_entropy(model(Tensor(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for (_, layer) in srigl.layers:  # an optimizer step never revives an ablated neuron's weights
            assert np.all(layer.values.data[~layer.active] == 0)
        snap = _snapshot(srigl)
        before = len(srigl.history)
        srigl.step()
        if len(srigl.history) > before:
            _check_update(srigl, snap, None, 0.5, 8, 1, 1.0)
            conv_ablated = max(conv_ablated, int((~conv.active).sum()))
        for (name, layer), budget in zip(srigl.layers, srigl.budgets):
            assert layer.k * int(layer.active.sum()) <= budget, name
            rows = np.asarray(layer.indices)[layer.active].astype(int)
            assert np.all(np.diff(rows, axis=1) > 0) and rows.max() < layer.n_in
    assert len(srigl.history) == 4 and conv_ablated > 0
    # an ablated channel outputs nothing (no bias): its conv output is exactly 0
    out = conv(Tensor(rng.standard_normal((2, 4, 4, 4)).astype(np.float32))).data
    assert np.all(out[:, ~conv.active] == 0) and np.any(out[:, conv.active] != 0)


def test_srigl_schedule_and_drop_fraction():
    """Updates at multiples of delta_t up to and including t_end, none after; drop fractions follow
    alpha/2 (1 + cos(pi t / t_end)); no capture is kept after the last update."""
    model = models.mlp([10, 16, 4], sparsity=0.5, seed=0)
    opt = optim.SGD(model.parameters(), lr=0.01)
    srigl = sparsity.SRigL(model, opt, sparsity=0.5, delta_t=4, t_end=12, alpha=0.3, ablation=False)
    rng = np.random.default_rng(0)
    for x, y in _batches(rng, 10, 4, 22):
        loss = ops.cross_entropy(model(Tensor(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        srigl.step()
        if srigl.t >= 12:
            assert all(layer.capture is None for _, layer in srigl.layers)
    steps = [r["step"] for r in srigl.history]
    assert steps == [4, 8, 12]
    fracs = [r["drop_fraction"] for r in srigl.history]
    assert fracs == pytest.approx([0.15 * (1 + math.cos(math.pi * t / 12)) for t in steps], abs=1e-12)
    assert fracs[-1] == pytest.approx(0, abs=1e-12) and sparsity.drop_fraction(6, 12, 0.3) == pytest.approx(0.15)
    assert all(li["n_grow"] > 0 for li in srigl.history[0]["layers"])


# ----------------------------------------------------------------------------------------- RigL
@settings(max_examples=40, deadline=None)
@given(n_out=st.integers(1, 12), n_in=st.integers(1, 40), density=st.floats(0.05, 1.0), frac=st.floats(0, 0.7),
       zero_frac=st.sampled_from([0, 0.5]), seed=st.integers(0, 2**31))
def test_rigl_masks_match_reference(n_out, n_in, density, frac, zero_frac, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((n_out, n_in)) < density
    W = np.where(mask & (rng.random(mask.shape) >= zero_frac), rng.standard_normal(mask.shape), 0).astype(np.float32)
    W += np.where(mask, 0, rng.standard_normal(mask.shape)).astype(np.float32)  # off-mask values are ignored
    G = rng.standard_normal(mask.shape).astype(np.float32)
    new, grown = sparsity.rigl_masks(W, G, mask, frac)
    ref_new, keep, _ = rigl_reference(W * mask, mask, G, frac)
    np.testing.assert_array_equal(new, ref_new)
    np.testing.assert_array_equal(grown, ref_new & ~mask)
    assert new.sum() == mask.sum()
    assert not (keep & ~new).any()


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_rigl_class_uses_accumulated_gradients_and_resets_state(opt_name):
    """Each update is the reference's (scores: the sum of the last 2 gradients); grown weights start
    at 0; optimizer state is zeroed where pruned or grown and untouched where kept; masks keep size."""
    model = models.mlp([12, 20, 4], seed=0)
    opt = (optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if opt_name == "sgd"
           else optim.Adam(model.parameters(), lr=0.01))
    rigl = sparsity.RigL(model, opt, sparsity=0.7, distribution="uniform", delta_t=3, t_end=9, alpha=0.5,
                         grad_accumulation=2)
    sizes = [int(m.sum()) for m in rigl.masks]
    rng = np.random.default_rng(0)
    grads = []
    for t, (x, y) in enumerate(_batches(rng, 12, 4, 12), start=1):
        loss = ops.cross_entropy(model(Tensor(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        grads.append([layer.weight.grad.copy() for _, layer in rigl.layers])
        before = [(layer.weight.data.copy(), m.copy(), {n: a.copy() for n, a in opt.state[layer.weight].items()})
                  for (_, layer), m in zip(rigl.layers, rigl.masks)]
        n_hist = len(rigl.history)
        rigl.step()
        if len(rigl.history) == n_hist:
            continue
        frac = 0.25 * (1 + math.cos(math.pi * t / 9))
        for i, ((_, layer), (W, mask, state)) in enumerate(zip(rigl.layers, before)):
            G = grads[-2][i] + grads[-1][i]
            new, keep, _ = rigl_reference(W * mask, mask, G, frac)
            grown = new & ~mask  # a connection pruned and regrown keeps its weight (RigL's default)
            np.testing.assert_array_equal(rigl.masks[i], new)
            np.testing.assert_array_equal(layer.weight.data, np.where(new & ~grown, W, 0))
            for name, old in state.items():
                np.testing.assert_array_equal(opt.state[layer.weight][name], np.where(new & ~grown, old, 0),
                                              err_msg=name)
            assert rigl.history[-1]["layers"][i]["n_grow"] == int(grown.sum())
        assert [int(m.sum()) for m in rigl.masks] == sizes
    assert [r["step"] for r in rigl.history] == [3, 6, 9]
