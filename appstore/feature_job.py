"""The cloud's head retraining when some dataset items are features only.

``python -m appstore.feature_job --app-dir BASE --samples-list IN.json
--features-list F.json --out OUT --work W [--replay R.npz] [--threads 1]
[--l2 ..] [--replay-weight ..] [--class-weight ..] [--max-iter ..] [--patience ..]
[--seed ..]``

Sites at upload level ``features`` share the vector the head consumes instead
of the input, so those items can only train the head (depth 1), and only when
the base model is the one that computed them (the caller,
:mod:`appstore.retrain`, passes only such items). Items with inputs are turned
into tensors as the nodes do (:func:`edge_node.learning.site_job.prepare`) and
their features computed with the same ONNX Runtime extractor, so both kinds
are rows of one training set. Then, with the public library only:
:func:`~edge_node.learning.train.fine_tune` (warm start from the base head,
replay set as its group), :func:`~edge_node.learning.export.export_head`, and
the judgement: held-out accuracy of the base and the candidate (inputs through
ORT with :func:`~edge_node.learning.evaluate.evaluate_app`; feature rows
through the head, which is what the graph computes from them) and accuracy on
the replay check with ORT (the replay set is split as the node's job splits it,
:func:`~edge_node.learning.site_job.split_replay`: the check rows never train).
Only the head trains (depth 1): a features-only row is the head's input, so
nothing before it can learn from it. Writes ``OUT/<model file>``, ``OUT/finetune.json`` and
``OUT/gate.json`` in the shapes :mod:`appstore.retrain` reads from the node
job. Exit 2: not fine-tunable; 3: bad input (stderr says why).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

EXIT_NOT_FINE_TUNABLE, EXIT_BAD_INPUT = 2, 3


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return z["X"], z["y"].astype(np.int64).reshape(-1)


def load_features(entries: list[dict], n_features: int
                  ) -> tuple[dict[bool, tuple[list, list, list]], list[dict]]:
    """Feature rows by held-out flag: ``{heldout: (F rows, labels, ids)}``, and the
    skipped ones with the reason (unreadable, a length other than the head's)."""
    parts: dict[bool, tuple[list, list, list]] = {False: ([], [], []), True: ([], [], [])}
    skipped = []
    for e in entries:
        try:
            f = np.fromfile(e["path"], "<f4")
        except OSError as err:
            skipped.append({"sample_id": e["sample_id"], "reason": f"unreadable: {err}"[:200]})
            continue
        if f.size != n_features:
            skipped.append({"sample_id": e["sample_id"], "reason": f"{f.size} features, the "
                            f"head takes {n_features}"})
            continue
        if not np.isfinite(f).all():
            skipped.append({"sample_id": e["sample_id"], "reason": "non-finite features"})
            continue
        F, y, ids = parts[bool(e["heldout"])]
        F.append(f)
        y.append(int(e["label_index"]))
        ids.append(e["sample_id"])
    return parts, skipped


def _stack(rows: list, n: int) -> np.ndarray:
    return np.stack(rows).astype(np.float32) if rows else np.zeros((0, n), np.float32)


def run(args: argparse.Namespace) -> int:
    from edge_node.learning import (NotFineTunable, TrainConfig, export_head, find_app_head,
                                    fine_tune, read_head, FeatureExtractor)
    from edge_node.learning.evaluate import evaluate_app
    from edge_node.learning.site_job import prepare, split_replay

    threads = max(1, args.threads)
    try:
        head, model_path, manifest = find_app_head(args.app_dir)
    except NotFineTunable as err:
        print(f"not fine-tunable: {err.reason}", file=sys.stderr)
        return EXIT_NOT_FINE_TUNABLE
    n = head.n_features
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        info = prepare(args.app_dir, args.samples_list, args.work)
        feat_entries = json.loads(args.features_list.read_text())["samples"]
    except (OSError, ValueError, KeyError) as err:
        print(f"bad input: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    fparts, fskipped = load_features(feat_entries, n)
    fx = FeatureExtractor(model_path, head, threads=threads)
    t0 = time.monotonic()
    X_in, y_in = _load_npz(args.work / "train.npz")
    Xh_in, yh_in = _load_npz(args.work / "heldout.npz")
    F_in = fx(X_in) if len(y_in) else np.zeros((0, n), np.float32)
    F_site = np.concatenate([F_in, _stack(fparts[False][0], n)])
    y_site = np.concatenate([y_in, np.asarray(fparts[False][1], np.int64)])
    if len(y_site) == 0:
        print(f"bad input: no labelled training rows ({len(info['skipped'])} inputs and "
              f"{len(fskipped)} feature vectors skipped)", file=sys.stderr)
        return EXIT_BAD_INPUT
    if y_site.max() >= head.n_classes or y_site.min() < 0:
        print(f"bad input: labels outside the head's {head.n_classes} classes", file=sys.stderr)
        return EXIT_BAD_INPUT
    F_rep = y_rep = X_rep = X_chk = y_chk = None
    replay_info = None
    if args.replay is not None:  # the check rows judge the candidate, never train it
        replay_info = split_replay(args.replay, args.work)
        X_rep, y_rep = _load_npz(args.work / "replay_train.npz")
        X_chk, y_chk = _load_npz(args.work / "replay_check.npz")
        F_rep = fx(X_rep)
    feature_s = time.monotonic() - t0
    cfg = TrainConfig.from_dict({k: v for k, v in {
        "l2": args.l2, "replay_weight": args.replay_weight, "class_weight": args.class_weight,
        "max_iter": args.max_iter, "patience": args.patience, "seed": args.seed}.items()
        if v is not None})
    W0, b0 = read_head(model_path, head)
    t1 = time.monotonic()
    res = fine_tune(W0, b0, F_site, y_site, F_rep, y_rep, config=cfg,
                    fit_bias=head.bias is not None)
    train_s = time.monotonic() - t1
    args.out.mkdir(parents=True, exist_ok=True)
    out_model = args.out / Path(model_path).name
    probe = X_in if len(y_in) else X_rep
    validation = export_head(model_path, head, res.W, res.b, out_model,
                             X_probe=None if probe is None else probe[:64], threads=threads)
    # -- judge: the base and the candidate on the held-out rows and the replay set
    Fh = _stack(fparts[True][0], n)
    yh = np.asarray(fparts[True][1], np.int64)
    n_held = len(yh_in) + len(yh)
    held: dict[str, Any] = {"n": n_held, "n_inputs": int(len(yh_in)),
                            "n_features": int(len(yh)), "base": None, "candidate": None}
    if n_held:
        right = {}
        for name, W, b, model in (("base", W0, b0, None), ("candidate", res.W, res.b,
                                                          out_model)):
            ok = 0
            if len(yh_in):
                ev = evaluate_app(args.app_dir, Xh_in, yh_in, model=model, threads=threads)
                ok += round(ev.accuracy * ev.n)
            if len(yh):  # softmax keeps the order: argmax of the logits is the graph's answer
                ok += int(((Fh.astype(np.float64) @ W + b).argmax(1) == yh).sum())
            right[name] = ok / n_held
        held.update(right)
    acc: dict[str, Any] = {"heldout": held}
    if X_chk is not None and len(y_chk):
        base = evaluate_app(args.app_dir, X_chk, y_chk, threads=threads)
        cand = evaluate_app(args.app_dir, X_chk, y_chk, model=out_model, threads=threads)
        acc["replay"] = {"n": int(len(y_chk)), "base": base.accuracy,
                         "candidate": cand.accuracy}
    sha = hashlib.sha256(out_model.read_bytes()).hexdigest()
    base_sha = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()
    ft = {"format": "aidc.feature-retrain/1", "created_at": time.strftime(
              "%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "base_model": {"file": Path(model_path).name, "sha256": base_sha},
          "model": {"file": out_model.name, "sha256": sha}, "head": head.to_dict(),
          "config": cfg.to_dict(),
          "inputs": {"input_rows": int(len(y_in)), "feature_rows": len(fparts[False][1]),
                     "replay": 0 if y_rep is None else int(len(y_rep))},
          "training": {"method": "fine_tune", "iterations": res.iterations,
                       "stop_reason": res.stop_reason, "loss": res.loss,
                       "train_s": round(train_s, 4), "feature_s": round(feature_s, 4),
                       "threads": threads},
          "metrics": res.metrics, "validation": validation}
    gate = {"format": "aidc.gate/1", "prepared": {
        "train": int(len(y_site)), "heldout": n_held,
        "train_inputs": int(len(y_in)), "train_features": len(fparts[False][1]),
        "skipped": info["skipped"] + fskipped, "replay": replay_info, "layers": 1},
        "train_ids": info["train"]["ids"] + fparts[False][2],
        "heldout_ids": info["heldout"]["ids"] + fparts[True][2], "accuracy": acc}
    for name, doc in (("gate.json", gate), ("finetune.json", ft)):  # finetune.json last
        tmp = args.out / f".{name}.tmp"
        tmp.write_text(json.dumps(doc, indent=1, default=float))
        os.replace(tmp, args.out / name)
    print(json.dumps({"event": "done", "heldout": held, "replay": acc.get("replay")}),
          flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--app-dir", type=Path, required=True)
    ap.add_argument("--samples-list", type=Path, required=True)
    ap.add_argument("--features-list", type=Path, required=True)
    ap.add_argument("--replay", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--l2", type=float)
    ap.add_argument("--replay-weight", type=float)
    ap.add_argument("--class-weight")
    ap.add_argument("--max-iter", type=int)
    ap.add_argument("--patience", type=int)
    ap.add_argument("--seed", type=int)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
