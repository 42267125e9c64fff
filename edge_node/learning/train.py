"""Fine-tune the head: softmax regression in numpy, warm-started from the model.

The trainable part is the head alone, ``logits = feature @ W + b``; the
features come from the deployed model (:mod:`.features`) and stay fixed, so
training is a convex problem over (n_features + 1) x n_classes numbers, small
enough for one core in seconds and with no torch.

Objective, minimised by L-BFGS (numpy, deterministic, resumable)::

    J(W, b) = sum_i w_i * CE(softmax(f_i W + b), y_i)  +  l2/2 * s2 * ||W - W0||^2

- **Standardised features.** The optimiser works on ``z = (f - mean) / std``
  (over the training rows), so the problem is well conditioned whatever the
  feature scale; ``W = V / std`` and ``b = c - mean @ W`` map exactly back to
  the graph's ``W``, ``b`` (:meth:`HeadTrainer.weights`). ``s2`` is the mean
  feature variance, so ``l2`` means the same for any model, while the pull is
  isotropic in the graph's units: a rarely active feature (small std) does not
  get a cheap, huge weight, as it would with plain L2 on ``V``.
- **L2 toward the original weights** (``V0``), not toward zero: with 50-200
  labelled samples plain L2 would shrink the base model's well-trained head
  toward zero, losing what it knows about the classes the site samples do not
  show; a prior centred on the deployed head keeps the solution close to it
  unless the site data pays for the change. The bias is not penalised.
- **Replay.** Site samples and replay samples (from the base distribution) are
  two groups of total weight ``1 - replay_weight`` and ``replay_weight``, so
  the balance does not depend on how many replay rows the caller passes.
- **Class balance** (``class_weight="balanced"``, default): within each group
  every class present gets the same total weight. Labelled site samples are
  typically hard examples, skewed toward confusable classes; unweighted they
  would move the biases toward those classes, which the site's real class mix
  does not justify.
- **Early stopping**: a stratified ``val_fraction`` of each group (seeded) is
  held out; the weighted validation loss is tracked every iteration and the
  best iterate is kept; ``patience`` iterations without improvement stop it.
  With too few samples to hold out (fewer than 2 per validation set), it
  trains to convergence and relies on the L2 prior.

Every input array and the config go into :attr:`HeadTrainer.fingerprint`;
:meth:`HeadTrainer.state` / :meth:`HeadTrainer.restore` give the complete
optimiser state, so a run checkpointed after any iteration and restored ends
with exactly the weights of a run that never stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TrainConfig:
    #: 1: the head; 2: the head and the hidden layer before it; 0 (auto): the fine-tune
    #: job trains 2 when the model has such a layer, the site job trains both and
    #: keeps what the promotion gate prefers
    layers: int = 0
    l2: float = 1e-4              #: strength of the pull toward the original weights
    replay_weight: float = 0.5    #: share of the loss on replay samples (0 without replay)
    class_weight: str = "balanced"  #: "balanced" or "none"
    val_fraction: float = 0.0     #: held out of each group for early stopping (0: none)
    max_iter: int = 300           #: L-BFGS iterations at most
    patience: int = 10            #: iterations without a better validation loss before stopping
    min_delta: float = 1e-4       #: an improvement smaller than this does not count
    tol: float = 1e-7             #: gradient (max abs) / relative loss change for convergence
    history: int = 10             #: L-BFGS memory
    seed: int = 0                 #: the validation split

    def __post_init__(self) -> None:
        if self.layers not in (0, 1, 2):
            raise ValueError(f"layers: {self.layers}, use 1 (the head), 2 (the head and "
                             "the hidden layer before it) or 0 (auto)")
        if self.class_weight not in ("balanced", "none"):
            raise ValueError(f"class_weight: {self.class_weight!r}, use 'balanced' or 'none'")
        if not 0 <= self.replay_weight < 1:
            raise ValueError(f"replay_weight: {self.replay_weight} not in [0, 1)")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction: {self.val_fraction} not in [0, 1)")
        if self.l2 < 0 or self.max_iter < 0 or self.patience < 1 or self.history < 1:
            raise ValueError("l2 and max_iter must be >= 0, patience and history >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class TrainResult:
    W: np.ndarray                  #: (n_features, n_classes), the graph's orientation
    b: np.ndarray                  #: (n_classes,)
    iterations: int
    best_iteration: int
    stop_reason: str               #: "early stopping", "converged", "max_iter", "line search"
    loss: float                    #: training objective at the kept iterate
    val_loss: float | None
    metrics: dict[str, Any] = field(default_factory=dict)
    #: every trained layer's (W, b), first layer first; the head's is (W, b)
    layers: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def head_scores(F: np.ndarray, W: np.ndarray, b: np.ndarray, activation: str = "softmax"
                ) -> np.ndarray:
    """What the graph outputs for features ``F``: softmax(F W + b), or the logits."""
    logits = np.asarray(F, np.float64) @ W + b
    return softmax(logits) if activation == "softmax" else logits


def accuracy(F: np.ndarray, y: np.ndarray, W: np.ndarray, b: np.ndarray) -> float | None:
    if len(y) == 0:
        return None
    return float(((np.asarray(F, np.float64) @ W + b).argmax(axis=1) == y).mean())


def _split(y: np.ndarray, fraction: float, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train_idx, val_idx): floor(fraction * count) of each class to val."""
    if fraction <= 0 or len(y) == 0:
        return np.arange(len(y)), np.arange(0)
    train, val = [], []
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        idx = idx[rng.permutation(len(idx))]
        k = int(math.floor(fraction * len(idx)))
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _group_weights(y: np.ndarray, total: float, balanced: bool) -> np.ndarray:
    """Per-sample weights summing to ``total``; balanced: each class present equally."""
    if len(y) == 0:
        return np.zeros(0)
    if balanced:
        classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
        w = 1.0 / (len(classes) * counts[inverse])
    else:
        w = np.full(len(y), 1.0 / len(y))
    return w * total


def fingerprint(*parts: Any) -> str:
    """sha256 of arrays (dtype, shape, bytes) and JSON-able values."""
    h = hashlib.sha256()
    for p in parts:
        if p is None:
            h.update(b"none")
        elif isinstance(p, np.ndarray):
            a = np.ascontiguousarray(p)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True).encode())
    return h.hexdigest()


class _Data:
    """Site and replay rows of one training run: checked, split for validation,
    weighted (groups and class balance) and standardised over the training rows."""

    def __init__(self, F_site, y_site, F_replay, y_replay, d: int, k: int, cfg: TrainConfig,
                 center: bool) -> None:
        F_site = np.asarray(F_site, np.float32).reshape(len(F_site), d)
        y_site = np.asarray(y_site).astype(np.int64).reshape(-1)
        if F_replay is None or len(F_replay) == 0:
            F_replay, y_replay = np.zeros((0, d), np.float32), np.zeros(0, np.int64)
        F_replay = np.asarray(F_replay, np.float32).reshape(len(F_replay), d)
        y_replay = np.asarray(y_replay).astype(np.int64).reshape(-1)
        for name, F, y in (("site", F_site, y_site), ("replay", F_replay, y_replay)):
            if F.shape[1] != d or len(F) != len(y):
                raise ValueError(f"{name}: features {list(F.shape)} and labels {len(y)} do "
                                 f"not fit a layer of {d} inputs")
            if len(y) and (y.min() < 0 or y.max() >= k):
                raise ValueError(f"{name}: labels must be class indices in 0..{k - 1}")
        if len(y_site) == 0:
            raise ValueError("no labelled site samples")
        self.inputs = (F_site, y_site, F_replay, y_replay)

        rng = np.random.default_rng(cfg.seed)
        s_tr, s_va = _split(y_site, cfg.val_fraction, rng)
        r_tr, r_va = _split(y_replay, cfg.val_fraction, rng)
        share_replay = cfg.replay_weight if len(y_replay) else 0.0
        balanced = cfg.class_weight == "balanced"
        self.parts = {"site_train": (F_site[s_tr], y_site[s_tr]),
                      "site_val": (F_site[s_va], y_site[s_va]),
                      "replay_train": (F_replay[r_tr], y_replay[r_tr]),
                      "replay_val": (F_replay[r_va], y_replay[r_va])}

        def weights(ys, yr):
            return np.concatenate([_group_weights(ys, 1.0 - share_replay, balanced),
                                   _group_weights(yr, share_replay, balanced)])

        F_tr = np.concatenate([F_site[s_tr], F_replay[r_tr]]).astype(np.float64)
        self.mean = F_tr.mean(axis=0) if center else np.zeros(d)
        std = F_tr.std(axis=0)
        self.std = np.where(std > 1e-6 * max(1.0, float(std.max(initial=0.0))), std, 1.0)
        self.Z = (F_tr - self.mean) / self.std
        self.y = np.concatenate([y_site[s_tr], y_replay[r_tr]])
        self.w = weights(y_site[s_tr], y_replay[r_tr])
        # validation needs at least 2 site rows; with no site rows the replay alone
        # would pick the iterate closest to the base model
        self.has_val = len(s_va) >= 2
        if self.has_val:
            F_va = np.concatenate([F_site[s_va], F_replay[r_va]]).astype(np.float64)
            self.Zv = (F_va - self.mean) / self.std
            self.yv = np.concatenate([y_site[s_va], y_replay[r_va]])
            self.wv = weights(y_site[s_va], y_replay[r_va])
        # the pull toward the base weights is isotropic in the graph's own units,
        # scaled by the mean input variance so l2 means the same for any model: in
        # standardised terms each row is weighted by mean(std^2) / std_j^2 (a rarely
        # active input does not get a cheap, huge weight)
        var = self.std ** 2
        self.r = var.mean() / var


def _ce(L: np.ndarray, y: np.ndarray, w: np.ndarray, grad: bool
        ) -> tuple[float, np.ndarray | None]:
    """Weighted cross-entropy of logits ``L`` (modified in place) and its gradient."""
    L -= L.max(axis=1, keepdims=True)
    lse = np.log(np.exp(L).sum(axis=1))
    rows = np.arange(len(y))
    loss = float(np.dot(w, lse - L[rows, y]))
    if not grad:
        return loss, None
    P = np.exp(L - lse[:, None])
    P[rows, y] -= 1.0
    P *= w[:, None]
    return loss, P


class _LBFGS:
    """L-BFGS over a flat parameter vector, one iteration per :meth:`step`, with
    early stopping on a validation loss and a complete, resumable state.

    A subclass sets ``config``, ``data`` (:class:`_Data`), ``fingerprint`` and
    ``theta0`` and defines :meth:`_fg`, :meth:`_val_loss` and :meth:`_progress`;
    then calls :meth:`_start`.
    """

    config: TrainConfig
    data: _Data
    fingerprint: str
    theta0: np.ndarray

    def _fg(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        raise NotImplementedError

    def _val_loss(self, theta: np.ndarray) -> float | None:
        raise NotImplementedError

    def _progress(self) -> dict[str, Any]:
        raise NotImplementedError

    def _start(self) -> None:
        self.theta = self.theta0.copy()
        self.f, self.g = self._fg(self.theta)
        self.S: list[np.ndarray] = []
        self.Y: list[np.ndarray] = []
        self.iteration = 0
        self.stop_reason: str | None = None
        self.best_theta = self.theta.copy()
        self.best_iteration = 0
        self.best_val = self._val_loss(self.theta)
        self.bad = 0
        self.log: list[dict[str, Any]] = [self._progress()]
        if self.config.max_iter == 0:
            self.stop_reason = "max_iter"

    @property
    def parts(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return self.data.parts

    def _direction(self) -> np.ndarray:
        """L-BFGS two-loop recursion: -H g."""
        q = self.g.copy()
        alphas = []
        for s, y in zip(reversed(self.S), reversed(self.Y)):
            a = float(s @ q) / float(y @ s)
            alphas.append(a)
            q -= a * y
        if self.S:
            s, y = self.S[-1], self.Y[-1]
            q *= float(s @ y) / float(y @ y)
        else:
            q /= max(1.0, float(np.linalg.norm(self.g)))
        for (s, y), a in zip(zip(self.S, self.Y), reversed(alphas)):
            b = float(y @ q) / float(y @ s)
            q += (a - b) * s
        return -q

    # --- iterations -------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def step(self) -> dict[str, Any]:
        """One L-BFGS iteration (line search included); returns its progress record."""
        if self.done:
            return self.log[-1]
        cfg = self.config
        d = self._direction()
        gd = float(self.g @ d)
        if gd >= 0:  # not a descent direction: forget the curvature pairs
            self.S.clear()
            self.Y.clear()
            d = self._direction()
            gd = float(self.g @ d)
        t, f_old = 1.0, self.f
        for _ in range(40):
            theta = self.theta + t * d
            f, g = self._fg(theta)
            if f <= self.f + 1e-4 * t * gd:
                break
            t *= 0.5
        else:
            self.stop_reason = "line search"
            return self.log[-1]
        s, y = theta - self.theta, g - self.g
        if float(s @ y) > 1e-12 * float(y @ y):
            self.S.append(s)
            self.Y.append(y)
            if len(self.S) > cfg.history:
                self.S.pop(0)
                self.Y.pop(0)
        self.theta, self.f, self.g = theta, f, g
        self.iteration += 1

        val = self._val_loss(theta)
        if val is None:
            self.best_theta, self.best_iteration = theta.copy(), self.iteration
        elif val < self.best_val - cfg.min_delta:
            self.best_theta, self.best_iteration, self.best_val = theta.copy(), self.iteration, val
            self.bad = 0
        else:
            self.bad += 1
        if self.data.has_val and self.bad >= cfg.patience:
            self.stop_reason = "early stopping"
        elif float(np.abs(g).max()) < cfg.tol or abs(f_old - f) <= cfg.tol * max(1.0, abs(f)):
            self.stop_reason = "converged"
        elif self.iteration >= cfg.max_iter:
            self.stop_reason = "max_iter"
        self.log.append(self._progress())
        return self.log[-1]

    def run(self, on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
        while not self.done:
            rec = self.step()
            if on_step is not None:
                on_step(rec)
        return self.result()

    def result(self) -> TrainResult:
        raise NotImplementedError

    # --- checkpoint -------------------------------------------------------

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and JSON meta holding the whole optimiser state (for jobkit.save)."""
        p = len(self.theta)
        arrays = {"theta": self.theta, "best_theta": self.best_theta,
                  "S": np.array(self.S).reshape(-1, p), "Y": np.array(self.Y).reshape(-1, p)}
        meta = {"fingerprint": self.fingerprint, "iteration": self.iteration,
                "stop_reason": self.stop_reason, "best_iteration": self.best_iteration,
                "best_val": self.best_val, "bad": self.bad, "log": self.log}
        return arrays, meta

    def restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Continue from :meth:`state`; refuses a state made from other inputs."""
        if meta.get("fingerprint") != self.fingerprint:
            raise ValueError("the checkpoint was made from other inputs or settings")
        self.theta = np.array(arrays["theta"], np.float64)
        self.best_theta = np.array(arrays["best_theta"], np.float64)
        self.S = [np.array(r) for r in arrays["S"]]
        self.Y = [np.array(r) for r in arrays["Y"]]
        self.f, self.g = self._fg(self.theta)
        self.iteration = int(meta["iteration"])
        self.stop_reason = meta["stop_reason"]
        self.best_iteration = int(meta["best_iteration"])
        self.best_val = meta["best_val"]
        self.bad = int(meta["bad"])
        self.log = list(meta["log"])


class HeadTrainer(_LBFGS):
    """L-BFGS on the head, one iteration per :meth:`step`, resumable.

    ``W0`` (n_features, n_classes) and ``b0`` (n_classes,) are the deployed head
    (:func:`.head.read_head`); ``F_site``/``y_site`` the labelled site samples'
    features and class indices; ``F_replay``/``y_replay`` optional samples from
    the base distribution. ``fit_bias=False`` for a head without a bias (the
    bias stays 0 and features are scaled but not centred).
    """

    def __init__(self, W0: np.ndarray, b0: np.ndarray, F_site: np.ndarray, y_site: np.ndarray,
                 F_replay: np.ndarray | None = None, y_replay: np.ndarray | None = None,
                 config: TrainConfig | None = None, fit_bias: bool = True) -> None:
        cfg = config or TrainConfig()
        self.config = cfg
        W0 = np.asarray(W0, np.float64)
        b0 = np.asarray(b0, np.float64).reshape(-1)
        d, k = W0.shape
        self.n_features, self.n_classes, self.fit_bias = d, k, fit_bias
        self.data = data = _Data(F_site, y_site, F_replay, y_replay, d, k, cfg, fit_bias)
        self.fingerprint = fingerprint(W0, b0, *data.inputs, cfg.to_dict(), fit_bias)
        self.mean, self.std = data.mean, data.std
        self.V0 = self.std[:, None] * W0
        self.c0 = b0 + self.mean @ W0
        self.theta0 = self._pack(self.V0, self.c0)
        self._start()

    # --- parameters -------------------------------------------------------

    def _pack(self, V: np.ndarray, c: np.ndarray) -> np.ndarray:
        return np.concatenate([V.ravel(), c]) if self.fit_bias else V.ravel().copy()

    def _unpack(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d, k = self.n_features, self.n_classes
        V = theta[:d * k].reshape(d, k)
        c = theta[d * k:] if self.fit_bias else np.zeros(k)
        return V, c

    def weights(self, theta: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) in the graph's terms for ``theta`` (default: the best iterate)."""
        V, c = self._unpack(self.best_theta if theta is None else theta)
        W = V / self.std[:, None]
        b = c - self.mean @ W if self.fit_bias else np.zeros(self.n_classes)
        return W, b

    # --- objective --------------------------------------------------------

    def _fg(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        V, c = self._unpack(theta)
        data = self.data
        loss, P = _ce(data.Z @ V + c, data.y, data.w, grad=True)
        gV, gc = data.Z.T @ P, P.sum(axis=0)
        dV = V - self.V0
        rdV = data.r[:, None] * dV
        loss += 0.5 * self.config.l2 * float(np.sum(dV * rdV))
        gV = gV + self.config.l2 * rdV
        return loss, (np.concatenate([gV.ravel(), gc]) if self.fit_bias else gV.ravel())

    def _val_loss(self, theta: np.ndarray) -> float | None:
        data = self.data
        if not data.has_val:
            return None
        V, c = self._unpack(theta)
        return _ce(data.Zv @ V + c, data.yv, data.wv, grad=False)[0]

    def _progress(self) -> dict[str, Any]:
        W, b = self.weights(self.theta)
        rec = {"iteration": self.iteration, "loss": round(self.f, 6)}
        val = self._val_loss(self.theta)
        if val is not None:
            rec["val_loss"] = round(val, 6)
            acc = accuracy(*self.parts["site_val"], W, b)
            rec["site_val_accuracy"] = round(acc, 4)
        return rec

    # --- outcome ----------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """Accuracy of the original and the kept head on each split (site/replay,
        train/val). The val splits chose the iterate: an optimistic estimate; the
        promotion gate should judge on its own held-out set (:mod:`.evaluate`)."""
        W0, b0 = self.weights(self.theta0)
        W, b = self.weights()
        out: dict[str, Any] = {}
        for name, (F, y) in self.parts.items():
            out[name] = {"n": int(len(y)), "accuracy_before": accuracy(F, y, W0, b0),
                         "accuracy_after": accuracy(F, y, W, b)}
        out["weight_change"] = float(np.linalg.norm(W - W0) / max(np.linalg.norm(W0), 1e-12))
        return out

    def result(self) -> TrainResult:
        W, b = self.weights()
        return TrainResult(W=W, b=b, iterations=self.iteration,
                           best_iteration=self.best_iteration,
                           stop_reason=self.stop_reason or "not finished",
                           loss=self._fg(self.best_theta)[0],
                           val_loss=self._val_loss(self.best_theta), metrics=self.metrics(),
                           layers=[(W, b)])


def _act(name: str, A: np.ndarray) -> np.ndarray:
    if name == "relu":
        return np.maximum(A, 0.0)
    if name == "tanh":
        return np.tanh(A)
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-A))
    raise ValueError(f"activation {name!r}: use relu, tanh or sigmoid")


def _act_grad(name: str, A: np.ndarray, H: np.ndarray) -> np.ndarray:
    """d act(A) / dA, from A and H = act(A)."""
    if name == "relu":
        return (A > 0).astype(A.dtype)
    if name == "tanh":
        return 1.0 - H * H
    return H * (1.0 - H)


def mlp_logits(X: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray]],
               activation: str) -> np.ndarray:
    """Logits of a hidden layer (``activation``) and a head: ``layers`` =
    ``[(W1, b1), (W2, b2)]`` in the graph's terms (a single ``[(W, b)]``: the head)."""
    H = np.asarray(X, np.float64)
    for i, (W, b) in enumerate(layers):
        H = H @ W + b
        if i < len(layers) - 1:
            H = _act(activation, H)
    return H


class DeepTrainer(_LBFGS):
    """The head and the hidden layer before it, trained together by
    backpropagation (L-BFGS, numpy), resumable like :class:`HeadTrainer`.

    ``layers0`` = ``[(W1, b1), (W2, b2)]``: the deployed hidden layer
    (n_inputs, n_hidden) with its ``activation`` (relu, tanh, sigmoid) and the
    head (n_hidden, n_classes), in the graph's terms; ``X_site``/``X_replay`` are
    the hidden layer's inputs (:class:`.features.FeatureExtractor` on the body
    layer). The hidden layer's inputs are standardised as the head trainer's
    features are; the L2 pull toward the deployed weights is isotropic in the
    graph's units for each layer, scaled by the mean variance of that layer's
    inputs (the inputs for ``W1``, the deployed hidden activations for ``W2``),
    so ``l2`` means what it means for the head alone. Biases are not pulled.
    """

    def __init__(self, layers0: list[tuple[np.ndarray, np.ndarray]], activation: str,
                 X_site: np.ndarray, y_site: np.ndarray,
                 X_replay: np.ndarray | None = None, y_replay: np.ndarray | None = None,
                 config: TrainConfig | None = None) -> None:
        cfg = config or TrainConfig()
        self.config = cfg
        (W1, b1), (W2, b2) = [(np.asarray(W, np.float64), np.asarray(b, np.float64).reshape(-1))
                              for W, b in layers0]
        d, h = W1.shape
        k = W2.shape[1]
        if W2.shape[0] != h or b1.shape != (h,) or b2.shape != (k,):
            raise ValueError(f"layers do not chain: W1 {list(W1.shape)}, b1 {list(b1.shape)}, "
                             f"W2 {list(W2.shape)}, b2 {list(b2.shape)}")
        _act(activation, np.zeros(1))
        self.activation = activation
        self.shape = (d, h, k)
        self.data = data = _Data(X_site, y_site, X_replay, y_replay, d, k, cfg, True)
        self.fingerprint = fingerprint(W1, b1, W2, b2, activation, *data.inputs,
                                       cfg.to_dict(), "deep")
        self.mean, self.std = data.mean, data.std
        V1 = self.std[:, None] * W1
        c1 = b1 + self.mean @ W1
        H0 = _act(activation, data.Z @ V1 + c1)
        self.r2 = float(H0.var(axis=0).mean()) or 1.0
        self.theta0 = np.concatenate([V1.ravel(), c1, W2.ravel(), b2])
        self._start()

    def _unpack(self, theta: np.ndarray):
        d, h, k = self.shape
        i = d * h
        V1 = theta[:i].reshape(d, h)
        c1 = theta[i:i + h]
        W2 = theta[i + h:i + h + h * k].reshape(h, k)
        b2 = theta[i + h + h * k:]
        return V1, c1, W2, b2

    def weights(self, theta: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(W1, b1), (W2, b2)]`` in the graph's terms (default: the best iterate)."""
        V1, c1, W2, b2 = self._unpack(self.best_theta if theta is None else theta)
        W1 = V1 / self.std[:, None]
        return [(W1, c1 - self.mean @ W1), (W2.copy(), b2.copy())]

    def _forward(self, Z: np.ndarray, theta: np.ndarray):
        V1, c1, W2, b2 = self._unpack(theta)
        A = Z @ V1 + c1
        H = _act(self.activation, A)
        return A, H, H @ W2 + b2

    def _fg(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        data, l2 = self.data, self.config.l2
        V1, _, W2, _ = self._unpack(theta)
        V10, _, W20, _ = self._unpack(self.theta0)
        A, H, L = self._forward(data.Z, theta)
        loss, P = _ce(L, data.y, data.w, grad=True)
        gW2, gb2 = H.T @ P, P.sum(axis=0)
        dA = (P @ W2.T) * _act_grad(self.activation, A, H)
        gV1, gc1 = data.Z.T @ dA, dA.sum(axis=0)
        dV1, dW2 = V1 - V10, W2 - W20
        rdV1 = data.r[:, None] * dV1
        loss += 0.5 * l2 * (float(np.sum(dV1 * rdV1)) + self.r2 * float(np.sum(dW2 * dW2)))
        gV1 = gV1 + l2 * rdV1
        gW2 = gW2 + l2 * self.r2 * dW2
        return loss, np.concatenate([gV1.ravel(), gc1, gW2.ravel(), gb2])

    def _val_loss(self, theta: np.ndarray) -> float | None:
        data = self.data
        if not data.has_val:
            return None
        return _ce(self._forward(data.Zv, theta)[2], data.yv, data.wv, grad=False)[0]

    def _accuracy(self, X: np.ndarray, y: np.ndarray, theta: np.ndarray) -> float | None:
        if len(y) == 0:
            return None
        Z = (np.asarray(X, np.float64) - self.mean) / self.std
        return float((self._forward(Z, theta)[2].argmax(axis=1) == y).mean())

    def _progress(self) -> dict[str, Any]:
        rec = {"iteration": self.iteration, "loss": round(self.f, 6)}
        val = self._val_loss(self.theta)
        if val is not None:
            rec["val_loss"] = round(val, 6)
            rec["site_val_accuracy"] = round(
                self._accuracy(*self.parts["site_val"], self.theta), 4)
        return rec

    def metrics(self) -> dict[str, Any]:
        """As :meth:`HeadTrainer.metrics`; ``weight_change`` per layer (hidden, head)."""
        out: dict[str, Any] = {}
        for name, (X, y) in self.parts.items():
            out[name] = {"n": int(len(y)),
                         "accuracy_before": self._accuracy(X, y, self.theta0),
                         "accuracy_after": self._accuracy(X, y, self.best_theta)}
        before, after = self.weights(self.theta0), self.weights()
        changes = [float(np.linalg.norm(W - W0) / max(np.linalg.norm(W0), 1e-12))
                   for (W, _), (W0, _) in zip(after, before)]
        out["weight_change"] = changes[-1]
        out["hidden_weight_change"] = changes[0]
        return out

    def result(self) -> TrainResult:
        layers = self.weights()
        W, b = layers[-1]
        return TrainResult(W=W, b=b, iterations=self.iteration,
                           best_iteration=self.best_iteration,
                           stop_reason=self.stop_reason or "not finished",
                           loss=self._fg(self.best_theta)[0],
                           val_loss=self._val_loss(self.best_theta), metrics=self.metrics(),
                           layers=layers)


def fine_tune(W0: np.ndarray, b0: np.ndarray, F_site: np.ndarray, y_site: np.ndarray,
              F_replay: np.ndarray | None = None, y_replay: np.ndarray | None = None,
              config: TrainConfig | None = None, fit_bias: bool = True,
              on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train the head to the end in one call (no checkpoints): :class:`HeadTrainer`."""
    return HeadTrainer(W0, b0, F_site, y_site, F_replay, y_replay, config,
                       fit_bias).run(on_step)
