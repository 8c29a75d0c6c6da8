"""Running the app: the listening socket, Uvicorn, worker processes, signals.

``serve(config, net)`` binds the socket itself (so ``port=0`` works and several workers can share it),
then either runs Uvicorn in this process (``workers=1``) or supervises ``workers`` *spawned* processes
(``multiprocessing`` "spawn", as Uvicorn's own ``--workers`` does): each child starts a fresh interpreter
and loads the model file itself, so no process ever forks after running parallel kernels (GNU OpenMP, one
of Numba's threading layers, is not fork-safe) and the workers share nothing but the port and the
page cache behind the memory-mapped file.

SIGTERM or SIGINT stops accepting connections, lets requests in flight finish (up to
``graceful_timeout`` seconds), then exits with status 0.
"""
from __future__ import annotations

import ipaddress
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading

from fanin.serve.config import ServeConfig

__all__ = ["serve", "bind"]

log = logging.getLogger("fanin.serve")


class _Stop(Exception):
    """SIGTERM/SIGINT arrived outside Uvicorn's own handling (before it started, or re-raised after it drained)."""


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``OSError`` if that address is taken or not ours)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)
    sock.set_inheritable(True)
    return sock


def serve(config: ServeConfig, net=None, *, sock: socket.socket | None = None, announce=None) -> int:
    """Serve ``net`` (or, for workers, ``config.model``) until SIGTERM/SIGINT; returns the exit status.

    ``announce(url)`` is called once every worker is ready (default: a line on stderr).
    """
    sock = sock or bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    announce = announce or (lambda u: print(f"fanin serve: {config.model or 'model'} on {u} ({_describe(config)}); "
                                            f"SIGTERM or Ctrl-C stops it{exposure_note(host)}", file=sys.stderr,
                                            flush=True))
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if config.workers == 1:
            return _run(config, net, sock, lambda: announce(url))
        return _supervise(config, sock, lambda: announce(url))
    except _Stop:
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        sock.close()


def exposure_note(host: str) -> str:
    """'' for a loopback address, else a reminder (appended to the ready line) that the server is reachable from
    other machines and what it does not guard there (docs/SERVING.md, "On an untrusted network")."""
    try:
        if ipaddress.ip_address(host.split("%")[0]).is_loopback:
            return ""
    except ValueError:  # a host name: bind() resolved it, getsockname() gives addresses, so not expected here
        pass
    return ("\nfanin serve: reachable from other machines: no TLS, no authentication, no limit on header size or "
            "slow clients; in front of clients you do not control put a reverse proxy before it (docs/SERVING.md, "
            "'On an untrusted network')")


def _describe(config: ServeConfig) -> str:
    batching = (f"dynamic batching up to {config.max_batch} rows, {config.max_wait_ms:g} ms wait"
                if config.max_batch > 1 else "no batching")
    return f"{config.workers} worker{'s' if config.workers > 1 else ''}, {batching}"


def _raise_stop(sig, frame):
    raise _Stop()


def _run(config: ServeConfig, net, sock, on_ready) -> int:
    """Uvicorn in this process, on ``sock``."""
    import uvicorn

    from fanin.serve.app import create_app

    app = create_app(net, config, on_ready=on_ready)
    uconfig = uvicorn.Config(app, lifespan="on", log_level=config.log_level, access_log=config.access_log,
                             timeout_graceful_shutdown=config.graceful_timeout, server_header=False,
                             proxy_headers=False)
    server = uvicorn.Server(uconfig)
    server.run(sockets=[sock])  # handles SIGTERM/SIGINT itself: drains, then re-raises the signal (-> _Stop)
    return 0 if server.started else 1


# ------------------------------------------------------------------ workers
def _worker(config: ServeConfig, sock, conn):
    """A spawned worker: load the model, serve on the shared socket, say when ready (or why not)."""
    from fanin.io import load

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor stops workers with SIGTERM
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    try:
        net = load(config.model, activations=config.activations)
    except (ValueError, OSError) as exc:
        conn.send(("error", str(exc)))
        return
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        _run(config, net, sock, lambda: conn.send(("ready", os.getpid())))
    except _Stop:
        pass


def _exit_with_parent(ppid):
    """Drain and exit when the supervisor is gone (killed with SIGKILL): no orphan keeps the port."""
    while os.getppid() == ppid:
        threading.Event().wait(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _supervise(config: ServeConfig, sock, on_ready) -> int:
    """Start ``config.workers`` spawned workers; replace one that dies; stop them all on SIGTERM/SIGINT."""
    if config.model is None:
        raise ValueError("serve: workers > 1 need config.model, the file each worker loads.")
    ctx = multiprocessing.get_context("spawn")
    metrics_dir = None
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:  # /metrics then sums over all workers
        metrics_dir = tempfile.TemporaryDirectory(prefix="fanin-serve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir.name
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda sig, frame: stop.set())
    workers = []

    def start():
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, args=(config, sock, child), name="fanin-serve-worker", daemon=False)
        p.start()
        child.close()
        return p, parent

    try:
        workers = [start() for _ in range(config.workers)]
        for p, conn in workers:
            status = _wait_ready(p, conn, stop)
            if status is not None:
                print(f"fanin: {status}", file=sys.stderr, flush=True)
                return 2 if not stop.is_set() else 0
        if stop.is_set():  # told to stop while the workers started: never ready, so no ready line
            return 0
        on_ready()
        while not stop.wait(0.5):
            for i, (p, conn) in enumerate(workers):
                if not p.is_alive():
                    log.warning("fanin serve: worker %s exited with status %s; starting another", p.pid, p.exitcode)
                    _mark_dead(p.pid)
                    workers[i] = start()
        return 0
    finally:
        # the supervisor's copy of the listening socket: closed first, so that once the workers close theirs (they do
        # at SIGTERM) the kernel refuses new connections instead of queueing them for a drain that never serves them
        sock.close()
        for p, _ in workers:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        for p, conn in workers:
            p.join(config.graceful_timeout + 5)
            if p.is_alive():
                p.kill()
                p.join()
            conn.close()
        if metrics_dir is not None:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]
            metrics_dir.cleanup()


def _wait_ready(p, conn, stop, timeout: float = 300.0):
    """None once worker ``p`` is serving; else why it is not."""
    waited = 0.0
    while not stop.is_set() and waited < timeout:
        if conn.poll(0.2):
            try:
                kind, detail = conn.recv()
            except EOFError:
                return f"worker {p.pid} exited during start-up (status {p.exitcode})."
            return None if kind == "ready" else detail
        waited += 0.2
        if not p.is_alive() and not conn.poll(0):
            return f"worker {p.pid} exited during start-up (status {p.exitcode})."
    return None if stop.is_set() else f"worker {p.pid} was not ready after {timeout:.0f} s."


def _mark_dead(pid):
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
    except (ImportError, OSError):
        pass
