"""Embedding a fanin model in your own Starlette app (FastAPI is built on Starlette: the same three steps).

1. Load the model once, at start-up: ``fanin.load`` validates the file completely (a bad file fails here, not in
   a request) and memory-maps it; the Network is read-only, so every request may share it.
2. Run ``predict`` off the event loop: the kernels release the GIL, so the loop keeps serving meanwhile. One
   dedicated thread is enough and is what fanin serve uses: calls queue up instead of running a dozen parallel
   kernels at once on a few cores.
3. Turn ``fanin.runtime.PredictError`` (wrong shape or dtype, NaN/Inf) into a 4xx: its message is one line
   that tells the client what to change.

Run it:

    FANIN_MODEL=model.fanin uvicorn --factory examples.starlette_app:create_app --port 8000
    curl -X POST localhost:8000/classify -H 'content-type: application/json' -d '{"images": [[0.1, ...]]}'
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os

import numpy as np
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

import fanin

LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def create_app(model_path: str | None = None) -> Starlette:
    """An app with ``POST /classify``: Fashion-MNIST labels and confidences for ``{"images": [[...], ...]}``."""
    net = fanin.load(model_path or os.environ["FANIN_MODEL"])
    predict_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="predict")

    async def classify(request):
        try:
            images = np.asarray((await request.json())["images"], dtype=np.float32)
            proba = await asyncio.get_running_loop().run_in_executor(predict_thread, net.predict_proba, images)
        except fanin.runtime.PredictError as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)
        except (ValueError, TypeError, KeyError):
            return JSONResponse({"error": 'send {"images": [[...], ...]}, one list of numbers per image'},
                                status_code=400)
        proba = np.atleast_2d(proba)
        return JSONResponse({"labels": [LABELS[i] for i in proba.argmax(axis=1)],
                             "confidence": proba.max(axis=1).round(4).tolist()})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        predict_thread.shutdown(wait=True)

    return Starlette(routes=[Route("/classify", classify, methods=["POST"])], lifespan=lifespan)
