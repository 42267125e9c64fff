"""The reference scenarios of issue 3, on raw ONNX Runtime, each one function.

- **B0**: one caller, one session with intra_op = all cores (latency reference).
- **B1**: one single-thread session per core, one caller each, every caller its
  own process pinned to its core (the throughput ceiling).
- **B2**: the same callers, every session on all cores, nothing pinned (the
  oversubscription penalty); ``spinning=False`` gives the variant with ORT's
  spin-waiting off.
- sweeps over callers: ``pinned_sweep`` (single-thread sessions pinned round
  robin: B1 at callers = cores) and ``shared_sweep`` (all-core sessions, B2 at
  callers = cores); ``poisson``: open-loop Poisson arrivals served by the B1
  setup (one FIFO, one pinned single-thread server per core).
- ``two_halves``: model A on the first half of the cores and model B on the
  second, single-thread sessions pinned, concurrently.
- ``noisy``: a victim alone vs with a neighbour hammering the other cores,
  with slices (pinned, disjoint) or without (both on all cores).

Every function returns ``{group: RunResult}``; :func:`repeat` runs a plan of
them with repetitions interleaved and retries a repetition that other
processes disturbed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from harness import Caller, Quiet, RunResult, closed_loop, open_loop, run, spread
from models import BenchModel, sample_input
from targets import OrtTarget

logger = logging.getLogger(__name__)

CORES = sorted(os.sched_getaffinity(0))
Scenario = Callable[[], dict[str, RunResult]]


def ort(model: BenchModel, threads: int, spinning: bool | None = None,
        label: str = "") -> OrtTarget:
    return OrtTarget(str(model.path), model.input_name, sample_input(model), threads,
                     spinning, label or f"{model.name}/ort{threads}t")


def b0(model: BenchModel, duration_s: float) -> dict[str, RunResult]:
    return {"main": closed_loop(ort(model, len(CORES), label="B0"), 1, duration_s)}


def b1(model: BenchModel, duration_s: float) -> dict[str, RunResult]:
    n = len(CORES)
    return {"main": closed_loop(ort(model, 1, label="B1"), n, duration_s, cpus=spread(n))}


def b2(model: BenchModel, duration_s: float, spinning: bool | None = None) -> dict[str, RunResult]:
    label = "B2" if spinning is None else f"B2 spin={'on' if spinning else 'off'}"
    n = len(CORES)
    return {"main": closed_loop(ort(model, n, spinning, label), n, duration_s)}


def pinned_sweep(model: BenchModel, callers: int, duration_s: float) -> dict[str, RunResult]:
    t = ort(model, 1, label=f"pinned x{callers}")
    return {"main": closed_loop(t, callers, duration_s, cpus=spread(callers))}


def shared_sweep(model: BenchModel, callers: int, duration_s: float) -> dict[str, RunResult]:
    t = ort(model, len(CORES), label=f"all-cores x{callers}")
    return {"main": closed_loop(t, callers, duration_s)}


def poisson(model: BenchModel, rate: float, duration_s: float,
            seed: int = 0) -> dict[str, RunResult]:
    n = len(CORES)
    t = ort(model, 1, label=f"B1 Poisson {rate:.1f}/s")
    return {"main": open_loop(t, rate, n, duration_s, cpus=spread(n), seed=seed)}


def halves() -> tuple[list[int], list[int]]:
    h = max(1, len(CORES) // 2)
    return CORES[:h], CORES[h:] or CORES[:h]


def two_halves(a: BenchModel, b: BenchModel, duration_s: float) -> dict[str, RunResult]:
    """A pinned to the first half, B to the second, one single-thread caller per core."""
    first, second = halves()
    cs = [Caller(ort(a, 1, label=a.name), (c,), "a") for c in first]
    cs += [Caller(ort(b, 1, label=b.name), (c,), "b") for c in second]
    return run(cs, duration_s)


def noisy(victim: BenchModel, neighbour: BenchModel, duration_s: float,
          sliced: bool, with_neighbour: bool) -> dict[str, RunResult]:
    """Victim: one closed-loop caller. Sliced: victim single-thread on the first
    core, neighbour single-thread callers pinned to the second half. Not sliced:
    both sessions on all cores, nothing pinned (one neighbour caller)."""
    first, second = halves()
    if sliced:
        cs = [Caller(ort(victim, 1, label=victim.name), (first[0],), "victim")]
        if with_neighbour:
            cs += [Caller(ort(neighbour, 1, label=neighbour.name), (c,), "neighbour")
                   for c in second]
    else:
        cs = [Caller(ort(victim, len(CORES), label=victim.name), None, "victim")]
        if with_neighbour:
            cs.append(Caller(ort(neighbour, len(CORES), label=neighbour.name), None,
                             "neighbour"))
    return run(cs, duration_s)


@dataclass
class Measured:
    """The repetitions of one scenario."""

    key: str
    runs: list[dict[str, RunResult]] = field(default_factory=list)
    retries: int = 0

    def values(self, attr: str, group: str = "main") -> list[float]:
        return [getattr(r[group], attr) for r in self.runs]

    def stat(self, attr: str, group: str = "main") -> tuple[float, float, float]:
        """(median, min, max) of ``attr`` over the repetitions."""
        v = self.values(attr, group)
        return float(np.median(v)), float(min(v)), float(max(v))


def repeat(plan: dict[str, Scenario], reps: int = 3, quiet: Quiet | None = None,
           out: dict[str, Measured] | None = None, attempts: int = 3,
           log: Callable[[str], None] = logger.info) -> dict[str, Measured]:
    """Run every scenario ``reps`` times, repetitions interleaved (rep 1 of all,
    then rep 2 ...), so slow drift of a shared machine hits all alike. With a
    ``quiet`` policy: before each attempt wait for other processes to go below
    ``quiet.max_busy`` cores; a repetition they disturbed (used more than that
    during it) is run again, up to ``attempts`` in all and while the policy's
    retry budget lasts, and the least disturbed attempt is kept (chosen by the
    others' CPU use, never by the figure), its disturbance recorded."""
    out = {} if out is None else out
    for rep in range(reps):
        for key, scenario in plan.items():
            m = out.setdefault(key, Measured(key))
            tries: list[tuple[float, dict[str, RunResult]]] = []
            while True:
                if quiet is not None:
                    quiet.wait()
                res = scenario()
                tries.append((max(r.foreign_cores for r in res.values()), res))
                if (quiet is None or tries[-1][0] <= quiet.max_busy
                        or quiet.retries_left <= 0 or len(tries) >= attempts):
                    break
                quiet.retries_left -= 1
                m.retries += 1
                log(f"  {key}: rep {rep + 1} disturbed ({tries[-1][0]:.2f} cores used by "
                    "others), again")
            foreign, res = min(tries, key=lambda t: t[0])
            m.runs.append(res)
            log(f"  {key} rep {rep + 1}: " + "; ".join(
                f"{g} {r.throughput:.1f}/s p50 {r.p50_ms:.2f} p99 {r.p99_ms:.2f} ms"
                for g, r in res.items()) + f" (others {foreign:.2f} cores)")
    return out
