"""Fashion-MNIST loading and batching (synthetic IDX files; the real set only in integration tests)."""
import gzip

import numpy as np
import pytest

from fanin import data


def write_idx(path, arr):
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def fake_dataset(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 5)):
        img, lab = data.FILES[split]
        write_idx(tmp_path / img, rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / lab, rng.integers(0, 10, n))
    monkeypatch.setenv("FANIN_DATA", str(tmp_path))
    return tmp_path


def test_fanin_data_env_is_searched_first(fake_dataset):
    assert data.find_fashion_mnist() == fake_dataset
    x, y = data.load_fashion_mnist("train")
    assert x.shape == (12, 28, 28) and x.dtype == np.uint8 and y.shape == (12,)


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FANIN_DATA", str(tmp_path))
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "none")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(data.DatasetNotFound, match="apt-get install dataset-fashion-mnist"):
        data.find_fashion_mnist()


def test_corrupt_idx_is_refused(tmp_path):
    p = tmp_path / "bad.gz"
    with gzip.open(p, "wb") as f:
        f.write(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(p)
    with gzip.open(p, "wb") as f:
        f.write(b"PK\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(p)


def test_normalize_shapes_and_stats():
    img = np.full((3, 28, 28), 255, np.uint8)
    flat = data.normalize(img, flatten=True)
    assert flat.shape == (3, 784) and flat.dtype == np.float32
    np.testing.assert_allclose(flat, (1 - data.FASHION_MNIST_MEAN) / data.FASHION_MNIST_STD, rtol=1e-5)
    assert data.normalize(img).shape == (3, 1, 28, 28)


def test_batches_cover_everything_and_are_seeded():
    x, y = np.arange(10), np.arange(10)
    got = list(data.batches(x, y, 4, rng=1))
    assert [len(b[0]) for b in got] == [4, 4, 2]
    assert sorted(np.concatenate([b[0] for b in got])) == list(range(10))
    again = list(data.batches(x, y, 4, rng=1))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(got, again))
    assert [len(b[0]) for b in data.batches(x, y, 4, drop_last=True)] == [4, 4]
    with pytest.raises(ValueError, match="batch_size"):
        list(data.batches(x, y, 0))
