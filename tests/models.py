"""Small real models built from real data for the data-plane tests and benches.

``build_digits_app_dir`` trains an sklearn MLP on the 8x8 ``load_digits`` images
(values 0..16), converts it to ONNX with skl2onnx and writes an *app dir* the
way the agent unpacks a package: ``manifest.json``, ``model.onnx``,
``labels.txt``, plus ``test_split.npz`` (the held-out ``X_test``/``y_test``).
The training runs once per process; later calls only write files.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import cv2
import numpy as np

DIGITS_INPUT = "input"


@functools.lru_cache(maxsize=1)
def _train_digits() -> tuple[bytes, np.ndarray, np.ndarray]:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    x = digits.data.astype(np.float32)  # (n, 64), values 0..16
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=400, random_state=0)
    clf.fit(x_train, y_train)
    onx = convert_sklearn(
        clf,
        initial_types=[(DIGITS_INPUT, FloatTensorType([None, 64]))],
        options={id(clf): {"zipmap": False}},
    )
    return onx.SerializeToString(), x_test, y_test


def digits_manifest(**overrides) -> dict:
    """The digits app's manifest as a dict; ``overrides`` replace top-level keys."""
    manifest = {
        "name": "digits",
        "version": "1.0.0",
        "task": "classification",
        "description": "handwritten digit classifier (sklearn MLP on 8x8 digits)",
        "model": {
            "file": "model.onnx",
            "inputs": [{"name": DIGITS_INPUT, "dtype": "float32", "shape": [None, 64]}],
            "outputs": [
                {"name": "label", "dtype": "int64", "shape": [None]},
                {"name": "probabilities", "dtype": "float32", "shape": [None, 10]},
            ],
        },
        "preprocess": {
            "color": "gray",
            "resize": [8, 8],
            "layout": "flat",
            "scale": 16 / 255,
            "mean": [0.0],
            "std": [1.0],
            "invert": False,
        },
        "postprocess": {"output": "probabilities", "softmax": False, "top_k": 3},
    }
    manifest.update(overrides)
    return manifest


def build_digits_app_dir(dst: Path, manifest: dict | None = None) -> Path:
    """Write the digits app into ``dst`` (created) and return it."""
    model, x_test, y_test = _train_digits()
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "model.onnx").write_bytes(model)
    (dst / "labels.txt").write_text("".join(f"{i}\n" for i in range(10)))
    (dst / "manifest.json").write_text(json.dumps(manifest or digits_manifest(), indent=1))
    np.savez(dst / "test_split.npz", X_test=x_test, y_test=y_test)
    return dst


def load_test_split(app_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The held-out digits (float32 (n, 64) in 0..16, int64 labels)."""
    with np.load(Path(app_dir) / "test_split.npz") as z:
        return z["X_test"], z["y_test"]


def digit_png(sample: np.ndarray, size: int = 32) -> bytes:
    """Render one 8x8 digit (values 0..16) as a ``size`` x ``size`` grey PNG.

    Upscaled with nearest-neighbour, so an area resize back to 8x8 recovers
    the pixels exactly (up to the 0..16 -> 0..255 rounding).
    """
    img = np.round(np.asarray(sample, np.float32).reshape(8, 8) * (255 / 16)).astype(np.uint8)
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_NEAREST)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


# --- process helpers for the data-plane tests -------------------------------


def worker_pids(marker: str) -> list[int]:
    """Live (non-zombie) ``edge_node.worker`` processes whose command line has ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "edge_node.worker" in cmdline and marker in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
