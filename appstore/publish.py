"""Build a signed app package from a model, a manifest and optional labels.

This is the publisher's side, run where the private key is (``aidc store
publish``). The manifest is checked against the model's real tensors before
anything is signed, so a package that would fail on every node never exists.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cloud_sync.errors import PackageError
from cloud_sync.manifest import load_manifest
from cloud_sync.package import MANIFEST_FILE, write_package

from .errors import PackageRejected
from .signing import SigningKey
from .tensors import describe_model, fill_tensors, validate_model

logger = logging.getLogger(__name__)

DEFAULT_LABELS_FILE = "labels.txt"


def read_labels(data: bytes) -> list[str]:
    return [ln.strip() for ln in data.decode("utf-8").splitlines() if ln.strip()]


def load_manifest_file(path: str | Path) -> dict[str, Any]:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise PackageRejected("bad_manifest", f"cannot read {path}: {err}") from err
    except ValueError as err:
        raise PackageRejected("bad_manifest", f"{path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise PackageRejected("bad_manifest", f"{path}: manifest must be a JSON object")
    return raw


def build_package(
    model_path: str | Path,
    manifest: dict[str, Any],
    labels_path: str | Path | None,
    key: SigningKey,
    out_path: str | Path,
    extra_files: list[str | Path] | None = None,
) -> tuple[str, int]:
    """Validate, sign and write the package; return ``(sha256, size)``.

    ``extra_files`` go into the package under their own names; a file the
    manifest names (``learning.replay``) is taken from beside the model when it
    is not among them.

    Raises :class:`PackageRejected` with reason ``bad_manifest``,
    ``bad_model`` or ``tensor_mismatch`` (listing every mismatch).
    """
    model_path = Path(model_path)
    try:
        model = model_path.read_bytes()
    except OSError as err:
        raise PackageRejected("bad_model", f"cannot read {model_path}: {err}") from err
    sig = describe_model(model)
    raw = fill_tensors(manifest, sig)
    raw["model"].setdefault("file", "model.onnx")
    labels: list[str] | None = None
    members: dict[str, bytes] = {}
    if labels_path is not None:
        try:
            labels_bytes = Path(labels_path).read_bytes()
            labels = read_labels(labels_bytes)
        except (OSError, UnicodeDecodeError) as err:
            raise PackageRejected("bad_labels", f"cannot read labels {labels_path}: {err}") from err
        pp = raw.get("postprocess")
        if isinstance(pp, dict):
            name = pp.setdefault("labels_file", DEFAULT_LABELS_FILE) or DEFAULT_LABELS_FILE
            pp["labels_file"] = name
        else:
            name = DEFAULT_LABELS_FILE
        members[name] = labels_bytes
    try:
        m = load_manifest(raw)
    except PackageError as err:
        raise PackageRejected(err.reason, err.detail) from err
    for extra in m.unknown_keys():
        logger.warning("manifest of %s %s: unknown key %s (kept)", m.name, m.version, extra)
    validate_model(m, model, labels)
    extras = {Path(p).name: Path(p) for p in extra_files or ()}
    if m.learning.replay and m.learning.replay not in extras:
        extras[m.learning.replay] = model_path.parent / m.learning.replay
    for name, path in extras.items():
        if name in members or name in (MANIFEST_FILE, m.model.file):
            raise PackageRejected("bad_manifest", f"extra file {name!r} clashes with a "
                                  "package member")
        try:
            members[name] = path.read_bytes()
        except OSError as err:
            raise PackageRejected("missing_file", f"cannot read {path} (named by the "
                                  f"manifest or --extra): {err.strerror}") from err
    if m.learning.replay:
        _check_replay(m.learning.replay, members[m.learning.replay])
    if m.model.file in members or m.model.file == MANIFEST_FILE or "/" in m.model.file:
        raise PackageRejected("bad_manifest", f"model.file {m.model.file!r} is not a usable name")
    members[m.model.file] = model
    members[MANIFEST_FILE] = (json.dumps(raw, indent=2, sort_keys=True) + "\n").encode()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        sha = write_package(out_path, members, key.sign, key.key_id)
    except PackageError as err:
        raise PackageRejected(err.reason, err.detail) from err
    size = out_path.stat().st_size
    logger.info("built %s %s: %s (%d bytes, key %s)", m.name, m.version, sha[:12], size, key.key_id)
    return sha, size


def _check_replay(name: str, data: bytes) -> None:
    """A replay set is an .npz with X and y of one length."""
    import io

    import numpy as np

    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if not {"X", "y"} <= set(z.files):
                raise PackageRejected("bad_replay", f"{name} holds {sorted(z.files)}; a "
                                      "replay set holds X (inputs) and y (class indices)")
            if len(z["X"]) != len(z["y"]) or len(z["y"]) == 0:
                raise PackageRejected("bad_replay", f"{name}: {len(z['X'])} inputs, "
                                      f"{len(z['y'])} labels")
    except (OSError, ValueError) as err:
        raise PackageRejected("bad_replay", f"{name} is not a numpy .npz: {err}") from err
