"""A ring of frame slots in POSIX shared memory: pixels go here, names go through queues.

Layout: a 64-byte header (magic, slot count, slot bytes), then per slot a
64-byte header (``seq`` int64, ``ts`` float64, height, width, channels int32)
followed by the pixels. One writer (the capture process); readers are the agent
(which copies a frame out only for in-agent inference) and the app's model
worker, which maps the ring read-only and preprocesses the pixels straight from
the slot (:meth:`FrameRing.view`, then :meth:`FrameRing.holds`). The writer
marks a slot ``seq = -1`` while it copies, then stores the frame's ``seq``; a
reader checks ``seq`` before and after it reads (a seqlock), so a slot
overwritten under the reader is detected, never handed on torn. Readers never
write and take no lock: nothing they do can hold up the capture process.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from multiprocessing import resource_tracker, shared_memory

import _posixshmem

import numpy as np

logger = logging.getLogger(__name__)

MAGIC = 0x41494443_52494E47  # "AIDCRING"
HEADER = 64
SLOT_HEADER = 64
_BUSY = -1
_SEQ = struct.Struct("=q")  # a slot's seq, read without making an array (the hot check)


def _align(n: int, to: int = 64) -> int:
    return (n + to - 1) // to * to


class FrameRing:
    """``slots`` frames of at most ``slot_bytes`` each, shared between two processes."""

    def __init__(self, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self.shm = shm
        self.owner = owner
        head = np.ndarray((3,), np.int64, shm.buf, 0)
        if int(head[0]) != MAGIC:
            raise ValueError(f"shared memory {shm.name!r} is not a frame ring")
        self.slots, self.slot_bytes = int(head[1]), int(head[2])
        self._stride = SLOT_HEADER + _align(self.slot_bytes)

    @property
    def name(self) -> str:
        return self.shm.name

    @classmethod
    def create(cls, name: str, slots: int, slot_bytes: int) -> FrameRing:
        stride = SLOT_HEADER + _align(slot_bytes)
        shm = shared_memory.SharedMemory(name=name, create=True, size=HEADER + slots * stride)
        head = np.ndarray((3,), np.int64, shm.buf, 0)
        head[1], head[2] = slots, slot_bytes
        for i in range(slots):  # no slot holds a frame yet
            np.ndarray((1,), np.int64, shm.buf, HEADER + i * stride)[0] = _BUSY
        head[0] = MAGIC
        return cls(shm, owner=True)

    @classmethod
    def attach(cls, name: str, readonly: bool = False) -> FrameRing:
        """Open an existing ring; FileNotFoundError when it is gone.

        Mapped without :class:`SharedMemory` so the reader never registers the
        writer's segment with the resource tracker (Python < 3.13 does on attach).
        ``readonly`` maps it read-only (the model worker: it cannot scribble on
        the capture process's frames).
        """
        return cls(_Mapping(name, readonly), owner=False)

    def _seq(self, slot: int) -> np.ndarray:
        return np.ndarray((1,), np.int64, self.shm.buf, HEADER + slot * self._stride)

    def fits(self, frame: np.ndarray) -> bool:
        return frame.nbytes <= self.slot_bytes

    def write(self, slot: int, seq: int, frame: np.ndarray, ts: float) -> None:
        base = HEADER + slot * self._stride
        seq_cell = self._seq(slot)
        seq_cell[0] = _BUSY
        np.ndarray((1,), np.float64, self.shm.buf, base + 8)[0] = ts
        dims = (frame.shape + (1,))[:3]
        np.ndarray((3,), np.int32, self.shm.buf, base + 16)[:] = dims
        dst = np.ndarray(frame.shape, np.uint8, self.shm.buf, base + SLOT_HEADER)
        np.copyto(dst, frame)
        seq_cell[0] = seq

    def holds(self, slot: int, seq: int) -> bool:
        """Whether ``slot`` holds frame ``seq`` now (not overwritten, not being written)."""
        return (0 <= slot < self.slots
                and _SEQ.unpack_from(self.shm.buf, HEADER + slot * self._stride)[0] == seq)

    def view(self, slot: int, seq: int, shape: tuple[int, ...]) -> np.ndarray | None:
        """Frame ``seq`` in ``slot`` as a view of the shared memory (no copy), or None if
        the slot no longer holds it or ``shape`` does not fit a slot.

        The writer may overwrite the slot at any time: whatever is computed from
        the view is valid only if :meth:`holds` is still true afterwards.
        """
        if (not 0 <= slot < self.slots or len(shape) not in (2, 3)
                or any(int(d) <= 0 for d in shape)
                or int(np.prod(shape)) > self.slot_bytes or not self.holds(slot, seq)):
            return None
        return np.ndarray(tuple(int(d) for d in shape), np.uint8, self.shm.buf,
                          HEADER + slot * self._stride + SLOT_HEADER)

    def read(self, slot: int, seq: int, shape: tuple[int, ...]) -> np.ndarray | None:
        """A private copy of frame ``seq`` in ``slot``, or None if it was overwritten."""
        src = self.view(slot, seq, shape)
        if src is None:
            return None
        out = src.copy()
        del src
        return out if self.holds(slot, seq) else None

    def close(self) -> None:
        try:
            self.shm.close()
        except BufferError:  # a view still exported: the mapping goes with the process
            logger.debug("ring %s still has views; left mapped", self.shm.name)

    def unlink(self) -> None:
        try:
            self.shm.unlink()
        except FileNotFoundError:
            pass


class _Mapping:
    """A mapping (read-write, or read-only) of an existing POSIX shared-memory segment."""

    def __init__(self, name: str, readonly: bool = False) -> None:
        self.name = name
        fd = _posixshmem.shm_open("/" + name, os.O_RDONLY if readonly else os.O_RDWR, mode=0o600)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER:
                raise ValueError(f"shared memory {name!r} is not a frame ring ({size} bytes)")
            self._mmap = mmap.mmap(fd, size, access=mmap.ACCESS_READ if readonly
                                   else mmap.ACCESS_WRITE)
        finally:
            os.close(fd)
        self.buf = memoryview(self._mmap)  # read-only for an ACCESS_READ mapping

    def close(self) -> None:
        self.buf.release()  # BufferError while a view is alive: the caller keeps it mapped
        self._mmap.close()

    def unlink(self) -> None:
        raise PermissionError("only the writer unlinks its ring")


def unlink_ring(name: str) -> bool:
    """Remove the segment ``name`` if it still exists (cleanup after a killed writer).

    The writer registered it with the resource tracker its process shared with
    ours (``spawn``), so it is unregistered here, exactly once.
    """
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        return False
    resource_tracker.unregister("/" + name, "shared_memory")
    return True
