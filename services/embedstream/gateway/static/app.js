// The search page: one form over POST /v1/search; results with scores and thumbnails.
"use strict";
const $ = (id) => document.getElementById(id);
let models = [];
let file = null;

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = $("api-key").value.trim();
  if (key) { h["X-API-Key"] = key; localStorage.setItem("embedstream-key", key); }
  return h;
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadModels() {
  const res = await fetch("/v1/models", { headers: headers() });
  if (!res.ok) { status(`cannot list models (${res.status}); an API key may be needed`, true); return; }
  models = (await res.json()).models;
  $("model").innerHTML = "";
  for (const m of models) {
    const opt = document.createElement("option");
    opt.value = m.name; opt.textContent = `${m.name} (${m.modality})`;
    $("model").appendChild(opt);
  }
  showFilterFields();
}

function showFilterFields() {
  const m = models.find((x) => x.name === $("model").value);
  const fields = m ? Object.entries(m.filters) : [];
  $("filter-fields").textContent = fields.length
    ? "Indexed: " + fields.map(([n, t]) => `${n} (${t})`).join(", ") : "No filterable fields for this model.";
}

function pickModel(modality) {
  const current = models.find((x) => x.name === $("model").value);
  if (current && current.modality === modality) return current.name;
  const other = models.find((x) => x.modality === modality);
  return other ? other.name : null;
}

function setFile(f) {
  file = f;
  $("drop-label").textContent = f ? `${f.name} (${Math.round(f.size / 1024)} KB)` : "Drop an image or audio file here, or click to choose one";
  $("clear-file").hidden = !f;
  const preview = $("preview");
  if (f && f.type.startsWith("image/")) { preview.src = URL.createObjectURL(f); preview.hidden = false; }
  else { preview.hidden = true; preview.removeAttribute("src"); }
}

function thumbnail(hit, modality) {
  const f = hit.metadata || {};
  const uri = typeof f.uri === "string" ? f.uri : "";
  const src = (typeof f.thumbnail === "string" && f.thumbnail) ||
    (modality === "image" && /^(https?:|data:image\/)/.test(uri) ? uri : null);
  if (src) {
    const img = document.createElement("img");
    img.className = "thumb"; img.src = src; img.alt = hit.id;
    return img;
  }
  const box = document.createElement("div");
  box.className = "thumb";
  box.textContent = { text: "T", image: "IMG", audio: "\u266A" }[modality] || "?";
  return box;
}

function render(data) {
  const list = $("results");
  list.innerHTML = "";
  const modality = (models.find((x) => x.name === data.model) || {}).modality || "text";
  for (const [rank, hit] of data.hits.entries()) {
    const li = document.createElement("li");
    li.className = "hit"; li.dataset.id = hit.id;
    li.appendChild(thumbnail(hit, modality));
    const body = document.createElement("div");
    body.className = "body";
    const label = document.createElement("div");
    label.className = "label";
    const metadata = hit.metadata || {};
    label.textContent = hit.text || metadata.title || hit.id;
    const meta = document.createElement("div");
    meta.className = "meta";
    const extras = Object.entries(metadata)
      .filter(([k]) => !["title", "uri", "thumbnail"].includes(k))
      .map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`);
    const where = hit.chunks > 1 ? [`chunk ${hit.chunk + 1}/${hit.chunks}`] : [];
    meta.textContent = [`#${rank + 1}`, hit.id, ...where, ...extras].join("  \u00b7  ");
    body.append(label, meta);
    const score = document.createElement("div");
    score.className = "score"; score.textContent = hit.score.toFixed(3);
    li.append(body, score);
    list.appendChild(li);
  }
  status(data.hits.length ? `${data.hits.length} nearest in ${data.model}` : `nothing stored yet in ${data.model}`);
}

async function search(event) {
  event.preventDefault();
  const k = Number($("k").value) || 10;
  let filters = null;
  if ($("filters").value.trim()) {
    try { filters = JSON.parse($("filters").value); }
    catch (err) { status("Filters are not valid JSON", true); return; }
  }
  let res;
  status("searching\u2026");
  if (file) {
    const modality = file.type.split("/")[0];
    const model = pickModel(modality);
    if (!model) { status(`no ${modality} model is served here`, true); return; }
    const form = new FormData();
    form.append("file", file); form.append("model", model); form.append("k", String(k));
    if (filters) form.append("filters", JSON.stringify(filters));
    res = await fetch("/v1/search", { method: "POST", body: form, headers: headers() });
  } else {
    const text = $("query").value.trim();
    if (!text) { status("Type a query or drop a file", true); return; }
    const body = { text, k, model: pickModel("text") || $("model").value };
    if (filters) body.filters = filters;
    res = await fetch("/v1/search", { method: "POST", body: JSON.stringify(body),
                                      headers: headers({ "Content-Type": "application/json" }) });
  }
  const data = await res.json();
  if (!res.ok) { status(`${data.error}: ${data.detail}`, true); $("results").innerHTML = ""; return; }
  render(data);
}

$("api-key").value = localStorage.getItem("embedstream-key") || "";
$("api-key").addEventListener("change", loadModels);
$("model").addEventListener("change", showFilterFields);
$("search-form").addEventListener("submit", search);
const drop = $("drop");
drop.addEventListener("click", (e) => { if (e.target.id !== "clear-file") $("file").click(); });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) setFile(e.dataTransfer.files[0]);
});
$("file").addEventListener("change", () => setFile($("file").files[0] || null));
$("clear-file").addEventListener("click", () => { setFile(null); $("file").value = ""; });
loadModels();
