// medfound viewer: plain JS, no build step. Talks to the JSON API of `medfound serve`.
"use strict";
const $ = (id) => document.getElementById(id);
const COLOURS = [[0,0,0],[230,25,75],[60,180,75],[255,225,25],[0,130,200],[245,130,48],[145,30,180],[70,240,240],[240,50,230],[210,245,60],[250,190,212]];
let study = null, slice = 0, points = [], drag = null, imgEl = null, maskData = null, busy = false;

function status(msg, error = false) { const s = $("status"); s.textContent = msg; s.className = error ? "error" : ""; }
// State-changing requests carry the page's token: a page from another origin cannot read it.
const TOKEN = document.querySelector('meta[name="medfound-token"]')?.content || "";
async function api(path, opts = {}) {
  opts.headers = {...(opts.headers || {}), "x-medfound-token": TOKEN};
  const r = await fetch(path, opts);
  const body = r.headers.get("content-type")?.includes("json") ? await r.json() : null;
  if (!r.ok) throw new Error(body?.detail || r.statusText);
  return body;
}
function post(path, obj) { return api(path, {method: "POST", headers: {"content-type": "application/json"}, body: JSON.stringify(obj)}); }

async function loadResources() {
  const res = await api("/api/resources");
  $("support").innerHTML = res.supports.map((s) => `<option>${s}</option>`).join("");
  $("model").innerHTML = res.models.map((s) => `<option>${s}</option>`).join("");
  $("model-section").style.display = res.models.length ? "" : "none";
  $("sam-note").textContent = `SAM: ${res.sam}`;
  $("pacs-box").hidden = !res.pacs;
}

function setStudy(info) {
  study = info; slice = Math.floor(info.slices / 2); points = [];
  $("slice").max = info.slices - 1; $("slice").value = slice;
  $("preset").innerHTML = Object.keys(info.presets).map((p) => `<option>${p}</option>`).join("");
  $("study-info").textContent = `${info.modality} ${info.format}, ${info.shape.join("×")} @ ${info.spacing.map((s) => s.toFixed(2)).join("×")} mm`;
  $("download").href = `/api/studies/${info.id}/download?format=nifti`;
  $("download-seg").href = `/api/studies/${info.id}/download?format=dicom-seg`;
  showVolumes(info.volumes_ml);
  refresh();
}

function showVolumes(v) {
  $("volumes").querySelector("tbody").innerHTML = Object.entries(v).map(([k, ml]) => `<tr><td>${k}</td><td>${ml}</td></tr>`).join("");
}

async function refresh() {
  if (!study) return;
  $("slice-label").textContent = `${slice + 1}/${study.slices}`;
  const [level, width] = study.presets[$("preset").value] || Object.values(study.presets)[0];
  const img = new Image();
  img.src = `/api/studies/${study.id}/slice/${slice}.png?level=${level}&width=${width}`;
  const mask = new Image();
  mask.src = `/api/studies/${study.id}/mask/${slice}.png?t=${Date.now()}`;
  await Promise.all([img.decode(), mask.decode()]);
  imgEl = img;
  const c = document.createElement("canvas"); c.width = mask.width; c.height = mask.height;
  const cx = c.getContext("2d"); cx.drawImage(mask, 0, 0);
  maskData = cx.getImageData(0, 0, c.width, c.height);
  draw();
}

function draw() {
  if (!imgEl) return;
  const cv = $("view"), ctx = cv.getContext("2d");
  const scale = Math.min(720 / imgEl.width, 720 / imgEl.height);
  cv.width = Math.round(imgEl.width * scale); cv.height = Math.round(imgEl.height * scale);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(imgEl, 0, 0, cv.width, cv.height);
  const over = document.createElement("canvas"); over.width = imgEl.width; over.height = imgEl.height;
  const ox = over.getContext("2d"), od = ox.createImageData(imgEl.width, imgEl.height);
  const alpha = Math.round(255 * parseFloat($("opacity").value));
  let any = 0;
  for (let p = 0; p < maskData.data.length; p += 4) {
    const v = maskData.data[p];
    if (v) { const c = COLOURS[v % COLOURS.length] || COLOURS[1]; od.data[p] = c[0]; od.data[p+1] = c[1]; od.data[p+2] = c[2]; od.data[p+3] = alpha; any++; }
  }
  ox.putImageData(od, 0, 0);
  ctx.drawImage(over, 0, 0, cv.width, cv.height);
  cv.dataset.maskPixels = any;  // what the browser tests read
  for (const [x, y, lab] of points) { ctx.fillStyle = lab ? "#0f0" : "#f00"; ctx.fillRect(x * scale - 3, y * scale - 3, 6, 6); }
  if (drag?.to) { ctx.strokeStyle = "#ff0"; ctx.strokeRect(drag.from[0] * scale, drag.from[1] * scale, (drag.to[0] - drag.from[0]) * scale, (drag.to[1] - drag.from[1]) * scale); }
}

// screen pixel (col, row) of the displayed slice -> array indices (i, j): display = flipud(slice.T)
function toArray([col, row]) { return [col, imgEl.height - 1 - row]; }
function eventPixel(e) {
  const cv = $("view"), r = cv.getBoundingClientRect();
  return [Math.floor((e.clientX - r.left) / r.width * imgEl.width), Math.floor((e.clientY - r.top) / r.height * imgEl.height)];
}

async function run(label, fn) {
  if (busy) return; busy = true; status(label + " ...");
  const t0 = performance.now();
  try { const r = await fn(); if (r?.volumes_ml) showVolumes(r.volumes_ml); await refresh(); status(`${label}: done in ${((performance.now() - t0) / 1000).toFixed(2)} s`); }
  catch (err) { status(`${label}: ${err.message}`, true); }
  finally { busy = false; }
}

async function samBox(a, b, add) {
  const [i0, j0] = toArray(a), [i1, j1] = toArray(b);
  const box = [Math.min(i0, i1), Math.min(j0, j1), Math.max(i0, i1), Math.max(j0, j1)];
  await run(add ? "SAM box, another piece" : "SAM box", () => post(`/api/studies/${study.id}/sam`, {slice, box, label: +$("label").value, add}));
}

$("upload").onclick = () => run("upload", async () => {
  const fd = new FormData();
  for (const f of $("study-file").files) fd.append("files", f);
  const info = await api("/api/studies", {method: "POST", body: fd});
  setStudy(info);
  return info;
});
$("pacs-list").onclick = () => run("list series", async () => {
  const r = await api(`/api/pacs/series?study=${encodeURIComponent($("pacs-study").value.trim())}`);
  $("pacs-series").innerHTML = r.series.map((s) => `<option value="${s.series_uid}">${s.modality} ${s.instances ?? ""} ${s.description || s.series_uid}</option>`).join("");
  return r;
});
$("pacs-open").onclick = () => run("open from the PACS", async () => {
  const info = await post("/api/pacs/open", {study: $("pacs-study").value.trim(), series: $("pacs-series").value});
  setStudy(info);
  return info;
});
$("preset").onchange = refresh;
$("opacity").oninput = draw;
$("slice").oninput = (e) => { slice = +e.target.value; points = []; refresh(); };
$("view").addEventListener("wheel", (e) => { if (!study) return; e.preventDefault(); slice = Math.max(0, Math.min(study.slices - 1, slice + Math.sign(e.deltaY))); $("slice").value = slice; refresh(); });
$("view").addEventListener("mousedown", (e) => { if (!study || $("tool").value !== "box") return; drag = {from: eventPixel(e)}; });
$("view").addEventListener("mousemove", (e) => { if (drag) { drag.to = eventPixel(e); draw(); } });
$("view").addEventListener("mouseup", (e) => {
  if (!drag) return; const a = drag.from, b = eventPixel(e); drag = null;
  if (Math.abs(a[0] - b[0]) > 2 && Math.abs(a[1] - b[1]) > 2) samBox(a, b, e.shiftKey);
});
$("view").addEventListener("click", (e) => {
  if (!study || $("tool").value !== "point") return;
  points.push([...eventPixel(e), e.shiftKey ? 0 : 1]); draw();
});
$("run-points").onclick = () => run("SAM points", () => post(`/api/studies/${study.id}/sam`,
  {slice, points: points.map(([x, y, l]) => [...toArray([x, y]), l]), label: +$("label").value}));
$("clear-points").onclick = () => { points = []; draw(); };
$("upload-support").onclick = () => run("upload example set", async () => {
  const fd = new FormData();
  for (const f of $("support-images").files) fd.append("images", f);
  for (const f of $("support-masks").files) fd.append("masks", f);
  const r = await api("/api/supports", {method: "POST", body: fd});
  await loadResources(); $("support").value = r.id; return r;
});
$("incontext").onclick = () => run("segment from example set", () => post(`/api/studies/${study.id}/incontext`,
  {support: $("support").value, support_size: +$("support-size").value}));
$("predict").onclick = () => run("model", () => post(`/api/studies/${study.id}/predict`, {model: $("model").value}));
$("undo").onclick = () => run("undo", () => post(`/api/studies/${study.id}/undo`, {}));
loadResources().catch((e) => status(e.message, true));
