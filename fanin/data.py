"""Fashion-MNIST: find the IDX files, read them, normalise, and batch with a seed."""
from __future__ import annotations

import gzip
import os
import pathlib
import shutil
import urllib.request

import numpy as np

__all__ = [
    "DatasetNotFound", "find_fashion_mnist", "read_idx", "load_fashion_mnist", "normalize", "batches",
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


class DatasetNotFound(FileNotFoundError):
    """Fashion-MNIST is not on this machine; the message says how to get it."""


def cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "fanin" / "fashion-mnist"


def search_path() -> list[pathlib.Path]:
    """Folders searched, in order: ``$FANIN_DATA``, the Debian package's folder, the user cache."""
    dirs = []
    if os.environ.get("FANIN_DATA"):
        env = pathlib.Path(os.environ["FANIN_DATA"])
        dirs += [env, env / "fashion-mnist"]
    return dirs + [SYSTEM_DIR, cache_dir()]


def find_fashion_mnist() -> pathlib.Path:
    """The first folder holding all four Fashion-MNIST files, or ``DatasetNotFound`` saying how to get them."""
    needed = [f for pair in FILES.values() for f in pair]
    for d in search_path():
        if all((d / f).is_file() for f in needed):
            return d
    looked = ", ".join(str(d) for d in search_path())
    raise DatasetNotFound(
        f"Fashion-MNIST not found (looked in {looked}). Get it with "
        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or `fanin download` "
        f"(fetches the four .gz files from {OFFICIAL_URL} into {cache_dir()}), or put the files "
        "in a folder and set FANIN_DATA to it."
    )


def read_idx(path) -> np.ndarray:
    """Read one (optionally gzipped) IDX file into an array, checking its header."""
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number).")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise ValueError(f"{path} is truncated or corrupt: header says {dims} but holds {len(raw) - offset} bytes.")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist(split: str = "train", directory=None):
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the ``train`` or ``test`` split."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    d = pathlib.Path(directory) if directory else find_fashion_mnist()
    images, labels = (read_idx(d / f) for f in FILES[split])
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{d}: {images.shape[0]} images but {labels.shape[0]} labels in the {split} split.")
    return images, labels.astype(np.int64)


def normalize(images: np.ndarray, flatten: bool = False) -> np.ndarray:
    """uint8 images -> float32 with the dataset's mean and std; (N, 784) or (N, 1, 28, 28)."""
    x = (images.astype(np.float32) * np.float32(1 / 255) - np.float32(FASHION_MNIST_MEAN)) / np.float32(
        FASHION_MNIST_STD)
    n = x.shape[0]
    return x.reshape(n, -1) if flatten else x.reshape(n, 1, *x.shape[1:])


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool = True, rng=None,
            drop_last: bool = False):
    """Yield (x_batch, y_batch); shuffled with ``rng`` (a Generator or a seed) when ``shuffle``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
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
        tmp = target.with_suffix(".part")
        try:
            with urllib.request.urlopen(url + name, timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise DatasetNotFound(
                f"could not download {url + name} ({exc}); install `dataset-fashion-mnist` with apt-get "
                "or copy the files into a folder and set FANIN_DATA."
            ) from exc
        read_idx(tmp)  # refuse a corrupt download before it takes the final name
        tmp.replace(target)
    return d
