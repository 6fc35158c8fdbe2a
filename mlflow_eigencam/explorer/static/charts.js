// EigenCAM explorer: the per-epoch charts above the grid (loaded before app.js, whose state
// (RUNS, EPOCHS, S, dataText) and helpers ($, el, render) they read when called).
"use strict";

// Per-epoch numbers of each run, from the tables the page already has (no request): the
// share of correct predictions and the mean of each per-sample signal (map change and every
// other signal column); then each signal only the metrics have (views.js reads them after
// the tables). Inline SVG; a marker at the slider's epoch, lighter ones at the fan-out's
// epochs; a click on a chart moves the slider to the nearest epoch, a shift-click adds that
// epoch to the fan-out (or takes it out).
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"];
const ACC_CHART = { metric: "acc", title: "correct (share of the samples)", fixedMax: 1, fmt: (v) => `${Math.round(v * 100)}%` };

// The charts: accuracy, each table signal (mean over the samples), each metric-only signal.
function chartList() {
  const fmt = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(3));
  return [ACC_CHART,
    ...tableSignals().map((n) => ({ metric: n, title: `${n.replace(/_/g, " ")} (mean)`, fixedMax: null, fmt })),
    ...metricSignals().map((n) => ({ metric: n, title: `${n.replace(/_/g, " ")} (metric)`, fixedMax: null, fmt, logged: true }))];
}
const CW = 360, CH = 150, PAD = { l: 44, r: 10, t: 20, b: 26 };
let chartsFor = null; // the data the charts were drawn from

function series(run) {
  const out = [];
  const names = run.signals || [];
  const logged = METRICS[run.run_id] || {};
  for (const e of run.epochs || []) {
    let known = 0, right = 0;
    const sum = names.map(() => [0, 0]);
    for (const m of run.bySid.values()) {
      const row = m.get(e); if (!row) continue;
      if (row.correct !== null) { known++; if (row.correct) right++; }
      names.forEach((n, i) => { const v = row.sig[n]; if (v !== undefined) { sum[i][0] += v; sum[i][1]++; } });
    }
    const point = { epoch: e, acc: known ? right / known : null };
    names.forEach((n, i) => { point[n] = sum[i][1] ? sum[i][0] / sum[i][1] : null; });
    for (const [n, pts] of Object.entries(logged)) if (!(n in point)) {
      const p = pts.find((x) => x[0] === e);
      point[n] = p ? p[1] : null;
    }
    out.push(point);
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
  if (chartsFor !== dataText + metricsText) {
    chartsFor = dataText + metricsText;
    const data = runs.map((r, i) => ({ run: r, color: COLORS[i % COLORS.length], points: series(r) }));
    const charts = chartList().map((c) => drawChart(c, data));
    const legend = el("div", { class: "legend" }, ...data.map((d) => el("span", { dataset: { run: d.run.run_id } },
      el("i", { style: { background: d.color } }), d.run.meta.run_name || d.run.run_id.slice(0, 8))));
    box.replaceChildren(...charts, legend);
  }
  const x = chartX(S.epoch);
  for (const m of box.querySelectorAll(".marker")) {
    m.setAttribute("x1", x); m.setAttribute("x2", x); m.dataset.epoch = S.epoch;
  }
  const fan = fanEpochs();
  for (const g of box.querySelectorAll("svg.chart")) {
    for (const f of g.querySelectorAll(".fan")) f.remove();
    for (const e of fan) g.append(svg("line", { class: "fan", x1: chartX(e), x2: chartX(e), y1: PAD.t, y2: CH - PAD.b, "data-epoch": e }));
  }
}

function drawChart(c, data) {
  const has = (v) => v !== null && v !== undefined;
  const vals = data.flatMap((d) => d.points.map((p) => p[c.metric])).filter(has);
  const max = c.fixedMax || Math.max(1e-6, ...vals) * 1.1;
  const min = c.fixedMax ? 0 : Math.min(0, ...vals) * 1.1; // faithfulness can be negative
  const y = (v) => CH - PAD.b - ((v - min) / (max - min)) * (CH - PAD.t - PAD.b);
  const g = svg("svg", { class: "chart", viewBox: `0 0 ${CW} ${CH}`, width: CW, height: CH, "data-metric": c.metric,
    role: "img", "aria-label": c.title });
  g.append(svg("text", { x: PAD.l, y: 13, class: "ctitle" }, c.title));
  for (const v of min < 0 ? [min, 0, max] : [0, max / 2, max]) {
    g.append(svg("line", { x1: PAD.l, x2: CW - PAD.r, y1: y(v), y2: y(v), class: "grid" }),
      svg("text", { x: PAD.l - 4, y: y(v) + 4, class: "tick", "text-anchor": "end" }, c.fmt(v)));
  }
  const step = Math.max(1, Math.ceil(EPOCHS.length / 8));
  EPOCHS.forEach((e, i) => {
    if (i % step === 0 || i === EPOCHS.length - 1)
      g.append(svg("text", { x: chartX(e), y: CH - 8, class: "tick", "text-anchor": "middle" }, e));
  });
  for (const d of data) {
    const pts = d.points.filter((p) => has(p[c.metric]));
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
    if (ev.shiftKey) toggleFan(best); // the fan-out: this epoch beside the others
    else if (best !== S.epoch) { S.epoch = best; render(); }
  });
  return g;
}
