"""fanin convert: masked dense PyTorch / safetensors weights -> a .fanin model that predicts what PyTorch predicts."""
import numpy as np
import pytest

import fanin
from fanin import cli
from fanin.convert import ConvertError, parse_arch, read_state_dict

try:
    import torch
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed (pip install torch, or the bench extra)")


def constant_fan_in_mask(n_out, n_in, k, rng, ablated=()):
    """A 0/1 mask with exactly k ones per row (rows in ``ablated`` all zero)."""
    mask = np.zeros((n_out, n_in), np.float32)
    for r in range(n_out):
        if r not in ablated:
            mask[r, rng.choice(n_in, k, replace=False)] = 1
    return mask


def masked_mlp(seed=0):
    """A torch MLP 50-40-30-10: layer 0 at fan-in 5 with 3 ablated neurons, layer 1 at fan-in 8, layer 2 dense."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = torch.nn.Sequential(torch.nn.Linear(50, 40), torch.nn.ReLU(), torch.nn.Linear(40, 30), torch.nn.ReLU(),
                                torch.nn.Linear(30, 10)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.from_numpy(constant_fan_in_mask(40, 50, 5, rng, ablated=(3, 17, 39))))
        model[2].weight.mul_(torch.from_numpy(constant_fan_in_mask(30, 40, 8, rng)))
    return model


def torch_predict(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def convert_cli(src, arch, out, *extra):
    return cli.main(["convert", str(src), "--arch", arch, "--out", str(out), *extra])


@needs_torch
def test_masked_torch_mlp_predicts_what_pytorch_predicts(tmp_path, capsys):
    model = masked_mlp()
    torch.save(model.state_dict(), tmp_path / "masked.pt")
    assert convert_cli(tmp_path / "masked.pt", "mlp:50,40,30,10", tmp_path / "m.fanin") == 0
    assert "fan-ins: 5, 8, 30 (dense)" in capsys.readouterr().out
    net = fanin.load(tmp_path / "m.fanin")
    x = np.random.default_rng(1).standard_normal((64, 50)).astype(np.float32)
    want = torch_predict(model, x)
    np.testing.assert_allclose(net.predict(x), want, rtol=1e-4, atol=1e-5)
    assert (net.predict(x).argmax(1) == want.argmax(1)).all()
    layers = [l for l in net.info()["layers"] if "n_in" in l]
    assert [l["sparse"] for l in layers] == [True, True, False]
    assert layers[0]["n_out"] == 37  # the 3 ablated neurons are gone, their bias folded into layer 1
    assert net.meta["converted_from"] == "masked.pt" and net.meta["arch"] == "mlp:50,40,30,10"


@needs_torch
def test_safetensors_prune_masks_and_wrapped_state_dicts(tmp_path):
    model = masked_mlp(seed=2)
    x = np.random.default_rng(3).standard_normal((16, 50)).astype(np.float32)
    want = torch_predict(model, x)
    state = {k: v.numpy() for k, v in model.state_dict().items()}

    safetensors = pytest.importorskip("safetensors.numpy", reason="safetensors is not installed")
    safetensors.save_file(state, str(tmp_path / "m.safetensors"))
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in state.items()}},
               tmp_path / "wrapped.pt")  # a training checkpoint of a DataParallel model
    pruned = masked_mlp(seed=2)
    from torch.nn.utils import prune

    prune.custom_from_mask(pruned[2], "weight", (pruned[2].weight != 0).float())
    assert "2.weight_mask" in pruned.state_dict()
    torch.save(pruned.state_dict(), tmp_path / "pruned.pt")  # torch.nn.utils.prune: weight_orig * weight_mask
    for src in ("m.safetensors", "wrapped.pt", "pruned.pt"):
        net = fanin.convert.convert(tmp_path / src, "mlp:50,40,30,10", tmp_path / "out.fanin")
        np.testing.assert_allclose(net.predict(x), want, rtol=1e-4, atol=1e-5, err_msg=src)


@needs_torch
def test_masked_torch_cnn_predicts_what_pytorch_predicts(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(6 * 3 * 3, 12), nn.ReLU(), nn.Linear(12, 10)).eval()
    with torch.no_grad():
        for bn in (model[1], model[5]):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
        model[4].weight.mul_(torch.from_numpy(constant_fan_in_mask(6, 36, 9, rng)).reshape(6, 4, 3, 3))
        model[9].weight.mul_(torch.from_numpy(constant_fan_in_mask(12, 54, 6, rng)))
    torch.save(model.state_dict(), tmp_path / "cnn.pt")
    assert convert_cli(tmp_path / "cnn.pt", "cnn", tmp_path / "c.fanin", "--image-size", "12") == 0
    net = fanin.load(tmp_path / "c.fanin")
    assert net.input_shape == (1, 12, 12)
    x = np.random.default_rng(4).standard_normal((8, 1, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(net.predict(x), torch_predict(model, x), rtol=1e-4, atol=1e-4)
    assert [l["sparse"] for l in net.info()["layers"] if "n_in" in l] == [False, True, True, False]
    assert convert_cli(tmp_path / "cnn.pt", "cnn:4,6,12,10", tmp_path / "c2.fanin", "--image-size", "12") == 0
    with torch.no_grad():
        model[5].running_var[2] = -0.5  # corrupt statistics: one line, no sqrt warning
    torch.save(model.state_dict(), tmp_path / "bad.pt")
    with pytest.raises(ConvertError, match="running_var holds a negative or NaN value"):
        fanin.convert.convert(tmp_path / "bad.pt", "cnn", tmp_path / "b.fanin", image_size=12)


@needs_torch
def test_unequal_fan_ins_name_the_layer_and_rows(tmp_path, capsys):
    model = masked_mlp()
    with torch.no_grad():
        model[2].weight[7, :] = 0
        model[2].weight[7, :3] = 1.0  # row 7: 3 non-zeros, the others 8
    torch.save(model.state_dict(), tmp_path / "bad.pt")
    assert convert_cli(tmp_path / "bad.pt", "mlp:50,40,30,10", tmp_path / "m.fanin") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fanin: ")
    assert "layer '2'" in err and "row 7: 3" in err and "has 8" in err
    assert not (tmp_path / "m.fanin").exists()


@needs_torch
@pytest.mark.parametrize("arch, fragment", [
    ("mlp:50,40,31,10", "layer '2': weight has shape (30, 40) but --arch mlp:50,40,31,10 needs (31, 40)"),
    ("mlp:50,40,10", "has 2 Linear layers but the weights hold 3"),
    ("cnn", "fanin.models.cnn's layers are"),
])
def test_architecture_mismatches_are_one_line_errors(tmp_path, capsys, arch, fragment):
    torch.save(masked_mlp().state_dict(), tmp_path / "m.pt")
    assert convert_cli(tmp_path / "m.pt", arch, tmp_path / "m.fanin") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err


@needs_torch
def test_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(ConvertError, match="no weights file"):
        read_state_dict(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConvertError, match="cannot read it as a PyTorch state_dict"):
        read_state_dict(tmp_path / "junk.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ConvertError, match="not a state_dict"):
        read_state_dict(tmp_path / "list.pt")
    w = torch.randn(4, 3)
    for name, t, says in (("sparse", w.to_sparse(), "sparse"), ("complex", torch.complex(w, w), "complex"),
                          ("meta", torch.empty(4, 3, device="meta"), "meta device")):
        torch.save({"0.weight": t, "0.bias": torch.zeros(4)}, tmp_path / f"{name}.pt")
        with pytest.raises(ConvertError, match=says):
            read_state_dict(tmp_path / f"{name}.pt")
    torch.save(masked_mlp().state_dict(), tmp_path / "m.pt")
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # as if PyTorch were not installed
    with pytest.raises(ConvertError, match="needs torch"):
        read_state_dict(tmp_path / "m.pt")
    for text in ("mlp", "mlp:784", "rnn:3", "mlp:a,b", "cnn:3,4", "mlp:5,0"):
        with pytest.raises(ConvertError):
            parse_arch(text)
    assert parse_arch("mlp:784-300-10").sizes == (784, 300, 10)


def test_safetensors_without_torch(tmp_path):
    """A masked MLP's weights as a NumPy safetensors file (no PyTorch needed) against a dense NumPy forward."""
    safetensors = pytest.importorskip("safetensors.numpy", reason="safetensors is not installed (the convert extra)")
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((20, 30)).astype(np.float32) * constant_fan_in_mask(20, 30, 4, rng, ablated=(5,))
    w1 = rng.standard_normal((6, 20)).astype(np.float32)
    b0, b1 = rng.standard_normal(20).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    safetensors.save_file({"layers.0.weight": w0, "layers.0.bias": b0, "layers.2.weight": w1, "layers.2.bias": b1},
                          str(tmp_path / "m.safetensors"))
    net = fanin.convert.convert(tmp_path / "m.safetensors", "mlp:30,20,6", tmp_path / "m.fanin")
    x = rng.standard_normal((9, 30)).astype(np.float32)
    want = np.maximum(x @ w0.T + b0, 0) @ w1.T + b1
    np.testing.assert_allclose(fanin.load(tmp_path / "m.fanin").predict(x), want, rtol=1e-4, atol=1e-5)
    assert [l["sparse"] for l in net.info()["layers"] if "n_in" in l] == [True, False]
