"""Plugging a system under test ("our path") into the reference run.

Two kinds, both driven by the same caller processes as the references:

- a URL: an Open Inference Protocol v2 server; each benchmark model is served
  under its bench name (``digits``, ``mobilenetv2`` ...) unless renamed, and
  called with ``POST {url}/v2/models/{name}/infer`` (JSON, or the binary-tensor
  extension);
- a factory ``"package.module:function"``: ``function(model_path) -> fn(x)``,
  called once in each caller process (after pinning); ``fn(x)`` does one
  inference of the 1-sample input ``x`` however the path under test does it
  (a worker client, a shared-memory queue, ...).

From Python the same is ``sut_target(...)`` plus :func:`harness.closed_loop` /
:func:`harness.open_loop`; this module only adds the scenarios run_all.py puts
next to B0/B1 and the figures the targets of DESIGN.md are judged by.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

from harness import RunResult, closed_loop, open_loop
from models import BenchModel, sample_input
from targets import CallableTarget, HttpV2Target

#: open-loop client processes for a system under test (it queues internally)
POISSON_CLIENTS = 8


@dataclass(frozen=True)
class Sut:
    url: str | None = None
    factory: str | None = None  #: "module:function"
    names: tuple[tuple[str, str], ...] = ()  #: (bench model, served name) renames
    binary: bool = False
    label: str = "SUT"

    @property
    def over_http(self) -> bool:
        return self.url is not None

    def target(self, model: BenchModel):
        x = sample_input(model)
        if self.url:
            served = dict(self.names).get(model.name, model.name)
            return HttpV2Target(self.url, served, model.input_name, x, self.binary,
                                label=self.label)
        mod, _, fn = (self.factory or "").partition(":")
        if not fn:
            raise ValueError(f"factory must be 'module:function', got {self.factory!r}")
        func = getattr(importlib.import_module(mod), fn)
        return CallableTarget(functools.partial(func, str(model.path)), x, self.label)


def closed(sut: Sut, model: BenchModel, callers: int, duration_s: float) -> dict[str, RunResult]:
    """``callers`` unpinned caller processes, back to back."""
    return {"main": closed_loop(sut.target(model), callers, duration_s)}


def poisson(sut: Sut, model: BenchModel, rate: float, duration_s: float,
            seed: int = 0) -> dict[str, RunResult]:
    """The same Poisson arrivals as the B1 reference, from a pool of client processes."""
    return {"main": open_loop(sut.target(model), rate, POISSON_CLIENTS, duration_s, seed=seed)}


def verdicts(sut: Sut, b0_p50: float, b1_tput: float, sut_p50: float,
             sut_best_tput: float) -> list[tuple[str, str, str]]:
    """(figure, measured, target) rows for DESIGN.md's serving targets."""
    ratio = sut_best_tput / b1_tput
    want = 0.85 if sut.over_http else 0.95
    rows = [(f"{sut.label} best throughput / B1", f"{ratio:.3f}",
             f">= {want} ({'met' if ratio >= want else 'not met'})")]
    over = sut_p50 - b0_p50
    if sut.over_http:
        rows.append((f"{sut.label} p50 over B0, one caller", f"{over:+.3f} ms",
                     f"<= 0.5 ms ({'met' if over <= 0.5 else 'not met'})"))
    else:
        rows.append((f"{sut.label} p50 over B0, one caller", f"{over:+.3f} ms", "-"))
    return rows
