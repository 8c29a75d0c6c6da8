"""Serving benchmark (issue 13): `fanin serve` under load from wrk on loopback.

Contenders, all the MLP 784-1024-1024-10, each in its own server process:

- fanin dense (fp32), fanin SRigL-90 % (ERK fan-ins, trained a few steps with SRigL), fanin SRigL-90 % int8
  (``runtime.quantize(plan, 8)``), and that int8 network with int8 activations (``--activations int8``):
  ``fanin serve`` (Uvicorn; Starlette but for POST /predict), with dynamic batching (``--max-batch 64 --max-wait-ms 2``) and without
  (``--max-batch 1``);
- ONNX Runtime fp32 on the dense weights (MatMul + Add + Relu graph), in the *same* server stack (fanin.serve's
  app, batcher and workers with an ORT session as the predictor): the baseline a user would otherwise deploy;
- the standard library's ``http.server`` (ThreadingHTTPServer, HTTP/1.1 keep-alive) serving the SRigL-90 %
  network, one predict per request: the stack fanin serve did not choose.

wrk (``apt-get install wrk``) sends POST /predict with a one-row .npy body over 1, 8 and 64 keep-alive
connections for a bounded time per cell; the table reports requests/s, latency p50/p99 (wrk's), errors
(socket errors + non-2xx answers), the mean rows per predict call and the mean time of a predict call (both
from the server's /metrics). At the end, the issue's target cell (SRigL-90 %, batching, concurrency 8) and its
ONNX Runtime baselines (batching on and off) run ``--target-duration`` seconds each, in slices taken in turn.

    python bench/bench_serve.py --out bench/RESULTS.md          # about 15 min
    python bench/bench_serve.py --quick                         # 2 s cells: a smoke run
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

import fanin  # noqa: E402

SIZES = [784, 1024, 1024, 10]
SECTION = "Serving (issue 13)"


# ------------------------------------------------------------------ models
def srigl_mlp(steps: int, seed: int = 0):
    """MLP at 90 % sparsity, SRigL ERK fan-ins, ``steps`` SGD+SRigL steps on random data (speed needs only the shapes)."""
    from fanin import ops, optim, sparsity

    model = fanin.models.mlp(SIZES, sparsity=0.9, seed=seed)
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    srigl = sparsity.SRigL(model, opt, sparsity=0.9, distribution="erk", delta_t=max(1, steps // 4),
                           total_steps=max(2, steps))
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = rng.standard_normal((128, SIZES[0])).astype(np.float32)
        loss = ops.cross_entropy(model(fanin.Tensor(x)), rng.integers(0, SIZES[-1], 128))
        opt.zero_grad()
        loss.backward()
        opt.step()
        srigl.step()
    model.eval()
    return model


def onnx_mlp(net, path):
    """A dense fp32 ONNX graph (MatMul, Add, Relu) of a dense fanin MLP ``net``, batch dimension 'N'."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, name = [], [], "x"
    for i, op in enumerate(net.plan["ops"]):
        w = np.ascontiguousarray(np.asarray(op["arrays"]["values"], np.float32).T)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.asarray(op["arrays"]["bias"]), f"b{i}")]
        nodes += [helper.make_node("MatMul", [name, f"w{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        name = f"a{i}"
        if op["act"] == "relu":
            nodes.append(helper.make_node("Relu", [name], [f"r{i}"]))
            name = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SIZES[0]])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", SIZES[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


class OrtPredictor:
    """An ONNX Runtime session with what fanin.serve needs of a network: predict, input_shape, n_classes, info."""

    def __init__(self, path, threads):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_shape, self.n_classes, self.nan_policy = (SIZES[0],), SIZES[-1], "raise"
        self.version = ort.__version__

    def predict(self, x):
        return self.session.run(None, {"x": x})[0]

    def info(self):
        return {"engine": f"onnxruntime {self.version} CPUExecutionProvider", "input_shape": list(self.input_shape),
                "classes": self.n_classes}


# ------------------------------------------------------------------ servers
def serve_ort(args):
    """Child mode: the ONNX model in fanin.serve's stack (same app, batcher, Uvicorn)."""
    from fanin.serve import ServeConfig
    from fanin.serve.server import serve

    config = ServeConfig(model=None, port=0, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                         inline_ms=args.inline_ms,
                         threads=args.threads)
    return serve(config, OrtPredictor(args.serve_ort, config.predict_threads()))


def serve_stdlib(args):
    """Child mode: http.server.ThreadingHTTPServer, HTTP/1.1 keep-alive, one predict per .npy request."""
    import http.server

    net = fanin.load(args.serve_stdlib)
    net.predict(np.zeros((1, *net.input_shape), np.float32))
    lock = threading.Lock()  # one predict at a time, as fanin serve's executor does

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            super().setup()  # no Nagle delay on the answer (else 40 ms per request with a delayed ACK)
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                x = np.load(io.BytesIO(body), allow_pickle=False).astype(np.float32, copy=False)
                with lock:
                    y = net.predict(x)
                out, code = json.dumps({"logits": y.tolist(), "classes": y.argmax(axis=1).tolist()}).encode(), 200
            except ValueError as exc:
                out, code = json.dumps({"error": str(exc)}).encode(), 422
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self._headers_buffer.append(b"\r\n" + out)  # headers and body in one send
            self.flush_headers()

        def log_message(self, *a):
            pass

    http.server.ThreadingHTTPServer.daemon_threads = True
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.request_queue_size = 2048
    signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=server.shutdown).start())
    print(f"stdlib server on http://127.0.0.1:{server.server_address[1]}", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


class Proc:
    """A server subprocess; ``url`` once its ready line arrived."""

    def __init__(self, cmd, env=None):
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.url = None
        self.log = []

    def wait_ready(self, timeout=300):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            m = re.search(r"on (http://[\d.]+:\d+)", line)
            if m:
                self.url = m.group(1)
                threading.Thread(target=lambda: [self.log.append(x) for x in self.proc.stderr], daemon=True).start()
                return self
        raise RuntimeError(f"server {' '.join(self.cmd)} did not start: {''.join(self.log)[-2000:]}")

    def counters(self):
        """(predict calls, rows, seconds in predict) so far, from /metrics (None for a server without them)."""
        host, port = self.url[7:].split(":")
        try:
            c = http.client.HTTPConnection(host, int(port), timeout=10)
            c.request("GET", "/metrics")
            text = c.getresponse().read().decode()
            c.close()
            return tuple(float(re.search(rf"^{name} (\S+)", text, re.M).group(1))
                         for name in ("fanin_batch_rows_count", "fanin_batch_rows_sum", "fanin_predict_seconds_sum"))
        except (OSError, AttributeError):
            return None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ------------------------------------------------------------------ load
LUA = """local f = io.open("{body}", "rb")
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "{ctype}"
"""


def wrk(url, connections, seconds, script):
    """wrk's numbers for one cell: requests/s, p50 and p99 (seconds), errors, requests."""
    cmd = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{max(1, round(seconds))}s", "--latency", "--timeout", "10s",
           "-s", str(script), url + "/predict"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    pct = {m.group(1): _seconds(m.group(2)) for m in re.finditer(r"^\s+(50|99)%\s+(\S+)", out, re.M)}
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = (sum(int(g) for g in sock.groups()) if sock else 0) + (int(non2xx.group(1)) if non2xx else 0)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return {"rps": rps, "p50": pct.get("50"), "p99": pct.get("99"), "errors": errors, "requests": total, "raw": out}


def _seconds(text):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(2)]


def measure(server, connections, seconds, script):
    """One wrk cell, with the rows per predict call and the time per predict call the server saw meanwhile."""
    before = server.counters()
    r = wrk(server.url, connections, seconds, script)
    after = server.counters()
    r["rows_per_call"] = r["predict_ms"] = None
    if before is not None and after is not None:
        calls = max(1.0, after[0] - before[0])
        r["rows_per_call"], r["predict_ms"] = (after[1] - before[1]) / calls, 1e3 * (after[2] - before[2]) / calls
    return r


def alternate(servers, keys, connections, seconds, slices, script):
    """``seconds`` of load for each server of ``keys``, in ``slices`` slices taken in turn (drifting background load
    hits them alike): total requests, requests/s, median p50, worst slice p99, errors, rows and ms per predict call."""
    parts = {k: [] for k in keys}
    for _ in range(slices):
        for k in keys:
            parts[k].append(measure(servers[k], connections, seconds / slices, script))
    out = {}
    for k, rs in parts.items():
        total = sum(r["requests"] for r in rs)
        out[k] = {"requests": total, "rps": total / sum(r["requests"] / r["rps"] for r in rs),
                  "p50": float(np.median([r["p50"] for r in rs])), "p99": max(r["p99"] for r in rs),
                  "errors": sum(r["errors"] for r in rs),
                  "rows_per_call": _mean([r["rows_per_call"] for r in rs]), "predict_ms": _mean([r["predict_ms"] for r in rs])}
    return out


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _f(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


# ------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per cell (default 20)")
    ap.add_argument("--target-duration", type=float, default=60.0,
                    help="seconds of the target cell and its ONNX Runtime baseline (default 60)")
    ap.add_argument("--slices", type=int, default=4,
                    help="each server's time in a cell is cut into this many slices, the servers taking turns, so "
                         "that drifting background load hits all alike (default 4)")
    ap.add_argument("--concurrency", default="1,8,64", help="wrk connections, comma-separated")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--inline-ms", type=float, default=0.25,
                    help="fanin serve --inline-ms, for every server of the run (ONNX Runtime's too; default 0.25)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes of the fanin servers (default 1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="predict threads per server, fanin's and ONNX Runtime's alike (default: fanin serve's)")
    ap.add_argument("--train-steps", type=int, default=40, help="SRigL steps that shape the sparse model")
    ap.add_argument("--quick", action="store_true", help="2 s cells, 5 s target: a smoke run")
    ap.add_argument("--out", default=None, help=f"write the section '{SECTION}' into this markdown file")
    ap.add_argument("--serve-ort", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--serve-stdlib", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_ort:
        return serve_ort(args)
    if args.serve_stdlib:
        return serve_stdlib(args)
    if args.quick:
        args.duration, args.target_duration, args.slices = 2.0, 4.0, 2
    if shutil.which("wrk") is None:
        sys.exit("bench_serve: wrk is not installed (apt-get install wrk).")
    from fanin.serve import missing_extra

    if missing_extra():
        sys.exit(f"bench_serve: {missing_extra()}")
    conc = [int(c) for c in args.concurrency.split(",")]
    lines = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    up0 = uptime()
    work = pathlib.Path(tempfile.mkdtemp(prefix="fanin-bench-serve-"))
    try:
        t0 = time.perf_counter()
        dense_net = fanin.compile(fanin.models.mlp(SIZES, seed=0))
        srigl_net = fanin.compile(srigl_mlp(args.train_steps))
        int8_net = fanin.runtime.Network(fanin.runtime.quantize(srigl_net.plan, 8))
        files = {}
        for name, net in (("dense", dense_net), ("srigl90", srigl_net), ("srigl90-int8", int8_net)):
            files[name] = fanin.save(net, work / f"{name}.fanin")
        onnx_note = None
        try:
            import onnxruntime

            onnx_mlp(dense_net, work / "dense.onnx")
            onnx_note = f"onnxruntime {onnxruntime.__version__}"
        except ImportError as exc:
            onnx_note = None
            log(f"ONNX Runtime baseline skipped: {exc} (pip install -e '.[bench]')")
        fan_ins = "/".join(str(l["fan_in"]) for l in srigl_net.info()["layers"] if "fan_in" in l)
        build_s = time.perf_counter() - t0
        x = np.random.default_rng(0).standard_normal((1, SIZES[0])).astype(np.float32)
        np.save(work / "row.npy", x)
        script = work / "post_npy.lua"
        script.write_text(LUA.format(body=work / "row.npy", ctype="application/x-npy"))
        (work / "row.json").write_text(json.dumps({"inputs": x.tolist()}))
        script_json = work / "post_json.lua"
        script_json.write_text(LUA.format(body=work / "row.json", ctype="application/json"))

        py = sys.executable
        me = str(pathlib.Path(__file__).resolve())
        inline = ["--inline-ms", str(args.inline_ms)]
        batching = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), *inline]
        off = ["--max-batch", "1", *inline]
        workers = ["--workers", str(args.workers)] + (["--threads", str(args.threads)] if args.threads else [])
        specs = {}
        for name, label in (("dense", "fanin dense fp32"), ("srigl90", "fanin SRigL-90 %"),
                            ("srigl90-int8", "fanin SRigL-90 % int8")):
            specs[(label, "on")] = [py, "-m", "fanin.cli", "serve", str(files[name]), "--port", "0", *batching, *workers]
            specs[(label, "off")] = [py, "-m", "fanin.cli", "serve", str(files[name]), "--port", "0", *off, *workers]
        w8 = "fanin SRigL-90 % int8, int8 activations"  # --activations int8: ORT int8's scheme (docs/INFERENCE.md)
        specs[(w8, "on")] = [py, "-m", "fanin.cli", "serve", str(files["srigl90-int8"]), "--port", "0", *batching,
                             *workers, "--activations", "int8"]
        specs[(w8, "off")] = [py, "-m", "fanin.cli", "serve", str(files["srigl90-int8"]), "--port", "0", *off, *workers,
                              "--activations", "int8"]
        if onnx_note:
            specs[("ONNX Runtime dense fp32", "on")] = [py, me, "--serve-ort", str(work / "dense.onnx"), *batching,
                                                          *workers]
            specs[("ONNX Runtime dense fp32", "off")] = [py, me, "--serve-ort", str(work / "dense.onnx"), *off,
                                                           *workers]
        specs[("stdlib http.server, fanin SRigL-90 %", "off")] = [py, me, "--serve-stdlib", str(files["srigl90"])]
        servers = {}
        try:
            for key, cmd in specs.items():  # started one after another: each compiles/loads its kernels alone
                servers[key] = Proc(cmd).wait_ready()
            results = {}
            for c in conc:
                for server in servers.values():
                    wrk(server.url, c, 1, script)  # warm-up: connections, caches, branch predictors
                for key, r in alternate(servers, list(servers), c, args.duration, args.slices, script).items():
                    results[(*key, c)] = r
                    print(f"  {key[0]:40s} batching {key[1]:3s} c={c:<3d} {r['rps']:9.1f} req/s  p50 "
                          f"{fmt_ms(r['p50'])} ms  p99 {fmt_ms(r['p99'])} ms  errors {r['errors']}", flush=True)
            target_key = ("fanin SRigL-90 %", "on")
            base_key = ("ONNX Runtime dense fp32", "on")
            keys = [k for k in (target_key, base_key, ("ONNX Runtime dense fp32", "off"), (w8, "on")) if k in servers]
            long = alternate(servers, keys, 8, args.target_duration, max(args.slices, round(args.target_duration / 10)),
                             script)
            for key, r in long.items():
                print(f"  target run {key[0]} batching {key[1]} c=8 {args.target_duration:.0f} s: {r['rps']:.1f} req/s, "
                      f"errors {r['errors']}", flush=True)
            json_r = measure(servers[target_key], 8, args.duration, script_json)
        finally:
            for s in servers.values():
                s.stop()
        up1 = uptime()
        # ---------------------------------------------------------- report
        cmd = "python bench/bench_serve.py" + (" --quick" if args.quick else "") + (
            f" --out {args.out}" if args.out else "")
        log(common.header(cmd).rstrip())
        log(f"- load: `{up0}` at the start, `{up1}` at the end (2-core machine shared with other jobs: wrk, the "
            "server and any background load share the same cores)")
        log(f"- model: MLP {'-'.join(map(str, SIZES))}; SRigL-90 % ERK fan-ins {fan_ins} ({args.train_steps} SRigL "
            f"steps on random data; speed depends on the shapes only); int8 = post-training per-neuron power-of-two "
            f"scales of the SRigL-90 % network; ONNX: MatMul+Add+Relu graph of the dense weights, {onnx_note}, "
            f"intra-op threads = cores / workers; models built in {build_s:.0f} s")
        log(f"- server: fanin serve (Uvicorn with uvloop/httptools; POST /predict a plain ASGI handler, the other "
            f"endpoints Starlette), {args.workers} worker(s); batching on = --max-batch {args.max_batch} --max-wait-ms "
            f"{args.max_wait_ms:g}, off = --max-batch 1; --inline-ms {args.inline_ms:g} for all; the ONNX Runtime "
            "rows use the same app, batcher and server with an ORT session as the predictor")
        log(f"- load generator: wrk 4.1 (1 thread), POST /predict with a one-row .npy body (3.2 kB) on keep-alive "
            f"connections; {args.duration:g} s per cell in {args.slices} slices, the servers taking turns slice by "
            "slice (after a 1 s warm-up each): requests/s = all requests / all time, p50 = median of the slices, "
            "p99 = the worst slice's; errors = socket errors + non-2xx answers; rows/call and ms/predict call = mean "
            "rows and run time of the predict calls in that cell (from the server's /metrics)")
        log("")
        rows = []
        for key in specs:
            for c in conc:
                r = results[(*key, c)]
                rows.append([key[0], key[1], c, f"{r['rps']:.0f}", fmt_ms(r["p50"]), fmt_ms(r["p99"]), r["errors"],
                             _f(r["rows_per_call"]), _f(r["predict_ms"], "{:.3f}")])
        log(common.table(rows, ["server", "batching", "connections", "requests/s", "p50 ms", "p99 ms", "errors",
                                "rows/call", "ms/predict call"]))
        log("")
        log(f"Target run: concurrency 8, {args.target_duration:g} s per server in "
            f"{max(args.slices, round(args.target_duration / 10))} slices taken in "
            "turn (p50: median of the slices, p99: the worst slice):")
        log("")
        trows = [[f"{k[0]}, batching {k[1]}", f"{r['requests']}", f"{r['rps']:.0f}", fmt_ms(r["p50"]), fmt_ms(r["p99"]),
                  r["errors"], _f(r["rows_per_call"]), _f(r["predict_ms"], "{:.3f}")] for k, r in long.items()]
        trows.append([f"{target_key[0]}, batching on, JSON body ({len((work / 'row.json').read_bytes())} B), "
                      f"{args.duration:g} s", f"{json_r['requests']}", f"{json_r['rps']:.0f}", fmt_ms(json_r["p50"]),
                      fmt_ms(json_r["p99"]), json_r["errors"], _f(json_r["rows_per_call"]),
                      _f(json_r["predict_ms"], "{:.3f}")])
        log(common.table(trows, ["server", "requests", "requests/s", "p50 ms", "p99 ms", "errors", "rows/call",
                                 "ms/predict call"]))
        log("")
        log(targets(results, long, target_key, base_key, conc))
        if args.out:
            common.write_section(args.out, SECTION, "\n".join(lines))
            print(f"wrote section '{SECTION}' of {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def targets(results, long, target_key, base_key, conc) -> str:
    out = ["Targets:"]
    t = long.get(target_key)
    if t:
        out.append(f"- zero errors over the {t['requests']} requests of the target run: "
                   f"{'met' if t['errors'] == 0 else 'MISSED'} ({t['errors']} errors); p99 {fmt_ms(t['p99'])} ms")
    b = long.get(base_key)
    if t and b:
        ratio = t["rps"] / b["rps"]
        out.append(f"- requests/s >= 2x ONNX Runtime fp32 dense in the same stack (concurrency 8, both batching): "
                   f"{t['rps']:.0f} vs {b['rps']:.0f} = {ratio:.2f}x, {'met' if ratio >= 2 else 'MISSED'}")
        if t["predict_ms"] and b["predict_ms"]:
            out.append(f"  - time per predict call of the same run (from /metrics): {t['predict_ms']:.3f} ms vs "
                       f"{b['predict_ms']:.3f} ms for {t['rows_per_call']:.1f} vs {b['rows_per_call']:.1f} rows: the "
                       f"model's share of a request's "
                       f"{1e3 / t['rps'] * 8:.2f} / {1e3 / b['rps'] * 8:.2f} ms latency at 8 connections")
        if t["predict_ms"] and b["predict_ms"] and t["rows_per_call"]:
            # A batch cycle at 8 connections: the loop's HTTP work for its requests, then the predict call.
            rows = t["rows_per_call"]
            h = (rows / t["rps"] * 1e3 - t["predict_ms"]) / rows
            need = (b["predict_ms"] * rows / b["rows_per_call"] - 2 * t["predict_ms"]) / rows
            out.append(f"  - the bound: a batch cycle of {rows:.1f} requests costs {rows:.1f} x h (HTTP and event loop "
                       f"per request; this run: h = {1e3 * h:.0f} us) plus the predict call, so 2x the batched baseline "
                       f"needs h <= (t_ort - 2 t_fanin) / rows = {1e3 * need:.0f} us"
                       f"{'' if need > 0 else ' (impossible)'}; even a model that cost nothing would need "
                       f"h <= t_ort / rows = {1e3 * b['predict_ms'] / b['rows_per_call']:.0f} us")
    w8 = long.get(("fanin SRigL-90 % int8, int8 activations", "on"))
    if w8 and b:
        out.append(f"  - (for reference) the int8 SRigL-90 % network with int8 activations, same run: {w8['rps']:.0f} vs "
                   f"{b['rps']:.0f} = {w8['rps'] / b['rps']:.2f}x, {w8['errors']} errors, p99 {fmt_ms(w8['p99'])} ms")
    b0 = long.get(("ONNX Runtime dense fp32", "off"))
    if t and b0:
        out.append(f"  - against ONNX Runtime without dynamic batching (one session.run per request, as a plain "
                   f"Starlette app would call it): {t['rps']:.0f} vs {b0['rps']:.0f} = {t['rps'] / b0['rps']:.2f}x")
    if 64 in conc:
        on, off = results[(*target_key, 64)], results[(target_key[0], "off", 64)]
        gain = on["rps"] / off["rps"]
        out.append(f"- dynamic batching raises requests/s at concurrency 64 (SRigL-90 %): {on['rps']:.0f} vs "
                   f"{off['rps']:.0f} with --max-batch 1 = {gain:.2f}x, {'met' if gain > 1 else 'MISSED'}")
        for label in ("fanin dense fp32", "fanin SRigL-90 % int8", "fanin SRigL-90 % int8, int8 activations",
                      "ONNX Runtime dense fp32"):
            if (label, "on", 64) in results:
                a, z = results[(label, "on", 64)], results[(label, "off", 64)]
                out.append(f"  - {label}: {a['rps']:.0f} vs {z['rps']:.0f} = {a['rps'] / z['rps']:.2f}x")
    return "\n".join(out)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def fmt_ms(s):
    return "-" if s is None else f"{s * 1e3:.3g}"


if __name__ == "__main__":
    sys.exit(main())
