// EigenCAM explorer: the per-epoch charts above the grid (loaded before app.js, whose state
// (RUNS, EPOCHS, S, dataText) and helpers ($, el, render) they read when called).
"use strict";

// Per-epoch numbers of each run, from the tables the page already has (no request): the
// share of correct predictions and the mean map change. Inline SVG; a marker at the
// slider's epoch; a click on a chart moves the slider to the nearest epoch.
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"];
const CHARTS = [
  { metric: "acc", title: "correct (share of the samples)", fixedMax: 1, fmt: (v) => `${Math.round(v * 100)}%` },
  { metric: "map_change", title: "map change (mean)", fixedMax: null, fmt: (v) => v.toFixed(3) },
];
const CW = 360, CH = 150, PAD = { l: 44, r: 10, t: 20, b: 26 };
let chartsFor = null; // the data the charts were drawn from

function series(run) {
  const out = [];
  for (const e of run.epochs || []) {
    let known = 0, right = 0, change = 0, nc = 0;
    for (const m of run.bySid.values()) {
      const row = m.get(e); if (!row) continue;
      if (row.correct !== null) { known++; if (row.correct) right++; }
      if (row.map_change !== null && row.map_change !== undefined) { change += row.map_change; nc++; }
    }
    out.push({ epoch: e, acc: known ? right / known : null, map_change: nc ? change / nc : null });
  }
  return out;
}

function svg(tag, attrs, ...kids) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) e.setAttribute(k, String(v));
  for (const kid of kids) {
    if (kid !== null && kid !== undefined) e.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return e;
}

function chartX(epoch) {
  const lo = EPOCHS[0], hi = EPOCHS[EPOCHS.length - 1];
  return PAD.l + (hi === lo ? 0.5 : (epoch - lo) / (hi - lo)) * (CW - PAD.l - PAD.r);
}

function renderCharts() {
  const box = $("charts");
  const runs = RUNS.filter((r) => !r.error && (r.epochs || []).length);
  box.hidden = !runs.length || !EPOCHS.length;
  if (box.hidden) { box.replaceChildren(); chartsFor = null; return; }
  if (chartsFor !== dataText) {
    chartsFor = dataText;
    const data = runs.map((r, i) => ({ run: r, color: COLORS[i % COLORS.length], points: series(r) }));
    const charts = CHARTS.map((c) => drawChart(c, data));
    const legend = el("div", { class: "legend" }, ...data.map((d) => el("span", { dataset: { run: d.run.run_id } },
      el("i", { style: { background: d.color } }), d.run.meta.run_name || d.run.run_id.slice(0, 8))));
    box.replaceChildren(...charts, legend);
  }
  const x = chartX(S.epoch);
  for (const m of box.querySelectorAll(".marker")) {
    m.setAttribute("x1", x); m.setAttribute("x2", x); m.dataset.epoch = S.epoch;
  }
}

function drawChart(c, data) {
  const vals = data.flatMap((d) => d.points.map((p) => p[c.metric])).filter((v) => v !== null);
  const max = c.fixedMax || Math.max(1e-6, ...vals) * 1.1;
  const y = (v) => CH - PAD.b - (v / max) * (CH - PAD.t - PAD.b);
  const g = svg("svg", { class: "chart", viewBox: `0 0 ${CW} ${CH}`, width: CW, height: CH, "data-metric": c.metric,
    role: "img", "aria-label": c.title });
  g.append(svg("text", { x: PAD.l, y: 13, class: "ctitle" }, c.title));
  for (const v of [0, max / 2, max]) {
    g.append(svg("line", { x1: PAD.l, x2: CW - PAD.r, y1: y(v), y2: y(v), class: "grid" }),
      svg("text", { x: PAD.l - 4, y: y(v) + 4, class: "tick", "text-anchor": "end" }, c.fmt(v)));
  }
  const step = Math.max(1, Math.ceil(EPOCHS.length / 8));
  EPOCHS.forEach((e, i) => {
    if (i % step === 0 || i === EPOCHS.length - 1)
      g.append(svg("text", { x: chartX(e), y: CH - 8, class: "tick", "text-anchor": "middle" }, e));
  });
  for (const d of data) {
    const pts = d.points.filter((p) => p[c.metric] !== null);
    if (!pts.length) continue;
    const line = svg("g", { class: "series", "data-run": d.run.run_id });
    line.append(svg("polyline", { fill: "none", stroke: d.color, "stroke-width": 1.5,
      points: pts.map((p) => `${chartX(p.epoch).toFixed(1)},${y(p[c.metric]).toFixed(1)}`).join(" ") }));
    for (const p of pts) line.append(svg("circle", { cx: chartX(p.epoch).toFixed(1), cy: y(p[c.metric]).toFixed(1), r: 2.5,
      fill: d.color, "data-epoch": p.epoch, "data-value": p[c.metric] },
      svg("title", {}, `${d.run.meta.run_name || d.run.run_id.slice(0, 8)} · epoch ${p.epoch}: ${c.fmt(p[c.metric])}`)));
    g.append(line);
  }
  g.append(svg("line", { class: "marker", y1: PAD.t - 4, y2: CH - PAD.b }));
  g.addEventListener("click", (ev) => {
    const r = g.getBoundingClientRect();
    const x = (ev.clientX - r.left) * CW / r.width;
    let best = EPOCHS[0];
    for (const e of EPOCHS) if (Math.abs(chartX(e) - x) < Math.abs(chartX(best) - x)) best = e;
    if (best !== S.epoch) { S.epoch = best; render(); }
  });
  return g;
}
