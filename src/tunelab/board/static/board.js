// tunelab board: one page over the /api endpoints of board/app.py. No framework, no build step:
// the curves are inline SVG drawn below.
"use strict";

const params = new URLSearchParams(location.search);
if (params.get("token")) sessionStorage.setItem("tunelab-token", params.get("token"));
const TOKEN = sessionStorage.getItem("tunelab-token") || "";
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

const state = { runs: [], picked: new Set(), view: "curves", curves: [], chat: [] };
const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

async function api(path, body) {
  const headers = { "Authorization": "Bearer " + TOKEN };
  const init = body === undefined ? { headers } :
    { method: "POST", headers: { ...headers, "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(data.error || data.detail || response.statusText);
  return data;
}

function fmt(v) {
  if (v === null || v === undefined) return "-";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toPrecision(4);
  return typeof v === "object" ? JSON.stringify(v) : String(v);
}

function colorOf(name) {
  const i = state.runs.findIndex((r) => r.id === name);
  return COLORS[(i < 0 ? 0 : i) % COLORS.length];
}

// --- runs list ---------------------------------------------------------------------------

async function refreshRuns() {
  try {
    const data = await api("/api/runs");
    state.runs = data.runs;
    $("#runs-dir").textContent = data.runs_dir;
    $("#status-line").textContent = "";
    drawRuns(data);
    fillChatRuns();
  } catch (e) { $("#status-line").textContent = "runs: " + e.message; }
}

function drawRuns(data) {
  const body = $("#runs tbody");
  body.replaceChildren();
  const sweepOf = (r) => r.sweep || "";
  const order = [...state.runs].sort((a, b) => sweepOf(a).localeCompare(sweepOf(b)));
  let sweep = null;
  for (const run of order) {
    if (run.sweep && run.sweep !== sweep) {
      body.append(el("tr", { class: "sweep" }, el("td", { colspan: 5 }, "sweep " + run.sweep)));
    }
    sweep = run.sweep;
    const box = el("input", { type: "checkbox", class: "pick", onchange: (ev) => pick(run.id, ev.target.checked) });
    box.checked = state.picked.has(run.id);
    const step = run.step === null ? "-" : fmt(run.step) + (run.max_steps ? "/" + run.max_steps : "");
    const row = el("tr", { class: "run", "data-run": run.id },
      el("td", {}, box), el("td", { title: run.path }, run.sweep ? run.id.split("/").pop() : run.id),
      el("td", {}, el("span", { class: "status " + run.status, title: run.final.error || "" }, run.status)),
      el("td", { class: "num" }, step), el("td", { class: "num" }, fmt(run.final.eval_loss)));
    body.append(row);
  }
  if (!state.runs.length) body.append(el("tr", {}, el("td", { colspan: 5 }, "no runs yet under this folder")));
}

function pick(id, on) {
  if (on) state.picked.add(id); else state.picked.delete(id);
  showView(state.view);
}

// --- curves (inline SVG) -------------------------------------------------------------------

async function refreshCurves() {
  const names = [...state.picked];
  if (!names.length) { state.curves = []; drawCurves(); return; }
  try {
    const data = await api("/api/curves?" + names.map((n) => "run=" + encodeURIComponent(n)).join("&"));
    state.curves = data.runs;
    fillMetricChoices();
    drawCurves();
  } catch (e) { $("#status-line").textContent = "curves: " + e.message; }
}

function fillMetricChoices() {
  const select = $("#curve-metric");
  const have = new Set([...select.options].map((o) => o.value));
  for (const run of state.curves) for (const row of run.eval) for (const key of Object.keys(row)) {
    if (key.startsWith("eval_") && key !== "eval_loss" && !have.has(key)) {
      select.append(el("option", { value: key }, key)); have.add(key);
    }
  }
}

function seriesFor(metric) {
  const out = [];
  for (const run of state.curves) {
    const color = colorOf(run.run);
    if (metric === "loss") {
      out.push({ run: run.run, color, dashed: false, points: run.train.filter((r) => isFinite(r.loss)).map((r) => [r.step, r.loss]) });
      out.push({ run: run.run, color, dashed: true, points: run.eval.filter((r) => isFinite(r.eval_loss)).map((r) => [r.step, r.eval_loss]) });
    } else {
      out.push({ run: run.run, color, dashed: false, points: run.eval.filter((r) => isFinite(r[metric])).map((r) => [r.step, r[metric]]) });
    }
  }
  return out.filter((s) => s.points.length);
}

function ticks(lo, hi, n) {
  const step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n || 1)));
  const nice = [1, 2, 5, 10].map((m) => m * step).find((s) => (hi - lo) / s <= n) || step * 10;
  const out = [];
  for (let v = Math.ceil(lo / nice) * nice; v <= hi + 1e-12; v += nice) out.push(+v.toPrecision(12));
  return out;
}

function drawCurves() {
  const svg = $("#curves");
  const NS = "http://www.w3.org/2000/svg";
  const node = (tag, attrs, text) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    return n;
  };
  svg.replaceChildren();
  const metric = $("#curve-metric").value;
  const series = seriesFor(metric);
  const W = +svg.getAttribute("width"), H = +svg.getAttribute("height"), L = 60, R = 20, T = 20, B = 40;
  if (!series.length) {
    svg.append(node("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, state.picked.size ? "no points logged yet" : "tick runs to plot them"));
    $("#legend").replaceChildren();
    return;
  }
  const xs = series.flatMap((s) => s.points.map((p) => p[0])), ys = series.flatMap((s) => s.points.map((p) => p[1]));
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const X = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), Y = (y) => T + (y1 - y) / (y1 - y0) * (H - T - B);
  for (const t of ticks(x0, x1, 8)) {
    svg.append(node("line", { x1: X(t), x2: X(t), y1: T, y2: H - B, stroke: "#eee" }));
    svg.append(node("text", { x: X(t), y: H - B + 14, "text-anchor": "middle" }, String(t)));
  }
  for (const t of ticks(y0, y1, 6)) {
    svg.append(node("line", { x1: L, x2: W - R, y1: Y(t), y2: Y(t), stroke: "#eee" }));
    svg.append(node("text", { x: L - 6, y: Y(t) + 4, "text-anchor": "end" }, String(t)));
  }
  svg.append(node("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "none", stroke: "#999" }));
  svg.append(node("text", { x: (W + L) / 2, y: H - 6, "text-anchor": "middle" }, "step"));
  svg.append(node("text", { x: 14, y: (H - B + T) / 2, transform: `rotate(-90 14 ${(H - B + T) / 2})`, "text-anchor": "middle" }, metric));
  for (const s of series) {
    const d = s.points.map((p, i) => (i ? "L" : "M") + X(p[0]).toFixed(1) + " " + Y(p[1]).toFixed(1)).join(" ");
    svg.append(node("path", { d, fill: "none", stroke: s.color, "stroke-width": 2, class: "curve", "data-run": s.run,
      "stroke-dasharray": s.dashed ? "6 4" : "none" }));
    if (s.dashed || metric !== "loss") for (const p of s.points) svg.append(node("circle", { cx: X(p[0]), cy: Y(p[1]), r: 3, fill: s.color }));
  }
  $("#legend").replaceChildren(...state.curves.map((r) => el("span", {}, el("i", { style: "background:" + colorOf(r.run) }),
    r.run + " (" + r.status + (r.step !== null ? ", step " + fmt(r.step) + (r.max_steps ? "/" + r.max_steps : "") : "") + ")")));
}

// --- compare -------------------------------------------------------------------------------

async function refreshCompare() {
  const out = $("#compare-out");
  const names = [...state.picked];
  if (names.length < 1) { out.replaceChildren(el("p", { class: "hint" }, "Tick two or more runs.")); return; }
  try {
    const metric = $("#compare-metric").value.trim() || "eval_loss";
    const data = await api("/api/compare?metric=" + encodeURIComponent(metric) + "&" + names.map((n) => "run=" + encodeURIComponent(n)).join("&"));
    const keys = [...new Set(names.flatMap((n) => Object.keys(data.metrics[n].final)))].filter((k) => k !== "error").sort();
    const bests = names.map((n) => data.metrics[n].best[0]).filter((v) => v !== null);
    const winner = bests.length ? (data.lower_is_better ? Math.min(...bests) : Math.max(...bests)) : null;
    const metrics = el("table", { id: "metrics-table" }, el("tr", {}, el("th", {}, "metric"), ...names.map((n) => el("th", {}, n))),
      el("tr", {}, el("td", {}, `best ${data.metric} (step)`), ...names.map((n) => {
        const [v, step] = data.metrics[n].best;
        return el("td", { class: "num" + (v !== null && v === winner ? " best" : "") }, v === null ? "-" : fmt(v) + " (" + fmt(step) + ")");
      })),
      ...keys.map((k) => el("tr", {}, el("td", {}, "last " + k), ...names.map((n) => el("td", { class: "num" }, fmt(data.metrics[n].final[k]))))));
    const diffKeys = Object.keys(data.config_diff);
    const diff = diffKeys.length ? el("table", { id: "config-diff" }, el("tr", {}, el("th", {}, "key"), ...names.map((n) => el("th", {}, n))),
      ...diffKeys.map((k) => el("tr", {}, el("td", {}, k), ...names.map((n) => el("td", {}, fmt(data.config_diff[k][n]))))))
      : el("p", { id: "config-diff" }, "The configs are the same (output_dir aside).");
    const findings = el("div", {}, ...names.map((n) => el("div", {}, el("h4", {}, n),
      el("ul", {}, ...(data.findings[n] || []).map((f) => el("li", { class: "finding " + f.severity }, `[${f.severity}] ${f.title}: ${f.detail}`))))));
    out.replaceChildren(el("h3", {}, "Metrics"), metrics, el("h3", {}, "Config differences"), diff, el("h3", {}, "Curve diagnosis"), findings);
  } catch (e) { out.replaceChildren(el("pre", { class: "error" }, e.message)); }
}

// --- examples ------------------------------------------------------------------------------

async function refreshExamples() {
  const out = $("#examples-out");
  const names = [...state.picked];
  if (!names.length) return;
  try {
    const found = await Promise.all(names.map((n) => api("/api/examples?run=" + encodeURIComponent(n))));
    const withRows = found.filter((f) => f.rows.length);
    if (!withRows.length) { out.replaceChildren(el("p", { class: "hint" }, "None of the ticked runs has predictions yet (run tunelab eval --adapter RUN, or train with eval_task).")); return; }
    // One row per prompt of the first run; one prediction column per run that answered it.
    const answers = withRows.map((f) => new Map(f.rows.map((r) => [r.prompt, r])));
    const table = el("table", { id: "examples-table" }, el("tr", {}, el("th", {}, "prompt (end)"), el("th", {}, "reference"),
      ...withRows.map((f) => el("th", {}, f.run + " (" + f.where + ")"))));
    for (const row of withRows[0].rows) {
      table.append(el("tr", {}, el("td", { class: "text" }, String(row.prompt || "").slice(-300)), el("td", { class: "text" }, row.reference || ""),
        ...answers.map((m) => el("td", { class: "text" }, m.has(row.prompt) ? m.get(row.prompt).prediction : "-"))));
    }
    out.replaceChildren(table);
  } catch (e) { out.replaceChildren(el("pre", { class: "error" }, e.message)); }
}

// --- chat ----------------------------------------------------------------------------------

function fillChatRuns() {
  const select = $("#chat-run");
  const current = select.value;
  const finished = state.runs.filter((r) => r.status === "finished");
  select.replaceChildren(...finished.map((r) => el("option", { value: r.id }, r.id)));
  if (finished.some((r) => r.id === current)) select.value = current;
}

function drawChat() {
  $("#chat-log").replaceChildren(...state.chat.map((m) => el("div", { class: "msg " + m.role }, el("b", {}, m.role + ": "), m.content)));
}

async function sendChat() {
  const text = $("#chat-input").value.trim();
  if (!text) return;
  state.chat.push({ role: "user", content: text });
  $("#chat-input").value = "";
  drawChat();
  $("#chat-busy").textContent = "answering (the first message loads the model)...";
  try {
    const data = await api("/api/chat", { run: $("#chat-run").value, messages: state.chat, max_new_tokens: +$("#chat-tokens").value });
    state.chat.push({ role: "assistant", content: data.reply });
    $("#chat-busy").textContent = `${data.seconds} s`;
  } catch (e) {
    state.chat.pop();
    $("#chat-busy").textContent = "";
    $("#chat-log").append(el("pre", { class: "error" }, e.message));
    return;
  }
  drawChat();
}

// --- launch, preview, estimate -------------------------------------------------------------

async function form(path, extra = {}) {
  $("#form-error").classList.add("hidden");
  $("#form-result").replaceChildren(el("p", { class: "hint" }, "working..."));
  try {
    return await api(path, { text: $("#config-text").value, ...extra });
  } catch (e) {
    $("#form-error").textContent = e.message;
    $("#form-error").classList.remove("hidden");
    $("#form-result").replaceChildren();
    return null;
  }
}

async function loadConfig() {
  const name = [...state.picked][0];
  if (!name) return;
  const data = await api("/api/config?run=" + encodeURIComponent(name));
  $("#config-text").value = data.text;
}

async function checkConfig() {
  const data = await form("/api/check");
  if (data) $("#form-result").replaceChildren(el("p", { id: "check-ok" }, `valid: ${data.stage} ${data.finetuning_type} of ${data.model} into ${data.output_dir}`));
}

async function previewSample() {
  const data = await form("/api/preview", { index: +$("#preview-index").value });
  if (!data) return;
  const pre = el("pre", { class: "sample", id: "sample" }, ...data.pieces.map((p) => p.trained ? el("mark", {}, p.text) : p.text));
  $("#form-result").replaceChildren(el("p", {}, `sample ${data.index} of ${data.records} (${data.source}): ${data.tokens} tokens, ` +
    `${data.trained_tokens} trained on (highlighted)`), pre);
}

async function estimateConfig() {
  const data = await form("/api/estimate");
  if (data) $("#form-result").replaceChildren(el("p", { id: "estimate-total" }, `estimated peak GPU memory ${data.gib} GiB; time: ${data.time}`),
    ...data.notes.map((n) => el("p", { class: "hint" }, n)), el("pre", { class: "estimate" }, data.text));
}

async function launch() {
  const data = await form("/api/launch");
  if (data) {
    $("#form-result").replaceChildren(el("p", { id: "launched" }, `training into ${data.run_dir} (pid ${data.pid}); log ${data.log}`));
    setTimeout(refreshRuns, 1500);
  }
}

// --- views and polling ---------------------------------------------------------------------

function showView(view) {
  state.view = view;
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.view === view);
  for (const v of document.querySelectorAll(".view")) v.classList.toggle("hidden", v.id !== "view-" + view);
  if (view === "curves") refreshCurves();
  if (view === "compare") refreshCompare();
  if (view === "examples") refreshExamples();
}

function init() {
  for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => showView(b.dataset.view));
  $("#curve-metric").addEventListener("change", drawCurves);
  $("#compare-metric").addEventListener("change", refreshCompare);
  $("#chat-send").addEventListener("click", sendChat);
  $("#chat-reset").addEventListener("click", () => { state.chat = []; drawChat(); });
  $("#chat-input").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); sendChat(); } });
  $("#btn-load").addEventListener("click", loadConfig);
  $("#btn-check").addEventListener("click", checkConfig);
  $("#btn-preview").addEventListener("click", previewSample);
  $("#btn-estimate").addEventListener("click", estimateConfig);
  $("#btn-launch").addEventListener("click", launch);
  refreshRuns();
  // Live: the list every 5 s; the curves every 3 s while a ticked run is training.
  setInterval(refreshRuns, 5000);
  setInterval(() => {
    const live = state.runs.some((r) => state.picked.has(r.id) && r.status === "running");
    if (live && state.view === "curves") refreshCurves();
  }, 3000);
}

init();
