// EigenCAM explorer: vanilla JS, no build step. Every text from MLflow goes through
// textContent (never innerHTML), so captions and labels cannot inject markup.
"use strict";

const CELL = 128; // CSS px of one overlay panel
const POLL_MS = 3000;
const PARAMS = ["runs", "mode", "ds_id", "epoch", "component", "filter", "label", "pred", "sort", "since",
                "epochs", "group", "signal", "min", "max"];

// epochs: the fan-out's chosen epochs; group: the run parameter the runs are grouped by;
// signal, min, max: the signal filter (views.js).
const S = { runs: [], mode: "", ds_id: "", epoch: null, component: 1, filter: "", label: "",
            pred: "", sort: "", since: null, epochs: [], group: "", signal: "", min: "", max: "" };
let CONFIG = { tracking_uri: "", mlflow_ui: null, max_runs: 64 };
let META = {};        // requested id -> run summary from /api/runs
let DATA = null;      // last /api/data answer
let RUNS = [];        // indexed runs of DATA
let EPOCHS = [];      // union of logged epochs
let dataText = "";
let pollTimer = null, playTimer = null;
let lastResults = [];
let configReady = null; // the /api/config answer, asked for beside the first /api/data
let searched = false;
let renders = 0;       // render() calls: a read-ahead of an older view stops

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "style") Object.assign(e.style, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(e.dataset, v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    e.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return e;
}

function message(text, kind) {
  $("messages").append(el("div", { class: kind || "error" }, text));
}

async function getJSON(url) {
  const r = await fetch(url, { headers: { Accept: "application/json" } });
  let body = null;
  try { body = await r.json(); } catch (e) { /* not JSON */ }
  if (!r.ok) throw new Error((body && body.error) || `${r.status} ${r.statusText} for ${url}`);
  return body;
}

function qs(obj) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(obj)) if (v !== null && v !== undefined && v !== "") p.set(k, v);
  return p.toString();
}

// ------------------------------------------------------------------------- URL state
function readURL() {
  const p = new URLSearchParams(location.search);
  S.runs = (p.get("runs") || "").split(",").map((s) => s.trim()).filter(Boolean);
  S.mode = p.get("mode") || "";
  S.ds_id = p.get("ds_id") || "";
  S.epoch = p.has("epoch") && p.get("epoch") !== "" ? parseInt(p.get("epoch"), 10) : null;
  S.component = parseInt(p.get("component") || "1", 10) || 1;
  S.filter = p.get("filter") || "";
  S.label = p.get("label") || "";
  S.pred = p.get("pred") || "";
  S.sort = p.get("sort") || "";
  S.since = p.has("since") && p.get("since") !== "" ? parseInt(p.get("since"), 10) : null;
  S.epochs = parseEpochs(p.get("epochs")).slice(0, MAX_FAN);
  S.group = p.get("group") || "";
  S.signal = p.get("signal") || "";
  S.min = p.get("min") || "";
  S.max = p.get("max") || "";
}

function writeURL() {
  const st = Object.assign({}, S, { runs: S.runs.join(","), component: S.component === 1 ? "" : S.component,
    epochs: (DATA ? fanEpochs() : S.epochs).join(","), min: S.signal ? S.min : "", max: S.signal ? S.max : "" });
  const q = [qs(Object.fromEntries(PARAMS.map((k) => [k, st[k]]))), Overlay.query()].filter(Boolean).join("&");
  const url = location.pathname + (q ? "?" + q.replace(/%2C/g, ",").replace(/%3A/g, ":") : "");
  if (url !== location.pathname + location.search) history.replaceState(null, "", url);
}

// ------------------------------------------------------------------------- runs
let searches = 0; // search() calls: an older search's answer never replaces a newer one's

async function search() {
  const q = $("search").value;
  const mine = ++searches;
  let body;
  try { body = await getJSON("api/search?" + qs({ q })); }
  catch (e) { if (mine === searches) message(`search failed: ${e.message}`); return; }
  if (mine !== searches) return; // e.g. the page's first (empty) search answering late
  lastResults = body.runs;
  const t = $("results");
  t.replaceChildren(el("tr", {}, el("th", {}, ""), el("th", {}, "experiment"), el("th", {}, "run"),
                       el("th", {}, "status"), el("th", {}, "started"), el("th", {}, "run id")));
  if (!body.runs.length) t.append(el("tr", {}, el("td", { colspan: 6 }, "No run with EigenCAM data matches.")));
  for (const r of body.runs) {
    const box = el("input", { type: "checkbox", class: "pick", dataset: { run: r.run_id },
      onchange: (ev) => toggleRun(r.run_id, ev.target.checked) });
    box.checked = S.runs.includes(r.run_id);
    t.append(el("tr", {}, el("td", {}, box), el("td", {}, r.experiment), el("td", {}, r.run_name || "-"),
      el("td", { class: "status-" + r.status }, r.status),
      el("td", {}, r.start_time ? new Date(r.start_time).toLocaleString() : "-"),
      el("td", {}, el("code", {}, r.run_id))));
  }
}

function toggleRun(id, on) {
  const had = S.runs.includes(id);
  if (!on && had) S.runs = S.runs.filter((r) => r !== id);
  load(on && !had ? addRuns([id]) : null);
}

// Adds runs to the view up to the most one view shows (the server's max_runs); returns a
// note naming how many were left out, or null.
function addRuns(ids) {
  const fresh = ids.filter((id) => !S.runs.includes(id));
  const room = Math.max(0, CONFIG.max_runs - S.runs.length);
  S.runs.push(...fresh.slice(0, room));
  const left = fresh.length - Math.min(room, fresh.length);
  return left ? `${left} run(s) not added: the explorer shows at most ${CONFIG.max_runs} runs at once` : null;
}

function renderChips() {
  const c = $("selected");
  c.replaceChildren();
  for (const id of S.runs) {
    const m = META[id];
    const name = m ? `${m.run_name || id.slice(0, 8)} · ${m.experiment}` : id;
    c.append(el("span", { class: "chip", dataset: { run: id } }, name,
      el("button", { type: "button", title: "remove", onclick: () => toggleRun(id, false) }, "×")));
  }
  $("picked-count").textContent = S.runs.length ? `(${S.runs.length} selected)` : "(none selected: search and tick runs)";
  for (const box of document.querySelectorAll("#results input.pick")) box.checked = S.runs.includes(box.dataset.run);
}

// ------------------------------------------------------------------------- data
async function load(note) {
  $("messages").replaceChildren();
  if (note) message(note, "note kept"); // stays until the selection changes again
  writeURL();
  renderChips();
  if (!S.runs.length) {
    $("controls").hidden = true;
    $("charts").hidden = true;
    $("grid").replaceChildren();
    DATA = null;
    return;
  }
  await fetchData(true);
}

function chooseModeDs() {
  const pairs = [];
  for (const id of S.runs) for (const a of (META[id] && META[id].available) || [])
    if (!pairs.some((p) => p.mode === a.mode && p.ds_id === a.ds_id)) pairs.push(a);
  if (!pairs.some((p) => p.mode === S.mode)) {
    const best = pairs.find((p) => p.mode === "eval") || pairs[0];
    if (best) S.mode = best.mode;
  }
  const dss = pairs.filter((p) => p.mode === S.mode).map((p) => p.ds_id);
  if (!dss.includes(S.ds_id)) S.ds_id = dss[0] || S.ds_id;
  fillSelect($("mode"), [...new Set(pairs.map((p) => p.mode))], S.mode);
  fillSelect($("ds"), dss.length ? dss : [S.ds_id], S.ds_id, (d) => (d === "all" ? "(no ds_id)" : d));
}

function fillSelect(sel, values, current, label) {
  sel.replaceChildren(...values.map((v) => {
    const o = el("option", { value: v }, label ? label(v) : v);
    if (String(v) === String(current)) o.selected = true;
    return o;
  }));
}

async function fetchData(first) {
  if (!S.runs.length) return;
  let body, text;
  try {
    const url = "api/data?" + qs({ runs: S.runs.join(","), mode: S.mode, ds_id: S.ds_id,
                                   epoch: first ? S.epoch : null });
    const early = window.EARLY_DATA; // asked for by index.html while this code loaded
    window.EARLY_DATA = null;
    const r = await (early && early.url === url ? early.answer : fetch(url));
    text = await r.text();
    body = JSON.parse(text);
    if (!r.ok) throw new Error(body.error || r.statusText);
  } catch (e) { message(`cannot read the tables: ${e.message}`); return; }
  if (configReady) await configReady; // run links need the MLflow UI's address
  if (!first && text === dataText) { schedulePoll(); return; }
  const wasLast = EPOCHS.length && S.epoch === EPOCHS[EPOCHS.length - 1];
  dataText = text;
  DATA = body;
  S.mode = body.mode;
  S.ds_id = body.ds_id;
  for (const r of body.runs) {
    if (r.summary) META[r.requested] = Object.assign({}, r.summary, { available: r.available });
  }
  index();
  if (!first && wasLast && EPOCHS.length) S.epoch = EPOCHS[EPOCHS.length - 1]; // follow a live run
  if (first) {
    for (const n of [...$("messages").children]) if (!n.classList.contains("kept")) n.remove();
    for (const r of RUNS) if (r.error) message(`Run ${r.requested}: ${r.error}`);
    if (!RUNS.some((r) => !r.error)) message("None of these runs has EigenCAM data to show here.", "note");
    renderChips();
    chooseModeDs();
  }
  render();
  loadMetrics(text); // the label-free signals' metrics, after the first paint
  schedulePoll();
}

function schedulePoll() {
  clearTimeout(pollTimer);
  const live = RUNS.some((r) => r.status === "RUNNING" || r.status === "SCHEDULED");
  $("live").textContent = live ? "live: a run is still logging; new epochs appear here" : "";
  if (live) pollTimer = setTimeout(() => fetchData(false), POLL_MS);
}

function index() {
  RUNS = DATA.runs.map((r) => {
    const meta = META[r.requested] || {};
    indexSignals(r);
    const bySid = new Map(); const order = [];
    for (const row of r.rows || []) {
      if (!bySid.has(row.sample_id)) { bySid.set(row.sample_id, new Map()); order.push(row.sample_id); }
      const m = bySid.get(row.sample_id);
      if (!m.has(row.epoch)) m.set(row.epoch, row); // a repeated image: the first stands
    }
    return Object.assign({}, r, { meta, bySid, order });
  });
  EPOCHS = [...new Set(RUNS.flatMap((r) => r.epochs || []))].sort((a, b) => a - b);
  if (EPOCHS.length && (S.epoch === null || !EPOCHS.includes(S.epoch))) {
    // An epoch from a link that is not logged: the nearest one below it, else the last.
    const below = S.epoch === null ? [] : EPOCHS.filter((e) => e <= S.epoch);
    S.epoch = below.length ? below[below.length - 1] : EPOCHS[EPOCHS.length - 1];
  }
}

// ------------------------------------------------------------------------- the table
function sinceEpoch() {
  if (S.since !== null && EPOCHS.includes(S.since) && S.since !== S.epoch) return S.since;
  const i = EPOCHS.indexOf(S.epoch);
  return i > 0 ? EPOCHS[i - 1] : null;
}

function columns() {
  const ok = orderedRuns(); // grouped by a parameter when asked
  const fan = fanEpochs(); // chosen epochs side by side, for every run
  if (fan.length) return ok.flatMap((r) => fan.map((e) => ({ run: r, epoch: e })));
  if (ok.length === 1) return ok[0].epochs.map((e) => ({ run: ok[0], epoch: e }));
  return ok.map((r) => ({ run: r, epoch: null })); // epoch null: the slider's
}

function sampleRows() {
  const seen = new Set(); const out = [];
  for (const r of RUNS) for (const sid of r.order) if (!seen.has(sid)) { seen.add(sid); out.push(sid); }
  return out;
}

function firstRow(sid) {
  for (const r of RUNS) {
    const m = r.bySid.get(sid);
    if (m) { const e = Math.min(...m.keys()); return { run: r, row: m.get(e) }; }
  }
  return null;
}

// Cells a filter and a sort look at: each run's row at the slider's epoch.
function considered(sid) {
  return RUNS.filter((r) => !r.error).map((r) => ({ run: r, row: (r.bySid.get(sid) || new Map()).get(S.epoch) }))
    .filter((c) => c.row);
}

function cellPasses(run, sid, row) {
  if (!row) return false;
  if (S.pred && row.prediction !== S.pred) return false;
  if (!signalPasses(row)) return false;
  const f = S.filter;
  if (f === "correct") return row.correct === true;
  if (f === "wrong") return row.correct === false;
  if (f === "changed" || f === "became_right" || f === "became_wrong") {
    const since = sinceEpoch();
    const before = since === null ? null : (run.bySid.get(sid) || new Map()).get(since);
    if (!before || before.correct === null || row.correct === null) return false;
    if (f === "changed") return before.correct !== row.correct;
    if (f === "became_right") return !before.correct && row.correct;
    return before.correct && !row.correct;
  }
  return true;
}

function rowPasses(sid) {
  if (S.label) { const f = firstRow(sid); if (!f || f.row.label !== S.label) return false; }
  if (!S.filter && !S.pred && !S.signal) return true;
  return considered(sid).some((c) => cellPasses(c.run, sid, c.row));
}

function sortKey(sid) {
  return signalSortKey(considered(sid)); // evr, or a signal, most or least first
}

function render() {
  $("controls").hidden = false;
  const nEvr = Math.max(1, ...RUNS.map((r) => r.n_evr || 0));
  if (S.component > nEvr) S.component = 1;
  fillSelect($("component"), Array.from({ length: nEvr }, (_, i) => i + 1), S.component, (c) => `PC${c}`);
  const slider = $("epoch");
  slider.max = Math.max(0, EPOCHS.length - 1);
  slider.value = Math.max(0, EPOCHS.indexOf(S.epoch));
  slider.disabled = EPOCHS.length < 2;
  $("epoch-label").textContent = EPOCHS.length ? `epoch ${S.epoch}` : "no epochs";
  $("epoch-label").dataset.epoch = S.epoch === null ? "" : S.epoch;
  if (document.activeElement !== $("epoch-jump")) $("epoch-jump").value = S.epoch === null ? "" : S.epoch;
  $("filter").value = S.filter;
  renderViews(); // the sorts, the signal filter, the fan-out, the groups
  fillSelect($("since"), EPOCHS.filter((e) => e !== S.epoch), sinceEpoch());
  $("since-wrap").hidden = !["changed", "became_right", "became_wrong"].includes(S.filter);
  const labels = new Set(), preds = new Set();
  for (const r of RUNS) for (const m of r.bySid.values()) for (const row of m.values()) {
    if (row.label !== null) labels.add(row.label);
    if (row.prediction !== null) preds.add(row.prediction);
  }
  fillSelect($("label"), ["", ...[...labels].sort()], S.label, (v) => v || "any");
  fillSelect($("pred"), ["", ...[...preds].sort()], S.pred, (v) => v || "any");

  let sids = sampleRows();
  const total = sids.length;
  sids = sids.filter(rowPasses);
  if (S.sort) {
    const keys = new Map(sids.map((s) => [s, sortKey(s)]));
    sids = sids.map((s, i) => [s, i]).sort((a, b) => (keys.get(b[0]) - keys.get(a[0])) || (a[1] - b[1])).map((x) => x[0]);
  }
  $("count").textContent = `${sids.length} of ${total} samples`;
  $("count").dataset.shown = sids.length;
  SHOWN = sids;
  renderCharts();
  renderGrid(sids);
  exportLinks(sids);
  writeURL();
  readAhead(++renders);
}

// Once the rows on screen have their images, fetch the same rows' previews at the
// neighbouring epochs (into the browser's cache, immutable), so that a slider step is drawn
// from the cache. Only with several runs (one run shows its epochs side by side already).
function readAhead(gen) {
  if (!EPOCHS.length || columns().some((c) => c.epoch !== null)) return;
  const onScreen = () => [...document.querySelectorAll("#grid tbody tr.sample")].filter((tr) => {
    const r = tr.getBoundingClientRect();
    return r.bottom > 0 && r.top < innerHeight;
  });
  const loaded = onScreen().flatMap((tr) => [...tr.querySelectorAll("img")]).map((img) =>
    img.complete ? null : new Promise((ok) => { img.addEventListener("load", ok); img.addEventListener("error", ok); }));
  const later = (fn) => (window.requestIdleCallback ? requestIdleCallback(fn, { timeout: 1000 }) : setTimeout(fn, 100));
  Promise.race([Promise.all(loaded), new Promise((ok) => setTimeout(ok, 5000))]).then(() => later(() => {
    if (gen !== renders) return; // the view changed meanwhile: its own read-ahead follows
    const i = EPOCHS.indexOf(S.epoch);
    const near = [EPOCHS[i - 1], EPOCHS[i + 1]].filter((e) => e !== undefined);
    for (const tr of onScreen()) for (const epoch of near) for (const run of RUNS) {
      if (run.error) continue;
      const row = (run.bySid.get(tr.dataset.sid) || new Map()).get(epoch);
      if (!row || S.component > row.k) continue;
      const url = imageURL(run, row, "preview");
      if (AHEAD.has(url)) continue;
      const im = new Image();
      im.decoding = "async";
      AHEAD.set(url, im);
      im.src = url;
    }
    while (AHEAD.size > 2000) AHEAD.delete(AHEAD.keys().next().value);
  }));
}
const AHEAD = new Map(); // url -> Image read ahead (kept so that its decoded copy is reused)

// The top rows' images are fetched as soon as they are made, first (a lazy image waits for
// a layout, and its request for the others'). The lower rows' images get their src only once
// the top rows' have loaded (or after 3 s): Chromium fetches lazy images far below the fold
// (~60 requests for one row on screen), and on a small machine those requests took the CPU
// the top row's previews needed, in the explorer and in the tracking server alike.
const EAGER_ROWS = 2;
let EAGER = false; // panel(): the row being drawn is one of them
let DEFERRED = null; // renderGrid(): the lower rows' images, waiting for their src

function releaseDeferred(body, deferred) {
  const top = [...body.querySelectorAll("img[src]")].filter((img) => !img.complete).map((img) =>
    new Promise((ok) => { img.addEventListener("load", ok); img.addEventListener("error", ok); }));
  Promise.race([Promise.all(top), new Promise((ok) => setTimeout(ok, 3000))]).then(() => {
    for (const img of deferred) if (img.isConnected && !img.getAttribute("src")) img.src = img.dataset.src;
  });
}

function renderGrid(sids) {
  const cols = columns();
  const grid = $("grid");
  const head = el("tr", {}, el("th", { class: "in" }, "input"));
  for (const c of cols) head.append(columnHead(c));
  const body = el("tbody");
  const deferred = DEFERRED = [];
  for (const [i, sid] of sids.entries()) {
    EAGER = i < EAGER_ROWS;
    const tr = el("tr", { class: "sample", dataset: { sid } });
    const first = firstRow(sid);
    const label = first ? first.row.label : null;
    tr.append(el("th", { class: "in", dataset: { label: label === null ? "" : label } },
      first ? panel(first.run, first.row, 0) : el("div", { class: "empty", style: { width: CELL + "px", height: CELL + "px" } }, "no input"),
      el("div", { class: "cap" }, `true: ${label === null ? "-" : label}`, el("br"),
        el("span", { class: "muted" }, "id ", el("code", {}, sid)), el("br"),
        el("button", { type: "button", class: "unzoom", hidden: !ZOOM.has(sid),
          title: "show the whole panels of this row again", onclick: () => setZoom(sid, null) }, "reset zoom"))));
    for (const c of cols) tr.append(cell(c, sid));
    body.append(tr);
  }
  if (!sids.length) body.append(el("tr", {}, el("td", { colspan: cols.length + 1 },
    sampleRows().length ? "No sample matches these filters." : "These runs logged no samples here.")));
  EAGER = false;
  DEFERRED = null;
  grid.replaceChildren(el("thead", {}, groupHeadRow(cols), head), body);
  releaseDeferred(body, deferred);
  for (const tr of body.querySelectorAll("tr.sample")) {
    const z = ZOOM.get(tr.dataset.sid);
    tr.dataset.zoom = z ? z.z.toFixed(3) : "";
  }
}

function uiLink(run) {
  if (!CONFIG.mlflow_ui || !run.meta.experiment_id) return null;
  return `${CONFIG.mlflow_ui.replace(/\/$/, "")}/#/experiments/${encodeURIComponent(run.meta.experiment_id)}/runs/${encodeURIComponent(run.run_id)}`;
}

function epochStats(run, epoch) {
  let n = 0, right = 0, known = 0, change = 0, nc = 0;
  for (const m of run.bySid.values()) {
    const row = m.get(epoch); if (!row) continue;
    n++; if (row.correct !== null) { known++; if (row.correct) right++; }
    if (row.map_change !== null && row.map_change !== undefined) { change += row.map_change; nc++; }
  }
  const parts = [];
  if (known) parts.push(`acc ${Math.round(100 * right / known)}%`);
  if (nc) parts.push(`map change ${(change / nc).toFixed(2)}`);
  return parts.join(" · ");
}

function columnHead(c) {
  const r = c.run, m = r.meta;
  const epoch = c.epoch === null ? S.epoch : c.epoch;
  const link = uiLink(r);
  const th = el("th", { class: "runhead" + (c.epoch !== null && c.epoch === S.epoch ? " current" : ""),
    dataset: { run: r.run_id, epoch: c.epoch === null ? "" : c.epoch } },
    c.epoch !== null ? el("div", {}, `epoch ${c.epoch}`) : null,
    el("div", {}, m.run_name || r.run_id.slice(0, 8)),
    el("div", { class: "muted" }, `${m.experiment || ""} · `, el("code", {}, r.run_id.slice(0, 8))),
    el("div", { class: "status-" + r.status }, r.status === "RUNNING" ? "running" : r.status.toLowerCase()),
    el("div", { class: "muted" }, epochStats(r, epoch)),
    ...runBadges(r),
    link ? el("a", { href: link, target: "_blank", rel: "noopener" }, "open in MLflow") : null);
  return th;
}

function imageURL(run, row, kind) {
  return "api/image?" + qs({ run: run.run_id, mode: S.mode, ds_id: S.ds_id, epoch: row.epoch, index: row.index, kind });
}

// One panel of a row's preview: the input (0) or a component, cropped from the WebP preview.
function panel(run, row, which) {
  const g = row.g === null || row.g === undefined ? null : run.geometries[row.g];
  const url = imageURL(run, row, "preview");
  const later = !EAGER && DEFERRED !== null; // a lower row's: src once the top rows have loaded
  const img = el("img", { loading: EAGER ? "eager" : "lazy", fetchpriority: EAGER ? "high" : null, decoding: "async",
    alt: `${which ? "PC" + which : "input"} of sample ${row.sample_id}`, src: later ? null : url,
    dataset: later ? { src: url } : null });
  if (later) DEFERRED.push(img);
  img.addEventListener("error", () => {
    const why = row.rendered ? "image missing" : "not rendered";
    img.replaceWith(el("div", { class: "empty", style: { width: CELL + "px", height: CELL + "px" } }, why));
  });
  if (!g || g.k !== row.k || which > row.k) return el("div", { class: "full" }, img);
  const [fx, fy, fw, fh] = g.boxes[which];
  const w = CELL / fw, h = w * g.h / g.w;
  const crop = el("div", { class: "crop", style: { width: CELL + "px", height: Math.round(fh * h) + "px" } }, img);
  crop._geom = { fx, fy, w, h, ph: Math.round(fh * h) };
  placeCrop(crop, ZOOM.get(row.sample_id));
  return crop;
}

// ------------------------------------------------------------------------- zoom and pan
// One zoom per row (sample id): every panel of the row (the input, each run or epoch)
// shows the same part of the image, and it stays while the slider moves. z: the factor
// (1 = the whole panel); cx, cy: the centre of the view, as fractions of the panel.
const ZOOM = new Map();
const ZMAX = 8;

function placeCrop(crop, zoom) {
  const { fx, fy, w, h, ph } = crop._geom;
  const z = zoom ? zoom.z : 1, cx = zoom ? zoom.cx : 0.5, cy = zoom ? zoom.cy : 0.5;
  // The view never leaves the panel: the neighbouring panels of the card stay hidden.
  const ox = Math.min(Math.max(cx * CELL * z - CELL / 2, 0), CELL * (z - 1));
  const oy = Math.min(Math.max(cy * ph * z - ph / 2, 0), ph * (z - 1));
  Object.assign(crop.firstChild.style, { width: w * z + "px", height: h * z + "px",
    left: -(fx * w * z + ox) + "px", top: -(fy * h * z + oy) + "px" });
  crop.dataset.zoom = z.toFixed(3);
  crop.dataset.view = `${(ox / z).toFixed(2)},${(oy / z).toFixed(2)}`; // the view's corner, panel px
  crop.classList.toggle("zoomed", z > 1);
}

function setZoom(sid, zoom) {
  if (!zoom || zoom.z <= 1.001) ZOOM.delete(sid);
  else {
    // Keep the centre where the view can be (half a view from each edge).
    const m = 0.5 / zoom.z;
    ZOOM.set(sid, { z: Math.min(zoom.z, ZMAX), cx: Math.min(Math.max(zoom.cx, m), 1 - m),
                    cy: Math.min(Math.max(zoom.cy, m), 1 - m) });
  }
  const tr = document.querySelector(`#grid tbody tr.sample[data-sid="${CSS.escape(sid)}"]`);
  if (!tr) return;
  const zoom2 = ZOOM.get(sid);
  for (const crop of tr.querySelectorAll(".crop")) if (crop._geom) placeCrop(crop, zoom2);
  tr.dataset.zoom = zoom2 ? zoom2.z.toFixed(3) : "";
  const reset = tr.querySelector(".unzoom");
  if (reset) reset.hidden = !zoom2;
}

// Wheel over a panel zooms its row about the pointer; a drag pans it; the row's "reset
// zoom" button or "0" on a focused cell resets it; "+" / "-" zoom a focused cell's row.
// (A click stays the full-size view's.)
function wireZoom(grid) {
  const at = (crop, ev) => {
    const r = crop.getBoundingClientRect();
    return { x: (ev.clientX - r.left) / r.width, y: (ev.clientY - r.top) / r.height };
  };
  const sidOf = (node) => { const tr = node.closest("tr.sample"); return tr ? tr.dataset.sid : null; };
  grid.addEventListener("wheel", (ev) => {
    const crop = ev.target.closest(".crop"), sid = crop && sidOf(crop);
    if (!sid) return;
    ev.preventDefault();
    const old = ZOOM.get(sid) || { z: 1, cx: 0.5, cy: 0.5 };
    const z = Math.min(ZMAX, Math.max(1, old.z * Math.exp(-ev.deltaY / 300)));
    // The point under the pointer stays under it.
    const p = at(crop, ev);
    const { ph } = crop._geom;
    const ox = Math.min(Math.max(old.cx * CELL * old.z - CELL / 2, 0), CELL * (old.z - 1));
    const oy = Math.min(Math.max(old.cy * ph * old.z - ph / 2, 0), ph * (old.z - 1));
    const ux = (ox + p.x * CELL) / (CELL * old.z), uy = (oy + p.y * ph) / (ph * old.z);
    setZoom(sid, { z, cx: ux + (0.5 - p.x) / z, cy: uy + (0.5 - p.y) / z });
  }, { passive: false });
  let drag = null;
  grid.addEventListener("pointerdown", (ev) => {
    const crop = ev.target.closest(".crop"), sid = crop && sidOf(crop);
    if (!sid || !ZOOM.has(sid) || ev.button !== 0) return;
    drag = { sid, x: ev.clientX, y: ev.clientY, start: ZOOM.get(sid), ph: crop._geom.ph, moved: false };
    ev.preventDefault();
  });
  addEventListener("pointermove", (ev) => {
    if (!drag) return;
    const dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
    const z = drag.start.z;
    setZoom(drag.sid, { z, cx: drag.start.cx - dx / (CELL * z), cy: drag.start.cy - dy / (drag.ph * z) });
  });
  addEventListener("pointerup", () => {
    if (drag && drag.moved) { suppressClick = true; setTimeout(() => { suppressClick = false; }, 0); }
    drag = null;
  });
  grid.addEventListener("keydown", (ev) => {
    const sid = ev.target.closest(".cell") && sidOf(ev.target);
    if (!sid) return;
    const old = ZOOM.get(sid) || { z: 1, cx: 0.5, cy: 0.5 };
    if (ev.key === "+" || ev.key === "=") setZoom(sid, Object.assign({}, old, { z: old.z * 1.5 }));
    else if (ev.key === "-") setZoom(sid, Object.assign({}, old, { z: old.z / 1.5 }));
    else if (ev.key === "0") setZoom(sid, null);
  });
}
let suppressClick = false; // the click that ends a drag is not a click on the cell

function cell(c, sid) {
  const r = c.run, epoch = c.epoch === null ? S.epoch : c.epoch;
  const cls = c.epoch !== null && c.epoch === S.epoch ? "current" : "";
  const m = r.bySid.get(sid);
  if (!m) return el("td", { class: cls, dataset: { run: r.run_id, epoch, state: "missing" } },
    el("div", { class: "empty", style: { width: CELL + "px", height: CELL + "px" } }, "not logged by this run"));
  const row = m.get(epoch);
  if (!row) return el("td", { class: cls, dataset: { run: r.run_id, epoch, state: "missing" } },
    el("div", { class: "empty", style: { width: CELL + "px", height: CELL + "px" } }, `not logged at epoch ${epoch}`));
  const active = (S.filter || S.pred || S.signal) && (c.epoch === null || c.epoch === S.epoch);
  const dim = active && !cellPasses(r, sid, row);
  const td = el("td", { class: cls, dataset: { run: r.run_id, epoch, state: "logged",
    correct: row.correct === null ? "" : String(row.correct), pred: row.prediction === null ? "" : row.prediction,
    mapChange: row.map_change === null || row.map_change === undefined ? "" : row.map_change } });
  const bar = row.correct === null ? "" : (row.correct ? " bar-ok" : " bar-bad");
  const evr = row.evr[S.component - 1];
  const box = el("div", { class: "cell" + bar + (dim ? " dim" : ""), tabindex: 0, title: "click: the full card (arrow keys: epochs, samples); wheel: zoom the row; drag: pan",
    onclick: () => { if (!suppressClick) detail(r, row); }, onkeydown: (ev) => { if (ev.key === "Enter") detail(r, row); } },
    S.component <= row.k ? (Overlay.on ? Overlay.panel(r, row, S.component, () => panel(r, row, S.component))
      : panel(r, row, S.component)) : el("div", { class: "empty", style: { width: CELL + "px", height: CELL + "px" } }, `no PC${S.component}`));
  const mark = row.correct === null ? null : el("span", { class: row.correct ? "ok" : "bad" }, row.correct ? " ✓" : " ✗");
  td.append(box, el("div", { class: "cap" }, `pred: ${row.prediction === null ? "-" : row.prediction}`, mark, el("br"),
    el("span", { class: "muted" }, evr === null || evr === undefined ? `PC${S.component} n/a` : `PC${S.component} ${(evr * 100).toFixed(1)}%`,
      row.map_change === null || row.map_change === undefined ? "" : ` · Δmap ${row.map_change.toFixed(2)}`, signalNote(row))));
  return td;
}

// The full-size view: the card of one run's sample at one epoch. Left / right: that run's
// previous / next logged epoch of the sample; up / down: the previous / next sample of the
// grid (its order, its filters) at that epoch; Escape closes.
let DETAIL = null; // { run, sid, epoch } shown in the dialog
let SHOWN = [];    // the grid's sample ids, in its order

function detailStep(key) {
  if (!DETAIL) return false;
  const { run, sid, epoch } = DETAIL;
  const bySid = (s) => run.bySid.get(s) || new Map();
  if (key === "ArrowLeft" || key === "ArrowRight") {
    const es = [...bySid(sid).keys()].sort((a, b) => a - b);
    const e = es[es.indexOf(epoch) + (key === "ArrowRight" ? 1 : -1)];
    if (e !== undefined) detail(run, bySid(sid).get(e));
    return true;
  }
  if (key === "ArrowUp" || key === "ArrowDown") {
    const d = key === "ArrowDown" ? 1 : -1;
    for (let i = SHOWN.indexOf(sid) + d; i >= 0 && i < SHOWN.length; i += d) {
      const row = bySid(SHOWN[i]).get(epoch);
      if (row) { detail(run, row); break; }
    }
    return true;
  }
  return false;
}

// Before / after: another card of the same sample over this one, cut by a curtain at
// SWIPE.pos % of the width (left of it: the other card): the same run at another logged
// epoch, or another run at the same epoch. The choice stays while the arrow keys move the
// view (where the sample has it).
const SWIPE = { with: "", pos: 50 }; // "" (off), "epoch:E" or "run:RUN_ID"

function swipeView(run, row) {
  const card = el("img", { id: "detail-img", src: imageURL(run, row, "card"), alt: `card of sample ${row.sample_id}` });
  // Larger than logged where the window has room (up to 2x, pixels kept sharp).
  card.addEventListener("load", () => {
    card.style.width = Math.max(Math.min(card.naturalWidth * 2, innerWidth * 0.85), Math.min(card.naturalWidth, innerWidth * 0.85)) + "px";
  });
  const m = run.bySid.get(row.sample_id) || new Map();
  const name = (r) => r.meta.run_name || r.run_id.slice(0, 8);
  const choices = new Map(); // value -> { row, run, text }
  for (const e of [...m.keys()].filter((e) => e !== row.epoch).sort((a, b) => a - b))
    choices.set(`epoch:${e}`, { run, row: m.get(e), text: `epoch ${e}` });
  for (const r of RUNS) {
    const o = !r.error && r !== run ? (r.bySid.get(row.sample_id) || new Map()).get(row.epoch) : null;
    if (o) choices.set(`run:${r.run_id}`, { run: r, row: o, text: `${name(r)} · epoch ${row.epoch}` });
  }
  const pick = el("select", { id: "swipe-with", "aria-label": "card to compare with" },
    el("option", { value: "" }, "off"), ...[...choices].map(([v, c]) => el("option", { value: v }, c.text)));
  const other = choices.get(SWIPE.with) || null;
  pick.value = other ? SWIPE.with : "";
  pick.addEventListener("change", () => {
    SWIPE.with = pick.value;
    detail(run, row); // the select is redrawn: the arrow keys move the view again
  });
  pick.addEventListener("keydown", (ev) => { if (ev.key.startsWith("Arrow")) ev.stopPropagation(); });
  const ctl = el("p", { class: "swipe-ctl" }, "before / after: compare with ", pick);
  if (!other) return el("div", {}, ctl, card);
  const before = el("img", { id: "swipe-img", src: imageURL(other.run, other.row, "card"), alt: `card of ${other.text}` });
  const line = el("div", { class: "swipe-line" });
  const slider = el("input", { type: "range", id: "swipe", min: 0, max: 100, step: 0.5, value: SWIPE.pos,
    "aria-label": `curtain: ${other.text} left of it, ${name(run)} · epoch ${row.epoch} right` });
  const place = () => {
    before.style.clipPath = `inset(0 ${100 - SWIPE.pos}% 0 0)`;
    line.style.left = SWIPE.pos + "%";
  };
  slider.addEventListener("input", () => { SWIPE.pos = parseFloat(slider.value); place(); });
  // Arrow keys on the curtain move it, not the view.
  slider.addEventListener("keydown", (ev) => { if (ev.key.startsWith("Arrow")) ev.stopPropagation(); });
  place();
  ctl.append(` · left: ${other.text}, right: ${name(run)} · epoch ${row.epoch} `, slider);
  return el("div", {}, ctl, el("div", { class: "swipe", dataset: { with: SWIPE.with } }, card, before, line));
}

function detail(run, row) {
  DETAIL = { run, sid: row.sample_id, epoch: row.epoch };
  const m = run.meta;
  const link = uiLink(run);
  const evr = row.evr.map((v, i) => v === null ? null : `PC${i + 1} ${(v * 100).toFixed(1)}%`).filter(Boolean).join(", ");
  $("detail-body").replaceChildren(
    swipeView(run, row),
    el("p", {}, el("b", {}, `${m.run_name || run.run_id} · epoch ${row.epoch} · sample ${row.index}`)),
    el("p", { id: "detail-caption" }, `true: ${row.label === null ? "-" : row.label} · predicted: ${row.prediction === null ? "-" : row.prediction}`,
      row.correct === null ? "" : (row.correct ? " (correct)" : " (wrong)")),
    el("p", { class: "muted" }, `explained variance: ${evr || "n/a"}`,
      row.map_change === null || row.map_change === undefined ? "" : ` · map change since the previous logged epoch: ${row.map_change.toFixed(3)}`),
    el("p", { class: "muted" }, `experiment ${m.experiment || "-"} · run `, el("code", {}, run.run_id), ` · sample id `, el("code", {}, row.sample_id)),
    link ? el("p", {}, el("a", { id: "detail-link", href: link, target: "_blank", rel: "noopener" }, "open this run in the MLflow UI"))
         : el("p", { class: "muted" }, `run in the MLflow UI: mlflow ui --backend-store-uri ${CONFIG.tracking_uri}`));
  $("detail-body").append(el("p", { class: "muted keys" },
    "← → previous / next epoch · ↑ ↓ previous / next sample · Esc closes"));
  const d = $("detail");
  Object.assign(d.dataset, { run: run.run_id, sid: row.sample_id, epoch: row.epoch });
  if (d.showModal) { if (!d.open) d.showModal(); } else d.setAttribute("open", "");
}

function exportLinks(sids) {
  const ok = RUNS.filter((r) => !r.error);
  const q = { runs: ok.map((r) => r.run_id).join(","), mode: S.mode, ds_id: S.ds_id, epoch: S.epoch,
              component: S.component };
  const filtered = S.filter || S.label || S.pred || S.sort || S.signal;
  if (filtered) q.samples = sids.join(",") || ","; // "," : filtered to nothing
  $("export-png").href = "api/export?" + qs(Object.assign({ format: "png" }, q));
  $("export-html").href = "api/export?" + qs(Object.assign({ format: "html" }, q));
}

// ------------------------------------------------------------------------- controls
function step(d) {
  const i = EPOCHS.indexOf(S.epoch) + d;
  if (i < 0 || i >= EPOCHS.length) return false;
  S.epoch = EPOCHS[i];
  render();
  return true;
}

// A typed epoch: that one, or the nearest logged epoch below it (as a link's), else the first.
function jump(text) {
  const want = parseInt(text, 10);
  if (!EPOCHS.length || Number.isNaN(want)) return;
  const below = EPOCHS.filter((e) => e <= want);
  const e = below.length ? below[below.length - 1] : EPOCHS[0];
  if (e !== S.epoch) { S.epoch = e; render(); } else $("epoch-jump").value = e;
}

// Left / right step the slider, Home / End go to the first / last epoch, from anywhere on
// the page but a form field (which keeps its own keys) or the full-size view (its own).
function sliderKeys(ev) {
  if ($("detail").open || ev.altKey || ev.ctrlKey || ev.metaKey || !DATA || !EPOCHS.length) return;
  const t = ev.target;
  if (t && t.closest && t.closest("input, select, textarea, button, [contenteditable], dialog")) return;
  const moves = { ArrowLeft: () => step(-1), ArrowRight: () => step(1),
                  Home: () => { S.epoch = EPOCHS[0]; render(); },
                  End: () => { S.epoch = EPOCHS[EPOCHS.length - 1]; render(); } };
  if (!moves[ev.key]) return;
  ev.preventDefault();
  moves[ev.key]();
}

function play() {
  if (playTimer) { clearInterval(playTimer); playTimer = null; $("play").textContent = "Play"; return; }
  if (EPOCHS.indexOf(S.epoch) === EPOCHS.length - 1) S.epoch = EPOCHS[0];
  render();
  $("play").textContent = "Pause";
  playTimer = setInterval(() => { if (!step(1)) play(); }, 900);
}

function wire() {
  wireZoom($("grid"));
  wireViews();
  // On the document: focus may be on the page's body once the dialog's content is redrawn.
  document.addEventListener("keydown", (ev) => {
    if ($("detail").open && detailStep(ev.key)) ev.preventDefault();
  });
  $("detail").addEventListener("close", () => { DETAIL = null; });
  $("search-form").addEventListener("submit", (ev) => { ev.preventDefault(); search(); });
  $("select-shown").addEventListener("click", () => load(addRuns(lastResults.map((r) => r.run_id))));
  $("clear-runs").addEventListener("click", () => { S.runs = []; load(); });
  $("mode").addEventListener("change", (ev) => { S.mode = ev.target.value; S.ds_id = ""; chooseModeDs(); fetchData(true); });
  $("ds").addEventListener("change", (ev) => { S.ds_id = ev.target.value; fetchData(true); });
  $("component").addEventListener("change", (ev) => { S.component = parseInt(ev.target.value, 10); render(); });
  $("epoch").addEventListener("input", (ev) => { S.epoch = EPOCHS[parseInt(ev.target.value, 10)]; render(); });
  $("prev").addEventListener("click", () => step(-1));
  $("next").addEventListener("click", () => step(1));
  $("play").addEventListener("click", play);
  $("epoch-jump").addEventListener("change", (ev) => jump(ev.target.value));
  $("epoch-jump").addEventListener("keydown", (ev) => { if (ev.key === "Enter") jump(ev.target.value); });
  document.addEventListener("keydown", sliderKeys);
  $("filter").addEventListener("change", (ev) => { S.filter = ev.target.value; render(); });
  $("since").addEventListener("change", (ev) => { S.since = parseInt(ev.target.value, 10); render(); });
  $("label").addEventListener("change", (ev) => { S.label = ev.target.value; render(); });
  $("pred").addEventListener("change", (ev) => { S.pred = ev.target.value; render(); });
  $("sort").addEventListener("change", (ev) => { S.sort = ev.target.value; render(); });
}

function searchOnce() {
  if (searched) return;
  searched = true;
  search();
}

async function main() {
  wire();
  readURL();
  // The config and the tables at once: one round trip before the rows, not two.
  configReady = getJSON("api/config").then((c) => { CONFIG = c; $("uri").textContent = c.tracking_uri; })
    .catch((e) => message(`cannot reach the explorer's server: ${e.message}`));
  if (S.runs.length) {
    // A link to runs opens on them: the run search (every run of every experiment, a load
    // on the tracking server beside the first images) waits until the list is opened.
    $("picker").open = false;
    $("picker").addEventListener("toggle", () => { if ($("picker").open) searchOnce(); });
  } else searchOnce();
  await load();
  await configReady;
  document.body.dataset.ready = "1";
}

main();
