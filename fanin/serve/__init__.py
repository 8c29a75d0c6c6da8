"""The HTTP service around a ``Network``: ``fanin serve model.fanin`` (the ``serve`` extra: Starlette, Uvicorn,
prometheus_client).

    POST /predict   {"inputs": [[...], ...]} (application/json) or a .npy file (application/x-npy);
                    ?proba=1 for probabilities; answers {"logits" | "probabilities": [[...]], "classes": [...]}
    GET  /healthz   {"status": "ok"}
    GET  /info      the model's ``Network.info()`` and the server's settings
    GET  /metrics   Prometheus text: requests, errors, rows per predict call, latencies

Concurrent requests are stacked into one ``predict`` call (``Batcher``: up to ``max_batch`` rows, waiting at
most ``max_wait_ms`` for more), which runs on one thread off the event loop, or on the loop's own thread when
it is expected to take at most ``inline_ms`` and every waiting request is in it; each caller gets its own rows
back. ``workers > 1`` starts that many spawned processes sharing the listening socket, each loading the
model file itself (``server.serve``). docs/SERVING.md has the details and the numbers.

In your own Starlette/FastAPI app, ``create_app(net, ServeConfig())`` is an ASGI app you can mount.
"""
from __future__ import annotations

from fanin.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app", "serve", "Batcher", "missing_extra"]


def missing_extra() -> str | None:
    """None when the serve extra is installed, else a sentence saying how to install it."""
    import importlib.util

    absent = [m for m in ("starlette", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if absent:
        return (f"fanin serve needs {', '.join(absent)} (the serve extra): pip install 'fanin[serve]' "
                "(or: pip install starlette uvicorn uvloop httptools prometheus_client orjson).")
    return None


def __getattr__(name):
    if name == "create_app":
        from fanin.serve.app import create_app
        return create_app
    if name == "serve":
        from fanin.serve.server import serve
        return serve
    if name == "Batcher":
        from fanin.serve.batcher import Batcher
        return Batcher
    raise AttributeError(f"module 'fanin.serve' has no attribute {name!r}")
