// The model explorer page: the latent map, decoding under the cursor, scoring a record.
// Plain JavaScript, no build step, no other origin. Text from the model (feature names,
// categories) is only ever set as textContent, never parsed as HTML.
"use strict";

const state = { key: sessionStorage.getItem("vae-anomaly-key") || "", map: null, model: null,
  locked: false, busy: false, pending: null, posterior: null, hover: null };
const $ = (id) => document.getElementById(id);
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
  "#7f7f7f", "#bcbd22", "#17becf"];

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function fmt(v) {
  if (v === null || v === undefined) return "missing";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toPrecision(4);
  return String(v);
}

async function api(path, body) {
  const headers = body === undefined ? {} : { "content-type": "application/json" };
  if (state.key) headers["X-API-Key"] = state.key;
  const r = await fetch(path, { method: body === undefined ? "GET" : "POST", headers,
    body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (r.status === 401) { $("keyform").hidden = false; throw new Error("an API key is needed"); }
  if (!r.ok) throw new Error(data.error || `HTTP ${r.status}`);
  return data;
}

function status(text) { $("status").textContent = text; }

// ---------------------------------------------------------------- the map

function view() { // the map's bounds, widened to show a scored record's posterior
  const [[x0, x1], [y0, y1]] = state.map.bounds, p = state.posterior;
  if (!p) return [[x0, x1], [y0, y1]];
  const rx = 2.2 * Math.sqrt(p.map_cov[0][0]), ry = 2.2 * Math.sqrt(p.map_cov[1][1]);
  return [[Math.min(x0, p.map[0] - rx), Math.max(x1, p.map[0] + rx)],
    [Math.min(y0, p.map[1] - ry), Math.max(y1, p.map[1] + ry)]];
}

function toCanvas(x, y) {
  const c = $("map"), [[x0, x1], [y0, y1]] = view();
  return [(x - x0) / (x1 - x0) * c.width, (1 - (y - y0) / (y1 - y0)) * c.height];
}

function fromCanvas(px, py) {
  const c = $("map"), [[x0, x1], [y0, y1]] = view();
  return [x0 + px / c.width * (x1 - x0), y0 + (1 - py / c.height) * (y1 - y0)];
}

function heat(p) { // percentile 0-100 -> blue .. red
  const t = Math.min(1, Math.max(0, p / 100)) ** 3;
  return `rgb(${Math.round(40 + 215 * t)},${Math.round(90 + 40 * (1 - t))},${Math.round(200 * (1 - t))})`;
}

function drawMap() {
  const c = $("map"), g = c.getContext("2d"), m = state.map, pts = m.points;
  g.fillStyle = "#ffffff"; g.fillRect(0, 0, c.width, c.height);
  const labels = m.labels || [];
  for (let i = 0; i < pts.x.length; i++) {
    const [px, py] = toCanvas(pts.x[i], pts.y[i]);
    g.fillStyle = pts.label ? PALETTE[labels.indexOf(pts.label[i]) % PALETTE.length]
      : heat(pts.percentile[i]);
    g.fillRect(px - 2, py - 2, 4, 4);
  }
  if (state.posterior) drawPosterior(g, state.posterior);
  if (state.hover) {
    const [px, py] = toCanvas(...state.hover);
    g.strokeStyle = state.locked ? "#000" : "#555"; g.lineWidth = state.locked ? 2 : 1;
    g.beginPath(); g.moveTo(px - 8, py); g.lineTo(px + 8, py); g.moveTo(px, py - 8);
    g.lineTo(px, py + 8); g.stroke();
  }
}

function drawPosterior(g, post) {
  const [[a, b], [, d]] = post.map_cov, [cx, cy] = toCanvas(...post.map);
  const tr = (a + d) / 2, det = Math.sqrt(Math.max(0, ((a - d) / 2) ** 2 + b * b));
  const l1 = tr + det, l2 = Math.max(0, tr - det), angle = 0.5 * Math.atan2(2 * b, a - d);
  const c = $("map"), [[x0, x1], [y0, y1]] = view();
  const sx = c.width / (x1 - x0), sy = c.height / (y1 - y0);
  g.save(); g.translate(cx, cy); g.scale(sx, -sy); g.rotate(angle);
  g.beginPath(); g.ellipse(0, 0, 2 * Math.sqrt(l1), 2 * Math.sqrt(l2), 0, 0, 2 * Math.PI);
  g.restore();
  g.strokeStyle = "#000"; g.lineWidth = 2; g.stroke();
  g.beginPath(); g.arc(cx, cy, 5, 0, 2 * Math.PI); g.fillStyle = "#ffeb3b"; g.fill(); g.stroke();
}

function legend() {
  const box = $("legend"), m = state.map;
  box.replaceChildren();
  if (m.labels) {
    m.labels.forEach((lab, i) => {
      const s = el("span", lab), sw = el("i");
      sw.style.background = PALETTE[i % PALETTE.length]; s.prepend(sw); box.append(s);
    });
    box.prepend(el("span", (m.points.label_name || "label") + ":"));
  } else {
    [0, 50, 90, 99, 100].forEach((p) => {
      const s = el("span", `${p}th`), sw = el("i");
      sw.style.background = heat(p); s.prepend(sw); box.append(s);
    });
    box.prepend(el("span", "score percentile among normal records:"));
  }
}

// ---------------------------------------------------------------- decoding under the cursor

function requestDecode(point) { // one request in flight; the latest point waits its turn
  state.pending = point;
  if (state.busy) return;
  const next = state.pending; state.pending = null; state.busy = true;
  api("/v1/decode", { points: [next] })
    .then((d) => showDecoded(d.results[0]))
    .catch((e) => status(e.message))
    .finally(() => { state.busy = false; if (state.pending) requestDecode(state.pending); });
}

function showDecoded(rec) {
  $("where").textContent = `at (${rec.map.map((v) => v.toFixed(2)).join(", ")})`;
  if (rec.image && state.map.image) drawImage(rec.image, state.map.image);
  const t = el("table"), head = el("tr");
  ["feature", "expected", "90% range / probabilities"].forEach((h) => head.append(el("th", h)));
  t.append(head);
  for (const f of rec.features) {
    const tr = el("tr"); tr.append(el("td", f.name));
    if (f.kind === "categorical") {
      tr.append(el("td", f.expected === null ? "missing" : f.expected));
      const cell = el("td");
      for (const [cat, p] of f.probs.slice(0, 5)) cell.append(bar(cat, p));
      tr.append(cell);
    } else if (f.kind === "boolean") {
      tr.append(el("td", String(f.expected))); const cell = el("td");
      cell.append(bar("true", f.p)); tr.append(cell);
    } else {
      tr.append(el("td", fmt(f.expected)));
      tr.append(el("td", `${fmt(f.range[0])} – ${fmt(f.range[1])}`));
    }
    if (f.p_missing !== undefined) tr.lastChild.append(el("div", `P(missing) ${fmt(f.p_missing)}`, "cat"));
    t.append(tr);
  }
  if (rec.image) { // the image says it better; the table stays at hand
    const d = el("details"); d.append(el("summary", "every pixel"), t); $("decoded").replaceChildren(d);
  } else $("decoded").replaceChildren(t);
}

function bar(label, p, hot) { // hot: an attribution share (the label says it)
  const d = el("div", null, "cat"), b = el("span", null, hot ? "bar hot" : "bar");
  b.style.width = `${Math.round(Math.max(0, Math.min(1, p)) * 120)}px`;
  d.append(b, el("span", hot ? ` ${label}` : ` ${label} ${fmt(p)}`));
  return d;
}

function drawImage(pixels, shape) {
  const c = $("image"), g = c.getContext("2d");
  c.hidden = false;
  const w = c.width / shape.width, h = c.height / shape.height, span = (shape.max - shape.min) || 1;
  pixels.forEach((v, i) => {
    const t = Math.min(1, Math.max(0, (v - shape.min) / span)), k = Math.round(255 * (1 - t));
    g.fillStyle = `rgb(${k},${k},${k})`;
    g.fillRect((i % shape.width) * w, Math.floor(i / shape.width) * h, w + 1, h + 1);
  });
}

function mapEvents() {
  const c = $("map");
  const at = (ev) => { const r = c.getBoundingClientRect();
    return fromCanvas((ev.clientX - r.left) * c.width / r.width, (ev.clientY - r.top) * c.height / r.height); };
  c.addEventListener("mousemove", (ev) => {
    if (state.locked) return;
    state.hover = at(ev); drawMap(); requestDecode(state.hover);
  });
  c.addEventListener("click", (ev) => {
    state.locked = !state.locked; state.hover = at(ev); drawMap(); requestDecode(state.hover);
  });
}

// ---------------------------------------------------------------- scoring a record

function typicalValue(f) {
  if (f.kind === "numeric") return f.impute;
  if (f.kind === "boolean") return f.rate >= 0.5;
  return f.categories[2];
}

function buildForm(model) {
  const form = $("record"), derived = new Set();
  for (const d of model.datetime_columns) for (const x of d.derived) derived.add(`${d.name}.${x}`);
  const image = state.map && state.map.image;
  if (image) { form.classList.add("pixels"); form.style.setProperty("--cols", image.width); }
  const byName = new Map(model.features.map((f) => [f.name, f]));
  // an image's pixels in their places (one training dropped, constant, stays a blank cell)
  const order = image ? [...image.pixels, ...model.features.map((f) => f.name)
    .filter((n) => !image.pixels.includes(n))] : model.features.map((f) => f.name);
  for (const name of order) {
    const f = byName.get(name);
    if (!f) { form.append(el("span")); continue; }
    if (derived.has(f.name)) continue;
    let input;
    if (f.kind === "categorical") {
      input = el("select");
      for (const c of f.categories.slice(2)) { const o = el("option", c); o.value = c; input.append(o); }
      if (f.nullable) { const o = el("option", "(missing)"); o.value = "\u0000"; input.append(o); }
    } else if (f.kind === "boolean") {
      input = el("select");
      for (const v of ["true", "false"]) { const o = el("option", v); o.value = v; input.append(o); }
    } else {
      input = el("input"); input.type = "text"; input.inputMode = "decimal";
    }
    input.name = f.name; input.dataset.kind = f.kind;
    input.value = String(typicalValue(f));
    if (image) { input.title = f.name; form.append(input); } else form.append(el("label", f.name), input);
  }
  for (const d of model.datetime_columns) {
    const input = el("input"); input.name = d.name; input.dataset.kind = d.unit;
    input.value = d.unit === "iso" ? new Date().toISOString() : String(d.unit === "epoch_ms" ? Date.now() : Math.floor(Date.now() / 1000));
    form.append(el("label", d.name), input);
  }
  form.append(el("button", "Score"));
}

function formRecord() {
  const rec = {};
  for (const input of $("record").querySelectorAll("input, select")) {
    const k = input.dataset.kind, v = input.value.trim();
    if (v === "" || v === "\u0000") rec[input.name] = null;
    else if (k === "numeric" || k === "epoch_s" || k === "epoch_ms") rec[input.name] = Number(v);
    else if (k === "boolean") rec[input.name] = v === "true";
    else rec[input.name] = v;
  }
  return rec;
}

async function scoreForm() {
  const rec = formRecord(), box = $("verdict");
  try {
    const s = await api("/v1/score?explain=5", { records: [rec] });
    const r = s.results[0];
    box.replaceChildren(
      el("div", r.is_anomaly ? "Anomaly" : "Normal", `verdict ${r.is_anomaly ? "anomaly" : "normal"}`),
      el("div", `score ${fmt(r.score)} vs threshold ${fmt(r.threshold)} (${s.model.score_type}); ` +
        `percentile ${fmt(r.percentile)} among normal records`));
    for (const t of r.top_features) {
      let how = "";
      if (t.expected !== undefined) {
        how = t.range ? ` — ${fmt(t.value)}, expected ${fmt(t.expected)} (${fmt(t.range[0])}–${fmt(t.range[1])})`
          : ` — ${fmt(t.value)}, expected ${fmt(t.expected)} (p ${fmt(t.p)})`;
      }
      const pct = (100 * t.share).toFixed(t.share < 0.1 ? 1 : 0);
      box.append(bar(`${pct}% ${t.name}${how}`, t.share, true));
    }
    for (const u of r.unusual_values) box.append(el("div", `${u.field}: ${u.why}`, "cat"));
    if (state.map) {
      const e = await api("/v1/encode", { records: [rec] });
      state.posterior = e.results[0]; drawMap();
    }
  } catch (e) { box.replaceChildren(el("div", e.message, "verdict anomaly")); }
}

// ---------------------------------------------------------------- start

async function start() {
  status("loading…");
  try {
    state.model = await api("/v1/model");
    $("model").textContent = `${state.model.name} ${state.model.version}`;
    try {
      state.map = await api("/v1/map");
      const m = state.map;
      $("mapinfo").textContent = m.kind === "identity" ? "(the 2-D latent space)"
        : `(${m.latent}-D latent space, first two principal axes: ${Math.round(100 * (m.explained[0] + m.explained[1]))}% of its variance)`;
      legend(); drawMap(); requestDecode([0, 0]);
      if (!state.listening) { mapEvents(); state.listening = true; }
    } catch (e) { $("mapbox").replaceChildren(el("p", e.message)); }
    buildForm(state.model);
    status("");
  } catch (e) { status(e.message); }
}

$("keyform").addEventListener("submit", (ev) => {
  ev.preventDefault(); state.key = $("key").value.trim();
  sessionStorage.setItem("vae-anomaly-key", state.key); $("keyform").hidden = true;
  $("record").replaceChildren(); $("record").addEventListener("submit", (ev) => { ev.preventDefault(); scoreForm(); });
start();
});
$("record").addEventListener("submit", (ev) => { ev.preventDefault(); scoreForm(); });
start();
