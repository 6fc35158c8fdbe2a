// EigenCAM explorer: epochs x runs fan-out, runs grouped by a parameter, and the explanation
// signals as sorts and filters (loaded before app.js, whose state (S, RUNS, EPOCHS, DATA) and
// helpers ($, el, fillSelect, render, getJSON, qs) these functions read when called).
"use strict";

const MAX_FAN = 8;           // chosen epochs shown side by side at most
const TAG_STABLE = "mlflow_eigencam.stable_epoch";
const TAG_ALARM = "mlflow_eigencam.alarm"; // and any tag that starts with it
let METRICS = {};            // run id -> { name: [[epoch, value], ...] } from /api/metrics
let metricsFor = "";         // the tables' text the metrics were asked for
let metricsText = "";        // the last /api/metrics answer (the charts redraw when it changes)

// ------------------------------------------------------------------------- signals
// A row's signals by name ({map_change: 0.1, localization: 0.8, ...}), from the table's
// signal columns (the server lists them; a new one shows up without a change here).
function indexSignals(run) {
  const names = run.signals || [];
  for (const row of run.rows || []) {
    row.sig = {};
    names.forEach((n, i) => { if (row.s && row.s[i] !== null && row.s[i] !== undefined) row.sig[n] = row.s[i]; });
  }
}

// Every per-sample signal some selected run's table has, in their logged order.
function tableSignals() {
  const out = [];
  for (const r of RUNS) for (const n of r.signals || []) if (!out.includes(n)) out.push(n);
  return out;
}

// Signals only the metrics have (a label-free one such as fixation), by name.
function metricSignals() {
  const have = new Set(tableSignals()), out = [];
  for (const m of Object.values(METRICS)) for (const n of Object.keys(m)) if (!have.has(n) && !out.includes(n)) out.push(n);
  return out.sort();
}

function signalValue(row, name) {
  if (name === "evr") return row.evr[S.component - 1];
  const v = row.sig ? row.sig[name] : undefined;
  return v === undefined ? null : v;
}

const fmtSignal = (v) => (v === null || v === undefined ? "-" : Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(3));

// The sort select: as logged, explained variance, then each signal most first / least first.
// A sort from a link that names a signal these runs do not have stays listed.
function fillSorts() {
  const opts = [["", "as logged"], ["evr", "explained variance (most first)"]];
  const names = tableSignals();
  const want = (S.sort || "").split(":")[0];
  if (want && want !== "evr" && !names.includes(want)) names.push(want);
  for (const n of names) opts.push([n, `${n.replace(/_/g, " ")} (most first)`], [`${n}:asc`, `${n.replace(/_/g, " ")} (least first)`]);
  const sel = $("sort");
  sel.replaceChildren(...opts.map(([v, t]) => el("option", { value: v }, t)));
  sel.value = S.sort;
  const sig = $("signal");
  const snames = tableSignals();
  if (S.signal && !snames.includes(S.signal)) snames.push(S.signal);
  fillSelect(sig, ["", ...snames], S.signal, (v) => v ? v.replace(/_/g, " ") : "(none)");
  $("signal-range").hidden = !S.signal;
  if (document.activeElement !== $("signal-min")) $("signal-min").value = S.min;
  if (document.activeElement !== $("signal-max")) $("signal-max").value = S.max;
}

// A cell passes the signal filter when its value lies in [min, max] (an empty bound: open).
function signalPasses(row) {
  if (!S.signal) return true;
  const v = signalValue(row, S.signal);
  if (v === null) return false;
  const lo = parseFloat(S.min), hi = parseFloat(S.max);
  return !(!Number.isNaN(lo) && v < lo) && !(!Number.isNaN(hi) && v > hi);
}

// The sort key of a sample: the largest value over the considered cells (most first), or
// minus the smallest (least first); samples without the value last.
function signalSortKey(cells) {
  const [name, dir] = S.sort.split(":");
  const vals = cells.map((c) => signalValue(c.row, name)).filter((v) => v !== null && v !== undefined);
  if (!vals.length) return -Infinity;
  return dir === "asc" ? -Math.min(...vals) : Math.max(...vals);
}

// The caption's number for the signal the view sorts or filters by (map change and the
// explained variance have their own).
function signalNote(row) {
  const names = [S.signal, (S.sort || "").split(":")[0]].filter((n) => n && n !== "evr" && n !== "map_change");
  return [...new Set(names)].map((n) => ` · ${n.replace(/_/g, " ")} ${fmtSignal(signalValue(row, n))}`).join("");
}

// The label-free metrics (not in the tables), read after the tables: the charts and the
// group summary add them when they come; the first paint never waits for them.
async function loadMetrics(text) {
  if (!DATA || text === metricsFor) return;
  metricsFor = text;
  const ok = RUNS.filter((r) => !r.error);
  if (!ok.length) return;
  let body;
  try {
    const r = await fetch("api/metrics?" + qs({ runs: ok.map((r) => r.run_id).join(","), mode: S.mode, ds_id: S.ds_id }));
    const t = await r.text();
    if (!r.ok || t === metricsText) return;
    metricsText = t;
    body = JSON.parse(t);
  } catch (e) { return; } // the charts of the tables stand without them
  METRICS = {};
  for (const r of body.runs) if (r.metrics) METRICS[r.run_id] = r.metrics;
  render();
}

function metricAt(run, name, epoch) {
  const pts = (METRICS[run.run_id] || {})[name] || [];
  const p = pts.find((x) => x[0] === epoch);
  return p ? p[1] : null;
}

// ------------------------------------------------------------------------- fan-out
// The chosen epochs shown side by side for every run (each one logged, or the nearest
// logged one below it; at most MAX_FAN), ascending; [] when none is chosen.
function fanEpochs() {
  const out = [];
  for (const want of S.epochs) {
    const below = EPOCHS.filter((e) => e <= want);
    const e = below.length ? below[below.length - 1] : EPOCHS[0];
    if (e !== undefined && !out.includes(e)) out.push(e);
  }
  return out.sort((a, b) => a - b).slice(0, MAX_FAN);
}

function parseEpochs(text) {
  return [...new Set(String(text || "").split(/[\s,]+/).filter(Boolean).map((t) => parseInt(t, 10))
    .filter((n) => !Number.isNaN(n) && n >= 0))];
}

function setFan(list) {
  const note = list.length > MAX_FAN ? `at most ${MAX_FAN} epochs side by side: the first ${MAX_FAN} are shown` : "";
  S.epochs = list.slice(0, MAX_FAN);
  $("fanout-note").textContent = note;
  render();
}

// Shift-click on a chart, or the "+" beside the slider: add the epoch, or take it out.
function toggleFan(epoch) {
  const have = fanEpochs();
  setFan(have.includes(epoch) ? have.filter((e) => e !== epoch) : [...have, epoch].sort((a, b) => a - b));
}

// ------------------------------------------------------------------------- groups
function paramNames() {
  const out = new Set();
  for (const r of RUNS) for (const k of Object.keys((r.meta && r.meta.params) || {})) out.add(k);
  return [...out].sort();
}

const NOT_SET = "(not set)";

function groupOf(run) {
  const p = (run.meta && run.meta.params) || {};
  return Object.prototype.hasOwnProperty.call(p, S.group) ? String(p[S.group]) : NOT_SET;
}

// The runs in the grid's order: by the group's value (numbers as numbers) when grouped,
// else as selected.
function orderedRuns() {
  const ok = RUNS.filter((r) => !r.error);
  if (!S.group) return ok;
  const vals = ok.map(groupOf);
  const numeric = vals.every((v) => v === NOT_SET || (v.trim() !== "" && !Number.isNaN(Number(v))));
  const cmp = (a, b) => (a === b ? 0 : a === NOT_SET ? 1 : b === NOT_SET ? -1
    : numeric ? Number(a) - Number(b) : a < b ? -1 : 1);
  return ok.map((r, i) => [r, i]).sort((x, y) => cmp(groupOf(x[0]), groupOf(y[0])) || x[1] - y[1]).map((x) => x[0]);
}

// The header row above the runs' headers: one cell per group, as wide as its columns.
function groupHeadRow(cols) {
  if (!S.group || !cols.length) return null;
  const tr = el("tr", { class: "grouphead" }, el("th", { class: "in" }, S.group));
  let i = 0;
  while (i < cols.length) {
    const g = groupOf(cols[i].run);
    let j = i;
    while (j < cols.length && groupOf(cols[j].run) === g) j++;
    const n = new Set(cols.slice(i, j).map((c) => c.run.run_id)).size;
    tr.append(el("th", { colspan: j - i, dataset: { group: g } }, `${S.group} = ${g} (${n} run${n === 1 ? "" : "s"})`));
    i = j;
  }
  return tr;
}

// One summary row per group at the slider's epoch: how many runs, the share of their
// samples predicted correctly, and the mean of each signal over their samples (the
// metric-only signals: the mean over the group's runs).
function renderGroups() {
  const box = $("groups");
  fillSelect($("group"), ["", ...new Set([...paramNames(), ...(S.group ? [S.group] : [])])], S.group, (v) => v || "(none)");
  if (!S.group || !RUNS.some((r) => !r.error)) { box.hidden = true; box.replaceChildren(); return; }
  const sigs = tableSignals(), msigs = metricSignals();
  const head = el("tr", {}, el("th", {}, S.group), el("th", {}, "runs"), el("th", {}, `correct at epoch ${S.epoch}`),
    ...sigs.map((n) => el("th", {}, n.replace(/_/g, " "))), ...msigs.map((n) => el("th", {}, n.replace(/_/g, " "))));
  const groups = new Map();
  for (const r of orderedRuns()) {
    const g = groupOf(r);
    if (!groups.has(g)) groups.set(g, []);
    groups.get(g).push(r);
  }
  const rows = [];
  for (const [g, runs] of groups) {
    let known = 0, right = 0;
    const sum = Object.fromEntries(sigs.map((n) => [n, [0, 0]]));
    for (const r of runs) for (const m of r.bySid.values()) {
      const row = m.get(S.epoch); if (!row) continue;
      if (row.correct !== null) { known++; if (row.correct) right++; }
      for (const n of sigs) { const v = signalValue(row, n); if (v !== null) { sum[n][0] += v; sum[n][1]++; } }
    }
    const cellOf = (col, v, text) => el("td", { dataset: { col, value: v === null ? "" : v } }, text);
    const mcells = msigs.map((n) => {
      const vals = runs.map((r) => metricAt(r, n, S.epoch)).filter((v) => v !== null);
      const v = vals.length ? vals.reduce((a, b) => a + b, 0) / vals.length : null;
      return cellOf(n, v, fmtSignal(v));
    });
    const acc = known ? right / known : null;
    rows.push(el("tr", { dataset: { group: g } }, el("th", {}, g),
      cellOf("runs", runs.length, `${runs.length}: ${runs.map((r) => r.meta.run_name || r.run_id.slice(0, 8)).join(", ")}`),
      cellOf("acc", acc, acc === null ? "-" : `${Math.round(acc * 100)}%`),
      ...sigs.map((n) => { const v = sum[n][1] ? sum[n][0] / sum[n][1] : null; return cellOf(n, v, fmtSignal(v)); }),
      ...mcells));
  }
  box.hidden = false;
  box.replaceChildren(el("caption", {}, `runs grouped by ${S.group}, at epoch ${S.epoch}`), el("thead", {}, head), el("tbody", {}, ...rows));
}

// ------------------------------------------------------------------------- run header
// The run's stable epoch (the first epoch after which its map change stayed low) and its
// alarms, from the tags the logger sets.
function runBadges(run) {
  const tags = (run.meta && run.meta.tags) || {};
  const out = [];
  if (tags[TAG_STABLE] !== undefined && tags[TAG_STABLE] !== "")
    out.push(el("div", { class: "stable", dataset: { stable: tags[TAG_STABLE] } }, `stable from epoch ${tags[TAG_STABLE]}`));
  for (const [k, v] of Object.entries(tags).sort()) {
    if (k !== TAG_ALARM && !k.startsWith(TAG_ALARM + ".") && !k.startsWith(TAG_ALARM + "_")) continue;
    const text = String(v);
    out.push(el("div", { class: "alarm", title: `${k}: ${text}`, dataset: { tag: k } },
      `⚠ ${text.length > 60 ? text.slice(0, 57) + "…" : text}`));
  }
  return out;
}

function wireViews() {
  $("fanout").addEventListener("change", (ev) => setFan(parseEpochs(ev.target.value)));
  $("fanout").addEventListener("keydown", (ev) => { if (ev.key === "Enter") setFan(parseEpochs(ev.target.value)); });
  $("fan-add").addEventListener("click", () => { if (S.epoch !== null) toggleFan(S.epoch); });
  $("group").addEventListener("change", (ev) => { S.group = ev.target.value; render(); });
  $("signal").addEventListener("change", (ev) => { S.signal = ev.target.value; render(); });
  for (const id of ["signal-min", "signal-max"]) {
    $(id).addEventListener("change", (ev) => { S[id === "signal-min" ? "min" : "max"] = ev.target.value.trim(); render(); });
  }
}

// The controls' state from S (render() calls it).
function renderViews() {
  fillSorts();
  const fan = fanEpochs();
  if (document.activeElement !== $("fanout")) $("fanout").value = fan.join(",");
  $("fanout").dataset.epochs = fan.join(",");
  $("fan-add").textContent = fan.includes(S.epoch) ? "− side by side" : "+ side by side";
  renderGroups();
}
