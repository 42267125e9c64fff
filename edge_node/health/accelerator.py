"""A lost accelerator: fault ``accelerator_lost``.

A GPU card the node found at start (:func:`~edge_node.resources.cards.discover_cards`,
through NVML) is gone from discovery now: the card fell off the bus, its driver
was unloaded or crashed (Xid 79, ``nvidia-smi`` no longer lists it). Every
``interval_s`` the probe discovers the cards again (``discover``, the seam: a
callable returning the cards present; by default NVML asked again, quietly) and
compares them with the node's cards (by UUID, else by id).

A card gone, or apps still placed on a gone card, is the fault. The remedy:

1. the card is marked lost in :class:`~edge_node.resources.placement.Placement`
   (it gets no new slice; the reported state's card says ``"state": "lost"``);
2. the apps placed on it are placed afresh on the cards that remain -- the CPU
   card -- **if they fit**, by the same first-fit packing as any placement, and
   their workers restarted with the new slice's settings (same worker key and
   client; :meth:`~edge_node.reconciler.Reconciler.relocate`), an ``app_moved``
   event each;
3. an app that fits nowhere is not left half deployed: its worker is stopped, its
   slice released, the app reported ``failed`` with why (``app_unplaced`` event);
   the episode stays open (``fault_unhealed``, the why) until it is placed again.

The ``fault_detected`` event is the alarm; ``fault_healed`` says what moved where.

**When the card comes back** (listed by discovery again) the apps moved off it
move back **automatically**, once it has been present for ``return_after_s``
(default 30 s, so that a card that comes and goes does not bounce the apps):
the card is marked back, the moved apps are placed afresh in the node's
preference order (back onto the card when they still fit; an app that does not
goes on serving where it is) and an ``accelerator_returned`` event says which
moved. Apps that fitted nowhere are placed as soon as the card is back (they are
not serving: nothing to wait for).

A worker on the card usually dies with it, and its restarts fail; when the
supervisor gives up before the next probe, the reconciler asks
:meth:`AcceleratorCheck.card_gone` (``Reconciler.card_gone``) and, the card gone,
neither rolls the app back as a crash loop nor restarts it there: the app is
reported failed until the remedy places it afresh.

A card missing at start is not the node's (the agent discovers its cards once);
one that appears later is used from the next start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ..resources.cards import Card, discover_cards
from .base import Check, Finding

logger = logging.getLogger(__name__)


def _default_discover() -> list[Card]:
    return discover_cards(quiet=True)


class AcceleratorCheck(Check):
    name = "accelerator"

    def __init__(self, placement: Any, reconciler: Any, *,
                 discover: Callable[[], list[Card]] = _default_discover,
                 interval_s: float = 5.0, return_after_s: float = 30.0,
                 heal_wait_s: float = 60.0, on_change: Callable[[], None] | None = None,
                 emit_event: Callable[..., None] | None = None) -> None:
        self.placement = placement
        self.reconciler = reconciler
        self.discover = discover
        self.interval_s = interval_s
        self.return_after_s = return_after_s
        self.heal_wait_s = heal_wait_s
        self.on_change = on_change or (lambda: None)
        self.emit_event = emit_event
        self._moved: dict[str, str] = {}     # app -> the lost card it was moved off
        self._stranded: dict[str, str] = {}  # app -> the lost card it was on; fits nowhere
        self._back_since: dict[str, float] = {}  # lost card -> monotonic, listed again since
        self.stats = {"lost": 0, "returned": 0, "moved": 0, "moved_back": 0, "unplaced": 0}
        if reconciler is not None and hasattr(reconciler, "card_gone"):
            # a worker that died on a card discovery no longer lists is not rolled back as
            # a crash loop: the reconciler asks here, the next probe moves the app
            reconciler.card_gone = self.card_gone

    def card_gone(self, card_id: str) -> bool:
        """True when ``card_id`` is one of the node's GPU cards and discovery lacks it."""
        gpus = [c for c in self._gpus() if c.id == card_id]
        return bool(gpus) and bool(self._gone(gpus))

    # -- what is there -----------------------------------------------------------
    def _gpus(self) -> list[Card]:
        return [c for c in self.placement.cards if c.kind != "cpu"]

    def _gone(self, gpus: list[Card]) -> list[str]:
        present = self.discover()
        uuids = {c.uuid for c in present if c.uuid}
        ids = {c.id for c in present}
        return [c.id for c in gpus if not ((c.uuid in uuids) if c.uuid else (c.id in ids))]

    def _desired(self) -> set[str]:
        return {r.name for r in self.reconciler.reports()}

    def probe(self) -> Finding:
        gpus = self._gpus()
        if not gpus:
            return Finding(self.name, True, "no accelerator card")
        gone = self._gone(gpus)
        marked = self.placement.lost()
        now = time.monotonic()
        for card in list(self._back_since):
            if card in gone or card not in marked:
                del self._back_since[card]  # gone again (the wait starts over) or done
        for card in marked:
            if card not in gone:
                self._back_since.setdefault(card, now)
        desired = self._desired()
        for app in [a for a in self._stranded
                    if self.placement.get(a) is not None or a not in desired]:
            del self._stranded[app]  # placed again, or no longer wanted
        for app in [a for a in self._moved if a not in desired]:
            del self._moved[app]
        new = [c for c in gone if c not in marked]
        on_gone = {c: self.placement.apps_on(c) for c in gone}
        on_gone = {c: apps for c, apps in on_gone.items() if apps}
        data = {"lost": gone, "apps": on_gone, "stranded": dict(self._stranded),
                "moved": dict(self._moved), "back": sorted(self._back_since)}
        if new or on_gone or self._stranded:
            parts = []
            for c in gone:
                apps = on_gone.get(c, [])
                parts.append(f"{c} is gone from discovery" +
                             (f" with {', '.join(apps)} placed on it" if apps else ""))
            if self._stranded:
                parts.append("fit on no card: " + ", ".join(
                    f"{a} (was on {c})" for a, c in sorted(self._stranded.items())))
            return Finding(self.name, False, "; ".join(parts), fault="accelerator_lost",
                           data=data)
        if not marked:
            return Finding(self.name, True, f"{len(gpus)} accelerator card(s) present: "
                           + ", ".join(c.id for c in gpus), data=data)
        parts = []
        for c in sorted(marked):
            moved = sorted(a for a, m in self._moved.items() if m == c)
            if c in self._back_since:
                left = self.return_after_s - (now - self._back_since[c])
                parts.append(f"{c} back; " + (f"{', '.join(moved)} move back in {left:.0f} s"
                                              if moved else "nothing to move back"))
            else:
                parts.append(f"{c} lost" + (f"; {', '.join(moved)} serve elsewhere"
                                            if moved else ""))
        return Finding(self.name, True, "; ".join(parts), data=data)

    # -- the remedy: off the lost card ----------------------------------------------
    def heal(self, finding: Finding) -> str:
        gone = list(finding.data.get("lost") or [])
        marked = self.placement.lost()
        done = []
        for card in gone:
            if card not in marked:
                self.placement.set_lost(card)
                self.stats["lost"] += 1
                done.append(f"{card} marked lost")
        moving: dict[str, str] = {}
        for card in gone:
            for app in self.placement.apps_on(card):
                moving[app] = card
        for app, card in self._stranded.items():
            # its card is back: no need to wait before placing it again
            if card not in gone and card in self.placement.lost():
                self.placement.set_lost(card, False)
                self._back_since.pop(card, None)
                self.stats["returned"] += 1
                done.append(f"{card} back")
            moving.setdefault(app, card)
        self.on_change()
        if moving:
            self.reconciler.relocate(sorted(moving)).wait(self.heal_wait_s)
        errors = {r.name: r.error for r in self.reconciler.reports()}
        for app, card in sorted(moving.items()):
            sl = self.placement.get(app)
            if sl is None:
                if app not in self._stranded:
                    self.stats["unplaced"] += 1
                self._stranded[app] = card
                done.append(f"{app} not placed ({errors.get(app) or 'fits on no card'}); "
                            "its worker stopped, reported failed")
            elif sl.card == card:
                if card in self.placement.lost():
                    done.append(f"{app} still on lost {card} (not moved in "
                                f"{self.heal_wait_s:g} s)")
                else:
                    self._stranded.pop(app, None)
                    done.append(f"{app} placed on {card} again")
            else:
                self._stranded.pop(app, None)
                if card in self.placement.lost():
                    self._moved[app] = card
                    self.stats["moved"] += 1
                done.append(f"moved {app} from {card} to {sl.card} ({sl.describe()})")
        if not moving and gone:
            done.append("no app was placed on it")
        self.on_change()
        return "; ".join(done) or "nothing to do"

    # -- upkeep: back onto the card when it returns -----------------------------------
    def after_ok(self, finding: Finding) -> None:
        now = time.monotonic()
        for card, since in sorted(self._back_since.items()):
            if now - since < self.return_after_s:
                continue
            self.placement.set_lost(card, False)
            del self._back_since[card]
            self.stats["returned"] += 1
            apps = sorted(a for a, c in self._moved.items() if c == card)
            if apps:
                self.reconciler.relocate(apps).wait(self.heal_wait_s)
            back, stayed = [], {}
            for app in apps:
                sl = self.placement.get(app)
                if sl is not None and sl.card == card:
                    back.append(app)
                    self.stats["moved_back"] += 1
                else:
                    stayed[app] = sl.card if sl is not None else None
                del self._moved[app]
            logger.warning("card %s is back; moved back: %s; stayed: %s", card,
                           back or "none", stayed or "none")
            self.on_change()
            if self.emit_event is not None:
                try:
                    self.emit_event("accelerator_returned", severity="info", data={
                        "card": card, "moved_back": back, "stayed": stayed,
                        "present_for_s": round(now - since, 1)})
                except Exception:  # noqa: BLE001 - the event is a report, not the remedy
                    logger.exception("accelerator_returned not emitted")
