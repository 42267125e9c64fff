"""The ``digits`` sample app: an MLP on sklearn's 8x8 handwritten digits.

Real data, trained in a second or two on one core, small enough for every test
and the all-in-one demo. scikit-learn and skl2onnx are in the optional
``[demo]`` extra, so they are imported inside :func:`build_digits_sample`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

#: the fixed held-out split: 25 % of the data, stratified, seed 0
TEST_SIZE = 0.25
SPLIT_SEED = 0
LABELS = [str(i) for i in range(10)]


REPLAY_PER_CLASS = 60


def digits_manifest(version: str = "1.0.0") -> dict:
    """The manifest the sample ships with (model tensors included)."""
    return {
        "name": "digits",
        "version": version,
        "task": "classification",
        "description": "Handwritten digits 0-9 from 8x8 gray images (sklearn digits, MLP 64-32-10)",
        "publisher": "aidc samples",
        "model": {
            "file": "model.onnx",
            "inputs": [{"name": "input", "dtype": "float32", "shape": [None, 64]}],
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
        },
        "postprocess": {
            "output": "probabilities",
            "softmax": False,
            "top_k": 3,
            "labels_file": "labels.txt",
        },
        "resources": {"card_fraction": 0.25, "memory_mb": 64},
        # the last MatMul of the MLP (weights "coefficient1", bias "intercepts1")
        "learning": {
            "head": "MatMul1",
            "hard_examples": {"policy": "confidence", "threshold": 0.6},
            # training images kept for fine-tunes on site (no forgetting) and the gate
            "replay": "replay.npz",
        },
    }


def build_digits_sample(out_dir: Path, version: str = "1.0.0") -> Path:
    """Train, convert and write model.onnx, labels.txt, manifest.json,
    heldout.npz (``X_test`` float32 in 0..16, ``y_test`` int64) and replay.npz
    (``X``, ``y``: training images for fine-tunes on site) into ``out_dir``.

    Deterministic: the same inputs give the same model. Returns ``out_dir``.
    """
    import numpy as np
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=y
    )
    clf = MLPClassifier(hidden_layer_sizes=(32,), random_state=0, max_iter=1000)
    clf.fit(X_train, y_train)
    accuracy = float(clf.score(X_test, y_test))
    logger.info("digits sample: held-out accuracy %.3f on %d images", accuracy, len(y_test))

    onx = convert_sklearn(
        clf,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={id(clf): {"zipmap": False}},
        target_opset=17,
    )
    onx.graph.name = "digits_mlp"  # skl2onnx names the graph with a random uuid
    (out_dir / "model.onnx").write_bytes(onx.SerializeToString())
    (out_dir / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (out_dir / "manifest.json").write_text(json.dumps(digits_manifest(version), indent=2) + "\n")
    np.savez(out_dir / "heldout.npz", X_test=X_test.astype(np.float32),
             y_test=y_test.astype(np.int64))
    # the replay set: 60 training images per class, from the base distribution (a third
    # of it is the gate's replay check: 200 rows, so 2 points are 4 images)
    rng = np.random.default_rng(SPLIT_SEED)
    pick = np.concatenate([rng.choice(np.flatnonzero(y_train == c), REPLAY_PER_CLASS,
                                      replace=False) for c in range(10)])
    np.savez(out_dir / "replay.npz", X=X_train[pick].astype(np.float32),
             y=y_train[pick].astype(np.int64))
    return out_dir


def digit_png(sample, size: int = 32) -> bytes:
    """Render one 8x8 digit (values 0..16) as a ``size`` x ``size`` grey PNG,
    light ink on black as in the data set.

    Upscaled with nearest-neighbour, so the app's area resize back to 8x8
    recovers the pixels (up to the 0..16 -> 0..255 rounding).
    """
    import cv2
    import numpy as np

    img = np.round(np.asarray(sample, np.float32).reshape(8, 8) * (255 / 16)).astype(np.uint8)
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_NEAREST)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise ValueError("could not encode the digit as PNG")
    return buf.tobytes()
