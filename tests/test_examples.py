"""examples/: the programs a user copies run and answer what the Network computes."""
import http.client
import importlib.util
import json
import pathlib
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e '.[serve]')")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e '.[serve]')")

import fanin  # noqa: E402

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def post(port, path, doc):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, json.dumps(doc), {"Content-Type": "application/json"})
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out


def test_starlette_example_serves_the_network(tmp_path, monkeypatch):
    path = tmp_path / "model.fanin"
    fanin.save(fanin.models.mlp([40, 16, 10], sparsity=0.8, seed=0), path)
    net = fanin.load(path)
    monkeypatch.setenv("FANIN_MODEL", str(path))
    example = load_example("starlette_app")
    app = example.create_app()  # the way `uvicorn --factory examples.starlette_app:create_app` calls it

    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        x = np.random.default_rng(0).standard_normal((5, 40)).astype(np.float32)
        status, out = post(port, "/classify", {"images": x.tolist()})
        assert status == 200
        proba = net.predict_proba(x)
        assert out["labels"] == [example.LABELS[i] for i in proba.argmax(axis=1)]
        np.testing.assert_allclose(out["confidence"], proba.max(axis=1), atol=1e-4)
        status, out = post(port, "/classify", {"images": [[0.0] * 39]})
        assert status == 422 and "shape" in out["error"]
        status, out = post(port, "/classify", {"pixels": []})
        assert status == 400
        status, out = post(port, "/classify", {"images": x[0].tolist()})  # one image
        assert status == 200 and len(out["labels"]) == 1
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
