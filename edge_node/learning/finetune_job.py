"""The fine-tune as a training job under the node's scheduler (docs/scheduling.md).

``python -m edge_node.learning.finetune_job --checkpoint-dir D [--resume]
--app-dir APP --samples S.npz [--replay R.npz] --out OUT [--layers 0|1|2] [--l2 1e-4]
[--replay-weight 0.5] [--class-weight balanced|none] [--val-fraction 0]
[--max-iter 300] [--patience 10] [--seed 0] [--min-delta 1e-4] [--tol 1e-7]
[--history 10] [--head NODE] [--output NAME]
[--threads N] [--checkpoint-every 20] [--probe 64] [--throttle 0]``

``S.npz`` and ``R.npz`` hold ``X`` (the model's input tensors, as the worker
feeds them after preprocessing) and ``y`` (class indices). Steps: find the head
(:mod:`.head`; a model without one fails with exit 2 and the reason) and, with
``--layers 2`` or ``0`` (the default), the hidden layer before it (:func:`.head.find_body`;
a model without one trains its head alone and the record says why), compute
the trained layers' input once with ONNX Runtime and keep them in the checkpoint dir
(``features/``, so a resume neither recomputes them nor depends on the thread
count), train with L-BFGS (:mod:`.train`), checkpointing every
``--checkpoint-every`` iterations and on SIGTERM, then write ``OUT/<model file>``
(:mod:`.export`, validated on ``--probe`` sample inputs) and ``OUT/finetune.json``
(metrics and lineage, written last: its presence means the output is complete).
A run stopped at any iteration and resumed ends with exactly the weights of a
run that never stopped. ``--throttle`` sleeps after each iteration (a test knob).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edge_node.scheduling.jobkit import JobContext, load_latest, save_checkpoint

logger = logging.getLogger(__name__)
MODULE = "edge_node.learning.finetune_job"
FORMAT = "aidc.finetune/1"
EXIT_NOT_FINE_TUNABLE = 2
EXIT_BAD_INPUT = 3


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_samples(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``X`` and ``y`` from a samples .npz."""
    with np.load(path, allow_pickle=False) as z:
        missing = {"X", "y"} - set(z.files)
        if missing:
            raise ValueError(f"{path}: no {', '.join(sorted(missing))} array "
                             "(a samples file holds X and y)")
        X, y = z["X"], z["y"].astype(np.int64).reshape(-1)
    if len(X) != len(y):
        raise ValueError(f"{path}: {len(X)} inputs but {len(y)} labels")
    return X, y


def class_counts(y: np.ndarray) -> dict[str, int]:
    classes, counts = np.unique(y, return_counts=True)
    return {str(int(c)): int(n) for c, n in zip(classes, counts)}


def job_args(app_dir: Path, samples: Path, out: Path, replay: Path | None = None,
             config: Any = None, head: str | None = None, output: str | None = None,
             checkpoint_every: int | None = None) -> list[str]:
    """The ``args`` of a scheduler ``JobSpec`` for this module, e.g.
    ``JobSpec(name="finetune-digits", module=MODULE, args=job_args(...))``; ``config``
    is a :class:`~edge_node.learning.train.TrainConfig` (only values that differ from
    the defaults are passed)."""
    args = ["--app-dir", str(app_dir), "--samples", str(samples), "--out", str(out)]
    if replay is not None:
        args += ["--replay", str(replay)]
    if config is not None:
        from .train import TrainConfig

        default = TrainConfig().to_dict()
        for key, value in config.to_dict().items():
            if value != default[key]:
                args += [f"--{key.replace('_', '-')}", str(value)]
    for flag, value in (("--head", head), ("--output", output),
                        ("--checkpoint-every", checkpoint_every)):
        if value is not None:
            args += [flag, str(value)]
    return args


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    from .export import _atomic_write

    _atomic_write(path, (json.dumps(doc, indent=1) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--app-dir", type=Path, required=True)
    parser.add_argument("--samples", type=Path, required=True)
    parser.add_argument("--replay", type=Path, default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, choices=(0, 1, 2), default=None,
                        help="1: the head; 2 or 0 (auto): the head and the hidden layer "
                        "before it when the model has one")
    parser.add_argument("--l2", type=float, default=None)
    parser.add_argument("--replay-weight", type=float, default=None)
    parser.add_argument("--class-weight", choices=("balanced", "none"), default=None)
    parser.add_argument("--val-fraction", type=float, default=None)
    parser.add_argument("--max-iter", type=int, default=None)
    parser.add_argument("--patience", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--min-delta", type=float, default=None)
    parser.add_argument("--tol", type=float, default=None)
    parser.add_argument("--history", type=int, default=None)
    parser.add_argument("--head", default=None, help="pin the head node (else learning.head)")
    parser.add_argument("--output", default=None, help="class-score output "
                        "(else postprocess.output)")
    parser.add_argument("--threads", type=int, default=None, help="ORT threads "
                        "(default AIDC_JOB_CORES)")
    parser.add_argument("--checkpoint-every", type=int, default=20, help="iterations "
                        "(and always on SIGTERM and at the end of training)")
    parser.add_argument("--probe", type=int, default=64, help="sample inputs to validate "
                        "the exported model on")
    parser.add_argument("--throttle", type=float, default=0.0, help="seconds per iteration")
    ctx, args = JobContext.from_args(parser, argv)

    from .head import NotFineTunable, find_app_head, find_layers, read_head
    from .train import DeepTrainer, HeadTrainer, TrainConfig, fingerprint

    t_start = time.perf_counter()
    try:
        head, model_path, manifest = find_app_head(args.app_dir, args.output, args.head)
    except NotFineTunable as err:
        print(f"not fine-tunable: {err.reason}", file=sys.stderr)
        return EXIT_NOT_FINE_TUNABLE
    try:
        X_site, y_site = load_samples(args.samples)
        X_rep, y_rep = load_samples(args.replay) if args.replay else (None, None)
        for name, y in (("samples", y_site), ("replay", y_rep)):
            if y is not None and len(y) and (y.min() < 0 or y.max() >= head.n_classes):
                raise ValueError(f"{name}: labels must be class indices in "
                                 f"0..{head.n_classes - 1}")
        if len(y_site) == 0:
            raise ValueError(f"{args.samples}: no samples")
    except (OSError, ValueError) as err:
        print(f"bad input: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    overrides = {k: v for k, v in {
        "layers": args.layers, "l2": args.l2, "replay_weight": args.replay_weight,
        "class_weight": args.class_weight,
        "val_fraction": args.val_fraction, "max_iter": args.max_iter,
        "patience": args.patience, "seed": args.seed, "min_delta": args.min_delta,
        "tol": args.tol, "history": args.history}.items() if v is not None}
    config = TrainConfig(**overrides)
    threads = args.threads or ctx.cores
    layers, fewer = find_layers(model_path, head, config.layers or 2)
    if fewer:
        logger.info("training the head alone: %s", fewer)

    base_sha = sha256_file(model_path)
    inputs = {"samples": {"path": str(args.samples), "sha256": sha256_file(args.samples),
                          "n": int(len(y_site)), "class_counts": class_counts(y_site)}}
    if args.replay:
        inputs["replay"] = {"path": str(args.replay), "sha256": sha256_file(args.replay),
                            "n": int(len(y_rep)), "class_counts": class_counts(y_rep)}

    # features: computed once, kept beside the checkpoints
    feat_dir = ctx.checkpoint_dir / "features"
    key = fingerprint(base_sha, [layer.to_dict() for layer in layers],
                      inputs["samples"]["sha256"],
                      inputs.get("replay", {}).get("sha256"))
    cached = load_latest(feat_dir)
    t_feat = time.perf_counter()
    if cached is not None and cached[2].get("key") == key:
        F_site, F_rep = cached[1]["site"], cached[1]["replay"]
        feature_s = cached[2].get("seconds", 0.0)
    else:
        from .features import FeatureExtractor

        fx = FeatureExtractor(model_path, layers[0], threads)
        F_site = fx(X_site)
        F_rep = (fx(X_rep) if X_rep is not None
                 else np.zeros((0, layers[0].n_features), np.float32))
        feature_s = round(time.perf_counter() - t_feat, 4)
        save_checkpoint(feat_dir, 0, {"site": F_site, "replay": F_rep},
                        {"key": key, "seconds": feature_s}, keep=1)
    y_rep_arr = y_rep if y_rep is not None else np.zeros(0, np.int64)

    if len(layers) == 1:
        W0, b0 = read_head(model_path, head)
        trainer: HeadTrainer | DeepTrainer = HeadTrainer(
            W0, b0, F_site, y_site, F_rep, y_rep_arr, config, fit_bias=head.bias is not None)
    else:
        trainer = DeepTrainer([read_head(model_path, layer) for layer in layers],
                              layers[0].activation, F_site, y_site, F_rep, y_rep_arr, config)
    runs: list[dict[str, Any]] = []
    train_s = 0.0
    latest = ctx.load_latest() if ctx.resume else None
    if latest is not None:
        step, arrays, meta = latest
        try:
            trainer.restore(arrays, meta)
            runs, train_s = list(meta.get("runs", [])), float(meta.get("train_s", 0.0))
            ctx.emit("resumed", step=trainer.iteration)
        except (ValueError, KeyError) as err:
            logger.warning("not resuming from checkpoint %d: %s; starting from zero", step, err)
    runs.append({"started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "from_iteration": trainer.iteration, "pid": os.getpid()})

    def checkpoint() -> None:
        arrays, meta = trainer.state()
        meta.update(runs=runs, train_s=round(train_s, 4))
        ctx.save(trainer.iteration, arrays, meta)

    total = config.max_iter
    while not trainer.done:
        if ctx.stop_requested:
            checkpoint()
            logger.info("stopped at iteration %d (checkpointed)", trainer.iteration)
            return 0
        t0 = time.perf_counter()
        rec = trainer.step()
        train_s += time.perf_counter() - t0
        ctx.emit("progress", step=trainer.iteration, total=total, **{
            k: v for k, v in rec.items() if k != "iteration"})
        if trainer.done or trainer.iteration % max(1, args.checkpoint_every) == 0:
            checkpoint()
        if args.throttle:
            time.sleep(args.throttle)

    # export and validate; the training state is checkpointed (done), so a stop here
    # resumes straight to the export
    from .export import export_layers

    result = trainer.result()
    model_name = Path((manifest.get("model") or {}).get("file") or "model.onnx").name
    out_model = args.out / model_name
    probe = X_site[:max(0, args.probe)]
    trained = [(layer, W, b) for layer, (W, b) in zip(layers, result.layers)]
    validation = export_layers(model_path, trained, out_model, probe, threads)
    doc = {
        "format": FORMAT,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "job_id": os.environ.get("AIDC_JOB_ID"),
        "app": {"name": manifest.get("name"), "version": manifest.get("version"),
                "dir": str(args.app_dir)},
        "base_model": {"file": model_name, "sha256": base_sha},
        "model": {"file": model_name, "sha256": sha256_file(out_model)},
        "head": head.to_dict(),
        "layers": [layer.to_dict() for layer in layers],
        "layers_note": fewer,
        "inputs": inputs,
        "config": config.to_dict(),
        "training": {
            "method": ("softmax regression on the head, L-BFGS, L2 toward the base head"
                       if len(layers) == 1 else
                       f"head and hidden layer ({layers[0].activation}) by backpropagation, "
                       "L-BFGS, L2 toward the base weights"),
            "iterations": result.iterations, "best_iteration": result.best_iteration,
            "stop_reason": result.stop_reason, "loss": result.loss,
            "val_loss": result.val_loss, "train_s": round(train_s, 4),
            "feature_s": feature_s, "threads": threads, "runs": runs,
            "log": trainer.log,
        },
        "metrics": result.metrics,
        "validation": validation,
    }
    _write_json(args.out / "finetune.json", doc)
    site = result.metrics["site_train"]
    ctx.emit("done", step=trainer.iteration, total=total, out=str(out_model),
             stop_reason=result.stop_reason,
             site_accuracy_before=site["accuracy_before"],
             site_accuracy_after=site["accuracy_after"],
             seconds=round(time.perf_counter() - t_start, 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
