// cotap web page: upload one or two images, ask the server for patch embeddings, prototype maps and
// correspondences as float16 safetensors, and draw them. Plain JavaScript, no build step, no
// dependencies. Shapes in comments: h x w patch grid, C channels, N items.
"use strict";

const SAFETENSORS = "application/x-safetensors";
const $ = (id) => document.getElementById(id);

const state = {
  files: { a: null, b: null }, // File
  bitmaps: { a: null, b: null }, // ImageBitmap, upright (EXIF applied, as the server does)
  result: null, // everything computed by run()
  selected: null, // [i, j] patch of A
  models: null,
  runId: 0, // the latest run; answers of older runs are dropped
};

// ---------------------------------------------------------------------------------------------
// safetensors: 8-byte little-endian header length, JSON header, then little-endian raw tensors.

const HALF = (() => {
  // float16 bits -> float32, for all 65536 values
  const table = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const s = h & 0x8000 ? -1 : 1;
    const e = (h >> 10) & 0x1f;
    const f = h & 0x3ff;
    if (e === 0) table[h] = s * Math.pow(2, -14) * (f / 1024);
    else if (e === 31) table[h] = f ? NaN : s * Infinity;
    else table[h] = s * Math.pow(2, e - 15) * (1 + f / 1024);
  }
  return table;
})();

function parseSafetensors(buffer) {
  const view = new DataView(buffer);
  const n = Number(view.getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 8, n)));
  const base = 8 + n;
  const tensors = {};
  for (const [name, t] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    const [start, end] = t.data_offsets;
    const bytes = buffer.slice(base + start, base + end); // copy: aligned for the typed arrays
    let data;
    switch (t.dtype) {
      case "F32": data = new Float32Array(bytes); break;
      case "F16": {
        const bits = new Uint16Array(bytes);
        data = new Float32Array(bits.length);
        for (let i = 0; i < bits.length; i++) data[i] = HALF[bits[i]];
        break;
      }
      case "I32": data = new Int32Array(bytes); break;
      case "I64": data = Float64Array.from(new BigInt64Array(bytes), Number); break;
      case "BOOL": case "U8": data = new Uint8Array(bytes); break;
      default: throw new Error(`unsupported tensor dtype ${t.dtype}`);
    }
    tensors[name] = { shape: t.shape, data };
  }
  const meta = {};
  for (const [k, v] of Object.entries(header.__metadata__ || {})) {
    try { meta[k] = JSON.parse(v); } catch { meta[k] = v; }
  }
  return { tensors, meta };
}

// Item i of output `name`: a row of the stacked tensor (N, ...), or its own `name.i`.
function item(tensors, name, i) {
  const stacked = tensors[name];
  if (stacked) {
    const shape = stacked.shape.slice(1);
    const size = shape.reduce((a, b) => a * b, 1);
    return { shape, data: stacked.data.subarray(i * size, (i + 1) * size) };
  }
  return tensors[`${name}.${i}`] || null;
}

function grid(meta, prefix, i) {
  return meta[`${prefix}grid`] || meta[`${prefix}grids`][i];
}

// ---------------------------------------------------------------------------------------------
// Requests

function headers() {
  const h = { Accept: SAFETENSORS };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function failure(response) {
  let text = `HTTP ${response.status}`;
  try {
    const err = (await response.json()).error;
    if (err) text = `${err.code}: ${err.message}`;
  } catch { /* not the envelope */ }
  if (response.status === 401) text += " (enter the server's API key above)";
  return new Error(text);
}

async function post(path, fields, params) {
  const body = new FormData();
  for (const [name, file] of fields) body.append(name, file, file.name || name);
  const query = new URLSearchParams(params);
  const model = $("model").value;
  if (model) query.set("model", model);
  const response = await fetch(`${path}?${query}`, { method: "POST", body, headers: headers() });
  if (!response.ok) throw await failure(response);
  return parseSafetensors(await response.arrayBuffer());
}

async function loadModels() {
  const info = $("model-info");
  try {
    const h = headers();
    delete h.Accept;
    const response = await fetch("/v1/models", { headers: h });
    if (!response.ok) throw await failure(response);
    state.models = await response.json();
    const select = $("model");
    select.innerHTML = "";
    for (const m of state.models.models) {
      const option = document.createElement("option");
      option.value = m.name;
      option.textContent = m.name + (m.name === state.models.default ? " (default)" : "");
      select.appendChild(option);
    }
    select.value = state.models.default || "";
    describeModel();
  } catch (e) {
    info.textContent = `models: ${e.message}`;
  }
}

function describeModel() {
  const m = state.models && state.models.models.find((x) => x.name === $("model").value);
  if (!m) return;
  const sizes = (m.input_sizes || []).map(([h, w]) => `${h}x${w}`).join(",");
  $("model-info").textContent =
    `${m.name} · ${m.arch} · patch ${m.patch_size} · ${m.embed_dim}-d · ${m.num_prototypes} prototypes · ` +
    `${sizes || "any size"} · ${m.backend}/${m.device} · bundle ${m.bundle_sha256.slice(0, 12)}`;
}

// ---------------------------------------------------------------------------------------------
// Maths on the patch grid

// Top-3 principal components of rows of X (n x c) by power iteration with deflation;
// returns the projections (n x 3).
function pca3(X, n, c) {
  const mean = new Float64Array(c);
  for (let r = 0; r < n; r++) for (let k = 0; k < c; k++) mean[k] += X[r * c + k];
  for (let k = 0; k < c; k++) mean[k] /= n;
  const Z = new Float64Array(n * c);
  for (let r = 0; r < n; r++) for (let k = 0; k < c; k++) Z[r * c + k] = X[r * c + k] - mean[k];
  const comps = [];
  const proj = new Float64Array(n * 3);
  const t = new Float64Array(n);
  for (let q = 0; q < 3; q++) {
    let v = new Float64Array(c);
    for (let k = 0; k < c; k++) v[k] = Math.sin(12.9898 * (k + 1) + 78.233 * (q + 1)); // fixed start
    for (let it = 0; it < 80; it++) {
      for (let r = 0; r < n; r++) { // t = Z v
        let s = 0;
        for (let k = 0; k < c; k++) s += Z[r * c + k] * v[k];
        t[r] = s;
      }
      const w = new Float64Array(c); // w = Z^T t = (Z^T Z) v
      for (let r = 0; r < n; r++) { const tr = t[r]; for (let k = 0; k < c; k++) w[k] += Z[r * c + k] * tr; }
      for (const u of comps) { // stay orthogonal to the components found
        let d = 0;
        for (let k = 0; k < c; k++) d += w[k] * u[k];
        for (let k = 0; k < c; k++) w[k] -= d * u[k];
      }
      let norm = 0;
      for (let k = 0; k < c; k++) norm += w[k] * w[k];
      norm = Math.sqrt(norm);
      if (norm < 1e-12) break;
      for (let k = 0; k < c; k++) w[k] /= norm;
      v = w;
    }
    comps.push(v);
    for (let r = 0; r < n; r++) {
      let s = 0;
      for (let k = 0; k < c; k++) s += Z[r * c + k] * v[k];
      proj[r * 3 + q] = s;
    }
  }
  return proj;
}

// Projections (n x 3) -> RGB bytes, each component stretched between its 2nd and 98th percentile.
function toRGB(proj, n) {
  const rgb = new Uint8ClampedArray(n * 3);
  for (let q = 0; q < 3; q++) {
    const col = Array.from({ length: n }, (_, r) => proj[r * 3 + q]).sort((a, b) => a - b);
    const lo = col[Math.floor(0.02 * (n - 1))];
    const hi = col[Math.ceil(0.98 * (n - 1))];
    const span = hi - lo || 1;
    for (let r = 0; r < n; r++) rgb[r * 3 + q] = Math.round(255 * Math.min(1, Math.max(0, (proj[r * 3 + q] - lo) / span)));
  }
  return rgb;
}

// The same colours as cotap.client.plots.prototype_colour.
function protoColour(i) {
  const h = (i * 0.6180339887498949) % 1;
  const s = 0.55 + 0.45 * ((i % 3) / 2);
  const v = 0.95 - 0.2 * (Math.floor(i / 3) % 2);
  return hsv(h, s, v);
}

function hsv(h, s, v) {
  const i = Math.floor(h * 6);
  const f = h * 6 - i;
  const p = v * (1 - s), q = v * (1 - s * f), t = v * (1 - s * (1 - f));
  const [r, g, b] = [[v, t, p], [q, v, p], [p, v, t], [p, q, v], [t, p, v], [v, p, q]][i % 6];
  return [Math.floor(r * 255 + 0.5), Math.floor(g * 255 + 0.5), Math.floor(b * 255 + 0.5)];
}

// A perceptual-ish dark-to-bright colour map for similarities in [0, 1].
const HEAT = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];
function heatColour(x) {
  const t = Math.min(1, Math.max(0, x)) * (HEAT.length - 1);
  const i = Math.min(HEAT.length - 2, Math.floor(t));
  const f = t - i;
  return HEAT[i].map((a, k) => Math.round(a + f * (HEAT[i + 1][k] - a)));
}

// ---------------------------------------------------------------------------------------------
// Drawing

const VIEW = 300; // longer side of each view, in CSS pixels

function viewSize(bitmap) {
  const scale = VIEW / Math.max(bitmap.width, bitmap.height);
  return [Math.round(bitmap.width * scale), Math.round(bitmap.height * scale)];
}

function setup(canvas, w, h) {
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.imageSmoothingEnabled = true;
  return ctx;
}

// A (gh x gw) grid of RGB bytes as a canvas of that many pixels (to be scaled up without smoothing).
function gridCanvas(rgb, gh, gw, alpha = 255) {
  const c = document.createElement("canvas");
  c.width = gw;
  c.height = gh;
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(gw, gh);
  for (let p = 0; p < gh * gw; p++) {
    img.data[p * 4] = rgb[p * 3];
    img.data[p * 4 + 1] = rgb[p * 3 + 1];
    img.data[p * 4 + 2] = rgb[p * 3 + 2];
    img.data[p * 4 + 3] = alpha;
  }
  ctx.putImageData(img, 0, 0);
  return c;
}

function drawGrid(ctx, rgb, g, x, y, w, h, alpha) {
  ctx.save();
  ctx.globalAlpha = alpha;
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(gridCanvas(rgb, g[0], g[1]), x, y, w, h);
  ctx.restore();
}

function drawPCA(key) {
  const r = state.result;
  const it = r.items[key];
  const [w, h] = viewSize(state.bitmaps[key]);
  const ctx = setup($(`pca-${key}`), w, h);
  drawGrid(ctx, it.pcaRGB, it.grid, 0, 0, w, h, 1);
}

function drawPrototypes(key) {
  const r = state.result;
  const it = r.items[key];
  const [w, h] = viewSize(state.bitmaps[key]);
  const ctx = setup($(`proto-${key}`), w, h);
  ctx.drawImage(state.bitmaps[key], 0, 0, w, h);
  const n = it.grid[0] * it.grid[1];
  const rgb = new Uint8ClampedArray(n * 3);
  const counts = new Map();
  for (let p = 0; p < n; p++) {
    const id = it.ids[p];
    rgb.set(protoColour(id), p * 3);
    counts.set(id, (counts.get(id) || 0) + 1);
  }
  drawGrid(ctx, rgb, it.grid, 0, 0, w, h, Number($("alpha").value) / 100);
  const legend = $(`legend-${key}`);
  legend.innerHTML = "";
  const top = [...counts.entries()].sort((a, b) => b[1] - a[1] || a[0] - b[0]).slice(0, 12);
  for (const [id, count] of top) {
    const li = document.createElement("li");
    li.className = "legend-item";
    li.dataset.prototype = id;
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = `rgb(${protoColour(id).join(",")})`;
    li.append(sw, `#${id} ${Math.round((100 * count) / n)}%`);
    legend.appendChild(li);
  }
}

// Layout of the side-by-side correspondence view: both images at the same height.
function corrLayout() {
  const H = 240, gap = 12;
  const [a, b] = [state.bitmaps.a, state.bitmaps.b];
  const wa = Math.round((a.width * H) / a.height), wb = Math.round((b.width * H) / b.height);
  return { H, gap, wa, wb, W: wa + gap + wb };
}

function centre(g, i, j, w, h) {
  return [((j + 0.5) * w) / g[1], ((i + 0.5) * h) / g[0]];
}

function drawCorrespondences() {
  const r = state.result;
  const L = corrLayout();
  const ctx = setup($("corr"), L.W, L.H);
  ctx.drawImage(state.bitmaps.a, 0, 0, L.wa, L.H);
  ctx.drawImage(state.bitmaps.b, L.wa + L.gap, 0, L.wb, L.H);
  const { match, score, mutual, sg, tg } = r.corr;
  const mutualOnly = $("mutual-only").checked;
  let shown = 0;
  ctx.lineWidth = 1.5;
  for (let i = 0; i < sg[0]; i++) {
    for (let j = 0; j < sg[1]; j++) {
      const p = i * sg[1] + j;
      if (match[p] < 0 || (mutualOnly && !mutual[p])) continue;
      const ti = Math.floor(match[p] / tg[1]), tj = match[p] % tg[1];
      const [x0, y0] = centre(sg, i, j, L.wa, L.H);
      const [x1, y1] = centre(tg, ti, tj, L.wb, L.H);
      const c = hsv((0.8 * (x0 / L.wa) + 0.2 * (y0 / L.H)) % 1, 0.85, 0.6 + 0.4 * (1 - y0 / L.H));
      ctx.strokeStyle = `rgba(${c.join(",")},0.85)`;
      ctx.beginPath();
      ctx.moveTo(x0, y0);
      ctx.lineTo(x1 + L.wa + L.gap, y1);
      ctx.stroke();
      shown++;
    }
  }
  const [i, j] = state.selected;
  const cellW = L.wa / sg[1], cellH = L.H / sg[0];
  ctx.strokeStyle = "#ffffff";
  ctx.lineWidth = 2;
  ctx.strokeRect(j * cellW, i * cellH, cellW, cellH);
  const kind = mutualOnly ? "mutual matches" : "best matches";
  let scores = 0, nm = 0;
  for (let p = 0; p < score.length; p++) if (mutual[p]) { scores += score[p]; nm++; }
  $("corr-caption").textContent =
    `${shown} ${kind} of ${sg[0] * sg[1]} patches` + (nm ? `, mutual mean score ${(scores / nm).toFixed(3)}` : "");
}

function drawHeat() {
  const r = state.result;
  const a = r.items.a, b = r.items.b;
  const [i, j] = state.selected;
  const c = a.dim;
  const src = a.patch.subarray((i * a.grid[1] + j) * c, (i * a.grid[1] + j + 1) * c);
  const n = b.grid[0] * b.grid[1];
  const sims = new Float32Array(n);
  let best = 0;
  for (let p = 0; p < n; p++) { // cosine: the embeddings come L2-normalised
    let s = 0;
    for (let k = 0; k < c; k++) s += src[k] * b.patch[p * c + k];
    sims[p] = s;
    if (s > sims[best]) best = p;
  }
  let lo = Infinity, hi = -Infinity;
  for (const s of sims) { lo = Math.min(lo, s); hi = Math.max(hi, s); }
  const rgb = new Uint8ClampedArray(n * 3);
  for (let p = 0; p < n; p++) rgb.set(heatColour((sims[p] - lo) / (hi - lo || 1)), p * 3);
  const [w, h] = viewSize(state.bitmaps.b);
  const canvas = $("heat");
  const ctx = setup(canvas, w, h);
  ctx.drawImage(state.bitmaps.b, 0, 0, w, h);
  drawGrid(ctx, rgb, b.grid, 0, 0, w, h, 0.7);
  const bi = Math.floor(best / b.grid[1]), bj = best % b.grid[1];
  const [x, y] = centre(b.grid, bi, bj, w, h);
  ctx.strokeStyle = "#ffffff";
  ctx.lineWidth = 2;
  ctx.beginPath();
  ctx.arc(x, y, Math.max(5, w / b.grid[1] / 2), 0, 2 * Math.PI);
  ctx.stroke();
  canvas.dataset.selected = `${i},${j}`;
  canvas.dataset.best = `${bi},${bj}`;
  $("heat-caption").textContent =
    `similarity of A patch (${i}, ${j}) to every patch of B: best (${bi}, ${bj}) at ${sims[best].toFixed(3)}`;
}

function drawAll() {
  if (!state.result) return;
  const keys = state.result.items.b ? ["a", "b"] : ["a"];
  for (const k of keys) { drawPCA(k); drawPrototypes(k); }
  if (state.result.corr) { drawCorrespondences(); drawHeat(); }
}

// Click on a view of A: select the patch under the pointer.
function pick(event) {
  if (!state.result) return;
  const canvas = event.currentTarget;
  const rect = canvas.getBoundingClientRect();
  let x = ((event.clientX - rect.left) * canvas.width) / rect.width;
  const y = ((event.clientY - rect.top) * canvas.height) / rect.height;
  let w = canvas.width;
  if (canvas.id === "corr") {
    const L = corrLayout();
    if (x > L.wa) return; // a click on B
    w = L.wa;
  }
  const g = state.result.items.a.grid;
  const i = Math.min(g[0] - 1, Math.max(0, Math.floor((y / canvas.height) * g[0])));
  const j = Math.min(g[1] - 1, Math.max(0, Math.floor((x / w) * g[1])));
  state.selected = [i, j];
  if (state.result.corr) { drawCorrespondences(); drawHeat(); }
}

// ---------------------------------------------------------------------------------------------
// The run: three requests side by side, then the drawings.

function setStatus(text, kind) {
  const s = $("status");
  s.textContent = text;
  s.dataset.state = kind;
}

async function run() {
  const { a, b } = state.files;
  if (!a) { setStatus("Choose image A first.", "idle"); return; }
  const runId = ++state.runId;
  $("run").disabled = true;
  setStatus("Asking the server…", "running");
  const t0 = performance.now();
  try {
    const images = b ? [["image", a], ["image", b]] : [["image", a]];
    const requests = [
      post("/v1/embed", images, { outputs: "patch", normalize: "true" }),
      post("/v1/prototypes", images, { top_k: "1" }),
    ];
    if (b) requests.push(post("/v1/correspond", [["source", a], ["target", b]], {}));
    const bitmaps = Promise.all( // undefined: a file the browser cannot draw (the server decides)
      [a, b].map((f) => (f ? createImageBitmap(f, { imageOrientation: "from-image" }).catch(() => undefined) : null)),
    );
    const [[emb, proto, corr], [bitmapA, bitmapB]] = await Promise.all([Promise.all(requests), bitmaps]);
    if (runId !== state.runId) return; // a newer run has started: its answers win
    if (bitmapA === undefined || bitmapB === undefined) throw new Error("this browser cannot display the image");
    [state.bitmaps.a, state.bitmaps.b] = [bitmapA, bitmapB];

    const keys = b ? ["a", "b"] : ["a"];
    const items = {};
    keys.forEach((k, i) => {
      const patch = item(emb.tensors, "patch", i); // (h, w, C)
      const ids = item(proto.tensors, "prototype_id", i); // (h, w)
      items[k] = { patch: patch.data, grid: grid(emb.meta, "", i), dim: patch.shape[2], ids: ids.data };
    });
    // One PCA over the patches of A and B, so that colours are comparable across the two.
    const c = items.a.dim;
    const counts = keys.map((k) => items[k].grid[0] * items[k].grid[1]);
    const total = counts.reduce((x, y) => x + y, 0);
    const X = new Float32Array(total * c);
    let off = 0;
    for (const k of keys) { X.set(items[k].patch, off * c); off += items[k].grid[0] * items[k].grid[1]; }
    const rgb = toRGB(pca3(X, total, c), total);
    off = 0;
    keys.forEach((k, i) => { items[k].pcaRGB = rgb.subarray(off * 3, (off + counts[i]) * 3); off += counts[i]; });

    state.result = { items, model: emb.meta.model, bundle: emb.meta.bundle_sha256 };
    if (corr) {
      state.result.corr = {
        match: item(corr.tensors, "match", 0).data,
        score: item(corr.tensors, "score", 0).data,
        mutual: item(corr.tensors, "mutual", 0).data,
        sg: grid(corr.meta, "source_", 0),
        tg: grid(corr.meta, "target_", 0),
      };
    }
    const g = items.a.grid;
    state.selected = [Math.floor(g[0] / 2), Math.floor(g[1] / 2)];
    document.body.classList.toggle("no-b", !b);
    $("results").hidden = false;
    drawAll();
    const ms = Math.round(performance.now() - t0);
    setStatus(
      `Done in ${ms} ms · model ${emb.meta.model} · bundle ${String(emb.meta.bundle_sha256).slice(0, 12)} · ` +
        `grid ${g[0]}x${g[1]}` + (b ? " · click a patch of A to see its similarity in B" : ""),
      "done",
    );
  } catch (e) {
    if (runId === state.runId) setStatus(`Failed: ${e.message}`, "error");
  } finally {
    if (runId === state.runId) $("run").disabled = false;
  }
}

function choose(key, file) {
  state.files[key] = file || null;
  $(`name-${key}`).textContent = file ? `${file.name} (${Math.round(file.size / 1024)} KiB)` : "";
  if (state.files.a) run();
}

function init() {
  for (const key of ["a", "b"]) {
    const input = $(`file-${key}`);
    input.addEventListener("change", () => choose(key, input.files[0]));
    const drop = $(`drop-${key}`);
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      if (e.dataTransfer.files[0]) choose(key, e.dataTransfer.files[0]);
    });
  }
  for (const id of ["pca-a", "proto-a", "corr"]) $(id).addEventListener("click", pick);
  $("run").addEventListener("click", run);
  $("alpha").addEventListener("input", () => state.result && ["a", "b"].forEach((k) => state.result.items[k] && drawPrototypes(k)));
  $("mutual-only").addEventListener("change", () => state.result && state.result.corr && drawCorrespondences());
  $("model").addEventListener("change", () => { describeModel(); if (state.files.a) run(); });
  const key = $("api-key");
  key.value = sessionStorage.getItem("cotap-api-key") || "";
  key.addEventListener("change", () => { sessionStorage.setItem("cotap-api-key", key.value); loadModels(); });
  loadModels();
}

document.addEventListener("DOMContentLoaded", init);
