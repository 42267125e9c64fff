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


def test_training_the_hidden_layer_too_recovers_what_the_head_alone_cannot(site, tmp_path):
    """Contrast inversion moves the digits far in the hidden layer's feature space:
    the head alone cannot follow, the head and the hidden layer trained together by
    backpropagation can. Same 200 inverted samples + replay for both; the gradient
    is checked against finite differences; the exported two-layer model is scored
    by ORT."""
    from edge_node.learning.export import export_layers
    from edge_node.learning.head import find_body
    from edge_node.learning.train import DeepTrainer

    head = site["head"]
    body = find_body(site["model"], head)
    fx1 = FeatureExtractor(site["model"], body)
    X_held, y_held = load_test_split(site["app"])
    inv = lambda X: 16.0 - X  # noqa: E731
    site_X, site_y = inv(X_held[:200]), y_held[:200]
    ev_shift, ev_orig = (inv(X_held[200:]), y_held[200:]), (X_held[200:], y_held[200:])
    layers0 = [read_head(site["model"], body), read_head(site["model"], head)]

    deep = DeepTrainer(layers0, "relu", fx1(site_X), site_y, fx1(site["replay_X"]),
                       site["replay_y"], TrainConfig())
    rng = np.random.default_rng(0)
    theta = deep.theta0 + rng.normal(0, 0.01, deep.theta0.shape)
    _, g = deep._fg(theta)
    for i in rng.choice(len(theta), 8, replace=False):
        e = np.zeros_like(theta)
        e[i] = 1e-6
        numeric = (deep._fg(theta + e)[0] - deep._fg(theta - e)[0]) / 2e-6
        assert abs(numeric - g[i]) <= 1e-6 + 1e-4 * abs(g[i])
    res = deep.run()
    assert [W.shape for W, _ in res.layers] == [(64, 32), (32, 10)]
    out_deep = tmp_path / "deep.onnx"
    export_layers(site["model"], [(body, *res.layers[0]), (head, *res.layers[1])], out_deep,
                  site_X[:32])

    fx = site["fx"]
    one = fine_tune(*layers0[1], fx(site_X), site_y, fx(site["replay_X"]), site["replay_y"])
    out_head = tmp_path / "head.onnx"
    export_head(site["model"], head, one.W, one.b, out_head, site_X[:32])

    acc = {name: {k: evaluate_app(site["app"], *ev, model=m).accuracy
                  for k, ev in (("shift", ev_shift), ("orig", ev_orig))}
           for name, m in (("base", None), ("head", out_head), ("deep", out_deep))}
    assert acc["base"]["shift"] < 0.2                          # inversion breaks the model
    assert acc["deep"]["shift"] > acc["head"]["shift"] + 0.1   # the hidden layer learns it
    assert acc["deep"]["shift"] > 0.8
    assert acc["deep"]["orig"] >= acc["base"]["orig"] - 0.05   # without forgetting

    # stopped after any iteration and restored: the same weights as a run never stopped
    args = (layers0, "relu", fx1(site_X[:80]), site_y[:80], fx1(site["replay_X"]),
            site["replay_y"], TrainConfig(max_iter=40))
    ref = DeepTrainer(*args).run()
    first = DeepTrainer(*args)
    for _ in range(17):
        first.step()
    second = DeepTrainer(*args)
    second.restore(*first.state())
    again = second.run()
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(again.layers, ref.layers))
