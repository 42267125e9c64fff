"""Chunked, resumable blob transfer cloud -> edge over MQTT, pulled by the edge.

The protocol, on two node-scoped topics:

- edge -> cloud ``blob/request``: :class:`~cloud_sync.schemas.BlobRequest`, "send me
  ``length`` bytes of blob ``sha256`` from ``offset`` in chunks of ``chunk_size``";
- cloud -> edge ``blob/chunk``: one binary frame per chunk
  (:func:`~cloud_sync.schemas.encode_chunk`), or a single header with ``error`` set
  (``unknown_blob``, ``bad_range``) when the request cannot be served.

The edge (:class:`BlobFetcher`) keeps up to ``window`` chunks requested ahead of
what it has written, writes only the chunk at the offset it expects (duplicates
and out-of-order frames are dropped and counted: they can never corrupt the
file), and asks again from where it is after ``chunk_timeout`` without progress
or after a reconnect. Bytes land in ``<dest>/<sha>.part``; a later fetch, in this
process or the next, resumes from its size. The whole file is checked against
its sha256 and size before it is renamed to ``<dest>/<sha>``.

The cloud (:class:`BlobServer`) parses requests on the network thread and serves
them from worker threads through a bounded queue: files are never read on the
network thread, and a flood of requests is dropped and counted, not buffered.
``lookup`` runs on those worker threads; the server does not re-hash what it
serves (the fetcher verifies). Requests it cannot answer for a transient reason
(offline, read error) get no answer: the fetcher asks again after its timeout.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from . import schemas
from .connection import MqttConnection
from .errors import BlobError, MessageRejected
from .topics import Topics

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


class BlobServer:
    """Cloud side: answers blob requests from every node with chunks."""

    def __init__(self, conn: MqttConnection, topics: Topics,
                 lookup: Callable[[str], Path | None], *, shared_group: str | None = None,
                 max_chunk: int = schemas.MAX_CHUNK_BYTES,
                 workers: int = 2, max_queue: int = 1000) -> None:
        self._conn = conn
        self._topics = topics
        self._lookup = lookup
        self._filter = topics.shared(shared_group, topics.all_nodes("blob/request"))
        self._max_chunk = min(max_chunk, schemas.MAX_CHUNK_BYTES)
        self._workers = workers
        self._queue: queue.Queue[tuple[str, schemas.BlobRequest]] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._subscribed = False
        self.stats: Counter[str] = Counter()

    def start(self) -> None:
        self._stop.clear()
        if not self._subscribed:
            self._conn.subscribe(self._filter, self._on_request, qos=1)
            self._subscribed = True
        for i in range(self._workers):
            t = threading.Thread(target=self._work, name=f"blob-server-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def _on_request(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            node_id, kind = self._topics.parse(topic)
            if kind != "blob/request":
                raise MessageRejected("bad_topic", f"not a blob request topic: {topic!r}")
            req = schemas.parse(schemas.BlobRequest, payload)
        except MessageRejected as err:
            self._count(f"bad_request_{err.reason}")
            logger.warning("blob server: bad request on %s dropped: %s", topic, err)
            return
        try:
            self._queue.put_nowait((node_id, req))
        except queue.Full:
            self._count("dropped_busy")
            logger.warning("blob server: busy, dropped request from %s for %s",
                           node_id, req.sha256[:12])

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                node_id, req = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._serve(node_id, req)
            except Exception:  # noqa: BLE001 - one bad request must not kill the worker
                self._count("serve_error")
                logger.exception("blob server: serving %s to %s failed", req.sha256[:12], node_id)

    def _send(self, topic: str, header: schemas.ChunkHeader, data: bytes = b"") -> bool:
        if self._conn.publish(topic, schemas.encode_chunk(header, data), qos=1):
            return True
        self._count("publish_failed")  # the fetcher asks again after its timeout
        return False

    def _serve(self, node_id: str, req: schemas.BlobRequest) -> None:
        self._count("requests")
        out = self._topics.blob_chunk(node_id)
        path = self._lookup(req.sha256)
        if path is None:
            self._count("unknown_blob")
            logger.info("blob server: %s asked for unknown blob %s", node_id, req.sha256[:12])
            self._send(out, schemas.ChunkHeader(sha256=req.sha256, offset=req.offset, size=0,
                                                length=0, error="unknown_blob"))
            return
        chunk = min(req.chunk_size, self._max_chunk)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if req.offset >= size:
                self._count("bad_range")
                self._send(out, schemas.ChunkHeader(sha256=req.sha256, offset=req.offset, size=size,
                                                    length=0, error="bad_range"))
                return
            end = min(size, req.offset + req.length)
            offset = req.offset
            f.seek(offset)
            while offset < end and not self._stop.is_set():
                data = f.read(min(chunk, end - offset))
                if not data:
                    break
                header = schemas.ChunkHeader(sha256=req.sha256, offset=offset, size=size,
                                             length=len(data))
                if not self._send(out, header, data):
                    return
                offset += len(data)
                self._count("chunks_sent")
                self._count("bytes_sent", len(data))


class _Transfer:
    """Frames for one blob being fetched, handed from the network thread."""

    def __init__(self, maxsize: int) -> None:
        self.frames: queue.Queue[tuple[schemas.ChunkHeader, bytes]] = queue.Queue(maxsize=maxsize)


class BlobFetcher:
    """Edge side: downloads blobs by sha256 into ``dest_dir``, resumably."""

    def __init__(self, conn: MqttConnection, topics: Topics, node_id: str, dest_dir: Path, *,
                 chunk_size: int = 256 * 1024, window: int = 8, chunk_timeout: float = 5.0) -> None:
        if not 1024 <= chunk_size <= schemas.MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_size must be 1024..{schemas.MAX_CHUNK_BYTES}")
        if not 1 <= window * chunk_size <= 64 * schemas.MAX_CHUNK_BYTES:
            raise ValueError("window * chunk_size must be at most 64 MiB")
        self._conn = conn
        self._topics = topics
        self.node_id = node_id
        self.dest_dir = Path(dest_dir)
        self.dest_dir.mkdir(parents=True, exist_ok=True)
        self.chunk_size = chunk_size
        self.window = window
        self.chunk_timeout = chunk_timeout
        self._active: dict[str, _Transfer] = {}
        self._sha_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._connects = 0  # bumped on every (re)connect
        self._subscribed = False
        self._stop = threading.Event()
        self.stats: Counter[str] = Counter()

    def start(self) -> None:
        self._stop.clear()
        if not self._subscribed:
            self._conn.on_connect(self._on_connect)
            self._conn.subscribe(self._topics.blob_chunk(self.node_id), self._on_chunk, qos=1)
            self._subscribed = True

    def stop(self) -> None:
        """Make running fetches give up (``BlobError('stopped')``, .part kept)."""
        self._stop.set()

    def fetch(self, sha256: str, size: int, progress: Progress | None = None,
              timeout: float | None = None, cancel: threading.Event | None = None) -> Path:
        """Download blob ``sha256`` of ``size`` bytes; return ``dest_dir/<sha256>``.

        Blocks. Raises :class:`BlobError` with reason ``unknown_blob``,
        ``hash_mismatch`` (the .part is deleted), ``size_mismatch``, ``timeout``,
        ``cancelled`` or ``stopped`` (the .part is kept for a later resume).
        """
        if not re.fullmatch(schemas.SHA256_RE.strip("^$"), sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        final = self.dest_dir / sha256
        with self._lock:
            sha_lock = self._sha_locks.setdefault(sha256, threading.Lock())
        with sha_lock:  # a second fetch of the same blob waits and reuses the file
            if final.exists():
                if final.stat().st_size == size and _sha256_file(final) == sha256:
                    self._count("already_present")
                    return final
                final.unlink()
            transfer = _Transfer(maxsize=4 * self.window)
            with self._lock:
                self._active[sha256] = transfer
            try:
                deadline = None if timeout is None else time.monotonic() + timeout
                self._download(sha256, size, transfer, progress, deadline, cancel)
            except BlobError:
                part = self._part(sha256)
                if part.exists() and part.stat().st_size == 0:
                    part.unlink()  # nothing to resume: leave no clutter
                raise
            finally:
                with self._lock:
                    del self._active[sha256]
            os.replace(self._part(sha256), final)
            _fsync_dir(self.dest_dir)
            self._count("fetched")
            return final

    # -- fetch thread ------------------------------------------------------------
    def _part(self, sha256: str) -> Path:
        return self.dest_dir / f"{sha256}.part"

    def _download(self, sha256: str, size: int, transfer: _Transfer, progress: Progress | None,
                  deadline: float | None, cancel: threading.Event | None) -> None:
        part = self._part(sha256)
        hasher = hashlib.sha256()
        offset = _resume(part, size, hasher)
        if offset:
            self._count("resumed_bytes", offset)
            logger.info("blob %s: resuming at %d of %d bytes", sha256[:12], offset, size)
            if progress:
                progress(offset, size)
        span = self.window * self.chunk_size
        with open(part, "ab") as f:
            requested_to = offset  # end of what we have asked for
            connects, last_progress, need_request = self._connects, time.monotonic(), True
            while offset < size:
                now = time.monotonic()
                self._check_abort(sha256, deadline, cancel, now)
                if connects != self._connects:
                    connects, need_request = self._connects, True
                    self._count("rerequest_reconnect")
                elif not need_request and now - last_progress > self.chunk_timeout:
                    need_request, last_progress = True, now
                    self._count("rerequest_timeout")
                if need_request:  # (re)start the window from where we are
                    need_request = not self._request(sha256, offset, size)
                    requested_to = offset if need_request else min(size, offset + span)
                elif (requested_to < size and requested_to - offset <= span // 2
                      and self._request(sha256, requested_to, size)):  # keep the window full
                    requested_to = min(size, requested_to + span)
                try:
                    header, data = transfer.frames.get(timeout=0.1)
                except queue.Empty:
                    continue
                if header.error:
                    raise BlobError(sha256, header.error)
                if header.size != size:
                    logger.warning("blob %s: expected %d bytes, the cloud has %d",
                                   sha256[:12], size, header.size)
                    raise BlobError(sha256, "size_mismatch")
                if header.offset != offset or not data or offset + len(data) > size:
                    self._count("chunk_duplicate" if header.offset < offset else
                                "chunk_out_of_order" if header.offset > offset else "chunk_bad")
                    continue
                f.write(data)
                hasher.update(data)
                offset += len(data)
                last_progress = time.monotonic()
                self._count("chunks_received")
                self._count("bytes_received", len(data))
                if progress:
                    progress(offset, size)
            f.flush()
            os.fsync(f.fileno())
        if hasher.hexdigest() != sha256:
            part.unlink(missing_ok=True)
            self._count("hash_mismatch")
            logger.warning("blob %s: hash mismatch, discarded the download", sha256[:12])
            raise BlobError(sha256, "hash_mismatch")

    def _check_abort(self, sha256: str, deadline: float | None, cancel: threading.Event | None,
                     now: float) -> None:
        if self._stop.is_set():
            raise BlobError(sha256, "stopped")
        if cancel is not None and cancel.is_set():
            raise BlobError(sha256, "cancelled")
        if deadline is not None and now >= deadline:
            self._count("timeout")
            raise BlobError(sha256, "timeout")

    def _request(self, sha256: str, offset: int, size: int) -> bool:
        req = schemas.BlobRequest(sha256=sha256, offset=offset, chunk_size=self.chunk_size,
                                  length=min(self.window * self.chunk_size, size - offset))
        if not self._conn.publish(self._topics.blob_request(self.node_id), req.to_bytes(), qos=1):
            return False  # offline: asked again on the next round
        self._count("requests")
        return True

    # -- network thread -----------------------------------------------------------
    def _on_connect(self) -> None:
        self._connects += 1

    def _on_chunk(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            header, data = schemas.decode_chunk(payload)
        except MessageRejected as err:
            self._count(f"frame_{err.reason}")
            logger.warning("blob fetcher: dropped a bad frame on %s: %s", topic, err)
            return
        with self._lock:
            transfer = self._active.get(header.sha256)
        if transfer is None:
            self._count("chunk_unexpected")
            return
        try:
            transfer.frames.put_nowait((header, data))
        except queue.Full:
            self._count("chunk_queue_full")

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n


def _resume(part: Path, size: int, hasher: hashlib._Hash) -> int:
    """Feed what ``part`` already holds to ``hasher``; return its length."""
    try:
        have = part.stat().st_size
    except FileNotFoundError:
        return 0
    if have > size:
        logger.warning("blob %s: .part larger than the blob, starting over", part.name)
        part.unlink()
        return 0
    with open(part, "rb") as f:
        while block := f.read(1 << 20):
            hasher.update(block)
    return have


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
