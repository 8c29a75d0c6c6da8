"""The core's soundness (issue 10): immutable validated topology, the debug switch, per-thread grad
mode and strict optimizer state. Each of the first tests reproduces a way the core used to give
wrong numbers without an error."""
import threading

import numpy as np
import pytest

import fanin
from fanin import Tensor, kernels, nn, no_grad, ops, optim
from fanin.kernels import Topology


@pytest.fixture
def debug_on():
    before = kernels.debug()
    kernels.debug(True)
    yield
    kernels.debug(before)


def _layer(seed=0, n_in=40, n_out=12, k=6):
    return nn.FanInLinear(n_in, n_out, k=k, seed=seed)


# ------------------------------------------------------------------ topology is a value
@pytest.mark.parametrize("value", [10000, 3])
def test_in_place_edit_of_indices_is_refused(value):
    layer = _layer()
    before = layer.indices.copy()
    with pytest.raises(ValueError, match="read-only"):
        layer.indices[0, 0] = value  # out of range (was accepted and read out of bounds) or in range (stale dx)
    with pytest.raises(ValueError, match="read-only"):
        layer.active[0] = False
    with pytest.raises(ValueError, match="WRITEABLE"):
        layer.indices.setflags(write=True)  # no way back to a writable array
    with pytest.raises(AttributeError, match="set_connectivity"):
        layer.indices = before
    np.testing.assert_array_equal(layer.indices, before)


def test_the_derived_structure_is_read_only_too():
    layer = _layer()
    for a in (*layer.transposed(), layer.topology.row_ptr()):
        assert not a.flags.writeable
        with pytest.raises(ValueError):
            a[0] = 1


@pytest.mark.parametrize("edit, match", [
    (lambda i: i.__setitem__((0, 0), 40), r"outside \[0, 40\)"),
    (lambda i: i.__setitem__((0, 0), -1), r"outside \[0, 40\)"),
    (lambda i: i.__setitem__((1, 1), i[1, 0]), "repeats"),
    (lambda i: i.__setitem__((2, slice(None)), i[2, ::-1].copy()), "out of order"),
])
def test_set_connectivity_validates(edit, match):
    layer = _layer()
    idx = layer.indices.copy()
    edit(idx)
    with pytest.raises(ValueError, match=match):
        layer.set_connectivity(idx, layer.values.data, layer.active)
    with pytest.raises(ValueError, match="must both be"):
        layer.set_connectivity(layer.indices, layer.values.data[:, :3], layer.active)
    with pytest.raises(TypeError, match="integers"):
        layer.set_connectivity(layer.indices.astype(float), layer.values.data, layer.active)


def test_a_new_topology_gets_a_new_version_and_its_own_transposed_structure():
    rng = np.random.default_rng(0)
    layer = _layer()
    v0, t0 = layer.topology.version, layer.transposed()
    assert layer.transposed() is t0  # built once per topology
    x = Tensor(rng.standard_normal((3, 40)).astype(np.float32), requires_grad=True)
    idx = np.sort(rng.permuted(np.tile(np.arange(40), (12, 1)), axis=1)[:, :6], axis=1)
    vals = rng.standard_normal((12, 6)).astype(np.float32)
    layer.set_connectivity(idx, vals)
    assert layer.topology.version > v0 and layer.transposed() is not t0
    assert layer.topology.same_as(Topology(idx, 40))
    layer(x).sum().backward()  # dx must follow the new indices (a stale cache gave errors of 0.29)
    np.testing.assert_allclose(x.grad, np.ones((3, 12), np.float32) @ layer.to_dense(), rtol=1e-5, atol=1e-6)


def test_kernels_trust_a_topology_but_check_its_width():
    rng = np.random.default_rng(1)
    topo = Topology(np.array([[0, 5], [1, 2]]), 6)
    assert topo.indices.dtype == np.int16
    vals = rng.standard_normal((2, 2)).astype(np.float32)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    np.testing.assert_allclose(kernels.fanin_forward(x, topo, vals),
                               kernels.fanin_forward(x, topo.indices, vals), rtol=1e-6)
    with pytest.raises(ValueError, match="n_in=6"):
        kernels.fanin_forward(x[:, :5], topo, vals)
    with pytest.raises(ValueError, match="n_in=6"):
        kernels.fanin_backward_input(topo, vals, np.ones((3, 2), np.float32), 7)
    with pytest.raises(ValueError, match="wider than int32 indices"):  # not an index wrapped to a negative number
        Topology(np.array([[2**31 + 5]]), 2**32)


def test_ops_validate_plain_index_arrays_every_call():
    x = Tensor(np.ones((2, 6), np.float32))
    vals = nn.Parameter(np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"outside \[0, 6\)"):
        ops.fanin_linear(x, np.array([[0, 9], [1, 2]], np.int16), vals)
    with pytest.raises(ValueError, match="n_in=6"):
        ops.fanin_linear(Tensor(np.ones((2, 5), np.float32)), Topology(np.array([[0, 5], [1, 2]]), 6), vals)


# ------------------------------------------------------------------------ debug switch
def test_debug_refuses_out_of_range_indices_even_unchecked(debug_on):
    bad = np.array([[0, 99], [1, 2]], np.int32)
    vals = np.ones((2, 2), np.float32)
    for b in (1, 64):  # the batch-1 gather / scatter paths and the panel paths
        x = np.ones((b, 6), np.float32)
        with pytest.raises(ValueError, match=r"hold 99, outside \[0, 6\)"):
            kernels.fanin_forward(x, bad, vals, check=False)
        with pytest.raises(ValueError, match=r"hold 99, outside \[0, 6\)"):
            kernels.fanin_backward_input(bad, vals, np.ones((b, 2), np.float32), 6, check=False)
        with pytest.raises(ValueError, match=r"hold 99, outside \[0, 6\)"):
            kernels.fanin_backward_values(x, bad, np.ones((b, 2), np.float32), check=False)


def test_debug_checks_a_transposed_structure_by_content(debug_on):
    idx = np.array([[0, 5], [1, 2]], np.int16)
    other = np.array([[0, 1], [2, 5]], np.int16)
    stale = kernels.transpose_structure(other, 6)  # same shapes, other indices: passes the O(1) check
    with pytest.raises(ValueError, match="does not match indices"):
        kernels.fanin_backward_input(idx, np.ones((2, 2), np.float32), np.ones((9, 2), np.float32), 6,
                                     transposed=stale)


def test_without_debug_unchecked_calls_skip_the_scan():
    assert not kernels.debug()
    idx = np.array([[0, 5], [1, 2]], np.int16)
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    np.testing.assert_allclose(kernels.fanin_forward(x, idx, np.ones((2, 2), np.float32), check=False),
                               [[5, 3], [17, 15]])


def test_debug_can_be_set_from_the_environment(tmp_path):
    import subprocess
    import sys

    code = "import fanin; print(fanin.kernels.debug())"
    env = {"FANIN_DEBUG": "1", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


# ------------------------------------------------------------------ grad mode per thread
def test_no_grad_in_one_thread_leaves_recording_on_in_another():
    inside, release = threading.Event(), threading.Event()
    seen = {}

    def service():
        with no_grad():
            inside.set()
            release.wait(10)
            seen["service"] = (Tensor(np.ones(2), requires_grad=True) * 2).requires_grad

    t = threading.Thread(target=service)
    t.start()
    assert inside.wait(10)
    try:
        x = Tensor(np.ones(3), requires_grad=True)
        y = (x * 3).sum()  # recorded while the other thread is inside no_grad
        assert y.requires_grad and fanin.tensor.is_grad_enabled()
        y.backward()
        np.testing.assert_array_equal(x.grad, [3, 3, 3])
    finally:
        release.set()
        t.join()
    assert seen["service"] is False


def test_a_thread_started_inside_no_grad_records():
    seen = []
    with no_grad():
        t = threading.Thread(target=lambda: seen.append(fanin.tensor.is_grad_enabled()))
        t.start()
        t.join()
        assert not fanin.tensor.is_grad_enabled()
    assert seen == [True] and fanin.tensor.is_grad_enabled()


def test_enable_grad_inside_no_grad():
    x = Tensor(np.ones(2), requires_grad=True)
    with no_grad():
        with fanin.tensor.enable_grad():
            assert (x * 2).requires_grad
        assert not (x * 2).requires_grad


# --------------------------------------------------------------- strict optimizer state
@pytest.mark.parametrize("factory, slot", [
    (lambda p: optim.SGD(p, lr=0.1, momentum=0.9), "momentum"),
    (lambda p: optim.Adam(p, lr=0.1), "m"),
])
def test_a_resized_parameter_without_remap_is_an_error_naming_it(factory, slot):
    model = nn.Sequential(nn.Linear(4, 3, seed=0))
    opt = factory(model.parameters())
    w = model[0].weight
    w.grad = np.ones_like(w.data)
    opt.step()
    state_before = opt.state[w][slot].copy()
    w.data = np.ones((2, 4), np.float32)  # a layer shrank (channel removal) ...
    w.grad = np.ones_like(w.data)
    with pytest.raises(optim.StateShapeError, match=rf"'{slot}' state of '0.weight'.*remap_state"):
        opt.step()  # ... and nobody carried the state over: no silent reset
    np.testing.assert_array_equal(opt.state[w][slot], state_before)
    with pytest.raises(optim.StateShapeError, match="new shape"):
        opt.remap_state(w, lambda a: a)  # a function that does not resize is refused
    opt.select_state(w, np.array([True, False, True]))
    np.testing.assert_array_equal(opt.state[w][slot], state_before[[0, 2]])
    opt.step()


def test_loading_optimizer_state_of_other_shapes_is_refused():
    w = nn.Parameter(np.ones(3, np.float32))
    opt = optim.Adam([w], lr=0.1)
    w.grad = np.ones(3, np.float32)
    opt.step()
    sd = opt.state_dict()
    other = optim.Adam([nn.Parameter(np.ones(4, np.float32))], lr=0.1)
    with pytest.raises(optim.StateShapeError, match="shape"):
        other.load_state_dict(sd)
    assert other.state == {}


def test_topologies_compare_by_content():
    a = Topology(np.array([[0, 2], [1, 3]]), 4)
    assert a.same_as(Topology(np.array([[0, 2], [1, 3]]), 4))
    assert not a.same_as(Topology(np.array([[0, 2], [1, 2]]), 4))  # other indices
    assert not a.same_as(Topology(np.array([[0, 2], [1, 3]]), 5))  # other width
    assert not a.same_as(Topology(np.array([[0, 2], [1, 3]]), 4, np.array([True, False])))  # other active set


def test_messages_name_the_exact_problem():
    with pytest.raises(ValueError, match=r"row 1 of indices repeats input 3 \(position 2\)"):
        kernels.validate_indices(np.array([[0, 1, 2], [1, 3, 3]], np.int16), 5)
    for stride, padding in ((1, (0, -1)), ((1, 0), 0), (1, (-1, 0))):  # each condition on its own
        with pytest.raises(ValueError, match="must be positive and padding .* non-negative"):
            kernels.im2col(np.ones((1, 1, 4, 4), np.float32), 3, 3, stride, padding)


def test_a_gradient_of_another_shape_is_refused_in_either_direction():
    """A gradient larger or smaller than its parameter (a layer resized without remap) is an error, never applied."""
    from fanin import nn, optim

    for shape in ((2, 4), (4, 4), (3, 3), (3, 5)):
        for opt_cls in (optim.SGD, optim.Adam):
            p = nn.Parameter(np.ones((3, 4), np.float32))
            opt = opt_cls([p], lr=0.1)
            p.grad = np.ones(shape, np.float32)
            with pytest.raises(ValueError, match="does not match parameter"):
                opt.step()
            np.testing.assert_array_equal(p.data, 1)


def test_optimizer_argument_checks_and_parameters_without_gradients():
    from fanin import nn, optim

    a, b = nn.Parameter(np.ones(2, np.float32)), nn.Parameter(np.ones(3, np.float32))
    with pytest.raises(TypeError, match="parameter 1 is a ndarray"):
        optim.SGD([a, np.ones(2)], lr=0.1)
    with pytest.raises(TypeError, match="parameter 0 is a tuple"):  # 3-tuples are not (name, parameter) pairs
        optim.SGD([("w", a, 1)], lr=0.1)
    for betas in ((1.0, 0.9), (0.9, 1.0), (-0.1, 0.9), (0.9, -0.1)):
        with pytest.raises(ValueError, match="betas"):
            optim.Adam([a], betas=betas)
    optim.Adam([a], betas=(0.0, 0.0))  # the lower bound is allowed
    for cls in (optim.SGD, optim.Adam):  # a parameter without a gradient is skipped, not the end of the list
        a, b = nn.Parameter(np.ones(2, np.float32)), nn.Parameter(np.ones(3, np.float32))
        opt = cls([a, b], lr=0.1)
        b.grad = np.ones(3, np.float32)
        opt.step()
        np.testing.assert_array_equal(a.data, 1)
        assert np.all(b.data < 1)


def test_adamw_defaults_decouple_a_weight_decay_of_one_percent():
    from fanin import nn, optim

    p = nn.Parameter(np.full(4, 2.0, np.float32))
    opt = optim.AdamW([p], lr=0.1)
    assert opt.weight_decay == 0.01 and opt.betas == (0.9, 0.999)
    p.grad = np.zeros(4, np.float32)  # no gradient signal: only the decoupled decay moves the weights
    opt.step()
    np.testing.assert_allclose(p.data, 2.0 * (1 - 0.1 * 0.01), rtol=1e-6)
