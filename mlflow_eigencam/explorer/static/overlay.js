// Overlays composited in the page (docs/explorer.md, "Overlays"): a cell draws the raw input,
// the chosen component's map (jet, from the logged uint8 map at the layer's own resolution,
// upscaled bilinearly by the canvas) and the predicted / true boxes, each toggled, with an
// opacity slider and a layer picker. Rows logged without overlays (older runs) keep the card.
// Loaded before app.js; uses its state S (mode, ds_id, component) and render() at run time.
"use strict";

const Overlay = (() => {
  const O = { on: false, heat: true, pred: true, truth: true, opacity: 0.5, layer: "" };
  const LOADS = new Map(); // url -> Promise (JSON or decoded image), kept: logged rows never change
  const HEAT = new Map();  // maps url + component -> canvas of the coloured map
  const PALETTE = [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]];
  const LAYERS = new Set([""]);

  function q(obj) {
    return Object.entries(obj).map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v)}`).join("&");
  }

  function load(url, json) {
    if (!LOADS.has(url)) {
      const p = json
        ? fetch(url).then((r) => { if (!r.ok) throw new Error(`${r.status}`); return r.json(); })
        : new Promise((ok, bad) => { const im = new Image(); im.onload = () => ok(im); im.onerror = bad; im.src = url; });
      p.catch(() => LOADS.delete(url)); // a failure is asked again next time
      LOADS.set(url, p);
    }
    return LOADS.get(url);
  }

  // OpenCV's jet, as the cards use: blue (0) -> cyan -> yellow -> red (255).
  function jet(v) {
    const x = v / 255, c = (t) => Math.round(255 * Math.min(1, Math.max(0, 1.5 - Math.abs(4 * x - t))));
    return [c(3), c(2), c(1)];
  }

  // Component c (0-based) of a (k * h, w) grayscale maps image, coloured, at its own size.
  function heat(url, img, c, k) {
    const key = url + "#" + c;
    if (HEAT.has(key)) return HEAT.get(key);
    const w = img.naturalWidth, h = img.naturalHeight / k;
    const src = document.createElement("canvas");
    src.width = w; src.height = h;
    const g = src.getContext("2d");
    g.drawImage(img, 0, -c * h);
    const px = g.getImageData(0, 0, w, h);
    for (let i = 0; i < px.data.length; i += 4) {
      const [r, gg, b] = jet(px.data[i]);
      px.data[i] = r; px.data[i + 1] = gg; px.data[i + 2] = b; px.data[i + 3] = 255;
    }
    g.putImageData(px, 0, 0);
    HEAT.set(key, src);
    return src;
  }

  // CRC-32 of a name picks its colour, as render/boxes.py does: the same class, the same colour.
  function crc32(text) {
    let c = -1;
    for (const b of new TextEncoder().encode(text)) {
      c ^= b;
      for (let j = 0; j < 8; j++) c = (c >>> 1) ^ (0xedb88320 & -(c & 1));
    }
    return (c ^ -1) >>> 0;
  }

  function boxes(g, list, truth, scale) {
    g.lineWidth = Math.max(1, Math.round(scale * (truth ? 1 : 2)));
    g.font = `${Math.max(8, Math.round(9 * scale))}px sans-serif`;
    for (const b of list || []) {
      const [x1, y1, x2, y2, name, score] = b;
      const rgb = truth ? [255, 255, 255] : PALETTE[crc32(String(name)) % PALETTE.length];
      g.strokeStyle = g.fillStyle = `rgb(${rgb.join(",")})`;
      g.strokeRect(x1, y1, x2 - x1, y2 - y1);
      if (!truth) g.fillText(`${name}${score === undefined ? "" : " " + score.toFixed(2)}`, x1 + 2, Math.max(y1 - 2, 9 * scale));
    }
  }

  function layerPicker(layers) {
    const before = LAYERS.size;
    for (const l of layers) LAYERS.add(l);
    if (LAYERS.size === before) return;
    const sel = document.getElementById("ov-layer");
    sel.replaceChildren(...[...LAYERS].map((l) => { const o = document.createElement("option"); o.value = l; o.textContent = l || "default"; return o; }));
    sel.value = O.layer;
    document.getElementById("ov-layer-wrap").hidden = LAYERS.size < 2;
  }

  async function draw(cv) {
    const { run, row, component, fallback } = cv._ov;
    const base = { run: run.run_id, mode: S.mode, ds_id: S.ds_id, epoch: row.epoch, index: row.index };
    let meta, img;
    try {
      [meta, img] = await Promise.all([load("api/overlay?" + q(base), true), load("api/input?" + q(base))]);
    } catch (e) { // logged without overlays (an older run), or its input is missing: the card
      cv.closest(".ov").replaceWith(fallback());
      return;
    }
    const layers = Object.keys(meta.layers);
    layerPicker(layers);
    const layer = layers.includes(O.layer) ? O.layer : layers[0];
    const [k] = meta.layers[layer];
    const mapsURL = "api/maps?" + q(Object.assign({}, base, { layer }));
    const maps = O.heat && O.opacity > 0 && component <= k ? await load(mapsURL).catch(() => null) : null;
    const W = img.naturalWidth, H = img.naturalHeight;
    if (cv.width !== W || cv.height !== H) { cv.width = W; cv.height = H; }
    const g = cv.getContext("2d");
    g.globalAlpha = 1;
    g.drawImage(img, 0, 0);
    if (maps) {
      // The map covers the padded canvas a detector saw: the image is its top-left (fy, fx).
      const [fy, fx] = meta.extent || [1, 1];
      g.imageSmoothingEnabled = true;
      g.globalAlpha = O.opacity;
      g.drawImage(heat(mapsURL, maps, component - 1, k), 0, 0, W / fx, H / fy);
      g.globalAlpha = 1;
    }
    const scale = W / 128;
    if (O.truth) boxes(g, meta.true, true, scale);
    if (O.pred) boxes(g, meta.pred, false, scale);
    cv.dataset.drawn = [O.heat && maps ? "heat" : "", O.pred ? "pred" : "", O.truth ? "true" : "",
      O.opacity, component, layer].join("|");
    zoomable(cv.parentNode, W, H, row.sample_id);
  }

  // The row's zoom and pan (app.js: ZOOM, placeCrop) apply to the composited canvas as to the
  // previews' crops: once its size is known, its wrap is a crop of the whole canvas.
  function zoomable(wrap, W, H, sid) {
    if (!wrap || typeof placeCrop !== "function") return;
    const h = Math.round(128 * H / W);
    wrap._geom = { fx: 0, fy: 0, w: 128, h: 128 * H / W, ph: h };
    wrap.classList.add("crop");
    Object.assign(wrap.style, { width: "128px", height: h + "px" });
    placeCrop(wrap, ZOOM.get(sid));
  }

  // The cell's panel in the overlay view: a canvas drawn when its files arrive.
  function panel(run, row, component, fallback) {
    const cv = document.createElement("canvas");
    cv.className = "overlay";
    cv.width = cv.height = 1;
    cv.style.width = "128px";
    cv.setAttribute("aria-label", `PC${component} of sample ${row.sample_id} over its input`);
    cv._ov = { run, row, component, fallback };
    const wrap = document.createElement("div");
    wrap.className = "ov";
    wrap.append(cv);
    draw(cv);
    return wrap;
  }

  function redraw() {
    for (const cv of document.querySelectorAll("canvas.overlay")) if (cv._ov) draw(cv);
    if (typeof writeURL === "function") writeURL();
  }

  // Deep links: overlay=1, ov_off=heat,pred,true (what is hidden), ov_opacity=0..100, ov_layer.
  const PARTS = { heat: "heat", pred: "pred", true: "truth" };
  function query() {
    if (!O.on) return "";
    const off = Object.keys(PARTS).filter((p) => !O[PARTS[p]]);
    return q(Object.assign({ overlay: 1 }, off.length ? { ov_off: off.join(",") } : {},
      O.opacity !== 0.5 ? { ov_opacity: Math.round(O.opacity * 100) } : {},
      O.layer ? { ov_layer: O.layer } : {})).replace(/%2C/g, ",");
  }

  function readURL() {
    const p = new URLSearchParams(location.search);
    O.on = p.get("overlay") === "1";
    const off = (p.get("ov_off") || "").split(",");
    for (const part of Object.keys(PARTS)) O[PARTS[part]] = !off.includes(part);
    const op = parseInt(p.get("ov_opacity") || "50", 10);
    O.opacity = Number.isFinite(op) ? Math.min(100, Math.max(0, op)) / 100 : 0.5;
    O.layer = p.get("ov_layer") || "";
  }

  function control(id, label, type, attrs, onchange) {
    const lab = document.createElement("label");
    const input = document.createElement(type === "select" ? "select" : "input");
    input.id = id;
    if (type !== "select") input.type = type;
    Object.assign(input, attrs);
    input.addEventListener(type === "range" ? "input" : "change", () => onchange(input));
    if (type === "checkbox") lab.append(input, " " + label); else lab.append(label + " ", input);
    return lab;
  }

  // The controls, after the page's own (built here: index.html only loads this file).
  function controls() {
    const at = document.getElementById("controls");
    if (!at) return;
    const opts = document.createElement("span");
    opts.id = "ov-opts";
    opts.hidden = !O.on;
    opts.append(
      control("ov-heat", "heat map", "checkbox", { checked: O.heat }, (i) => { O.heat = i.checked; redraw(); }),
      control("ov-pred", "predicted boxes", "checkbox", { checked: O.pred }, (i) => { O.pred = i.checked; redraw(); }),
      control("ov-true", "true boxes", "checkbox", { checked: O.truth }, (i) => { O.truth = i.checked; redraw(); }),
      control("ov-opacity", "opacity", "range", { min: 0, max: 100, value: Math.round(O.opacity * 100) },
        (i) => { O.opacity = i.value / 100; redraw(); }));
    const layer = control("ov-layer", "layer", "select", {}, (i) => { O.layer = i.value; redraw(); });
    layer.id = "ov-layer-wrap";
    layer.hidden = true;
    opts.append(layer);
    const span = document.createElement("span");
    span.id = "overlay-ctl";
    span.append(control("ov-on", "overlay view", "checkbox", { checked: O.on }, (i) => {
      O.on = i.checked; opts.hidden = !O.on;
      if (typeof render === "function") render();
      if (typeof writeURL === "function") writeURL();
    }), " ", opts);
    at.append(document.createElement("br"), span);
  }
  readURL();
  controls();

  return { get on() { return O.on; }, state: O, panel, query, redraw };
})();
