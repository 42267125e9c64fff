// The alarms page: list the node's alarms, look at the evidence, acknowledge,
// resolve or call an alarm false (its frame then becomes a sample). Talks to the
// node's /api/v1 only; every refusal (400, 404, 409) is shown, never swallowed.
"use strict";
(() => {
  const API = "/api/v1";
  const $ = (id) => document.getElementById(id);
  // what each action may leave (edge_node/alarms.py ACTIONS); the node has the last word
  const ALLOWED = { ack: ["open"], resolve: ["open", "acknowledged"],
                    false: ["open", "acknowledged", "cleared"] };
  const st = { filter: localStorage.getItem("aidc.alarms.filter") ?? "active", selected: null };

  const by = $("by");
  by.value = localStorage.getItem("aidc.labelling.by") || "";
  by.addEventListener("input", () => localStorage.setItem("aidc.labelling.by", by.value.trim()));
  $("filter").value = st.filter;
  $("filter").addEventListener("change", () => {
    st.filter = $("filter").value;
    localStorage.setItem("aidc.alarms.filter", st.filter);
    refresh();
  });

  async function api(method, path, body) {
    const opts = { method, headers: { Accept: "application/json" } };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    try {
      const r = await fetch(API + path, opts);
      const data = await r.json().catch(() => ({ error: r.statusText || "bad reply" }));
      return { status: r.status, ok: r.ok, data };
    } catch (err) {
      return { status: 0, ok: false, data: { error: "network error", detail: err.message } };
    }
  }

  function say(text, kind = "ok") {
    $("msg").className = kind;
    $("msg").textContent = text;
  }

  function describe(res) {
    const d = res.data || {};
    let det = d.detail;
    if (det && typeof det === "object") det = JSON.stringify(det);
    return `${res.status ? res.status + " " : ""}${d.error || "error"}${det ? ": " + det : ""}`;
  }

  const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "");
  const cell = (text, cls) => {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  };

  async function refresh() {
    const q = st.filter ? `?state=${st.filter}&limit=200` : "?limit=200";
    const res = await api("GET", `/alarms${q}`);
    if (!res.ok) return say(`Could not load the alarms: ${describe(res)}`, "error");
    const counts = res.data.counts || {};
    $("counter").textContent = `${(counts.open || 0)} open · ${(counts.acknowledged || 0)} acknowledged`;
    $("rows").replaceChildren(...res.data.alarms.map((a) => {
      const tr = document.createElement("tr");
      tr.dataset.id = a.alarm_id;
      tr.setAttribute("aria-selected", String(a.alarm_id === st.selected));
      tr.append(cell(a.state.replace("_", " "), `state state-${a.state}`), cell(a.rule),
                cell(a.stream), cell(`${a.label} ${(a.score * 100).toFixed(0)}%`),
                cell(when(a.raised_at)), cell(String(a.frames)));
      tr.addEventListener("click", () => select(a.alarm_id));
      return tr;
    }));
    if (st.selected) await show(st.selected, false);
  }

  async function select(id) {
    st.selected = id;
    for (const tr of $("rows").children) tr.setAttribute("aria-selected", String(tr.dataset.id === id));
    await show(id, true);
  }

  async function show(id, fresh) {
    const res = await api("GET", `/alarms/${encodeURIComponent(id)}`);
    if (!res.ok) return say(`Could not load the alarm: ${describe(res)}`, "error");
    const a = res.data;
    $("alarm").hidden = false;
    $("alarm").dataset.state = a.state;
    $("alarm-title").textContent = `${a.rule} on ${a.stream}: ${a.state.replace("_", " ")}`;
    if (a.evidence_url) {
      if (fresh || !$("evidence").src) $("evidence").src = a.evidence_url;
      $("evidence-note").textContent = `captured ${when(a.evidence_ts)}`;
    } else {
      $("evidence").removeAttribute("src");
      $("evidence-note").textContent = "no frame could be kept yet";
    }
    const meta = [["app", `${a.app} ${a.version || ""}`], ["model saw", `${a.label} (${a.score.toFixed(2)})`],
                  ["severity", a.severity], ["raised", when(a.raised_at)],
                  ["last seen", when(a.last_seen)], ["frames", a.frames],
                  ["acknowledged", a.acknowledged_by ? `${a.acknowledged_by}, ${when(a.acknowledged_at)}` : ""],
                  ["closed", a.closed_at ? `${a.closed_by || "the node"}, ${when(a.closed_at)}` : ""],
                  ["note", a.note || ""], ["correct class", a.correct_label || ""],
                  ["sample", a.sample_id || ""]];
    $("meta").replaceChildren(...meta.filter(([, v]) => v !== "").flatMap(([k, v]) => {
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = k;
      dd.textContent = String(v);
      return [dt, dd];
    }));
    $("history").replaceChildren(...(a.history || []).map((h) => {
      const li = document.createElement("li");
      li.textContent = `${h.state.replace("_", " ")} · ${when(h.at)}${h.by ? " · " + h.by : ""}`;
      return li;
    }));
    if (fresh) {
      const opts = [new Option("— not sure: label it later —", "")];
      for (const c of a.classes || []) opts.push(new Option(c, c));
      $("label").replaceChildren(...opts);
    }
    $("ack").disabled = !ALLOWED.ack.includes(a.state);
    $("resolve").disabled = !ALLOWED.resolve.includes(a.state);
    $("false").disabled = !ALLOWED.false.includes(a.state);
  }

  async function act(path, body, done) {
    const id = st.selected;
    if (!id) return;
    if (!by.value.trim()) {
      by.focus();
      return say("Type your name in Technician first: every action says who.", "warn");
    }
    const res = await api("POST", `/alarms/${encodeURIComponent(id)}/${path}`,
                          { by: by.value.trim(), ...body });
    if (!res.ok) {
      const now = res.data && res.data.state ? ` (it is ${res.data.state.replace("_", " ")} now)` : "";
      say(`Refused: ${describe(res)}${now}`, "error");
    } else {
      say(done(res.data), "ok");
    }
    await refresh();
  }

  $("ack").addEventListener("click", () => act("ack", {}, () => "Acknowledged."));
  $("resolve").addEventListener("click", () => {
    const note = $("note").value.trim();
    act("resolve", note ? { note } : {}, () => "Resolved.");
  });
  $("false").addEventListener("click", () => {
    const label = $("label").value;
    act("false-alarm", label ? { label } : {}, (a) => (a.sample_id
      ? `Marked false; its frame is sample ${a.sample_id}${a.correct_label ? " labelled " + a.correct_label : " (label it on the labelling page)"}.`
      : "Marked false; no sample could be kept."));
  });

  refresh();
  setInterval(refresh, 3000);
})();
