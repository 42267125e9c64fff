"""Camera frames read straight from a stream's shared-memory ring (the ``classify_frame`` op).

The agent sends a worker only where a frame sits -- ``ring`` (the segment's
name), ``owner`` (the stream's ring family), ``gen`` (``[incarnation, ring
generation]``, growing with every new ring of the stream), ``slot``, ``seq``,
``shape``, ``dtype`` -- and the worker reads the pixels itself: no copy in the
agent, no pixels on the socket. :class:`RingCache` keeps one read-only mapping
per stream: attached on first use, replaced when a newer ring of the same stream
shows up (the capture process restarted or needed bigger slots), closed when the
agent says the stream stopped (``release_frames``) and only once no request is
still reading it. The worker takes no lock the capture process knows of and
never writes to the ring, so nothing it does can hold up or break a capture.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from ..streams.ring import FrameRing
from .errors import BadInput, FrameUnavailable

logger = logging.getLogger(__name__)

#: ring names the agent's capture processes make: aidc<token>_<stream id>_<incarnation>_<gen>
_RING_NAME = re.compile(r"^aidc[A-Za-z0-9]+_[A-Za-z0-9_.-]{1,200}$")
#: rings kept mapped at most (one per stream feeding this worker); the least recently
#: used beyond this is closed (it is re-attached if its stream sends again)
MAX_RINGS = 64


@dataclass(frozen=True)
class FrameRequest:
    ring: str
    owner: str
    gen: tuple[int, int]
    slot: int
    seq: int
    shape: tuple[int, ...]

    @classmethod
    def parse(cls, msg: dict) -> FrameRequest:
        """The reference in a ``classify_frame`` message; :class:`BadInput` saying what is wrong."""
        try:
            ring, owner = msg["ring"], msg["owner"]
            gen = tuple(int(g) for g in msg["gen"])
            slot, seq = int(msg["slot"]), int(msg["seq"])
            shape = tuple(int(d) for d in msg["shape"])
            dtype = msg.get("dtype", "uint8")
        except (KeyError, TypeError, ValueError) as err:
            raise BadInput("classify_frame needs ring, owner, gen [incarnation, generation], "
                           f"slot, seq and shape: {type(err).__name__}: {err}") from err
        if not (isinstance(ring, str) and isinstance(owner, str) and _RING_NAME.match(ring)
                and ring.startswith(owner + "_")):
            raise BadInput(f"{ring!r} is not the name of a stream's frame ring (owner {owner!r})")
        if len(gen) != 2 or slot < 0 or seq < 0:
            raise BadInput(f"bad frame reference: gen {list(gen)}, slot {slot}, seq {seq}")
        if dtype != "uint8":
            raise BadInput(f"frames are uint8 pixels, not {dtype}")
        if len(shape) not in (2, 3) or any(d <= 0 for d in shape) or (
                len(shape) == 3 and shape[2] not in (1, 3)):
            raise BadInput(f"a frame's shape is [height, width] or [height, width, 1|3], "
                           f"not {list(shape)}")
        return cls(ring, owner, gen, slot, seq, shape)


class _Entry:
    __slots__ = ("name", "gen", "ring", "users", "retired")

    def __init__(self, name: str, gen: tuple[int, int], ring: FrameRing) -> None:
        self.name, self.gen, self.ring = name, gen, ring
        self.users = 0
        self.retired = False


class RingCache:
    """The frame rings this worker reads: one read-only mapping per stream (``owner``)."""

    def __init__(self, max_rings: int = MAX_RINGS) -> None:
        self.max_rings = max_rings
        self._lock = threading.Lock()
        self._rings: OrderedDict[str, _Entry] = OrderedDict()
        self.attached = 0  #: rings attached so far (a new one per stream restart)

    def __len__(self) -> int:
        with self._lock:
            return len(self._rings)

    def names(self) -> dict[str, str]:
        """``{owner: ring name}`` of the rings mapped now."""
        with self._lock:
            return {owner: e.name for owner, e in self._rings.items()}

    @contextmanager
    def open(self, req: FrameRequest) -> Iterator[FrameRing]:
        """The ring ``req`` names, mapped (attached on first use) and kept open meanwhile.

        :class:`FrameUnavailable` (410) when it is gone or a newer ring of the same
        stream replaced it.
        """
        entry = self._acquire(req)
        try:
            yield entry.ring
        finally:
            with self._lock:
                entry.users -= 1
                if entry.retired and entry.users == 0:
                    entry.ring.close()

    def _use(self, req: FrameRequest) -> _Entry | None:
        """The cached entry for ``req`` (one more user), None to attach; lock held."""
        entry = self._rings.get(req.owner)
        if entry is None:
            return None
        if entry.name == req.ring:
            entry.users += 1
            self._rings.move_to_end(req.owner)
            return entry
        if entry.gen > req.gen:
            raise FrameUnavailable(410, f"frame ring {req.ring!r} was replaced by {entry.name!r} "
                                        "(the capture process restarted or resized its ring)")
        return None

    def _acquire(self, req: FrameRequest) -> _Entry:
        with self._lock:
            entry = self._use(req)
        if entry is not None:
            return entry
        try:  # outside the lock: a system call, and other streams keep going meanwhile
            ring = FrameRing.attach(req.ring, readonly=True)
        except FileNotFoundError as err:
            raise FrameUnavailable(410, f"frame ring {req.ring!r} is gone (its capture process "
                                        "stopped or restarted)") from err
        except (OSError, ValueError) as err:
            raise FrameUnavailable(410, f"cannot attach frame ring {req.ring!r}: {err}") from err
        with self._lock:
            try:
                entry = self._use(req)  # another request attached it meanwhile
            except FrameUnavailable:
                ring.close()
                raise
            if entry is not None:
                ring.close()
                return entry
            entry = _Entry(req.ring, req.gen, ring)
            entry.users = 1
            old = self._rings.pop(req.owner, None)
            self._rings[req.owner] = entry
            self.attached += 1
            if old is not None:
                self._retire(old)
            while len(self._rings) > self.max_rings:
                self._retire(self._rings.popitem(last=False)[1])
        logger.debug("attached frame ring %s (%d slots of %d bytes)", req.ring, ring.slots,
                     ring.slot_bytes)
        return entry

    def _retire(self, entry: _Entry) -> None:
        """Close ``entry``'s mapping now, or when its last reader is done; lock held."""
        entry.retired = True
        if entry.users == 0:
            entry.ring.close()

    def release(self, owner: str, incarnation: int | None = None) -> bool:
        """Unmap the ring of ``owner`` (its capture process ended) -- only if it belongs to
        ``incarnation`` or an earlier one, when given (a newer one is left mapped);
        True if one was unmapped."""
        with self._lock:
            entry = self._rings.get(owner)
            if entry is None or (incarnation is not None and entry.gen[0] > incarnation):
                return False
            del self._rings[owner]
            self._retire(entry)
        return True

    def close(self) -> None:
        with self._lock:
            entries, self._rings = list(self._rings.values()), OrderedDict()
            for entry in entries:
                self._retire(entry)
