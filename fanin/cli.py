"""The ``fanin`` command: train, download."""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}


def _sizes(text: str):
    try:
        sizes = [int(s) for s in text.replace(",", "-").split("-")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes must look like 784-300-100-10, got {text!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--sizes needs at least two positive widths, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fanin", description="Sparse, low-bit neural networks on NumPy + Numba.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model on Fashion-MNIST")
    t.add_argument("--data", default="fashion-mnist", choices=["fashion-mnist"], help="dataset")
    t.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    t.add_argument("--sizes", type=_sizes, default=[784, 300, 100, 10], help="MLP widths, e.g. 784-300-100-10")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"])
    t.add_argument("--lr", type=float, default=None, help="learning rate (default: 0.05 for sgd, 1e-3 for adam)")
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--warmup-epochs", type=float, default=0.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--limit", type=int, default=None, help="use only the first N training images (quick runs)")
    t.add_argument("--no-progress", action="store_true", help="no progress line")

    d = sub.add_parser("download", help="fetch Fashion-MNIST into the user cache (needs a network)")
    d.add_argument("--dir", default=None)
    return p


def load_data(model: str, limit=None):
    from fanin import data

    xtr, ytr = data.load_fashion_mnist("train")
    xte, yte = data.load_fashion_mnist("test")
    if limit:
        xtr, ytr = xtr[:limit], ytr[:limit]
    flat = model == "mlp"
    return (data.normalize(xtr, flat), ytr), (data.normalize(xte, flat), yte)


def build_model(args):
    from fanin import models

    if args.model == "mlp":
        if args.sizes[0] != 784 or args.sizes[-1] != 10:
            raise SystemExit(f"fanin: --sizes must start with 784 and end with 10 for Fashion-MNIST, got {args.sizes}")
        return models.mlp(args.sizes, seed=args.seed)
    return models.cnn(seed=args.seed)


def cmd_train(args) -> int:
    from fanin import optim
    from fanin.data import DatasetNotFound
    from fanin.train import TrainConfig, fit, make_optimizer

    try:
        train, test = load_data(args.model, args.limit)
    except DatasetNotFound as exc:
        print(f"fanin: {exc}", file=sys.stderr)
        return 2
    lr = DEFAULT_LR[args.optimizer] if args.lr is None else args.lr
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=lr, optimizer=args.optimizer,
                      momentum=args.momentum, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                      seed=args.seed)
    model = build_model(args)
    opt = make_optimizer(model.parameters(), cfg)
    steps = cfg.epochs * -(-len(train[0]) // cfg.batch_size)
    warmup = int(cfg.warmup_epochs * -(-len(train[0]) // cfg.batch_size))
    schedule = optim.CosineSchedule(opt, steps, warmup)
    n_params = sum(p.size for p in model.parameters())
    print(f"model {args.model}: {n_params} parameters; {len(train[0])} training images; "
          f"{cfg.optimizer} lr={lr} batch={cfg.batch_size} seed={cfg.seed}")
    start = time.perf_counter()
    history = fit(model, opt, train, test, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
                  schedule=schedule, progress=not args.no_progress)
    wall = time.perf_counter() - start
    per_epoch = np.mean([h["time"] for h in history])
    print(f"train time: {wall:.1f}s ({per_epoch:.1f}s per epoch of training)")
    print(f"test accuracy: {history[-1]['test_acc']:.4f}")
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
    return {"train": cmd_train, "download": cmd_download}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
