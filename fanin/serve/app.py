"""The ASGI app of ``fanin serve``: request decoding and checks, the endpoints, the metrics.

``POST /predict`` is a plain ASGI handler (``App`` sends it there directly); the other endpoints, 404/405 and
the lifespan go through a Starlette app. Starlette's layers cost ~10 us of the ~50-85 us the event loop spends
on a request, and /predict is the one endpoint that is called thousands of times a second.

Every request a client gets wrong is answered with a 4xx and ``{"error": "<one line>"}``: 400 (malformed
JSON or .npy, bad query), 404/405 (no such endpoint or method), 413 (body over ``max_body`` bytes, more
than ``max_rows`` rows), 415 (content type other than JSON or .npy), 422 (numbers of the wrong shape,
rank or dtype, NaN/Inf under the network's ``nan_policy="raise"``). The server keeps serving.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import json
import logging
import math
import os
import re
import time

import numpy as np
from scipy import special
from starlette.applications import Starlette
from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

try:  # the serve extra's JSON codec: 14 us instead of 132 us to parse one 784-number row (docs/SERVING.md)
    import orjson
except ImportError:  # pragma: no cover - the standard library does the same, slower
    orjson = None

from fanin.kernels import infer
from fanin.runtime.network import as_float32
from fanin.serve.batcher import Batcher
from fanin.serve.config import ServeConfig

__all__ = ["create_app", "App", "RequestError", "decode_inputs"]

log = logging.getLogger("fanin.serve")
JSON_TYPES = ("application/json",)
NPY_TYPES = ("application/x-npy", "application/npy", "application/octet-stream")
ENDPOINTS = "POST /predict, GET /healthz, GET /info, GET /metrics"
_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False, "": False}


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------ decoding
async def read_body(receive, length: str | None, limit: int) -> bytes | None:
    """The request body from ASGI ``receive`` (None if the client disconnected), refused (413) past ``limit``
    bytes whether or not the client announced its length (``length``: the Content-Length header)."""
    if length is not None:
        if not length.isdigit():
            raise RequestError(400, f"the Content-Length header {length!r} is not a number.")
        if int(length) > limit:
            raise RequestError(413, f"the body is {int(length)} bytes; this server takes at most {limit} "
                                    "(fanin serve --max-body-mb); send fewer rows per request.")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the body is over {limit} bytes, the most this server takes (fanin serve "
                                    "--max-body-mb); send fewer rows per request.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def decode_inputs(body: bytes, content_type: str, input_shape: tuple, max_rows: int, check_finite: bool = True):
    """The rows a request sends, as float32 (rows, *input_shape); ``RequestError`` says what is wrong."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype in JSON_TYPES:
        x = _from_json(body)
    elif ctype in NPY_TYPES:
        x = _from_npy(body)
    else:
        raise RequestError(415, f"unsupported content type {ctype or '(none)'!r}: send application/json "
                                '({"inputs": [[...], ...]}) or application/x-npy (the bytes of a .npy file).')
    shape = tuple(input_shape)
    if x.shape == shape:
        x = x[None]
    elif x.shape == (0,):  # {"inputs": []}: no rows
        x = x.reshape(0, *shape)
    if x.ndim != len(shape) + 1 or x.shape[1:] != shape:
        raise RequestError(422, f"inputs have shape {x.shape}; this model takes (rows, {', '.join(map(str, shape))}) "
                                f"or one sample of shape {shape}.")
    if len(x) > max_rows:
        raise RequestError(413, f"the request has {len(x)} rows; this server takes at most {max_rows} per request "
                                "(fanin serve --max-rows): split it.")
    x, beyond = as_float32(x)
    if check_finite and beyond.size:
        raise RequestError(422, "inputs hold values beyond float32's range (|x| > 3.4e38); the model computes "
                                "in float32: rescale the input.")
    if check_finite and x.size and not infer.all_finite(x):
        bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
        raise RequestError(422, f"row(s) {bad[:5].tolist()}{' ...' if bad.size > 5 else ''} hold NaN or Inf; "
                                "clean the input.")
    return x


def json_loads(body: bytes):
    """``json.loads``, by orjson where it can: orjson is strict JSON, so what it refuses (the NaN and Infinity
    literals Python accepts, integers over 64 bits, nesting past 1024) goes to the standard library, which
    decides, and words the error, as without orjson."""
    if orjson is not None:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    return json.loads(body)


def json_dumps(doc) -> bytes:
    """Compact JSON bytes of ``doc`` (lists of Python floats and ints; orjson when installed)."""
    if orjson is not None:
        return orjson.dumps(doc)
    return json.dumps(doc, separators=(",", ":")).encode()


def _from_json(body: bytes) -> np.ndarray:
    try:
        doc = json_loads(body)
    except (ValueError, RecursionError) as exc:
        raise RequestError(400, f"the body is not valid JSON ({_one_line(exc)}).") from None
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise RequestError(400, 'the JSON body must be an object {"inputs": [[...], ...]} (one list of numbers '
                                "per row).")
    try:  # no dtype given: strings, booleans and nulls show in the dtype instead of being converted
        x = np.asarray(doc["inputs"])
    except (ValueError, TypeError, RecursionError):
        raise RequestError(422, '"inputs" must be a rectangular array of numbers (every row the same length, '
                                "no strings or nulls).") from None
    if x.dtype.kind == "O" and all(type(v) in (int, float) for v in x.ravel()):  # ints past 64 bits
        try:
            x = x.astype(np.float64)
        except OverflowError:  # an integer literal past any float (10**400): NumPy refuses to round it
            raise RequestError(422, '"inputs" holds an integer too large for a float; send numbers within '
                                    "float32's range.") from None
    if x.dtype.kind not in "fiu":
        what = "booleans" if x.dtype.kind == "b" else "strings or nulls"
        raise RequestError(422, f'"inputs" must be a rectangular array of numbers, got {what}; send one list of '
                                "numbers per row.")
    return x


_NPY_HEADER = re.compile(rb"\{'descr': '([<>|=]?f[248])', 'fortran_order': (False|True), 'shape': \(([0-9, ]*)\), \} *\n")


def _npy_fast(body: bytes):
    """The array of a .npy body in the exact layout numpy.save writes for float arrays, else None (np.load decides)."""
    if body[:6] != b"\x93NUMPY" or len(body) < 12 or body[6] not in (1, 2, 3):
        return None
    start = 10 if body[6] == 1 else 12
    end = start + int.from_bytes(body[8:start], "little")
    m = _NPY_HEADER.fullmatch(body, start, end)
    if m is None:
        return None
    dtype = np.dtype(m.group(1).decode())
    shape = tuple(int(v) for v in m.group(3).split(b",") if v.strip())
    count = math.prod(shape)
    if len(body) - end != count * dtype.itemsize:
        return None
    return np.frombuffer(body, dtype, count, end).reshape(shape, order="F" if m.group(2) == b"True" else "C")


def _from_npy(body: bytes) -> np.ndarray:
    x = _npy_fast(body)  # numpy's header parser (ast.literal_eval) took 30 % of the event loop's time
    if x is not None:
        return x
    f = io.BytesIO(body)
    try:  # the header first: a declared shape is checked against the bytes before anything is allocated
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except (ValueError, OSError, EOFError, SyntaxError, OverflowError, TypeError) as exc:
        raise RequestError(400, f"the body is not a .npy array ({_one_line(exc)}); write it with numpy.save.") from None
    if dtype.hasobject:
        raise RequestError(422, "the .npy array holds Python objects; send floats (float32), written by numpy.save.")
    data = len(body) - f.tell()
    if math.prod(shape) * dtype.itemsize != data:
        raise RequestError(400, f"the .npy header declares shape {shape} of {dtype} but {data} bytes of data follow; "
                                "write the array with numpy.save.")
    try:
        x = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError, MemoryError, OverflowError) as exc:
        raise RequestError(400, f"the body is not a .npy array ({_one_line(exc)}); write it with numpy.save.") from None
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        raise RequestError(422, f"the .npy array has dtype {getattr(x, 'dtype', type(x).__name__)}; send floats "
                                "(float32; float64/float16 are converted), normalized as in training.")
    return x


def _one_line(exc) -> str:
    return " ".join(str(exc).split())[:200]


def encode_outputs(logits: np.ndarray, proba: bool) -> bytes:
    """The JSON answer: logits (or probabilities) per row and each row's class."""
    classes = logits.argmax(axis=1) if logits.size else np.empty(0, np.int64)
    y = special.softmax(logits, axis=1) if proba and logits.size else logits
    if not np.isfinite(y).all():  # a finite input whose activations overflowed float32: the input's fault
        raise RequestError(422, "the model's outputs overflow float32 for this input (values far outside the range "
                                "it was trained on); rescale the input.")
    return json_dumps({"probabilities" if proba else "logits": y.tolist(), "classes": classes.tolist()})


# ------------------------------------------------------------------ metrics
class Metrics:
    """Prometheus counters and histograms of one app (all workers' when PROMETHEUS_MULTIPROC_DIR is set)."""

    def __init__(self, max_batch: int):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self._children = {}
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self.requests = Counter("fanin_requests", "HTTP requests answered, by endpoint and status code "
                                "(errors: code >= 400)", ["endpoint", "code"], registry=self.registry)
        self.latency = Histogram("fanin_request_seconds", "time from reading a /predict request to its answer",
                                 buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5),
                                 registry=self.registry)
        rows = [2 ** i for i in range(int(math.log2(max(1, max_batch))) + 1)]
        self.batch_rows = Histogram("fanin_batch_rows", "rows per predict call (dynamic batching)",
                                    buckets=rows + ([max_batch] if max_batch not in rows else []),
                                    registry=self.registry)
        self.predict_seconds = Histogram("fanin_predict_seconds", "seconds one predict call ran (in the predict thread)",
                                         buckets=(.0001, .0002, .0005, .001, .002, .005, .01, .02, .05, .1, .5),
                                         registry=self.registry)

    def count(self, endpoint: str, code: int):
        key = (endpoint, code)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(endpoint, str(code))
        child.inc()

    def on_batch(self, rows, seconds):
        self.batch_rows.observe(rows)
        self.predict_seconds.observe(seconds)

    def render(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess

        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)


# ------------------------------------------------------------------ the app
def create_app(net, config: ServeConfig | None = None, *, on_ready=None) -> App:
    """The ASGI app serving ``net`` (a ``Network``, or anything with ``predict``, ``input_shape``, ``info()``).

    Its lifespan starts a one-thread predict executor and the batcher, warms the kernels up, then calls
    ``on_ready()``; run it with Uvicorn (``fanin.serve.serve`` does).
    """
    cfg = config or ServeConfig()
    metrics = Metrics(cfg.max_batch)
    shape = tuple(int(s) for s in net.input_shape)
    check_finite = getattr(net, "nan_policy", "raise") == "raise"
    info = net.info()
    state = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop = asyncio.get_running_loop()
        threads = cfg.predict_threads()
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fanin-predict",
                                                         initializer=_set_threads, initargs=(threads,))
        batcher = Batcher(net.predict, executor, cfg.max_batch, cfg.max_wait_ms, on_batch=metrics.on_batch,
                          inline_ms=cfg.inline_ms, inline_context=lambda: _numba_threads(threads))
        for rows in sorted({1, cfg.max_batch}):  # load the kernels now, not in the first request
            await loop.run_in_executor(executor, net.predict, np.zeros((rows, *shape), np.float32))
        if cfg.max_batch > 1 and cfg.inline_ms > 0:  # time the size classes that may run inline (Batcher)
            for rows in sorted({1 << i for i in range(cfg.max_batch.bit_length())} | {cfg.max_batch}):
                await batcher.calibrate(np.zeros((rows, *shape), np.float32))
                if batcher.expected_seconds(rows) > 1e-3 * cfg.inline_ms:
                    break  # larger batches take longer still: measured when they first come
        await batcher.start()
        state["batcher"] = batcher
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await batcher.stop()
            executor.shutdown(wait=True)

    async def predict(scope, receive, send):
        """POST /predict as a plain ASGI handler: Starlette's request, routing and middleware layers cost ~10 us of
        the ~85 us the event loop spends on a request (docs/SERVING.md), so this one endpoint skips them."""
        t0 = time.perf_counter()
        try:
            query = scope.get("query_string", b"")
            flag = QueryParams(query.decode("latin-1")).get("proba", "0") if query else "0"
            proba = _FLAGS.get(flag.lower())
            if proba is None:
                raise RequestError(400, f"proba must be 1 or 0, got {flag!r}.")
            ctype, length = _content_headers(scope["headers"])
            body = await read_body(receive, length, cfg.max_body)
            if body is None:  # the client went away: nothing to answer
                return
            x = decode_inputs(body, ctype, shape, cfg.max_rows, check_finite)
            y = await state["batcher"].predict(x) if len(x) else np.empty((0, net.n_classes), np.float32)
            status, out = 200, encode_outputs(y, proba)
        except RequestError as exc:
            status, out = exc.status, _error_body(str(exc))
        except ValueError as exc:  # a PredictError the checks above did not foresee
            status, out = 422, _error_body(_one_line(exc))
        except Exception as exc:  # noqa: BLE001 - the server keeps serving
            log.exception("predict failed")
            status, out = 500, _error_body(f"predict failed: {_one_line(exc)}")
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(out))]
        if status == 413:  # the rest of an oversized body is not read: the connection cannot carry another request
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": out})
        metrics.latency.observe(time.perf_counter() - t0)
        metrics.count("/predict", status)

    async def healthz(request):
        metrics.count("/healthz", 200)
        return JSONResponse({"status": "ok"})

    async def info_(request):
        metrics.count("/info", 200)
        body = {**info, "server": {"max_batch": cfg.max_batch, "max_wait_ms": cfg.max_wait_ms,
                                   "inline_ms": cfg.inline_ms, "max_rows": cfg.max_rows, "max_body": cfg.max_body,
                                   "workers": cfg.workers, "pid": os.getpid()}}
        return Response(json.dumps(body, default=str), media_type="application/json")

    async def metrics_(request):
        metrics.count("/metrics", 200)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def http_error(request, exc: HTTPException):
        metrics.count("other", exc.status_code)
        return _error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path} (endpoints: {ENDPOINTS}).")

    routes = [Route("/predict", _Endpoint(predict), methods=["POST"]), Route("/healthz", healthz, methods=["GET"]),
              Route("/info", info_, methods=["GET"]), Route("/metrics", metrics_, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.router.redirect_slashes = False  # "/healthz/" is a 404, not a redirect to a URL built from the Host header
    return App(predict, app)


class _Endpoint:
    """An ASGI endpoint for a Starlette ``Route`` (so that, e.g., GET /predict gets Starlette's 405)."""

    def __init__(self, handler):
        self.handler = handler

    async def __call__(self, scope, receive, send):
        await self.handler(scope, receive, send)


class App:
    """The ASGI app of ``fanin serve``: POST /predict straight to its handler, everything else (the other
    endpoints, 404/405, the lifespan) through the Starlette app ``starlette``."""

    def __init__(self, predict, starlette: Starlette):
        self.predict, self.starlette = predict, starlette

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and _route_path(scope) == "/predict":
            await self.predict(scope, receive, send)
        else:
            await self.starlette(scope, receive, send)


def _route_path(scope) -> str:
    """The path below the app's mount point (ASGI ``root_path``), as Starlette's router matches it."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _content_headers(headers) -> tuple:
    """(Content-Type, Content-Length or None) from ASGI's raw header pairs (names arrive lower-cased)."""
    ctype, length = "", None
    for key, value in headers:
        if key == b"content-type":
            ctype = value.decode("latin-1")
        elif key == b"content-length":
            length = value.decode("latin-1")
    return ctype, length


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def _error(status: int, message: str) -> Response:
    return Response(_error_body(message), status_code=status, media_type="application/json")


@contextlib.contextmanager
def _numba_threads(n):
    """``n`` Numba threads for the calls made on this thread (the event loop's, for the batcher's inline calls)
    inside the block, the thread's own setting restored after: the app may be mounted in someone else's service."""
    import numba

    want, prev = min(n, numba.config.NUMBA_NUM_THREADS), numba.get_num_threads()
    if prev == want:
        yield
        return
    numba.set_num_threads(want)
    try:
        yield
    finally:
        numba.set_num_threads(prev)


def _set_threads(n):
    if n is not None:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
