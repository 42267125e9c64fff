// The technician's labelling page: keyboard first, talks to the node's /api/v1 only.
// Every key press and click is an action run in order on one promise chain, so a
// fast technician loses no key while a request is in flight.
"use strict";
(() => {
  const API = "/api/v1";
  const NAMED_KEYS = new Set(["Enter", "Escape", "Backspace", "ArrowLeft", "ArrowRight"]);
  const $ = (id) => document.getElementById(id);
  const st = {
    app: null, counts: {}, items: [], pos: 0, seen: new Set(), done: new Set(),
    typed: "", conflict: null,
  };
  let chain = Promise.resolve();
  const enqueue = (fn) => {
    chain = chain.then(fn).catch((err) => say(`Page error: ${err.message}`, "error"));
  };

  const by = $("by");
  by.value = localStorage.getItem("aidc.labelling.by") || "";
  by.addEventListener("input", () => localStorage.setItem("aidc.labelling.by", by.value.trim()));

  // -- talking to the node --------------------------------------------------------

  async function api(method, path, body) {
    const opts = { method, headers: { Accept: "application/json" } };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    let r;
    try {
      r = await fetch(API + path, opts);
    } catch (err) {
      return { status: 0, ok: false, data: { error: "network error", detail: err.message } };
    }
    const data = await r.json().catch(() => ({ error: r.statusText || "bad reply" }));
    return { status: r.status, ok: r.ok, data };
  }

  function describe(res) {
    const d = res.data || {};
    let det = d.detail;
    if (det && typeof det === "object") det = det.hint || JSON.stringify(det);
    return `${res.status ? res.status + " " : ""}${d.error || "error"}${det ? ": " + det : ""}`;
  }

  function say(text, kind = "ok", actions = []) {
    const m = $("msg");
    m.className = kind;
    m.textContent = text;
    for (const [label, fn, key] of actions) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = label;
      b.setAttribute("aria-keyshortcuts", key);
      b.addEventListener("click", () => { b.blur(); enqueue(fn); });
      m.append(b);
    }
  }

  async function start() {
    const res = await api("GET", "/labelling/queue?limit=1");
    if (!res.ok) return say(`Could not load the queue: ${describe(res)}`, "error");
    st.counts = res.data.counts || {};
    const apps = Object.keys(st.counts).filter((a) => st.counts[a].kept > 0).sort();
    if (!apps.includes(st.app)) {
      const saved = localStorage.getItem("aidc.labelling.app");
      const busiest = [...apps].sort((a, b) => st.counts[b].unlabelled - st.counts[a].unlabelled);
      st.app = apps.includes(saved) ? saved : busiest[0] || null;
    }
    $("app").replaceChildren(...apps.map((a) => new Option(a, a, false, a === st.app)));
    $("app-label").hidden = apps.length < 2;
    await loadApp();
  }

  async function loadApp() {
    Object.assign(st, { items: [], pos: 0, seen: new Set(), typed: "", conflict: null });
    if (st.app) await fetchQueue();
    show();
  }

  async function fetchQueue() {
    // Appends the app's unlabelled samples not seen yet; false when there are none.
    const res = await api("GET", `/labelling/queue?app=${encodeURIComponent(st.app)}&limit=100`);
    if (!res.ok) {
      say(`Could not load the queue: ${describe(res)}`, "error");
      return false;
    }
    st.counts = res.data.counts || {};
    const fresh = res.data.queue.filter((s) => !st.seen.has(s.sample_id));
    for (const s of fresh) {
      st.seen.add(s.sample_id);
      st.items.push(s);
    }
    return fresh.length > 0;
  }

  async function refreshCounts() {
    const res = await api("GET", "/labelling/queue?limit=1");
    if (res.ok) st.counts = res.data.counts || {};
    else say(`Could not refresh the counts: ${describe(res)}`, "error");
  }

  // -- actions ----------------------------------------------------------------------

  const current = () => st.items[st.pos] || null;
  const short = (s) => s.sample_id.slice(0, 8);
  const when = (t) => (typeof t === "number" ? new Date(t * 1000).toLocaleString() : t || "");

  async function label(value, overwrite = false) {
    const s = current();
    if (!s) return;
    const res = await api("PUT", `/samples/${encodeURIComponent(s.sample_id)}/label`,
      { label: value, by: by.value.trim() || null, overwrite });
    if (res.status === 409 && res.data.error === "label_conflict") {
      const d = res.data.detail || {};
      Object.assign(s, { label: d.label, labelled_by: d.labelled_by });
      st.conflict = { sample: s, value };
      show();
      const who = (d.labelled_by ? ` by ${d.labelled_by}` : "") +
        (d.labelled_at ? ` at ${when(d.labelled_at)}` : "");
      return say(`Sample ${short(s)} is already labelled "${d.label}"${who}.` +
        ` Overwrite it with "${value}"?`, "warn",
      [["Overwrite (y)", overwriteConflict, "y"], ["Keep (n)", keepConflict, "n"]]);
    }
    if (!res.ok) return say(`Could not label ${short(s)} as "${value}": ${describe(res)}`, "error");
    Object.assign(s, res.data);
    st.done.add(s.sample_id);
    say(`Labelled ${short(s)} as "${value}"${by.value.trim() ? "" : " (no technician name set)"}.`);
    await refreshCounts();
    await next();
  }

  async function overwriteConflict() {
    const c = st.conflict;
    st.conflict = null;
    if (c && c.sample === current()) await label(c.value, true);
  }

  function keepConflict() {
    const c = st.conflict;
    st.conflict = null;
    if (c) say(`Kept "${c.sample.label}" on ${short(c.sample)}.`);
  }

  async function next() {
    st.typed = "";
    if (st.pos < st.items.length - 1) st.pos += 1;
    else if (st.pos < st.items.length) {
      await fetchQueue(); // more samples, or none: one past the end says "nothing left"
      st.pos += 1;
    }
    show();
  }

  function back() {
    st.typed = "";
    if (st.pos === 0) return say("This is the first sample of the session.", "warn");
    st.pos -= 1;
    show();
  }

  const singleChar = (s) => s.classes.every((c) => [...c].length === 1);
  const matches = (s) => {
    const t = st.typed.toLowerCase();
    const m = s.classes.filter((c) => c.toLowerCase().startsWith(t));
    const exact = m.find((c) => c.toLowerCase() === t);
    return exact ? [exact, ...m.filter((c) => c !== exact)] : m;
  };

  async function onKey(key) {
    if (st.conflict) {
      if (key === "y" || key === "Enter") await overwriteConflict();
      else if (key === "n" || key === "Escape") keepConflict();
      return;
    }
    const s = current();
    if (key === "ArrowLeft" || (key === "Backspace" && !st.typed)) return back();
    if (key === "Backspace" || key === "Escape") {
      st.typed = key === "Escape" ? "" : st.typed.slice(0, -1);
      return s && renderClasses(s);
    }
    if (!s) return;
    if (key === "ArrowRight" || key === " ") return next();
    if (key === "Enter") {
      if (!st.typed) return label(s.prediction ? s.prediction.label : "");
      const m = matches(s);
      if (m.length) return label(m[0]);
      return say(`No class of ${s.app} starts with "${st.typed}".`, "error");
    }
    if (key.length !== 1) return;
    if (singleChar(s)) {
      const c = s.classes.find((x) => x === key) ||
        s.classes.find((x) => x.toLowerCase() === key.toLowerCase());
      if (c) return label(c);
      return say(`"${key}" is not a class of ${s.app} (${s.classes.join(" ")}).`, "error");
    }
    st.typed += key;
    renderClasses(s);
  }

  // -- drawing ----------------------------------------------------------------------

  function show() {
    const s = current();
    if (st.conflict && st.conflict.sample !== s) st.conflict = null;
    $("sample").hidden = !s;
    $("empty").hidden = !!s;
    renderCounts();
    if (!s) return;
    const pred = s.prediction || {};
    const img = $("input");
    img.src = s.input_url + (s.input_type === "tensor/npy" ? "?format=png" : "");
    img.alt = `Input of sample ${s.sample_id}`;
    img.onerror = () => say(`Could not load the input of ${short(s)} (${img.src}).`, "error");
    $("sample").dataset.id = s.sample_id;
    $("sample-title").textContent = `${s.app} ${s.version} · sample ${s.sample_id}` +
      ` · ${st.pos + 1} of ${st.items.length} loaded`;
    $("pred").textContent = pred.label ?? "-";
    $("pred-score").textContent = pred.score != null ? `(${(pred.score * 100).toFixed(1)} %)` : "";
    $("top").replaceChildren(...(s.top || []).map((t) => {
      const li = document.createElement("li");
      li.textContent = `${s.classes[t.index] ?? t.index}: ${(t.score * 100).toFixed(1)} %`;
      const bar = document.createElement("span");
      bar.style.width = `${Math.round(t.score * 120)}px`;
      bar.setAttribute("aria-hidden", "true");
      li.append(bar);
      return li;
    }));
    const meta = [["reason", s.reason], ["source", s.source], ["kept at", when(s.created_at)],
      ["usefulness", s.usefulness != null ? s.usefulness.toFixed(3) : ""],
      ["held out", s.heldout ? "yes (never trained on)" : "no"]];
    $("meta").replaceChildren(...meta.flatMap(([k, v]) => {
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = k;
      dd.textContent = v ?? "";
      return [dt, dd];
    }));
    $("current-label").textContent = s.label != null
      ? `Labelled "${s.label}"${s.labelled_by ? " by " + s.labelled_by : ""}` : "Not labelled yet";
    renderClasses(s);
  }

  function renderClasses(s) {
    const pred = s.prediction && s.prediction.label;
    const m = st.typed ? matches(s) : null;
    const keys = singleChar(s);
    $("classes").replaceChildren(...(m || s.classes).slice(0, 100).map((c) => {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = c;
      b.dataset.label = c;
      b.setAttribute("aria-label", `Label as ${c}`);
      b.setAttribute("aria-pressed", String(s.label === c));
      if (keys) b.setAttribute("aria-keyshortcuts", c);
      if (c === pred) b.classList.add("predicted");
      if (m && c === m[0]) b.classList.add("match");
      b.addEventListener("click", () => { b.blur(); enqueue(() => label(c)); });
      return b;
    }));
    $("typed").textContent = !st.typed ? ""
      : m.length ? `Typed "${st.typed}": Enter labels as "${m[0]}" (${m.length} match)`
        : `Typed "${st.typed}": no class starts with that (Esc clears)`;
  }

  function renderCounts() {
    const c = st.counts[st.app] || {};
    $("counter").textContent =
      `${st.done.size} labelled this session · ${c.unlabelled ?? 0} remaining`;
    $("counts-body").replaceChildren(...Object.keys(st.counts).sort().map((a) => {
      const tr = document.createElement("tr");
      tr.dataset.app = a;
      for (const k of ["app", "labelled", "unlabelled", "heldout", "kept"]) {
        const td = document.createElement(k === "app" ? "th" : "td");
        if (k === "app") td.scope = "row";
        td.dataset.k = k;
        td.textContent = k === "app" ? a : st.counts[a][k];
        tr.append(td);
      }
      return tr;
    }));
  }

  function toggleHelp(open) {
    $("help").hidden = !open;
    if (open) $("help-close").focus();
    else document.activeElement.blur();
  }

  // -- wiring -----------------------------------------------------------------------

  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.isComposing) return;
    const t = e.target;
    if (t.matches("input, select, textarea")) {
      if (e.key === "Enter" || e.key === "Escape") t.blur();
      return;
    }
    if ((t.tagName === "BUTTON" || t.tagName === "A") && (e.key === "Enter" || e.key === " ")) return;
    if (!$("help").hidden) {
      if (e.key === "Escape" || e.key === "?") toggleHelp(false);
      return;
    }
    if (e.key === "?") return toggleHelp(true);
    if (e.key.length !== 1 && !NAMED_KEYS.has(e.key)) return; // Tab, F5, ... as usual
    e.preventDefault();
    const key = e.key;
    enqueue(() => onKey(key));
  });
  const click = (id, fn) => $(id).addEventListener("click", () => { $(id).blur(); enqueue(fn); });
  click("back", back);
  click("skip", next);
  click("confirm", () => (st.conflict ? undefined : onKey("Enter")));
  click("reload", start);
  $("help-btn").addEventListener("click", () => toggleHelp(true));
  $("help-close").addEventListener("click", () => toggleHelp(false));
  $("app").addEventListener("change", () => {
    st.app = $("app").value;
    localStorage.setItem("aidc.labelling.app", st.app);
    $("app").blur();
    enqueue(loadApp);
  });
  enqueue(start);
})();
