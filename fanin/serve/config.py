"""``ServeConfig``: what ``fanin serve`` was asked for (picklable: spawned workers receive it)."""
from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Settings of one service; the defaults are those of ``fanin serve``."""

    model: str | None = None        # the .fanin file (workers load it themselves)
    host: str = "127.0.0.1"
    port: int = 8000                 # 0: any free port (printed when ready)
    workers: int = 1                 # processes sharing the port
    max_batch: int = 64              # rows per predict call; 1 turns dynamic batching off
    max_wait_ms: float = 2.0         # how long a batch waits for more requests
    inline_ms: float = 0.25          # predict calls expected to take at most this run on the event loop's thread
    max_rows: int = 1024             # rows one request may send
    max_body: int = 16 << 20         # bytes one request may send
    threads: int | None = None       # Numba threads per worker (None: cores / workers - 1, at least 1)
    graceful_timeout: float = 30.0   # seconds requests in flight get to finish after SIGTERM
    access_log: bool = False
    log_level: str = "warning"
    activations: str = "float32"     # "int8": the Network's 8-bit activation mode

    def __post_init__(self):
        def bad(name, want, got):
            if name == "max_body":  # bytes here, MiB on the command line
                raise ValueError(f"serve: --max-body-mb must be at most 1024 (max_body: 1 to {1 << 30} bytes), got "
                                 f"{got!r} bytes.")
            raise ValueError(f"serve: --{name.replace('_', '-')} must be {want} (ServeConfig.{name}), got {got!r}.")

        # upper limits: what one machine can hold (a max_batch of 10^8 rows fails allocating its buffers at start)
        for name, hi in (("workers", 256), ("max_batch", 1 << 16), ("max_rows", 1 << 20), ("max_body", 1 << 30)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
                bad(name, f"an integer in [1, {hi}]", v)
        for name in ("max_wait_ms", "inline_ms"):
            if not 0 <= getattr(self, name) < 10_000:
                bad(name, "in [0, 10000) milliseconds", getattr(self, name))
        if not 0 <= self.port <= 65535:
            bad("port", "in [0, 65535]", self.port)
        if not isinstance(self.host, str) or not self.host.strip():
            bad("host", "an address such as 127.0.0.1 (or 0.0.0.0 for every interface, deliberately)", self.host)
        if self.activations not in ("float32", "int8"):
            bad("activations", "'float32' or 'int8'", self.activations)
        if self.threads is not None and not 1 <= self.threads <= 1024:
            bad("threads", "in [1, 1024]", self.threads)

    def predict_threads(self) -> int:
        """Numba threads for each worker's predict calls: ``threads``, or the worker's share of the cores less
        one, which its event loop needs (docs/SERVING.md: on 2 cores, 1 thread served 5-30x more requests/s
        than 2)."""
        if self.threads is not None:
            return self.threads
        return max(1, (os.cpu_count() or 1) // self.workers - 1)
