"""Fashion-MNIST: find the IDX files, read them, normalise, and batch with a seed."""
from __future__ import annotations

import gzip
import math
import os
import pathlib
import shutil
import urllib.request
import zlib

import numpy as np

__all__ = [
    "DatasetError", "DatasetNotFound", "find_fashion_mnist", "read_idx", "load_fashion_mnist", "normalize", "batches",
    "download_fashion_mnist", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "CLASSES",
]

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SYSTEM_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")


class DatasetError(ValueError):
    """A Fashion-MNIST file (or array) is unusable; the message names it and says what to do."""


class DatasetNotFound(FileNotFoundError, DatasetError):
    """Fashion-MNIST is not on this machine; the message says how to get it."""


REFETCH = ("download it afresh (`fanin download` into an empty folder) or reinstall it "
           "(`sudo apt-get install --reinstall dataset-fashion-mnist`)")


def cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "fanin" / "fashion-mnist"


def how_to_get() -> str:
    return ("Get it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or `fanin download` "
            f"(fetches the four .gz files from {OFFICIAL_URL} into {cache_dir()}), or put the files "
            "in a folder and set FANIN_DATA to it.")


def search_path() -> list[pathlib.Path]:
    """Folders searched, in order: ``$FANIN_DATA`` (then only it), the Debian package's folder, the user cache."""
    if os.environ.get("FANIN_DATA"):
        env = pathlib.Path(os.environ["FANIN_DATA"])
        return [env, env / "fashion-mnist"]
    return [SYSTEM_DIR, cache_dir()]


def locate(directory, name: str):
    """``directory/name`` (a ``.gz`` name), or the same file uncompressed (the name without ``.gz``), or None."""
    for path in (pathlib.Path(directory) / name, pathlib.Path(directory) / name.removesuffix(".gz")):
        if path.is_file():
            return path
    return None


def missing_files(directory) -> list[str]:
    """The Fashion-MNIST files ``directory`` lacks (in neither the ``.gz`` nor the uncompressed form)."""
    return [f for pair in FILES.values() for f in pair if locate(directory, f) is None]


def find_fashion_mnist() -> pathlib.Path:
    """The first folder holding all four Fashion-MNIST files, or ``DatasetNotFound`` saying how to get them.

    A set ``FANIN_DATA`` is a request for that copy: it is used or refused, never silently passed over."""
    for d in search_path():
        if not missing_files(d):
            return d
    env = os.environ.get("FANIN_DATA")
    if env:
        if not os.path.isdir(env):
            problem = "is a file, not a folder" if os.path.exists(env) else "does not exist"
        else:
            d = min(search_path(), key=lambda c: len(missing_files(c)))  # the nearer of the two
            problem = f"lacks {', '.join(missing_files(d))} in {d}"
        raise DatasetNotFound(
            f"FANIN_DATA={env} {problem}; it must be a folder holding the four files "
            f"{', '.join(f for pair in FILES.values() for f in pair)} (or them uncompressed, without .gz), directly "
            "or in a fashion-mnist subfolder. Fix it, or unset FANIN_DATA to use the system copy "
            "(`sudo apt-get install dataset-fashion-mnist`) or `fanin download`'s.")
    looked = ", ".join(str(d) for d in search_path())
    raise DatasetNotFound(f"Fashion-MNIST not found (looked in {looked}). " + how_to_get())


def read_idx(path) -> np.ndarray:
    """Read one unsigned-byte IDX file (gzipped, or plain) into an array, checking its header."""
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":  # gzip's magic: a download's .part file is gzipped too
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:  # not gzip (BadGzipFile), cut short, or corrupt
            raise DatasetError(f"{path} is not a complete gzip file ({exc}); {REFETCH}.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file (bad magic number); {REFETCH}.")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if ndim == 0 or len(raw) < offset:
        raise DatasetError(f"{path} has a corrupt IDX header ({ndim} dimensions, {len(raw)} bytes); {REFETCH}.")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if math.prod(dims) == 0:
        raise DatasetError(f"{path} holds no data (its header says shape {dims}); {REFETCH}.")
    if len(raw) - offset != math.prod(dims):  # Python ints: a corrupt header's huge shape cannot wrap around
        raise DatasetError(f"{path} is truncated or corrupt: header says {dims} but holds {len(raw) - offset} "
                           f"bytes; {REFETCH}.")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist(split: str = "train", directory=None):
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the ``train`` or ``test`` split."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    d = pathlib.Path(directory) if directory else find_fashion_mnist()
    if not d.is_dir():
        problem = "is not a folder" if d.exists() else "does not exist"
        raise DatasetNotFound(f"{d} {problem}, so it holds no Fashion-MNIST. " + how_to_get())
    paths = [locate(d, f) for f in FILES[split]]
    if None in paths:
        missing = [f for f, p in zip(FILES[split], paths) if p is None]
        raise DatasetNotFound(f"{d} lacks {', '.join(missing)} (the {split} split). " + how_to_get())
    (img_path, lab_path), (images, labels) = paths, [read_idx(p) for p in paths]
    # read_idx returns uint8 only (it refuses other IDX types), so shapes and values are what is left to check
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DatasetError(f"{img_path} holds an array of shape {images.shape}, not Fashion-MNIST's (N, 28, 28) "
                           f"images; {REFETCH}.")
    if labels.ndim != 1:
        raise DatasetError(f"{lab_path} holds an array of shape {labels.shape}, not Fashion-MNIST's (N,) labels; "
                           f"{REFETCH}.")
    if labels.max() >= len(CLASSES):
        raise DatasetError(f"{lab_path} holds label {labels.max()}, outside Fashion-MNIST's classes 0-9; {REFETCH}.")
    if len(images) != len(labels):
        raise DatasetError(f"{img_path} holds {len(images)} images but {lab_path} {len(labels)} labels; "
                           f"{REFETCH}.")
    return images, labels.astype(np.int64)


def normalize(images: np.ndarray, flatten: bool = False) -> np.ndarray:
    """uint8 images (N, H, W) -> float32 with the dataset's mean and std; (N, H*W) or (N, 1, H, W).

    Only uint8 is taken: float images may already be scaled to [0, 1] (or normalised), and dividing them by 255
    again would train or score on the wrong inputs without a word."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DatasetError(f"normalize takes uint8 images of shape (N, H, W) as load_fashion_mnist returns them, "
                           f"got {images.dtype} of shape {images.shape}.")
    x = (images.astype(np.float32) * np.float32(1 / 255) - np.float32(FASHION_MNIST_MEAN)) / np.float32(
        FASHION_MNIST_STD)
    n, h, w = x.shape
    return x.reshape(n, h * w) if flatten else x.reshape(n, 1, h, w)  # no -1: N may be 0


def batches(x, y, batch_size: int, shuffle: bool = True, rng=None, drop_last: bool = False):
    """Yield (x_batch, y_batch); shuffled with ``rng`` (a Generator or a seed) when ``shuffle``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    # lists become arrays (they cannot be indexed by an index array); arrays, host or device, are kept as they are
    x, y = (a if hasattr(a, "shape") else np.asarray(a) for a in (x, y))
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(f"batches needs x and y with one sample per row, got shapes {x.shape} and {y.shape}.")
    if len(x) != len(y):
        raise ValueError(f"batches: {len(x)} inputs but {len(y)} labels.")
    n = len(x)
    if shuffle:
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        order = rng.permutation(n)
    else:
        order = np.arange(n)
    stop = n - (n % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


def download_fashion_mnist(directory=None, url: str = OFFICIAL_URL) -> pathlib.Path:
    """Fetch the four .gz files from the dataset's official location (needs a network)."""
    d = pathlib.Path(directory) if directory else cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    for name in [f for pair in FILES.values() for f in pair]:
        target = d / name
        if target.is_file():
            continue
        tmp = target.with_name(target.name + ".part")
        try:
            with urllib.request.urlopen(url + name, timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise DatasetNotFound(
                f"could not download {url + name} ({exc}); install `dataset-fashion-mnist` with apt-get "
                "or copy the files into a folder and set FANIN_DATA."
            ) from exc
        try:
            read_idx(tmp)  # refuse a corrupt download before it takes the final name
        except DatasetError:
            tmp.unlink()
            raise
        tmp.replace(target)
    return d
