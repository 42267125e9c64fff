"""All the issue-3 references in one run, and optionally a system under test beside them.

    .venv/bin/python bench/run_all.py [--quick] [--reps 3] [--models a,b]
        [--sut-url http://127.0.0.1:8080 | --sut-factory module:function]
        [--sut-models digits] [--sut-name bench=served ...] [--sut-binary]

Per model (MobileNetV2-, ResNet-18-, SqueezeNet-1.1-shaped nets and the digits
sample; bench/models.py): B0, B1, B2 (and B2 with ORT spinning off), the
concurrency sweep 1/2/4/8 callers with pinned single-thread sessions and with
all-core sessions, and Poisson arrivals at 50/80/95 % of that run's B1 served by
the B1 setup. Then two models on half the cores each against each alone (B1),
and a victim's p99 alone vs with a neighbour, with and without slices. With a
system under test: the same sweep and Poisson load against it, in the same
repetitions, and the DESIGN.md serving targets judged against B0/B1.

3 repetitions, interleaved, median and min-max. The machine is shared: before
each repetition the run waits (up to --quiet-budget seconds in all) for other
processes to leave the CPU, redoes (up to --retries in all) a repetition they
disturbed, and reports what noise remained. Writes bench/out/refs-<time>.json
and .md (the tables for docs/benchmarks.md) and prints the tables.
--quick: squeezenet + digits, one repetition, 1 s windows (about 1.5 minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import refs  # noqa: E402
import report  # noqa: E402
import sut as sut_mod  # noqa: E402
from harness import Quiet  # noqa: E402
from models import ALL_MODELS, OUT, BenchModel, build  # noqa: E402

SWEEP = (1, 2, 4, 8)
LOADS = (0.50, 0.80, 0.95)
DURATION_S = {"digits": 1.5, "squeezenet1_1": 2.5, "mobilenetv2": 2.5, "resnet18": 3.5}
PAIRS = {"full": [("mobilenetv2", "resnet18"), ("squeezenet1_1", "mobilenetv2")],
         "quick": [("squeezenet1_1", "digits")]}
NOISY = {"full": [("mobilenetv2", "resnet18"), ("digits", "resnet18")],
         "quick": [("squeezenet1_1", "squeezenet1_1")]}


def closed_plan(m: BenchModel, d: float, sut: sut_mod.Sut | None, basics: bool) -> dict:
    n = len(refs.CORES)
    plan = {f"{m.name}/B0": lambda: refs.b0(m, d),
            f"{m.name}/B1": lambda: refs.b1(m, d),
            f"{m.name}/B2": lambda: refs.b2(m, d),
            f"{m.name}/B2 spin off": lambda: refs.b2(m, d, spinning=False)}
    for c in () if basics else SWEEP:
        if c != n:
            plan[f"{m.name}/pinned x{c}"] = lambda c=c: refs.pinned_sweep(m, c, d)
        if c not in (1, n):
            plan[f"{m.name}/all-cores x{c}"] = lambda c=c: refs.shared_sweep(m, c, d)
        if sut:
            plan[f"{m.name}/SUT x{c}"] = lambda c=c: sut_mod.closed(sut, m, c, d)
    return plan


def poisson_plan(m: BenchModel, d: float, b1_rate: float, sut: sut_mod.Sut | None) -> dict:
    plan = {}
    for i, load in enumerate(LOADS):
        rate = load * b1_rate
        plan[f"{m.name}/poisson {load:.0%}"] = lambda r=rate, i=i: refs.poisson(m, r, d, seed=i)
        if sut:
            plan[f"{m.name}/SUT poisson {load:.0%}"] = \
                lambda r=rate, i=i: sut_mod.poisson(sut, m, r, d, seed=i)
    return plan


def shared_plan(models: dict[str, BenchModel], mode: str) -> dict:
    plan = {}
    for a, b in PAIRS[mode]:
        if a in models and b in models:
            d = max(DURATION_S[a], DURATION_S[b]) if mode == "full" else 1.0
            plan[f"halves {a}+{b}"] = lambda a=a, b=b, d=d: refs.two_halves(
                models[a], models[b], d)
    for v, nb in NOISY[mode]:
        if v in models and nb in models:
            d = max(DURATION_S[v], DURATION_S[nb]) if mode == "full" else 1.0
            for sliced in (True, False):
                for withn in (False, True):
                    key = (f"noisy {v}<-{nb} {'sliced' if sliced else 'shared'} "
                           f"{'with' if withn else 'alone'}")
                    plan[key] = lambda v=v, nb=nb, d=d, s=sliced, w=withn: refs.noisy(
                        models[v], models[nb], d, s, w)
    return plan


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sharing", action="store_true",
                    help="instead: bench/sharing.py (two halves and noisy neighbour through the "
                         "node's serving path, raw references beside); other args go to it")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--basics", action="store_true",
                    help="only B0, B1, B2 and B2 with spinning off (the oversubscription check)")
    ap.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(ALL_MODELS))
    ap.add_argument("--sut-url", default=None, help="Open Inference Protocol v2 base URL")
    ap.add_argument("--sut-factory", default=None, help="module:function(model_path) -> fn(x)")
    ap.add_argument("--sut-models", default="digits", help="bench models the SUT serves")
    ap.add_argument("--sut-name", action="append", default=[], metavar="BENCH=SERVED")
    ap.add_argument("--sut-binary", action="store_true", help="v2 binary tensor extension")
    ap.add_argument("--sut-label", default=None)
    ap.add_argument("--max-foreign", type=float, default=0.25,
                    help="wait for, and retry a repetition above, this many cores used by others")
    ap.add_argument("--quiet-budget", type=float, default=90.0,
                    help="seconds the whole run may spend waiting for a quiet machine")
    ap.add_argument("--retries", type=int, default=12,
                    help="disturbed repetitions the whole run may redo")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if "--sharing" in argv:
        import sharing
        return sharing.main([a for a in argv if a != "--sharing"])
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    reps = args.reps or (1 if args.quick else 3)
    names = (args.models.split(",") if args.models else
             ["squeezenet1_1", "digits"] if args.quick else list(ALL_MODELS))
    sut = None
    if args.sut_url or args.sut_factory:
        sut = sut_mod.Sut(args.sut_url, args.sut_factory,
                          tuple(tuple(s.split("=", 1)) for s in args.sut_name), args.sut_binary,
                          args.sut_label or ("HTTP v2" if args.sut_url else "in process"))
    sut_models = set(args.sut_models.split(",")) if sut else set()
    t_start = time.time()
    machine = report.machine()
    models = {n: build(n) for n in names}
    print(report.models_table(models))
    measured: dict[str, refs.Measured] = {}
    quiet = Quiet(args.max_foreign, 15 if args.quick else args.quiet_budget,
                  retries=0 if args.quick else args.retries)

    def go(plan: dict) -> None:
        refs.repeat(plan, reps, quiet, measured, log=print)

    for name, m in models.items():
        d = 1.0 if args.quick else DURATION_S[name]
        s = sut if name in sut_models else None
        print(f"== {name}: {d} s windows, {reps} reps", flush=True)
        go(closed_plan(m, d, s, args.basics))
        if not args.basics:
            b1_rate = measured[f"{name}/B1"].stat("throughput")[0]
            go(poisson_plan(m, d, b1_rate, s))
    if not args.basics:
        print("== two halves and noisy neighbour", flush=True)
        go(shared_plan(models, mode))
    machine["wall_s"] = round(time.time() - t_start, 1)
    machine["quiet_wait_s"] = round(quiet.waited_s, 1)
    machine["max_foreign"] = args.max_foreign
    md = report.render(machine, models, measured, reps, SWEEP, LOADS, PAIRS[mode],
                       NOISY[mode], sut, sut_models)
    print(md)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    OUT.mkdir(exist_ok=True)
    (OUT / f"refs-{stamp}.md").write_text(md)
    data = {"machine": machine, "mode": mode, "reps": reps,
            "models": {n: {"params": m.params, "bytes": m.size_bytes} for n, m in models.items()},
            "measured": {k: {"retries": v.retries,
                             "runs": [{g: asdict(r) for g, r in run.items()} for run in v.runs]}
                         for k, v in measured.items()}}
    (OUT / f"refs-{stamp}.json").write_text(json.dumps(data, indent=1))
    print(f"wrote {OUT / f'refs-{stamp}.md'} and .json ({machine['wall_s']} s)")
    return data


if __name__ == "__main__":
    main()
