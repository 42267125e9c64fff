"""Chunked, resumable blob transfer over a real Mosquitto."""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from cloud_sync import schemas
from cloud_sync.blobs import BlobFetcher, BlobServer
from cloud_sync.connection import MqttConnection
from cloud_sync.errors import BlobError
from cloud_sync.topics import Topics

NODE = "edge-1"
MB = 1 << 20


def wait_for(pred, timeout: float = 10.0, every: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return bool(pred())


def make_conn(broker, name: str) -> MqttConnection:
    conn = MqttConnection(f"{name}-{uuid.uuid4().hex[:8]}", broker.host, broker.port,
                          min_backoff=0.05, max_backoff=0.5)
    conn.start()
    assert conn.wait_connected(5), "no connection to the test broker"
    return conn


class Store:
    """The cloud's blob store: files addressed by their sha256."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.files: dict[str, Path] = {}

    def add(self, data: bytes, sha: str | None = None) -> str:
        sha = sha or hashlib.sha256(data).hexdigest()
        path = self.root / sha
        path.write_bytes(data)
        self.files[sha] = path
        return sha

    def lookup(self, sha: str) -> Path | None:
        return self.files.get(sha)


class Rig:
    """A cloud (BlobServer on a shared subscription) and an edge (BlobFetcher)."""

    def __init__(self, broker, tmp_path: Path, topics: Topics, **fetcher_kw) -> None:
        self.broker, self.topics, self.tmp_path = broker, topics, tmp_path
        self.store = Store(tmp_path / "store")
        self.cloud = make_conn(broker, "cloud")
        self.server = BlobServer(self.cloud, topics, self.store.lookup, shared_group="appstore")
        self.server.start()
        self.requests: list[schemas.BlobRequest] = []  # what the cloud was asked, in order
        self.spy = make_conn(broker, "spy")
        self.spy.subscribe(topics.blob_request(NODE), self._on_request)
        self.dest = tmp_path / "blobs"
        self.edge, self.fetcher = self.new_fetcher(**fetcher_kw)
        time.sleep(0.1)  # let the SUBSCRIBEs reach the broker

    def new_fetcher(self, **kw) -> tuple[MqttConnection, BlobFetcher]:
        kw.setdefault("chunk_size", 64 * 1024)
        kw.setdefault("window", 4)
        kw.setdefault("chunk_timeout", 1.0)
        conn = make_conn(self.broker, "edge")
        fetcher = BlobFetcher(conn, self.topics, NODE, self.dest, **kw)
        fetcher.start()
        return conn, fetcher

    def _on_request(self, topic: str, payload: bytes, retained: bool) -> None:
        self.requests.append(schemas.parse(schemas.BlobRequest, payload))

    def close(self) -> None:
        self.fetcher.stop()
        self.server.stop()
        for c in (self.edge, self.spy, self.cloud):
            c.stop()


@pytest.fixture
def rig(shared_broker, tmp_path, prefix):
    r = Rig(shared_broker, tmp_path, Topics(prefix=prefix))
    yield r
    r.close()


def test_fetch_survives_broker_restart_mid_transfer(broker, tmp_path, prefix):
    """A model package is downloading when the broker restarts: the transfer
    picks up where it was after the reconnect and the file verifies."""
    rig = Rig(broker, tmp_path, Topics(prefix=prefix))
    data = os.urandom(3 * MB + 12345)
    sha = rig.store.add(data)
    restarted = []

    def progress(done: int, total: int) -> None:
        if done >= MB and not restarted:
            restarted.append(done)
            broker.restart()

    try:
        path = rig.fetcher.fetch(sha, len(data), progress=progress, timeout=12)
        assert path == rig.dest / sha and path.read_bytes() == data
        assert not (rig.dest / f"{sha}.part").exists()
        assert restarted and rig.edge.stats["connects"] >= 2
        s = rig.fetcher.stats
        assert s["rerequest_reconnect"] + s["rerequest_timeout"] >= 1
        assert s["bytes_received"] == len(data)  # nothing written twice
    finally:
        rig.close()


def test_resume_across_new_fetcher_keeps_part(rig):
    """A download interrupted (here: cancelled; in the field: a process restart)
    resumes from the bytes already on disk in a new fetcher, instead of
    downloading the whole package again over a slow uplink."""
    data = os.urandom(2 * MB + 777)
    sha = rig.store.add(data)
    cancel = threading.Event()

    def progress(done: int, total: int) -> None:
        if done >= MB:
            cancel.set()

    with pytest.raises(BlobError) as err:
        rig.fetcher.fetch(sha, len(data), progress=progress, cancel=cancel, timeout=10)
    assert err.value.reason == "cancelled"
    part = rig.dest / f"{sha}.part"
    have = part.stat().st_size
    assert MB <= have < len(data)
    rig.fetcher.stop()
    rig.edge.stop()

    rig.edge, rig.fetcher = rig.new_fetcher()  # a new process would do the same
    time.sleep(0.2)  # late chunks of the cancelled download drain away
    rig.requests.clear()
    path = rig.fetcher.fetch(sha, len(data), timeout=10)
    assert path.read_bytes() == data
    assert rig.fetcher.stats["resumed_bytes"] == have
    assert rig.fetcher.stats["bytes_received"] == len(data) - have
    assert rig.requests and min(r.offset for r in rig.requests) == have


def test_unknown_blob_fails_fast(rig):
    """Asking for a blob the cloud does not have fails at once with a clear
    reason, not after a long timeout."""
    sha = hashlib.sha256(b"nobody has this").hexdigest()
    t0 = time.monotonic()
    with pytest.raises(BlobError) as err:
        rig.fetcher.fetch(sha, 1000, timeout=10)
    assert err.value.reason == "unknown_blob"
    assert time.monotonic() - t0 < 0.9  # well under chunk_timeout
    assert list(rig.dest.iterdir()) == []  # no empty .part left behind
    assert rig.server.stats["unknown_blob"] == 1


def test_hash_mismatch_discards_the_download(rig):
    """Bytes that do not hash to the requested sha256 are never handed out: the
    fetch fails and the .part is deleted so the next try starts clean."""
    wanted = hashlib.sha256(b"the real package" * 1000).hexdigest()
    rig.store.add(os.urandom(16000), sha=wanted)  # the cloud serves the wrong bytes
    with pytest.raises(BlobError) as err:
        rig.fetcher.fetch(wanted, 16000, timeout=10)
    assert err.value.reason == "hash_mismatch"
    assert not (rig.dest / f"{wanted}.part").exists() and not (rig.dest / wanted).exists()


def test_corrupt_frames_are_counted_and_dropped(rig):
    """Garbage on the chunk topic is counted by reason and dropped; the fetcher
    keeps working."""
    out = rig.topics.blob_chunk(NODE)
    data = os.urandom(200_000)
    sha = rig.store.add(data)
    good = schemas.encode_chunk(
        schemas.ChunkHeader(sha256=sha, offset=0, size=len(data), length=1000), data[:1000])
    rig.cloud.publish(out, b"\x00garbage that is no frame")
    rig.cloud.publish(out, good[:-10])  # truncated: header length disagrees
    rig.cloud.publish(out, b"AIDC" + (20).to_bytes(4, "big") + b"{not json at all....}")
    assert wait_for(lambda: rig.fetcher.stats["frame_bad_frame"] == 2
                    and rig.fetcher.stats["frame_not_json"] == 1, 5), rig.fetcher.stats
    assert rig.fetcher.fetch(sha, len(data), timeout=10).read_bytes() == data


def test_out_of_order_and_duplicate_chunks_do_not_corrupt(shared_broker, tmp_path, prefix):
    """A cloud (or broker) that answers out of order and twice must not corrupt
    the file: only the chunk at the expected offset is written."""
    topics = Topics(prefix=prefix)
    data = os.urandom(10 * 4096 + 100)
    sha = hashlib.sha256(data).hexdigest()
    cloud = make_conn(shared_broker, "rogue-cloud")

    def answer(topic: str, payload: bytes, retained: bool) -> None:
        req = schemas.parse(schemas.BlobRequest, payload)
        offs = list(range(req.offset, min(len(data), req.offset + req.length), req.chunk_size))
        for off in offs[1:2] + offs + offs[:1]:  # one ahead, then all, then a duplicate
            chunk = data[off:off + req.chunk_size]
            head = schemas.ChunkHeader(sha256=sha, offset=off, size=len(data), length=len(chunk))
            cloud.publish(topics.blob_chunk(NODE), schemas.encode_chunk(head, chunk))

    cloud.subscribe(topics.blob_request(NODE), answer)
    edge = make_conn(shared_broker, "edge")
    fetcher = BlobFetcher(edge, topics, NODE, tmp_path / "blobs", chunk_size=4096, window=4,
                          chunk_timeout=1.0)
    fetcher.start()
    time.sleep(0.1)
    path = fetcher.fetch(sha, len(data), timeout=10)
    assert path.read_bytes() == data
    assert fetcher.stats["chunk_out_of_order"] >= 1 and fetcher.stats["chunk_duplicate"] >= 1
    edge.stop()
    cloud.stop()


def test_concurrent_fetches_of_different_blobs(rig):
    """The node pulls several apps at once: parallel fetches from different
    threads each get their own, correct file."""
    blobs = [os.urandom(300_000 + i) for i in range(3)]
    shas = [rig.store.add(b) for b in blobs]
    results: dict[str, bytes] = {}

    def run(sha: str, size: int) -> None:
        results[sha] = rig.fetcher.fetch(sha, size, timeout=10).read_bytes()

    threads = [threading.Thread(target=run, args=(s, len(b)))
               for s, b in zip(shas, blobs, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(12)
    assert [results.get(s) for s in shas] == blobs
    # fetching again is free: the verified file is reused
    assert rig.fetcher.fetch(shas[0], len(blobs[0])) == rig.dest / shas[0]
    assert rig.fetcher.stats["already_present"] == 1


def test_fetch_times_out_when_nobody_answers(shared_broker, tmp_path, prefix):
    """With no cloud listening the fetch gives up at its deadline (keeping its
    .part), after re-asking on every chunk_timeout."""
    topics = Topics(prefix=prefix)
    edge = make_conn(shared_broker, "edge")
    fetcher = BlobFetcher(edge, topics, NODE, tmp_path / "blobs", chunk_timeout=0.3)
    fetcher.start()
    sha = hashlib.sha256(b"x").hexdigest()
    with pytest.raises(BlobError) as err:
        fetcher.fetch(sha, 5000, timeout=1.0)
    assert err.value.reason == "timeout" and fetcher.stats["rerequest_timeout"] >= 2
    edge.stop()


def test_server_counts_bad_requests(rig):
    """A malformed request from a node is counted by reason and answered with
    nothing; the server keeps serving others."""
    rig.edge.publish(rig.topics.blob_request(NODE), b"{nope")
    bad = schemas.BlobRequest(sha256="0" * 64, offset=0, length=10, chunk_size=1024).to_bytes()
    rig.edge.publish(rig.topics.blob_request(NODE), bad.replace(b'"v":1', b'"v":9'))
    stats = rig.server.stats
    assert wait_for(lambda: stats["bad_request_not_json"] == 1
                    and stats["bad_request_unsupported_version"] == 1, 5), stats
    data = os.urandom(5000)
    sha = rig.store.add(data)
    assert rig.fetcher.fetch(sha, len(data), timeout=10).read_bytes() == data
