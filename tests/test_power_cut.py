"""A node killed at any moment of an update (fetch, verify, unpack, worker start,
swap) comes back runnable: it serves a version at once after its restart and
then the one the cloud wants. Real parts (bench/stack.py): Mosquitto, the
AppStore, the agent as a process restarted as its systemd unit says.

kill -9 is the closest to a power cut this box allows: the page cache survives it,
so what it proves is the ordering (stage, verify, rename, keep the old version);
that every rename is preceded by an fsync of the file and followed by one of its
directory is checked by reading cloud_sync/blobs.py and edge_node/reconciler.py."""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from stack import Stack, wait  # noqa: E402


@pytest.mark.timeout(420)
def test_killed_at_random_moments_of_updates_the_node_always_comes_back(tmp_path):
    rng = random.Random(6)
    s = Stack(tmp_path / "site").up()
    try:
        want = "1.0.0"
        for i in range(6):
            want = "1.1.0" if want == "1.0.0" else "1.0.0"
            starts = s.service.starts
            s.assign(want)
            time.sleep(rng.uniform(0.0, 1.2))  # somewhere in fetch/verify/unpack/start
            os.kill(s.service.pid, signal.SIGKILL)
            t0 = time.monotonic()
            wait(lambda: s.service.starts > starts, 30, "the restart")
            # runnable at once: it serves what it has (old or new), no download needed
            wait(lambda: s.probe.serving_since(t0) is not None, 90, f"#{i}: serving again")
            wait(lambda: s.probe.ok_now(want), 120, f"#{i}: serving {want}")
        apps = s.dir / "edge" / "apps" / "digits"
        left = sorted(p.name for p in apps.iterdir())
        assert not [n for n in left if n.endswith(".tmp")], left  # no half-unpacked dir
        blobs = s.dir / "edge" / "blobs"
        assert not list(blobs.glob("*.part")), list(blobs.iterdir())
    finally:
        s.down()
