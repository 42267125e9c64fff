"""Pack app slices onto cards; refuse what does not fit, saying what is free.

A :class:`SliceRequest` is an app's fraction of a card and its memory (the
manifest's ``resources``, optionally overridden per node by the operator).
:class:`Placement` turns it into a :class:`~edge_node.resources.slices.Slice`:

* on the CPU card, ``fraction x cores`` rounded **up** to whole, dedicated cores
  (at least one; the lowest free core ids), the note saying what was really
  reserved. With ``share_cores=True`` a request below one core instead gets a
  share of one core that other sub-core slices share too (best fit: the fullest
  shared core that still has room, then the lowest id) -- so four apps fit on
  two cores. Memory is counted against the card minus ``reserve_mb`` kept for
  the management plane and the OS.
* on a GPU, a compute share (percent, for MPS) and memory, each slice also
  counting ``gpu_context_mb`` for its CUDA context, which ONNX Runtime's
  ``gpu_mem_limit`` does not cover.

Packing is deterministic: cards in order, first fit. A request without a card
preference tries kinds in the ``prefer`` order (default: GPUs then the CPU
when the installed ONNX Runtime has the CUDA provider, else the CPU only). Slices are keyed by app name: placing an app
that already has a slice returns it unchanged for the same request, and
resizes it (the old allocation counted as free; kept when the new one does not
fit) for a different one -- so an upgrade's new version reuses the old one's
slice while both run for a moment.

A card can be marked *lost* (:meth:`Placement.set_lost`: the ``accelerator``
health check found it gone from discovery). A lost card gets no new slice and
an app's slice on it is not handed back by :meth:`Placement.place`: the app is
placed again on the cards that remain -- its card preference (``card: "gpu"``)
gives way to the CPU card while the card it names is lost. ``place(req,
refit=True)`` places an app afresh in preference order (its own allocation
counted as free), which is how apps move off a lost card and back onto it
when it returns.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..errors import EdgeError
from .cards import Card, cuda_runtime_installed
from .slices import Slice

logger = logging.getLogger(__name__)
EPS = 1e-9
OVERRIDE_KEYS = {"card_fraction", "memory_mb", "card"}


class PlacementError(EdgeError):
    """An app's slice does not fit; the message names what it needs and what is free."""

    def __init__(self, app: str, message: str) -> None:
        self.app = app
        super().__init__(message)


@dataclass(frozen=True)
class SliceRequest:
    app: str
    fraction: float
    memory_mb: int
    card: str | None = None  # a card id ("cpu", "gpu0") or kind ("gpu"); None: any

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise PlacementError(self.app, f"{self.app}: card_fraction {self.fraction} "
                                           "is not in (0, 1]")
        if self.memory_mb < 1:
            raise PlacementError(self.app, f"{self.app}: memory_mb {self.memory_mb} is < 1")

    @classmethod
    def from_manifest(cls, app: str, resources: Any, override: dict | None = None
                      ) -> SliceRequest:
        """From ``manifest.resources`` (object or dict) and the operator's ``override``
        (keys ``card_fraction``, ``memory_mb``, ``card``; each replaces the manifest's)."""
        res = resources if isinstance(resources, dict) else {
            "card_fraction": resources.card_fraction, "memory_mb": resources.memory_mb}
        over = dict(override or {})
        unknown = set(over) - OVERRIDE_KEYS
        if unknown:
            raise PlacementError(app, f"{app}: unknown resource override keys {sorted(unknown)}"
                                      f"; known: {sorted(OVERRIDE_KEYS)}")
        merged = {**res, **over}
        try:
            return cls(app=app, fraction=float(merged.get("card_fraction", 0.5)),
                       memory_mb=int(merged.get("memory_mb", 256)), card=merged.get("card"))
        except (TypeError, ValueError) as err:
            raise PlacementError(app, f"{app}: bad resource request {merged}: {err}") from err


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


class Placement:
    def __init__(self, cards: list[Card], *, reserve_mb: int = 1024, share_cores: bool = False,
                 gpu_reserve_mb: int = 0, gpu_context_mb: int = 300,
                 prefer: tuple[str, ...] | None = None) -> None:
        self.cards = list(cards)
        self.reserve_mb, self.share_cores = reserve_mb, share_cores
        self.gpu_reserve_mb, self.gpu_context_mb = gpu_reserve_mb, gpu_context_mb
        # with no card asked for: a GPU first, but only if this ONNX Runtime can drive one
        self.prefer = prefer or (("gpu", "cpu") if cuda_runtime_installed() else ("cpu",))
        self._slices: dict[str, Slice] = {}
        self._requests: dict[str, SliceRequest] = {}
        self._lost: dict[str, float] = {}  # card id -> when it was marked lost (time.time())
        self._lock = threading.Lock()

    # -- what is free ---------------------------------------------------------

    def _capacity_mb(self, card: Card) -> int:
        return card.memory_mb - (self.reserve_mb if card.kind == "cpu" else self.gpu_reserve_mb)

    def _accounted_mb(self, s: Slice) -> int:
        return s.memory_mb + (self.gpu_context_mb if s.kind == "gpu" else 0)

    def _free(self, card: Card, skip: str | None = None) -> dict:
        mine = [s for s in self._slices.values() if s.card == card.id and s.app != skip]
        free: dict[str, Any] = {
            "memory_mb": self._capacity_mb(card) - sum(self._accounted_mb(s) for s in mine)}
        if card.kind == "cpu":
            used = {c for s in mine if not s.shared for c in s.cores}
            shares: dict[int, float] = {}
            for s in mine:
                if s.shared:
                    shares[s.cores[0]] = shares.get(s.cores[0], 0.0) + s.core_share
            free["cores"] = [c for c in card.cores if c not in used and c not in shares]
            free["core_shares"] = {c: round(1.0 - v, 6) for c, v in sorted(shares.items())
                                   if v < 1.0 - EPS}
        else:
            free["compute_pct"] = 100 - sum(s.compute_pct or 0 for s in mine)
        return free

    @staticmethod
    def _describe_free(card: Card, free: dict) -> str:
        if card.kind == "cpu":
            cores = free["cores"]
            text = _plural(len(cores), "core")
            if cores:
                text += f" ({'core' if len(cores) == 1 else 'cores'} {', '.join(map(str, cores))})"
            for c, room in free["core_shares"].items():
                text += f", {room:g} of core {c}"
        else:
            text = f"{free['compute_pct']}% compute"
        return f"{text}, {max(0, free['memory_mb'])} MB"

    # -- fitting one card -----------------------------------------------------

    def _fit(self, req: SliceRequest, card: Card, free: dict) -> tuple[Slice | None, str]:
        """A slice on ``card`` or None, and the words for what it needs there."""
        if card.kind == "cpu":
            want = req.fraction * len(card.cores)
            if self.share_cores and want < 1 - EPS:
                need = f"{want:g} of a core and {req.memory_mb} MB"
                rooms = sorted(((-(1 - r), c) for c, r in free["core_shares"].items()
                                if r + EPS >= want))
                core = rooms[0][1] if rooms else (free["cores"][0] if free["cores"] else None)
                if core is None or free["memory_mb"] < req.memory_mb:
                    return None, need
                return Slice(app=req.app, card=card.id, kind="cpu", fraction=req.fraction,
                             memory_mb=req.memory_mb, cores=(core,), core_share=round(want, 6),
                             shared=True), need
            n = max(1, math.ceil(want - EPS))
            need = f"{_plural(n, 'core')} and {req.memory_mb} MB"
            if len(free["cores"]) < n or free["memory_mb"] < req.memory_mb:
                return None, need
            note = ""
            if n > want + EPS:
                note = (f"asked for {req.fraction:g} of {len(card.cores)} cores ({want:g}); "
                        f"reserved {_plural(n, 'core')} ({n / len(card.cores):g} of the card)")
            return Slice(app=req.app, card=card.id, kind="cpu", fraction=req.fraction,
                         memory_mb=req.memory_mb, cores=tuple(free["cores"][:n]),
                         note=note), need
        pct = max(1, round(req.fraction * 100))
        mem = req.memory_mb + self.gpu_context_mb
        need = f"{pct}% compute and {mem} MB ({self.gpu_context_mb} MB of it CUDA context)"
        if free["compute_pct"] < pct or free["memory_mb"] < mem:
            return None, need
        return Slice(app=req.app, card=card.id, kind="gpu", fraction=req.fraction,
                     memory_mb=req.memory_mb, device_index=card.index, compute_pct=pct), need

    def _candidates(self, req: SliceRequest) -> list[Card]:
        if req.card is not None:
            found = [c for c in self.cards if req.card in (c.id, c.kind)]
            if not found:
                have = ", ".join(c.id for c in self.cards)
                raise PlacementError(req.app, f"{req.app} asks for card {req.card!r}; "
                                              f"this node has: {have}")
            alive = [c for c in found if c.id not in self._lost]
            if alive:
                return alive
            # every card it asks for is lost: the CPU card stands in meanwhile
            found = [c for c in self.cards if c.kind == "cpu" and c.id not in self._lost]
            if not found:
                raise PlacementError(req.app, f"{req.app} asks for card {req.card!r}, "
                                              f"which is lost ({', '.join(sorted(self._lost))})")
            return found
        found = [c for kind in self.prefer for c in self.cards
                 if c.kind == kind and c.id not in self._lost]
        if not found:
            raise PlacementError(req.app, f"{req.app}: no card of kind {' or '.join(self.prefer)}"
                                          f" on this node ({', '.join(c.id for c in self.cards)})")
        return found

    # -- the API ----------------------------------------------------------------

    def place(self, req: SliceRequest, *, refit: bool = False) -> Slice:
        """The app's slice, placed now (or as before); :class:`PlacementError` if none fits.

        ``refit``: placed afresh in preference order even when its request is the
        same (its own allocation counted as free; kept when nothing fits). An app
        whose slice is on a lost card is always placed afresh."""
        with self._lock:
            old = self._slices.get(req.app)
            if old is not None and self._requests[req.app] == req and not refit \
                    and old.card not in self._lost:
                return old
            tried = []
            for card in self._candidates(req):
                free = self._free(card, skip=req.app)
                got, need = self._fit(req, card, free)
                if got is not None:
                    self._slices[req.app], self._requests[req.app] = got, req
                    logger.info("placed %s on %s: %s", req.app, card.id, got.describe())
                    return got
                tried.append((card, need, free))
        if len(tried) == 1:
            card, need, free = tried[0]
            msg = (f"{req.app} needs {need} on {card.id}; "
                   f"free: {self._describe_free(card, free)}")
        else:
            msg = f"{req.app} fits on no card (asks {req.fraction:g} of a card, " \
                  f"{req.memory_mb} MB): " + "; ".join(
                      f"{c.id} needs {n}, free: {self._describe_free(c, f)}" for c, n, f in tried)
        if old is not None:
            msg += f" (its current slice on {old.card} is kept)"
        raise PlacementError(req.app, msg)

    def release(self, app: str) -> None:
        """Give the app's slice back (its worker is gone); unknown apps are ignored."""
        with self._lock:
            gone = self._slices.pop(app, None)
            self._requests.pop(app, None)
        if gone is not None:
            logger.info("released the slice of %s on %s", app, gone.card)

    def get(self, app: str) -> Slice | None:
        with self._lock:
            return self._slices.get(app)

    # -- lost cards (the accelerator health check) -------------------------------

    def set_lost(self, card_id: str, lost: bool = True) -> None:
        """Mark a card lost (gone from discovery) or back; unknown ids: KeyError."""
        if card_id not in {c.id for c in self.cards}:
            raise KeyError(f"no card {card_id!r} on this node")
        with self._lock:
            if lost:
                self._lost.setdefault(card_id, time.time())
            else:
                self._lost.pop(card_id, None)
        logger.warning("card %s marked %s", card_id, "lost" if lost else "back")

    def lost(self) -> dict[str, float]:
        """The cards marked lost now, with when (``time.time()``)."""
        with self._lock:
            return dict(self._lost)

    def apps_on(self, card_id: str) -> list[str]:
        """The apps with a slice on ``card_id``, in name order."""
        with self._lock:
            return sorted(a for a, s in self._slices.items() if s.card == card_id)

    def snapshot(self) -> dict[str, dict]:
        """Per card: capacity, the slices on it, and what is free (JSON-able)."""
        with self._lock:
            out = {}
            for card in self.cards:
                free = self._free(card)
                if "core_shares" in free:
                    free["core_shares"] = {str(c): v for c, v in free["core_shares"].items()}
                out[card.id] = {
                    "kind": card.kind, "memory_mb": self._capacity_mb(card),
                    "reserved_mb": card.memory_mb - self._capacity_mb(card),
                    **({"cores": list(card.cores)} if card.kind == "cpu" else {}),
                    "slices": [s.to_dict() for s in self._slices.values() if s.card == card.id],
                    "free": free,
                    **({"lost": True, "lost_since": self._lost[card.id]}
                       if card.id in self._lost else {}),
                }
            return out
