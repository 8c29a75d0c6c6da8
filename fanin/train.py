"""Fit and evaluate loops with a progress line per epoch.

With ``comm`` (an mpi4py communicator or a ``fanin.distributed.DataParallel``) the same loops train data
parallel: each MPI rank takes its shard of every batch and the ranks stay identical (docs/DISTRIBUTED.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time

import numpy as np

from fanin import ops
from fanin.data import batches
from fanin.tensor import Tensor, no_grad

__all__ = ["TrainConfig", "Progress", "evaluate", "train_epoch", "fit", "make_optimizer"]


@dataclasses.dataclass
class TrainConfig:
    """What a training run needs besides the model and the data."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"          # sgd | adam | adamw
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {self.optimizer!r}.")


def make_optimizer(params, cfg: TrainConfig):
    """The optimizer ``cfg`` names, over ``params``."""
    from fanin import optim

    if cfg.optimizer == "sgd":
        return optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                         weight_decay=cfg.weight_decay)
    cls = optim.Adam if cfg.optimizer == "adam" else optim.AdamW
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, (list, tuple)):
        return "/".join(map(str, v))
    return str(v)


class Progress:
    """Per-epoch progress: a live tqdm bar on a terminal (the ``progress`` extra), and one summary line per epoch.

    Nothing live is drawn when the stream is not a terminal (logs, CI) or tqdm is not installed; the
    epoch's summary line is printed either way unless ``enabled`` is False.
    """

    def __init__(self, total: int, desc: str = "", stream=None, enabled: bool = True):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.stream = stream or sys.stderr
        self.fields = {}
        self.start = time.perf_counter()
        self.bar = None
        if enabled and hasattr(self.stream, "isatty") and self.stream.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # the `progress` extra is optional
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=desc, file=self.stream, leave=False, dynamic_ncols=True,
                                mininterval=0.2)

    def update(self, n: int = 1, **fields):
        self.fields.update(fields)
        if self.bar is not None:
            self.bar.update(n)
            if fields:
                self.bar.set_postfix({k: _fmt(v) for k, v in fields.items()}, refresh=False)

    def line(self) -> str:
        info = " ".join(f"{k}={_fmt(v)}" for k, v in self.fields.items())
        return f"{self.desc} {time.perf_counter() - self.start:.1f}s {info}"

    def close(self, **fields):
        self.fields.update(fields)
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            self.stream.write(self.line() + "\n")
            self.stream.flush()


def _device(model) -> str:
    """'cuda' when the model's parameters live on the GPU (``model.to("cuda")``), else 'cpu'."""
    for p in model.parameters():
        return p.device
    return "cpu"


def _host(a) -> np.ndarray:
    """A NumPy view or copy of a tensor's data (a device array is copied: a loss or a (batch, classes) block)."""
    if isinstance(a, np.ndarray):
        return a
    from fanin import device

    return device.host(a)


def _input(xb, dev):
    return Tensor(xb) if dev == "cpu" else Tensor(xb, device=dev)


def evaluate(model, x: np.ndarray, y: np.ndarray, batch_size: int = 1000, comm=None):
    """(mean loss, accuracy) of ``model`` on ``x``, ``y`` in eval mode (``comm``: each rank scores its shard)."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    n = len(y)
    if comm is not None:
        x, y = comm.shard(x), comm.shard(y)
    dev = _device(model)
    with no_grad():
        for xb, yb in batches(x, y, batch_size, shuffle=False):
            logits = model(_input(xb, dev))
            total_loss += float(_host(ops.cross_entropy(logits, yb).data)) * len(yb)
            correct += int((_host(logits.data).argmax(axis=1) == yb).sum())
    model.train(was_training)
    if comm is not None:
        total_loss, correct = comm.allreduce_sum([total_loss, correct])
    return total_loss / n, correct / n


def train_epoch(model, optimizer, x, y, batch_size, rng, schedule=None, hooks=(), progress=None,
                loss_terms=(), comm=None):
    """One pass over (x, y): forward, backward, optimizer step, then each hook's ``step()``.

    ``comm`` (a ``fanin.distributed.DataParallel``): this rank computes its shard of each batch, weighted by its
    share, and one allreduce sums the gradients of all ranks before the optimizer step.
    """
    model.train()
    dev = _device(model)
    seen, correct, loss_sum = 0, 0, 0.0
    start = time.perf_counter()
    for xb, yb in batches(x, y, batch_size, shuffle=True, rng=rng):
        n = len(yb)
        if comm is not None:
            xb, yb = comm.shard(xb), comm.shard(yb)
        if len(yb):
            logits = model(_input(xb, dev))
            loss = ops.cross_entropy(logits, yb)
            for term in loss_terms:
                loss = loss + term()
            optimizer.zero_grad()
            loss.backward(None if comm is None else comm.loss_weight(len(yb), n, loss.data.dtype))
            batch_loss = float(_host(loss.data)) * len(yb)
            batch_correct = int((_host(logits.data).argmax(axis=1) == yb).sum())
        else:  # this rank's shard of a last batch shorter than the number of ranks
            optimizer.zero_grad()
            comm.no_rows(model)
            batch_loss, batch_correct = 0.0, 0
        if comm is not None:
            batch_loss, batch_correct = comm.allreduce_step(model, optimizer, batch_loss, batch_correct)
        optimizer.step()
        if schedule is not None:
            schedule.step()
        for hook in hooks:
            hook.step()
        if comm is not None:
            comm.after_step(model, hooks)
        seen += n
        loss_sum += batch_loss
        correct += batch_correct
        if progress is not None:
            rate = seen / max(1e-9, time.perf_counter() - start)
            progress.update(1, loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}", samples_s=f"{rate:.0f}")
    if not np.isfinite(loss_sum):
        raise FloatingPointError("training diverged (loss is not finite); lower the learning rate.")
    return {"loss": loss_sum / seen, "acc": correct / seen, "time": time.perf_counter() - start}


def _integer(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _split(name: str, data):
    """(x, y) of a ``train`` / ``test`` argument of ``fit``, checked: a pair of arrays of equal, non-zero length."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"fit: {name} must be a pair (x, y) of inputs and integer labels.")
    x, y = (a if hasattr(a, "shape") else np.asarray(a) for a in data)  # arrays (host or device) stay as they are
    if x.ndim < 1 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"fit: {name} inputs of shape {x.shape} and labels of shape {y.shape} do not pair up: labels "
                         "must be 1-D, one per input row.")
    if not len(y):
        raise ValueError(f"fit: the {name} set is empty.")
    return x, y


def _check_finite(model, epoch: int):
    """A NaN or Inf weight is divergence even when the loss stays finite: a ReLU maps NaN to 0, so a network whose
    first layer went NaN trains on at chance level with a finite loss."""
    from fanin.nn import nonfinite

    bad = nonfinite(model.named_parameters())
    if bad:
        raise FloatingPointError(f"training diverged: {bad[0]} holds NaN or Inf after epoch {epoch}; lower the "
                                 "learning rate (or check the inputs and the checkpoint resumed from).")


def fit(model, optimizer, train, test=None, epochs: int = 10, batch_size: int = 128, seed: int = 0,
        schedule=None, hooks=(), loss_terms=(), progress: bool = True, start_epoch: int = 0,
        rng=None, on_epoch_end=None, history=None, comm=None):
    """Train for ``epochs`` over ``train`` = (x, y); evaluate on ``test`` after each epoch.

    ``hooks`` are objects with ``step()`` called after every optimizer step (e.g. SRigL) and an
    optional ``status()`` dict shown on the progress line. ``on_epoch_end(epoch, rng)`` runs after
    each epoch (checkpoints). Returns one dict per epoch (appended to ``history`` if given).

    ``comm``: an mpi4py communicator (or a ``fanin.distributed.DataParallel``) to train data parallel, every
    rank calling ``fit`` with the same arguments: ``batch_size`` is the global batch, split over the ranks;
    only rank 0 prints; ``on_epoch_end`` runs on every rank (write files on rank 0 only). An exception on one
    rank aborts all of them (MPI_Abort).
    """
    x, y = _split("train", train)
    if test is not None:
        _split("test", test)
    if not _integer(batch_size) or batch_size < 1:
        raise ValueError(f"fit: batch_size must be an integer >= 1, got {batch_size!r}.")
    if not _integer(epochs) or epochs < 0:
        raise ValueError(f"fit: epochs must be an integer >= 0, got {epochs!r}.")
    if not _integer(start_epoch) or not 0 <= start_epoch <= epochs:  # == epochs: a finished run resumed, nothing to do
        raise ValueError(f"fit: start_epoch must be an integer in [0, epochs] = [0, {epochs}] (the epochs already "
                         f"done), got {start_epoch!r}.")
    hooks = () if hooks is None else tuple(hooks)
    for hook in hooks:  # checked before the first step, not after it
        if not callable(getattr(hook, "step", None)):
            raise TypeError(f"fit: every hook needs a step() method (called after each optimizer step), got "
                            f"{type(hook).__name__}.")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise ValueError("fit: the training inputs hold NaN or Inf; a ReLU would turn them into zeros and train on "
                         "them silently. Clean the data first.")
    if rng is None or isinstance(rng, (int, np.integer)):  # one generator for the whole run: a new shuffle each epoch
        rng = np.random.default_rng(seed if rng is None else rng)
    elif not isinstance(rng, np.random.Generator):
        raise TypeError(f"fit: rng must be a numpy.random.Generator or an integer seed, got {type(rng).__name__}.")
    steps_per_epoch = -(-len(x) // batch_size)
    for hook in hooks:  # the run's length, for hooks that schedule by it (an SRigL built without t_end)
        if callable(getattr(hook, "plan", None)):
            hook.plan(epochs * steps_per_epoch)
    history = [] if history is None else history
    guard = contextlib.nullcontext()
    if comm is not None:
        from fanin.distributed import data_parallel

        comm = data_parallel(comm)
        comm.check_batch(batch_size)
        comm.attach(hooks)
        progress = progress and comm.root
        guard = comm.guard()
    with guard:
        if comm is not None:
            comm.check(model, hooks, "start-up", run={"training samples": len(x), "batch size": batch_size,
                                                       "epochs": epochs, "first epoch": start_epoch})
        for epoch in range(start_epoch, epochs):
            bar = Progress(steps_per_epoch, f"epoch {epoch + 1}/{epochs}", enabled=progress)
            stats = train_epoch(model, optimizer, x, y, batch_size, rng, schedule, hooks, bar, loss_terms, comm)
            for hook in hooks:
                if hasattr(hook, "status"):
                    stats.update(hook.status())
            _check_finite(model, epoch + 1)
            if test is not None:
                stats["test_loss"], stats["test_acc"] = evaluate(model, *test, comm=comm)
            if comm is not None:
                comm.check(model, hooks, f"epoch {epoch + 1}")
            stats["epoch"] = epoch + 1
            stats["samples_per_s"] = len(x) / stats["time"]
            bar.close(**{k: v for k, v in stats.items() if k not in ("epoch", "time", "samples_per_s")})
            history.append(stats)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, rng)
    return history
