"""The ``fanin`` command: train, download."""
from __future__ import annotations

import argparse
import os
import sys
import time

DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}


def _sizes(text: str):
    try:
        sizes = [int(s) for s in text.replace(",", "-").split("-")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes must look like 784-300-100-10, got {text!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--sizes needs at least two positive widths, got {text!r}")
    return sizes


def _int_at_least(lo: int, what: str):
    """An argparse type: an integer >= lo (``what`` names it in the one-line error, e.g. 'a positive integer')."""
    def check(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {v}")
        return v

    return check


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _non_negative(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def _in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False, what: str = ""):
    """An argparse type: a float in the interval from lo to hi (open at an end where asked); ``what`` says what
    the number means, in the one-line error."""
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def check(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}") from None
        inside = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)  # False for nan
        if not inside:
            raise argparse.ArgumentTypeError(f"must be in {interval}{what}, got {text}")
        return v

    return check


def _gamma(text: str):
    """--compress's value: a gamma >= 0, or "default" (argparse passes a string ``const`` through ``type`` too)."""
    return text if text == "default" else _non_negative(text)


def _positive(text: str) -> float:
    v = _non_negative(text)
    if v == 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return v


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2, no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_activations(p):
    p.add_argument("--activations", choices=["float32", "int8"], default="float32",
                   help="int8: 8-bit activations and integer dot products (~4-5x faster at batch 1, ~1.4-2.3x at 256, "
                        "on AVX-512 VBMI/VNNI CPUs; results within 8-bit error of float32; docs/INFERENCE.md)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fanin", description="Sparse, low-bit neural networks on NumPy + Numba.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a model on Fashion-MNIST")
    t.add_argument("--data", default="fashion-mnist", choices=["fashion-mnist"], help="dataset")
    t.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    t.add_argument("--sizes", type=_sizes, default=[784, 300, 100, 10], help="MLP widths, e.g. 784-300-100-10")
    t.add_argument("--epochs", type=_positive_int, default=10)
    t.add_argument("--batch-size", type=_positive_int, default=128)
    t.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"])
    t.add_argument("--lr", type=_positive, default=None, help="learning rate (default: 0.05 for sgd, 1e-3 for adam)")
    t.add_argument("--momentum", type=_in(0, 1, hi_open=True), default=0.9)
    t.add_argument("--weight-decay", type=_non_negative, default=5e-4)
    t.add_argument("--warmup-epochs", type=_non_negative, default=0.0)
    t.add_argument("--seed", type=_non_negative_int, default=0)
    t.add_argument("--dropout", type=_in(0, 1, hi_open=True), default=0.0, help="dropout before the classifier")
    t.add_argument("--limit", type=_positive_int, default=None,
                   help="use only the first N training images (quick runs)")
    t.add_argument("--validation", type=_positive_int, default=None, metavar="N",
                   help="hold out the last N training images and evaluate on them instead of the test set "
                        "(choose hyperparameters without looking at the test set)")
    t.add_argument("--no-progress", action="store_true", help="no progress line")
    s = t.add_argument_group("sparse training (SPEC.md section 2)")
    s.add_argument("--method", default="dense", choices=["dense", "static", "rigl", "srigl"],
                   help="dense; static (random unstructured mask); rigl (unstructured); srigl (constant fan-in)")
    s.add_argument("--sparsity", type=_in(0, 1, True, True, " (the fraction of weights removed: 0.9 keeps 10 %)"), default=0.9, help="global fraction of weights removed")
    s.add_argument("--distribution", default="erk", choices=["uniform", "erk"])
    s.add_argument("--dense-first", action="store_true", help="keep the first sparse layer dense")
    s.add_argument("--delta-t", type=_positive_int, default=100, help="optimizer steps between connectivity updates")
    s.add_argument("--alpha", type=_in(0, 1), default=0.3, help="initial drop fraction")
    s.add_argument("--t-end", type=_in(0, 1, lo_open=True), default=0.75, help="stop updating after this fraction of all steps")
    s.add_argument("--gamma-sal", type=_in(0, 1), default=0.3, help="SRigL: salient fraction a neuron needs to stay")
    s.add_argument("--no-ablation", action="store_true", help="SRigL without neuron ablation")
    s.add_argument("--grad-accumulation", type=_positive_int, default=1, help="batches of gradient behind each update")
    q = t.add_argument_group("self-compression (SPEC.md section 3)")
    q.add_argument("--compress", type=_gamma, nargs="?", const="default", default=None, metavar="GAMMA",
                   help="learn bits per channel and remove channels at 0 bits; GAMMA weighs the size term "
                        "(without a value: fanin.compress.DEFAULT_GAMMA, 0.1)")
    q.add_argument("--compress-lr", type=_positive, default=0.03, help="Adam learning rate of the bits and exponents")
    q.add_argument("--init-bits", type=_in(1, 16), default=8.0, help="initial bit depth of every channel")
    q.add_argument("--compress-cost", choices=["bits", "macs", "bits+macs"], default="bits",
                   help="what the size term counts: value bits (storage, default), bit-operations per sample "
                        "(compute: a filter's bits count once per output position), or both")
    q.add_argument("--compress-until", type=_in(0, 1, lo_open=True), default=0.6, metavar="FRACTION",
                   help="learn bits and remove channels for this fraction of the steps, then fine-tune the weights "
                        "to them (default 0.6; 1.0: to the end)")
    c = t.add_argument_group("checkpoints")
    c.add_argument("--checkpoint", default=None, help="checkpoint file (default: checkpoints/<model>-<method>.npz)")
    c.add_argument("--checkpoint-every", type=_non_negative_int, default=0,
                   help="write a checkpoint every N epochs (0: never)")
    c.add_argument("--resume", default=None, help="continue from this checkpoint")
    t.add_argument("--json", default=None, help="write the run's history (per-epoch metrics) to this JSON file")
    t.add_argument("--out", default=None, metavar="MODEL.fanin", help="save the trained network as a .fanin file")
    t.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the training step runs (cuda: MLPs on an NVIDIA GPU with the cuda extra; the SRigL "
                        "update runs on the host)")
    m = t.add_argument_group("data-parallel training over MPI (docs/DISTRIBUTED.md)")
    m.add_argument("--distributed", action="store_true",
                   help="train on every rank of an MPI job, launched with `mpiexec -n N fanin train ... --distributed` "
                        "(or srun); --batch-size is the global batch, split over the ranks; rank 0 prints and writes")
    m.add_argument("--mpi-timeout", type=_positive, default=300.0, metavar="SECONDS",
                   help="abort the job when a rank waits this long for the others in one step (default 300)")

    e = sub.add_parser("export", help="turn a training checkpoint into a .fanin model file")
    e.add_argument("checkpoint", help="a checkpoint written by fanin train --checkpoint-every")
    e.add_argument("--out", required=True, metavar="MODEL.fanin")
    e.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="post-training per-neuron quantization of the float layers (power-of-two scales)")

    v = sub.add_parser("eval", help="Fashion-MNIST test accuracy of a .fanin model")
    v.add_argument("model", metavar="MODEL.fanin")
    v.add_argument("--batch-size", type=_positive_int, default=1000)
    _add_activations(v)

    i = sub.add_parser("info", help="layers, fan-ins, bits and size of a .fanin model")
    i.add_argument("model", metavar="MODEL.fanin")
    i.add_argument("--json", action="store_true", help="print the info as JSON")
    _add_activations(i)

    r = sub.add_parser("predict", help="predict the classes of the samples in a .npy file")
    r.add_argument("model", metavar="MODEL.fanin")
    r.add_argument("input", metavar="INPUT.npy", help="float samples (batch, *input shape), normalized as in training")
    r.add_argument("--proba", action="store_true", help="print class probabilities instead of logits")
    r.add_argument("--out", default=None, metavar="OUT.npy", help="also write the logits (or probabilities) here")
    _add_activations(r)

    sv = sub.add_parser("serve", help="serve a .fanin model over HTTP: POST /predict, /healthz, /info, /metrics "
                                      "(the serve extra)")
    sv.add_argument("model", metavar="MODEL.fanin")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    sv.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000; 0: any free port, printed)")
    sv.add_argument("--workers", type=_positive_int, default=1,
                    help="processes sharing the port, each loading the model file (spawned, not forked)")
    sv.add_argument("--max-batch", type=_positive_int, default=64,
                    help="rows per predict call when stacking concurrent requests (default 64; 1: no batching)")
    sv.add_argument("--max-wait-ms", type=_non_negative, default=2.0,
                    help="how long a batch waits for more requests (default 2 ms)")
    sv.add_argument("--inline-ms", type=_non_negative, default=0.25,
                    help="predict calls expected to take at most this run on the event loop's thread instead of "
                         "the predict thread, saving a ~0.1 ms hand-off (default 0.25 ms; 0: never)")
    sv.add_argument("--max-rows", type=_positive_int, default=1024, help="rows one request may send (413 above)")
    sv.add_argument("--max-body-mb", type=_positive, default=16.0, help="MiB one request may send (413 above)")
    sv.add_argument("--threads", type=_positive_int, default=None,
                    help="Numba threads per worker (default: cores / workers - 1, at least 1: the event loop needs a core)")
    sv.add_argument("--graceful-timeout", type=_non_negative, default=30.0,
                    help="seconds requests in flight get to finish after SIGTERM (default 30)")
    sv.add_argument("--access-log", action="store_true", help="log every request")
    _add_activations(sv)

    cv = sub.add_parser("convert", help="masked dense PyTorch (.pt) or safetensors weights -> a .fanin model")
    cv.add_argument("weights", metavar="WEIGHTS", help="a torch.save'd state_dict or a .safetensors file")
    cv.add_argument("--arch", required=True,
                    help="mlp:784,1024,1024,10 (a torch nn.Sequential of Linear/ReLU), or cnn (fanin.models.cnn's "
                         "layer order; widths read from the weights), or cnn:32,64,128,10")
    cv.add_argument("--image-size", type=_positive_int, default=28, help="cnn: input height and width (default 28)")
    cv.add_argument("--quantize", choices=["int8", "int4"], default=None,
                    help="post-training per-neuron quantization (power-of-two scales)")
    cv.add_argument("--out", required=True, metavar="MODEL.fanin")

    d = sub.add_parser("download", help="fetch Fashion-MNIST into the user cache (needs a network)")
    d.add_argument("--dir", default=None)
    return p


def load_data(model: str, limit=None, validation=None):
    """(train, evaluation) sets; ``validation=N``: the last N training images are the evaluation set (and
    are left out of training), the test set is not loaded."""
    from fanin import data

    xtr, ytr = data.load_fashion_mnist("train")
    if validation:
        if validation >= len(xtr):
            raise ValueError(f"--validation {validation} leaves no training images (there are {len(xtr)}).")
        xtr, ytr, xte, yte = xtr[:-validation], ytr[:-validation], xtr[-validation:], ytr[-validation:]
    else:
        xte, yte = data.load_fashion_mnist("test")
    if limit:
        xtr, ytr = xtr[:limit], ytr[:limit]
    flat = model == "mlp"
    return (data.normalize(xtr, flat), ytr), (data.normalize(xte, flat), yte)


def _listed(names) -> str:
    """'--a applies' or '--a, --b apply' for option dests."""
    flags = ", ".join("--" + n.replace("_", "-") for n in names)
    return flags + (" applies" if len(names) == 1 else " apply")


_SPARSE_ONLY = ("sparsity", "distribution", "dense_first", "delta_t", "alpha", "t_end", "gamma_sal", "no_ablation",
                "grad_accumulation")
_COMPRESS_ONLY = ("compress_lr", "init_bits", "compress_cost", "compress_until")


def ignored_options(args) -> list:
    """Notes for options given a value other than their default that this run does not use (a user who types
    ``fanin train --sparsity 0.95`` without ``--method`` would otherwise get a dense network and no word of it)."""
    defaults = build_parser().parse_args(["train"])
    notes = []
    changed = [n for n in _SPARSE_ONLY if getattr(args, n) != getattr(defaults, n)]
    if args.method == "dense" and changed:
        notes.append(f"{_listed(changed)} only to --method srigl, rigl or static; this run trains a dense network "
                     "(add --method srigl for a sparse one).")
    changed = [n for n in ("gamma_sal", "no_ablation") if getattr(args, n) != getattr(defaults, n)]
    if args.method in ("rigl", "static") and changed:
        notes.append(f"{_listed(changed)} only to --method srigl; ignored with --method {args.method}.")
    changed = [n for n in _COMPRESS_ONLY if getattr(args, n) != getattr(defaults, n)]
    if args.compress is None and changed:
        notes.append(f"{_listed(changed)} only with --compress; this run does not compress.")
    if args.model == "cnn" and list(args.sizes) != list(defaults.sizes):
        notes.append("--sizes applies only to --model mlp; the CNN's layers are fixed (fanin.models.cnn).")
    return notes


def build_model(args):
    """The model the arguments ask for (condensed layers for srigl, dense otherwise)."""
    from fanin import models

    sparsity = args.sparsity if args.method == "srigl" else None
    if args.model == "mlp":
        if args.sizes[0] != 784 or args.sizes[-1] != 10:
            raise ValueError(f"--sizes must start with 784 and end with 10 for Fashion-MNIST, got "
                             f"{'-'.join(map(str, args.sizes))}.")
        return models.mlp(args.sizes, sparsity=sparsity, dropout=args.dropout, seed=args.seed)
    return models.cnn(sparsity=sparsity, dropout=args.dropout, seed=args.seed)


def build_updater(args, model, opt, total_steps):
    """The SRigL/RigL/static updater for ``--method`` (None for dense)."""
    from fanin import sparsity

    if args.method == "dense":
        return None
    common = dict(sparsity=args.sparsity, distribution=args.distribution, delta_t=args.delta_t, alpha=args.alpha,
                  t_end=max(1, int(args.t_end * total_steps)), grad_accumulation=args.grad_accumulation,
                  dense_first=args.dense_first, seed=args.seed)
    if args.method == "srigl":
        return sparsity.SRigL(model, opt, gamma_sal=args.gamma_sal, ablation=not args.no_ablation, **common)
    names = [n for n, _ in sparsity.masked_layers(model)]
    skip = (names[0], names[-1]) if args.model == "cnn" else ()  # the same layers SRigL makes sparse
    return sparsity.RigL(model, opt, static=args.method == "static", skip=skip, **common)


def build_compressor(args, model, opt, updater, total_steps):
    """The SelfCompression for ``--compress`` (None without it)."""
    if args.compress is None:
        return None
    from fanin.compress import DEFAULT_GAMMA, SelfCompression

    if args.compress == "default":
        args.compress = DEFAULT_GAMMA
    srigl = updater if args.method == "srigl" else None
    if not 0.0 < args.compress_until <= 1.0:
        raise ValueError(f"--compress-until must be in (0, 1], got {args.compress_until}.")
    return SelfCompression(model, gamma=args.compress, init_bits=args.init_bits, optimizer=opt, lr=args.compress_lr,
                           srigl=srigl, t_end=int(args.compress_until * total_steps), seed=args.seed,
                           cost=getattr(args, "compress_cost", "bits"), input_shape=_input_shape(args.model))


def compression_summary(sc, epochs) -> str:
    """The final lines of a compressing run: bits, weights, channels, index bits, epoch times."""
    r = sc.report()
    lines = [f"compression: {r['bits_pct']:.3f} % of the fp32 dense weight bits ({r['size_bits'] / 8 / 1024:.1f} KiB of "
             f"values), {r['total_bits_pct']:.3f} % with {r['index_bits'] / 8 / 1024:.1f} KiB of indices; "
             f"{r['weights_pct']:.2f} % of the weights left"]
    for row in r["layers"]:
        orig = row["channels_original"]
        lines.append(f"  {row['layer']}: {row['channels']}" + (f"/{orig}" if orig else "") +
                     f" channels, {row['mean_bits']:.2f} bits per weight, {row['weights']} weights")
    if epochs:
        lines.append("  time per epoch: " + " ".join(f"{e['time']:.1f}s" for e in epochs))
    return "\n".join(lines)


def cmd_train(args) -> int:
    import json

    dp = None  # --distributed: this rank's DataParallel; set up before NumPy loads (it pins BLAS threads)
    if args.distributed:
        from fanin.distributed import DistributedError, world

        try:
            dp = world(timeout=args.mpi_timeout)
        except DistributedError as exc:
            print(f"fanin: {exc}", file=sys.stderr)
            return 2
    root = dp is None or dp.root

    def say(*a, **k):  # only rank 0 prints progress
        if root:
            print(*a, **k)

    def fail_here(msg: str) -> int:
        """A failure this rank may meet alone (its data, its files, its device): with other ranks waiting for it in
        the first collective, it ends them all now (MPI_Abort) rather than after --mpi-timeout."""
        if dp is not None and dp.size > 1:
            dp.abort(msg, 2)
        return _fail(msg)

    import numpy as np

    from fanin import optim
    from fanin.checkpoint import (CheckpointError, load_checkpoint, restore_training_state, save_checkpoint,
                                  training_state)
    from fanin.data import DatasetNotFound
    from fanin.train import TrainConfig, fit, make_optimizer

    for flag in ("--out", "--json", "--checkpoint"):
        problem = root and _writable(getattr(args, flag[2:].replace("-", "_"), None), flag)  # rank 0 writes them
        if problem:
            return fail_here(problem)
    if args.warmup_epochs > args.epochs:
        say(f"fanin: --warmup-epochs {args.warmup_epochs:g} is longer than the run (--epochs {args.epochs}); "
            "use at most the number of epochs.", file=sys.stderr)
        return 2
    for note in ignored_options(args):
        say(f"fanin: note: {note}", file=sys.stderr)
    try:
        train, test = load_data(args.model, args.limit, args.validation)
    except (DatasetNotFound, ValueError) as exc:
        return fail_here(str(exc))
    lr = DEFAULT_LR[args.optimizer] if args.lr is None else args.lr
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=lr, optimizer=args.optimizer,
                      momentum=args.momentum, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                      seed=args.seed)
    if dp is not None:
        try:
            dp.check_batch(cfg.batch_size)
        except ValueError as exc:  # the same on every rank: said once
            say(f"fanin: {exc}", file=sys.stderr)
            return 2
    model = build_model(args)
    if args.device == "cuda":
        bad = [f for f, on in (("--compress", args.compress is not None), ("--distributed", dp is not None),
                               ("--resume", bool(args.resume)), ("--checkpoint-every", bool(args.checkpoint_every)))
               if on]
        if bad:
            say(f"fanin: --device cuda does not support {', '.join(bad)} yet; train on the cpu for those.",
                file=sys.stderr)
            return 2
        try:
            model.to("cuda")
        except Exception as exc:  # no GPU / driver / numba-cuda, or a layer without CUDA kernels: one line
            return fail_here(str(exc).splitlines()[0])
    opt = make_optimizer(model.parameters(), cfg)
    steps_per_epoch = -(-len(train[0]) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    schedule = optim.CosineSchedule(opt, total, int(cfg.warmup_epochs * steps_per_epoch))
    try:
        updater = build_updater(args, model, opt, total)
        compressor = build_compressor(args, model, opt, updater, total)
    except ValueError as exc:  # the same on every rank: said once
        say(f"fanin: {exc}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(cfg.seed)
    start_epoch, history = 0, []
    hooks = [h for h in (updater, compressor) if h is not None]
    if dp is not None:
        dp.attach(hooks)  # before a resume: SRigL keeps this rank's share of the captured rows
    if args.resume:
        try:  # distributed: rank 0 reads the checkpoint and sends it to the others (no shared disk needed)
            state = load_checkpoint(args.resume) if dp is None else dp.root_call(lambda: load_checkpoint(args.resume))
        except (CheckpointError, KeyError, ValueError) as exc:  # distributed: the same on every rank, said once
            say(f"fanin: cannot resume: {exc}", file=sys.stderr)
            return 2
        was = state.get("args") if isinstance(state.get("args"), dict) else {}
        # every setting of the run (_RESUME_MAY_CHANGE aside) shapes it: another value would continue another run,
        # e.g. a different --limit or --batch-size left the cosine schedule past its end (a learning rate of ~0)
        def setting(ns: dict, k):  # as the run used it: --lr not given is its optimizer's default; sizes a list
            v = ns.get(k)
            if k == "lr" and v is None:
                return DEFAULT_LR.get(ns.get("optimizer"), v)
            return list(v) if k == "sizes" and v is not None else v

        now = vars(args)
        changed = [f"--{k.replace('_', '-')} {_shown(setting(was, k))} -> {_shown(setting(now, k))}"
                   for k in sorted(was)
                   if k not in _RESUME_MAY_CHANGE and k in now and setting(was, k) != setting(now, k)]
        if changed:
            say(f"fanin: cannot resume: the checkpoint's run was made with other settings ({'; '.join(changed)}); "
                "resume with the same ones.", file=sys.stderr)
            return 2
        try:
            start_epoch, history = restore_training_state(state, model, opt, schedule, updater, rng, compressor)
        except (CheckpointError, ValueError) as exc:
            say(f"fanin: cannot resume: {exc}", file=sys.stderr)
            return 2
        except (KeyError, TypeError, AttributeError) as exc:  # a malformed checkpoint
            say(f"fanin: cannot resume: {args.resume} does not hold this run's training state "
                f"({type(exc).__name__}: {exc}).", file=sys.stderr)
            return 2
        if start_epoch >= args.epochs:
            say(f"fanin: cannot resume: {args.resume} has finished all {args.epochs} epochs already; nothing is left "
                "to train (fanin export writes its model).", file=sys.stderr)
            return 2
        say(f"resumed from {args.resume} after epoch {start_epoch}")
    ckpt = args.checkpoint or f"checkpoints/{args.model}-{args.method}.npz"

    def on_epoch_end(epoch, rng_):
        if args.checkpoint_every and epoch % args.checkpoint_every == 0:
            state = training_state(model, opt, schedule, updater, rng_, epoch, history + new, compressor)  # all ranks
            state["args"] = {k: v for k, v in vars(args).items() if k not in ("resume",)}  # for `fanin export`
            if root:
                save_checkpoint(ckpt, state)

    n_params = sum(p.size for p in model.parameters())
    ranks = ""
    if dp is not None:
        import numba

        ranks = f"; {dp.size} MPI ranks x {numba.get_num_threads()} threads"
    say(f"model {args.model} ({args.method}): {n_params} stored parameters; {len(train[0])} training images; "
        f"{cfg.optimizer} lr={lr} batch={cfg.batch_size} seed={cfg.seed}{ranks}")
    start = time.perf_counter()
    new = []
    try:  # a diverging run ends in FloatingPointError below; NumPy's warnings on the way there are noise
        with np.errstate(over="ignore", invalid="ignore"):
            fit(model, opt, train, test, epochs=cfg.epochs, batch_size=cfg.batch_size, schedule=schedule,
                hooks=hooks, loss_terms=[compressor.size_loss] if compressor is not None else [],
                progress=not args.no_progress, start_epoch=start_epoch, rng=rng, on_epoch_end=on_epoch_end,
                history=new, comm=dp)
    except FloatingPointError as exc:  # diverged: the settings, not a bug -- one line, like a bad argument
        say(f"fanin: {exc} (this run: --optimizer {args.optimizer} --lr {lr:g} --momentum {args.momentum:g})",
            file=sys.stderr)
        return 2
    history += new
    wall = time.perf_counter() - start
    if new:
        per_epoch = np.mean([h["time"] for h in new])
        say(f"train time: {wall:.1f}s ({per_epoch:.1f}s per epoch of training)")
    if updater is not None and hasattr(updater, "status"):
        say("sparsity: " + ", ".join(f"{k}={v}" for k, v in updater.status().items()))
    if compressor is not None:
        say(compression_summary(compressor, new))
    if args.json and root:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "history": history}, f, indent=1, default=str)
    on = f"validation accuracy (last {args.validation} training images)" if args.validation else "test accuracy"
    say(f"{on}: {history[-1]['test_acc']:.4f}")
    if args.device == "cuda":
        model.to("cpu")  # export and checkpoints read host arrays
    if args.out and root:
        from fanin.io import save

        path = save(model, args.out, input_shape=_input_shape(args.model),
                    meta=_meta(args, history[-1] if history else {}))
        print(f"model written to {path}")
    return 0


def _input_shape(model: str):
    return None if model == "mlp" else (1, 28, 28)


def _meta(args, last) -> dict:
    """What a model file records about how it was made (shown by ``fanin info``)."""
    import fanin

    keep = ("model", "sizes", "method", "sparsity", "distribution", "epochs", "optimizer", "seed", "compress")
    return {"fanin": fanin.__version__, "data": "fashion-mnist", "normalize": "fashion-mnist",
            "train": {k: v for k, v in vars(args).items()
                      if k in keep and not (k in ("sparsity", "distribution") and args.method == "dense")},
            "validation_acc" if getattr(args, "validation", None) else "test_acc": last.get("test_acc"),
            "bits_pct": last.get("bits_pct")}


def _fail(msg) -> int:
    print(f"fanin: {msg}", file=sys.stderr)
    return 2


def cmd_export(args) -> int:
    from fanin import runtime
    from fanin.checkpoint import CheckpointError, load_checkpoint
    from fanin.io import save
    from fanin.nn import nonfinite

    problem = _writable(args.out, "--out")
    if problem:
        return _fail(problem)

    try:
        state = load_checkpoint(args.checkpoint)
        targs = argparse.Namespace(**state.get("args", {})) if state.get("args") else None
    except CheckpointError as exc:
        return _fail(str(exc))
    if targs is None:
        return _fail(f"{args.checkpoint} does not record how its model was built (written by an older fanin); "
                     "re-train with --checkpoint-every, or save the model in Python with fanin.save.")
    try:  # a checkpoint that loads but does not describe a model of its own arguments
        model = build_model(targs)
        if state.get("compressor") is not None:
            from fanin.compress import SelfCompression
            SelfCompression(model, init_bits=targs.init_bits)
        model.load_state_dict(state["model"], resize=True)
    except (AttributeError, KeyError, TypeError, IndexError) as exc:
        return _fail(f"{args.checkpoint} does not hold a model its recorded arguments build ({type(exc).__name__}: "
                     f"{exc}); re-export from the run's last good checkpoint.")
    bad = nonfinite(model.named_parameters())
    if bad:
        return _fail(f"{args.checkpoint} holds NaN or Inf in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} "
                     "(a diverged run); export an earlier checkpoint.")
    plan = runtime.lower(model, _input_shape(targs.model))
    if args.quantize:
        plan = runtime.quantize(plan, 8 if args.quantize == "int8" else 4)
    net = runtime.Network(plan, _meta(targs, (state.get("history") or [{}])[-1]) | {"quantize": args.quantize})
    print(f"model written to {save(net, args.out)} ({net})")
    return 0


def _load(path, activations="float32"):
    from fanin.io import FormatError, load

    try:
        return load(path, activations=activations), None
    except (FormatError, FileNotFoundError) as exc:
        return None, _fail(str(exc))


def cmd_eval(args) -> int:
    from fanin import data
    from fanin.data import DatasetNotFound

    net, rc = _load(args.model, args.activations)
    if net is None:
        return rc
    try:
        x, y = data.load_fashion_mnist("test")
    except DatasetNotFound as exc:
        return _fail(str(exc))
    x = data.normalize(x, flatten=len(net.input_shape) == 1)
    if x.shape[1:] != net.input_shape:
        return _fail(f"the model takes inputs of shape {net.input_shape}, not Fashion-MNIST's {x.shape[1:]}.")
    correct = 0
    for i in range(0, len(x), args.batch_size):
        correct += int((net.predict(x[i:i + args.batch_size]).argmax(axis=1) == y[i:i + args.batch_size]).sum())
    print(f"test accuracy: {correct / len(x):.4f} ({correct}/{len(x)}) on Fashion-MNIST"
          + (" (int8 activations)" if args.activations == "int8" else ""))
    return 0


def cmd_info(args) -> int:
    import json

    net, rc = _load(args.model, args.activations)
    if net is None:
        return rc
    info = net.info()
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    print(f"{args.model}: input {tuple(info['input_shape'])}, {info['classes']} classes, {info['weights']} weights")
    for i, layer in enumerate(info["layers"]):
        if "n_in" in layer:
            kind = ("condensed " if layer["sparse"] else "dense ") + layer["op"]
            print(f"  {i}: {kind:18s} {layer['n_in']:>6d} -> {layer['n_out']:<6d} fan-in {layer['fan_in']:<6d} "
                  f"{layer['bits']:>2d}-bit  {layer['act']}")
        else:
            print(f"  {i}: {layer['op']}")
    print(f"size: {info['bits_pct']:.3f} % of the fp32 dense weight bits ({info['total_bits_pct']:.3f} % with index "
          f"bits); {info['engine']}")
    if info["meta"]:
        print("made by: " + json.dumps(info["meta"], default=str))
    return 0


def cmd_predict(args) -> int:
    import numpy as np

    from fanin.runtime import PredictError

    problem = _writable(args.out, "--out")
    if problem:
        return _fail(problem)
    net, rc = _load(args.model, args.activations)
    if net is None:
        return rc
    try:
        prefix = np.lib.format.MAGIC_PREFIX
        with open(args.input, "rb") as f:
            magic = f.read(len(prefix))
        if magic != prefix:
            return _fail(f"{args.input} is not a .npy file (no NumPy magic bytes); save the samples with "
                         "numpy.save(path, x), x of shape (batch, *input shape).")
        x = np.load(args.input, allow_pickle=False)
    except (OSError, ValueError) as exc:
        return _fail(f"cannot read {args.input} as a .npy array ({exc}).")
    try:
        y = net.predict_proba(x) if args.proba else net.predict(x)
    except PredictError as exc:
        return _fail(str(exc))
    classes = np.atleast_2d(y).argmax(axis=1)
    with np.printoptions(precision=4, suppress=True, linewidth=120):
        for c, row in zip(classes, np.atleast_2d(y)):
            print(int(c), row)
    if args.out:  # to exactly that path (np.save on a name would add ".npy")
        from fanin._atomic import write_atomic

        write_atomic(args.out, lambda f: np.save(f, y))
    return 0


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {v}")
    return v


def cmd_serve(args) -> int:
    from fanin.io import FormatError, load
    from fanin.serve import ServeConfig, missing_extra

    problem = missing_extra()
    if problem:
        return _fail(problem)
    try:
        net = load(args.model, activations=args.activations)  # validated here: a bad file stops the server
    except (FormatError, OSError) as exc:
        return _fail(str(exc))
    try:
        config = ServeConfig(model=str(args.model), host=args.host, port=args.port, workers=args.workers,
                             max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, inline_ms=args.inline_ms,
                             max_rows=args.max_rows, max_body=int(args.max_body_mb * (1 << 20)), threads=args.threads,
                             graceful_timeout=args.graceful_timeout, access_log=args.access_log,
                             activations=args.activations)
    except ValueError as exc:
        return _fail(str(exc))
    from fanin.serve.server import bind, serve

    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        return _fail(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); choose another --port "
                     "or --host.")
    return serve(config, net if args.workers == 1 else None, sock=sock)


def cmd_convert(args) -> int:
    from fanin.convert import ConvertError, convert

    try:
        net = convert(args.weights, args.arch, args.out, image_size=args.image_size,
                      quantize={"int8": 8, "int4": 4}.get(args.quantize))
    except (ConvertError, ValueError, OSError) as exc:
        return _fail(str(exc))
    layers = [l for l in net.info()["layers"] if "n_in" in l]
    print(f"model written to {args.out} ({net}); fan-ins: " +
          ", ".join(f"{l['fan_in']}{'' if l['sparse'] else ' (dense)'}" for l in layers))
    return 0


def cmd_download(args) -> int:
    from fanin.data import DatasetNotFound, download_fashion_mnist

    try:
        print(f"Fashion-MNIST is in {download_fashion_mnist(args.dir)}")
    except DatasetNotFound as exc:
        print(f"fanin: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":  # this process is ours: the training tuning (fanin.tuning) pays
        from fanin import tuning

        tuning.apply()
    cmd = {"train": cmd_train, "download": cmd_download, "export": cmd_export, "eval": cmd_eval, "info": cmd_info,
           "predict": cmd_predict, "serve": cmd_serve, "convert": cmd_convert}[args.command]
    # The commands turn what they expect into one line each; this is the net under them for what the system says
    # (a file this user cannot read or write, a full disk, a corrupt download, memory) -- still one line, exit 2.
    try:
        return cmd(args)
    except BrokenPipeError:  # `fanin predict ... | head`: the reader left; say nothing more
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        print("fanin: interrupted.", file=sys.stderr)
        return 130
    except MemoryError:
        return _fail("out of memory (a shape or a batch too large for this machine?).")
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return _fail(f"{where}{getattr(exc, 'strerror', None) or exc}.")
    except ValueError as exc:  # fanin's errors are ValueErrors that say what to do
        return _fail(str(exc))


# train options that a --resume may change: outputs, progress, devices, ranks (a run resumes on any number of them)
# and --epochs (to train on: the cosine schedule then runs to the new end)
_RESUME_MAY_CHANGE = frozenset({"checkpoint", "checkpoint_every", "command", "device", "distributed", "epochs", "json",
                                "mpi_timeout", "no_progress", "out", "resume"})


def _shown(value) -> str:
    return "(not given)" if value is None else repr(value)


def _writable(path, flag: str):
    """None if ``path`` can be written (a regular file, or a new one in a folder this user may write), else the
    one-line problem -- checked before a long run, not after it."""
    from fanin._atomic import check_target

    if path is None:
        return None
    try:
        real = check_target(path)
    except (ValueError, OSError) as exc:
        return f"{flag} {path}: {exc}"
    import tempfile

    try:  # the folder (created, as the writers do) and a file in it, tried now
        real.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".fanin-probe-", dir=real.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        return f"{flag} {path}: cannot write there ({exc.strerror or exc}); choose another path."
    return None


if __name__ == "__main__":
    sys.exit(main())
