// The node's health page: the checks now (GET /api/doctor), the faults open now and
// the fault journal (GET /api/faults), "Run the checks now" and "Fix what fails"
// (POST /api/doctor: each failing check's remedy, as `aidc edge doctor --fix`).
// Talks to the node only; every error (503 while node.db is damaged, the node not
// answering) is shown, never swallowed.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const RECENT = 50;             // journal rows shown
  const FAULTS_EVERY_MS = 3000;  // the journal is cheap to read
  const CHECKS_EVERY_MS = 5000;  // the checks: at least this, more when they are slow
  const PHASE = { detected: "detected", healed: "healed", unhealed: "not healed",
                  repeated: "still failing", noted: "found at start" };
  const st = { busy: false, checks: null, checksTs: 0, open: null, problems: {},
               checksTimer: null, faultsSeq: 0, faultsShown: 0 };

  async function api(method, path) {
    const opts = { method, headers: { Accept: "application/json" } };
    if (method === "POST") {
      opts.headers["Content-Type"] = "application/json";
      opts.body = "{}";
    }
    try {
      const r = await fetch(path, opts);
      const data = await r.json().catch(() => ({ error: r.statusText || "not a JSON reply" }));
      return { status: r.status, ok: r.ok, data };
    } catch (err) {
      return { status: 0, ok: false,
               data: { error: "the node does not answer", detail: err.message } };
    }
  }

  function describe(res) {
    const d = res.data || {};
    let det = d.detail;
    if (det && typeof det === "object") det = JSON.stringify(det);
    return `${res.status ? res.status + " " : ""}${d.error || "error"}${det ? ": " + det : ""}`;
  }

  // one line per thing that is wrong now, by source; a source that works again clears its own
  function problem(key, text) {
    if (text) st.problems[key] = text;
    else delete st.problems[key];
    const lines = Object.values(st.problems);
    $("msg").className = lines.length ? "error" : "";
    put($("msg"), lines.join("\n"));
  }

  // live regions are re-read when written: write only what changed
  function put(elem, text) {
    if (elem.textContent !== text) elem.textContent = text;
  }

  const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "—");
  const dur = (s) => {
    if (s === null || s === undefined) return "—";
    if (s < 60) return `${s < 10 ? s.toFixed(2) : s.toFixed(0)} s`;
    if (s < 3600) return `${(s / 60).toFixed(1)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  };
  const el = (tag, text, cls) => {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  };
  const empty = (cols, text) => {
    const tr = el("tr", undefined, "empty");
    const td = el("td", text);
    td.colSpan = cols;
    tr.append(td);
    return tr;
  };

  function counter() {
    const parts = [];
    if (st.checks) {
      const bad = st.checks.filter((c) => !c.ok).length;
      parts.push(bad ? `${bad} check${bad > 1 ? "s" : ""} failing` : "all checks pass");
    }
    if (st.open) {
      const n = Object.keys(st.open).length;
      parts.push(n ? `${n} fault${n > 1 ? "s" : ""} open` : "no fault open");
    }
    put($("counter"), parts.join(" · ") || "…");
  }

  // -- the faults open now ---------------------------------------------------------
  function renderOpen(open, why) {
    st.open = open;
    const box = $("open");
    if (open === null) {  // not known: the node did not say
      box.dataset.state = "unknown";
      $("open-none").textContent = `Not known now (${why}).`;
      $("open-list").replaceChildren();
      return counter();
    }
    const entries = Object.entries(open);
    box.dataset.state = entries.length ? "faults" : "clear";
    box.dataset.count = String(entries.length);
    $("open-none").textContent = entries.length
      ? `${entries.length} fault${entries.length > 1 ? "s" : ""} not healed yet: the node keeps trying.`
      : "No fault open: everything the node checks is fine or was healed.";
    $("open-list").replaceChildren(...entries.map(([check, f]) => {
      const li = el("li");
      li.dataset.check = check;
      li.dataset.fault = f.fault;
      li.append(el("strong", f.fault), ` on ${check}, since ${when(f.since)}`,
                f.count > 1 ? ` (found ${f.count} times)` : "");
      const dl = el("dl");
      for (const [k, v] of [["found", f.detail], ["last remedy tried", f.last_remedy],
                            ["why it is not healed", f.last_why]]) {
        if (v) dl.append(el("dt", k), el("dd", v));
      }
      li.append(dl);
      return li;
    }));
    counter();
  }

  // -- the checks ------------------------------------------------------------------
  function renderChecks(rep, took) {
    if (rep.ts < st.checksTs) return;  // an older run answered late
    st.checksTs = rep.ts;
    st.checks = rep.checks || [];
    if (rep.node_id) $("node").textContent = `node ${rep.node_id}`;
    $("check-rows").replaceChildren(...st.checks.map((c) => {
      const tr = el("tr", undefined, c.ok ? "pass" : "fail");
      tr.dataset.check = c.name;
      tr.dataset.ok = String(c.ok);
      const mark = el("td", c.ok ? "✓ ok" : "✗ failing", "mark");
      tr.append(mark, el("td", c.name, "name"), el("td", c.detail, "detail"),
                el("td", c.fault || "", "fault"));
      return tr;
    }));
    if (!st.checks.length) $("check-rows").replaceChildren(empty(4, "The node has no checks."));
    const bad = st.checks.filter((c) => !c.ok).length;
    $("checked").textContent = `${rep.fixed ? "Checked and fixed" : "Checked"} at ${when(rep.ts)}` +
      (took !== undefined ? ` (took ${dur(took / 1000)})` : "") +
      `: ${st.checks.length - bad} pass, ${bad} failing.`;
    counter();
  }

  async function loadChecks() {
    const t0 = performance.now();
    const res = await api("GET", "/api/doctor");
    const took = performance.now() - t0;
    if (!res.ok) {
      problem("checks", `The checks could not run: ${describe(res)}`);
      $("checked").textContent = "Not checked now: see the message above.";
      return took;
    }
    problem("checks", null);
    renderChecks(res.data, took);
    return took;
  }

  function scheduleChecks(took) {
    clearTimeout(st.checksTimer);
    // slow checks (a big node.db) are run less often: at most a tenth of the time
    st.checksTimer = setTimeout(autoChecks, Math.max(CHECKS_EVERY_MS, 10 * (took || 0)));
  }

  async function autoChecks() {
    if (document.hidden || st.busy) return scheduleChecks(0);
    scheduleChecks(await loadChecks());
  }

  // -- the journal -----------------------------------------------------------------
  function renderSummary(summary) {
    const kinds = Object.entries(summary || {});
    $("summary-rows").replaceChildren(...kinds.map(([kind, s]) => {
      const tr = el("tr", undefined, s.unhealed ? "had-unhealed" : "");
      tr.dataset.kind = kind;
      for (const [k, v] of [["kind", kind], ["detected", s.detected], ["healed", s.healed],
                            ["unhealed", s.unhealed], ["last_detected", when(s.last_detected)],
                            ["last_healed", when(s.last_healed)],
                            ["mean_time_to_heal_s", dur(s.mean_time_to_heal_s)]]) {
        const td = el("td", v);
        td.dataset.k = k;
        tr.append(td);
      }
      return tr;
    }));
    if (!kinds.length) $("summary-rows").replaceChildren(empty(7, "No fault journalled yet."));
  }

  function rowText(r) {
    if (r.phase === "noted" && r.remedy) return `${r.detail} — ${r.remedy}`;
    if (r.phase === "repeated" && r.count > 1) return `${r.detail} (found ${r.count} times)`;
    return r.remedy || r.detail || "";
  }

  function renderRecent(recent) {
    $("recent-rows").replaceChildren(...(recent || []).map((r) => {
      const tr = el("tr", undefined, `phase-${r.phase}`);
      tr.dataset.id = String(r.id);
      tr.dataset.kind = r.kind;
      tr.dataset.phase = r.phase;
      tr.append(el("td", when(r.ts), "time"), el("td", r.kind, "kind"), el("td", r.check, "check"),
                el("td", PHASE[r.phase] || r.phase, "phase"), el("td", rowText(r), "text"),
                el("td", r.seconds === null || r.seconds === undefined ? "" : r.seconds.toFixed(2),
                   "seconds"));
      return tr;
    }));
    if (!(recent || []).length) $("recent-rows").replaceChildren(empty(6, "Nothing journalled yet."));
  }

  async function loadFaults() {
    const seq = ++st.faultsSeq;
    const res = await api("GET", `/api/faults?limit=${RECENT}`);
    if (seq < st.faultsShown) return res.ok ? res.data : null;  // a newer reply is shown
    st.faultsShown = seq;
    if (!res.ok) {
      const damaged = res.status === 503
        ? " node.db cannot be read now; the node's db_integrity check repairs it. " +
          "The faults open now are still shown."
        : "";
      problem("faults", `The fault journal cannot be read: ${describe(res)}.${damaged}`);
      $("journal").dataset.state = "stale";
      $("journal-note").textContent = `Not read now (${describe(res)}); ` +
        (st.journalAt ? `as read at ${st.journalAt}.` : "nothing read yet.");
      renderOpen(res.data && res.data.open ? res.data.open : null, describe(res));
      return null;
    }
    problem("faults", null);
    const d = res.data;
    st.journalAt = new Date().toLocaleTimeString();
    $("journal").dataset.state = "fresh";
    $("journal-note").textContent = `In all: ${d.detected || 0} detected, ${d.healed || 0} healed, ` +
      `${d.unhealed || 0} not healed. Read at ${st.journalAt}.`;
    renderOpen(d.open || {});
    renderSummary(d.summary);
    renderRecent(d.recent);
    return d;
  }

  async function autoFaults() {
    if (!document.hidden && !st.busy) await loadFaults();
  }

  // -- the buttons ---------------------------------------------------------------
  function busy(on, text) {
    st.busy = on;
    $("run").disabled = on;
    $("fix").disabled = on;
    if (text) $("checked").textContent = text;
  }

  async function runNow() {
    busy(true, "Running every check…");
    try {
      scheduleChecks(await loadChecks());
      await loadFaults();
    } finally {
      busy(false);
    }
  }

  function fixItem(ok, text, cls) {
    const li = el("li", `${ok ? "✓" : "✗"} ${text}`, cls || (ok ? "pass" : "fail"));
    return li;
  }

  async function fixNow() {
    busy(true, "Running every check and fixing what fails… (a remedy can take a while)");
    try {
      // the newest journal row before: the rows after it are what the fix did
      const before = await api("GET", "/api/faults?limit=1");
      const sinceId = before.ok ? ((before.data.recent || [])[0] || { id: 0 }).id : null;
      const t0 = performance.now();
      const res = await api("POST", "/api/doctor");
      if (!res.ok) {
        problem("fix", `"Fix what fails" did not run: ${describe(res)}`);
        $("checked").textContent = "Not fixed: see the message above.";
        return;
      }
      problem("fix", null);
      renderChecks(res.data, performance.now() - t0);
      const open = (res.data.faults && res.data.faults.open) || {};
      renderOpen(open);
      const after = await loadFaults();
      const items = [];
      const said = new Set();
      if (sinceId !== null && after) {
        for (const r of (after.recent || []).filter((x) => x.id > sinceId).reverse()) {
          if (r.phase === "healed") {
            items.push(fixItem(true, `${r.check}: ${r.kind} healed: ${r.remedy || r.detail}` +
                               (r.seconds !== null && r.seconds !== undefined
                                 ? ` (${dur(r.seconds)} after it was found)` : "")));
            said.add(r.check);
          } else if (r.phase === "unhealed" || r.phase === "repeated") {
            items.push(fixItem(false, `${r.check}: ${r.kind} not healed: ${r.detail}`));
            said.add(r.check);
          }
        }
      }
      for (const c of res.data.checks || []) {
        if (c.ok || said.has(c.name)) continue;
        const why = open[c.name] && open[c.name].last_why;
        items.push(fixItem(false, `${c.name}: still failing: ${c.detail}` +
                           (why ? ` (${why})` : "")));
      }
      if (!items.length) items.push(fixItem(true, "Nothing to fix: every check passes.", "pass"));
      if (sinceId === null || !after) {
        items.push(el("li", "The fault journal could not be read, so only what the checks " +
                            "found after the fix is shown.", "note"));
      }
      $("fixed-title").textContent = `What the fix did at ${when(res.data.ts)}`;
      $("fixed-list").replaceChildren(...items);
      $("fixed").hidden = false;
      scheduleChecks(0);
    } finally {
      busy(false);
    }
  }

  $("run").addEventListener("click", runNow);
  $("fix").addEventListener("click", fixNow);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) { autoFaults(); autoChecks(); }
  });

  loadFaults();
  autoChecks();
  setInterval(autoFaults, FAULTS_EVERY_MS);
})();
