"""bench/fleet_sim.py end to end with a small fleet: real Mosquitto, the real
AppStore in its own process, 20 simulated nodes, a rollout by per-node assigns
and one by ``POST /api/v1/rollouts``.

A smoke test that the simulator works (CI proves the bench runs), not a timed
one: the figures are the bench's job (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.timeout(90)
@pytest.mark.skipif(not shutil.which("mosquitto"), reason="needs Mosquitto (scripts/test.sh)")
def test_fleet_sim_small_fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # on sys.path while the test runs: the simulator's spawned processes import it
    monkeypatch.syspath_prepend(str(BENCH))
    import fleet_sim
    results = fleet_sim.main(["--sizes", "20", "--rollouts", "1",
                              "--rollout-api", "per-node,rollouts", "--idle", "0",
                              "--heartbeat", "1", "--connect-timeout", "30",
                              "--rollout-timeout", "30", "--out", str(tmp_path), "--quiet"])
    (r,) = results
    assert not r.get("error"), r.get("error")
    assert r["reference"]["ready"] == 20 and r["reference"]["connect_s"] is not None
    c = r["connect"]
    assert c["ready"] == 20 and c["connect_s"] is not None and c["registered_s"] is not None
    assert [(ro["version"], ro["api"]) for ro in r["rollouts"]] == [
        ("1.0.0", "per-node"), ("1.0.1", "rollouts")]
    for ro in r["rollouts"]:
        # every node said it runs the new version, and the AppStore's registry agrees
        assert ro["applied"] == 20 and ro["store_seen"] == 20 and ro["errors"] == 0
        assert ro["nodes_s"] is not None and ro["store_s"] is not None
    assert r["rollouts"][0]["calls"] == 20  # one PUT per node
    assert r["rollouts"][1]["calls"] == 1 and r["rollouts"][1]["engine_state"] == "succeeded"
    assert r["store_stats"]["counts"]["nodes"] == 20
    assert r["store_stats"]["counts"]["online"] == 20
    # one desired state per node and rollout, none other (a fresh database per size)
    assert r["sim_stats"].get("rejected", 0) == 0 and r["sim_stats"]["desired"] == 40
    # the report files were written
    md = list(tmp_path.glob("fleet-*.md"))
    assert len(md) == 1 and "| 20 |" in md[0].read_text()
    data = json.loads(next(tmp_path.glob("fleet-*.json")).read_text())
    assert data["results"][0]["nodes"] == 20
