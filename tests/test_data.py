"""Fashion-MNIST loading and batching (synthetic IDX files; the real set only in integration tests)."""
import gzip
import io

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
    monkeypatch.delenv("FANIN_DATA", raising=False)
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


def _one_line(exc_info, *says):
    msg = str(exc_info.value)
    assert "\n" not in msg and all(w in msg for w in says), msg


@pytest.mark.parametrize("labels", [np.full(5, 12), np.full(5, 255), np.zeros((5, 2))])
def test_labels_outside_the_classes_are_refused(fake_dataset, labels):
    write_idx(fake_dataset / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(data.DatasetError) as e:
        data.load_fashion_mnist("test")
    _one_line(e, str(fake_dataset / "t10k-labels-idx1-ubyte.gz"), "dataset-fashion-mnist")


@pytest.mark.parametrize("images, says", [(np.zeros((5, 28, 27)), "(N, 28, 28)"), (np.zeros((5, 784)), "(N, 28, 28)"),
                                          (np.zeros((4, 28, 28)), "4 images but")])
def test_image_shape_and_count_are_checked(fake_dataset, images, says):
    write_idx(fake_dataset / "t10k-images-idx3-ubyte.gz", images)
    with pytest.raises(data.DatasetError) as e:
        data.load_fashion_mnist("test")
    _one_line(e, str(fake_dataset / "t10k-images-idx3-ubyte.gz"), says)


def test_eval_refuses_bad_labels_in_one_line(fake_dataset, tmp_path, capsys):
    import fanin
    from fanin import cli, models

    model_file = tmp_path / "m.fanin"
    fanin.save(models.mlp([784, 16, 10], seed=0), model_file)
    write_idx(fake_dataset / "t10k-labels-idx1-ubyte.gz", np.full(5, 12))
    assert cli.main(["eval", str(model_file)]) == 2  # it said "test accuracy: 0.0000"
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "t10k-labels-idx1-ubyte.gz" in err, err


def _leave_one(d):
    for name in data.FILES["train"] + data.FILES["test"][:1]:
        (d / name).unlink()
    return d


def _folder_for_a_file(d):
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    (d / "t10k-labels-idx1-ubyte.gz").mkdir()
    return d


@pytest.mark.parametrize("how, says", [
    (lambda d: d / "no-such-folder", "does not exist"),
    (_leave_one, "lacks train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz"),
    (lambda d: d / "train-images-idx3-ubyte.gz", "is a file, not a folder"),
    (_folder_for_a_file, "lacks t10k-labels-idx1-ubyte.gz"),
], ids=["missing-folder", "3-of-4-missing", "a-file", "a-folder-for-a-file"])
def test_an_unusable_fanin_data_is_refused_not_passed_over(fake_dataset, tmp_path_factory, monkeypatch, how, says):
    other = tmp_path_factory.mktemp("system")  # a good copy elsewhere: once used silently
    for name in data.FILES["train"] + data.FILES["test"]:
        (other / name).write_bytes((fake_dataset / name).read_bytes())
    monkeypatch.setattr(data, "SYSTEM_DIR", other)
    monkeypatch.setenv("FANIN_DATA", str(how(fake_dataset)))
    with pytest.raises(data.DatasetNotFound) as e:
        data.load_fashion_mnist("test")
    _one_line(e, "FANIN_DATA=", says, ".gz")
    monkeypatch.delenv("FANIN_DATA")
    assert data.find_fashion_mnist() == other


def test_uncompressed_files_are_read(fake_dataset, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DIR", fake_dataset / "none")
    monkeypatch.setenv("XDG_CACHE_HOME", str(fake_dataset / "cache"))
    want = data.load_fashion_mnist("test")
    for name in data.FILES["train"] + data.FILES["test"]:
        (fake_dataset / name.removesuffix(".gz")).write_bytes(gzip.decompress((fake_dataset / name).read_bytes()))
        (fake_dataset / name).unlink()
    assert data.find_fashion_mnist() == fake_dataset
    got = data.load_fashion_mnist("test")
    assert all(np.array_equal(a, b) for a, b in zip(got, want))


def test_a_missing_directory_says_how_to_get_it(tmp_path):
    with pytest.raises(data.DatasetNotFound) as e:
        data.load_fashion_mnist("test", directory=tmp_path / "nowhere")
    _one_line(e, str(tmp_path / "nowhere"), "does not exist", "apt-get install dataset-fashion-mnist")
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
    with pytest.raises(data.DatasetNotFound) as e:
        data.load_fashion_mnist("test", directory=tmp_path)
    _one_line(e, str(tmp_path), "lacks t10k-labels-idx1-ubyte.gz")


def _gz(payload):
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as f:
        f.write(payload)
    return buf.getvalue()


GOOD = bytes([0, 0, 8, 1, 0, 0, 0, 200]) + bytes(range(200))


@pytest.mark.parametrize("blob", [
    _gz(GOOD)[:10] + b"\xff" + _gz(GOOD)[11:],  # an invalid deflate block: zlib.error
    _gz(GOOD)[:30],  # cut short: EOFError
    GOOD,  # not gzip at all, under a .gz name: gzip.BadGzipFile
], ids=["corrupt", "truncated", "not-gzip"])
def test_a_broken_gzip_file_is_named(tmp_path, blob):
    p = tmp_path / "x.gz"
    p.write_bytes(blob)
    with pytest.raises(data.DatasetError) as e:
        data.read_idx(p)
    _one_line(e, str(p), "gzip", "dataset-fashion-mnist")


@pytest.mark.parametrize("raw, says", [
    (bytes([0, 0, 8, 0, 7]), "0 dimensions"),
    (bytes([0, 0, 8, 4]) + bytes([0, 1, 0, 0]) * 4, "header says (65536, 65536, 65536, 65536) but holds 0 bytes"),
    (bytes([0, 0, 8, 1, 0, 0]), "corrupt IDX header"),
    (bytes([0, 0, 8, 3, 0, 0, 0, 0, 0, 0, 0, 28, 0, 0, 0, 28]), "holds no data"),
], ids=["0-d", "overflow", "short-header", "no-images"])
def test_bad_idx_headers_are_named(tmp_path, raw, says):
    p = tmp_path / "x.gz"
    p.write_bytes(_gz(raw))
    with pytest.raises(data.DatasetError) as e:
        data.read_idx(p)
    _one_line(e, str(p), says)


def test_download_checks_and_keeps_the_gzip_files(tmp_path, monkeypatch):
    served = {}

    def urlopen(url, timeout):
        return io.BytesIO(served[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
    for name in data.FILES["train"] + data.FILES["test"]:
        served[name] = _gz(GOOD)
    assert data.download_fashion_mnist(tmp_path) == tmp_path  # the .part file was once read as plain IDX
    assert data.read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz").shape == (200,)
    served["t10k-labels-idx1-ubyte.gz"] = _gz(GOOD)[:30]
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DatasetError, match="gzip"):
        data.download_fashion_mnist(tmp_path)
    assert not (tmp_path / "t10k-labels-idx1-ubyte.gz").exists()
    assert not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("images", [np.array(3, np.uint8), np.zeros(784, np.uint8),
                                    np.zeros((2, 28, 28), np.float32)], ids=["0-d", "1-d", "float"])
def test_normalize_refuses_what_is_not_uint8_images(images):
    with pytest.raises(data.DatasetError) as e:  # float images may be scaled already: /255 again was silent
        data.normalize(images)
    _one_line(e, "uint8", str(images.shape))


def test_normalize_takes_no_images():
    assert data.normalize(np.zeros((0, 28, 28), np.uint8), flatten=True).shape == (0, 784)
    assert data.normalize(np.zeros((0, 28, 28), np.uint8)).shape == (0, 1, 28, 28)


def test_batches_take_lists_and_refuse_bad_arguments():
    got = list(data.batches([[1, 2], [3, 4], [5, 6]], [0, 1, 0], 2, shuffle=False))
    assert [b[0].tolist() for b in got] == [[[1, 2], [3, 4]], [[5, 6]]] and got[1][1].tolist() == [0]
    x = np.arange(10)
    for size in (0, -1, 2.0, "4", True, None):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            list(data.batches(x, x, size))
    assert len(list(data.batches(x, x, np.int64(5)))) == 2
    with pytest.raises(ValueError, match="3 inputs but 2 labels"):
        list(data.batches([1, 2, 3], [0, 1], 2))
    with pytest.raises(ValueError, match="one sample per row"):
        list(data.batches(np.float32(1), np.int64(0), 2))
