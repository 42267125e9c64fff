"""The node's health page (/ui/health), driven in a real browser.

Headless Debian Chromium through chromedriver and Selenium (the fixture of
tests/test_ui_labelling.py), against a real agent (real broker, node.db, HTTP):
the page lists the checks; a fault injected for real -- the node's config file
truncated, first with no last good copy to put back, then with one -- is found by
"Run the checks now", journalled and left open by "Fix what fails" (with why), then
healed by it (with the remedy and its time); the page shows every step in the
journal, and every API error: a 503 of /api/faults (node.db unreadable) with the
faults it still returns, and a node that no longer answers.
"""

from __future__ import annotations

import re
import sqlite3

from flask import Flask

from edge_node.agent import NodeAgent
from edge_node.config import load_config
from edge_node.health.config_guard import last_good_path
from edge_node.ui import make_ui_blueprint
from tests.appstore_support import wait_until
from tests.test_e2e import jget
from tests.test_health_config import truncate, write_cfg
from tests.test_ui_labelling import browser  # noqa: F401

WAIT = 45  # seconds: generous, for a loaded 2-core box


def test_the_page_is_served_and_linked_from_the_other_pages():
    app = Flask("t")
    app.register_blueprint(make_ui_blueprint())
    c = app.test_client()
    html = c.get("/ui/health")
    assert html.status_code == 200 and html.mimetype == "text/html"
    text = html.get_data(as_text=True)
    refs = re.findall(r'(?:src|href)="([^"]+)"', text)
    assert "static/health.js" in refs and "static/health.css" in refs
    for ref in refs:
        if ref.startswith("static/"):
            assert c.get(f"/ui/{ref}").status_code == 200, ref
    assert 'href="alarms"' in text and 'href="labelling"' in text
    for page in ("alarms", "labelling"):
        assert 'href="health">Health →</a>' in c.get(f"/ui/{page}").get_data(as_text=True), page


def test_a_technician_sees_the_checks_and_a_real_fault_found_journalled_and_fixed(
        browser, tmp_path, shared_broker, prefix):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    cfg_file = tmp_path / "node.json"
    write_cfg(cfg_file, tmp_path / "edge", shared_broker, prefix)
    good = cfg_file.read_bytes()
    agent = NodeAgent(load_config(cfg_file), config_path=cfg_file)
    # after its first probe at start, only the page's buttons probe the config
    next(c for c in agent.health.checks if c.name == "config").interval_s = 3600
    agent.start()
    running = True
    try:
        wait_until(agent.conn.connected.is_set, timeout=WAIT)
        edge = agent.http_url
        b = browser
        wait = WebDriverWait(b, WAIT)

        def js(expr: str):
            return b.execute_script(f"return {expr};")

        def text(elem_id: str) -> str:
            return js(f"document.getElementById({elem_id!r}).innerText") or ""

        def until(cond, what: str):
            return wait.until(lambda d: cond(), what)

        def text_has(elem_id: str, *parts: str) -> None:
            until(lambda: all(p in text(elem_id) for p in parts),
                  f"#{elem_id} should say {parts}")

        def check_row(name: str) -> dict | None:
            return js(f"""(() => {{ const tr = document.querySelector(
                '#check-rows tr[data-check="{name}"]');
                return tr && {{ok: tr.dataset.ok, text: tr.innerText}}; }})()""")

        def journal(kind: str) -> list[dict]:
            return js(f"""[...document.querySelectorAll('#recent-rows tr[data-kind="{kind}"]')]
                .map(tr => ({{phase: tr.dataset.phase, id: +tr.dataset.id,
                  cells: [...tr.cells].map(td => td.innerText)}}))""")

        def click(elem_id: str) -> None:
            until(lambda: js(f"!document.getElementById({elem_id!r}).disabled"),
                  f"#{elem_id} should be enabled")
            b.find_element(By.ID, elem_id).click()

        b.get(f"{edge}/ui/health")
        # the checks now, one row each: ✓/✗, name, detail, fault kind
        names = ("broker_connected", "workers_alive", "disk_space", "db_integrity", "outbox",
                 "config", "worker_stuck")
        until(lambda: all(check_row(n) for n in names), f"a row for each of {names}")
        row = check_row("config")
        assert row["ok"] == "true" and row["text"].startswith("✓") and "valid" in row["text"]
        text_has("checked", "Checked at")
        # the open faults and the journal are shown (on a loaded box a start may
        # already have journalled some other fault: only config's are asserted)
        until(lambda: js("document.getElementById('open').dataset.state") in ("clear", "faults"),
              "the faults open now are shown")
        until(lambda: js("document.getElementById('journal').dataset.state") == "fresh",
              "the journal is read")
        assert "config_corrupt" not in text("open-list") + text("summary-rows")
        assert 'href="labelling"' in b.page_source and 'href="alarms"' in b.page_source

        # the fault, for real: the config file truncated, no last good copy to put back
        assert not last_good_path(cfg_file).exists()
        truncate(cfg_file)
        click("run")
        until(lambda: (check_row("config") or {}).get("ok") == "false",
              "Run the checks now shows the broken config")
        row = check_row("config")
        assert row["text"].startswith("✗") and "config_corrupt" in row["text"], row
        assert "failing" in text("counter")
        # running the checks changes nothing: nothing journalled, nothing open
        assert "config_corrupt" not in jget(f"{edge}/api/faults")["summary"]
        assert journal("config_corrupt") == []

        # "Fix what fails": no remedy possible; journalled, open, and the page says why
        click("fix")
        text_has("fixed-list", "config: config_corrupt not healed", "no last good config")
        until(lambda: js("document.querySelector('#open-list li[data-fault=\"config_corrupt\"]')"),
              "the fault is listed as open")
        assert js("document.getElementById('open').dataset.state") == "faults"
        text_has("open-list", "config_corrupt", "on config", "why it is not healed",
                 "no last good config")
        until(lambda: re.search(r"\d+ faults? open", text("counter")), "the header counts it")
        until(lambda: {r["phase"] for r in journal("config_corrupt")} >= {"detected", "unhealed"},
              "the journal lists the detection and why it is not healed")

        # an API error is shown, never swallowed: node.db unreadable -> 503 from
        # /api/faults, with the faults open now, which the page still shows
        real_recent = agent.fault_journal.recent

        def unreadable(*a, **kw):
            raise sqlite3.DatabaseError("database disk image is malformed")

        agent.fault_journal.recent = unreadable
        try:
            text_has("msg", "fault journal cannot be read", "503 journal_unreadable",
                     "database disk image is malformed")
            assert "error" in js("document.getElementById('msg').className")
            text_has("journal-note", "Not read now")
            text_has("open-list", "config_corrupt")
        finally:
            agent.fault_journal.recent = real_recent
        until(lambda: text("msg").strip() == "", "the message goes once the journal reads again")

        # a last good copy now: "Fix what fails" puts it back, the fault is healed
        last_good_path(cfg_file).write_bytes(good)
        click("fix")
        text_has("fixed-list", "config: config_corrupt healed",
                 "put the last known good config back", "after it was found")
        until(lambda: "config_corrupt" not in text("open-list"), "the fault is no longer open")
        until(lambda: (check_row("config") or {}).get("ok") == "true", "config ✓ again")
        assert cfg_file.read_bytes() == good
        until(lambda: "healed" in {r["phase"] for r in journal("config_corrupt")},
              "the healed row in the journal")
        rows = journal("config_corrupt")
        assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)  # newest first
        healed = next(r for r in rows if r["phase"] == "healed")
        when, kind, check, phase, remedy, secs = healed["cells"]
        assert when.strip() and kind == "config_corrupt" and check == "config"
        assert phase == "healed" and "put the last known good config back" in remedy
        assert float(secs) >= 0
        unhealed = next(r for r in rows if r["phase"] == "unhealed")
        assert "no last good config" in unhealed["cells"][4]
        summary = js("""Object.fromEntries([...document.querySelectorAll(
            '#summary-rows tr[data-kind="config_corrupt"] td')].map(td => [td.dataset.k, td.innerText]))""")
        assert (summary["detected"], summary["healed"], summary["unhealed"]) == ("1", "1", "1")
        assert summary["last_detected"] != "—" and summary["last_healed"] != "—"
        assert summary["mean_time_to_heal_s"].endswith(("s", "min", "h"))
        api = jget(f"{edge}/api/faults")["summary"]["config_corrupt"]
        assert (api["detected"], api["healed"], api["unhealed"]) == (1, 1, 1)

        # the node stops answering: said, and the open faults are not known any more
        agent.stop()
        running = False
        text_has("msg", "the node does not answer")
        assert js("document.getElementById('open').dataset.state") == "unknown"
    finally:
        if running:
            agent.stop()
