// lorafleet playground. Plain browser JavaScript: no build step, no library, nothing fetched from
// another origin. Every string the server sends is written with textContent (never innerHTML):
// the API key lives in sessionStorage, where an injected script could read it.
"use strict";

const KEY_STORAGE = "lorafleet.apiKey";
const HISTORY = 300;            // dashboard samples kept (5 min at the default 1 s)
const WINDOW_S = 60;            // the shortest time axis the charts draw
const state = { models: [], baseModel: null, adapters: null, canManage: false,
                running: [], history: [], pollTimer: null, lastStats: null };

// ---- small helpers -------------------------------------------------------------------------

const $ = (selector) => document.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function formatBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

function formatAgo(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  const ago = Math.max(0, Date.now() / 1000 - seconds);
  if (ago < 60) return `${Math.round(ago)} s ago`;
  if (ago < 3600) return `${Math.round(ago / 60)} min ago`;
  return `${(ago / 3600).toFixed(1)} h ago`;
}

function formatNumber(value) {
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en-US");
  return value.toLocaleString("en-US", { maximumFractionDigits: 3 });
}

// ---- the key and the API -------------------------------------------------------------------

function apiKey() { return sessionStorage.getItem(KEY_STORAGE) || ""; }

class ApiError extends Error {
  constructor(status, message, code) { super(message); this.status = status; this.code = code; }
}

function headers(json) {
  const h = {};
  const key = apiKey();
  if (key) h["Authorization"] = `Bearer ${key}`;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

// The API's error shape is {"error": {message, type, param, code}}: show its message and code.
async function errorFrom(response) {
  let message = `${response.status} ${response.statusText}`, code = null;
  try {
    const body = await response.json();
    if (body && body.error) { message = body.error.message || message; code = body.error.code; }
  } catch (_) { /* not JSON: keep the status line */ }
  return new ApiError(response.status, message, code);
}

async function api(path, { method = "GET", body, signal } = {}) {
  const response = await fetch(path, {
    method, signal, credentials: "omit", headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body) });
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

function showError(error, where) {
  if (error && error.name === "AbortError") return;
  const text = error instanceof ApiError
    ? `${where}: ${error.status}${error.code ? " " + error.code : ""}: ${error.message}`
    : `${where}: ${error && error.message ? error.message : error}`;
  const box = $("#errors");
  const close = el("button", { type: "button", "aria-label": "Dismiss error", text: "×" });
  const item = el("div", { class: "error" }, el("p", { text }), close);
  close.addEventListener("click", () => item.remove());
  box.append(item);
  while (box.children.length > 5) box.firstElementChild.remove();
}

function clearErrors() { $("#errors").replaceChildren(); }

// ---- tabs (WAI-ARIA tabs pattern: arrows move between tabs, Home/End jump) ------------------

function selectTab(tab, focus = false) {
  for (const other of document.querySelectorAll("[role=tab]")) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(`#${other.getAttribute("aria-controls")}`).hidden = !selected;
  }
  if (focus) tab.focus();
  const view = tab.getAttribute("aria-controls");
  history.replaceState(null, "", `#${view.replace("view-", "")}`);
  if (view === "view-adapters") refreshAdapters();
  if (view === "view-dashboard") drawCharts();
}

function setupTabs() {
  const tabs = [...document.querySelectorAll("[role=tab]")];
  for (const tab of tabs) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (event) => {
      const i = tabs.indexOf(tab);
      const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[event.key];
      if (next === undefined) return;
      event.preventDefault();
      selectTab(tabs[(next + tabs.length) % tabs.length], true);
    });
  }
  const wanted = $(`#tab-${location.hash.slice(1)}`);
  if (wanted) selectTab(wanted);
}

// ---- models (GET /v1/models) ---------------------------------------------------------------

async function refreshModels() {
  try {
    const list = await api("/v1/models");
    state.models = list.data.map((m) => m.id);
    state.baseModel = (list.data.find((m) => !m.parent) || list.data[0] || {}).id || null;
    $("#served-model").textContent = state.baseModel ? `· ${state.baseModel}` : "";
    $("#key-state").textContent = `${state.models.length - 1} adapter(s) visible`;
  } catch (error) {
    state.models = [];
    $("#key-state").textContent = "";
    showError(error, "GET /v1/models");
  }
  renderModelChoices();
}

function renderModelChoices() {
  const box = $("#model-choices");
  const checked = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
  const first = checked.size === 0;
  box.replaceChildren();
  state.models.forEach((id, i) => {
    const input = el("input", { type: "checkbox", value: id, name: "model" });
    // By default: the base and the first two adapters, side by side.
    input.checked = first ? i < 3 : checked.has(id);
    const label = el("label", { class: "choice" }, input,
                     ` ${id}${id === state.baseModel ? " (base)" : ""}`);
    box.append(label);
  });
  if (!state.models.length) {
    box.append(el("span", { class: "muted", text: "No models: enter an API key." }));
  }
}

// ---- compare: one prompt to several models, streamed side by side ---------------------------

function requestBody(model) {
  const number = (id) => { const v = $(id).value; return v === "" ? undefined : Number(v); };
  const body = { model, stream: true, stream_options: { include_usage: true },
                 temperature: number("#temperature"), top_p: number("#top-p"),
                 top_k: number("#top-k"), max_tokens: number("#max-tokens"), seed: number("#seed") };
  const chat = document.querySelector("input[name=mode]:checked").value === "chat";
  if (chat) {
    const messages = [];
    if ($("#system").value.trim()) messages.push({ role: "system", content: $("#system").value });
    messages.push({ role: "user", content: $("#prompt").value });
    body.messages = messages;
  } else {
    body.prompt = $("#prompt").value;
  }
  return { path: chat ? "/v1/chat/completions" : "/v1/completions", body };
}

function makeColumn(model) {
  const metric = (name, label) => el("div", {}, el("dt", { text: label }),
                                     el("dd", { "data-metric": name, text: "–" }));
  const column = el("article", { class: "column", "data-model": model, "aria-busy": "true" },
    el("h3", { text: model === state.baseModel ? `${model} (base)` : model }),
    el("pre", { class: "output", tabindex: "0", "aria-label": `output of ${model}` }),
    el("div", { class: "col-error", role: "status" }),
    el("dl", { class: "metrics" }, metric("tokens", "tokens"), metric("ttft", "first token"),
       metric("rate", "tok/s"), metric("finish", "finish")));
  return column;
}

// Parses an SSE body (`data: {...}` events, `data: [DONE]` last) and calls onEvent per JSON event.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      onEvent(JSON.parse(data));
    }
  }
}

async function runColumn(column, model, controller) {
  const set = (name, text) => { column.querySelector(`[data-metric=${name}]`).textContent = text; };
  const output = column.querySelector(".output");
  const { path, body } = requestBody(model);
  const start = performance.now();
  let first = null, last = null, chunks = 0, usage = null, finish = null;
  try {
    const response = await fetch(path, { method: "POST", headers: headers(true), credentials: "omit",
                                         body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) throw await errorFrom(response);
    await readEvents(response, (event) => {
      // An error after the stream started arrives as an event (the HTTP status was 200).
      if (event.error) throw new ApiError("in stream", event.error.message, event.error.code);
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        // completions: choice.text; chat: choice.delta.content
        const text = choice.text ?? (choice.delta && choice.delta.content) ?? "";
        if (text) {
          const now = performance.now();
          if (first === null) { first = now; set("ttft", `${(now - start).toFixed(0)} ms`); }
          last = now;
          chunks++;
          output.textContent += text;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      const tokens = usage ? usage.completion_tokens : chunks;
      set("tokens", String(tokens));
      // Decode rate: tokens after the first over the time since the first.
      if (first !== null && last > first && tokens > 1) {
        set("rate", ((tokens - 1) / ((last - first) / 1000)).toFixed(1));
      }
    });
    set("finish", finish || "–");
    column.dataset.state = "done";
  } catch (error) {
    column.dataset.state = error.name === "AbortError" ? "stopped" : "error";
    if (error.name === "AbortError") {
      set("finish", "stopped");
    } else {
      const code = error instanceof ApiError
        ? `${error.status}${error.code ? " " + error.code : ""}: ` : "";
      column.querySelector(".col-error").textContent = `${code}${error.message}`;
      showError(error, `${model}`);
    }
  } finally {
    column.setAttribute("aria-busy", "false");
  }
}

async function runCompare(event) {
  event.preventDefault();
  const models = [...document.querySelectorAll("#model-choices input:checked")].map((i) => i.value);
  if (!models.length) { showError(new Error("choose at least one model"), "Compare"); return; }
  clearErrors();
  const controller = new AbortController();
  state.running.push(controller);
  const columns = models.map(makeColumn);
  $("#columns").replaceChildren(...columns);
  $("#columns").dataset.state = "running";
  $("#run").disabled = true;
  $("#stop").disabled = false;
  // All at once: the engine batches them into the same steps.
  await Promise.all(models.map((model, i) => runColumn(columns[i], model, controller)));
  $("#columns").dataset.state = "done";
  $("#run").disabled = false;
  $("#stop").disabled = true;
  state.running = state.running.filter((c) => c !== controller);
}

function stopCompare() { for (const controller of state.running) controller.abort(); }

// ---- adapters ------------------------------------------------------------------------------

async function refreshAdapters() {
  try {
    const list = await api("/v1/adapters");
    state.adapters = list.data;
    state.canManage = list.can_manage;
    $("#load-form").hidden = !(list.can_manage && list.loading_enabled);
  } catch (error) {
    state.adapters = [];
    showError(error, "GET /v1/adapters");
  }
  renderAdapters();
}

function renderAdapters() {
  const filter = $("#adapter-filter").value.trim().toLowerCase();
  const rows = (state.adapters || []).filter((a) => a.id.toLowerCase().includes(filter));
  const tbody = $("#adapter-table tbody");
  tbody.replaceChildren(...rows.map((a) => {
    const inspect = el("button", { type: "button", "data-action": "inspect", text: "Inspect",
                                   "aria-label": `Inspect ${a.id}` });
    inspect.addEventListener("click", () => inspectAdapter(a.id));
    const actions = el("div", { class: "row-actions" }, inspect);
    if (state.canManage && a.registered) {
      const unload = el("button", { type: "button", class: "danger", "data-action": "unload",
                                    text: "Unload", "aria-label": `Unload ${a.id}` });
      unload.addEventListener("click", () => unloadAdapter(a.id, unload));
      actions.append(unload);
    }
    const tier = a.loading ? "loading" : a.tier;
    return el("tr", { "data-adapter": a.id },
      el("th", { scope: "row", text: a.id }),
      // data-label: the column's name, shown beside the value where rows become cards (phone).
      el("td", { "data-label": "Tier" }, el("span", { class: `tier tier-${tier}`,
         text: tier + (a.registered ? "" : " (not read yet)") })),
      el("td", { class: "num", "data-label": "Rank", text: a.rank === null ? "–" :
                 (a.ranks.length > 1 ? `${a.rank} (${a.ranks.join(", ")})` : String(a.rank)) }),
      el("td", { "data-label": "Targets", text: a.targets.length ? a.targets.join(", ") : "–" }),
      el("td", { class: "num", "data-label": "Size in pool", text: formatBytes(a.size_bytes) }),
      el("td", { class: "num", "data-label": "In use", text: String(a.in_use) }),
      el("td", { "data-label": "Last used", text: formatAgo(a.last_used) }),
      el("td", { "data-label": "Actions" }, actions));
  }));
  const total = (state.adapters || []).length;
  $("#adapter-count").textContent =
    filter ? `${rows.length} of ${total} adapters` : `${total} adapters`;
}

async function inspectAdapter(name) {
  try {
    const info = await api(`/v1/adapters/${encodeURIComponent(name)}`);
    const fields = $("#inspect-fields");
    fields.replaceChildren();
    for (const [key, value] of Object.entries(info)) {
      if (key === "object") continue;
      const shown = value === null ? "–"
        : typeof value === "object" ? JSON.stringify(value) : String(value);
      fields.append(el("dt", { text: key }), el("dd", { "data-field": key, text: shown }));
    }
    $("#inspect").hidden = false;
    $("#inspect-title").textContent = `Inspect: ${name}`;
    $("#inspect-title").focus();
  } catch (error) {
    showError(error, `GET /v1/adapters/${name}`);
  }
}

async function loadAdapter(event) {
  event.preventDefault();
  const button = $("#load-submit");
  button.disabled = true;
  try {
    await api("/v1/load_lora_adapter", { method: "POST",
      body: { lora_name: $("#load-name").value.trim(), lora_path: $("#load-path").value.trim() } });
    $("#load-name").value = "";
    $("#load-path").value = "";
    await Promise.all([refreshAdapters(), refreshModels()]);
  } catch (error) {
    showError(error, "POST /v1/load_lora_adapter");
  } finally {
    button.disabled = false;
  }
}

async function unloadAdapter(name, button) {
  button.disabled = true;
  try {
    await api("/v1/unload_lora_adapter", { method: "POST", body: { lora_name: name } });
    await Promise.all([refreshAdapters(), refreshModels()]);
  } catch (error) {
    button.disabled = false;
    showError(error, "POST /v1/unload_lora_adapter");
  }
}

// ---- live dashboard ------------------------------------------------------------------------

// Each chart: series computed from two consecutive samples (rates) or one (levels). A series
// whose stats key the engine does not report is left out, so the page follows the engine.
const CHARTS = [
  { id: "pages", title: "Pool pages", unit: "pages", series: [
    { label: "KV cache", color: "#0b5cad", value: (s) => s.engine.pages_kv },
    { label: "adapters", color: "#b35900", value: (s) => s.engine.pages_adapter } ] },
  { id: "requests", title: "Requests", unit: "requests", series: [
    { label: "running", color: "#1a7f37", value: (s) => s.engine.running },
    { label: "queued", color: "#cf222e", value: (s) => s.engine.queue_depth } ] },
  { id: "throughput", title: "Throughput", unit: "tokens/s", series: [
    { label: "generated tokens/s", color: "#6639ba",
      value: (s, p) => rate(s, p, "generated_tokens") } ] },
  { id: "hits", title: "Adapter cache hit rate", unit: "%", series: [
    { label: "pool hits (window)", color: "#1a7f37",
      value: (s, p) => hitRate(s, p, "cache_hits", "cache_misses") },
    { label: "host hits (window)", color: "#9a6700",
      value: (s, p) => hitRate(s, p, "host_cache_hits", "host_cache_misses") } ] },
  { id: "loads", title: "Adapter loads and evictions", unit: "per s", series: [
    { label: "loads", color: "#0b5cad", value: (s, p) => rate(s, p, "adapter_loads") },
    { label: "evictions", color: "#cf222e", value: (s, p) => rate(s, p, "cache_evictions") },
    { label: "prefetches", color: "#8c959f", value: (s, p) => rate(s, p, "cache_prefetches") } ] },
  // Only for a key with limits (keys file: max_concurrent, tokens_per_minute).
  { id: "quota", title: "This key's quota", unit: "% of limit", series: [
    { label: "sequences in flight", color: "#0b5cad",
      value: (s) => s.key && s.key.max_concurrent
        ? (100 * s.key.in_flight) / s.key.max_concurrent : undefined },
    { label: "tokens per minute used", color: "#b35900",
      value: (s) => s.key && s.key.tokens_per_minute
        ? 100 * (1 - s.key.tokens_available / s.key.tokens_per_minute) : undefined } ] },
];

function rate(sample, previous, key) {
  if (!previous || !(key in sample.engine) || !(key in previous.engine)) return undefined;
  const dt = sample.time - previous.time;
  return dt > 0 ? Math.max(0, sample.engine[key] - previous.engine[key]) / dt : undefined;
}

function hitRate(sample, previous, hitsKey, missesKey) {
  const e = sample.engine;
  if (!(hitsKey in e) || !(missesKey in e)) return undefined;
  const p = previous ? previous.engine : { [hitsKey]: 0, [missesKey]: 0 };
  const hits = e[hitsKey] - p[hitsKey], total = hits + e[missesKey] - p[missesKey];
  return total > 0 ? (100 * hits) / total : null;   // null: no lookups in this window (a gap)
}

function buildCharts() {
  $("#charts").replaceChildren(...CHARTS.map((chart) => el("figure",
    { class: "chart", id: `chart-${chart.id}` },
    el("figcaption", { id: `chart-${chart.id}-title`, text: `${chart.title} (${chart.unit})` }),
    // The canvas is named by its title and its legend (the latest values, as text).
    el("canvas", { role: "img",
                   "aria-labelledby": `chart-${chart.id}-title chart-${chart.id}-legend` }),
    el("ul", { class: "legend", id: `chart-${chart.id}-legend` }))));
}

function drawCharts() {
  if ($("#view-dashboard").hidden) return;
  const styles = getComputedStyle(document.documentElement);
  const ink = styles.getPropertyValue("--muted").trim() || "#59636e";
  const line = styles.getPropertyValue("--line").trim() || "#d0d7de";
  for (const chart of CHARTS) {
    const figure = $(`#chart-${chart.id}`);
    const series = chart.series.map((s) => ({ ...s, points: state.history.map((sample, i) =>
      s.value(sample, state.history[i - 1])) }))
      .filter((s) => s.points.some((v) => v !== undefined));
    figure.hidden = series.length === 0;
    if (!series.length) continue;
    drawChart(figure.querySelector("canvas"), series, ink, line);
    // The legend doubles as the chart's text alternative: the latest value of each series.
    figure.querySelector(".legend").replaceChildren(...series.map((s) => {
      const latest = [...s.points].reverse().find((v) => v !== undefined && v !== null);
      const swatch = el("span", { class: "swatch", "aria-hidden": "true" });
      swatch.style.background = s.color;
      return el("li", { "data-series": s.label }, swatch,
                `${s.label}: ${latest === undefined ? "–"
                                : formatNumber(Math.round(latest * 10) / 10)}`);
    }));
  }
}

function drawChart(canvas, series, ink, gridColor) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (!width || !height) return;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  ctx.clearRect(0, 0, width, height);
  const values = series.flatMap((s) => s.points).filter((v) => typeof v === "number");
  const top = niceMax(Math.max(1, ...values));
  const left = 44, bottom = height - 16, right = width - 6, plotTop = 6;
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = ink;
  ctx.strokeStyle = gridColor;
  ctx.lineWidth = 1;
  for (const fraction of [0, 0.5, 1]) {
    const y = bottom - fraction * (bottom - plotTop);
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(right, y); ctx.stroke();
    ctx.fillText(formatNumber(top * fraction), 2, y + 4);
  }
  // Time runs left to right, the newest sample at the right edge, over at least a minute.
  const newest = state.history.length ? state.history.at(-1).time : 0;
  const span = Math.max(WINDOW_S, newest - (state.history.length ? state.history[0].time : 0));
  ctx.fillText(`last ${Math.round(span)} s`, left, height - 3);
  const x = (i) => right - ((newest - state.history[i].time) / span) * (right - left);
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    let drawing = false;
    s.points.forEach((v, i) => {
      if (typeof v !== "number") { drawing = false; return; }
      const y = bottom - (v / top) * (bottom - plotTop);
      if (drawing) ctx.lineTo(x(i), y); else ctx.moveTo(x(i), y);
      drawing = true;
    });
    ctx.stroke();
  }
}

function niceMax(value) {
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

function renderStatsTable(sample) {
  const rows = [["time", new Date(sample.time * 1000).toISOString()]];
  for (const [key, value] of Object.entries(sample.server)) rows.push([`server.${key}`, value]);
  for (const [key, value] of Object.entries(sample.key || {})) {
    const shown = value !== null ? value : key === "key_id" ? "– (no keys file)" : "no limit";
    rows.push([`key.${key}`, shown]);
  }
  for (const [key, value] of Object.entries(sample.engine)) rows.push([key, value]);
  $("#stats-table tbody").replaceChildren(...rows.map(([key, value]) =>
    el("tr", { "data-key": key }, el("th", { scope: "row", text: key }),
       el("td", { class: "num", text: formatNumber(value) }))));
  const e = sample.engine;
  const parts = [`${e.running ?? "?"} running`, `${e.queue_depth ?? "?"} queued`];
  if ("pages_total" in e) parts.push(`${e.pages_total - e.pages_free} / ${e.pages_total} pages used`);
  $("#dash-summary").textContent = parts.join(" · ");
}

async function poll() {
  clearTimeout(state.pollTimer);
  const interval = Number($("#poll-interval").value);
  if (apiKey() || state.models.length) {
    try {
      const sample = await api("/v1/stats");
      state.history.push(sample);
      if (state.history.length > HISTORY) state.history.shift();
      state.lastStats = sample;
      renderStatsTable(sample);
      drawCharts();
    } catch (error) {
      if (!$("#view-dashboard").hidden) showError(error, "GET /v1/stats");
    }
  }
  if (interval > 0) state.pollTimer = setTimeout(poll, interval);
}

// ---- start ---------------------------------------------------------------------------------

function useKey(event) {
  event.preventDefault();
  const key = $("#api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key); else sessionStorage.removeItem(KEY_STORAGE);
  $("#api-key").value = "";
  $("#api-key").placeholder = key ? "key set (kept for this tab)" : "sk-...";
  clearErrors();
  refreshAll();
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  $("#api-key").placeholder = "sk-...";
  state.models = [];
  state.adapters = [];
  state.history = [];
  renderModelChoices();
  renderAdapters();
  $("#key-state").textContent = "key forgotten";
}

async function refreshAll() {
  await refreshModels();
  if (!$("#view-adapters").hidden) refreshAdapters();
  state.history = [];
  poll();
}

function start() {
  setupTabs();
  buildCharts();
  $("#key-form").addEventListener("submit", useKey);
  $("#key-forget").addEventListener("click", forgetKey);
  $("#compare-form").addEventListener("submit", runCompare);
  $("#stop").addEventListener("click", stopCompare);
  $("#adapters-refresh").addEventListener("click", refreshAdapters);
  $("#adapter-filter").addEventListener("input", renderAdapters);
  $("#load-form").addEventListener("submit", loadAdapter);
  $("#poll-interval").addEventListener("change", poll);
  for (const radio of document.querySelectorAll("input[name=mode]")) {
    radio.addEventListener("change", () => {
      const chat = radio.value === "chat" && radio.checked;
      for (const node of document.querySelectorAll(".chat-only")) node.hidden = !chat;
    });
  }
  window.addEventListener("resize", drawCharts);
  if (apiKey()) $("#api-key").placeholder = "key set (kept for this tab)";
  // With no key the server may be open (no keys file): try, and ask for a key on 401.
  refreshAll();
}

document.addEventListener("DOMContentLoaded", start);
