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
2. runs :mod:`.finetune_job` on the training samples plus the replay set
   (checkpointed, preemptible, resumable);
3. scores the served model and the candidate on the held-out samples and on the
   replay set with ONNX Runtime and writes ``OUT/gate.json``: the figures the
   node's promotion gate decides on.

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
    path, kind = Path(entry["path"]), entry["input_type"]
    if kind == "tensor/npy":
        arr = np.load(path, allow_pickle=False)
    else:
        from edge_node.streams.snapshot import is_frame_png
        from edge_node.worker.preprocess import image_to_tensor, pixels_to_tensor

        if manifest.preprocess is None:
            raise ValueError("an image sample, but the app has no preprocessing")
        data = path.read_bytes()
        if is_frame_png(data):  # a camera frame: the worker made its tensor from the pixels
            import cv2

            pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            if pixels is None:
                raise ValueError("unreadable camera frame PNG")
            arr = pixels_to_tensor(pixels, manifest.preprocess, input_spec)
        else:
            arr = image_to_tensor(data, manifest.preprocess, input_spec)
    arr = np.asarray(arr)
    return arr[0] if arr.ndim >= 2 and arr.shape[0] == 1 else arr


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
    args, rest = ap.parse_known_args(argv)
    work = args.checkpoint_dir.parent / "data"
    threads = args.threads or int(os.environ.get("AIDC_JOB_CORES", "1") or 1)
    try:
        if not (work / "prepared.json").exists():  # decoded once; a resume reuses it
            info = prepare(args.app_dir, args.samples_list, work)
            (work / "prepared.json").write_text(json.dumps(info))
        info = json.loads((work / "prepared.json").read_text())
    except (OSError, ValueError, KeyError) as err:
        print(f"bad input: {err}", file=sys.stderr)
        return finetune_job.EXIT_BAD_INPUT
    if info["train"]["n"] == 0:
        print("bad input: no labelled training samples could be read "
              f"({len(info['skipped'])} skipped)", file=sys.stderr)
        return finetune_job.EXIT_BAD_INPUT
    ft_argv = ["--app-dir", str(args.app_dir), "--samples", str(work / "train.npz"),
               "--out", str(args.out), "--checkpoint-dir", str(args.checkpoint_dir),
               "--threads", str(threads), *rest]
    if args.replay is not None:
        ft_argv += ["--replay", str(args.replay)]
    rc = finetune_job.main(ft_argv)
    if rc != 0 or not (args.out / "finetune.json").exists():
        return rc  # failed, or stopped and checkpointed: the scheduler resumes it
    doc = json.loads((args.out / "finetune.json").read_text())
    candidate = args.out / doc["model"]["file"]
    gate = {"format": "aidc.gate/1", "prepared": {
        "train": info["train"]["n"], "heldout": info["heldout"]["n"],
        "skipped": info["skipped"]},
        "train_ids": info["train"]["ids"], "heldout_ids": info["heldout"]["ids"],
        "accuracy": judge(args.app_dir, candidate, work / "heldout.npz", args.replay,
                          threads)}
    tmp = args.out / ".gate.json.tmp"
    tmp.write_text(json.dumps(gate, indent=1))
    os.replace(tmp, args.out / "gate.json")
    print(json.dumps({"event": "judged", **{
        k: {f: v.get(f) for f in ("n", "base", "candidate")}
        for k, v in gate["accuracy"].items()}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
