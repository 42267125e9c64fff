"""Learn while using (issue 4): the head fine-tune on a simulated site shift.

Real data: sklearn's 8x8 digits (values 0..16). Split once (seed 0, stratified):
50 % train the base model (an MLP 64-32-10 built as appstore/samples/digits.py
does, converted with skl2onnx), 25 % are the *site pool* (where labelled site
samples come from), 25 % the *held-out* set (only ever used to report). Each
simulated site sees a distortion of the images (numpy/OpenCV on the 8x8 images,
values kept in 0..16):

- ``blur``: Gaussian blur, sigma 1 px (a defocused camera)
- ``invert``: 16 - x (contrast inversion: dark ink on a light background)
- ``rotate15`` / ``rotate30``: rotation by 15 / 30 degrees about the centre
  (bilinear, zero border; a tilted camera)

For each shift, size n in 50/100/200 and seed: n labelled shifted samples drawn
from the site pool + 500 replay samples from the base training set go through
the library path of the fine-tune job (find the head, ORT features, numpy
L-BFGS, export + validation) **in a child process pinned to one core**
(sched_setaffinity, one ORT and BLAS thread); its wall time and peak memory
(tracemalloc peak and the RSS high-water mark over the RSS before) are taken
there. The exported model is then scored by ONNX Runtime on the shifted and
the original held-out set: recovered = (acc_ft - acc_base_shifted) /
(acc_base_original - acc_base_shifted).

Also: *cloud retraining* (the head retrained on 200 samples from each of three
sites -- blur, invert, rotate30 -- pooled, + replay, scored on each site and the
original); two *references* that are not the node's method: the head ceiling
(the head fine-tuned on all 898 training images shifted, i.e. what the frozen
features allow at best) and the whole MLP retrained by sklearn on the shifted +
original training images (what more than the head buys); the real job module
end to end under ``taskset`` (process start and imports included); and a
settings sweep on a *dev* split carved from the site pool (never the
held-out) that justifies the defaults.

    .venv/bin/python bench/learning.py [--seeds 5] [--quick]

Tables to stdout and bench/out/learning-<stamp>.md/.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"
WORK = OUT / "learning"
SHIFTS = ("blur", "invert", "rotate15", "rotate30")
CLOUD_SITES = ("blur", "invert", "rotate30")
SIZES = (50, 100, 200)
N_REPLAY = 500
#: 1 = the head alone (the method of the previous version, the reference);
#: 2 = the head and the hidden layer before it (backpropagation)
LAYERS = (1, 2)


# --- the site shifts ----------------------------------------------------------


def _per_image(X: np.ndarray, fn) -> np.ndarray:
    imgs = np.asarray(X, np.float32).reshape(-1, 8, 8)
    return np.clip(np.stack([fn(i) for i in imgs]), 0, 16).reshape(-1, 64).astype(np.float32)


def blur(X: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    import cv2

    return _per_image(X, lambda i: cv2.GaussianBlur(i, (0, 0), sigma,
                                                    borderType=cv2.BORDER_CONSTANT))


def invert(X: np.ndarray) -> np.ndarray:
    return (16.0 - np.asarray(X, np.float32)).astype(np.float32)


def rotate(X: np.ndarray, degrees: float) -> np.ndarray:
    import cv2

    M = cv2.getRotationMatrix2D((3.5, 3.5), degrees, 1.0)
    return _per_image(X, lambda i: cv2.warpAffine(i, M, (8, 8), flags=cv2.INTER_LINEAR,
                                                  borderMode=cv2.BORDER_CONSTANT))


def shift(name: str, X: np.ndarray) -> np.ndarray:
    if name == "none":
        return np.asarray(X, np.float32)
    if name == "blur":
        return blur(X, 1.0)
    if name == "invert":
        return invert(X)
    if name.startswith("rotate"):
        return rotate(X, float(name[len("rotate"):]))
    raise ValueError(f"unknown shift {name!r}")


# --- data and the base model ------------------------------------------------


def split() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    X_tr, X_rest, y_tr, y_rest = train_test_split(X, y, test_size=0.5, random_state=0,
                                                  stratify=y)
    X_pool, X_ho, y_pool, y_ho = train_test_split(X_rest, y_rest, test_size=0.5,
                                                  random_state=0, stratify=y_rest)
    return {"X_train": X_tr, "y_train": y_tr, "X_pool": X_pool, "y_pool": y_pool,
            "X_held": X_ho, "y_held": y_ho}


def build_base_app(X_train: np.ndarray, y_train: np.ndarray, out_dir: Path) -> Path:
    """The digits app as appstore/samples/digits.py builds it, trained on ``X_train``."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.neural_network import MLPClassifier

    from appstore.samples.digits import LABELS, digits_manifest

    out_dir.mkdir(parents=True, exist_ok=True)
    clf = MLPClassifier(hidden_layer_sizes=(32,), random_state=0, max_iter=1000)
    clf.fit(X_train, y_train)
    onx = convert_sklearn(clf, initial_types=[("input", FloatTensorType([None, 64]))],
                          options={id(clf): {"zipmap": False}}, target_opset=17)
    onx.graph.name = "digits_mlp"
    (out_dir / "model.onnx").write_bytes(onx.SerializeToString())
    (out_dir / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (out_dir / "manifest.json").write_text(json.dumps(digits_manifest("1.0.0"), indent=2))
    return out_dir


def draw(rng: np.random.Generator, n_items: int, n: int) -> np.ndarray:
    return np.sort(rng.choice(n_items, size=n, replace=False))


# --- one fine-tune in a pinned child process ------------------------------------


def child_main(spec_path: Path) -> int:
    """Runs in the child: pinned, one thread; times the library path of the job."""
    spec = json.loads(spec_path.read_text())
    os.sched_setaffinity(0, {spec["core"]})
    import tracemalloc

    import onnx  # noqa: F401 - imported before the clock and the memory baseline
    import onnxruntime  # noqa: F401

    from edge_node.learning.export import export_layers
    from edge_node.learning.features import FeatureExtractor
    from edge_node.learning.head import find_app_head, find_layers, read_head
    from edge_node.learning.train import DeepTrainer, HeadTrainer, TrainConfig

    with np.load(spec["samples"]) as z:
        X_s, y_s = z["X"], z["y"]
    with np.load(spec["replay"]) as z:
        X_r, y_r = z["X"], z["y"]
    config = TrainConfig(**spec.get("config", {}))

    def once(out: Path) -> dict:
        t0 = time.perf_counter()
        head, model_path, _ = find_app_head(Path(spec["app"]))
        layers, _ = find_layers(model_path, head, config.layers or 2)
        fx = FeatureExtractor(model_path, layers[0], threads=1)
        F_s, F_r = fx(X_s), fx(X_r)
        t1 = time.perf_counter()
        params = [read_head(model_path, layer) for layer in layers]
        if len(layers) == 1:
            result = HeadTrainer(*params[0], F_s, y_s, F_r, y_r, config).run()
        else:
            result = DeepTrainer(params, layers[0].activation, F_s, y_s, F_r, y_r,
                                 config).run()
        t2 = time.perf_counter()
        report = export_layers(model_path, [(layer, W, b) for layer, (W, b)
                                            in zip(layers, result.layers)], out, X_s[:64], 1)
        t3 = time.perf_counter()
        return {"wall_s": t3 - t0, "features_s": t1 - t0, "train_s": t2 - t1,
                "export_s": t3 - t2, "iterations": result.iterations,
                "stop_reason": result.stop_reason, "max_abs_diff": report["max_abs_diff"]}

    # pass 1: timed, and the process's RSS high-water mark over its RSS before
    rss0 = _status_kb("VmRSS")
    rec = once(Path(spec["out"]))
    rec["rss_delta_mb"] = max(0, _status_kb("VmHWM") - rss0) / 1024
    # pass 2 (same work, not timed: tracemalloc slows numpy's small allocations)
    tracemalloc.start()
    once(Path(spec["out"]).with_suffix(".again.onnx"))
    rec["tracemalloc_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    Path(spec["out"]).with_suffix(".again.onnx").unlink()
    rec["cpus"] = sorted(os.sched_getaffinity(0))
    print(json.dumps(rec))
    return 0


def _status_kb(key: str) -> int:
    """VmRSS / VmHWM of this process from /proc (per address space: unlike ru_maxrss,
    not inherited from the parent across fork + exec)."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_child(spec: dict, tmp: Path) -> dict:
    spec_path = tmp / "spec.json"
    spec_path.write_text(json.dumps(spec))
    out = subprocess.run([sys.executable, __file__, "--child", str(spec_path)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, **ONE_THREAD})
    if out.returncode != 0:
        raise RuntimeError(f"fine-tune child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the benchmark --------------------------------------------------------------


def stat(values) -> tuple[float, float, float]:
    v = [x for x in values if x is not None]
    if not v:
        return (float("nan"),) * 3
    return float(np.median(v)), float(min(v)), float(max(v))


def fmt(s: tuple[float, float, float], nd: int = 1, scale: float = 1.0) -> str:
    med, lo, hi = (x * scale for x in s)
    if np.isnan(med):
        return "—"
    if abs(hi - lo) < 10 ** -nd / 2:
        return f"{med:.{nd}f}"
    return f"{med:.{nd}f} ({lo:.{nd}f}–{hi:.{nd}f})"


def pick_core() -> int:
    cores = sorted(os.sched_getaffinity(0))
    return cores[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 seeds, no sweep, n=200 only")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child)

    from edge_node.learning.evaluate import evaluate_app
    from edge_node.learning.features import FeatureExtractor
    from edge_node.learning.head import find_app_head, read_head
    from edge_node.learning.train import TrainConfig, accuracy, fine_tune

    t_start = time.time()
    seeds = list(range(2 if args.quick else args.seeds))
    sizes = (200,) if args.quick else SIZES
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = WORK / "tmp"
    tmp.mkdir(exist_ok=True)
    d = split()
    app = build_base_app(d["X_train"], d["y_train"], WORK / "app")
    head, model_path, _ = find_app_head(app)
    core = pick_core()

    held = {s: shift(s, d["X_held"]) for s in ("none",) + SHIFTS}
    pool = {s: shift(s, d["X_pool"]) for s in SHIFTS}

    def acc(model: Path | None, name: str) -> float:
        return evaluate_app(app, held[name], d["y_held"], model=model).accuracy

    base = {s: acc(None, s) for s in ("none",) + SHIFTS}
    results: dict = {"base": base, "fine_tune": [], "cloud": [], "machine": machine(),
                     "split": {k: int(len(v)) for k, v in d.items() if k.startswith("y_")}}
    print(f"base model: original held-out {base['none']:.3f}; "
          + ", ".join(f"{s} {base[s]:.3f}" for s in SHIFTS), flush=True)

    def replay_file(seed: int) -> Path:
        rng = np.random.default_rng(10_000 + seed)
        idx = draw(rng, len(d["y_train"]), N_REPLAY)
        path = tmp / f"replay-{seed}.npz"
        np.savez(path, X=d["X_train"][idx], y=d["y_train"][idx])
        return path

    # 1. on-site fine-tunes
    for s in SHIFTS:
        for n in sizes:
            for seed in seeds:
                rng = np.random.default_rng(seed)
                idx = draw(rng, len(d["y_pool"]), n)
                samples = tmp / "samples.npz"
                np.savez(samples, X=pool[s][idx], y=d["y_pool"][idx])
                for depth in LAYERS:
                    model_out = tmp / f"ft-{s}-{n}-{seed}-{depth}.onnx"
                    r = run_child({"core": core, "app": str(app), "samples": str(samples),
                                   "replay": str(replay_file(seed)), "out": str(model_out),
                                   "config": {"seed": seed, "layers": depth}}, tmp)
                    r.update(shift=s, n=n, seed=seed, layers=depth,
                             acc_shift=acc(model_out, s), acc_orig=acc(model_out, "none"))
                    r["recovered"] = (r["acc_shift"] - base[s]) / (base["none"] - base[s])
                    results["fine_tune"].append(r)
                    model_out.unlink()
            for depth in LAYERS:
                rows = [r for r in results["fine_tune"]
                        if r["shift"] == s and r["n"] == n and r["layers"] == depth]
                print(f"{s:9s} n={n:3d} layers={depth}: shifted "
                      f"{fmt(stat(r['acc_shift'] for r in rows), 3)}"
                      f" original {fmt(stat(r['acc_orig'] for r in rows), 3)}"
                      f" recovered {fmt(stat(r['recovered'] for r in rows), 2)}"
                      f" wall {fmt(stat(r['wall_s'] for r in rows), 3)} s", flush=True)

    # 2. cloud retraining: 200 samples from each of three sites, pooled
    for seed in seeds:
        rng = np.random.default_rng(seed)
        Xs, ys = [], []
        for s in CLOUD_SITES:
            idx = draw(rng, len(d["y_pool"]), 200)
            Xs.append(pool[s][idx])
            ys.append(d["y_pool"][idx])
        samples = tmp / "samples.npz"
        np.savez(samples, X=np.concatenate(Xs), y=np.concatenate(ys))
        for depth in LAYERS:
            model_out = tmp / f"cloud-{seed}-{depth}.onnx"
            r = run_child({"core": core, "app": str(app), "samples": str(samples),
                           "replay": str(replay_file(seed)), "out": str(model_out),
                           "config": {"seed": seed, "layers": depth}}, tmp)
            r.update(seed=seed, layers=depth,
                     acc={s: acc(model_out, s) for s in ("none",) + CLOUD_SITES})
            r["recovered"] = {s: (r["acc"][s] - base[s]) / (base["none"] - base[s])
                              for s in CLOUD_SITES}
            results["cloud"].append(r)
            model_out.unlink()
    for depth in LAYERS:
        print(f"cloud layers={depth}: " + ", ".join(
            f"{s} {fmt(stat(r['acc'][s] for r in results['cloud'] if r['layers'] == depth), 3)}"
            for s in ("none",) + CLOUD_SITES), flush=True)

    # 3. references: the head ceiling and the whole network retrained
    fx = FeatureExtractor(model_path, head)
    W0, b0 = read_head(model_path, head)
    F_train = fx(d["X_train"])
    F_held = {s: fx(held[s]) for s in ("none",) + SHIFTS}
    ceiling = {}
    for s in SHIFTS:
        F_shift_train = fx(shift(s, d["X_train"]))
        alone = fine_tune(W0, b0, F_shift_train, d["y_train"],
                          config=TrainConfig(val_fraction=0.0, max_iter=1000))
        joint = fine_tune(W0, b0, F_shift_train, d["y_train"], F_train, d["y_train"],
                          TrainConfig(val_fraction=0.0, max_iter=1000))
        ceiling[s] = {
            "alone_shift": accuracy(F_held[s], d["y_held"], alone.W, alone.b),
            "alone_orig": accuracy(F_held["none"], d["y_held"], alone.W, alone.b),
            "joint_shift": accuracy(F_held[s], d["y_held"], joint.W, joint.b),
            "joint_orig": accuracy(F_held["none"], d["y_held"], joint.W, joint.b),
        }
    results["ceiling"] = ceiling
    results["retrain"] = retrain_whole(d, held)
    print("ceiling: " + json.dumps({s: {k: round(v, 3) for k, v in c.items()}
                                    for s, c in ceiling.items()}), flush=True)

    # 4. the real job end to end, pinned (process start, imports, features, train, export)
    results["job"] = run_job_end_to_end(app, pool, d, core, tmp, replay_file(0))

    # 5. the settings sweep on the dev split (site pool only)
    if not args.quick:
        results["sweep"] = sweep(d, pool, fx, W0, b0, F_train, seeds[:3])
        results["sweep2"] = sweep_deep(d, pool, app, seeds[:3])

    results["machine"]["wall_s"] = time.time() - t_start
    stamp = time.strftime("%Y%m%d-%H%M%S")
    md = report(results)
    (OUT / f"learning-{stamp}.json").write_text(json.dumps(results, indent=1, default=float))
    (OUT / f"learning-{stamp}.md").write_text(md)
    print()
    print(md)
    return 0


def retrain_whole(d: dict, held: dict) -> dict:
    """Reference beyond the head: the whole MLP retrained by sklearn on the training
    images, original + shifted (what the cloud could do with a full training run)."""
    from sklearn.neural_network import MLPClassifier

    out = {}
    for s in SHIFTS:
        X = np.concatenate([d["X_train"], shift(s, d["X_train"])])
        y = np.concatenate([d["y_train"], d["y_train"]])
        clf = MLPClassifier(hidden_layer_sizes=(32,), random_state=0, max_iter=1000).fit(X, y)
        out[s] = {"shift": float(clf.score(held[s], d["y_held"])),
                  "orig": float(clf.score(held["none"], d["y_held"]))}
    return out


def run_job_end_to_end(app: Path, pool: dict, d: dict, core: int, tmp: Path,
                       replay: Path) -> dict:
    """``python -m edge_node.learning.finetune_job`` under taskset, as the scheduler
    would start it on one core: wall time and the process's peak RSS."""
    rng = np.random.default_rng(0)
    idx = draw(rng, len(d["y_pool"]), 200)
    samples = tmp / "job-samples.npz"
    np.savez(samples, X=pool["rotate30"][idx], y=d["y_pool"][idx])
    out_dir, ckpt = tmp / "job-out", tmp / "job-ckpt"
    for p in (out_dir, ckpt):
        subprocess.run(["rm", "-rf", str(p)], check=True)
    timing = tmp / "job-time.txt"
    argv = ["taskset", "-c", str(core), "/usr/bin/time", "-f", "%M", "-o", str(timing),
            sys.executable, "-m", "edge_node.learning.finetune_job",
            "--checkpoint-dir", str(ckpt), "--app-dir", str(app), "--samples", str(samples),
            "--replay", str(replay), "--out", str(out_dir)]
    env = {**os.environ, **ONE_THREAD, "AIDC_JOB_CORES": "1", "AIDC_JOB_CPUS": str(core)}
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"fine-tune job failed: {p.stderr[-2000:]}")
    max_rss_kb = int(timing.read_text().split()[-1])  # GNU time: the job's own peak RSS
    doc = json.loads((out_dir / "finetune.json").read_text())
    return {"wall_s": wall, "max_rss_mb": max_rss_kb / 1024,
            "train_s": doc["training"]["train_s"], "feature_s": doc["training"]["feature_s"],
            "iterations": doc["training"]["iterations"],
            "stop_reason": doc["training"]["stop_reason"],
            "events": len(p.stdout.splitlines())}


SWEEP = {
    "default (l2 1e-4, replay 0.5, balanced, to convergence)": {},
    "l2 1e-3": {"l2": 1e-3},
    "l2 1e-2": {"l2": 1e-2},
    "l2 1e-1": {"l2": 1e-1},
    "replay weight 0.25": {"replay_weight": 0.25},
    "replay weight 0.75": {"replay_weight": 0.75},
    "no class balance": {"class_weight": "none"},
    "early stopping (val 0.2, patience 10)": {"val_fraction": 0.2},
    "early stopping (val 0.2, patience 30)": {"val_fraction": 0.2, "patience": 30},
}


def sweep(d: dict, pool: dict, fx, W0, b0, F_train, seeds) -> dict:
    """Settings on the *dev* split: fine-tune on 100 samples from the first 300 of the
    site pool, score on the other 149 pool images (shifted and original)."""
    from edge_node.learning.train import TrainConfig, accuracy, fine_tune

    n_dev_train = 300
    y_dev = d["y_pool"][n_dev_train:]
    F_dev_orig = fx(d["X_pool"][n_dev_train:])
    base_orig = accuracy(F_dev_orig, y_dev, W0, b0)
    F_pool = {s: fx(pool[s]) for s in SHIFTS}
    out: dict = {}
    for label, cfg in SWEEP.items():
        out[label] = {}
        for s in SHIFTS:
            base_s = accuracy(F_pool[s][n_dev_train:], y_dev, W0, b0)
            rec, reg = [], []
            for seed in seeds:
                idx = draw(np.random.default_rng(seed), n_dev_train, 100)
                ridx = draw(np.random.default_rng(10_000 + seed), len(d["y_train"]), N_REPLAY)
                r = fine_tune(W0, b0, F_pool[s][idx], d["y_pool"][idx], F_train[ridx],
                              d["y_train"][ridx], TrainConfig(**{"seed": seed, **cfg}))
                a = accuracy(F_pool[s][n_dev_train:], y_dev, r.W, r.b)
                rec.append((a - base_s) / (base_orig - base_s))
                reg.append(base_orig - accuracy(F_dev_orig, y_dev, r.W, r.b))
            out[label][s] = {"recovered": float(np.median(rec)),
                             "regression": float(np.median(reg))}
        print(f"sweep {label:55s} " + " ".join(
            f"{s} {v['recovered']:.2f}/{v['regression'] * 100:.1f}"
            for s, v in out[label].items()), flush=True)
    return out


SWEEP_DEEP = {
    "default (l2 1e-4, replay 0.5, balanced, 300 iterations)": {},
    "l2 1e-5": {"l2": 1e-5},
    "l2 1e-3": {"l2": 1e-3},
    "l2 1e-2": {"l2": 1e-2},
    "replay weight 0.25": {"replay_weight": 0.25},
    "replay weight 0.75": {"replay_weight": 0.75},
    "1000 iterations": {"max_iter": 1000},
}


def sweep_deep(d: dict, pool: dict, app: Path, seeds) -> dict:
    """:func:`sweep` for the head and the hidden layer trained together."""
    from edge_node.learning.features import FeatureExtractor
    from edge_node.learning.head import find_app_head, find_layers, read_head
    from edge_node.learning.train import DeepTrainer, TrainConfig, mlp_logits

    head, model_path, _ = find_app_head(app)
    layers, _ = find_layers(model_path, head, 2)
    fx = FeatureExtractor(model_path, layers[0])
    params0 = [read_head(model_path, layer) for layer in layers]
    act = layers[0].activation

    def accuracy(X, y, params):
        return float((mlp_logits(X, params, act).argmax(axis=1) == y).mean())

    n_dev_train = 300
    y_dev = d["y_pool"][n_dev_train:]
    X_dev_orig = fx(d["X_pool"][n_dev_train:])
    X_train = fx(d["X_train"])
    base_orig = accuracy(X_dev_orig, y_dev, params0)
    X_pool = {s: fx(pool[s]) for s in SHIFTS}
    out: dict = {}
    for label, cfg in SWEEP_DEEP.items():
        out[label] = {}
        for s in SHIFTS:
            base_s = accuracy(X_pool[s][n_dev_train:], y_dev, params0)
            rec, reg = [], []
            for seed in seeds:
                idx = draw(np.random.default_rng(seed), n_dev_train, 100)
                ridx = draw(np.random.default_rng(10_000 + seed), len(d["y_train"]), N_REPLAY)
                r = DeepTrainer(params0, act, X_pool[s][idx], d["y_pool"][idx], X_train[ridx],
                                d["y_train"][ridx], TrainConfig(**{"seed": seed, **cfg})).run()
                a = accuracy(X_pool[s][n_dev_train:], y_dev, r.layers)
                rec.append((a - base_s) / (base_orig - base_s))
                reg.append(base_orig - accuracy(X_dev_orig, y_dev, r.layers))
            out[label][s] = {"recovered": float(np.median(rec)),
                             "regression": float(np.median(reg))}
        print(f"sweep2 {label:55s} " + " ".join(
            f"{s} {v['recovered']:.2f}/{v['regression'] * 100:.1f}"
            for s, v in out[label].items()), flush=True)
    return out


def machine() -> dict:
    import onnxruntime

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    mem_kb = next(int(ln.split()[1]) for ln in open("/proc/meminfo")
                  if ln.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_kb / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "date": time.strftime("%Y-%m-%d")}


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def report(res: dict) -> str:
    m, base = res["machine"], res["base"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']:g} GB, Linux "
             f"{m['kernel']}, Python {m['python']}, onnxruntime {m['onnxruntime']}, numpy "
             f"{m['numpy']}. {m['date']}; whole run {m.get('wall_s', 0):.0f} s. Split: "
             f"{res['split']['y_train']} train / {res['split']['y_pool']} site pool / "
             f"{res['split']['y_held']} held-out.", ""]
    lines += ["| site shift | base acc. original | base acc. shifted | n | layers trained | "
              "fine-tuned acc. shifted | fine-tuned acc. original | recovered | fine-tune "
              "wall s (1 core) | peak MB (tracemalloc / RSS delta) | verdict |",
              "|---" * 11 + "|"]
    for s, n, depth in ((s, n, depth) for s in SHIFTS
                        for n in sorted({r["n"] for r in res["fine_tune"]})
                        for depth in LAYERS):
        rows = [r for r in res["fine_tune"]
                if r["shift"] == s and r["n"] == n and r.get("layers", 1) == depth]
        if not rows:
            continue
        rec = stat(r["recovered"] for r in rows)
        orig = stat(r["acc_orig"] for r in rows)
        wall = stat(r["wall_s"] for r in rows)
        regress = (base["none"] - orig[0]) * 100
        ok = [rec[0] >= 0.8 or n > 200, wall[2] <= 10, regress <= 2 + 1e-6]
        why = [w for w, good in zip(("recovery < 80 %", "> 10 s", "regression > 2 pt"), ok)
               if not good]
        lines.append(
            f"| {s} | {base['none'] * 100:.1f} | {base[s] * 100:.1f} | {n} | "
            f"{'head' if depth == 1 else 'head + hidden'} | "
            f"{fmt(stat(r['acc_shift'] for r in rows), 1, 100)} | {fmt(orig, 1, 100)} | "
            f"{fmt(rec, 2)} | {fmt(wall, 3)} | "
            f"{fmt(stat(r['tracemalloc_peak_mb'] for r in rows), 1)} / "
            f"{fmt(stat(r['rss_delta_mb'] for r in rows), 1)} | "
            f"{'met' if all(ok) else '**not met**: ' + ', '.join(why)} |")
    lines.append("")
    for depth in LAYERS:
        ft = [r for r in res["fine_tune"] if r.get("layers", 1) == depth]
        lines += [f"Fine-tune wall time split, {'head' if depth == 1 else 'head + hidden'} "
                  f"(median over its rows): ORT session + features "
                  f"{stat(r['features_s'] for r in ft)[0]:.3f} s, training "
                  f"{stat(r['train_s'] for r in ft)[0]:.3f} s "
                  f"({stat(r['iterations'] for r in ft)[0]:.0f} L-BFGS iterations), export + "
                  f"validation {stat(r['export_s'] for r in ft)[0]:.3f} s; imports (onnx, "
                  f"onnxruntime) before the clock.", ""]
    if res["cloud"]:
        lines += ["", "Cloud retraining: retrained on 200 labelled samples from each "
                  "of three sites (600 pooled) + 500 replay, one model for all; the head "
                  "alone and the head with the hidden layer:", "",
                  "| scored on | base acc. | head: acc. | head: recovered | head + hidden: "
                  "acc. | head + hidden: recovered |", "|---|---|---|---|---|---|"]
        for s in ("none",) + CLOUD_SITES:
            cells = []
            for depth in LAYERS:
                rows = [r for r in res["cloud"] if r.get("layers", 1) == depth]
                accs = stat(r["acc"][s] for r in rows)
                if s == "none":
                    lost = stat((base["none"] - r["acc"][s]) * 100 for r in rows)
                    rec = f"regression {fmt(lost, 1)} pt"
                else:
                    rec = fmt(stat(r["recovered"][s] for r in rows), 2)
                cells += [fmt(accs, 1, 100), rec]
            lines.append(f"| {'original' if s == 'none' else s} | {base[s] * 100:.1f} | "
                         + " | ".join(cells) + " |")
        walls = [fmt(stat(r["wall_s"] for r in res["cloud"] if r.get("layers", 1) == depth), 3)
                 for depth in LAYERS]
        lines.append(f"| (fine-tune wall s, 1 core) | | {walls[0]} | | {walls[-1]} | |")
    lines += ["", "References (not the node's method): the head ceiling = the head trained on "
              "all 898 training images shifted (alone; joint = with the 898 originals as "
              "replay), and the whole MLP retrained by sklearn on original + shifted training "
              "images:", "",
              "| site shift | head ceiling alone: shifted / original | head ceiling joint: "
              "shifted / original | ceiling recovered (alone / joint) | whole MLP retrained: "
              "shifted / original |", "|---|---|---|---|---|"]
    for s in SHIFTS:
        c, w = res["ceiling"][s], res["retrain"][s]
        gap = base["none"] - base[s]
        lines.append(f"| {s} | {c['alone_shift'] * 100:.1f} / {c['alone_orig'] * 100:.1f} | "
                     f"{c['joint_shift'] * 100:.1f} / {c['joint_orig'] * 100:.1f} | "
                     f"{(c['alone_shift'] - base[s]) / gap:.2f} / "
                     f"{(c['joint_shift'] - base[s]) / gap:.2f} | "
                     f"{w['shift'] * 100:.1f} / {w['orig'] * 100:.1f} |")
    j = res["job"]
    lines += ["", f"The job end to end (`python -m edge_node.learning.finetune_job` under "
              f"`taskset` on one core, 200 rotate30 samples + 500 replay): wall "
              f"{j['wall_s']:.2f} s (features {j['feature_s']:.3f} s, training "
              f"{j['train_s']:.3f} s, {j['iterations']} iterations, {j['stop_reason']}; the "
              f"rest is interpreter start, imports, export and validation), peak RSS "
              f"{j['max_rss_mb']:.0f} MB."]
    for key, what in (("sweep", "the head alone"), ("sweep2", "the head and the hidden layer")):
        if not res.get(key):
            continue
        lines += ["", f"Settings for {what} on the dev split (100 samples from 300 of the site pool, scored "
                  "on the other 149 pool images, never the held-out set; median of 3 seeds; "
                  "recovered / regression on the original images in points):", "",
                  "| settings | " + " | ".join(SHIFTS) + " | mean |",
                  "|---|" + "---|" * (len(SHIFTS) + 1)]
        for label, v in res[key].items():
            cells = [f"{v[s]['recovered']:.2f} / {v[s]['regression'] * 100:.1f}" for s in SHIFTS]
            mean_rec = np.mean([v[s]["recovered"] for s in SHIFTS])
            mean_reg = np.mean([v[s]["regression"] for s in SHIFTS]) * 100
            lines.append(f"| {label} | " + " | ".join(cells) +
                         f" | {mean_rec:.2f} / {mean_reg:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
