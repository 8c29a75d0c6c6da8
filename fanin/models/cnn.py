"""A small CNN: conv blocks (conv -> batch norm -> ReLU -> max-pool), then a classifier."""
from __future__ import annotations

import numpy as np

from fanin import nn


def cnn(in_channels: int = 1, channels=(32, 64), hidden: int = 128, num_classes: int = 10,
        image_size: int = 28, dropout: float = 0.0, sparsity=None, seed=0) -> nn.Sequential:
    """Conv blocks with ``channels`` filters (3x3, padding 1, 2x2 pooling), then hidden -> classes.

    ``sparsity``: None for dense; a number makes every conv after the first and the hidden
    linear layer condensed (``FanInConv2d`` / ``FanInLinear``); the first conv (few inputs) and the
    classifier stay dense.
    """
    rng = np.random.default_rng(seed)
    layers, c, size = [], in_channels, image_size
    for i, c_out in enumerate(channels):
        sparse = sparsity is not None and i > 0
        conv = (nn.FanInConv2d(c, c_out, 3, padding=1, sparsity=sparsity, bias=False, seed=rng) if sparse
                else nn.Conv2d(c, c_out, 3, padding=1, bias=False, seed=rng))
        layers += [conv, nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        c, size = c_out, size // 2
    flat = c * size * size
    hidden_layer = (nn.FanInLinear(flat, hidden, sparsity=sparsity, seed=rng) if sparsity is not None
                    else nn.Linear(flat, hidden, seed=rng))
    layers += [nn.Flatten(), hidden_layer, nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout, seed=rng))
    layers.append(nn.Linear(hidden, num_classes, seed=rng))
    return nn.Sequential(layers)
