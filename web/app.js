// The AgentVM web UI: plain ES modules, no build step, no third-party code
// yet. Every piece of text from the server (output, prompts, file names,
// branch names, errors) reaches the page through textContent or a text
// node, never innerHTML. The API key lives in sessionStorage only and is
// sent as the X-API-Key header.

const KEY = "agentvm.key";
const main = document.getElementById("main");
const nav = document.getElementById("nav");
const statusLine = document.getElementById("status");
// what the current page must stop when the user leaves it
let leave = [];

function key() {
  return sessionStorage.getItem(KEY);
}

/** An element: el("a", {href: "#/x"}, "text", child...). */
function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v === true) e.setAttribute(k, "");
    else e.setAttribute(k, String(v));
  }
  for (const k of kids) {
    if (k === undefined || k === null) continue;
    e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  }
  return e;
}

function say(text) {
  statusLine.textContent = text;
}

class ApiError extends Error {
  constructor(status, body) {
    super(typeof body?.detail === "string" ? body.detail : `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

/** A call to the API with the key; JSON in and out unless `raw`. */
async function api(path, { method = "GET", body, raw = false, signal, signIn = false } = {}) {
  const headers = { "X-API-Key": key() || "" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: "no-store",
    credentials: "omit",
  });
  if (r.status === 401) {
    // signing in says so itself; anywhere else the key has gone bad
    if (!signIn) signOut("The server did not accept the key; sign in again.");
    throw new ApiError(401, null);
  }
  if (raw && r.ok) return r;
  const text = await r.text();
  let v = null;
  try {
    v = text ? JSON.parse(text) : null;
  } catch {
    v = text;
  }
  if (!r.ok) throw new ApiError(r.status, v);
  return v;
}

/** An API error as one line: the server's field messages, or its detail. */
function errorText(e) {
  const d = e.body?.detail;
  return Array.isArray(d) ? d.map((x) => x.msg).join("; ") : e.message;
}

function signOut(message) {
  sessionStorage.removeItem(KEY);
  location.hash = "#/signin";
  if (message) say(message);
}

function age(ms) {
  if (!ms) return "";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 90) return `${s}s`;
  if (s < 5400) return `${Math.round(s / 60)}m`;
  if (s < 129600) return `${Math.round(s / 3600)}h`;
  return `${Math.round(s / 86400)}d`;
}

function duration(j) {
  if (!j.started_at) return "";
  const end = j.finished_at || Date.now();
  return `${((end - j.started_at) / 1000).toFixed(1)}s`;
}

// ---- pages ----

function signInPage() {
  nav.hidden = true;
  const input = el("input", { type: "password", id: "key", name: "key", autocomplete: "off", required: true });
  const err = el("p", { class: "error", id: "signin-error", role: "alert" });
  const form = el(
    "form",
    {
      onsubmit: async (ev) => {
        ev.preventDefault();
        sessionStorage.setItem(KEY, input.value.trim());
        try {
          await api("/v1/jobs?limit=1", { signIn: true });
          location.hash = "#/jobs";
        } catch (e) {
          sessionStorage.removeItem(KEY);
          err.textContent = e.status === 401 ? "That key was refused." : `Could not reach the server: ${e.message}`;
        }
      },
    },
    el("h1", {}, "Sign in"),
    el("label", { for: "key" }, "API key"),
    input,
    el("p", { class: "muted" }, "Kept in this tab only (sessionStorage), sent as a header."),
    err,
    el("button", { type: "submit" }, "Sign in"),
  );
  main.replaceChildren(form);
  input.focus();
}

const STATUSES = ["", "queued", "running", "succeeded", "failed", "timed_out", "cancelled", "interrupted"];

function jobsPage(params) {
  const filter = el(
    "select",
    { id: "status-filter", "aria-label": "Status" },
    ...STATUSES.map((s) => el("option", { value: s, selected: s === (params.get("status") || "") }, s || "any status")),
  );
  const body = el("tbody");
  const table = el(
    "table",
    { "aria-label": "Jobs" },
    el(
      "thead",
      {},
      el("tr", {}, el("th", {}, "Job"), el("th", {}, "Status"), el("th", { class: "agent" }, "Agent"), el("th", {}, "Repository or workspace"),
        el("th", { class: "age" }, "Age"), el("th", { class: "dur" }, "Duration")),
    ),
    body,
  );
  const more = el("button", { type: "button", id: "more", hidden: true }, "More");
  let cursor = null;
  const row = (j) =>
    el(
      "tr",
      {},
      el("td", {}, el("a", { href: `#/jobs/${encodeURIComponent(j.id)}` }, j.id)),
      el("td", { class: `status-${j.status}` }, j.status),
      el("td", { class: "agent" }, j.agent),
      el("td", { class: "repo" }, j.workspace || j.repo_path || ""),
      el("td", { class: "age" }, age(j.created_at)),
      el("td", { class: "dur" }, duration(j)),
    );
  async function load(append) {
    const q = new URLSearchParams({ limit: "50" });
    if (filter.value) q.set("status", filter.value);
    if (append && cursor) q.set("cursor", cursor);
    const v = await api(`/v1/jobs?${q}`);
    if (append) body.append(...v.jobs.map(row));
    else body.replaceChildren(...v.jobs.map(row));
    cursor = v.next_cursor;
    more.hidden = !cursor;
    if (!append) say(`${v.jobs.length}${cursor ? "+" : ""} jobs`);
  }
  filter.addEventListener("change", () => {
    location.hash = filter.value ? `#/jobs?status=${encodeURIComponent(filter.value)}` : "#/jobs";
  });
  more.addEventListener("click", () => load(true).catch(showError));
  main.replaceChildren(el("h1", {}, "Jobs"), el("div", { class: "toolbar" }, filter, el("a", { href: "#/new" }, "New job")), table, more);
  load(false).catch(showError);
  // live without reload: the first page again every two seconds
  const t = setInterval(() => {
    if (!cursor || body.children.length <= 50) load(false).catch(() => {});
  }, 2000);
  leave.push(() => clearInterval(t));
}

function newJobPage() {
  const field = (name, label, input) => {
    const err = el("p", { class: "error", id: `err-${name}`, role: "alert" });
    input.id = `f-${name}`;
    input.name = name;
    input.setAttribute("aria-describedby", err.id);
    return { box: el("div", {}, el("label", { for: input.id }, label), input, err), err, input };
  };
  const f = {
    agent: field("agent", "Agent", el("input", { type: "text", value: "shell", list: "agents" })),
    repo_path: field("repo_path", "Repository (a path under the server's allowed roots)", el("input", { type: "text" })),
    workspace: field("workspace", "or a workspace (id or name)", el("input", { type: "text" })),
    prompt: field("prompt", "Prompt", el("textarea", {})),
    timeout: field("timeout", "Timeout (seconds, optional)", el("input", { type: "text", inputmode: "numeric" })),
    network: field("network", "Network (empty: the profile's; none, host, or allow:HOST[:PORT],...)",
      el("input", { type: "text", list: "networks", placeholder: "allow:api.example.com" })),
  };
  const general = el("p", { class: "error", role: "alert", id: "form-error" });
  const form = el(
    "form",
    {
      onsubmit: async (ev) => {
        ev.preventDefault();
        for (const x of Object.values(f)) x.err.textContent = "";
        general.textContent = "";
        const body = { agent: f.agent.input.value.trim(), prompt: f.prompt.input.value };
        if (f.repo_path.input.value.trim()) body.repo_path = f.repo_path.input.value.trim();
        if (f.workspace.input.value.trim()) body.workspace = f.workspace.input.value.trim();
        if (f.timeout.input.value.trim()) body.timeout = Number(f.timeout.input.value.trim());
        if (f.network.input.value.trim()) body.network = f.network.input.value.trim();
        try {
          const j = await api("/v1/jobs", { method: "POST", body });
          location.hash = `#/jobs/${encodeURIComponent(j.id)}`;
        } catch (e) {
          // the server's own messages, beside the fields they are about
          const detail = e.body?.detail;
          if (Array.isArray(detail)) {
            for (const d of detail) {
              const name = Array.isArray(d.loc) ? d.loc[d.loc.length - 1] : "";
              (f[name]?.err || general).textContent = d.msg;
            }
          } else {
            general.textContent = e.message;
          }
        }
      },
    },
    el("h1", {}, "New job"),
    el("datalist", { id: "networks" }, el("option", { value: "none" }), el("option", { value: "host" })),
    el("datalist", { id: "agents" }, ...["shell", "claude", "codex", "opencode", "aider"].map((a) => el("option", { value: a }))),
    ...Object.values(f).map((x) => x.box),
    general,
    el("button", { type: "submit" }, "Start"),
  );
  main.replaceChildren(form);
}

/** The patch side by side: for each hunk, old lines on the left and new
 * on the right, a removed run beside the added run that replaces it. */
function renderSideBySide(text) {
  const table = el("table", { class: "diff side", "aria-label": "Patch, side by side" });
  const row = (l, r, lc, rc) => el("tr", {}, el("td", { class: lc }, l ?? ""), el("td", { class: rc }, r ?? ""));
  let dels = [];
  let adds = [];
  const flush = () => {
    for (let i = 0; i < Math.max(dels.length, adds.length); i++) {
      table.append(row(dels[i], adds[i], dels[i] === undefined ? "" : "del", adds[i] === undefined ? "" : "add"));
    }
    dels = [];
    adds = [];
  };
  for (const line of text.split("\n")) {
    if (line.startsWith("diff --git")) {
      flush();
      table.append(el("tr", {}, el("th", { colspan: "2", class: "file" }, line.replace(/^diff --git a\/(.*) b\/.*$/, "$1"))));
    } else if (line.startsWith("+++ ") || line.startsWith("--- ") || line.startsWith("index ") || line.startsWith("new file") || line.startsWith("deleted file")) {
      // the file's header: shown as its name above
    } else if (line.startsWith("@@")) {
      flush();
      table.append(el("tr", {}, el("td", { colspan: "2", class: "hunk" }, line)));
    } else if (line.startsWith("-")) {
      dels.push(line.slice(1));
    } else if (line.startsWith("+")) {
      adds.push(line.slice(1));
    } else {
      flush();
      if (line !== "") table.append(row(line.slice(1), line.slice(1), "", ""));
    }
  }
  flush();
  return table;
}

/** Unified or side by side, with a switch between them. */
function patchView(text) {
  const box = el("div", {});
  const unified = el("button", { type: "button", "aria-pressed": "true" }, "Unified");
  const side = el("button", { type: "button", "aria-pressed": "false" }, "Side by side");
  const body = el("div", {}, renderPatch(text));
  const pick = (s) => {
    unified.setAttribute("aria-pressed", String(!s));
    side.setAttribute("aria-pressed", String(s));
    body.replaceChildren(s ? renderSideBySide(text) : renderPatch(text));
  };
  unified.addEventListener("click", () => pick(false));
  side.addEventListener("click", () => pick(true));
  box.append(el("div", { class: "toolbar" }, unified, side), body);
  return box;
}

/** The patch as a unified diff: a line per span, classed, as text. */
function renderPatch(text) {
  const pre = el("pre", { class: "diff", "aria-label": "Patch" });
  for (const line of text.split("\n")) {
    let cls = "";
    if (line.startsWith("diff --git") || line.startsWith("+++ ") || line.startsWith("--- ")) cls = "file";
    else if (line.startsWith("@@")) cls = "hunk";
    else if (line.startsWith("+")) cls = "add";
    else if (line.startsWith("-")) cls = "del";
    pre.append(cls ? el("span", { class: cls }, line) : document.createTextNode(line + "\n"));
  }
  return pre;
}

/** A log of any length that stays scrollable: its lines are kept in an
 * array and only those in view (and a margin) are in the page, in one
 * text node, so 50 MB of output costs the DOM a screenful. Lines do not
 * wrap (the view scrolls sideways), so every line has the same height. */
class LogView {
  constructor() {
    this.lines = [""];
    this.box = el("div", { class: "log", id: "log", role: "log", "aria-label": "Output", tabindex: "0" });
    this.spacer = el("div", { class: "log-spacer" });
    this.view = el("pre", { class: "log-lines" });
    this.box.append(this.spacer, this.view);
    this.live = true;
    this.pending = false;
    this.lineHeight = 0;
    this.back = el("button", { type: "button", hidden: true }, "Back to live");
    this.back.addEventListener("click", () => {
      this.live = true;
      this.back.hidden = true;
      this.box.scrollTop = this.box.scrollHeight;
    });
    // auto-scroll stops when the reader scrolls up, and comes back with
    // the button or by scrolling to the end
    this.box.addEventListener("scroll", () => {
      this.live = this.box.scrollTop + this.box.clientHeight >= this.box.scrollHeight - 4;
      this.back.hidden = this.live;
      this.schedule();
    });
  }
  append(text) {
    const parts = text.split("\n");
    this.lines[this.lines.length - 1] += parts[0];
    for (let i = 1; i < parts.length; i++) this.lines.push(parts[i]);
    this.schedule();
  }
  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.render();
    });
  }
  render() {
    if (!this.lineHeight) {
      this.view.textContent = "x";
      this.lineHeight = this.view.getBoundingClientRect().height || 18;
    }
    const lh = this.lineHeight;
    const n = this.lines.length;
    this.spacer.style.height = `${n * lh}px`;
    if (this.live) this.box.scrollTop = this.box.scrollHeight;
    const first = Math.max(0, Math.floor(this.box.scrollTop / lh) - 50);
    const last = Math.min(n, first + Math.ceil(this.box.clientHeight / lh) + 100);
    this.view.style.transform = `translateY(${first * lh}px)`;
    this.view.textContent = this.lines.slice(first, last).join("\n");
  }
  /** The whole text (for a copy, and for the tests). */
  text() {
    return this.lines.join("\n");
  }
}

/** Follow a job's output (server-sent events read with fetch, since
 * EventSource cannot send the key as a header) into `pre`. */
async function follow(id, log, onEnd, signal, onEgress) {
  const r = await api(`/v1/jobs/${encodeURIComponent(id)}/logs?follow=true`, { raw: true, signal });
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const ev = buf.slice(0, i);
      buf = buf.slice(i + 2);
      let type = "message";
      const data = [];
      for (const l of ev.split("\n")) {
        if (l.startsWith("event:")) type = l.slice(6).trim();
        else if (l.startsWith("data:")) data.push(l.slice(5).replace(/^ /, ""));
      }
      if (type === "stdout" || type === "stderr") {
        log.append(data.join("\n") + "\n");
      } else if (type === "egress") {
        try {
          onEgress(JSON.parse(data.join("\n")));
        } catch {
          // not JSON: nothing to show
        }
      } else if (type === "end") {
        onEnd();
      }
    }
  }
}

async function jobPage(id) {
  const j = await api(`/v1/jobs/${encodeURIComponent(id)}`);
  const info = el("dl", {});
  const show = (j) => {
    info.replaceChildren(
      ...[["Status", j.status], ["Agent", j.agent], ["Repository", j.repo_path], ["Workspace", j.workspace], ["Prompt", j.prompt],
        ["Error", j.error], ["Branch", j.branch]]
        .filter(([, v]) => v !== undefined && v !== null && v !== "")
        .flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-field": k.toLowerCase() }, v)]),
    );
  };
  show(j);
  const log = new LogView();
  // the egress proxy's decisions as they are made: one row per
  // connection, updated when it closes
  const egress = el("tbody");
  const egressBox = el("section", { id: "egress", hidden: true }, el("h2", {}, "Network"),
    el("table", { "aria-label": "Egress decisions" }, el("thead", {}, el("tr", {}, ...["Connection", "Host", "Decision", "Bytes up / down"].map((h) => el("th", {}, h)))), egress));
  const conns = new Map();
  const onEgress = (e) => {
    egressBox.hidden = false;
    const row = el("tr", { "data-conn": e.conn },
      el("td", {}, String(e.conn)),
      el("td", {}, `${e.method || ""} ${e.host}:${e.port}`),
      el("td", { class: e.allowed ? "" : "error" }, e.allowed ? (e.phase === "open" ? "allowed, open" : "allowed") : `refused: ${e.reason || ""}`),
      el("td", {}, `${e.bytes_up ?? 0} / ${e.bytes_down ?? 0}`));
    const old = conns.get(e.conn);
    if (old) old.replaceWith(row);
    else egress.append(row);
    conns.set(e.conn, row);
  };
  const patchBox = el("section", { id: "patch" });
  const result = el("p", { id: "apply-result", role: "status" });
  const cancel = el("button", { type: "button", id: "cancel" }, "Cancel");
  const apply = el("button", { type: "button", id: "apply", hidden: true }, "Apply to a new branch");
  const playRec = recordingButton(`/v1/jobs/${encodeURIComponent(id)}/recording`);
  cancel.addEventListener("click", async () => {
    try {
      await api(`/v1/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" });
      say("Cancelling");
    } catch (e) {
      showError(e);
    }
  });
  apply.addEventListener("click", async () => {
    try {
      const v = await api(`/v1/jobs/${encodeURIComponent(id)}/apply`, { method: "POST" });
      result.textContent = `Applied on branch ${v.branch} (commit ${v.commit})`;
      apply.disabled = true;
    } catch (e) {
      result.textContent = e.message;
    }
  });
  const ended = async () => {
    const now = await api(`/v1/jobs/${encodeURIComponent(id)}`);
    show(now);
    cancel.hidden = true;
    try {
      const r = await api(`/v1/jobs/${encodeURIComponent(id)}/patch`, { raw: true });
      const text = await r.text();
      patchBox.replaceChildren(el("h2", {}, "Patch"), text ? patchView(text) : el("p", { class: "muted" }, "No changes."));
      apply.hidden = !text;
    } catch (e) {
      patchBox.replaceChildren(el("p", { class: "error" }, e.message));
    }
  };
  main.replaceChildren(
    el("h1", {}, `Job ${j.id}`),
    info,
    el("div", { class: "toolbar" }, cancel, apply, playRec),
    result,
    el("h2", {}, "Output"),
    log.box,
    log.back,
    egressBox,
    patchBox,
  );
  const ctl = new AbortController();
  leave.push(() => ctl.abort());
  follow(id, log, () => ended().catch(showError), ctl.signal, onEgress).catch((e) => {
    if (e.name !== "AbortError") showError(e);
  });
}

// ---- overview ----

const SVG = "http://www.w3.org/2000/svg";

/** A small bar chart (SVG made with the DOM, text as text): `bars` is
 * [[label, value]]; its title says what it shows. */
function barChart(title, bars, unit) {
  const w = 320;
  const h = 120;
  const max = Math.max(1, ...bars.map(([, v]) => v));
  const bw = w / Math.max(1, bars.length);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h + 30}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("class", "chart");
  const t = document.createElementNS(SVG, "title");
  t.textContent = `${title}: ${bars.map(([l, v]) => `${l} ${v}`).join(", ")}`;
  svg.append(t);
  bars.forEach(([label, v], i) => {
    const r = document.createElementNS(SVG, "rect");
    const bh = (v / max) * h;
    r.setAttribute("x", String(i * bw + 2));
    r.setAttribute("y", String(h - bh));
    r.setAttribute("width", String(Math.max(1, bw - 4)));
    r.setAttribute("height", String(bh));
    r.setAttribute("class", "bar");
    r.setAttribute("data-value", String(v));
    svg.append(r);
    if (bars.length <= 12 || i === 0 || i === bars.length - 1) {
      const tx = document.createElementNS(SVG, "text");
      tx.setAttribute("x", String(bars.length <= 12 ? i * bw + bw / 2 : i === 0 ? 0 : w));
      tx.setAttribute("y", String(h + 14));
      tx.setAttribute("text-anchor", bars.length <= 12 ? "middle" : i === 0 ? "start" : "end");
      tx.setAttribute("class", "axis");
      tx.textContent = label;
      svg.append(tx);
    }
  });
  return el("figure", { class: "chart-box" }, el("figcaption", {}, `${title}${unit ? ` (${unit})` : ""}`), svg);
}

/** A histogram of the Prometheus text: [[upper bound, count in bucket]]. */
function histogram(text, name) {
  const out = [];
  let prev = 0;
  for (const line of text.split("\n")) {
    const m = line.match(new RegExp(`^${name}_bucket\\{le="([^"]+)"\\} ([0-9.e+]+)$`));
    if (!m) continue;
    const n = Number(m[2]);
    out.push([m[1] === "+Inf" ? "more" : m[1], n - prev]);
    prev = n;
  }
  return out;
}

/** Per minute over the last 30 minutes: how many of `times` fall in each. */
function perMinute(times) {
  const now = Date.now();
  const bars = [];
  for (let i = 29; i >= 0; i--) {
    const from = now - (i + 1) * 60000;
    const to = now - i * 60000;
    bars.push([i === 0 ? "now" : `-${i}m`, times.filter((t) => t > from && t <= to).length]);
  }
  return bars;
}

async function overviewPage() {
  const [running, queued, failed, recent, sessions, metrics] = await Promise.all([
    api("/v1/jobs?status=running&limit=50"),
    api("/v1/jobs?status=queued&limit=50"),
    api("/v1/jobs?status=failed&limit=10"),
    api("/v1/jobs?limit=200"),
    api("/v1/sessions").catch(() => ({ sessions: [] })),
    api("/metrics", { raw: true }).then((r) => r.text()),
  ]);
  const link = (j) => el("li", {}, el("a", { href: `#/jobs/${encodeURIComponent(j.id)}` }, j.id), ` ${j.agent}, ${age(j.created_at)} ago`,
    j.error ? el("span", { class: "muted" }, ` ${j.error}`) : null);
  const list = (title, items, empty) => el("section", {}, el("h2", {}, title), items.length ? el("ul", {}, ...items) : el("p", { class: "muted" }, empty));
  const live = (sessions.sessions || []).filter((s) => s.status === "running");
  const charts = el("div", { class: "charts" },
    barChart("Sandbox start-up", histogram(metrics, "agentvm_sandbox_start_seconds"), "jobs per bucket, upper bound in s"),
    barChart("Job durations", histogram(metrics, "agentvm_job_duration_seconds"), "jobs per bucket, upper bound in s"),
    barChart("Jobs finished per minute", perMinute(recent.jobs.map((j) => j.finished_at).filter(Boolean)), "the last 30 minutes, newest 200 jobs"));
  main.replaceChildren(
    el("h1", {}, "Overview"),
    el("div", { class: "cards" },
      list("Running", running.jobs.map(link), "No job is running."),
      list("Queued", queued.jobs.map(link), "Nothing is queued."),
      list("Live sessions", live.map((s) => el("li", {}, s.name || s.id, ` ${s.agent || ""}`)), "No live session."),
      list("Recent failures", failed.jobs.map(link), "No failures.")),
    charts,
  );
  // egress refusals, from the audit trail (admin keys only)
  if (isAdmin) {
    const a = await api("/v1/audit?action=egress&limit=200");
    const refused = a.events.filter((e) => e.outcome.startsWith("refused")).map((e) => e.ts);
    charts.append(barChart("Egress refusals per minute", perMinute(refused), "the last 30 minutes, newest 200 decisions"));
  }
  const t = setTimeout(() => {
    if (location.hash.startsWith("#/overview")) route();
  }, 10000);
  leave.push(() => clearTimeout(t));
}

// ---- sessions ----

/** Load a script or stylesheet of this origin once. */
const loaded = new Map();
function load(src) {
  if (!loaded.has(src)) {
    loaded.set(
      src,
      new Promise((ok, fail) => {
        const css = src.endsWith(".css");
        const e = css ? el("link", { rel: "stylesheet", href: src }) : el("script", { src });
        e.addEventListener("load", () => ok());
        e.addEventListener("error", () => fail(new Error(`could not load ${src}`)));
        document.head.append(e);
      }),
    );
  }
  return loaded.get(src);
}

/** xterm.js, loaded only when a terminal is opened (the shim first). */
async function xterm() {
  await load("/ui/cssom-shim.js");
  await Promise.all([load("/ui/vendor/xterm.css"), load("/ui/vendor/xterm.js")]);
  await load("/ui/vendor/addon-fit.js");
  return { Terminal: window.Terminal, FitAddon: window.FitAddon.FitAddon };
}

/** A player for an asciicast v2 recording (a job's or a session's),
 * drawn by xterm.js: play, pause, and a slider to seek. (Not
 * asciinema-player: its terminal is WebAssembly, which this CSP does not
 * let compile.) */
async function recordingPlayer(path) {
  const box = el("section", { id: "player", "aria-label": "Recording" });
  const status = el("span", { id: "player-time" }, "loading");
  box.append(el("h2", {}, "Recording"), status);
  const r = await api(path, { raw: true });
  const lines = (await r.text()).split("\n").filter(Boolean);
  let header = {};
  try {
    header = JSON.parse(lines[0]);
  } catch {
    status.textContent = "not an asciicast recording";
    return box;
  }
  // output events only: [seconds, "o", text]
  const events = [];
  for (const l of lines.slice(1)) {
    try {
      const e = JSON.parse(l);
      if (Array.isArray(e) && e[1] === "o" && typeof e[2] === "string") events.push([Number(e[0]) || 0, e[2]]);
    } catch {
      // a line that is not an event: skipped
    }
  }
  const duration = events.length ? events[events.length - 1][0] : 0;
  const { Terminal } = await xterm();
  const screen = el("div", { class: "terminal player-screen" });
  const play = el("button", { type: "button", id: "player-play" }, "Play");
  const slider = el("input", { type: "range", id: "player-seek", min: "0", max: String(duration), step: "any", value: "0", "aria-label": "Position" });
  box.append(el("div", { class: "toolbar" }, play, slider), screen);
  const term = new Terminal({ cols: header.width || 80, rows: header.height || 24, disableStdin: true, convertEol: false });
  term.open(screen);
  let next = 0; // the first event not yet written
  let pos = 0; // seconds
  let timer = null;
  const show = () => {
    status.textContent = `${pos.toFixed(1)} / ${duration.toFixed(1)} s`;
    slider.value = String(pos);
  };
  const writeUpTo = (t) => {
    let out = "";
    while (next < events.length && events[next][0] <= t) out += events[next++][1];
    if (out) term.write(out);
  };
  const seek = (t) => {
    term.reset();
    next = 0;
    pos = Math.max(0, Math.min(duration, t));
    writeUpTo(pos);
    show();
  };
  const stop = () => {
    if (timer) clearInterval(timer);
    timer = null;
    play.textContent = "Play";
  };
  play.addEventListener("click", () => {
    if (timer) return stop();
    if (pos >= duration) seek(0);
    const start = performance.now() - pos * 1000;
    play.textContent = "Pause";
    timer = setInterval(() => {
      pos = Math.min(duration, (performance.now() - start) / 1000);
      writeUpTo(pos);
      show();
      if (pos >= duration) stop();
    }, 50);
  });
  slider.addEventListener("input", () => {
    stop();
    seek(Number(slider.value));
  });
  leave.push(() => {
    stop();
    term.dispose();
  });
  show();
  return box;
}

/** A button that opens the player of the recording at `path` below the page. */
function recordingButton(path) {
  const b = el("button", { type: "button", id: "play-recording" }, "Play recording");
  b.addEventListener("click", async () => {
    b.disabled = true;
    try {
      main.append(await recordingPlayer(path));
    } catch (e) {
      showError(e);
    }
  });
  return b;
}

async function sessionsPage() {
  const v = await api("/v1/sessions");
  const rows = (v.sessions || []).map((s) =>
    el("tr", {}, el("td", {}, el("a", { href: `#/sessions/${encodeURIComponent(s.id)}` }, s.name || s.id)), el("td", {}, s.status),
      el("td", { class: "agent" }, s.agent || (s.command || []).join(" ")), el("td", {}, s.repo_path || s.workspace || ""), el("td", { class: "age" }, age(s.created_at))),
  );
  const repo = el("input", { type: "text", id: "f-s-repo" });
  const command = el("input", { type: "text", id: "f-s-command", value: "sh" });
  const err = el("p", { class: "error", role: "alert" });
  const form = el(
    "form",
    {
      onsubmit: async (ev) => {
        ev.preventDefault();
        err.textContent = "";
        const body = { command: command.value.trim().split(/\s+/).filter(Boolean) };
        if (repo.value.trim()) body.repo_path = repo.value.trim();
        try {
          const s = await api("/v1/sessions", { method: "POST", body });
          location.hash = `#/sessions/${encodeURIComponent(s.id)}`;
        } catch (e) {
          err.textContent = errorText(e);
        }
      },
    },
    el("h2", {}, "New session"),
    el("label", { for: command.id }, "Command"),
    command,
    el("label", { for: repo.id }, "Repository (optional)"),
    repo,
    err,
    el("button", { type: "submit" }, "Open session"),
  );
  main.replaceChildren(
    el("h1", {}, "Sessions"),
    el("table", { "aria-label": "Sessions" },
      el("thead", {}, el("tr", {}, el("th", {}, "Name"), el("th", {}, "Status"), el("th", { class: "agent" }, "Command"), el("th", {}, "Repository"), el("th", { class: "age" }, "Age"))),
      el("tbody", {}, ...rows)),
    form,
  );
}

async function sessionPage(id) {
  const s = await api(`/v1/sessions/${encodeURIComponent(id)}`);
  const state = el("p", { id: "term-state", role: "status" }, "connecting");
  const box = el("div", { id: "terminal", class: "terminal" });
  const detach = el("button", { type: "button", id: "detach" }, "Detach");
  const attach = el("button", { type: "button", id: "attach", hidden: true }, "Attach");
  const take = el("button", { type: "button", id: "take-over", hidden: true }, "Take over writing");
  const end = el("button", { type: "button", id: "end" }, "End session");
  const playRec = recordingButton(`/v1/sessions/${encodeURIComponent(id)}/recording`);
  main.replaceChildren(el("h1", {}, `Session ${s.name || s.id}`), el("div", { class: "toolbar" }, detach, attach, take, end, playRec), state, box);
  const { Terminal, FitAddon } = await xterm();
  const term = new Terminal({ convertEol: false, cursorBlink: true, fontSize: 14 });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(box);
  fit.fit();
  let ws = null;
  const send = (m) => ws && ws.readyState === 1 && ws.send(JSON.stringify(m));
  const connect = () => {
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/sessions/${encodeURIComponent(id)}/attach`;
    // a browser cannot set a header here: the key goes as a subprotocol
    ws = new WebSocket(url, ["agentvm", `agentvm.key.${key()}`]);
    ws.binaryType = "arraybuffer";
    ws.addEventListener("message", (ev) => {
      if (typeof ev.data !== "string") {
        term.write(new Uint8Array(ev.data));
        return;
      }
      let m;
      try {
        m = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (m.type === "hello") {
        state.textContent = m.writer ? "attached, writing" : "attached, reading (another viewer writes)";
        take.hidden = m.writer;
        send({ type: "resize", rows: term.rows, cols: term.cols });
      } else if (m.type === "writer") {
        state.textContent = m.writer ? "attached, writing" : "attached, reading (another viewer took over)";
        take.hidden = m.writer;
      } else if (m.type === "paused") {
        state.textContent = m.paused ? "paused" : "attached";
      } else if (m.type === "notice") {
        state.textContent = m.detail;
      } else if (m.type === "exit") {
        state.textContent = `ended (exit ${m.exit_code ?? m.status})`;
        detach.hidden = true;
        take.hidden = true;
      }
    });
    ws.addEventListener("close", () => {
      if (!state.textContent.startsWith("ended")) state.textContent = "detached";
      detach.hidden = true;
      attach.hidden = state.textContent.startsWith("ended");
    });
    detach.hidden = false;
    attach.hidden = true;
  };
  const enc = new TextEncoder();
  term.onData((d) => ws && ws.readyState === 1 && ws.send(enc.encode(d)));
  const onResize = () => {
    fit.fit();
    send({ type: "resize", rows: term.rows, cols: term.cols });
  };
  window.addEventListener("resize", onResize);
  detach.addEventListener("click", () => {
    send({ type: "detach" });
    ws.close();
  });
  attach.addEventListener("click", connect);
  take.addEventListener("click", () => send({ type: "take_over" }));
  end.addEventListener("click", async () => {
    try {
      await api(`/v1/sessions/${encodeURIComponent(id)}`, { method: "DELETE" });
    } catch (e) {
      showError(e);
    }
  });
  leave.push(() => {
    window.removeEventListener("resize", onResize);
    if (ws) ws.close();
    term.dispose();
  });
  connect();
  term.focus();
}

// ---- workspaces ----

function layerCount(l) {
  return String(Array.isArray(l) ? l.length : (l ?? ""));
}

function mib(b) {
  return b === undefined || b === null ? "" : `${(b / 1048576).toFixed(1)} MiB`;
}

/** A form whose one text field posts to `path`; `then` gets the answer. */
function oneFieldForm(id, label, button, send, then) {
  const input = el("input", { type: "text", id, required: true });
  const err = el("p", { class: "error", role: "alert" });
  return el(
    "form",
    {
      class: "toolbar",
      onsubmit: async (ev) => {
        ev.preventDefault();
        err.textContent = "";
        try {
          await then(await send(input.value.trim()));
          input.value = "";
        } catch (e) {
          err.textContent = errorText(e);
        }
      },
    },
    el("label", { for: id }, label),
    input,
    el("button", { type: "submit" }, button),
    err,
  );
}

async function workspacesPage() {
  const v = await api("/v1/workspaces");
  const rows = v.workspaces.map((w) =>
    el("tr", {}, el("td", {}, el("a", { href: `#/workspaces/${encodeURIComponent(w.id)}` }, w.name)), el("td", { class: "repo" }, w.repo_path || ""),
      el("td", {}, layerCount(w.layers)), el("td", {}, mib(w.used_bytes)), el("td", {}, w.writer || "")),
  );
  const repo = el("input", { type: "text", id: "f-ws-repo", required: true });
  const name = el("input", { type: "text", id: "f-ws-name", required: true });
  const err = el("p", { class: "error", role: "alert" });
  const form = el(
    "form",
    {
      onsubmit: async (ev) => {
        ev.preventDefault();
        try {
          const w = await api("/v1/workspaces", { method: "POST", body: { name: name.value.trim(), repo_path: repo.value.trim() } });
          location.hash = `#/workspaces/${encodeURIComponent(w.id)}`;
        } catch (e) {
          err.textContent = errorText(e);
        }
      },
    },
    el("h2", {}, "New workspace"),
    el("label", { for: name.id }, "Name"),
    name,
    el("label", { for: repo.id }, "Repository"),
    repo,
    err,
    el("button", { type: "submit" }, "Create workspace"),
  );
  main.replaceChildren(
    el("h1", {}, "Workspaces"),
    el("table", { "aria-label": "Workspaces" },
      el("thead", {}, el("tr", {}, ...["Name", "Repository", "Layers", "Used", "Writer"].map((h) => el("th", {}, h)))), el("tbody", {}, ...rows)),
    form,
  );
}

async function workspacePage(id) {
  const base = `/v1/workspaces/${encodeURIComponent(id)}`;
  const w = await api(base);
  const info = el("dl", {});
  const showInfo = (w) =>
    info.replaceChildren(
      ...[["Name", w.name], ["Id", w.id], ["Repository", w.repo_path], ["Layers", layerCount(w.layers)], ["Used", mib(w.used_bytes)],
        ["Writer", w.writer]]
        .filter(([, v]) => v !== undefined && v !== null && v !== "")
        .flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]),
    );
  showInfo(w);
  const timeline = el("ol", { class: "timeline", "aria-label": "Checkpoints" });
  const from = el("select", { id: "f-diff-from" });
  const to = el("select", { id: "f-diff-to" });
  const diffBox = el("section", { id: "diff" });
  const result = el("p", { id: "ws-result", role: "status" });
  const act = async (what, f) => {
    result.textContent = "";
    try {
      result.textContent = await f();
    } catch (e) {
      result.textContent = `${what}: ${e.message}`;
    }
  };
  async function loadCheckpoints() {
    const v = await api(`${base}/checkpoints`);
    const opt = (value, label) => el("option", { value }, label);
    from.replaceChildren(opt("", "the repository"), ...v.checkpoints.map((c) => opt(c.id, c.name)));
    to.replaceChildren(opt("", "now"), ...v.checkpoints.map((c) => opt(c.id, c.name)));
    timeline.replaceChildren(
      ...v.checkpoints.map((c) => {
        const forkName = el("input", { type: "text", "aria-label": `Name of a fork of ${c.name}` });
        return el(
          "li",
          { "data-checkpoint": c.name },
          el("strong", {}, c.name),
          ` ${new Date(c.created_at).toISOString()}, ${mib(c.bytes)} `,
          el("button", {
            type: "button",
            onclick: () =>
              act("Restore", async () => {
                showInfo(await api(`${base}/restore`, { method: "POST", body: { checkpoint: c.id } }));
                return `Restored to ${c.name}`;
              }),
          }, `Restore ${c.name}`),
          " ",
          forkName,
          el("button", {
            type: "button",
            onclick: () =>
              act("Fork", async () => {
                const f = await api("/v1/workspaces", { method: "POST", body: { name: forkName.value.trim(), from_checkpoint: c.id } });
                location.hash = `#/workspaces/${encodeURIComponent(f.id)}`;
                return `Forked as ${f.name}`;
              }),
          }, `Fork ${c.name}`),
        );
      }),
    );
  }
  const checkpoint = oneFieldForm("f-checkpoint", "Checkpoint name", "Checkpoint", (name) => api(`${base}/checkpoints`, { method: "POST", body: { name } }),
    async () => {
      await loadCheckpoints();
    });
  const diffButton = el("button", { type: "button" }, "Show diff");
  diffButton.addEventListener("click", () =>
    act("Diff", async () => {
      const q = new URLSearchParams();
      if (from.value) q.set("from", from.value);
      if (to.value) q.set("to", to.value);
      const text = await (await api(`${base}/diff?${q}`, { raw: true })).text();
      diffBox.replaceChildren(text ? renderPatch(text) : el("p", { class: "muted" }, "No difference."));
      return "";
    }),
  );
  const apply = el("button", { type: "button" }, "Apply to a new branch");
  apply.addEventListener("click", () =>
    act("Apply", async () => {
      const v = await api(`${base}/apply`, { method: "POST" });
      return `Applied on branch ${v.branch} (commit ${v.commit})`;
    }),
  );
  main.replaceChildren(
    el("h1", {}, `Workspace ${w.name}`),
    info,
    el("div", { class: "toolbar" }, apply),
    result,
    el("h2", {}, "Checkpoints"),
    timeline,
    checkpoint,
    el("h2", {}, "Diff"),
    el("div", { class: "toolbar" }, el("label", { for: from.id }, "From"), from, el("label", { for: to.id }, "To"), to, diffButton),
    diffBox,
  );
  await loadCheckpoints();
}

// ---- admin ----

async function keysPage() {
  const list = el("tbody");
  const shown = el("section", { id: "new-key", "aria-live": "polite" });
  const err = el("p", { class: "error", role: "alert", id: "key-error" });
  async function load() {
    const keys = await api("/v1/keys");
    list.replaceChildren(
      ...keys.map((k) =>
        el(
          "tr",
          {},
          el("td", {}, k.id),
          el("td", {}, k.name),
          el("td", {}, (k.scopes || []).join(", ")),
          el("td", {}, k.revoked_at ? `revoked ${age(k.revoked_at)} ago` : "active"),
          el(
            "td",
            {},
            k.revoked_at
              ? ""
              : el("button", {
                  type: "button",
                  "aria-label": `Revoke ${k.name}`,
                  onclick: async () => {
                    if (!confirm(`Revoke the key ${k.name}? Clients using it stop working at once.`)) return;
                    try {
                      await api(`/v1/keys/${encodeURIComponent(k.id)}`, { method: "DELETE" });
                      await load();
                    } catch (e) {
                      err.textContent = e.message;
                    }
                  },
                }, "Revoke"),
          ),
        ),
      ),
    );
  }
  const name = el("input", { type: "text", id: "f-key-name", required: true });
  const scope = el("select", { id: "f-key-scope" }, ...["read", "run", "admin"].map((s) => el("option", { value: s, selected: s === "run" }, s)));
  const form = el(
    "form",
    {
      onsubmit: async (ev) => {
        ev.preventDefault();
        err.textContent = "";
        try {
          const k = await api("/v1/keys", { method: "POST", body: { name: name.value.trim(), scopes: [scope.value] } });
          const secret = el("code", { id: "secret" }, k.key);
          const copy = el("button", { type: "button", id: "copy" }, "Copy");
          copy.addEventListener("click", async () => {
            try {
              await navigator.clipboard.writeText(k.key);
              copy.textContent = "Copied";
            } catch {
              copy.textContent = "Select the key and copy it";
            }
          });
          shown.replaceChildren(el("p", {}, `The key ${k.name}, shown this once:`), el("p", {}, secret, " ", copy));
          name.value = "";
          await load();
        } catch (e) {
          err.textContent = errorText(e);
        }
      },
    },
    el("h2", {}, "New key"),
    el("label", { for: name.id }, "Name"),
    name,
    el("label", { for: scope.id }, "Scope"),
    scope,
    " ",
    el("button", { type: "submit" }, "Create"),
    err,
  );
  main.replaceChildren(
    el("h1", {}, "Keys"),
    el("table", { "aria-label": "Keys" }, el("thead", {}, el("tr", {}, el("th", {}, "Id"), el("th", {}, "Name"), el("th", {}, "Scopes"), el("th", {}, "State"), el("th", {}, ""))), list),
    form,
    shown,
  );
  await load();
}

async function auditPage(params) {
  const inputs = {};
  const fields = [["job", "Job"], ["key_id", "Key id"], ["action", "Action"]];
  const form = el(
    "form",
    {
      class: "toolbar",
      onsubmit: (ev) => {
        ev.preventDefault();
        const q = new URLSearchParams();
        for (const [n] of fields) if (inputs[n].value.trim()) q.set(n, inputs[n].value.trim());
        location.hash = `#/audit?${q}`;
      },
    },
    ...fields.flatMap(([n, label]) => {
      inputs[n] = el("input", { type: "text", id: `f-audit-${n}`, value: params.get(n) || "" });
      return [el("label", { for: `f-audit-${n}` }, label), inputs[n]];
    }),
    el("button", { type: "submit" }, "Filter"),
  );
  const body = el("tbody");
  const more = el("button", { type: "button", hidden: true }, "More");
  let cursor = null;
  const load = async (append) => {
    const q = new URLSearchParams({ limit: "100" });
    for (const [n] of fields) if (params.get(n)) q.set(n, params.get(n));
    if (append && cursor) q.set("cursor", cursor);
    const v = await api(`/v1/audit?${q}`);
    const rows = v.events.map((e) =>
      el("tr", {}, el("td", {}, new Date(e.ts).toISOString()), el("td", {}, e.key_id || ""), el("td", {}, e.action), el("td", {}, e.target || ""),
        el("td", {}, e.outcome), el("td", {}, e.detail || "")),
    );
    if (append) body.append(...rows);
    else body.replaceChildren(...rows);
    cursor = v.next_cursor;
    more.hidden = !cursor;
  };
  more.addEventListener("click", () => load(true).catch(showError));
  main.replaceChildren(
    el("h1", {}, "Audit"),
    form,
    el("table", { "aria-label": "Audit" }, el("thead", {}, el("tr", {}, ...["When", "Key", "Action", "Target", "Outcome", "Detail"].map((h) => el("th", {}, h)))), body),
    more,
  );
  await load(false);
}

/** Show the admin pages' links to admin keys only. */
let isAdmin = false;

async function probeAdmin() {
  try {
    await api("/v1/keys");
    isAdmin = true;
  } catch {
    isAdmin = false;
  }
  for (const a of document.querySelectorAll("nav .admin")) a.hidden = !isAdmin;
}

function showError(e) {
  if (e && e.status === 401) return;
  say(e && e.message ? e.message : String(e));
}

// ---- routing ----

async function route() {
  for (const f of leave) f();
  leave = [];
  say("");
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query || "");
  if (!key() || path === "/signin") return signInPage();
  if (nav.hidden) await probeAdmin();
  nav.hidden = false;
  const m = path.match(/^\/jobs\/([^/]+)$/);
  let w;
  try {
    if (m) await jobPage(decodeURIComponent(m[1]));
    else if (path === "/new") newJobPage();
    else if (path === "/keys") await keysPage();
    else if (path === "/overview") await overviewPage();
    else if (path === "/sessions") await sessionsPage();
    else if ((w = path.match(/^\/sessions\/([^/]+)$/))) await sessionPage(decodeURIComponent(w[1]));
    else if (path === "/workspaces") await workspacesPage();
    else if ((w = path.match(/^\/workspaces\/([^/]+)$/))) await workspacePage(decodeURIComponent(w[1]));
    else if (path === "/audit") await auditPage(params);
    else jobsPage(params);
  } catch (e) {
    showError(e);
  }
  main.focus({ preventScroll: true });
}

document.getElementById("signout").addEventListener("click", () => signOut("Signed out."));
window.addEventListener("hashchange", route);
route();
