"""The inference runtime: a trained model as a ``Network`` of plain arrays and compiled kernels.

    net = fanin.compile(model)            # or fanin.load("model.fanin")
    logits = net.predict(x)               # x: (batch, *input_shape) float32

``compile`` lowers the model once (``plan.lower``: batch norm folded, activations fused, dropout
and ablated neurons gone, self-compressed layers kept as integers and scales); ``fanin.save`` writes
the same plan to a ``.fanin`` file and ``fanin.load`` reads it back, validated.
"""
from __future__ import annotations

from fanin.runtime.network import Network, PredictError
from fanin.runtime.plan import FormatError, check, lower, quantize

__all__ = ["compile", "Network", "PredictError", "FormatError", "lower", "check", "quantize"]


def compile(model, input_shape=None, *, meta=None, nan_policy: str = "raise",  # noqa: A001
            activations: str = "float32") -> Network:
    """A ``Network`` computing what ``model`` computes in eval mode (``input_shape`` for convolutional models);
    ``activations="int8"``: with 8-bit activations (``Network``)."""
    if isinstance(model, Network):
        if model.activations == activations and model.nan_policy == nan_policy:
            return model
        return Network(model.plan, model.meta, validated=True, nan_policy=nan_policy, activations=activations)
    return Network(lower(model, input_shape), meta, nan_policy=nan_policy, activations=activations)
