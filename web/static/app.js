// sspry web: the page. Plain JavaScript over the REST API (/openapi.json); no build, nothing from a CDN.
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 50;
const LINE_HEIGHT = 20; // px, as --lh in style.css
const AUTO_CHECK_BYTES = 256 * 1024; // longer rule texts are checked on request only
const SHOWN_MATCHES = 6; // matched strings shown per candidate (the rest in a tooltip and the exports)
const state = { token: localStorage.getItem("sspry-token") || "", job: null, rule: null, offset: 0, timer: null };

// --- the API -----------------------------------------------------------------------------------------
async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers.Authorization = "Bearer " + state.token;
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    $("auth").hidden = false;
    throw new ApiError("this web server needs a token: enter it above", 401);
  }
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = { error: text }; }
  if (!response.ok) throw new ApiError((body && body.error) || response.statusText, response.status, body);
  return body;
}

class ApiError extends Error {
  constructor(message, status, body) { super(message); this.status = status; this.body = body || {}; }
}

function banner(message) {
  $("banner").textContent = message || "";
  $("banner").hidden = !message;
}

// Downloads go through fetch when a token is needed (a link cannot send the header).
async function download(path, name) {
  if (!state.token) { window.location.href = path; return; }
  try {
    const response = await fetch(path, { headers: { Authorization: "Bearer " + state.token } });
    if (!response.ok) throw new Error((await response.json()).error);
    const url = URL.createObjectURL(await response.blob());
    const a = document.createElement("a");
    a.href = url; a.download = name; document.body.appendChild(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (e) { banner("download failed: " + e.message); }
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const fmt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");
function duration(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return Math.round(ms) + " ms";
  if (ms < 60000) return (ms / 1000).toFixed(1) + " s";
  return Math.floor(ms / 60000) + " min " + Math.round((ms % 60000) / 1000) + " s";
}

// A job's completion, 0..1: rules written of the rules, or the library's current stage.
function fraction(job) {
  if (job.status === "done") return 1;
  const p = job.progress;
  if (p && p.stages) {
    const open = p.stages.filter((s) => !s.closed && s.total);
    if (open.length) { const s = open[open.length - 1]; return Math.min(1, s.done / s.total); }
  }
  if (job.rule_total) return Math.min(1, job.rules_done / job.rule_total);
  return 0;
}
function stageText(job) {
  const p = job.progress;
  if (job.status === "queued") return "queued";
  if (p && p.stage) {
    const s = p.stages.filter((x) => !x.closed).pop();
    return s && s.total ? `${s.stage} ${fmt(s.done)}/${fmt(s.total)} ${s.unit}` : p.stage;
  }
  if (job.rule_total) return `${fmt(job.rules_done)}/${fmt(job.rule_total)} rules`;
  return job.status === "running" ? "compiling the rules" : job.status;
}
function bar(job, big) {
  const waiting = job.status === "running" && fraction(job) === 0; // compiling: no measure yet
  const cls = "progress" + (big ? " big" : "") + (waiting ? " waiting" : "") +
    (job.status === "done" ? " done" : job.status === "failed" ? " failed" : "");
  return el("div", { class: cls, title: stageText(job) }, el("div", { style: `width:${(fraction(job) * 100).toFixed(1)}%` }));
}

// --- the rule editor ---------------------------------------------------------------------------------
const editor = { findings: new Map(), error: null, checkTimer: null, lines: 0 };

// The gutter is one text of line numbers plus a marker per line with a finding, both moved with the
// text's scroll: a bundle of 150,000 lines costs one string, not 150,000 elements.
function renderGutter() {
  const lines = $("rule").value.split("\n").length;
  if (lines !== editor.lines) {
    editor.lines = lines;
    $("numbers").textContent = Array.from({ length: lines }, (_, i) => i + 1).join("\n");
  }
  const marks = [], notes = [];
  const lineTop = (n) => `top:${(n - 1) * LINE_HEIGHT}px`;
  const marked = new Set([...editor.findings.keys()].filter((n) => n > 0));
  if (editor.error) marked.add(editor.error.line);
  for (const n of marked) {
    const found = editor.findings.get(n) || [];
    const isError = editor.error && editor.error.line === n;
    const title = isError ? editor.error.message : found.map((f) => `${f.code}: ${f.message}`).join("\n");
    const text = isError ? editor.error.message : found.map((f) => `${f.code}: ${f.text || f.message}`).join("; ");
    marks.push(el("div", { class: "mark " + (isError ? "has-error" : "has-note"), "data-line": n, style: lineTop(n), title }, n));
    notes.push(el("div", { class: "finding " + (isError ? "error" : "note"), "data-line": n, style: lineTop(n), title }, text));
  }
  $("gutter-inner").replaceChildren($("numbers"), ...marks);
  $("findings-inner").replaceChildren(...notes);
  syncScroll();
}
function syncScroll() {
  const shift = `translateY(${-$("rule").scrollTop}px)`;
  $("gutter-inner").style.transform = shift;
  $("findings-inner").style.transform = shift;
}
function goToLine(line) {
  const area = $("rule");
  const lines = area.value.split("\n");
  const start = lines.slice(0, line - 1).reduce((sum, l) => sum + l.length + 1, 0);
  area.focus();
  area.setSelectionRange(start, start + (lines[line - 1] || "").length);
  area.scrollTop = Math.max(0, (line - 4) * LINE_HEIGHT);
  syncScroll();
}

async function checkRule() {
  const text = $("rule").value;
  editor.findings = new Map(); editor.error = null;
  const status = $("rule-status"), list = $("findings");
  list.textContent = ""; status.className = "rule-status";
  if (!text.trim()) { status.textContent = ""; renderGutter(); return true; }
  try {
    const externals = parseExternals($("externals").value);
    const report = await api("/api/rule-check", { method: "POST", body: JSON.stringify({ rule: text, externals }) });
    const counts = {};
    for (const rule of report.rules) {
      counts[rule.status] = (counts[rule.status] || 0) + 1;
      for (const note of rule.notes) {
        const line = note.line || 0;
        if (!editor.findings.has(line)) editor.findings.set(line, []);
        editor.findings.get(line).push(note);
        list.append(el("li", { onclick: () => note.line && goToLine(note.line) },
          el("span", { class: "muted" }, `line ${note.line ?? "?"}: `), el("span", { class: "code" }, note.code),
          ` ${rule.rule}: ${note.text || note.message}`, el("span", { class: "muted" }, ` (${note.hint})`)));
      }
    }
    status.textContent = `${report.rules.length} rule(s): ` + Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(", ");
    renderGutter();
    return true;
  } catch (e) {
    status.className = "rule-status error";
    status.textContent = e.message;
    if (e.body && e.body.line) editor.error = { line: e.body.line, message: e.message };
    renderGutter();
    return e.status !== 400;
  }
}

// "name=value, name=value" as -d takes them: true/false, integers, decimals, else text ("quoted" or not).
function parseExternals(text) {
  const out = {};
  for (const part of text.split(",").map((p) => p.trim()).filter(Boolean)) {
    const at = part.indexOf("=");
    const name = (at < 0 ? part : part.slice(0, at)).trim(), value = at < 0 ? "" : part.slice(at + 1).trim();
    if (value === "true" || value === "false") out[name] = value === "true";
    else if (/^-?\d+$/.test(value)) out[name] = parseInt(value, 10);
    else if (/^-?\d*\.\d+$/.test(value)) out[name] = parseFloat(value);
    else out[name] = value.replace(/^"(.*)"$/, "$1");
  }
  return out;
}

// The editor's text survives a reload, when it fits the browser's local storage (a bundle may not).
function remember(text) {
  try { localStorage.setItem("sspry-rule", text); } catch (e) { localStorage.removeItem("sspry-rule"); }
}

async function submitRule() {
  const body = { rule: $("rule").value, verify: $("verify").checked, engine: $("engine").value };
  const limit = parseInt($("limit").value, 10);
  if (limit > 0) body.limit = limit;
  body.externals = parseExternals($("externals").value);
  $("submit").disabled = true;
  try {
    const created = await api("/api/searches", { method: "POST", body: JSON.stringify(body) });
    location.hash = "#/search/" + created.id;
    remember(body.rule);
  } catch (e) {
    const status = $("rule-status");
    status.className = "rule-status error";
    status.textContent = e.message;
    if (e.body && e.body.line) { editor.error = { line: e.body.line, message: e.message }; renderGutter(); }
  } finally {
    $("submit").disabled = false;
  }
}

// --- recent jobs -------------------------------------------------------------------------------------
async function loadJobs() {
  const list = await api("/api/searches?limit=30");
  const body = $("jobs");
  body.textContent = "";
  for (const job of list.searches) {
    body.append(el("tr", { class: "clickable", "data-id": job.id, onclick: () => (location.hash = "#/search/" + job.id) },
      el("td", {}, el("span", { class: "status " + job.status }, job.status)),
      el("td", {}, job.title),
      el("td", {}, bar(job), el("div", { class: "muted" }, stageText(job))),
      el("td", { class: "num" }, fmt(job.candidate_total)),
      el("td", { class: "num" }, fmt(job.verified_total)),
      el("td", { class: "num" }, duration(job.elapsed_ms)),
      el("td", { class: "muted" }, when(job.created))));
  }
  if (!list.searches.length) body.append(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "No searches yet.")));
  return list.searches.some((j) => j.status === "queued" || j.status === "running");
}

// --- one job -----------------------------------------------------------------------------------------
async function loadJob() {
  const id = state.job;
  const onlyHits = $("only-hits").checked;
  const query = new URLSearchParams({ rules_limit: 500, only_hits: onlyHits });
  if ($("rule-filter").value.trim()) query.set("rule_name", $("rule-filter").value.trim());
  const job = await api(`/api/searches/${id}?${query}`);
  if (state.job !== id) return false;
  $("job-title").textContent = job.title;
  const status = $("job-status");
  status.className = "status " + job.status; status.textContent = job.status;
  $("cancel").hidden = !(job.status === "queued" || job.status === "running");
  state.pending = job.options.verify && !$("cancel").hidden; // candidates shown before their verdicts
  $("purge").hidden = !$("cancel").hidden;
  const old = document.querySelector("#job .progress.big");
  old.replaceWith(bar(job, true));
  const facts = [
    ["stage", stageText(job)],
    ["rules", `${fmt(job.rules_done)} / ${fmt(job.rule_total)}`],
    ["documents", fmt(job.documents)],
    ["candidates", fmt(job.candidate_total)],
    ["verified", job.options.verify ? fmt(job.verified_total) : "not asked"],
    ["first results", duration(job.first_result_ms)],
    ["elapsed", duration(job.elapsed_ms)],
    ["submitted", when(job.created)],
  ];
  $("job-facts").replaceChildren(...facts.map(([k, v]) => el("span", {}, k + ": ", el("b", {}, v))));
  $("job-error").hidden = !job.error;
  $("job-error").textContent = job.error || "";

  const rules = $("rules");
  rules.textContent = "";
  for (const r of job.rules) {
    const row = el("tr", { class: "clickable" + (state.rule === r.rule ? " selected" : ""),
      onclick: () => { state.rule = state.rule === r.rule ? null : r.rule; state.offset = 0; loadJob(); loadCandidates(); } },
      el("td", { class: "mono" }, r.rule),
      el("td", { class: "num" }, fmt(r.candidate_count) + (r.truncated ? " (cut)" : "")),
      el("td", { class: "num" }, fmt(r.listed)),
      el("td", { class: "num" }, fmt(r.verified_count)),
      el("td", { class: "muted" }, r.notes.join(", ")));
    rules.append(row);
  }
  if (!job.rules.length) rules.append(el("tr", {}, el("td", { colspan: 5, class: "muted" }, job.status === "done" ? "No rule has candidates." : "Waiting for results…")));
  $("rules-more").textContent = job.rules_matching > job.rules.length ? `showing ${job.rules.length} of ${fmt(job.rules_matching)} rules` : "";
  return job.status === "queued" || job.status === "running";
}

function verdict(c) {
  if (c.skipped) return el("span", { class: "verdict skip", title: c.skip_detail || "" }, "skipped: " + c.skipped);
  if (c.verified === null) return el("span", { class: "muted" }, state.pending ? "verifying…" : "not verified");
  return el("span", { class: "verdict " + (c.verified ? "yes" : "no") }, c.verified ? "match" : "no match");
}

async function loadCandidates() {
  const id = state.job;
  const params = new URLSearchParams({ offset: state.offset, limit: PAGE });
  if (state.rule) params.set("rule", state.rule);
  if ($("verified-only").checked) params.set("verified", "true");
  $("cand-rule").textContent = state.rule ? `of ${state.rule}` : "of every rule";
  let page;
  try { page = await api(`/api/searches/${id}/candidates?${params}`); } catch (e) {
    if (e.status === 404 && state.rule) { state.rule = null; return loadCandidates(); } throw e;
  }
  if (state.job !== id) return;
  const body = $("candidates");
  body.textContent = "";
  for (const c of page.candidates) {
    const paths = c.paths.map((p) => el("div", {}, p));
    if (c.path_count > c.paths.length) paths.push(el("div", { class: "muted" }, `+${c.path_count - c.paths.length} more`));
    const all = c.matches || [];
    const matches = all.slice(0, SHOWN_MATCHES).map((m) => el("code", { title: `offset ${m.offset}` }, `${m.identifier}@${m.offset}: ${m.data}`));
    if (all.length > SHOWN_MATCHES) {
      matches.push(el("span", { class: "muted", title: all.slice(SHOWN_MATCHES).map((m) => `${m.identifier}@${m.offset}: ${m.data}`).join("\n") },
        ` +${all.length - SHOWN_MATCHES} more` + (c.matches_truncated ? " (and more not kept)" : "")));
    }
    const idCell = el("td", { class: "sid" }, c.source_id);
    if (state.allowDownload) {
      idCell.append(el("div", {}, el("a", { class: "dl", href: `/api/files/${c.source_id}`,
        onclick: (ev) => { ev.preventDefault(); download(`/api/files/${c.source_id}`, c.source_id); } }, "download")));
    }
    body.append(el("tr", {}, el("td", { class: "mono" }, c.rule), idCell, el("td", { class: "paths" }, paths),
      el("td", { class: "verdict-cell" }, verdict(c)), el("td", { class: "matches" }, matches)));
  }
  if (!page.candidates.length) body.append(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "No candidates.")));
  const last = Math.min(page.total, state.offset + page.candidates.length);
  $("page-info").textContent = page.total ? `${fmt(state.offset + 1)}–${fmt(last)} of ${fmt(page.total)}` : "";
  $("prev").disabled = state.offset === 0;
  $("next").disabled = last >= page.total;
}

function exportPath(format) {
  const params = new URLSearchParams({ format });
  if (state.rule) params.set("rule", state.rule);
  if ($("verified-only").checked) params.set("verified", "true");
  return `/api/searches/${state.job}/export?${params}`;
}

// --- routing and polling -----------------------------------------------------------------------------
async function refresh() {
  clearTimeout(state.timer);
  let active = false;
  try {
    if (state.job) {
      active = await loadJob();
      await loadCandidates();
    } else {
      active = await loadJobs();
    }
    banner("");
  } catch (e) {
    banner(e.message);
  }
  state.timer = setTimeout(refresh, active ? 700 : 4000);
}

function route() {
  const match = location.hash.match(/^#\/search\/([0-9a-f]+)/);
  const id = match ? match[1] : null;
  if (id !== state.job) { state.rule = null; state.offset = 0; $("rule-filter").value = ""; }
  state.job = id;
  $("home").hidden = !!id;
  $("job").hidden = !id;
  refresh();
}

async function loadInfo() {
  try {
    const info = await api("/api/info");
    state.allowDownload = info.allow_download;
    $("target").textContent = `${info.mode === "root" ? "forest" : "servers"} ${info.target} · ${fmt(info.documents)} documents`;
    $("verify").disabled = !info.store_path;
    if (!info.store_path) $("verify").parentElement.title = "this index stores no paths: nothing to verify";
  } catch (e) { banner(e.message); }
}

function init() {
  $("token").value = state.token;
  $("save-token").addEventListener("click", () => {
    state.token = $("token").value.trim();
    localStorage.setItem("sspry-token", state.token);
    $("auth").hidden = !!state.token;
    loadInfo(); refresh();
  });
  const area = $("rule");
  area.value = localStorage.getItem("sspry-rule") || "";
  area.addEventListener("scroll", syncScroll);
  area.addEventListener("input", () => {
    renderGutter();
    clearTimeout(editor.checkTimer);
    if (area.value.length < AUTO_CHECK_BYTES) editor.checkTimer = setTimeout(checkRule, 900);
  });
  area.addEventListener("keydown", (ev) => {
    if (ev.key === "Tab") {
      ev.preventDefault();
      area.setRangeText("    ", area.selectionStart, area.selectionEnd, "end");
      renderGutter();
    } else if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault(); submitRule();
    }
  });
  $("check").addEventListener("click", checkRule);
  $("submit").addEventListener("click", submitRule);
  $("cancel").addEventListener("click", async () => {
    try { await api(`/api/searches/${state.job}`, { method: "DELETE" }); } catch (e) { banner(e.message); }
    refresh();
  });
  $("purge").addEventListener("click", async () => {
    if (!confirm("Delete this search and its results?")) return;
    try {
      await api(`/api/searches/${state.job}?purge=true`, { method: "DELETE" });
      location.hash = "#/";
    } catch (e) { banner(e.message); }
  });
  $("edit").addEventListener("click", async () => {
    try {
      const job = await api(`/api/searches/${state.job}?rules_limit=0&include_rule=true`);
      area.value = job.rule; renderGutter(); checkRule();
    } catch (e) { banner(e.message); }
    location.hash = "#/";
  });
  $("only-hits").addEventListener("change", refresh);
  let filterTimer = null;
  $("rule-filter").addEventListener("input", () => { clearTimeout(filterTimer); filterTimer = setTimeout(refresh, 300); });
  $("verified-only").addEventListener("change", () => { state.offset = 0; refresh(); });
  $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); loadCandidates(); });
  $("next").addEventListener("click", () => { state.offset += PAGE; loadCandidates(); });
  $("export-csv").addEventListener("click", () => download(exportPath("csv"), `sspry-${state.job}.csv`));
  $("export-json").addEventListener("click", () => download(exportPath("json"), `sspry-${state.job}.json`));
  window.addEventListener("hashchange", route);
  renderGutter();
  loadInfo();
  route();
  if (area.value.trim()) checkRule();
}

init();
