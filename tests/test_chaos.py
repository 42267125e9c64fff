"""A bounded chaos run on a whole site (bench/chaos.py, small): zero loss, zero duplicates.

Real parts only: Mosquitto, the AppStore, the edge agent as a process under the
stand-in for systemd (bench/stack.py), a camera stream from a looping video
file of held-out digits, HTTP classification requests making hard examples.
For ~30 s faults come every 3-6 s, each kind once before any again (fixed
seed): Mosquitto stopped and started, kill -9 of the app's worker, the broker
link held half-open, kill -9 of the agent. Then the node drains, and every
sample and event it committed to its own database must be in the AppStore,
once, and every label a technician gave meanwhile (through the node's
labelling API) must be the sample's label there. No timing is asserted: the waits are generous for a loaded 2-core box.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import chaos  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None,
                                 reason="needs Mosquitto")


@pytest.mark.timeout(240)
def test_a_chaos_run_loses_and_duplicates_no_sample_and_no_event():
    # a short path: the service manager's notify socket lives there (108 bytes at most)
    site = Path(tempfile.mkdtemp(prefix="aidc-chaos-"))
    try:
        r = chaos.run(duration=30, seed=7, rate=3.0, gap=(3.0, 6.0), stream_fps=3.0,
                      probe_every=1.0, drain_s=120, workdir=site, broker_down=(1.0, 3.0))
    finally:
        shutil.rmtree(site, ignore_errors=True)
    print(chaos.summary(r))
    # the chaos happened, and while the node worked
    assert sum(r["faults"].values()) >= 3, r["injections"]
    assert r["agent_starts"] >= 1
    assert r["load"]["requests_answered"] > 0
    assert r["samples"]["produced"] > 0 and r["events"]["produced"] > 0
    assert {"cam-1", "v2-classify"} <= set(r["load"]["samples_by_source"]), r["load"]
    # nothing lost, nothing stored twice, nothing from nowhere
    for kind in ("samples", "events"):
        t = r[kind]
        assert t["lost"] == 0, (kind, t)
        assert t["duplicated"] == 0, (kind, t)
        assert t["extra"] == 0, (kind, t)
        assert t["arrived"] == t["produced"], (kind, t)
    # every label a technician gave during the chaos is the sample's label in the cloud
    assert r["labels"]["labelled_at_edge"] > 0
    assert r["labels"]["missing_in_cloud"] == 0, r["labels"]
    assert chaos.ok(r)
