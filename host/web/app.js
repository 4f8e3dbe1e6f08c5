// The Cairn web view: a runs list, a live run page with a timeline, and a
// page to upload a module and start a run. Everything comes from the API
// with the tab's token; live updates come from Server-Sent Events read
// with fetch (EventSource cannot send the Authorization header). No
// build step: this file is served as it is.
"use strict";

const TOKEN_KEY = "cairn.token";
const $ = (sel) => document.querySelector(sel);

// ---- DOM: elements are built, never parsed from strings (guest text is data).
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "style") Object.assign(el.style, v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// `replaceChildren` writes null as the text "null": leave the gaps out.
function fill(el, ...children) { el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false)); }

function toast(text, bad) {
  const t = h("div", { class: bad ? "toast bad" : "toast", role: "status" }, text);
  document.body.append(t);
  setTimeout(() => t.remove(), bad ? 6000 : 2500);
}

// ---- The token: asked for once, kept in this tab's session storage.
function token() { return sessionStorage.getItem(TOKEN_KEY); }

function askToken(message) {
  $("#token-error").textContent = message || "";
  $("#token-dialog").hidden = false;
  $("#token-input").focus();
}

$("#token-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const value = $("#token-input").value.trim();
  const res = await fetch("/api/runs?limit=1", { headers: { Authorization: "Bearer " + value } });
  if (!res.ok) {
    $("#token-error").textContent = res.status === 401 ? "That token is not valid." : `The server answered ${res.status}.`;
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, value);
  $("#token-input").value = "";
  $("#token-dialog").hidden = true;
  $("#forget-token").hidden = false;
  route();
});

$("#forget-token").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  $("#forget-token").hidden = true;
  stopPage();
  askToken();
});

class ApiError extends Error {
  constructor(status, code, detail) { super(detail || code); this.status = status; this.code = code; }
}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + (token() || "") }, options.headers || {});
  const res = await fetch(path, Object.assign({}, options, { headers }));
  const text = await res.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = null; }
  if (!res.ok) {
    if (res.status === 401) askToken("The token was refused (revoked?). Paste another.");
    throw new ApiError(res.status, body && body.error, (body && body.detail) || `HTTP ${res.status}`);
  }
  return body;
}

// ---- Server-Sent Events over fetch: Authorization and Last-Event-ID are
// sent by us. On a drop it reconnects with the last id and misses nothing.
// A `reset` (we fell too far behind) makes the page reload its data; the
// stream then goes on from the position of that reload (`onReset` returns
// it), so nothing falls between the reload and the stream.
function subscribe(path, lastId, onEvent, onReset) {
  const ctl = new AbortController();
  let last = lastId;
  let stopped = false;
  const live = $("#live");
  (async () => {
    let delay = 250;
    while (!stopped) {
      try {
        const headers = { Authorization: "Bearer " + (token() || ""), Accept: "text/event-stream" };
        if (last !== null && last !== undefined) headers["Last-Event-ID"] = String(last);
        const res = await fetch(path, { headers, signal: ctl.signal });
        if (res.status === 401) { askToken("The token was refused."); return; }
        if (!res.ok || !res.body) throw new Error("HTTP " + res.status);
        live.textContent = "live"; live.classList.add("on");
        delay = 250;
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        let ev = { id: null, event: "message", data: [] };
        let reset = false;
        while (!reset) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          let nl;
          while ((nl = buf.indexOf("\n")) >= 0) {
            const line = buf.slice(0, nl).replace(/\r$/, "");
            buf = buf.slice(nl + 1);
            if (line === "") {
              if (ev.data.length) {
                if (ev.event === "reset") {
                  reset = true;
                  reader.cancel().catch(() => {});
                  last = await onReset();
                  break;
                } else {
                  if (ev.id !== null) last = Number(ev.id);
                  try { onEvent(ev.event, JSON.parse(ev.data.join("\n"))); } catch (err) { console.error(err); }
                }
              }
              ev = { id: null, event: "message", data: [] };
            } else if (!line.startsWith(":")) {
              const i = line.indexOf(":");
              const field = i < 0 ? line : line.slice(0, i);
              const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
              if (field === "id") ev.id = val;
              else if (field === "event") ev.event = val;
              else if (field === "data") ev.data.push(val);
            }
          }
        }
      } catch (err) {
        if (stopped) return;
      }
      live.textContent = "reconnecting"; live.classList.remove("on");
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 5000);
    }
  })();
  return () => { stopped = true; ctl.abort(); live.textContent = "offline"; live.classList.remove("on"); };
}

// A function that runs `fn` at most once per `ms`, and once more after the
// last call: bursts of events become a few fetches.
function throttle(fn, ms) {
  let timer = null, again = false;
  return function run() {
    if (timer) { again = true; return; }
    fn();
    timer = setTimeout(() => { timer = null; if (again) { again = false; run(); } }, ms);
  };
}

// ---- Formatting.
function fmtTime(s) { return s ? new Date(s).toLocaleString() : "—"; }
function fmtDur(ms) {
  if (ms === null || ms === undefined || isNaN(ms)) return "";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  const m = Math.floor(ms / 60000);
  return `${m} min ${Math.round((ms % 60000) / 1000)} s`;
}
function badge(status) { return h("span", { class: "badge " + status, dataset: { status } }, status); }

// Pretty JSON; large values are folded.
function jsonView(value) {
  const text = JSON.stringify(value, null, 2) ?? "null";
  const pre = h("pre", { class: "json" }, text);
  if (text.length <= 1200 && text.split("\n").length <= 24) return pre;
  return h("details", { class: "fold" }, h("summary", {}, `${text.length.toLocaleString()} characters`), pre);
}

// ---- Pages.
let stopPage = () => {};

function route() {
  stopPage();
  stopPage = () => {};
  const main = $("#main");
  main.replaceChildren();
  if (!token()) { askToken(); return; }
  $("#forget-token").hidden = false;
  const hash = location.hash || "#/";
  document.querySelectorAll(".top nav a").forEach((a) => a.classList.toggle("active", a.getAttribute("href") === hash));
  let m;
  if ((m = hash.match(/^#\/runs\/(.+)$/))) stopPage = runPage(main, decodeURIComponent(m[1]));
  else if (hash === "#/new") stopPage = newPage(main);
  else stopPage = runsPage(main);
}
window.addEventListener("hashchange", route);

// The runs list: filters, cursor pages, live status.
function runsPage(main) {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const state = { status: params.get("status") || "", module: params.get("module") || "", cursors: [null] };
  const status = h("select", { id: "filter-status", "aria-label": "status" },
    ["", "pending", "running", "sleeping", "waiting", "completed", "failed", "cancelled"]
      .map((s) => h("option", { value: s, selected: s === state.status }, s || "any status")));
  const module = h("input", { id: "filter-module", placeholder: "module hash prefix", value: state.module, size: 18 });
  const search = h("input", { id: "search-id", placeholder: "run id", size: 24 });
  const error = h("p", { class: "error" });
  const body = h("tbody", { id: "runs-body" });
  const older = h("button", { id: "page-older", type: "button" }, "Older →");
  const newer = h("button", { id: "page-newer", type: "button" }, "← Newer");
  const count = h("span", { class: "muted", id: "runs-count" });
  const rows = new Map();

  main.append(
    h("div", { class: "card" },
      h("div", { class: "row-flex" },
        h("h1", {}, "Runs"), h("span", { class: "spacer" }),
        status, module,
        h("form", { class: "row-flex", onsubmit: (e) => {
          e.preventDefault();
          const id = search.value.trim();
          if (id) location.hash = "#/runs/" + encodeURIComponent(id);
        } }, search, h("button", { type: "submit", id: "search-go" }, "Open"))),
      error,
      h("table", { class: "runs" },
        h("thead", {}, h("tr", {}, ["Run", "Status", "Module", "Steps", "Created", "Finished", "Error"].map((t) => h("th", {}, t)))),
        body),
      h("div", { class: "pager" }, count, h("span", { class: "spacer" }), newer, older)));

  function row(r) {
    return h("tr", { dataset: { run: r.id } },
      h("td", {}, h("a", { href: "#/runs/" + encodeURIComponent(r.id), class: "mono" }, r.id)),
      h("td", {}, badge(r.status)),
      h("td", { class: "mono", title: r.module }, r.module.slice(0, 12)),
      h("td", {}, String(r.steps)),
      h("td", {}, fmtTime(r.created_at)),
      h("td", {}, fmtTime(r.finished_at)),
      h("td", { class: "error" }, r.error ? r.error.slice(0, 120) : ""));
  }

  let loads = 0;
  async function load() {
    const mine = ++loads;
    const q = new URLSearchParams({ limit: "50" });
    if (state.status) q.set("status", state.status);
    if (state.module) q.set("module", state.module);
    const after = state.cursors[state.cursors.length - 1];
    if (after !== null) q.set("after", after);
    try {
      const page = await api("/api/runs?" + q);
      if (mine !== loads) return page.seq;
      error.textContent = "";
      rows.clear();
      body.replaceChildren(...page.runs.map((r) => { const tr = row(r); rows.set(r.id, tr); return tr; }));
      if (!page.runs.length) body.append(h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No runs yet.")));
      state.next = page.next;
      older.disabled = page.next === null;
      newer.disabled = state.cursors.length === 1;
      count.textContent = `page ${state.cursors.length}`;
      return page.seq;
    } catch (e) { error.textContent = e.message; return null; }
  }
  const reloadSoon = throttle(load, 400);
  // Runs touched by events, fetched a few times a second at most.
  const touched = new Set();
  const refreshTouched = throttle(() => { const ids = [...touched]; touched.clear(); ids.forEach(refresh); }, 500);
  const refresh = async (id) => {
    try {
      const r = await api("/api/runs/" + encodeURIComponent(id) + "?history=false");
      const old = rows.get(id);
      if (!old) return;
      if ((state.status && r.status !== state.status)) { reloadSoon(); return; }
      const tr = row(r); rows.set(id, tr); old.replaceWith(tr);
    } catch { /* gone or refused: the next page load shows it */ }
  };
  const setFilter = () => {
    state.status = status.value; state.module = module.value.trim(); state.cursors = [null];
    history.replaceState(null, "", "#/?" + new URLSearchParams({ status: state.status, module: state.module }));
    load();
  };
  status.addEventListener("change", setFilter);
  module.addEventListener("change", setFilter);
  older.addEventListener("click", () => { state.cursors.push(state.next); load(); });
  newer.addEventListener("click", () => { state.cursors.pop(); load(); });
  // New runs appear on the first page; others update in place. The stream
  // starts at the first page's position: nothing between is missed.
  let stopped = false, unsubscribe = () => {};
  load().then((seq) => {
    if (stopped) return;
    unsubscribe = subscribe("/api/events", seq, (kind, ev) => {
      if (kind === "created") { if (state.cursors.length === 1) reloadSoon(); }
      else if ((kind === "status" || kind === "history") && rows.has(ev.run_id)) { touched.add(ev.run_id); refreshTouched(); }
    }, load);
  });
  return () => { stopped = true; unsubscribe(); };
}

// ---- The run page.
function runPage(main, id) {
  const path = "/api/runs/" + encodeURIComponent(id);
  const st = { run: null, entries: [], branches: [], lastPos: -1, selected: null, stop: () => {} };
  const head = h("div", { class: "card", id: "run-head" });
  const actions = h("div", { class: "card", id: "run-actions" });
  const io = h("div", { class: "card io", id: "run-io" });
  const axis = h("div", { class: "axis", id: "axis" });
  const rows = h("div", { id: "timeline-rows" });
  const detail = h("div", { class: "card", id: "step-detail", hidden: true });
  const error = h("p", { class: "error", id: "run-error" });
  main.append(error, head, actions,
    h("div", { class: "card" },
      h("div", { class: "row-flex" }, h("h2", {}, "Timeline"), h("span", { class: "spacer" }), h("span", { class: "muted", id: "entry-count" })),
      h("div", { class: "timeline", id: "timeline" }, axis, rows),
      h("div", { class: "legend" },
        h("span", {}, h("i", { style: { background: "var(--ok)" } }), "step"),
        h("span", {}, h("i", { style: { background: "#3d8fb5" } }), "branch"),
        h("span", {}, h("i", { style: { background: "var(--bad)" } }), "failed attempt"),
        h("span", {}, h("i", { class: "bar wait", style: { position: "static", display: "inline-block" } }), "sleep or signal wait"),
        h("span", {}, h("i", { class: "bar running", style: { position: "static", display: "inline-block" } }), "in progress"))),
    detail, io);

  const finished = () => st.run && ["completed", "failed", "cancelled"].includes(st.run.status);

  function renderHead() {
    const r = st.run;
    fill(head, 
      h("div", { class: "row-flex" }, h("h1", { class: "mono", id: "run-id" }, r.id), h("span", { id: "run-status" }, badge(r.status))),
      r.error ? h("p", { class: "error" }, r.error) : null,
      h("div", { class: "meta" },
        h("div", {}, h("span", {}, "Module"), h("code", { title: r.module }, r.module.slice(0, 16) + "…")),
        h("div", {}, h("span", {}, "Created"), fmtTime(r.created_at)),
        h("div", {}, h("span", {}, "Finished"), fmtTime(r.finished_at)),
        h("div", {}, h("span", {}, "Steps"), String(r.steps)),
        h("div", {}, h("span", {}, "Duration"),
          fmtDur((r.finished_at ? Date.parse(r.finished_at) : Date.now()) - Date.parse(r.created_at)))));
    fill(io, 
      h("div", {}, h("h2", {}, "Input"), jsonView(r.input)),
      h("div", {}, h("h2", {}, "Output"), r.status === "completed" || (r.output !== null && r.output !== undefined) ? jsonView(r.output) : h("p", { class: "muted" }, { failed: "none: the run failed", cancelled: "none: the run was cancelled" }[r.status] || "not yet")));
    renderActions();
  }

  // The action buttons are built once (a re-render would wipe what the
  // user is typing); events only switch them on and off.
  const signalName = h("input", { id: "signal-name", placeholder: "signal name", size: 18 });
  const signalPayload = h("textarea", { id: "signal-payload", placeholder: "payload (JSON; empty: null)" });
  const signalSend = h("button", { id: "signal-send", type: "submit", class: "primary" }, "Send signal");
  const received = h("span", { class: "muted", id: "signals-received" });
  const resumeButton = h("button", { id: "resume-run", type: "button", onclick: async () => {
    try { await api(path + "/resume", { method: "POST" }); toast("Resume requested."); } catch (err) { toast(err.message, true); }
  } }, "Resume");
  // With a grace period the workflow is told and may compensate first.
  const cancelGrace = h("input", { id: "cancel-grace", type: "number", min: "0", step: "any", placeholder: "grace, s", title: "Seconds the workflow may clean up (compensate) before it is stopped; empty: stop at once", style: { width: "7em" } });
  const cancelButton = h("button", { id: "cancel-run", type: "button", class: "danger", onclick: async () => {
    const grace = cancelGrace.value.trim();
    if (!confirm(grace ? `Cancel run ${id}, with ${grace} s to clean up?` : `Cancel run ${id}?`)) return;
    const body = grace ? JSON.stringify({ grace: Number(grace) }) : "";
    try { await api(path + "/cancel", { method: "POST", body }); toast("Cancel requested."); } catch (err) { toast(err.message, true); }
  } }, "Cancel run");
  fill(actions, h("div", { class: "actions" },
    h("form", { class: "signal", onsubmit: async (e) => {
      e.preventDefault();
      const n = signalName.value.trim();
      if (!n) { toast("Name the signal.", true); return; }
      try {
        const text = signalPayload.value.trim();
        if (text) JSON.parse(text);
        await api(path + "/signals/" + encodeURIComponent(n), { method: "POST", body: text || "" });
        toast(`Signal ${n} sent.`);
        signalPayload.value = "";
      } catch (err) { toast(err instanceof SyntaxError ? "The payload is not JSON." : err.message, true); }
    } }, h("h2", {}, "Signal"), h("div", { class: "row-flex" }, signalName, signalSend), signalPayload, received),
    h("div", { class: "row-flex", style: { alignItems: "flex-start" } }, resumeButton, cancelGrace, cancelButton)));

  function renderActions() {
    const done = finished();
    for (const b of [signalSend, resumeButton, cancelButton, cancelGrace]) b.disabled = done;
    const taken = st.entries.filter((e) => e && e.kind === "signal").length;
    received.textContent = taken ? `${taken} signal(s) received so far` : "";
  }

  // The timeline's rows: a step occurrence (its attempts), a branch (its
  // attempts, or running), a sleep or a signal wait (a gap).
  function lanes() {
    const byKey = new Map();
    const out = [];
    let previousEnd = st.run ? Date.parse(st.run.created_at) : 0;
    for (const e of st.entries) {
      if (!e) continue;
      // A signal is journaled when it is taken: the wait began when the
      // workflow's previous entry ended.
      if (e.kind === "signal") e.waitFrom = previousEnd;
      previousEnd = Math.max(previousEnd, Date.parse(e.finished_at));
      if (e.kind === "clock" || e.kind === "random") continue;
      const key = `${e.kind}:${e.name}#${e.occurrence}`;
      let lane = byKey.get(key);
      if (!lane) { lane = { key, kind: e.kind, name: e.name, occurrence: e.occurrence, entries: [], attempts: [] }; byKey.set(key, lane); out.push(lane); }
      lane.entries.push(e);
    }
    // Waiting now: for a signal (its name is known once it is taken) or a timer.
    if (st.run && (st.run.status === "waiting" || st.run.status === "sleeping")) {
      const name = st.run.status === "waiting" ? "waiting for a signal" : "sleeping";
      out.push({ key: "now:" + name, kind: "pending", name, occurrence: 1, entries: [], attempts: [], from: previousEnd });
    }
    for (const lane of out) {
      if (lane.kind === "spawn") {
        lane.attempts = st.branches.filter((b) => b.name === lane.name && b.occurrence === lane.occurrence);
      }
    }
    return out;
  }

  function span() {
    const r = st.run;
    const start = Date.parse(r.created_at);
    let end = r.finished_at ? Date.parse(r.finished_at) : Date.now();
    for (const e of st.entries) if (e) end = Math.max(end, Date.parse(e.finished_at));
    for (const b of st.branches) end = Math.max(end, Date.parse(b.finished_at));
    return { start, end: Math.max(end, start + 1) };
  }

  function bars(lane, t) {
    const pct = (ms) => `${(100 * (ms - t.start)) / (t.end - t.start)}%`;
    const width = (a, b) => `${Math.max(0, (100 * (b - a)) / (t.end - t.start))}%`;
    const bar = (cls, a, b, title) => h("div", { class: "bar " + cls, title, dataset: { start: a, end: b }, style: { left: pct(a), width: width(a, b) } });
    const out = [];
    if (lane.kind === "step") {
      for (const e of lane.entries) {
        const a = Date.parse(e.started_at), b = Date.parse(e.finished_at);
        out.push(bar(e.status, a, b, `attempt ${e.attempt}: ${e.status}, ${fmtDur(b - a)}`));
      }
    } else if (lane.kind === "spawn") {
      const spawned = Date.parse(lane.entries[0].started_at);
      for (const a of lane.attempts) {
        const s = Date.parse(a.started_at), f = Date.parse(a.finished_at);
        out.push(bar("branch " + a.status, s, f, `attempt ${a.attempt}: ${a.status}, ${fmtDur(f - s)}`));
      }
      // The branch's state from its attempts (refreshed on every branch
      // event; the spawn entry's own `branch_status` is as of its page).
      const lastAttempt = lane.attempts.reduce((a, b) => (!a || b.attempt > a.attempt ? b : a), null);
      const status = lastAttempt && lastAttempt.status !== "failed" ? lastAttempt.status : "running";
      if (status === "running" && !finished()) {
        const from = lane.attempts.length ? Date.parse(lane.attempts[lane.attempts.length - 1].finished_at) : spawned;
        out.push(bar("running", from, t.end, "running"));
      }
    } else if (lane.kind === "pending") {
      out.push(bar("wait", lane.from, t.end, `${lane.name} since ${fmtTime(new Date(lane.from).toISOString())}`));
    } else if (lane.kind === "cancel") {
      // The cancellation told to the workflow: a mark, then its grace period.
      for (const e of lane.entries) {
        const a = Date.parse(e.started_at);
        const until = e.output && e.output.grace_until ? Date.parse(e.output.grace_until) : a;
        out.push(bar("error", a, Math.max(a, Math.min(until, t.end)), `cancellation delivered; may clean up until ${fmtTime(e.output && e.output.grace_until)}`));
      }
    } else {
      // A sleep or a signal wait: a gap in the run's work.
      for (const e of lane.entries) {
        const a = e.kind === "signal" && e.waitFrom ? e.waitFrom : Date.parse(e.started_at);
        const wake = e.kind === "timer" && e.output && e.output.wake_at ? Date.parse(e.output.wake_at) : Date.parse(e.finished_at);
        out.push(bar("wait", a, Math.max(wake, Date.parse(e.finished_at)), e.kind === "timer" ? `sleep until ${fmtTime(e.output && e.output.wake_at)}` : `waited ${fmtDur(Date.parse(e.finished_at) - a)} for ${e.name}`));
      }
    }
    return out;
  }

  function laneDuration(lane) {
    if (lane.kind === "pending") return fmtDur(Date.now() - lane.from);
    const items = lane.kind === "spawn" ? lane.attempts : lane.entries;
    if (!items.length) return "";
    const first = items[0].waitFrom || Date.parse(items[0].started_at);
    return fmtDur(Date.parse(items[items.length - 1].finished_at) - first);
  }

  // Rows are drawn in chunks between frames, so a 10,000-step history
  // keeps the page responsive; rows off screen are skipped by the browser
  // (`content-visibility: auto`).
  let drawToken = 0;
  function renderTimeline() {
    const t = span();
    fill(axis, h("span", {}, fmtTime(new Date(t.start).toISOString())), h("span", {}, fmtDur(t.end - t.start)));
    const all = lanes();
    $("#entry-count").textContent = `${st.entries.length.toLocaleString()} ${st.entries.length === 1 ? "entry" : "entries"}`;
    const mine = ++drawToken;
    const existing = rows.children;
    let i = 0;
    const chunk = () => {
      if (mine !== drawToken) return;
      const stop = Math.min(all.length, i + 400);
      for (; i < stop; i++) {
        const lane = all[i];
        const label = { spawn: "branch", timer: "sleep", pending: "now" }[lane.kind] || lane.kind;
        const el = h("div", { class: "trow" + (st.selected === lane.key ? " selected" : ""), dataset: { kind: lane.kind === "spawn" ? "branch" : lane.kind, key: lane.key, name: lane.name },
          onclick: () => { st.selected = lane.key; showDetail(lane); rows.querySelectorAll(".trow.selected").forEach((x) => x.classList.remove("selected")); el.classList.add("selected"); } },
          h("div", { class: "tlabel", title: lane.name }, h("span", { class: "kind" }, label), lane.name, lane.occurrence > 1 ? ` #${lane.occurrence}` : ""),
          h("div", { class: "track" }, bars(lane, t)),
          h("div", { class: "tdur" }, laneDuration(lane)));
        if (existing[i]) existing[i].replaceWith(el); else rows.append(el);
      }
      if (i < all.length) requestAnimationFrame(chunk);
      else while (rows.children.length > all.length) rows.lastChild.remove();
    };
    chunk();
    if (st.selected) { const lane = all.find((l) => l.key === st.selected); if (lane) showDetail(lane); }
  }

  function showDetail(lane) {
    detail.hidden = false;
    const items = lane.kind === "spawn" ? lane.attempts : lane.entries;
    const title = `${lane.kind === "spawn" ? "Branch" : lane.kind === "timer" ? "Sleep" : lane.kind === "signal" ? "Signal" : lane.kind === "cancel" ? "Cancellation" : "Step"} ${lane.name}${lane.occurrence > 1 ? " #" + lane.occurrence : ""}`;
    const rowsOf = items.map((e) => {
      const retry = e.status === "failed" && e.output && e.output.retry_at ? `retry at ${fmtTime(e.output.retry_at)}` : "";
      return h("tr", {},
        h("td", {}, String(e.attempt)), h("td", {}, badge(e.status)),
        h("td", {}, fmtTime(e.started_at)), h("td", {}, fmtDur(e.duration_ms)),
        h("td", {}, e.error ? h("pre", { class: "error" }, e.error) : "", retry ? h("div", { class: "muted" }, retry) : ""));
    });
    const last = items[items.length - 1];
    fill(detail, 
      h("div", { class: "row-flex" }, h("h2", {}, title), h("span", { class: "spacer" }),
        h("button", { type: "button", class: "link", onclick: () => { detail.hidden = true; st.selected = null; } }, "close")),
      items.length ? h("table", { class: "attempts" }, h("thead", {}, h("tr", {}, ["Attempt", "Status", "Started", "Took", "Error"].map((x) => h("th", {}, x)))), h("tbody", {}, rowsOf))
        : h("p", { class: "muted" }, lane.kind === "pending" ? `The run is ${lane.name}.` : "Running: no attempt has ended yet."),
      last && last.output !== null && last.output !== undefined ? h("div", {}, h("h2", {}, lane.kind === "signal" ? "Payload" : "Output"), jsonView(last.output)) : null);
  }

  // History comes in pages, appended as they arrive. A reload (after a
  // `reset`) starts a new generation: pages of the old one are dropped.
  let generation = 0;
  async function loadHistory() {
    const mine = generation;
    for (;;) {
      const page = await api(`${path}/history?after=${st.lastPos}&limit=1000`);
      if (mine !== generation) return;
      for (const e of page.entries) { st.entries[e.position] = e; st.lastPos = Math.max(st.lastPos, e.position); }
      if (page.next === null || !page.entries.length) break;
    }
  }

  // The run without its history (paged apart), and its branches' attempts.
  async function loadRun() {
    const run = await api(path + "?history=false");
    st.run = run;
    st.branches = run.branches || [];
    return run.seq;
  }

  async function loadAll() {
    try {
      const seq = await loadRun();
      await loadHistory();
      error.textContent = "";
      renderHead();
      renderTimeline();
      return seq;
    } catch (e) {
      error.textContent = e.status === 404 ? `There is no run ${id}.` : e.message;
      return null;
    }
  }

  const refreshRun = throttle(async () => {
    try { await loadRun(); renderHead(); renderTimeline(); } catch { /* shown on the next full load */ }
  }, 250);
  const refreshHistory = throttle(async () => {
    try { await loadHistory(); renderTimeline(); } catch { /* idem */ }
  }, 150);

  // Running bars grow with the clock.
  const tick = setInterval(() => { if (st.run && !finished()) renderTimeline(); }, 1000);
  let unsubscribe = () => {}, stopped = false;
  (async () => {
    const seq = await loadAll();
    if (seq === null || stopped) return;
    unsubscribe = subscribe(path + "/events", seq, (kind) => {
      if (kind === "history") refreshHistory();
      else refreshRun();
    }, () => { generation++; st.entries = []; st.lastPos = -1; return loadAll(); });
  })();
  return () => { stopped = true; clearInterval(tick); unsubscribe(); };
}

// ---- Upload a module, start a run.
function newPage(main) {
  const file = h("input", { type: "file", id: "module-file", accept: ".wasm,application/wasm" });
  const uploadOut = h("div", { id: "upload-result" });
  const module = h("select", { id: "start-module" });
  const input = h("textarea", { id: "start-input", placeholder: "{}" }, "{}");
  const runId = h("input", { id: "start-run-id", placeholder: "run id (optional)", size: 30 });
  const error = h("p", { class: "error", id: "start-error" });

  async function loadModules(select) {
    try {
      const list = await api("/api/modules");
      module.replaceChildren(...list.modules.slice().reverse().map((m) =>
        h("option", { value: m.hash, selected: m.hash === select }, `${m.hash.slice(0, 16)}…  ${(m.size / 1024).toFixed(0)} KiB  ${fmtTime(m.created_at)}`)));
      if (!list.modules.length) module.append(h("option", { value: "" }, "no module uploaded yet"));
    } catch (e) { error.textContent = e.message; }
  }

  main.append(
    h("div", { class: "card" }, h("h1", {}, "Upload a module"),
      h("p", { class: "muted" }, "A workflow compiled to wasm32-wasip1 (needs an admin token)."),
      h("form", { class: "row-flex", onsubmit: async (e) => {
        e.preventDefault();
        const f = file.files[0];
        if (!f) return;
        try {
          const info = await api("/api/modules", { method: "POST", body: await f.arrayBuffer(), headers: { "Content-Type": "application/wasm" } });
          uploadOut.replaceChildren(h("p", {}, "Stored as ", h("code", { id: "uploaded-hash" }, info.hash), ` (${info.size.toLocaleString()} bytes, ${info.imports.length} imports).`));
          await loadModules(info.hash);
        } catch (err) { uploadOut.replaceChildren(h("p", { class: "error" }, err.message)); }
      } }, file, h("button", { type: "submit", id: "upload" }, "Upload")),
      uploadOut),
    h("div", { class: "card" }, h("h1", {}, "Start a run"),
      h("form", { onsubmit: async (e) => {
        e.preventDefault();
        let value;
        try { value = JSON.parse(input.value || "null"); } catch { error.textContent = "The input is not JSON."; return; }
        const body = { module: module.value, input: value };
        if (runId.value.trim()) body.run_id = runId.value.trim();
        try {
          const started = await api("/api/runs", { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } });
          location.hash = "#/runs/" + encodeURIComponent(started.run_id);
        } catch (err) { error.textContent = err.message; }
      } },
        h("label", { class: "field", for: "start-module" }, "Module"), module,
        h("label", { class: "field", for: "start-input" }, "Input (JSON)"), input,
        h("label", { class: "field", for: "start-run-id" }, "Run id"), runId,
        error,
        h("p", {}, h("button", { type: "submit", class: "primary", id: "start-run" }, "Start")))));
  loadModules();
  return () => {};
}

route();
