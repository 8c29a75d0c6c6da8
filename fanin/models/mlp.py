"""Multi-layer perceptron: Linear -> ReLU -> ... -> Linear."""
from __future__ import annotations

import numpy as np

from fanin import nn


def mlp(sizes, sparsity=None, bias: bool = True, dropout: float = 0.0, seed=0) -> nn.Sequential:
    """An MLP with layer widths ``sizes`` (input first, classes last).

    ``sparsity``: None for dense layers; a number in (0, 1) makes every layer a condensed
    ``FanInLinear`` of that sparsity; a list gives one sparsity per layer (None = dense).
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"mlp: sizes must list at least two positive widths, got {sizes}.")
    n_layers = len(sizes) - 1
    per_layer = list(sparsity) if isinstance(sparsity, (list, tuple)) else [sparsity] * n_layers
    if len(per_layer) != n_layers:
        raise ValueError(f"mlp: {n_layers} layers but {len(per_layer)} sparsities were given.")
    rng = np.random.default_rng(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(_linear(n_in, n_out, per_layer[i], bias, rng))
        if i < n_layers - 1:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout, seed=rng))
    return nn.Sequential(layers)


def _linear(n_in, n_out, sparsity, bias, rng):
    if sparsity is None or sparsity == 0:
        return nn.Linear(n_in, n_out, bias=bias, seed=rng)
    return nn.FanInLinear(n_in, n_out, sparsity=sparsity, bias=bias, seed=rng)
