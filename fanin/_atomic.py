"""Atomic file replacement shared by checkpoints and model files: a reader sees the old file or the new one."""
from __future__ import annotations

import os
import pathlib
import stat
import tempfile


def check_target(path) -> pathlib.Path:
    """``path`` as a file a writer may replace: a symbolic link stands for its target (the link stays), and an
    existing target must be a regular file -- renaming over ``/dev/null`` or a FIFO would replace the device, not
    write to it. Raises ``IsADirectoryError`` / ``ValueError`` (naming the path) otherwise; no file is touched."""
    path = pathlib.Path(path)
    if str(path) in ("", "."):
        raise ValueError("the output path is empty; give a file name such as model.fanin.")
    real = pathlib.Path(os.path.realpath(path))
    if real.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file path inside it, e.g. {path / 'model.fanin'}.")
    if real.exists() and not stat.S_ISREG(real.stat().st_mode):
        raise ValueError(f"{path} exists and is not a regular file (a device, FIFO or socket); write to a file.")
    return real


def _umask() -> int:
    """The process's umask, read without setting it (``os.umask`` can only be read by changing it, which would race
    with other threads creating files); 0o022 where /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def write_atomic(path, write) -> pathlib.Path:
    """Call ``write(f)`` on a temporary file beside ``path`` (parents created), fsync it, and rename it over
    ``path`` (``check_target``: through a symbolic link to its target, never over a device); on any error the
    temporary file is removed and ``path`` is left as it was. The file gets the permissions a plain ``open``
    would give it (0666 less the umask), not the temporary file's 0600."""
    real = check_target(path)
    real.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=real.name + ".", suffix=".tmp", dir=real.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, real)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return pathlib.Path(path)
