"""Will an app version fit a node? The cloud's side of placement, from the
cards and slices the node reports (``ReportedState.cards``).

The node places slices itself (edge_node/resources/placement.py) and refuses
what does not fit, with the reason; this check lets a rollout refuse up front
instead of half-deploying: before the first wave, every target node must have
room for the new version's slice, counting the slice the app holds now (an
upgrade replaces it). It follows the node's rules on CPU (``card_fraction`` of
the card's cores: a whole number of free cores, rounded up; a share of one core
where the node shares cores) and on GPUs (percent of compute and memory), and
is deliberately lenient where the report does not say enough (a node that
reported no cards yet passes: the node's own placement decides, and a wave
whose node refuses fails and is rolled back).
"""

from __future__ import annotations

import math
from typing import Any

EPS = 1e-9


def request(manifest: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """The slice the app asks for: the manifest's ``resources`` with the
    assignment's override on top (``card_fraction``, ``memory_mb``, ``card``)."""
    res = dict(manifest.get("resources") or {})
    res.update({k: v for k, v in (override or {}).items() if v is not None})
    return {"fraction": float(res.get("card_fraction", 0.5)),
            "memory_mb": int(res.get("memory_mb", 256)), "card": res.get("card")}


def fits(cards: list[dict[str, Any]], app: str, req: dict[str, Any]) -> tuple[bool, str]:
    """``(True, where)`` or ``(False, why)`` for ``req`` on a node reporting ``cards``."""
    if not cards:
        return True, "no cards reported yet (the node decides)"
    tried = []
    for card in cards:
        if req["card"] is not None and req["card"] not in (card.get("id"), card.get("kind")):
            continue
        if card.get("state") == "lost":  # the node lost it (accelerator_lost): no room there
            tried.append(f"{card.get('id')}: lost")
            continue
        alloc = card.get("allocation") or {}
        free = dict(alloc.get("free") or {})
        if not free:
            return True, f"{card.get('id')}: no allocation reported (the node decides)"
        mine = [s for s in alloc.get("slices", []) if s.get("app") == app]
        mem = free.get("memory_mb", 0) + sum(s.get("memory_mb", 0) for s in mine)
        if card.get("kind") == "cpu":
            cores = list(alloc.get("cores") or card.get("cores") or [])
            free_cores = set(free.get("cores", [])) | {c for s in mine if not s.get("shared")
                                                       for c in s.get("cores", [])}
            shares = {int(c): float(v) for c, v in (free.get("core_shares") or {}).items()}
            for s in mine:
                if s.get("shared"):
                    c = s["cores"][0]
                    shares[c] = shares.get(c, 0.0) + float(s.get("core_share", 0.0))
            for c, room in list(shares.items()):
                if room >= 1 - EPS:  # the app's share was all that was used of it
                    free_cores.add(c)
                    del shares[c]
            want = req["fraction"] * max(1, len(cores))
            if want < 1 - EPS:  # a core of its own, or a share of one where the node shares
                ok = bool(free_cores) or any(v + EPS >= want for v in shares.values())
                need = f"{want:g} of a core"
            else:
                n = max(1, math.ceil(want - EPS))
                ok = len(free_cores) >= n
                need = f"{n} core{'s' if n != 1 else ''}"
            if ok and mem >= req["memory_mb"]:
                return True, f"{card.get('id')}: {need} and {req['memory_mb']} MB"
            tried.append(f"{card.get('id')} needs {need} and {req['memory_mb']} MB, has "
                         f"{len(free_cores)} free core(s) and {mem} MB")
        else:
            pct = max(1, round(req["fraction"] * 100))
            compute = free.get("compute_pct", 0) + sum(s.get("compute_pct", 0) or 0
                                                       for s in mine)
            if compute >= pct and mem >= req["memory_mb"]:
                return True, f"{card.get('id')}: {pct}% compute and {req['memory_mb']} MB"
            tried.append(f"{card.get('id')} needs {pct}% compute and {req['memory_mb']} MB, "
                         f"has {compute}% and {mem} MB")
    if not tried:
        return False, f"{app} asks for card {req['card']!r}; the node has " + ", ".join(
            str(c.get("id")) for c in cards)
    return False, "; ".join(tried)
