"""Training checkpoints: model, optimizer, schedule, sparsity updater and RNG states in one file.

The file is an ``.npz`` (no pickle): arrays under flat keys, everything else in a JSON
document stored as a byte array. It is written to a temporary file in the same folder and
renamed over the old one, so a crash mid-write never leaves a corrupt latest checkpoint.
"""
from __future__ import annotations

import json
import pathlib
import zipfile

import numpy as np

from fanin import nn
from fanin._atomic import write_atomic

__all__ = ["save_checkpoint", "load_checkpoint", "training_state", "restore_training_state", "flatten", "unflatten",
           "CheckpointError"]

FORMAT = "fanin-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """The checkpoint file is missing, corrupt or from an incompatible run."""


def flatten(tree, prefix="", arrays=None):
    """Split a nested dict/list into (JSON-able skeleton, {key: array})."""
    arrays = {} if arrays is None else arrays
    if isinstance(tree, np.ndarray):
        key = prefix.rstrip("/")
        if key in arrays or key == "__meta__":  # "a/b" and {"a": {"b": ...}} would share one entry of the archive
            raise ValueError(f"checkpoint: two entries of the state are both stored as {key!r}; rename one.")
        if tree.dtype.hasobject:
            raise ValueError(f"checkpoint: {key!r} is an array of Python objects; a checkpoint holds numbers (no "
                             "pickle).")
        arrays[key] = tree
        return {"__array__": key}, arrays
    if isinstance(tree, dict):
        return {str(k): flatten(v, f"{prefix}{k}/", arrays)[0] for k, v in tree.items()}, arrays
    if isinstance(tree, (list, tuple)):
        return [flatten(v, f"{prefix}{i}/", arrays)[0] for i, v in enumerate(tree)], arrays
    if isinstance(tree, (np.integer, np.floating, np.bool_)):
        return tree.item(), arrays
    return tree, arrays


def unflatten(skeleton, arrays):
    """Inverse of ``flatten``."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__array__"}:
            return arrays[skeleton["__array__"]]
        return {k: unflatten(v, arrays) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten(v, arrays) for v in skeleton]
    return skeleton


def save_checkpoint(path, state: dict):
    """Write ``state`` (nested dicts/lists of arrays and JSON values) to ``path`` atomically."""
    skeleton, arrays = flatten(state)
    meta = json.dumps({"format": FORMAT, "version": VERSION, "state": skeleton}).encode()
    write_atomic(path, lambda f: np.savez(f, __meta__=np.frombuffer(meta, dtype=np.uint8), **arrays))


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by ``save_checkpoint`` (refuses anything else, with a reason)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; check the path (fanin train --checkpoint-every N writes them).")
    from fanin.io import MAGIC  # the model file's magic bytes (fanin.io loads Numba: not at import time)

    with open(path, "rb") as f:
        head = f.read(len(MAGIC))
    if head == MAGIC:
        raise CheckpointError(f"{path} is a .fanin model file, not a training checkpoint: it is already what fanin "
                              "export makes (fanin info / eval / predict read it).")
    if not head.startswith(b"PK"):
        raise CheckpointError(f"{path} is not a fanin checkpoint (not an .npz archive); fanin train "
                              "--checkpoint-every N writes them.")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["__meta__"]).decode())
            arrays = {k: z[k] for k in z.files if k != "__meta__"}
    except (OSError, ValueError, KeyError, json.JSONDecodeError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path} is not a readable fanin checkpoint ({exc}).") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a fanin checkpoint of version {VERSION}.")
    try:
        state = unflatten(meta.get("state"), arrays)
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is corrupt: its index names an array it does not hold ({exc}).") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is corrupt: it holds no training state.")
    return state


def training_state(model, opt, schedule, updater, rng, epoch, history, compressor=None):
    """Everything needed to continue a run exactly (``compressor``: a ``SelfCompression``, if any)."""
    return {
        "epoch": epoch, "history": history, "model": model.state_dict(), "optimizer": opt.state_dict(),
        "schedule_t": schedule.t, "updater": updater.state_dict() if updater is not None else None,
        "compressor": compressor.state_dict() if compressor is not None else None,
        "rng": rng.bit_generator.state,
        "dropout_rngs": [m.rng.bit_generator.state for m in model.modules() if isinstance(m, nn.Dropout)],
    }


def restore_training_state(state, model, opt, schedule, updater, rng, compressor=None):
    """Load ``training_state`` output into live objects; returns (epoch, history).

    The model takes the checkpoint's shapes (layers self-compression shrank) before the optimizer,
    the sparsity updater and the compressor load their state for those shapes.
    """
    if not isinstance(state, dict):
        raise CheckpointError("the checkpoint holds no training state.")
    for key, kind in (("epoch", int), ("history", list), ("model", dict), ("optimizer", dict), ("schedule_t", int),
                      ("rng", dict), ("dropout_rngs", list)):
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise CheckpointError(f"the checkpoint's {key!r} is {'missing' if value is None else repr(value)[:40]}, "
                                  f"not {'an integer' if kind is int else 'a ' + kind.__name__}: it is corrupt or not a "
                                  "training checkpoint.")
    epoch, t = state["epoch"], state["schedule_t"]
    if epoch < 0 or not all(isinstance(h, dict) for h in state["history"]) or len(state["history"]) > epoch:
        raise CheckpointError(f"the checkpoint's epoch {epoch} and its history of {len(state['history'])} epochs "
                              "disagree: it is corrupt.")
    total = getattr(schedule, "total_steps", None)
    if t < 0 or (total is not None and t > total):
        raise CheckpointError(f"the checkpoint's schedule step {t} lies outside this run's 0..{total}; resume with "
                              "the run's settings (--epochs, --batch-size, --limit).")
    if (state.get("compressor") is None) != (compressor is None):
        raise CheckpointError("the checkpoint was written " + ("with" if compressor is None else "without") +
                              " self-compression; resume with the same --compress setting.")
    if compressor is not None:  # before the model adopts the checkpoint's (shrunk) shapes
        compressor.check_state(state["compressor"])
    bad = nn.nonfinite(state["model"].items())  # a NaN weight would train on silently (a ReLU maps NaN to 0)
    if bad:
        raise CheckpointError(f"the checkpoint's {bad[0]} holds NaN or Inf: its run diverged or the file is corrupt; "
                              "resume from an earlier checkpoint.")
    try:
        model.load_state_dict(state["model"], resize=compressor is not None)
    except KeyError as exc:  # names the missing and unexpected arrays
        raise CheckpointError(f"the checkpoint's model does not fit this one: {exc.args[0]}") from None
    opt.load_state_dict(state["optimizer"])
    schedule.t = t
    opt.lr = schedule.lr_at(schedule.t)
    if updater is not None:
        updater.load_state_dict(state["updater"])
    if compressor is not None:
        compressor.load_state_dict(state["compressor"])
    rng.bit_generator.state = state["rng"]
    for m, st in zip([m for m in model.modules() if isinstance(m, nn.Dropout)], state["dropout_rngs"]):
        m.rng.bit_generator.state = st
    return epoch, list(state["history"])
