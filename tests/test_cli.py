"""`fanin train`'s arguments: every bad value is one line on stderr and exit status 2, never a traceback; options
a run does not use are named, not silently dropped. No dataset needed (the data loader is replaced)."""
import numpy as np
import pytest

from fanin import cli

BAD = [
    (["--sparsity", "1.5", "--method", "srigl"], "--sparsity"),
    (["--sparsity", "0"], "--sparsity"),
    (["--sparsity", "nan"], "--sparsity"),
    (["--alpha", "2"], "--alpha"),
    (["--alpha", "-0.1"], "--alpha"),
    (["--t-end", "0"], "--t-end"),
    (["--gamma-sal", "1.5"], "--gamma-sal"),
    (["--dropout", "1"], "--dropout"),
    (["--dropout", "-1"], "--dropout"),
    (["--momentum", "1"], "--momentum"),
    (["--init-bits", "0.5"], "--init-bits"),
    (["--init-bits", "17"], "--init-bits"),
    (["--compress-until", "0"], "--compress-until"),
    (["--compress-until", "1.01"], "--compress-until"),
    (["--seed", "-1"], "--seed"),
    (["--seed", "1.5"], "--seed"),
    (["--epochs", "2", "--warmup-epochs", "3"], "--warmup-epochs"),
    (["--checkpoint-every", "0.5"], "--checkpoint-every"),  # was truncated to 0: no checkpoints, no word said
    (["--sizes", "784-16-9"], "--sizes"),  # exited 1
]


@pytest.fixture(autouse=True)
def _guest(monkeypatch):
    """cli.main applies fanin.tuning (environment variables, malloc) for training: not in the test process."""
    from fanin import tuning
    monkeypatch.setattr(tuning, "apply", lambda *a, **k: {})


def _tiny_data(model, limit=None, validation=None):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 784)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    return (x, y), (x[:16], y[:16])


@pytest.mark.parametrize("argv,flag", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_train_arguments_are_one_line_and_exit_2(argv, flag, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_data", _tiny_data)
    try:
        code = cli.main(["train", "--no-progress", *argv])
    except SystemExit as e:  # argparse's errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and "Traceback" not in err, err


def test_in_range_types_accept_the_ends_they_should():
    p = cli.build_parser()
    a = p.parse_args(["train", "--alpha", "0", "--gamma-sal", "1", "--t-end", "1", "--dropout", "0",
                      "--momentum", "0", "--init-bits", "16", "--compress-until", "1", "--sparsity", "0.999",
                      "--seed", "0"])
    assert (a.alpha, a.gamma_sal, a.t_end, a.dropout, a.momentum, a.init_bits, a.compress_until, a.sparsity,
            a.seed) == (0, 1, 1, 0, 0, 16, 1, 0.999, 0)


def test_options_the_run_does_not_use_are_named():
    p = cli.build_parser()
    assert cli.ignored_options(p.parse_args(["train"])) == []
    assert cli.ignored_options(p.parse_args(["train", "--method", "srigl", "--sparsity", "0.95",
                                             "--compress", "--init-bits", "4"])) == []
    notes = cli.ignored_options(p.parse_args(["train", "--sparsity", "0.95", "--alpha", "0.5"]))
    assert len(notes) == 1 and "--sparsity, --alpha apply only to --method" in notes[0] and "dense" in notes[0]
    notes = cli.ignored_options(p.parse_args(["train", "--method", "rigl", "--gamma-sal", "0.5",
                                              "--compress-until", "0.8"]))
    assert len(notes) == 2 and "--gamma-sal applies only to --method srigl" in notes[0]
    assert "--compress-until applies only with --compress" in notes[1]
    notes = cli.ignored_options(p.parse_args(["train", "--model", "cnn", "--sizes", "784-50-10"]))
    assert len(notes) == 1 and "--sizes applies only to --model mlp" in notes[0]


def test_a_diverging_run_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_data", _tiny_data)
    code = cli.main(["train", "--no-progress", "--epochs", "2", "--lr", "1e30", "--sizes", "784-16-10"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "diverged" in err and "--lr 1e+30" in err, err


def test_files_of_the_wrong_kind_are_named(tmp_path, capsys):
    """export given a model file or junk, predict given something that is not a .npy: one line, exit 2."""
    import fanin
    from fanin import models

    model_file = tmp_path / "m.fanin"
    fanin.save(models.mlp([784, 16, 10], seed=0), model_file)
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not an array at all")
    good = tmp_path / "x.npy"
    np.save(good, np.zeros((2, 784), np.float32))
    cases = [(["export", str(model_file), "--out", str(tmp_path / "o.fanin")], "is a .fanin model file"),
             (["export", str(junk), "--out", str(tmp_path / "o.fanin")], "not an .npz archive"),
             (["predict", str(model_file), str(junk)], "is not a .npy file"),
             (["predict", str(model_file), str(model_file)], "is not a .npy file")]
    for argv, says in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err
    assert cli.main(["predict", str(model_file), str(good)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_a_dense_run_does_not_record_a_sparsity_in_its_model_file():
    p = cli.build_parser()
    dense = cli._meta(p.parse_args(["train", "--sparsity", "0.95"]), {})["train"]
    sparse = cli._meta(p.parse_args(["train", "--method", "srigl", "--sparsity", "0.95"]), {})["train"]
    assert "sparsity" not in dense and dense["method"] == "dense"
    assert sparse["sparsity"] == 0.95 and sparse["distribution"] == "erk"


def test_output_paths_are_checked_before_training(tmp_path, capsys, monkeypatch):
    """A path train cannot write is one line and exit 2 before any epoch runs, not a traceback after all of them;
    a device is never replaced by the model file."""
    from fanin import train

    monkeypatch.setattr(cli, "load_data", _tiny_data)
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("trained before checking its output paths"))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases = [(["--out", "/dev/null"], "not a regular file"), (["--out", str(tmp_path)], "is a directory"),
             (["--out", ""], "empty"), (["--json", str(blocker / "h.json")], "cannot write there"),
             (["--checkpoint", str(blocker / "c.npz")], "cannot write there")]
    for argv, says in cases:
        assert cli.main(["train", "--no-progress", "--sizes", "784-16-10", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err and argv[0] in err, err
    import stat
    import os
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_errors_from_deep_inside_a_run_are_still_one_line(capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_data", _tiny_data)
    # SRigL at 99.9 % leaves a layer of 784 inputs less than one connection per neuron
    assert cli.main(["train", "--no-progress", "--sizes", "784-16-10", "--method", "srigl",
                     "--sparsity", "0.999"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fanin: ") and "Traceback" not in err, err


def test_a_compressed_run_with_more_than_8_bits_writes_its_model(tmp_path, capsys, monkeypatch):
    import fanin

    monkeypatch.setattr(cli, "load_data", _tiny_data)
    out = tmp_path / "m.fanin"
    assert cli.main(["train", "--no-progress", "--sizes", "784-16-10", "--epochs", "1", "--compress", "0",
                     "--init-bits", "12", "--out", str(out)]) == 0
    net = fanin.load(out)
    assert [op["bits"] for op in net.plan["ops"] if op["op"] == "linear"] == [32, 32]
    capsys.readouterr()


def test_predict_writes_exactly_the_out_path(tmp_path, capsys):
    import fanin
    from fanin import models

    model_file = tmp_path / "m.fanin"
    net = fanin.load(fanin.save(models.mlp([784, 16, 10], seed=0), model_file))
    x = np.random.default_rng(0).standard_normal((3, 784)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "logits"  # no .npy: np.save on a name would have written logits.npy
    assert cli.main(["predict", str(model_file), str(tmp_path / "x.npy"), "--out", str(out)]) == 0
    np.testing.assert_array_equal(np.load(out), net.predict(x))
    assert not (tmp_path / "logits.npy").exists()
    assert cli.main(["predict", str(model_file), str(tmp_path / "x.npy"), "--out", "/dev/null"]) == 2
    assert "not a regular file" in capsys.readouterr().err
    assert cli.main(["info", "/dev/zero"]) == 2  # read for ever before
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a regular file" in err, err


def test_export_of_a_broken_or_diverged_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    from fanin.checkpoint import load_checkpoint, save_checkpoint

    monkeypatch.setattr(cli, "load_data", _tiny_data)
    ck = tmp_path / "c.npz"
    assert cli.main(["train", "--no-progress", "--sizes", "784-16-10", "--epochs", "1", "--checkpoint-every", "1",
                     "--checkpoint", str(ck)]) == 0
    assert cli.main(["export", str(ck), "--out", str(tmp_path / "ok.fanin")]) == 0
    state = load_checkpoint(ck)
    name = next(iter(state["model"]))
    state["model"][name] = np.full_like(state["model"][name], np.nan)
    save_checkpoint(tmp_path / "nan.npz", state)
    state = load_checkpoint(ck)
    state["args"]["sizes"] = [784, 16, 16, 10]  # arguments that build another model than the weights
    save_checkpoint(tmp_path / "other.npz", state)
    capsys.readouterr()
    for path, says in (("nan.npz", "NaN or Inf"), ("other.npz", "does not hold a model")):
        assert cli.main(["export", str(tmp_path / path), "--out", str(tmp_path / "x.fanin")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "x.fanin").exists()


def test_resume_refuses_other_settings_and_a_finished_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_data", _tiny_data)
    ck = tmp_path / "c.npz"
    base = ["train", "--no-progress", "--sizes", "784-16-10", "--checkpoint-every", "1", "--checkpoint", str(ck)]
    assert cli.main([*base, "--epochs", "2"]) == 0
    capsys.readouterr()
    for extra, says in ((["--epochs", "3", "--batch-size", "32"], "--batch-size 128 -> 32"),
                        (["--epochs", "3", "--sizes", "784-32-10"], "--sizes"),
                        (["--epochs", "3", "--lr", "0.07"], "--lr 0.05 -> 0.07"),
                        (["--epochs", "3", "--seed", "4"], "--seed 0 -> 4"),
                        (["--epochs", "3", "--dropout", "0.2"], "--dropout"),
                        (["--epochs", "2"], "finished all 2 epochs")):
        assert cli.main([*base, "--resume", str(ck), *[e for e in extra if e]]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err
    assert cli.main([*base, "--resume", str(ck), "--epochs", "3", "--lr", "0.05"]) == 0  # more epochs, the same
    # run (--lr 0.05 is what the run used without --lr: compared as used, not as typed)
    assert "resumed from" in capsys.readouterr().out


def test_resume_from_a_malformed_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    from fanin.checkpoint import load_checkpoint, save_checkpoint

    monkeypatch.setattr(cli, "load_data", _tiny_data)
    ck = tmp_path / "c.npz"
    base = ["train", "--no-progress", "--sizes", "784-16-10", "--checkpoint-every", "1", "--checkpoint", str(ck)]
    assert cli.main([*base, "--epochs", "1"]) == 0
    state = load_checkpoint(ck)
    state["optimizer"] = [1, 2, 3]  # not the optimizer's state
    save_checkpoint(tmp_path / "bad.npz", state)
    capsys.readouterr()
    assert cli.main([*base, "--epochs", "2", "--resume", str(tmp_path / "bad.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot resume" in err, err
