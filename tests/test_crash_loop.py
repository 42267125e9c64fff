"""A crash-looping version rolls back to the last known good one, on real parts:
Mosquitto, the AppStore, an edge agent and its worker processes; the crashes are
real ``kill -9`` of the new version's worker (the supervisor restarts it until its
budget is used up)."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from tests.appstore_support import digits_dir, wait_until  # noqa: F401
from tests.test_e2e import API, assign, jget, loop, node_app, v2_infer  # noqa: F401
from tests.test_edge_agent import _publish_version, _ready


def _worker_pid(agent, sha: str) -> int | None:
    for key, w in agent.supervisor.status().items():
        if key.endswith(sha[:12]) and w.get("state") == "ready" and w.get("pid"):
            return w["pid"]
    return None


def _events(store, type_: str) -> list[dict]:
    return [e for e in jget(f"{store.url}{API}/events")["events"] if e["type"] == type_]


@pytest.mark.timeout(300)
def test_a_crash_looping_version_rolls_back_to_the_last_known_good(loop, digits_dir, tmp_path):  # noqa: F811
    store, node = loop
    # the defaults: last known good after 60 s, 5 restarts in 60 s
    agent = node(supervision={"stable_s": 1.0, "restart_budget": 2})
    shas = {v: _publish_version(store, digits_dir, tmp_path, v) for v in ("1.0.0", "1.1.0")}
    x = np.load(digits_dir / "heldout.npz")["X_test"][:1]
    assign(store, "1.0.0")
    wait_until(lambda: _ready(store, "1.0.0"), timeout=90)
    wait_until(lambda: agent.reconciler._last_good.get("digits", {}).get("version")  # noqa: SLF001
               == "1.0.0", timeout=30)

    assign(store, "1.1.0")
    wait_until(lambda: _ready(store, "1.1.0"), timeout=90)
    t0 = None
    deadline = time.monotonic() + 120
    kills = 0
    while time.monotonic() < deadline:  # crash it each time the supervisor brings it back
        st = (agent.supervisor.status().get(f"digits@{shas['1.1.0'][:12]}") or {})
        if st.get("state") == "failed":
            break
        pid = _worker_pid(agent, shas["1.1.0"])
        if pid:
            os.kill(pid, signal.SIGKILL)
            kills += 1
            t0 = t0 or time.monotonic()
            time.sleep(0.3)
        time.sleep(0.05)
    assert kills >= 3, kills
    # the node serves 1.0.0 again and reports 1.1.0 failed, with why
    wait_until(lambda: v2_infer(agent.http_url, x)[1].get("model_version") == "1.0.0",
               timeout=60)
    healed = time.monotonic() - t0
    wait_until(lambda: (node_app(store) or {}).get("status") == "failed", timeout=30)
    app = node_app(store)
    assert app["version"] == "1.1.0" and "crash loop" in app["error"] and \
        "rolled back to 1.0.0" in app["error"], app
    ev = wait_until(lambda: _events(store, "app_rolled_back"), timeout=30)
    assert ev[0]["severity"] == "error" and ev[0]["data"]["to_version"] == "1.0.0"
    # not retried while the cloud still asks for 1.1.0; after an agent restart too
    time.sleep(2)
    assert v2_infer(agent.http_url, x)[1]["model_version"] == "1.0.0"
    agent.stop()
    agent = node(supervision={"stable_s": 1.0, "restart_budget": 2})
    wait_until(lambda: v2_infer(agent.http_url, x)[1].get("model_version") == "1.0.0",
               timeout=90)
    wait_until(lambda: (node_app(store) or {}).get("status") == "failed", timeout=30)
    assert node_app(store)["version"] == "1.1.0"
    # the cloud names another version: the mark is dropped, that version runs
    assign(store, "1.0.0")
    wait_until(lambda: _ready(store, "1.0.0"), timeout=60)
    assert agent.reconciler._crash_looped == {}  # noqa: SLF001
    print(f"crash loop: {kills} kills; serving the last good version {healed:.1f} s "
          "after the first crash")
