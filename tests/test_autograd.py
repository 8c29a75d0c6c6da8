"""Gradient ownership and accumulation on the tape, over random graphs with several backward passes.

Oracles: central finite differences in float64 (always), and PyTorch's autograd on the same
program where torch is installed (the ``bench`` extra). Between passes a leaf's gradient is
changed in place (as clipping or weight decay would): that must never leak into another leaf.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fanin import Tensor
from gradcheck import numeric_grad

try:
    import torch
except ImportError:  # the oracle is optional; finite differences always run
    torch = None

N = 3  # every value is an N x N matrix, so any op can take any operands


def test_add_gives_each_parent_its_own_gradient():
    a, b, c = (Tensor(np.full((2,), v), requires_grad=True) for v in (1.0, 2.0, 2.0))
    ((a + b) * c).sum().backward()
    assert a.grad is not b.grad and not np.shares_memory(a.grad, b.grad)
    np.testing.assert_array_equal(b.grad, [2, 2])
    (a * 5).sum().backward()  # gradient accumulation reaching only a
    np.testing.assert_array_equal(a.grad, [7, 7])
    np.testing.assert_array_equal(b.grad, [2, 2])  # was 7: b.grad was a.grad


def test_in_place_change_of_one_gradient_stays_there():
    a, b = Tensor(np.ones(3), requires_grad=True), Tensor(np.ones(3), requires_grad=True)
    (a + b).sum().backward()
    a.grad *= 0.0  # e.g. clipping
    np.testing.assert_array_equal(b.grad, [1, 1, 1])


def test_the_callers_gradient_is_never_adopted():
    a = Tensor(np.ones(3), requires_grad=True)
    g = np.array([1.0, 2.0, 3.0])
    a.backward(g)
    assert a.grad is not g and not np.shares_memory(a.grad, g)
    a.grad += 1
    np.testing.assert_array_equal(g, [1, 2, 3])
    y = a + 0.0
    y.backward(g)
    assert not np.shares_memory(a.grad, g)


# -------------------------------------------------------------- random programs
# A program: leaves L0..L{n-1}, then nodes built by ops from any earlier values (so values are
# reused: fan-out), then several losses = sum(node * W). Interpreted by fanin, NumPy (float64,
# for finite differences) and torch.
OPS = ("add", "sub", "mul", "matmul", "neg", "T", "rowsum", "square", "scale", "exp")


def _apply(op, a, b, lib):
    if op == "add":
        return a + b
    if op == "sub":
        return a - b
    if op == "mul":
        return a * b
    if op == "matmul":
        return a @ b
    if op == "neg":
        return -a
    if op == "T":
        return a.T
    if op == "rowsum":  # a reduction broadcast back: (N, 1) + (N, N)
        return a.sum(axis=1, keepdims=True) + b
    if op == "square":
        return a * a
    if op == "scale":
        return a * 0.5
    if op == "exp":
        return (a * 0.1).exp() if lib != "numpy" else np.exp(a * 0.1)
    raise AssertionError(op)


@st.composite
def programs(draw):
    n_leaves = draw(st.integers(2, 4))
    nodes = []
    for i in range(draw(st.integers(2, 8))):
        n_values = n_leaves + i
        nodes.append((draw(st.sampled_from(OPS)), draw(st.integers(0, n_values - 1)),
                      draw(st.integers(0, n_values - 1))))
    n_values = n_leaves + len(nodes)
    # each pass: a loss over one or two values (often not reaching every leaf), then an optional
    # in-place scaling of one leaf's gradient
    passes = [(draw(st.lists(st.integers(0, n_values - 1), min_size=1, max_size=2)),
               draw(st.one_of(st.none(), st.integers(0, n_leaves - 1))))
              for _ in range(draw(st.integers(1, 3)))]
    return n_leaves, nodes, passes


def _values(leaves, nodes, lib):
    vals = list(leaves)
    for op, i, j in nodes:
        vals.append(_apply(op, vals[i], vals[j], lib))
    return vals


def _loss(vals, targets, weights):
    total = None
    for t in targets:
        term = (vals[t] * weights[t]).sum()
        total = term if total is None else total + term
    return total


def _run_fanin(leaf_arrays, nodes, passes, weights):
    leaves = [Tensor(a.copy(), requires_grad=True) for a in leaf_arrays]
    vals = _values(leaves, nodes, "fanin")  # one graph, several backward passes over it
    for targets, scaled in passes:
        _loss(vals, targets, [Tensor(w) for w in weights]).backward()
        if scaled is not None and leaves[scaled].grad is not None:
            leaves[scaled].grad *= -0.5
    return [leaf.grad for leaf in leaves]


def _expected_by_finite_differences(leaf_arrays, nodes, passes, weights):
    arrays = [a.copy() for a in leaf_arrays]
    grads = [None] * len(arrays)
    reach = _reachability(len(arrays), nodes)
    for targets, scaled in passes:
        def f(arrs, targets=targets):
            return float(_loss(_values(arrs, nodes, "numpy"), targets, weights))
        for i in range(len(arrays)):
            if any(i in reach[t] for t in targets):
                g = numeric_grad(f, arrays, i)
                grads[i] = g if grads[i] is None else grads[i] + g
        if scaled is not None and grads[scaled] is not None:
            grads[scaled] = grads[scaled] * -0.5
    return grads


def _reachability(n_leaves, nodes):
    """For each value, the leaves it depends on (which leaves a pass gives a gradient)."""
    reach = [{i} for i in range(n_leaves)]
    for op, i, j in nodes:
        reach.append(reach[i] | (reach[j] if op in ("add", "sub", "mul", "matmul", "rowsum") else set()))
    return reach


def _expected_by_torch(leaf_arrays, nodes, passes, weights):
    leaves = [torch.tensor(a, requires_grad=True) for a in leaf_arrays]
    vals = _values(leaves, nodes, "torch")
    for targets, scaled in passes:
        _loss(vals, targets, [torch.tensor(w) for w in weights]).backward(retain_graph=True)
        if scaled is not None and leaves[scaled].grad is not None:
            leaves[scaled].grad.mul_(-0.5)
    return [None if leaf.grad is None else leaf.grad.numpy() for leaf in leaves]


def _compare(got, want, **tol):
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), f"leaf {i}: got {g}, expected {w}"
        if g is not None:
            np.testing.assert_allclose(g, w, err_msg=f"leaf {i}", **tol)


def _arrays(program, seed):
    rng = np.random.default_rng(seed)
    n_leaves, nodes, _ = program
    leaves = [rng.uniform(-1, 1, (N, N)) for _ in range(n_leaves)]
    weights = [rng.standard_normal((N, N)) for _ in range(n_leaves + len(nodes))]
    return leaves, weights


@settings(max_examples=40, deadline=None)
@given(program=programs(), seed=st.integers(0, 2**31 - 1))
def test_random_graphs_against_finite_differences(program, seed):
    leaves, weights = _arrays(program, seed)
    _, nodes, passes = program
    got = _run_fanin(leaves, nodes, passes, weights)
    _compare(got, _expected_by_finite_differences(leaves, nodes, passes, weights), rtol=1e-5, atol=1e-6)
    arrays = [g for g in got if g is not None]
    for i, a in enumerate(arrays):  # no two leaves share gradient memory
        assert not any(np.shares_memory(a, b) for b in arrays[i + 1:])


@pytest.mark.skipif(torch is None, reason="PyTorch is not installed (make bench installs it); finite differences "
                                          "cover the same programs")
@settings(max_examples=60, deadline=None)
@given(program=programs(), seed=st.integers(0, 2**31 - 1))
def test_random_graphs_against_torch(program, seed):
    leaves, weights = _arrays(program, seed)
    _, nodes, passes = program
    _compare(_run_fanin(leaves, nodes, passes, weights), _expected_by_torch(leaves, nodes, passes, weights),
             rtol=1e-10, atol=1e-12)
