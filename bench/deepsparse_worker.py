"""DeepSparse side of bench/bench_inference.py: runs in its own virtualenv (``make deepsparse-venv``).

DeepSparse 1.8 ships wheels for CPython 3.11 only and pins onnx < 1.15 (so NumPy 1.x); fanin's
environment has NumPy 2, so the benchmark drives DeepSparse in this separate process. It speaks
one JSON object per line: requests on stdin, one answer per request on the file descriptor that was
stdout when it started (everything else printed to stdout, the engine's banners included, goes to
stderr). Nothing in this file imports fanin.

Requests:

- ``{"cmd": "info"}`` -> versions and the CPU DeepSparse sees;
- ``{"cmd": "load", "name": N, "onnx": PATH, "batch": B, "cores": C, "x": X.npy, "out": Y.npy}`` -> compiles
  an engine for batch B on C cores, runs it on the input in X.npy and saves the first output to Y.npy
  (the benchmark checks it against its reference before timing anything);
- ``{"cmd": "time", "name": N, "batch": B, "min_time": S, "min_reps": R, "warmup": W}`` -> the median seconds
  per ``engine.run`` over at least R calls and S seconds (the benchmark asks once per interleaved round,
  so DeepSparse shares every round's machine state with the in-process contenders);
- ``{"cmd": "quit"}``.

Every answer has ``"ok"``; a failed request answers ``{"ok": false, "error": ...}`` and the worker goes on.

    .venv-deepsparse/bin/python bench/deepsparse_worker.py --selftest   # one tiny model, prints the result
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback


def _protocol_stream():
    """A text stream on the original stdout; fd 1 (and sys.stdout) then point at stderr."""
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "w", buffering=1)


def median_time(fn, min_time, min_reps, warmup):
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) > 100000:
            break
    times.sort()
    n = len(times)
    return (times[n // 2] if n % 2 else 0.5 * (times[n // 2 - 1] + times[n // 2])), n


class Worker:
    def __init__(self):
        self.engines = {}  # (name, batch) -> (engine, input array)

    def info(self, req):
        import deepsparse
        import numpy as np
        import onnx

        out = {"deepsparse": deepsparse.__version__, "numpy": np.__version__, "onnx": onnx.__version__,
               "python": sys.version.split()[0]}
        try:
            from deepsparse.cpu import cpu_architecture

            arch = cpu_architecture()
            out["cpu"] = {k: arch[k] for k in ("vendor_model", "isa", "vnni", "num_cores", "available_num_cores")
                          if k in arch}
        except Exception as exc:  # noqa: BLE001 - informative only
            out["cpu"] = f"unknown ({exc})"
        return out

    def load(self, req):
        import numpy as np
        from deepsparse import compile_model

        x = np.ascontiguousarray(np.load(req["x"]), dtype=np.float32)
        batch = int(req["batch"])
        if x.shape[0] != batch:
            raise ValueError(f"input {req['x']} has batch {x.shape[0]}, not {batch}")
        t0 = time.perf_counter()
        engine = compile_model(req["onnx"], batch_size=batch, num_cores=int(req.get("cores", 2)))
        compile_s = time.perf_counter() - t0
        y = engine.run([x])[0]
        np.save(req["out"], np.asarray(y, dtype=np.float32))
        self.engines[(req["name"], batch)] = (engine, x)
        return {"compile_s": compile_s, "engine": str(engine).splitlines()[0][:300]}

    def time(self, req):
        engine, x = self.engines[(req["name"], int(req["batch"]))]
        inputs = [x]
        med, n = median_time(lambda: engine.run(inputs), float(req.get("min_time", 0.3)), int(req.get("min_reps", 3)),
                             int(req.get("warmup", 1)))
        return {"median_s": med, "calls": n}


def serve():
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
    proto = _protocol_stream()
    w = Worker()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
            cmd = req.get("cmd")
            if cmd == "quit":
                proto.write(json.dumps({"ok": True}) + "\n")
                break
            if cmd not in ("info", "load", "time"):
                raise ValueError(f"unknown command {cmd!r}")
            ans = {"ok": True, **getattr(w, cmd)(req)}
        except Exception as exc:  # noqa: BLE001 - reported to the benchmark, which skips the contender
            ans = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        proto.write(json.dumps(ans) + "\n")


def selftest():
    """Compile a 2-layer MLP built with the onnx helper API and compare with NumPy."""
    import tempfile

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((16, 8), dtype=np.float32), rng.standard_normal(16, dtype=np.float32)
    w2, b2 = rng.standard_normal((4, 16), dtype=np.float32), rng.standard_normal(4, dtype=np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1.T.copy(), "w1"), (b1, "b1"), (w2.T.copy(), "w2"), (b2, "b2"))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
             helper.make_node("Add", ["h3", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "selftest", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = rng.standard_normal((4, 8), dtype=np.float32)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.onnx")
        onnx.save(model, path)
        w = Worker()
        print(json.dumps(w.info({})))
        np.save(os.path.join(d, "x.npy"), x)
        print(json.dumps(w.load({"name": "t", "onnx": path, "batch": 4, "cores": 2, "x": os.path.join(d, "x.npy"),
                                 "out": os.path.join(d, "y.npy")})))
        y = np.load(os.path.join(d, "y.npy"))
    ref = np.maximum(x @ w1.T + b1, 0) @ w2.T + b2
    err = float(np.abs(y - ref).max())
    print(f"max |deepsparse - numpy| = {err:.2e}")
    return 0 if err < 1e-3 else 1


if __name__ == "__main__":
    if "--selftest" in sys.argv:
        sys.exit(selftest())
    serve()
