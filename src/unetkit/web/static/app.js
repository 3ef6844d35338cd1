// unetkit web page: plain JavaScript, no build step, nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, segmented: [], edits: new Map(), current: null };

// ---------- small helpers ----------
async function api(path, options = {}) {
  const response = await fetch(path, options);
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : await response.arrayBuffer();
  if (!response.ok) {
    const message = body && body.error ? body.error
      : body && body.detail ? JSON.stringify(body.detail) : `HTTP ${response.status}`;
    throw new Error(message);
  }
  return body;
}
const postJSON = (path, data) => api(path, {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(data),
});
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}
function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`cannot load ${url}`));
    img.src = url;
  });
}
function colour(label) {  // a stable, well-spread colour per object label
  const h = (label * 137.508) % 360;
  const s = 0.75, l = 0.55, a = s * Math.min(l, 1 - l);
  const f = (n) => { const k = (n + h / 30) % 12; return l - a * Math.max(-1, Math.min(k - 3, 9 - k, 1)); };
  return [f(0) * 255, f(8) * 255, f(4) * 255];
}
function fillSelect(select, models, kind) {
  const keep = select.value;
  select.replaceChildren(...models.filter((m) => m.kind === kind)
    .map((m) => el("option", { value: m.id }, m.name)));
  if ([...select.options].some((o) => o.value === keep)) select.value = keep;
}

// ---------- jobs: start, poll, cancel ----------
async function runJob(kind, payload, ui) {
  ui.error.textContent = "";
  ui.progress.value = 0;
  ui.stage.textContent = "queued";
  const { id } = await postJSON(`/api/jobs/${kind}`, payload);
  ui.cancel.disabled = false;
  ui.cancel.onclick = () => postJSON(`/api/jobs/${id}/cancel`, {});
  try {
    for (;;) {
      const job = await api(`/api/jobs/${id}`);
      ui.progress.max = Math.max(job.total, 1);
      ui.progress.value = job.done;
      ui.stage.textContent = `${job.state}${job.stage ? ": " + job.stage : ""}` +
        (job.total ? ` (${job.done}/${job.total})` : "");
      if (ui.onPoll) ui.onPoll(job);
      if (job.state === "done") return job;
      if (job.state === "failed") throw new Error(job.error);
      if (job.state === "cancelled") return null;
      await new Promise((r) => setTimeout(r, 250));
    }
  } finally {
    ui.cancel.disabled = true;
  }
}

// ---------- tabs and start-up ----------
for (const tab of document.querySelectorAll(".tab")) {
  tab.onclick = () => {
    document.querySelectorAll(".tab, .screen").forEach((n) => n.classList.remove("active"));
    tab.classList.add("active");
    $(tab.dataset.screen).classList.add("active");
  };
}
async function refreshModels() {
  state.info = await api("/api/info");
  fillSelect($("seg-model"), state.info.models, "segment");
  fillSelect($("gen-model"), state.info.models, "diffusion");
}
refreshModels().then(() => {
  $("gen-sampler").replaceChildren(...state.info.samplers.map((s) => el("option", { value: s }, s)));
  $("gen-sampler").value = state.info.samplers.includes("ddim") ? "ddim" : state.info.samplers[0];
  document.body.dataset.ready = "1";
}).catch((e) => { $("seg-error").textContent = e.message; });

// ---------- Segment ----------
let chosen = [];
function choose(files) {
  chosen = [...files];
  $("seg-chosen").textContent = chosen.map((f) => f.name).join(", ");
}
$("seg-files").onchange = (e) => choose(e.target.files);
const drop = $("drop");
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); choose(e.dataTransfer.files); };

async function upload(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  return api("/api/images", { method: "POST", body: form });
}
const segUI = { error: $("seg-error"), progress: $("seg-progress"), stage: $("seg-stage"), cancel: $("seg-cancel") };
$("seg-run").onclick = async () => {
  $("seg-run").disabled = true;
  try {
    if (!chosen.length) throw new Error("choose or drop one or more PNG/TIFF images first");
    const images = [];
    for (const f of chosen) { segUI.stage.textContent = `uploading ${f.name}`; images.push(await upload(f)); }
    const tile = $("seg-tile").value ? Number($("seg-tile").value) : null;
    const model = $("seg-model").value;
    const job = await runJob("segment", { model, images: images.map((i) => i.id), tile }, segUI);
    if (job) showSegmentation(job, $("seg-results"), model);
  } catch (e) {
    segUI.error.textContent = e.message;
  } finally {
    $("seg-run").disabled = false;
  }
};

function showSegmentation(job, target, model) {
  target.replaceChildren();
  job.result.images.forEach((r, index) => {
    target.append(resultCard(job.id, index, r));
    const entry = { job: job.id, index, image: r.image, model, count: r.count };
    state.segmented.push(entry);
    $("cor-image").append(el("option", { value: String(state.segmented.length - 1) },
      `${r.image.name} (${r.count} objects)`));
  });
  if (!state.current && state.segmented.length) {  // the Correct screen opens the first one
    $("cor-image").value = "0";
    openForCorrection(0);
  }
}

function resultCard(jobId, index, r) {
  const base = `/api/jobs/${jobId}/files/${index}/`;
  const canvas = el("canvas", { class: "overlay" });
  loadImage(base + "overlay.png").then((img) => drawNumbered(canvas, img, r.table));
  const links = el("div", { class: "downloads" });
  for (const [name, title] of Object.entries(r.files)) {
    links.append(el("a", { href: base + name, download: `${r.image.name.replace(/\.[^.]*$/, "")}_${name}` }, title));
  }
  const count = el("span", { class: "count" }, String(r.count));
  return el("div", { class: "result" }, el("h3", {}, r.image.name),
    el("div", { class: "body" }, canvas, el("div", { class: "side" },
      el("div", { class: "count-line" }, count, r.count === 1 ? " object" : " objects"), links, objectTable(r.table))));
}

function drawNumbered(canvas, img, table) {
  canvas.width = img.width; canvas.height = img.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const size = Math.max(9, Math.min(18, Math.round(Math.sqrt(img.width * img.height) / 40)));
  ctx.font = `bold ${size}px sans-serif`;
  ctx.textAlign = "center"; ctx.textBaseline = "middle";
  ctx.lineWidth = 3; ctx.strokeStyle = "#000"; ctx.fillStyle = "#fff";
  for (const row of table) {
    ctx.strokeText(String(row.label), row.centroid_x, row.centroid_y);
    ctx.fillText(String(row.label), row.centroid_x, row.centroid_y);
  }
}

function objectTable(rows) {
  const columns = rows.length ? Object.keys(rows[0]) : ["label", "area"];
  const table = el("table", { class: "objects" });
  const head = el("tr", {}, ...columns.map((c) => el("th", { "data-col": c }, c)));
  const body = el("tbody");
  const fmt = (v) => (typeof v === "number" && !Number.isInteger(v) ? v.toFixed(2) : String(v));
  const render = (data) => body.replaceChildren(...data.map((row) =>
    el("tr", {}, ...columns.map((c) => el("td", {}, fmt(row[c]))))));
  let sortBy = null, ascending = true;
  head.onclick = (e) => {
    const col = e.target.dataset.col;
    if (!col) return;
    ascending = sortBy === col ? !ascending : true;
    sortBy = col;
    head.querySelectorAll("th").forEach((th) => th.classList.remove("asc", "desc"));
    e.target.classList.add(ascending ? "asc" : "desc");
    render([...rows].sort((a, b) => (a[col] - b[col]) * (ascending ? 1 : -1)));
  };
  render(rows);
  table.append(el("thead", {}, head), body);
  return el("div", { class: "table-wrap" }, table);
}

// ---------- Correct: paint labels on a canvas ----------
const cor = { canvas: $("cor-canvas"), pixels: null, labels: null, w: 0, h: 0, label: 1,
  undo: [], mergeFirst: 0, painting: false };

$("cor-image").onchange = () => openForCorrection(Number($("cor-image").value));
async function openForCorrection(i) {
  const entry = state.segmented[i];
  if (!entry) return;
  state.current = entry;
  const img = await loadImage(`/api/images/${entry.image.id}/preview.png`);
  let labels = state.edits.get(entry.image.id);
  if (!labels) {
    labels = new Int32Array(await api(`/api/jobs/${entry.job}/labels/${entry.index}`));
    state.edits.set(entry.image.id, labels);
  }
  const off = el("canvas"); off.width = img.width; off.height = img.height;
  const octx = off.getContext("2d"); octx.drawImage(img, 0, 0);
  Object.assign(cor, { w: img.width, h: img.height, labels, undo: [], mergeFirst: 0,
    pixels: octx.getImageData(0, 0, img.width, img.height) });
  cor.canvas.width = img.width; cor.canvas.height = img.height;
  cor.label = maxLabel() + 1;
  renderCorrection();
}
function maxLabel() { let m = 0; for (const v of cor.labels) if (v > m) m = v; return m; }
function renderCorrection() {
  if (!cor.labels) return;
  const { w, h, labels } = cor;
  const out = new ImageData(w, h), src = cor.pixels.data, dst = out.data;
  const seen = new Set();
  for (let p = 0; p < w * h; p++) {
    const v = labels[p], o = 4 * p;
    dst[o] = src[o]; dst[o + 1] = src[o + 1]; dst[o + 2] = src[o + 2]; dst[o + 3] = 255;
    if (v > 0) {
      seen.add(v);
      const x = p % w, edge = (x > 0 && labels[p - 1] !== v) || (x < w - 1 && labels[p + 1] !== v) ||
        (p >= w && labels[p - w] !== v) || (p < w * (h - 1) && labels[p + w] !== v);
      const [r, g, b] = edge ? [255, 230, 0] : colour(v);
      const a = edge ? 1 : 0.45;
      dst[o] = dst[o] * (1 - a) + r * a; dst[o + 1] = dst[o + 1] * (1 - a) + g * a;
      dst[o + 2] = dst[o + 2] * (1 - a) + b * a;
    }
  }
  cor.canvas.getContext("2d").putImageData(out, 0, 0);
  $("cor-count").textContent = String(seen.size);
  $("cor-label").textContent = String(cor.label);
}
const tool = () => document.querySelector("input[name=tool]:checked").value;
function canvasPoint(e) {
  const r = cor.canvas.getBoundingClientRect();
  return [Math.floor((e.clientX - r.left) * cor.w / r.width), Math.floor((e.clientY - r.top) * cor.h / r.height)];
}
function stamp(x, y, value) {
  const rad = Number($("cor-size").value) / 2;
  for (let yy = Math.max(0, Math.floor(y - rad)); yy <= Math.min(cor.h - 1, y + rad); yy++) {
    for (let xx = Math.max(0, Math.floor(x - rad)); xx <= Math.min(cor.w - 1, x + rad); xx++) {
      if ((xx - x) ** 2 + (yy - y) ** 2 <= rad * rad) cor.labels[yy * cor.w + xx] = value;
    }
  }
}
function replaceLabel(from, to) {
  for (let p = 0; p < cor.labels.length; p++) if (cor.labels[p] === from) cor.labels[p] = to;
}
cor.canvas.onpointerdown = (e) => {
  if (!cor.labels) return;
  const [x, y] = canvasPoint(e), hit = cor.labels[y * cor.w + x], t = tool();
  cor.undo.push(cor.labels.slice());
  if (t === "pick") { if (hit) cor.label = hit; cor.undo.pop(); }
  else if (t === "delete") { if (hit) replaceLabel(hit, 0); }
  else if (t === "merge") {
    if (!hit) { cor.undo.pop(); }
    else if (!cor.mergeFirst) { cor.mergeFirst = hit; cor.undo.pop(); }
    else { if (hit !== cor.mergeFirst) replaceLabel(hit, cor.mergeFirst); cor.mergeFirst = 0; }
  } else {
    cor.painting = true;
    cor.canvas.setPointerCapture(e.pointerId);
    stamp(x, y, t === "eraser" ? 0 : cor.label);
  }
  renderCorrection();
};
cor.canvas.onpointermove = (e) => {
  if (!cor.painting) return;
  const [x, y] = canvasPoint(e);
  stamp(x, y, tool() === "eraser" ? 0 : cor.label);
  renderCorrection();
};
cor.canvas.onpointerup = () => { cor.painting = false; };
$("cor-new").onclick = () => { if (cor.labels) { cor.label = maxLabel() + 1; renderCorrection(); } };
$("cor-undo").onclick = () => {
  const last = cor.undo.pop();
  if (last) { cor.labels.set(last); renderCorrection(); }
};

// ---------- Fine-tune ----------
const ftUI = { error: $("ft-error"), progress: $("ft-progress"), stage: $("ft-stage"), cancel: $("ft-cancel"),
  onPoll: (job) => drawLoss(job.losses) };
function drawLoss(losses) {
  const c = $("ft-loss"), ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  if (!losses.length) return;
  $("ft-loss-text").textContent = losses[losses.length - 1].toFixed(4);
  const lo = Math.min(...losses), hi = Math.max(...losses), span = hi - lo || 1;
  ctx.strokeStyle = "#2f6fde"; ctx.lineWidth = 2; ctx.beginPath();
  losses.forEach((v, i) => {
    const x = 4 + (c.width - 8) * (losses.length > 1 ? i / (losses.length - 1) : 0);
    const y = c.height - 4 - (c.height - 8) * (v - lo) / span;
    if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
  });
  ctx.stroke();
}
$("ft-run").onclick = async () => {
  const entry = state.current;
  $("ft-run").disabled = true;
  try {
    if (!entry) throw new Error("segment an image first, then correct it here");
    const edited = state.segmented.filter((s) => s.model === entry.model && state.edits.has(s.image.id));
    for (const s of edited) {
      await api(`/api/images/${s.image.id}/labels`, { method: "POST", body: state.edits.get(s.image.id).buffer });
    }
    // the model's own result before the correction, to show what fine-tuning changed
    const before = new Int32Array(await api(`/api/jobs/${entry.job}/labels/${entry.index}`));
    const job = await runJob("finetune", { model: entry.model, images: edited.map((s) => s.image.id),
      steps: Number($("ft-steps").value) }, ftUI);
    if (!job) return;
    await refreshModels();
    const k = edited.findIndex((s) => s.image.id === entry.image.id);
    const after = new Int32Array(await api(`/api/jobs/${job.id}/labels/${k}`));
    let changed = 0;
    for (let p = 0; p < after.length; p++) if ((after[p] > 0) !== (before[p] > 0)) changed++;
    const r = job.result.images[k];
    $("ft-result").replaceChildren(
      el("p", {}, `Re-segmented with the new model "${job.result.model.name}": `,
        el("b", { id: "ft-count" }, String(r.count)), " objects; ",
        el("b", { id: "ft-changed" }, String(changed)), " pixels changed (object vs background) from the first result."),
      resultCard(job.id, k, r));
  } catch (e) {
    ftUI.error.textContent = e.message;
  } finally {
    $("ft-run").disabled = false;
  }
};

// ---------- Generate and inpaint ----------
const genUI = { error: $("gen-error"), progress: $("gen-progress"), stage: $("gen-stage"), cancel: $("gen-cancel") };
function sampling() {
  return { model: $("gen-model").value, prompt: $("gen-prompt").value, n: Number($("gen-n").value),
    steps: Number($("gen-steps").value), guidance: Number($("gen-guidance").value),
    seed: Number($("gen-seed").value), sampler: $("gen-sampler").value };
}
async function sample(kind, payload, button) {
  button.disabled = true;
  try {
    const job = await runJob(kind, payload, genUI);
    if (!job) return;
    $("gen-grid").replaceChildren(...job.result.samples.map((name) =>
      el("a", { href: `/api/jobs/${job.id}/files/${name}`, download: name },
        el("img", { class: "sample", src: `/api/jobs/${job.id}/files/${name}`, alt: name }))));
  } catch (e) {
    genUI.error.textContent = e.message;
  } finally {
    button.disabled = false;
  }
}
$("gen-run").onclick = () => sample("generate", sampling(), $("gen-run"));

const inp = { canvas: $("inp-canvas"), image: null, info: null, mask: null, painting: false };
$("inp-file").onchange = async (e) => {
  genUI.error.textContent = "";
  try {
    inp.info = await upload(e.target.files[0]);
    inp.image = await loadImage(`/api/images/${inp.info.id}/preview.png`);
    inp.canvas.width = inp.info.width; inp.canvas.height = inp.info.height;
    inp.mask = new Uint8Array(inp.info.width * inp.info.height);
    renderInpaint();
  } catch (err) { genUI.error.textContent = err.message; }
};
function renderInpaint() {
  const ctx = inp.canvas.getContext("2d");
  ctx.drawImage(inp.image, 0, 0);
  const data = ctx.getImageData(0, 0, inp.canvas.width, inp.canvas.height);
  for (let p = 0; p < inp.mask.length; p++) {
    if (inp.mask[p]) { data.data[4 * p] = 230; data.data[4 * p + 1] *= 0.4; data.data[4 * p + 2] *= 0.4; }
  }
  ctx.putImageData(data, 0, 0);
}
function brushMask(e) {
  const r = inp.canvas.getBoundingClientRect(), w = inp.canvas.width, h = inp.canvas.height;
  const x = (e.clientX - r.left) * w / r.width, y = (e.clientY - r.top) * h / r.height;
  const rad = Number($("inp-size").value) / 2;
  for (let yy = Math.max(0, Math.floor(y - rad)); yy <= Math.min(h - 1, y + rad); yy++) {
    for (let xx = Math.max(0, Math.floor(x - rad)); xx <= Math.min(w - 1, x + rad); xx++) {
      if ((xx - x) ** 2 + (yy - y) ** 2 <= rad * rad) inp.mask[yy * w + xx] = 1;
    }
  }
  renderInpaint();
}
inp.canvas.onpointerdown = (e) => {
  if (!inp.mask) return;
  inp.painting = true; inp.canvas.setPointerCapture(e.pointerId); brushMask(e);
};
inp.canvas.onpointermove = (e) => { if (inp.painting) brushMask(e); };
inp.canvas.onpointerup = () => { inp.painting = false; };
$("inp-clear").onclick = () => { if (inp.mask) { inp.mask.fill(0); renderInpaint(); } };
$("inp-run").onclick = async () => {
  try {
    if (!inp.info) throw new Error("choose an image to inpaint first");
    await api(`/api/images/${inp.info.id}/mask`, { method: "POST", body: inp.mask.buffer });
  } catch (e) { genUI.error.textContent = e.message; return; }
  sample("inpaint", { ...sampling(), image: inp.info.id }, $("inp-run"));
};
