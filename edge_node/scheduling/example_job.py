"""A real training job: a softmax-regression head in numpy on the digits features.

``python -m edge_node.scheduling.example_job --checkpoint-dir D [--resume]
[--epochs 8] [--batch-size 32] [--lr 0.5] [--l2 1e-4] [--seed 0]
[--checkpoint-every 20] [--throttle 0] [--out PATH]``

Mini-batch gradient descent on sklearn's 8x8 digits (features scaled to 0..1;
the first 1500 samples train, the rest are held out). Checkpoints hold the
weights, the epoch, the batch within it, that epoch's shuffle and the RNG
state, so a run stopped at any batch and resumed ends with exactly the weights
of a run that never stopped. On SIGTERM it finishes the current batch,
checkpoints and exits 0. Writes the final weights to ``--out`` (default
``<checkpoint-dir>/final.npz``) and prints ``{"event": "done", ...}``.
``--throttle`` sleeps after each batch: a demo/test knob that makes this tiny
job last long enough to watch. It is the shape of issue 4's fine-tune job.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from .jobkit import JobContext

logger = logging.getLogger(__name__)
N_TRAIN = 1500


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # the [demo]/[test] extra

    d = load_digits()
    x, y = d.data.astype(np.float64) / 16.0, d.target.astype(np.int64)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sgd_step(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray, lr: float,
             l2: float) -> float:
    """One in-place gradient step on a batch; returns its cross-entropy loss."""
    p = softmax(x @ w + b)
    loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    w -= lr * (x.T @ p + l2 * w)
    b -= lr * p.sum(axis=0)
    return loss


def accuracy(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    return float(((x @ w + b).argmax(axis=1) == y).mean())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--l2", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=20, help="batches")
    parser.add_argument("--throttle", type=float, default=0.0, help="seconds per batch")
    parser.add_argument("--out", type=Path, default=None)
    ctx, args = JobContext.from_args(parser, argv)
    x, y, x_test, y_test = load_data()
    n_batches = -(-len(x) // args.batch_size)
    total = args.epochs * n_batches

    rng = np.random.default_rng(args.seed)
    w = np.zeros((x.shape[1], 10))
    b = np.zeros(10)
    epoch, batch, perm = 0, 0, None
    latest = ctx.load_latest() if ctx.resume else None
    if latest:
        _, arrays, meta = latest
        w, b = arrays["w"], arrays["b"]
        perm = arrays["perm"] if arrays["perm"].size else None  # empty: not drawn yet
        epoch, batch = meta["epoch"], meta["batch"]
        rng.bit_generator.state = meta["rng"]
        ctx.emit("resumed", step=epoch * n_batches + batch, epoch=epoch, batch=batch)

    def checkpoint() -> None:
        meta = {"epoch": epoch, "batch": batch, "rng": rng.bit_generator.state}
        drawn = perm if perm is not None else np.empty(0, np.int64)
        ctx.save(epoch * n_batches + batch, {"w": w, "b": b, "perm": drawn}, meta)

    while epoch < args.epochs:
        if perm is None:  # a fresh epoch; a resumed one keeps its saved shuffle
            perm = rng.permutation(len(x))
        losses = []
        while batch < n_batches:
            if ctx.stop_requested:
                checkpoint()
                logger.info("stopped at epoch %d batch %d (checkpointed)", epoch, batch)
                return 0
            idx = perm[batch * args.batch_size:(batch + 1) * args.batch_size]
            losses.append(sgd_step(w, b, x[idx], y[idx], args.lr, args.l2))
            batch += 1
            if batch % args.checkpoint_every == 0 and batch < n_batches:
                checkpoint()
            if args.throttle:
                time.sleep(args.throttle)
        epoch, batch, perm = epoch + 1, 0, None
        checkpoint()
        ctx.emit("progress", step=epoch * n_batches, total=total, epoch=epoch,
                 epochs=args.epochs, loss=round(float(np.mean(losses or [0.0])), 5),
                 accuracy=round(accuracy(w, b, x_test, y_test), 4))

    out = args.out or ctx.checkpoint_dir / "final.npz"
    np.savez(out, w=w, b=b)
    ctx.emit("done", step=total, total=total, epoch=epoch,
             accuracy=round(accuracy(w, b, x_test, y_test), 4), out=str(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

