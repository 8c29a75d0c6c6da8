"""The inference runtime: compiled networks equal the autograd models, files round-trip, bad input is refused."""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import fanin
from fanin import Tensor, compress, io, models, nn, no_grad, optim, runtime
from fanin.runtime import FormatError, PredictError


def reference(model, x):
    model.eval()
    with no_grad():
        return model(Tensor(x)).data


def randomize(model, seed=0):
    """Non-trivial batch-norm statistics and biases, so folding them is tested."""
    rng = np.random.default_rng(seed)
    for m in model.modules():
        if isinstance(m, nn._BatchNorm):
            m.running_mean[...] = rng.uniform(-0.3, 0.3, m.num_features)
            m.running_var[...] = rng.uniform(0.5, 2.0, m.num_features)
            m.weight.data[...] = rng.uniform(0.5, 1.5, m.num_features)
            m.bias.data[...] = rng.uniform(-0.3, 0.3, m.num_features)
        if getattr(m, "bias", None) is not None and isinstance(m, compress.COMPRESSIBLE):
            m.bias.data[...] = rng.uniform(-0.2, 0.2, m.bias.shape)
    return model


CASES = {
    "mlp dense": (lambda: models.mlp([30, 20, 16, 5], seed=0), (30,)),
    "mlp condensed": (lambda: models.mlp([30, 20, 16, 5], sparsity=0.7, seed=1), (30,)),
    "mlp gelu dropout": (lambda: nn.Sequential(nn.Linear(12, 9, seed=0), nn.GELU(), nn.Dropout(0.5),
                                               nn.FanInLinear(9, 4, k=3, seed=1)), (12,)),
    "mlp batch norm": (lambda: nn.Sequential(nn.Linear(12, 9, seed=0), nn.BatchNorm1d(9), nn.ReLU(),
                                             nn.Linear(9, 4, seed=1)), (12,)),
    "cnn dense": (lambda: models.cnn(channels=(4, 6), hidden=12, image_size=12, seed=0), (1, 12, 12)),
    "cnn condensed": (lambda: models.cnn(channels=(4, 6), hidden=12, image_size=12, sparsity=0.6, seed=2),
                      (1, 12, 12)),
    "cnn avg pool stride": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1, seed=0), nn.ReLU(),
                                                  nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 3, seed=1)),
                            (2, 8, 8)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("quantized", [False, True])
def test_compiled_network_equals_the_model_and_survives_a_file(case, quantized, tmp_path):
    make, shape = CASES[case]
    model = randomize(make())
    if quantized:
        compress.SelfCompression(model, init_bits=3.5)  # 4-bit layers: nibble-packed in the file
    x = np.random.default_rng(5).standard_normal((7, *shape)).astype(np.float32)
    want = reference(model, x)
    net = fanin.compile(model, input_shape=shape if len(shape) == 3 else None)
    np.testing.assert_allclose(net.predict(x), want, rtol=1e-4, atol=1e-5)
    for b in (1, 3):  # the rows form (below infer.SMALL_BATCH) as well as the panels form (7)
        np.testing.assert_allclose(net.predict(x[:b]), want[:b], rtol=1e-4, atol=1e-5)
    path = fanin.save(net, tmp_path / "m.fanin")
    for mmap in (True, False):
        loaded = fanin.load(path, mmap=mmap)
        np.testing.assert_allclose(loaded.predict(x), want, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(loaded.predict(x), net.predict(x))
    assert loaded.info()["layers"] == net.info()["layers"]


def test_quantized_export_uses_exactly_the_training_weights():
    model = randomize(models.mlp([20, 16, 4], sparsity=0.5, seed=0))
    compress.SelfCompression(model, init_bits=3.5)
    model[0].bits.data[:] = np.linspace(1.2, 7.9, 16)  # some channel needs 8 bits: the layer is int8
    plan = runtime.lower(model)
    ops = [o for o in plan["ops"] if o["op"] == "linear"]
    assert [o["bits"] for o in ops] == [8, 4]  # every channel of the second layer fits 4 bits
    for op, layer in zip(ops, (model[0], model[2])):
        a = op["arrays"]
        q = compress.quantize(layer.weight_param.data, layer.bits.data, layer.exponent.data)
        np.testing.assert_array_equal(a["scale"][:, None] * a["qvalues"].astype(np.float32), q)


def test_a_layer_with_channels_above_8_bits_is_exported_as_its_exact_float32_values(tmp_path):
    # init bits 9-16 (or a run whose bits grew) do not fit int8: the layer keeps q(w) in float32, still exactly
    # what the quantized training network computes; `fanin train --compress --out` used to fail after training
    model = randomize(models.mlp([20, 16, 4], sparsity=0.5, seed=0))
    compress.SelfCompression(model, init_bits=12)
    model[0].bits.data[:] = np.linspace(1.2, 11.5, 16)
    x = np.random.default_rng(3).standard_normal((5, 20)).astype(np.float32)
    net = fanin.load(fanin.save(model, tmp_path / "m.fanin"))
    ops = [o for o in net.plan["ops"] if o["op"] == "linear"]
    assert [o["bits"] for o in ops] == [32, 32]
    q = compress.quantize(model[0].weight_param.data, model[0].bits.data, model[0].exponent.data)
    np.testing.assert_array_equal(ops[0]["arrays"]["values"], q)
    np.testing.assert_allclose(net.predict(x), reference(model, x), rtol=1e-5, atol=1e-6)
    model[0].bits.data[3] = np.nan
    with pytest.raises(ValueError, match="diverged"):
        fanin.compile(model)


def test_ablated_neurons_are_dropped_and_folded():
    model = randomize(models.mlp([10, 8, 6, 3], sparsity=0.5, seed=0))
    for layer in (model[0], model[2]):
        active = np.ones(layer.n_out, bool)
        active[[1, 4]] = False
        layer.set_connectivity(layer.indices, layer.values.data, active)
    x = np.random.default_rng(1).standard_normal((4, 10)).astype(np.float32)
    net = fanin.compile(model)
    np.testing.assert_allclose(net.predict(x), reference(model, x), rtol=1e-5, atol=1e-6)
    ops = [o for o in net.plan["ops"] if o["op"] == "linear"]
    assert [o["n_out"] for o in ops] == [6, 4, 3] and ops[1]["n_in"] == 6 and ops[2]["n_in"] == 4


def test_post_training_int8_has_power_of_two_scales_and_stays_close():
    model = randomize(models.mlp([40, 30, 5], seed=0))
    x = np.random.default_rng(2).standard_normal((16, 40)).astype(np.float32)
    plan = runtime.quantize(runtime.lower(model), 8)
    for op in plan["ops"]:
        s = op["arrays"]["scale"]
        assert op["bits"] == 8 and np.all(np.log2(s) == np.round(np.log2(s)))
        assert np.abs(op["arrays"]["qvalues"]).max() <= 127
    y, want = runtime.Network(plan).predict(x), reference(model, x)
    assert np.abs(y - want).max() < 0.02 * np.abs(want).max()


# ------------------------------------------------------------------ predict input
@pytest.fixture(scope="module")
def net():
    return fanin.compile(randomize(models.mlp([6, 5, 3], seed=0)))


def test_predict_shapes(net):
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    assert net.predict(x).shape == (4, 3)
    np.testing.assert_allclose(net.predict(x[1]), net.predict(x)[1], rtol=1e-6)  # one sample
    np.testing.assert_allclose(net.predict(x.astype(np.float64)), net.predict(x), rtol=1e-6)
    assert net.predict(np.zeros((0, 6), np.float32)).shape == (0, 3)
    p = net.predict_proba(x)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-6)
    assert np.array_equal(p.argmax(1), net.predict(x).argmax(1))


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 7), np.float32), r"shape \(2, 7\).*\(batch, 6\)"),
    (np.zeros((2, 3, 6), np.float32), r"shape \(2, 3, 6\)"),
    (np.zeros((2, 6), np.int64), "dtype int64.*floats"),
    (np.array([[0, 0, 0, 0, 0, np.nan]], np.float32), r"sample\(s\) \[0\] hold NaN or Inf"),
    (np.array([[0, 0, np.inf, 0, 0, 0], [0] * 6], np.float32), r"sample\(s\) \[0\]"),
    ("text", "dtype <U4"),
    (np.ma.masked_array(np.zeros((1, 6), np.float32), mask=[[1, 0, 0, 0, 0, 0]]), "masked array.*x.filled"),
    (np.array([[0] * 6, [1e300, 0, 0, 0, 0, 0]]), r"sample\(s\) \[1\] hold values beyond float32's range"),
])
def test_bad_input_is_refused_with_a_sentence(net, bad, match):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning from the cast either
        with pytest.raises(PredictError, match=match):
            net.predict(bad)


def test_foreign_byte_order_is_read_as_its_values(net):
    x = np.random.default_rng(1).standard_normal((3, 6))
    want = net.predict(x.astype(np.float32))
    for dt in (">f4", ">f8"):
        np.testing.assert_array_equal(net.predict(x.astype(np.float32).astype(dt)), want)


def test_nan_policy_propagate_skips_the_check():
    n = fanin.compile(models.mlp([6, 3], seed=0), nan_policy="propagate")
    assert np.isnan(n.predict(np.full((1, 6), np.nan, np.float32))).all()
    with pytest.raises(ValueError, match="nan_policy"):
        fanin.compile(models.mlp([6, 3], seed=0), nan_policy="ignore")


@pytest.mark.parametrize("batch, row", [(1, 0), (3, 2), (5, 4), (20, 19), (40, 33), (100, 64), (2100, 2099)])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_float_mlp_finds_nan_in_x_itself_at_every_batch_size(batch, row, value):
    """A float32 MLP's engine scans x itself (the panel drivers as they pack it; the rows form with all_finite),
    so ``predict`` skips its own scan: every path (rows, half panels, panels, layerwise, several compiled calls
    past engine.CHUNK) must still refuse the sample -- and only it -- or, with nan_policy='propagate', give it
    non-finite logits and every other sample the bits it gets in the clean batch."""
    model = models.mlp([50, 40, 30, 5], sparsity=[0.8, 0.7, None], seed=1)
    strict, loose = fanin.compile(model), fanin.compile(model, nan_policy="propagate")
    assert strict._scans_x
    x = np.random.default_rng(batch).standard_normal((batch, 50)).astype(np.float32)
    clean = strict.predict(x)
    x[row, 17] = value
    with pytest.raises(PredictError, match=rf"sample\(s\) \[{row}\] hold NaN or Inf"):
        strict.predict(x)
    y = loose.predict(x)
    assert not np.isfinite(y[row]).all()
    keep = np.arange(batch) != row
    np.testing.assert_array_equal(y[keep], clean[keep])


@pytest.mark.parametrize("activations", ["float32", "int8"])
def test_an_overflow_inside_the_network_is_not_blamed_on_a_finite_input(activations):
    """A finite x whose convolution overflows: the int8 head's quantizer sees Inf (``NonFinite``), but x is clean,
    so ``predict`` returns the non-finite logits, as the float path does, instead of refusing "sample(s) []"."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, seed=0), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3, seed=1))
    model[0].weight.data[:] = 1e38
    net = fanin.compile(model, input_shape=(1, 6, 6), activations=activations)
    y = net.predict(np.ones((2, 1, 6, 6), np.float32))
    assert y.shape == (2, 3) and not np.isfinite(y).any()
    bad = np.ones((2, 1, 6, 6), np.float32)
    bad[1, 0, 2, 2] = np.nan
    with pytest.raises(PredictError, match=r"sample\(s\) \[1\]"):
        net.predict(bad)


def test_compile_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="input_shape"):
        fanin.compile(models.cnn(channels=(2, 2), hidden=4, image_size=8))

    class Custom(nn.Module):
        def __init__(self):
            self.a = nn.Linear(2, 2)

        def forward(self, x):
            return self.a(x)
    with pytest.raises(TypeError, match="Sequential"):
        fanin.compile(Custom())
    for not_a_model in (42, "model.fanin", np.zeros((2, 2))):
        with pytest.raises(TypeError, match="expected a fanin model"):
            fanin.compile(not_a_model)


def test_save_to_a_directory_says_so_and_leaves_nothing(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory; give a file path"):
        fanin.save(models.mlp([4, 2], seed=0), tmp_path)
    assert list(tmp_path.iterdir()) == [] and list(tmp_path.parent.glob(tmp_path.name + ".*.tmp")) == []


# ------------------------------------------------------------------ the file
def _saved(tmp_path):
    model = randomize(models.mlp([24, 16, 12, 4], sparsity=0.6, seed=3))
    compress.SelfCompression(model, init_bits=4)
    return fanin.save(model, tmp_path / "m.fanin"), model


def test_files_are_validated_frame_checksum_and_version(tmp_path):
    path, _ = _saved(tmp_path)
    raw = path.read_bytes()
    cases = {
        "trunc.fanin": (raw[:len(raw) // 2], "bytes long but says"),
        "short.fanin": (raw[:40], "shorter than"),
        "magic.fanin": (b"NOTFANIN" + raw[8:], "wrong magic"),
        "flip.fanin": (raw[:200] + bytes([raw[200] ^ 1]) + raw[201:], "checksum"),
        "newer.fanin": (raw[:8] + (99).to_bytes(4, "little") + raw[12:], "newer fanin"),
    }
    for name, (data, match) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(FormatError, match=match):
            fanin.load(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no model file"):
        fanin.load(tmp_path / "missing.fanin")


def _rewrite(path, edit, text=None):
    """Re-save a file with an edited header (a consistent frame and checksum): tests the semantic checks.
    ``text``: a further edit of the header's JSON text (for what ``json.dumps`` cannot write)."""
    import hashlib
    import json
    import struct

    raw = bytearray(path.read_bytes())
    fixed = struct.unpack_from(io._FIXED_FMT, raw, 0)
    header = json.loads(bytes(raw[io.FIXED:io.FIXED + fixed[4]]))
    data = bytes(raw[fixed[5]:])
    edit(header, data)
    h = json.dumps(header).encode() if text is None else text(json.dumps(header)).encode()
    d_off = io.FIXED + len(h) + (-(io.FIXED + len(h)) % io.ALIGN)
    body = h + b"\0" * (d_off - io.FIXED - len(h)) + data
    fr = struct.pack(io._FIXED_FMT, io.MAGIC, 1, 0, io.FIXED, len(h), d_off, len(data), io.FIXED + len(body), 0)
    path.write_bytes(fr + hashlib.sha256(fr + body).digest() + body)


@pytest.mark.parametrize("edit, match", [
    (lambda h, d: h["plan"]["ops"][0].update(n_in=25), "n_in=25"),
    (lambda h, d: h["arrays"]["0/bias"].update(shape=[3]), "shape"),
    (lambda h, d: h["arrays"]["0/bias"].update(dtype="float64"), "dtype"),
    (lambda h, d: h["arrays"]["0/bias"].update(offset=10**9), "outside the data"),
    (lambda h, d: h["plan"]["ops"][0]["arrays"].update(bias="2/bias"), "used twice|shape"),
    (lambda h, d: h["plan"]["ops"][0].update(op="attention"), "unknown op"),
    (lambda h, d: h["arrays"]["0/indices"].update(n_in=3), "Rice|outside"),
])
def test_consistent_but_wrong_headers_are_refused(tmp_path, edit, match):
    path, _ = _saved(tmp_path)
    _rewrite(path, edit)
    with pytest.raises(FormatError, match=match):
        fanin.load(path)


def test_headers_that_would_exhaust_memory_or_the_integer_parser_are_refused(tmp_path):
    path, _ = _saved(tmp_path)
    assert json_entry(path, "0/indices")["encoding"] == "rice"
    # a Rice-coded array whose shape its bytes cannot hold: refused before an 8 GiB allocation is tried
    _rewrite(path, lambda h, d: h["arrays"]["0/indices"].update(shape=[1 << 20, 1 << 10]))
    with pytest.raises(FormatError, match="cannot hold"):
        fanin.load(path)
    path, _ = _saved(tmp_path)
    _rewrite(path, lambda h, d: h["plan"]["ops"][0].update(n_in=123456789),
             text=lambda t: t.replace("123456789", "1" + "0" * 5000))  # past Python's 4300-digit limit
    with pytest.raises(FormatError, match="header"):
        fanin.load(path)


def json_entry(path, name):
    import json
    import struct

    raw = path.read_bytes()
    fixed = struct.unpack_from(io._FIXED_FMT, raw, 0)
    return json.loads(raw[io.FIXED:io.FIXED + fixed[4]])["arrays"][name]


def test_an_active_list_is_checked_on_dense_layers_too():
    net = fanin.compile(models.mlp([20, 8, 3], seed=0))
    plan = net.plan
    for bad in ([True], [True] * 9, [[True]] * 8, [1] * 8):
        plan["ops"][0]["active"] = bad
        with pytest.raises(FormatError, match="'active' must be a list of 8 booleans"):
            fanin.runtime.Network(plan)
    plan["ops"][0]["active"] = [True] * 7 + [False]  # valid: the last row outputs its bias
    x = np.random.default_rng(0).standard_normal((3, 20)).astype(np.float32)
    got = fanin.runtime.Network(plan).predict(x)
    w = [np.asarray(op["arrays"]["values"], np.float64) for op in plan["ops"] if op["op"] == "linear"]
    b = [np.asarray(op["arrays"]["bias"], np.float64) for op in plan["ops"] if op["op"] == "linear"]
    h = np.maximum(x @ w[0].T + b[0], 0)
    h[:, 7] = max(b[0][7], 0)
    np.testing.assert_allclose(got, h @ w[1].T + b[1], rtol=1e-4, atol=1e-5)


FUZZ = r"""
import sys, numpy as np, fanin
from fanin.io import FormatError
raw = open(sys.argv[1], 'rb').read()
rng = np.random.default_rng(int(sys.argv[2]))
x = np.random.default_rng(0).standard_normal((3, 24)).astype(np.float32)
ref = fanin.load(sys.argv[1]).predict(x)
out = {'refused': 0, 'equal': 0}
for i in range(int(sys.argv[3])):
    b = bytearray(raw)
    kind = rng.integers(4)
    if kind == 0:
        b = b[:rng.integers(len(b))]
    elif kind == 1:
        for _ in range(rng.integers(1, 8)):
            b[rng.integers(len(b))] ^= 1 << int(rng.integers(8))
    elif kind == 2:  # overwrite a length field of the frame
        pos = int(rng.choice([16, 24, 32, 40, 48]))
        b[pos:pos + 8] = int(rng.integers(0, 2**40)).to_bytes(8, 'little')
    else:  # flip bytes in the data region and fix nothing: the checksum must catch it
        for _ in range(rng.integers(1, 4)):
            b[len(b) - 1 - rng.integers(min(len(b) - 100, 4000))] = int(rng.integers(256))
    open(sys.argv[1] + '.m', 'wb').write(bytes(b))
    try:
        y = fanin.load(sys.argv[1] + '.m').predict(x)
    except (FormatError, ValueError) as exc:
        out['refused'] += 1
        continue
    assert np.array_equal(y, ref), 'loaded a different network without an error'
    out['equal'] += 1
print(out['refused'], out['equal'])
"""


def test_mutated_files_are_refused_or_load_equal_and_never_crash(tmp_path):
    path, _ = _saved(tmp_path)
    script = tmp_path / "fuzz.py"
    script.write_text(FUZZ)
    done = subprocess.run([sys.executable, str(script), str(path), "0", "150"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    refused, equal = map(int, done.stdout.split())
    assert refused + equal == 150 and refused >= 140


def test_save_is_atomic(tmp_path, monkeypatch):
    path, model = _saved(tmp_path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        fanin.save(model, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.fanin"]


def test_info_reports_layers_bits_and_metadata(tmp_path):
    model = models.mlp([20, 10, 3], sparsity=0.5, seed=0)
    opt = optim.SGD(model.parameters(), lr=0.1)
    compress.SelfCompression(model, init_bits=4, optimizer=opt)
    path = fanin.save(model, tmp_path / "m.fanin", meta={"note": "test"})
    info = fanin.load(path).info()
    assert [layer["bits"] for layer in info["layers"]] == [4, 4]
    assert info["layers"][0]["fan_in"] == 10 and info["meta"]["note"] == "test"
    assert info["bits_pct"] == pytest.approx(100 * 4 * (10 * 10 + 3 * 5) / (32 * (200 + 30)), rel=1e-6)
    big = models.mlp([400, 200, 10], sparsity=0.9, seed=0)
    compress.SelfCompression(big, init_bits=4)
    dense = fanin.save(models.mlp([400, 200, 10], seed=0), tmp_path / "dense.fanin")
    small = fanin.save(big, tmp_path / "small.fanin")
    assert os.path.getsize(small) < 0.04 * os.path.getsize(dense)  # 4-bit nibbles and Rice-coded indices


@pytest.mark.parametrize("bits", [None, 8.0, 3.5])
def test_a_layer_too_wide_for_int16_indices_runs_in_every_value_kind_and_form(bits):
    """n_in > 32767: the layout keeps int32 indices; fp32, int8 and 4-bit values, rows and panels forms."""
    model = randomize(nn.Sequential(nn.FanInLinear(40000, 6, k=5, seed=0), nn.ReLU(),
                                    nn.FanInLinear(6, 3, k=2, seed=1)))
    if bits is not None:
        compress.SelfCompression(model, init_bits=bits)
    net = fanin.compile(model)
    if bits is not None:
        assert [op["bits"] for op in net.plan["ops"]] == [8 if bits > 4 else 4] * 2
    assert net.plan["ops"][0]["arrays"]["indices"].dtype == np.int32
    x = np.random.default_rng(3).standard_normal((5, 40000)).astype(np.float32)
    want = reference(model, x)
    for b in (1, 3, 5):
        np.testing.assert_allclose(net.predict(x[:b]), want[:b], rtol=1e-4, atol=1e-5)
