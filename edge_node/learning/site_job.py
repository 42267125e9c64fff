"""The site fine-tune job: the node's labelled samples in, a judged candidate out.

``python -m edge_node.learning.site_job --app-dir APP --samples-list L.json
--out OUT [--replay R.npz] [fine-tune options] --checkpoint-dir D [--resume]``

``L.json`` (written by the node, :mod:`edge_node.adapt`) lists the labelled
samples: ``{"samples": [{"sample_id", "path", "input_type", "label_index",
"heldout"}]}``. The job

1. turns each stored input into the model's input tensor the way the worker
   does (images through the app's preprocessing, ``.npy`` tensors as they were
   fed), kept as ``train.npz`` and ``heldout.npz`` in the job's dir (an
   unreadable input is skipped and counted, never fatal);
2. splits the replay set (samples of the base distribution shipped in the
   package): every third row is kept apart as the *replay check*, the rest
   trains (a model that memorised the rows it trained on would pass a check on
   those same rows while forgetting the base distribution);
3. runs :mod:`.finetune_job` on the training samples plus the replay training
   rows (checkpointed, preemptible, resumable): with ``--layers 0`` (auto, the
   default) once for the head alone and once for the head with the hidden layer
   before it, when the model has one (``OUT/layers-1``, ``OUT/layers-2``);
4. scores the served model and each candidate on the held-out samples and on
   the replay check with ONNX Runtime, keeps the candidate the promotion gate
   passes with the best held-out accuracy (a tie goes to the head alone) in
   ``OUT``, and writes ``OUT/gate.json``: the figures the node's promotion gate
   decides on, and every candidate's.

Choosing between two candidates on the held-out set makes its figure for the
chosen one slightly optimistic (the better of two); the replay check and the
shadow on live traffic judge it again before it serves.

Exit codes are :mod:`.finetune_job`'s (2 not fine-tunable, 3 bad input).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from . import finetune_job

logger = logging.getLogger(__name__)
MODULE = "edge_node.learning.site_job"


def _tensor(entry: dict, manifest: Any, input_spec: Any) -> np.ndarray:
    """The tensor the worker was fed for a stored sample (edge_node.sharing does the
    same for the features upload level)."""
    from edge_node.sharing import sample_tensor

    return sample_tensor(entry["input_type"], Path(entry["path"]).read_bytes(), manifest,
                         input_spec)


def prepare(app_dir: Path, listing: Path, work: Path) -> dict[str, Any]:
    """Write ``work/train.npz`` and ``work/heldout.npz``; what was used and skipped."""
    from cloud_sync.manifest import load_manifest

    manifest = load_manifest(json.loads((app_dir / "manifest.json").read_text()))
    spec = manifest.model.inputs[0]
    entries = json.loads(listing.read_text())["samples"]
    parts: dict[bool, tuple[list, list, list]] = {False: ([], [], []), True: ([], [], [])}
    skipped: list[dict[str, str]] = []
    for e in entries:
        try:
            x = _tensor(e, manifest, spec)
        except Exception as err:  # noqa: BLE001 - one bad file must not stop the run
            skipped.append({"sample_id": e["sample_id"], "reason": str(err)[:200]})
            continue
        X, y, ids = parts[bool(e["heldout"])]
        X.append(x)
        y.append(int(e["label_index"]))
        ids.append(e["sample_id"])
    shapes = {tuple(x.shape) for X, _, _ in parts.values() for x in X}
    if len(shapes) > 1:
        raise ValueError(f"samples give tensors of different shapes: {sorted(shapes)}")
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"skipped": skipped}
    for held, name in ((False, "train"), (True, "heldout")):
        X, y, ids = parts[held]
        arr = np.stack(X) if X else np.zeros((0,), np.float32)
        np.savez(work / f"{name}.npz", X=arr, y=np.asarray(y, np.int64),
                 ids=np.asarray(ids, dtype="U64"))
        out[name] = {"n": len(y), "ids": ids}
    return out


#: every REPLAY_CHECK_EVERY-th replay row judges the candidate instead of training it
REPLAY_CHECK_EVERY = 3


def split_replay(replay: Path, work: Path) -> dict[str, Any]:
    """``work/replay_train.npz`` and ``work/replay_check.npz`` from ``replay``."""
    X, y = finetune_job.load_samples(replay)
    check = np.arange(len(y)) % REPLAY_CHECK_EVERY == REPLAY_CHECK_EVERY - 1
    out: dict[str, Any] = {"sha256": finetune_job.sha256_file(replay)}
    for name, rows in (("train", ~check), ("check", check)):
        np.savez(work / f"replay_{name}.npz", X=X[rows], y=y[rows])
        out[name] = int(rows.sum())
    return out


def judge(app_dir: Path, candidate: Path, heldout: Path, replay: Path | None,
          threads: int) -> dict[str, Any]:
    """Accuracy of the served model and the candidate on the held-out and replay sets."""
    from .evaluate import evaluate_app

    out: dict[str, Any] = {}
    for name, path in (("heldout", heldout), ("replay", replay)):
        if path is None:
            continue
        X, y = finetune_job.load_samples(path)
        if len(y) == 0:
            out[name] = {"n": 0, "base": None, "candidate": None}
            continue
        base = evaluate_app(app_dir, X, y, threads=threads)
        cand = evaluate_app(app_dir, X, y, model=candidate, threads=threads)
        out[name] = {"n": int(len(y)), "base": base.accuracy, "candidate": cand.accuracy,
                     "base_confusion": base.confusion, "candidate_confusion": cand.confusion}
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
    ap.add_argument("--app-dir", type=Path, required=True)
    ap.add_argument("--samples-list", type=Path, required=True)
    ap.add_argument("--replay", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--checkpoint-dir", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--layers", type=int, choices=(0, 1, 2), default=0,
                    help="0 (auto): train the head alone and with the hidden layer "
                    "before it, keep what the gate prefers")
    args, rest = ap.parse_known_args(argv)
    work = args.checkpoint_dir.parent / "data"
    threads = args.threads or int(os.environ.get("AIDC_JOB_CORES", "1") or 1)
    try:
        if not (work / "prepared.json").exists():  # decoded once; a resume reuses it
            info = prepare(args.app_dir, args.samples_list, work)
            if args.replay is not None:
                info["replay"] = split_replay(args.replay, work)
            (work / "prepared.json").write_text(json.dumps(info))
        info = json.loads((work / "prepared.json").read_text())
    except (OSError, ValueError, KeyError) as err:
        print(f"bad input: {err}", file=sys.stderr)
        return finetune_job.EXIT_BAD_INPUT
    if info["train"]["n"] == 0:
        print("bad input: no labelled training samples could be read "
              f"({len(info['skipped'])} skipped)", file=sys.stderr)
        return finetune_job.EXIT_BAD_INPUT
    replay_check = None
    replay_args: list[str] = []
    if args.replay is not None:
        replay_args = ["--replay", str(work / "replay_train.npz")]
        replay_check = work / "replay_check.npz"
    depths = [args.layers] if args.layers else _depths(args.app_dir)
    candidates = []
    for depth in depths:
        sub = args.out if len(depths) == 1 else args.out / f"layers-{depth}"
        if not (sub / "finetune.json").exists():  # a resume skips what is done
            ckpt = args.checkpoint_dir if len(depths) == 1 else \
                args.checkpoint_dir / f"layers-{depth}"
            rc = finetune_job.main([
                "--app-dir", str(args.app_dir), "--samples", str(work / "train.npz"),
                "--out", str(sub), "--checkpoint-dir", str(ckpt), "--threads", str(threads),
                "--layers", str(depth), *replay_args, *rest])
            if rc != 0 or not (sub / "finetune.json").exists():
                return rc  # failed, or stopped and checkpointed: the scheduler resumes it
        doc = json.loads((sub / "finetune.json").read_text())
        acc = judge(args.app_dir, sub / doc["model"]["file"], work / "heldout.npz",
                    replay_check, threads)
        candidates.append({"layers": len(doc.get("layers") or [1]), "dir": sub,
                           "doc": doc, "accuracy": acc})
    chosen = _choose(args.app_dir, candidates)
    if chosen["dir"] != args.out:
        _adopt(chosen["dir"], args.out, chosen["doc"])
    gate = {"format": "aidc.gate/1", "prepared": {
        "train": info["train"]["n"], "heldout": info["heldout"]["n"],
        "skipped": info["skipped"], "replay": info.get("replay")},
        "train_ids": info["train"]["ids"], "heldout_ids": info["heldout"]["ids"],
        "layers": chosen["layers"],
        "candidates": [{k: c[k] for k in ("layers", "passed", "reason")} | {
            "accuracy": {n: {f: v.get(f) for f in ("n", "base", "candidate")}
                         for n, v in c["accuracy"].items()}} for c in candidates],
        "accuracy": chosen["accuracy"]}
    tmp = args.out / ".gate.json.tmp"
    tmp.write_text(json.dumps(gate, indent=1))
    os.replace(tmp, args.out / "gate.json")
    print(json.dumps({"event": "judged", "layers": chosen["layers"], **{
        k: {f: v.get(f) for f in ("n", "base", "candidate")}
        for k, v in gate["accuracy"].items()}}), flush=True)
    return 0


def _depths(app_dir: Path) -> list[int]:
    """``--layers 0`` (auto): the head alone, and the head with the hidden layer
    before it when the model has one (:func:`.head.find_body`)."""
    from .head import NotFineTunable, find_app_head, find_layers

    try:
        head, model_path, _ = find_app_head(app_dir)
    except NotFineTunable:
        return [1]  # finetune_job says why, with its exit code
    return [1, 2] if len(find_layers(model_path, head, 2)[0]) == 2 else [1]


def _choose(app_dir: Path, candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """The candidate the promotion gate would pass with the best held-out accuracy
    (on a tie, the fewer layers); with none passing, the best held-out one (the
    node's gate then refuses it with its reason)."""
    from cloud_sync.manifest import load_manifest

    from .gate import decide

    gate = load_manifest(json.loads((app_dir / "manifest.json").read_text())).learning.gate
    for c in candidates:
        c["passed"], c["reason"] = decide(gate, c["accuracy"])

    def score(c: dict[str, Any]) -> tuple:
        held = c["accuracy"].get("heldout") or {}
        return (c["passed"], held.get("candidate") or 0.0, -c["layers"])

    return max(candidates, key=score)


def _adopt(src: Path, out: Path, doc: dict[str, Any]) -> None:
    """Copy the chosen candidate's model and record into ``out`` (record last)."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    name = doc["model"]["file"]
    shutil.copyfile(src / name, out / f".{name}.tmp")
    os.replace(out / f".{name}.tmp", out / name)
    shutil.copyfile(src / "finetune.json", out / ".finetune.json.tmp")
    os.replace(out / ".finetune.json.tmp", out / "finetune.json")


if __name__ == "__main__":
    sys.exit(main())
