"""The promotion gate: may a fine-tuned candidate replace the served model?

Shared by the node (edge_node/adapt.py) and the AppStore's retraining
(appstore/retrain.py); the figures come from the job's ``gate.json``
(:mod:`edge_node.learning.site_job`). Standard library only.
"""

from __future__ import annotations

from typing import Any

#: accuracies are ratios of counts: 1.00 - 0.95 is 0.0500000000000000444 in floats
EPS = 1e-9


def decide(gate: Any, acc: dict) -> tuple[bool, str]:
    """The promotion gate: ``(passed, reason)`` from ``gate.json``'s accuracy figures."""
    held, rep = acc.get("heldout") or {}, acc.get("replay") or {}
    if held.get("n", 0) < gate.min_heldout:
        return False, (f"not enough held-out samples to judge: {held.get('n', 0)} < "
                       f"{gate.min_heldout} (label more)")
    gain = held["candidate"] - held["base"]
    if gain < gate.min_gain - EPS:
        return False, (f"no better on the site's held-out samples: {held['candidate']:.3f} vs "
                       f"{held['base']:.3f} served (gain {gain:+.3f} < {gate.min_gain:g})")
    if rep.get("n"):
        loss = rep["base"] - rep["candidate"]
        if loss > gate.max_regression + EPS:
            return False, (f"forgets the base distribution: replay {rep['candidate']:.3f} vs "
                           f"{rep['base']:.3f} (-{loss:.3f} > {gate.max_regression:g})")
    return True, (f"held-out {held['base']:.3f} -> {held['candidate']:.3f}"
                  + (f", replay {rep['base']:.3f} -> {rep['candidate']:.3f}"
                     if rep.get("n") else ", no replay set"))
