"""fanin serve: a real server (``fanin serve`` in a subprocess, ephemeral port) and a real HTTP client.

Answers equal ``Network.predict``; every bad request gets its 4xx and the server keeps serving; concurrent
clients get their own rows under dynamic batching; --workers 2 serves; SIGTERM drains a request in flight;
a bad model file stops the server at start. The batcher is also tested on its own, without HTTP.
"""
import asyncio
import concurrent.futures
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("prometheus_client", reason="the serve extra is not installed (pip install -e '.[serve]')")

import fanin  # noqa: E402
from fanin import models  # noqa: E402
from fanin.serve.batcher import Batcher  # noqa: E402

WIDTH = 100


class Server:
    """``fanin serve MODEL --port 0 ARGS`` in a subprocess; ``url`` once it says it is ready."""

    def __init__(self, model, *args, timeout=90):
        self.proc = subprocess.Popen([sys.executable, "-m", "fanin.cli", "serve", str(model), "--port", "0", *args],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.lines = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"on http://([\d.]+):(\d+)", line)
            if m:
                self.host, self.port = m.group(1), int(m.group(2))
                threading.Thread(target=self._drain, daemon=True).start()
                return
        self.proc.kill()
        raise AssertionError(f"fanin serve did not start: {''.join(self.lines)}")

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def request(self, method, path, body=None, headers=None, conn=None):
        own = conn is None
        conn = conn or http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.read(), r.getheader("content-type")
        finally:
            if own:
                conn.close()

    def predict(self, x, proba=False, npy=False, conn=None):
        if npy:
            buf = io.BytesIO()
            np.save(buf, x)
            body, ctype = buf.getvalue(), "application/x-npy"
        else:
            body, ctype = json.dumps({"inputs": np.asarray(x).tolist()}), "application/json"
        status, data, _ = self.request("POST", "/predict" + ("?proba=1" if proba else ""), body,
                                       {"Content-Type": ctype}, conn)
        return status, json.loads(data)

    def stop(self, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "model.fanin"
    fanin.save(models.mlp([WIDTH, 64, 32, 10], sparsity=[0.9, None, 0.5], seed=0), path)
    return path


@pytest.fixture(scope="module")
def net(model_path):
    return fanin.load(model_path)


@pytest.fixture(scope="module")
def server(model_path):
    s = Server(model_path, "--max-rows", "16", "--max-body-mb", "0.0625", "--max-wait-ms", "20")
    yield s
    assert s.stop() == 0


def rows(n, seed):
    return np.random.default_rng(seed).standard_normal((n, WIDTH)).astype(np.float32)


def close(got, want):
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-5, atol=1e-5)


def test_answers_equal_network_predict_in_json_and_npy(server, net):
    x = rows(5, 0)
    for npy in (False, True):
        status, out = server.predict(x, npy=npy)
        assert status == 200, out
        close(out["logits"], net.predict(x))
        assert out["classes"] == net.predict(x).argmax(axis=1).tolist()
        status, out = server.predict(x, proba=True, npy=npy)
        assert status == 200
        close(out["probabilities"], net.predict_proba(x))
    status, out = server.predict(x[0])  # one sample of the input shape: one row back
    assert status == 200 and np.shape(out["logits"]) == (1, 10)
    close(out["logits"], net.predict(x[:1]))
    status, out = server.predict(x[:0].tolist())  # no rows
    assert status == 200 and out == {"logits": [], "classes": []}
    status, out = server.predict(x.astype(np.float64), npy=True)  # float64 converted, as predict does
    assert status == 200
    close(out["logits"], net.predict(x))


def test_healthz_info_metrics(server, net):
    status, body, _ = server.request("GET", "/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    status, body, _ = server.request("GET", "/info")
    info = json.loads(body)
    assert status == 200 and info["input_shape"] == [WIDTH] and info["classes"] == 10
    assert info["weights"] == net.info()["weights"] and info["server"]["max_rows"] == 16
    assert info["server"]["inline_ms"] == 0.25 and info["server"]["max_wait_ms"] == 20
    server.predict(rows(2, 1))
    status, body, ctype = server.request("GET", "/metrics")
    text = body.decode()
    assert status == 200 and ctype.startswith("text/plain")
    for name in ("fanin_requests_total", "fanin_request_seconds_bucket", "fanin_batch_rows_bucket",
                 "fanin_predict_seconds_count"):
        assert name in text
    assert re.search(r'fanin_requests_total\{code="200",endpoint="/predict"\} [1-9]', text)


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


JSON = {"Content-Type": "application/json"}
NPY = {"Content-Type": "application/x-npy"}
BAD = {
    "malformed json": ("POST", "/predict", b'{"inputs": [[1, 2]', JSON, 400, "not valid JSON"),
    "no inputs key": ("POST", "/predict", b'{"x": [[1]]}', JSON, 400, '"inputs"'),
    "json not an object": ("POST", "/predict", b"[1, 2, 3]", JSON, 400, '"inputs"'),
    "wrong width": ("POST", "/predict", json.dumps({"inputs": [[0.0] * (WIDTH - 1)]}), JSON, 422, "shape (1, 99)"),
    "wrong rank": ("POST", "/predict", json.dumps({"inputs": [[[0.0] * WIDTH]]}), JSON, 422, "shape (1, 1, 100)"),
    "ragged rows": ("POST", "/predict", json.dumps({"inputs": [[0.0] * WIDTH, [0.0]]}), JSON, 422, "rectangular"),
    "strings": ("POST", "/predict", json.dumps({"inputs": [["a"] * WIDTH]}), JSON, 422, "rectangular"),
    "huge integer": ("POST", "/predict", json.dumps({"inputs": [[10 ** 400] + [0] * (WIDTH - 1)]}), JSON, 422,
                     "integer too large"),
    "nan in json": ("POST", "/predict", '{"inputs": [[NaN' + ", 0" * (WIDTH - 1) + "]]}", JSON, 422, "NaN or Inf"),
    "inf in npy": ("POST", "/predict", _npy(np.full((2, WIDTH), np.inf, np.float32)), NPY, 422, "row(s) [0, 1]"),
    "npy int dtype": ("POST", "/predict", _npy(np.zeros((1, WIDTH), np.int64)), NPY, 422, "dtype int64"),
    "npy garbage": ("POST", "/predict", b"\x93NUMPY garbage", NPY, 400, "not a .npy array"),
    "npy object": ("POST", "/predict", b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, "
                   b"'shape': (1,), }" + b" " * 51 + b"\n", NPY, 400, "not a .npy array"),
    "wrong content type": ("POST", "/predict", b"1,2,3", {"Content-Type": "text/csv"}, 415, "text/csv"),
    "no content type": ("POST", "/predict", b"{}", {}, 415, "content type"),
    "too many rows": ("POST", "/predict", _npy(np.zeros((17, WIDTH), np.float32)), NPY, 413, "17 rows"),
    "body too large": ("POST", "/predict", b" " * 70000, JSON, 413, "at most 65536"),
    "bad proba": ("POST", "/predict?proba=maybe", json.dumps({"inputs": [[0.0] * WIDTH]}), JSON, 400, "proba"),
    "numeric strings": ("POST", "/predict", json.dumps({"inputs": [["0.5"] * WIDTH]}), JSON, 422, "got strings"),
    "booleans": ("POST", "/predict", json.dumps({"inputs": [[True] * WIDTH]}), JSON, 422, "got booleans"),
    "nulls": ("POST", "/predict", json.dumps({"inputs": [[None] * WIDTH]}), JSON, 422, "strings or nulls"),
    "beyond float32": ("POST", "/predict", json.dumps({"inputs": [[1e39] + [0] * (WIDTH - 1)]}), JSON, 422,
                       "beyond float32's range"),
    "overflow inside": ("POST", "/predict", json.dumps({"inputs": [[3e38] * WIDTH]}), JSON, 422,
                        "outputs overflow float32"),
    "npy huge shape": ("POST", "/predict", b"\x93NUMPY\x01\x00F\x00" + b"{'descr': '<f4', 'fortran_order': False, "
                       b"'shape': (10000000000,), }".ljust(69) + b"\n", NPY, 400, "declares shape (10000000000,)"),
    "npy short data": ("POST", "/predict", _npy(np.zeros((3, WIDTH), np.float32)).replace(b"(3, ", b"(2, "), NPY, 400,
                       "declares shape (2, 100)"),
    "npy trailing junk": ("POST", "/predict", _npy(np.zeros((1, WIDTH), np.float32)) + b"junk", NPY, 400,
                          "bytes of data follow"),
    "slash redirect": ("GET", "/healthz/", None, {"Host": "evil.example"}, 404, "endpoints"),
    "wrong method": ("GET", "/predict", None, {}, 405, "POST /predict"),
    "no such endpoint": ("GET", "/nope", None, {}, 404, "endpoints"),
}


def test_an_oversized_body_is_refused_and_its_connection_closed(server):
    """The 413 comes before the body is read, so the connection cannot carry another request: the answer says
    `Connection: close` and the server closes it (a client reusing it would otherwise wait for ever)."""
    import socket

    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 17825792\r\nExpect: 100-continue\r\n\r\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break  # closed by the server
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 413") and b"connection: close" in head, data[:300]
    assert server.request("GET", "/healthz")[0] == 200


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_its_4xx_and_the_server_keeps_serving(server, net, case):
    method, path, body, headers, status, fragment = BAD[case]
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    got, data, ctype = server.request(method, path, body, headers, conn)
    assert got == status, data
    assert ctype == "application/json"
    message = json.loads(data)["error"]
    assert fragment in message and "\n" not in message and len(message) < 300
    if got == 413:  # the rest of a refused body may still be on the wire: a fresh connection
        conn.close()
        conn = None
    x = rows(2, 3)
    got, out = server.predict(x, conn=conn)
    assert got == 200
    close(out["logits"], net.predict(x))
    if conn is not None:
        conn.close()


def test_chunked_bodies_without_a_length_are_read_whole_and_limited(server, net):
    """No Content-Length (Transfer-Encoding: chunked): the body arrives in pieces; the limit still holds."""
    x = rows(3, 5)
    body = _npy(x)
    pieces = [body[i:i + 700] for i in range(0, len(body), 700)]
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.request("POST", "/predict", body=iter(pieces), headers=NPY, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 200
    close(json.loads(r.read())["logits"], net.predict(x))
    conn.close()
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.request("POST", "/predict", body=iter([b" " * 40000] * 2), headers=JSON, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and "over 65536 bytes" in json.loads(r.read())["error"]
    conn.close()
    assert server.predict(x)[0] == 200


def concurrent_clients(server, net, n_threads=16, rounds=4):
    """Each thread sends its own distinct rows (1-3 per request) several times; every answer must be its own."""

    def client(t):
        conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        for r in range(rounds):
            x = rows(1 + (t + r) % 3, seed=1000 * t + r)
            status, out = server.predict(x, npy=(t + r) % 2 == 0, conn=conn)
            assert status == 200, out
            close(out["logits"], net.predict(x))
        conn.close()
        return True

    with concurrent.futures.ThreadPoolExecutor(n_threads) as pool:
        assert all(pool.map(client, range(n_threads)))


def batch_stats(server):
    text = server.request("GET", "/metrics")[1].decode()
    calls = float(re.search(r"^fanin_batch_rows_count (\S+)", text, re.M).group(1))
    total = float(re.search(r"^fanin_batch_rows_sum (\S+)", text, re.M).group(1))
    return calls, total


def test_concurrent_clients_get_their_own_rows_under_dynamic_batching(server, net):
    before = batch_stats(server)
    concurrent_clients(server, net)
    calls, total = (a - b for a, b in zip(batch_stats(server), before))
    assert total == sum(1 + (t + r) % 3 for t in range(16) for r in range(4))  # every row predicted once
    assert calls < 64  # fewer predict calls than requests: requests were stacked


@pytest.mark.parametrize("workers", ["1", "2"])
def test_no_batching_then_sigterm_drains_a_request_in_flight(model_path, net, workers):
    s = Server(model_path, "--max-batch", "1", "--workers", workers)
    try:
        before = batch_stats(s)
        concurrent_clients(s, net, n_threads=8, rounds=2)
        calls, total = (a - b for a, b in zip(batch_stats(s), before))
        assert calls == 16  # one predict call per request

        x = rows(3, 7)
        body = json.dumps({"inputs": x.tolist()}).encode()
        sock = socket.create_connection((s.host, s.port), timeout=30)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:100])
        time.sleep(0.3)  # the request is being read
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        assert s.proc.poll() is None  # still there: waiting for the request in flight
        # a new client is refused at once, not queued for a drain that will never serve it (the supervisor of
        # several workers held the listening socket open until they had all exited)
        t0 = time.monotonic()
        try:
            with socket.create_connection((s.host, s.port), timeout=5) as late:
                late.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert not late.recv(100).startswith(b"HTTP/1.1 200")
        except OSError:
            pass
        assert time.monotonic() - t0 < 4
        sock.sendall(body[100:])
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < _length(reply):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        sock.close()
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        close(json.loads(reply.split(b"\r\n\r\n", 1)[1])["logits"], net.predict(x))
        assert s.proc.wait(30) == 0
        with pytest.raises(OSError):
            socket.create_connection((s.host, s.port), timeout=5)
    finally:
        s.stop()


def _length(reply):
    m = re.search(rb"content-length: (\d+)", reply, re.I)
    return int(m.group(1)) if m else 1 << 30


def children(pid):
    path = f"/proc/{pid}/task/{pid}/children"
    return [int(p) for p in open(path).read().split()] if os.path.exists(path) else []


def test_two_workers_serve_and_stop(model_path, net):
    s = Server(model_path, "--workers", "2")
    try:
        kids = children(s.proc.pid)
        assert len(kids) >= 2
        pids = set()
        for i in range(12):
            x = rows(2, 50 + i)
            status, out = s.predict(x)
            assert status == 200
            close(out["logits"], net.predict(x))
            info = json.loads(s.request("GET", "/info")[1])
            assert info["server"]["workers"] == 2
            pids.add(info["server"]["pid"])
        assert pids <= set(kids)
        concurrent_clients(s, net, n_threads=8, rounds=2)
        assert s.stop() == 0
        assert not any(alive(k) for k in pids)  # the workers drained and exited with the supervisor
    finally:
        s.stop()


def test_a_server_reachable_from_other_machines_says_what_it_does_not_guard(model_path, net):
    from fanin.serve.server import exposure_note

    assert exposure_note("127.0.0.1") == exposure_note("::1") == ""
    assert all("reverse proxy" in exposure_note(h) for h in ("0.0.0.0", "::", "192.168.1.7"))
    s = Server(model_path, "--host", "0.0.0.0")
    try:
        assert s.predict(rows(1, 3))[0] == 200
        assert s.stop() == 0
        time.sleep(0.2)  # the drain thread reads the rest of stderr
        assert any("reachable from other machines" in line for line in s.lines)
    finally:
        s.stop()


def alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read()
    except OSError:
        return False


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_bad_model_file_stops_the_server_at_start(tmp_path, model_path, workers):
    bad = tmp_path / "bad.fanin"
    data = bytearray(model_path.read_bytes())
    data[-5] ^= 0xFF  # corrupt: the checksum no longer matches
    bad.write_bytes(bytes(data))
    r = subprocess.run([sys.executable, "-m", "fanin.cli", "serve", str(bad), "--port", "0", "--workers", workers],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "checksum does not match" in lines[0] and lines[0].startswith("fanin: ")


def test_a_missing_model_file_and_bad_arguments_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fanin.cli", "serve", str(tmp_path / "none.fanin"), "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no model file" in r.stderr
    r = subprocess.run([sys.executable, "-m", "fanin.cli", "serve", "m.fanin", "--max-batch", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- the batcher alone
def run_batcher(sizes, max_batch, max_wait_ms=50.0, fail_on=None):
    """Submit requests of ``sizes`` rows at once; (each caller's result, the batch sizes predict saw)."""
    seen = []

    def predict(x):
        seen.append(len(x))
        if fail_on is not None and fail_on in x[:, 0]:
            raise ValueError("boom")
        return x * 2

    async def main():
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            b = Batcher(predict, ex, max_batch=max_batch, max_wait_ms=max_wait_ms)
            await b.start()
            xs = [np.full((n, 3), i, np.float32) for i, n in enumerate(sizes)]
            out = await asyncio.gather(*(b.predict(x) for x in xs), return_exceptions=True)
            await b.stop()
            return xs, out

    xs, out = asyncio.run(main())
    return xs, out, seen


def test_batcher_stacks_up_to_max_batch_and_returns_each_its_rows():
    xs, out, seen = run_batcher([1, 2, 3, 1, 5, 20, 2], max_batch=8)
    for x, y in zip(xs, out):
        np.testing.assert_array_equal(y, x * 2)
    assert seen == [7, 5, 20, 2]  # in arrival order, never over 8 rows unless one request is larger alone


def test_batcher_off_and_errors():
    xs, out, seen = run_batcher([1, 2, 3], max_batch=1)
    assert seen == [1, 2, 3] and all((y == x * 2).all() for x, y in zip(xs, out))
    xs, out, seen = run_batcher([1, 1, 1, 2], max_batch=3, fail_on=1.0)  # the batch [0, 1, 2] fails as a whole
    assert seen == [3, 2] and all(isinstance(o, ValueError) for o in out[:3]) and (out[3] == xs[3] * 2).all()


def test_batcher_does_not_wait_when_full_and_waits_when_not():
    t0 = time.perf_counter()
    run_batcher([4, 4], max_batch=8, max_wait_ms=2000)
    assert time.perf_counter() - t0 < 1.0  # full at once: no wait
    t0 = time.perf_counter()
    run_batcher([1], max_batch=8, max_wait_ms=200)
    assert time.perf_counter() - t0 >= 0.19  # alone: waits for company until max_wait_ms


def run_inline(sizes_per_round, max_batch, inline_ms, rounds=3):
    """Rounds of concurrent requests through a Batcher; per call: (rows, ran on the event loop's thread)."""
    calls = []

    def predict(x):
        calls.append((len(x), threading.get_ident() == loop_thread))
        return x + 1

    async def main():
        nonlocal loop_thread
        loop_thread = threading.get_ident()
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            b = Batcher(predict, ex, max_batch=max_batch, max_wait_ms=50.0, inline_ms=inline_ms)
            await b.start()
            for _ in range(rounds):
                xs = [np.full((n, 2), i, np.float32) for i, n in enumerate(sizes_per_round)]
                out = await asyncio.gather(*(b.predict(x) for x in xs))
                for x, y in zip(xs, out):
                    np.testing.assert_array_equal(y, x + 1)
            await b.stop()
            return b

    loop_thread = None
    b = asyncio.run(main())
    return calls, b


def test_batcher_runs_short_calls_on_the_loop_once_measured():
    calls, b = run_inline([1, 2], max_batch=8, inline_ms=1000.0)
    assert [rows for rows, _ in calls] == [3, 3, 3]
    assert [inline for _, inline in calls] == [False, True, True]  # measured once in the executor, then inline
    assert b.inline_calls == 2 and b.executor_calls == 1 and b.expected_seconds(3) is not None
    assert b.expected_seconds(4) is not None and b.expected_seconds(5) is None  # size classes: powers of two


def test_batcher_keeps_long_queued_and_unbatched_calls_off_the_loop():
    calls, b = run_inline([1, 2], max_batch=8, inline_ms=0.0)  # inline off
    assert not any(inline for _, inline in calls) and b.inline_calls == 0
    calls, b = run_inline([1, 2], max_batch=8, inline_ms=1e-9)  # every call takes longer than that
    assert not any(inline for _, inline in calls)
    calls, b = run_inline([1, 1], max_batch=1, inline_ms=1000.0)  # batching off: always the executor
    assert len(calls) == 6 and not any(inline for _, inline in calls)
    calls, b = run_inline([2, 2, 2], max_batch=4, inline_ms=1000.0)  # a request left queued: the loop keeps reading
    assert [rows for rows, _ in calls] == [4, 2] * 3
    assert [inline for _, inline in calls] == [False, False, False, True, False, True]


def test_the_app_sends_post_predict_past_starlette_and_the_rest_through_it():
    from fanin.serve.app import App

    seen = []

    async def handler(scope, receive, send):
        seen.append(("predict", scope.get("path")))

    async def inner(scope, receive, send):
        seen.append(("starlette", scope.get("path")))

    app = App(handler, inner)
    for scope in ({"type": "http", "method": "POST", "path": "/predict"},
                  {"type": "http", "method": "POST", "path": "/m/predict", "root_path": "/m"},
                  {"type": "http", "method": "GET", "path": "/predict"},
                  {"type": "http", "method": "POST", "path": "/m/predict"},
                  {"type": "lifespan"}):
        asyncio.run(app(scope, None, None))
    assert [k for k, _ in seen] == ["predict", "predict", "starlette", "starlette", "starlette"]


def test_serve_config_and_cli_refuse_a_bad_inline_ms(tmp_path):
    from fanin.serve import ServeConfig

    assert ServeConfig().inline_ms == 0.25
    with pytest.raises(ValueError, match="inline_ms"):
        ServeConfig(inline_ms=-1)
    r = subprocess.run([sys.executable, "-m", "fanin.cli", "serve", str(tmp_path / "m.fanin"), "--inline-ms", "-2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--inline-ms" in r.stderr
    # upper limits and an empty host are refused up front, naming the command-line flag
    for kw, flag in ((dict(max_batch=10**8), "--max-batch"), (dict(workers=1000), "--workers"),
                     (dict(host=""), "--host"), (dict(max_body=2 << 30), "--max-body-mb"),
                     (dict(threads=0), "--threads"), (dict(max_rows=0), "--max-rows")):
        with pytest.raises(ValueError, match=flag):
            ServeConfig(**kw)
    assert ServeConfig(max_batch=1 << 16, workers=256).max_batch == 1 << 16


TRICKY_JSON = [b'{"inputs": [[1, 2.5, -3e-7]]}', b'{"inputs": [[NaN, Infinity, -Infinity]]}', b'{"inputs": [[1e400, 0, 1]]}',
               b'{"inputs": [[' + b"9" * 30 + b", 18446744073709551616, -9223372036854775809]]}", b"\xef\xbb\xbf{}",
               '{"inputs": [[1, 2, 3]]}'.encode("utf-16"), b'{"inputs": [[1, 2, 3,]]}', b'{"inputs": 1, "inputs": [[1, 2, 3]]}',
               b"[" * 5000 + b"]" * 5000, b'"\\ud800"', b"", b'{"inputs": [[0.1, 0.2, 0.3]], }', b"  {}  ",
               b'{"inputs": [["1", 2, 3]]}', b"\x00", b"nul", b'{"x": "\xff"}', b'{"inputs": [[1, 2, 3], [4, 5]]}',
               b'{"inputs": [[true, false, null]]}', b'{"inputs": [1, 2, 3]}', b'{"inputs": [[1' + b"0" * 400 + b', 2, 3]]}']


def _decoded(body):
    from fanin.serve.app import RequestError, decode_inputs

    try:
        x = decode_inputs(body, "application/json", (3,), 16, check_finite=True)
        return "ok", x.dtype.str, x.shape, x.tobytes()
    except RequestError as exc:
        return "refused", exc.status, str(exc)


@pytest.mark.parametrize("body", TRICKY_JSON, ids=range(len(TRICKY_JSON)))
def test_the_fast_json_decoder_gives_what_the_standard_library_gives(body, monkeypatch):
    """orjson (the serve extra) or not, a JSON body decodes to the same array, or is refused the same way."""
    from fanin.serve import app

    pytest.importorskip("orjson")
    fast = _decoded(body)
    monkeypatch.setattr(app, "orjson", None)
    assert fast == _decoded(body)


def test_the_fast_json_encoder_writes_what_the_standard_library_reads_back():
    from fanin.serve.app import json_dumps

    y = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)
    doc = {"logits": y.tolist(), "classes": y.argmax(axis=1).tolist()}
    assert json.loads(json_dumps(doc)) == doc


def test_inline_calls_set_the_loop_threads_numba_count_and_restore_it():
    import numba

    from fanin.serve.app import _numba_threads

    top = numba.config.NUMBA_NUM_THREADS
    before = numba.get_num_threads()
    with _numba_threads(1):
        assert numba.get_num_threads() == 1
    assert numba.get_num_threads() == before
    with _numba_threads(top + 5):  # capped at what Numba started
        assert numba.get_num_threads() == top
    assert numba.get_num_threads() == before
