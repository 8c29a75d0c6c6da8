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
        for name in ("workers", "max_batch", "max_rows", "max_body"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ServeConfig: {name} must be at least 1, got {getattr(self, name)}.")
        if not 0 <= self.max_wait_ms < 10_000:
            raise ValueError(f"ServeConfig: max_wait_ms must be in [0, 10000), got {self.max_wait_ms}.")
        if not 0 <= self.inline_ms < 10_000:
            raise ValueError(f"ServeConfig: inline_ms must be in [0, 10000), got {self.inline_ms}.")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"ServeConfig: port must be in [0, 65535], got {self.port}.")
        if self.activations not in ("float32", "int8"):
            raise ValueError(f"ServeConfig: activations must be 'float32' or 'int8', got {self.activations!r}.")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"ServeConfig: threads must be at least 1, got {self.threads}.")

    def predict_threads(self) -> int:
        """Numba threads for each worker's predict calls: ``threads``, or the worker's share of the cores less
        one, which its event loop needs (docs/SERVING.md: on 2 cores, 1 thread served 5-30x more requests/s
        than 2)."""
        if self.threads is not None:
            return self.threads
        return max(1, (os.cpu_count() or 1) // self.workers - 1)
