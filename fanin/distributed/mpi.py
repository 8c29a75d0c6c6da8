"""``DataParallel``: what the training loop needs from MPI (docs/DISTRIBUTED.md, "What is synchronised when").

Every rank holds the whole model, optimizer, SRigL and self-compression state, and keeps them bit-identical:

- each global batch of B rows is cut into contiguous shards, rank r taking ``bounds(B)`` (the first ``B % P``
  ranks one row more); a rank's loss is weighted by its share ``n_r / B`` before ``backward``, so the sum over
  ranks of the weighted gradients is the gradient of the global batch's mean loss;
- one ``Allreduce`` (sum) per step over a single flat buffer: every parameter's gradient (self-compression's
  bits and exponents included), a has-a-gradient flag per parameter, the batch-norm running statistics
  (weighted, so they become the average of the ranks' updates) and the step's loss and correct counts;
- SRigL's growth scores read the (input, output-gradient) rows of the update's batches: ``gather_pairs``
  collects every rank's rows (one ``Allgather`` of row counts and one ``Allgatherv`` per layer and update), so
  each rank runs the same update on the global batch and makes the same prune / grow / ablate decisions;
- ``check`` compares digests of the topology, weights, buffers and schedules across ranks: at the start and
  after every epoch, and after every step when ``fanin.kernels.debug()`` is on;
- a watchdog thread aborts the job (MPI_Abort) when a rank waits longer than ``timeout`` seconds in one
  collective (another rank died or hangs), and ``guard()`` aborts it when a rank raises.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import time
import traceback

import numpy as np

from fanin.distributed import DEFAULT_TIMEOUT

__all__ = ["DataParallel", "RanksDiverged"]


class RanksDiverged(RuntimeError):
    """The data-parallel ranks no longer hold the same model (a bug, or ranks started with other arguments)."""


class DataParallel:
    """An MPI communicator seen by ``fanin.train.fit``: shards, the per-step allreduce, SRigL's row exchange,
    agreement checks, and a watchdog (module docstring). ``fanin.distributed.world()`` makes one for a launched
    job; ``DataParallel(MPI.COMM_WORLD)`` wraps any communicator.

    ``timeout``: seconds a rank may wait in one collective before the job is aborted (None: forever).
    ``abort_on_error``: an exception inside ``guard()`` aborts every rank rather than leaving them waiting.
    ``profile``: a barrier before each step's allreduce, so that ``comm_stats`` tells the time ranks wait for
    each other ("wait") apart from the transfer ("allreduce"); costs one more collective per step.
    """

    def __init__(self, comm, timeout: float | None = DEFAULT_TIMEOUT, abort_on_error: bool = True,
                 profile: bool = False):
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.timeout = float(timeout) if timeout else None
        self.abort_on_error, self.profile = abort_on_error, profile
        self.step = 0
        self.comm_stats: dict = {}      # kind -> [calls, seconds, bytes]
        self.step_bytes = 0             # bytes of the last step's allreduce buffer
        self._weight = 1.0
        self._waiting = None            # (monotonic start, what) while inside a collective
        self._stop = threading.Event()
        if self.timeout and self.size > 1:
            threading.Thread(target=self._watch, name="fanin-mpi-watchdog", daemon=True).start()

    def __repr__(self):
        return f"DataParallel(rank {self.rank} of {self.size})"

    @property
    def root(self) -> bool:
        """Rank 0: the one that prints, writes checkpoints and model files."""
        return self.rank == 0

    # ------------------------------------------------------------ failures
    def abort(self, message: str, code: int = 2):
        """Say ``message`` (one line, naming this rank) and end every rank of the job with ``code`` (MPI_Abort)."""
        self._die(message, code)

    def _die(self, message: str, code: int):
        sys.stderr.write(f"fanin: rank {self.rank} of {self.size}: {message}\n")
        sys.stderr.flush()
        try:
            time.sleep(0.5)  # the launcher forwards our output before MPI_Abort has it end every process
        except KeyboardInterrupt:  # another rank's abort came first (the launcher interrupts us): no traceback
            pass
        self.comm.Abort(code)
        os._exit(code)  # MPI_Abort may return while another rank's abort is under way: this rank ends here anyway

    def _watch(self):
        period = min(1.0, self.timeout / 10)
        while not self._stop.wait(period):
            waiting = self._waiting
            if waiting is not None and time.monotonic() - waiting[0] > self.timeout:
                self._die(f"waited more than {self.timeout:g} s in {waiting[1]} at step {self.step}: another rank "
                          "died, hangs or is far slower; aborting all ranks (raise the timeout, --mpi-timeout, if a "
                          "step legitimately takes that long).", 3)

    def close(self):
        """Stop the watchdog."""
        self._stop.set()

    @contextlib.contextmanager
    def guard(self):
        """Run a block whose exception on any rank aborts all ranks (the others would wait for it forever)."""
        try:
            yield
        except BaseException as exc:
            if self.abort_on_error and self.size > 1:
                # fanin's own one-line errors (divergence, ranks that disagree, a bad file): the line, no traceback;
                # any other error (a ValueError from NumPy included) keeps its traceback
                from fanin.checkpoint import CheckpointError
                from fanin.data import DatasetError

                if isinstance(exc, (FloatingPointError, RanksDiverged, CheckpointError, DatasetError)):
                    self._die(f"{exc} -- aborting all ranks.", 2)
                traceback.print_exc()
                self._die(f"{type(exc).__name__}: {exc} -- aborting all ranks.", 1)
            raise

    def install_excepthook(self):
        """An uncaught exception in this process aborts every rank (as ``python -m mpi4py`` does)."""
        previous = sys.excepthook

        def hook(kind, value, tb):
            previous(kind, value, tb)
            if self.size > 1:
                self._die(f"uncaught {kind.__name__}: {value} -- aborting all ranks.", 1)

        sys.excepthook = hook

    @contextlib.contextmanager
    def _collective(self, kind: str, nbytes: int = 0):
        t0 = time.perf_counter()
        self._waiting = (time.monotonic(), kind)
        try:
            yield
        finally:
            self._waiting = None
            st = self.comm_stats.setdefault(kind, [0, 0.0, 0])
            st[0] += 1
            st[1] += time.perf_counter() - t0
            st[2] += nbytes

    # ---------------------------------------------------------------- data
    def bounds(self, n: int):
        """(lo, hi): this rank's contiguous rows of ``n`` (the first ``n % size`` ranks get one more)."""
        q, r = divmod(int(n), self.size)
        lo = self.rank * q + min(self.rank, r)
        return lo, lo + q + (self.rank < r)

    def shard(self, a):
        """This rank's rows of ``a``."""
        lo, hi = self.bounds(len(a))
        return a[lo:hi]

    def check_batch(self, batch_size: int):
        """A ``ValueError`` when a global batch cannot give every rank at least one row."""
        if batch_size < self.size:
            raise ValueError(f"the global batch size {batch_size} is smaller than the {self.size} MPI ranks; use a "
                             f"batch size of at least {self.size} (each rank takes batch/ranks rows, the first "
                             "batch % ranks ranks one row more).")

    def attach(self, hooks):
        """Let the hooks that exchange data between ranks (SRigL's captured rows) use this communicator."""
        for hook in hooks:
            if hook is not None and hasattr(hook, "exchange"):
                hook.exchange = self

    def loss_weight(self, n_local: int, n_global: int, dtype):
        """The gradient ``backward`` starts from on this rank: its share of the global batch, ``n_local / n_global``."""
        self._weight = n_local / n_global
        return np.asarray(self._weight, dtype)

    def no_rows(self, model):
        """This rank's shard of a (last, short) batch is empty: it contributes nothing, and an empty capture to
        every layer SRigL is capturing, so the row exchange still lines up."""
        from fanin import nn

        self._weight = 0.0
        for m in model.modules():
            if isinstance(m, (nn.FanInLinear, nn.FanInConv2d)) and m.capture is not None:
                dt = m.values.data.dtype
                m.capture.append((np.zeros((0, m.n_in), dt), np.zeros((0, m.n_out), dt)))

    # ------------------------------------------------------------ per step
    @staticmethod
    def _parameters(model, optimizer):
        seen, params = set(), []
        for p in list(model.parameters()) + list(getattr(optimizer, "params", [])):
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        return params

    def allreduce_step(self, model, optimizer, loss_sum: float, correct: int):
        """Sum over ranks, in one Allreduce: the weighted gradients (into every parameter's ``.grad``), the batch
        norm running statistics (weighted: their average), and this step's loss sum and correct count (returned)."""
        params = self._parameters(model, optimizer)
        buffers = [b for _, b in model.named_buffers() if isinstance(b, np.ndarray) and b.dtype.kind == "f"]
        dtype = np.result_type(*[p.data.dtype for p in params])
        n_grad = sum(p.data.size for p in params)
        total = n_grad + len(params) + sum(b.size for b in buffers) + 2
        buf = np.empty(total, dtype)
        o = 0
        for p in params:
            s = p.data.size
            if p.grad is None:
                buf[o:o + s] = 0
            else:
                buf[o:o + s] = p.grad.reshape(-1)
            o += s
        buf[o:o + len(params)] = [p.grad is not None for p in params]
        o += len(params)
        w = dtype.type(self._weight)
        for b in buffers:
            np.multiply(b.reshape(-1), w, out=buf[o:o + b.size])
            o += b.size
        buf[o], buf[o + 1] = loss_sum, correct
        if self.profile:
            with self._collective("wait"):
                self.comm.Barrier()
        self.step_bytes = buf.nbytes
        with self._collective("allreduce", buf.nbytes):
            self.comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)
        flags = buf[n_grad:n_grad + len(params)]
        o = 0
        for p, flag in zip(params, flags):
            s = p.data.size
            p.grad = buf[o:o + s].reshape(p.data.shape) if flag > 0 else None
            o += s
        o += len(params)
        for b in buffers:
            b[...] = buf[o:o + b.size].reshape(b.shape)
            o += b.size
        return float(buf[o]), int(round(float(buf[o + 1])))

    def after_step(self, model, hooks):
        """Count the step; with ``fanin.kernels.debug()`` on, check that every rank holds the same model."""
        from fanin import kernels

        self.step += 1
        if kernels.debug():
            self.check(model, hooks, f"step {self.step}")

    # --------------------------------------------------------------- SRigL
    def gather_pairs(self, pairs):
        """Every rank's captured ``(x, dy)`` rows of the same batches, in rank order: for each pair, the rows of
        the whole global batch, in its order. One Allgather (row counts) and one Allgatherv (the rows)."""
        pairs = [tuple(p) for p in pairs]
        if not pairs or self.size == 1:
            return pairs
        arrays = [a for pair in pairs for a in pair]
        dtype = np.result_type(*[a.dtype for a in arrays])
        rows = np.array([a.shape[0] for a in arrays], np.int64)
        cols = np.array([int(np.prod(a.shape[1:])) for a in arrays], np.int64)
        all_rows = np.empty((self.size, len(arrays)), np.int64)
        with self._collective("gather", all_rows.nbytes):
            self.comm.Allgather(rows, all_rows)
        local = np.concatenate([np.ascontiguousarray(a, dtype).reshape(-1) for a in arrays]) if arrays else \
            np.zeros(0, dtype)
        counts = (all_rows * cols).sum(axis=1)
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        recv = np.empty(int(counts.sum()), dtype)
        with self._collective("gather", recv.nbytes):
            self.comm.Allgatherv(local, [recv, (counts, displs)])
        parts = [[] for _ in arrays]
        for r in range(self.size):
            o = int(displs[r])
            for i, shape_tail in enumerate(a.shape[1:] for a in arrays):
                n = int(all_rows[r, i] * cols[i])
                parts[i].append(recv[o:o + n].reshape(-1, *shape_tail))
                o += n
        merged = [np.concatenate(p) for p in parts]
        return [(merged[2 * i], merged[2 * i + 1]) for i in range(len(pairs))]

    def local_rows(self, a):
        """This rank's contiguous rows of a global array (captured rows a checkpoint holds for every rank)."""
        return np.ascontiguousarray(self.shard(np.asarray(a)))

    # -------------------------------------------------------- whole-job ops
    def allreduce_sum(self, values, kind: str = "eval") -> np.ndarray:
        """Sum of small float64 ``values`` over ranks (evaluation counts)."""
        buf = np.array(values, np.float64)
        with self._collective(kind, buf.nbytes):
            self.comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)
        return buf

    def root_call(self, fn):
        """``fn()`` on rank 0, its result (or its exception) on every rank: e.g. reading a checkpoint that only
        rank 0's disk holds."""
        result = None
        if self.root:
            try:
                result = ("ok", fn())
            except Exception as exc:  # raised on every rank below
                result = ("error", exc)
        with self._collective("bcast"):
            result = self.comm.bcast(result, root=0)
        if result[0] == "error":
            raise result[1]
        return result[1]

    def barrier(self):
        with self._collective("barrier"):
            self.comm.Barrier()

    @staticmethod
    def digests(model, hooks=()) -> dict:
        """Short digests of what must be identical on every rank: topology (shapes, condensed indices and active
        neurons, masks), weights (every parameter, bits and exponents included), buffers, hook step counters."""
        from fanin import nn

        parts = {k: hashlib.blake2b(digest_size=8) for k in ("topology", "weights", "buffers", "schedule")}
        for name, p in model.named_parameters():
            parts["topology"].update(f"{name}{p.data.shape}".encode())
            parts["weights"].update(np.ascontiguousarray(p.data).tobytes())
        for m in model.modules():
            if isinstance(m, (nn.FanInLinear, nn.FanInConv2d)):
                parts["topology"].update(np.ascontiguousarray(m.indices).tobytes())
                parts["topology"].update(np.ascontiguousarray(m.active).tobytes())
        for name, b in model.named_buffers():
            parts["buffers"].update(name.encode() + np.ascontiguousarray(b).tobytes())
        for hook in hooks:
            if hook is None:
                continue
            for mask in getattr(hook, "masks", []):
                parts["topology"].update(np.ascontiguousarray(mask).tobytes())
            parts["schedule"].update(repr((type(hook).__name__, getattr(hook, "t", None))).encode())
        return {k: h.hexdigest() for k, h in parts.items()}

    def check(self, model, hooks=(), when: str = "now", run: dict | None = None):
        """``RanksDiverged`` (on every rank) unless all ranks hold the same topology, weights, buffers and hook
        steps (and the same ``run`` settings: ranks started with another --limit or --batch-size would disagree on
        the number of steps and leave a collective unmatched)."""
        mine = self.digests(model, hooks)
        mine.update({k: str(v) for k, v in (run or {}).items()})
        with self._collective("check"):
            every = self.comm.allgather(mine)
        bad = [k for k in mine if len({d[k] for d in every}) > 1]
        if bad:
            groups = "; ".join(f"rank {r}: " + ", ".join(f"{k} {d[k]}" for k in bad) for r, d in enumerate(every))
            raise RanksDiverged(f"the MPI ranks disagree on the {' and '.join(bad)} after {when} ({groups}): "
                                "data-parallel ranks must stay identical; start them with the same arguments and "
                                "seed (otherwise this is a bug in fanin).")

    def summary(self) -> dict:
        """Time, calls and bytes spent in each kind of collective on this rank."""
        return {k: {"calls": c, "seconds": s, "bytes": b} for k, (c, s, b) in self.comm_stats.items()}
