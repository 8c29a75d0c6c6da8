"""Atomic file replacement shared by checkpoints and model files: a reader sees the old file or the new one."""
from __future__ import annotations

import os
import pathlib
import tempfile


def write_atomic(path, write) -> pathlib.Path:
    """Call ``write(f)`` on a temporary file beside ``path`` (parents created), fsync it, and rename it over
    ``path``; on any error the temporary file is removed and ``path`` is left as it was."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file path inside it, e.g. {path / 'model.fanin'}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path
