"""Fine-tuning the digits app's head on a site shift (blurred camera), end to end on
real data: ORT features -> numpy L-BFGS -> exported ONNX -> ORT evaluation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from appstore.samples.digits import SPLIT_SEED, TEST_SIZE
from edge_node.learning.evaluate import evaluate_app
from edge_node.learning.export import export_head
from edge_node.learning.features import FeatureExtractor
from edge_node.learning.head import find_app_head, read_head
from edge_node.learning.train import HeadTrainer, TrainConfig, fine_tune
from tests.models import build_digits_app_dir, load_test_split


def blur(X: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """A defocused site camera: Gaussian blur of the 8x8 images (values stay 0..16)."""
    imgs = np.asarray(X, np.float32).reshape(-1, 8, 8)
    return np.stack([cv2.GaussianBlur(i, (0, 0), sigma, borderType=cv2.BORDER_CONSTANT)
                     for i in imgs]).reshape(-1, 64)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The digits app; its held-out half split into a labelled site pool and an
    evaluation set, both blurred; replay = the base model's own training images."""
    app = build_digits_app_dir(tmp_path_factory.mktemp("digits"))
    X, y = load_digits(return_X_y=True)
    X_train, _, y_train, _ = train_test_split(X.astype(np.float32), y, test_size=TEST_SIZE,
                                              random_state=SPLIT_SEED, stratify=y)
    X_held, y_held = load_test_split(app)
    pool, ev = slice(0, 225), slice(225, None)
    head, model_path, _ = find_app_head(app)
    fx = FeatureExtractor(model_path, head)
    return {
        "app": app, "head": head, "model": model_path, "fx": fx,
        "site_X": blur(X_held[pool]), "site_y": y_held[pool],
        "replay_X": X_train[:400], "replay_y": y_train[:400],
        "eval_shift": (blur(X_held[ev]), y_held[ev]), "eval_orig": (X_held[ev], y_held[ev]),
    }


def test_fine_tune_recovers_the_shift_and_keeps_the_original(site, tmp_path):
    """200 labelled blurred samples + replay: the exported model is clearly better on
    blurred digits and stays close on the original ones (loose, seed-fixed bounds)."""
    head, fx = site["head"], site["fx"]
    W0, b0 = read_head(site["model"], head)
    n = 200
    res = fine_tune(W0, b0, fx(site["site_X"][:n]), site["site_y"][:n],
                    fx(site["replay_X"]), site["replay_y"], TrainConfig(seed=0))
    assert res.stop_reason in ("converged", "max_iter") and res.best_iteration == res.iterations
    out = tmp_path / "model.onnx"
    report = export_head(site["model"], head, res.W, res.b, out, site["site_X"][:32])
    assert report["max_abs_diff"] < 1e-5

    base_shift = evaluate_app(site["app"], *site["eval_shift"]).accuracy
    base_orig = evaluate_app(site["app"], *site["eval_orig"]).accuracy
    new_shift = evaluate_app(site["app"], *site["eval_shift"], model=out).accuracy
    new_orig = evaluate_app(site["app"], *site["eval_orig"], model=out).accuracy
    assert base_shift < base_orig - 0.15            # the shift hurts...
    assert new_shift > base_shift + 0.10            # ...fine-tuning wins much of it back
    assert new_orig >= base_orig - 0.05             # ...without forgetting the original
    # the metrics the job reports come from the same run
    site_train = res.metrics["site_train"]
    assert site_train["n"] == n and res.metrics["site_val"]["n"] == 0  # no split by default
    assert site_train["accuracy_after"] > site_train["accuracy_before"] + 0.1


def test_stopped_and_restored_trainer_ends_with_identical_weights(site):
    """state() after any iteration + restore() into a fresh trainer = the same
    weights, bit for bit, as an uninterrupted run (early stopping on, so the best
    iterate and the patience count travel too); other inputs are refused."""
    fx, head = site["fx"], site["head"]
    W0, b0 = read_head(site["model"], head)
    args = (W0, b0, fx(site["site_X"][:100]), site["site_y"][:100],
            fx(site["replay_X"]), site["replay_y"], TrainConfig(seed=3, val_fraction=0.2))
    ref = HeadTrainer(*args).run()
    assert ref.stop_reason == "early stopping" and ref.best_iteration < ref.iterations

    first = HeadTrainer(*args)
    stop_at = ref.best_iteration + 2  # after the best iterate, while patience runs
    for _ in range(stop_at):
        first.step()
    arrays, meta = first.state()
    second = HeadTrainer(*args)
    second.restore({k: v.copy() for k, v in arrays.items()}, meta)
    assert second.iteration == stop_at and second.bad == 2
    res = second.run()
    assert res.iterations == ref.iterations and res.best_iteration == ref.best_iteration
    assert np.array_equal(res.W, ref.W) and np.array_equal(res.b, ref.b)

    other = HeadTrainer(*args[:-1], TrainConfig(seed=4, val_fraction=0.2))
    with pytest.raises(ValueError, match="other inputs"):
        other.restore(arrays, meta)


def test_bad_labels_and_configs_are_refused(site):
    fx, head = site["fx"], site["head"]
    W0, b0 = read_head(site["model"], head)
    F = fx(site["site_X"][:10])
    with pytest.raises(ValueError, match="class indices in 0..9"):
        HeadTrainer(W0, b0, F, np.full(10, 10))
    with pytest.raises(ValueError, match="no labelled site samples"):
        HeadTrainer(W0, b0, F[:0], np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="class_weight"):
        TrainConfig(class_weight="auto")
