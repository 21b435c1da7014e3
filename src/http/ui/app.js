// fwrepo dashboard: a small single-page app over the same HTTP API and tokens as every other
// client. No build step, no external assets. Live views read the SSE endpoints with fetch()
// streams, which (unlike EventSource) can send the Authorization header.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const main = $("#main");
let token = sessionStorage.getItem("fwrepo.token") || "";
// Everything a view starts (streams, timers) stops when the view changes.
let viewAbort = new AbortController();
const timers = [];

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
function bytes(n) {
  if (n == null) return "";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}
function when(t) {
  if (!t) return "";
  const d = new Date(t);
  return isNaN(d) ? esc(t) : d.toLocaleString();
}
function ago(t) {
  if (!t) return "never";
  const s = Math.round((Date.now() - new Date(t)) / 1000);
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}
const badge = (s) => `<span class="badge ${esc(s)}">${esc(s)}</span>`;
const bar = (pct, ok) => `<div class="bar${ok ? " ok" : ""}" title="${Number(pct || 0).toFixed(1)} %"><span style="width:${Math.max(0, Math.min(100, pct || 0))}%"></span></div>`;

// Error answers in words (contract codes → sentences a person can act on).
function explain(e) {
  const m = e.message ? ` (${e.message})` : "";
  switch (e.error) {
    case "unauthorized": return "That token was not accepted: it is unknown, revoked or expired." ;
    case "forbidden": return "Your token may not do this" + m + ".";
    case "version_conflict": return "This model and version already exist with different content" + (e.firmware_id ? ` (firmware ${e.firmware_id})` : "") + ". Upload it under a new version.";
    case "checksum_mismatch": return "The file's checksum differs from the one given" + m + ": the file is damaged or the checksum is wrong.";
    case "too_large": return "The file is larger than this server accepts" + m + ".";
    case "version_required": return "No version could be read from the file name: give the model and version.";
    case "invalid_version": return "That version is not numeric" + m + ".";
    case "too_many_uploads": return "Too many uploads are running; try again in a moment.";
    case "insufficient_storage": return "The server does not have enough free space for this file.";
    case "rate_limited": return "Too many requests; wait a moment.";
    case "gateway_busy": return "This dock already has an upgrade running" + (e.task_id ? ` (task ${e.task_id})` : "") + ".";
    case "preflight_failed": return "A preflight check failed" + (e.check ? ` (${e.check})` : "") + m + ".";
    case "already_up_to_date": return "Every selected device already runs the target version.";
    case "downgrade_refused": return "The target is older than the version the device runs.";
    case "broker_unavailable": return "The MQTT broker is not reachable; nothing was sent.";
    case "invalid_transition": return "The rollout cannot do that in its current state" + m + ".";
    case "network": return "The server could not be reached.";
    default: return (e.message || e.error || "Request failed") + (e.status ? ` [${e.status}]` : "");
  }
}

function flash(text, info) {
  const f = $("#flash");
  f.textContent = text;
  f.className = info ? "info" : "";
  f.hidden = !text;
}

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + token };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (_) {
    throw { error: "network" };
  }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = { message: text }; }
  if (!res.ok) {
    const e = Object.assign({ status: res.status }, data || {});
    if (res.status === 401 && path !== "/api/v1/firmware?limit=1") logout(explain(e));
    throw e;
  }
  return data;
}

// Reads a text/event-stream with fetch() and calls onEvent(name, data) per event.
async function stream(path, onEvent) {
  const signal = viewAbort.signal;
  try {
    const res = await fetch(path, { headers: { Authorization: "Bearer " + token }, signal });
    if (!res.ok || !res.body) return;
    const reader = res.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const chunk = buf.slice(0, i);
        buf = buf.slice(i + 2);
        let name = "message", data = "";
        for (const line of chunk.split("\n")) {
          if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data += line.slice(5).trim();
        }
        if (data) {
          try { onEvent(name, JSON.parse(data)); } catch (_) { /* a partial or foreign event */ }
        }
      }
    }
  } catch (_) { /* aborted on navigation, or the connection ended */ }
}

function every(ms, fn) {
  fn();
  timers.push(setInterval(fn, ms));
}

// An in-page confirmation (no browser dialog): resolves true on "Yes".
function confirmInline(anchor, question) {
  return new Promise((resolve) => {
    const box = document.createElement("span");
    box.className = "confirm";
    box.innerHTML = `${esc(question)} <button class="primary" id="confirm-yes">Yes</button><button id="confirm-no">No</button>`;
    anchor.after(box);
    box.querySelector("#confirm-yes").onclick = () => { box.remove(); resolve(true); };
    box.querySelector("#confirm-no").onclick = () => { box.remove(); resolve(false); };
  });
}

// ------------------------------------------------------------------ login

function logout(message) {
  token = "";
  sessionStorage.removeItem("fwrepo.token");
  location.hash = "#/login";
  route();
  if (message) $("#login-error").textContent = message;
}

function viewLogin() {
  $("#nav").hidden = true;
  $("#logout").hidden = true;
  $("#who").textContent = "";
  main.innerHTML = `<div class="card login">
    <h1>Sign in</h1>
    <p class="muted">Paste an API token. The first admin token is in <code>storage/admin.token</code>;
      <code>fwrepo token create</code> makes scoped ones.</p>
    <form id="login-form" class="row">
      <input id="token" type="password" placeholder="fwr_…" autocomplete="off" style="flex:1">
      <button class="primary" id="login-btn" type="submit">Sign in</button>
    </form>
    <p id="login-error" class="error" role="alert"></p></div>`;
  $("#login-form").onsubmit = async (ev) => {
    ev.preventDefault();
    token = $("#token").value.trim();
    $("#login-error").textContent = "";
    try {
      await api("GET", "/api/v1/firmware?limit=1");
      sessionStorage.setItem("fwrepo.token", token);
      location.hash = "#/firmware";
    } catch (e) {
      token = "";
      $("#login-error").textContent = explain(e);
    }
  };
}

// ------------------------------------------------------------------ firmware

async function viewFirmware() {
  main.innerHTML = `<h1>Firmware</h1>
    <div class="card">
      <div id="drop"><p><b>Drop a package here</b> or <input id="file-input" type="file"></p>
        <div class="row" style="justify-content:center">
          <input id="up-model" placeholder="model (optional)"> <input id="up-version" placeholder="version (optional)">
          <input id="up-note" placeholder="release note (optional)" size="30">
        </div></div>
      <div id="upload-status" style="margin-top:.8rem"></div>
    </div>
    <div class="row" style="margin-bottom:.6rem"><input id="fw-filter" placeholder="filter by model"></div>
    <table id="fw-table"><thead><tr><th>Model</th><th>Version</th><th>File</th><th>Size</th><th>MD5</th><th>SHA-256</th><th>Uploaded</th><th>Downloads</th><th>Status</th></tr></thead><tbody></tbody></table>`;
  const drop = $("#drop");
  drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files[0]) upload(e.dataTransfer.files[0]); };
  $("#file-input").onchange = (e) => { if (e.target.files[0]) upload(e.target.files[0]); };
  $("#fw-filter").oninput = () => loadFirmware();
  await loadFirmware();
}

async function loadFirmware() {
  const model = $("#fw-filter") ? $("#fw-filter").value.trim() : "";
  const q = new URLSearchParams({ limit: "500" });
  if (model) q.set("model", model);
  const [page, downloads] = await Promise.all([
    api("GET", "/api/v1/firmware?" + q),
    api("GET", "/api/v1/downloads?limit=500").catch(() => ({ items: [] })),
  ]);
  const count = {};
  for (const s of downloads.items) count[s.firmware_id] = (count[s.firmware_id] || 0) + 1;
  const body = $("#fw-table tbody");
  if (!body) return;
  body.innerHTML = page.items.map((f) => `<tr data-id="${esc(f.id)}" data-md5="${esc(f.md5)}">
      <td>${esc(f.model)}</td><td>${esc(f.product_version)}</td>
      <td><a href="${esc(f.file_url)}" class="dl" data-url="${esc(f.file_url)}" data-size="${f.file_size}">${esc(f.file_name)}</a></td>
      <td class="num">${bytes(f.file_size)}</td><td class="mono md5">${esc(f.md5)}</td>
      <td class="mono" title="${esc(f.sha256)}">${esc(f.sha256.slice(0, 16))}…</td>
      <td>${when(f.created_at)}</td><td class="num">${count[f.id] || 0}</td><td>${badge(f.status)}</td></tr>`).join("")
    || `<tr><td colspan="9" class="muted">No firmware yet.</td></tr>`;
  // Package links need the token: fetch them instead of navigating.
  body.querySelectorAll("a.dl").forEach((a) => a.onclick = async (ev) => {
    ev.preventDefault();
    // The browser would hold the whole file in memory: big packages go through a client.
    if (Number(a.dataset.size) > 256 * 1024 * 1024) {
      return flash(`Large package: download it with  curl -H "Authorization: Bearer $TOKEN" -C - -O ${a.dataset.url}`, true);
    }
    const res = await fetch(a.dataset.url, { headers: { Authorization: "Bearer " + token } });
    if (!res.ok) return flash("Download failed: " + res.status);
    const url = URL.createObjectURL(await res.blob());
    const link = Object.assign(document.createElement("a"), { href: url, download: a.textContent });
    link.click();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  });
}

// Streams the file from disk (XMLHttpRequest sends a File without reading it into memory)
// and shows real upload progress.
function upload(file) {
  const status = $("#upload-status");
  const q = new URLSearchParams({ file_name: file.name });
  for (const [k, id] of [["model", "#up-model"], ["product_version", "#up-version"], ["release_note", "#up-note"]]) {
    const v = $(id).value.trim();
    if (v) q.set(k, v);
  }
  status.innerHTML = `<div class="row"><b>${esc(file.name)}</b> <span id="up-pct">0 %</span> <span class="muted">${bytes(file.size)}</span></div>${bar(0)}`;
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/api/v1/firmware?" + q);
  xhr.setRequestHeader("Authorization", "Bearer " + token);
  xhr.setRequestHeader("Content-Type", "application/octet-stream");
  const started = Date.now();
  xhr.upload.onprogress = (e) => {
    if (!e.lengthComputable) return;
    const pct = (100 * e.loaded) / e.total;
    const rate = e.loaded / Math.max(0.001, (Date.now() - started) / 1000);
    $("#up-pct").textContent = pct.toFixed(1) + " % · " + bytes(rate) + "/s";
    status.querySelector(".bar > span").style.width = pct + "%";
  };
  xhr.onload = () => {
    let data = {};
    try { data = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
    if (xhr.status === 201 || xhr.status === 200) {
      status.innerHTML = `<div id="upload-ok">${xhr.status === 200 ? "Identical package already stored" : "Uploaded"}:
        <b>${esc(data.model)} ${esc(data.product_version)}</b> · MD5 <code id="upload-md5">${esc(data.md5)}</code>
        · SHA-256 <code>${esc(data.sha256)}</code></div>`;
      loadFirmware();
    } else {
      status.innerHTML = `<div id="upload-error" class="error">${esc(explain(Object.assign({ status: xhr.status }, data)))}</div>`;
    }
  };
  xhr.onerror = () => { status.innerHTML = `<div id="upload-error" class="error">${esc(explain({ error: "network" }))}</div>`; };
  xhr.send(file);
}

// ------------------------------------------------------------------ downloads

function viewDownloads() {
  main.innerHTML = `<h1>Downloads</h1><p class="muted" id="dl-summary"></p><table id="dl-table"><thead><tr><th>Progress</th><th></th><th>Rate</th><th>Client</th><th>Device</th><th>Firmware</th><th>State</th><th>Last seen</th></tr></thead><tbody></tbody></table>`;
  const last = {};
  every(1000, async () => {
    const page = await api("GET", "/api/v1/downloads?limit=100").catch(() => null);
    const body = $("#dl-table tbody");
    if (!page || !body) return;
    const now = Date.now();
    // Running downloads first, then the most recent others.
    const items = page.items.filter((s) => s.state === "active").concat(page.items.filter((s) => s.state !== "active"));
    $("#dl-summary").textContent = `${items.filter((s) => s.state === "active").length} running · the ${items.length} most recent sessions (percent = distinct bytes sent)`;
    body.innerHTML = items.map((s) => {
      const prev = last[s.id];
      const rate = prev ? (s.bytes_sent - prev.bytes) / Math.max(0.001, (now - prev.at) / 1000) : 0;
      last[s.id] = { bytes: s.bytes_sent, at: now };
      return `<tr><td style="width:28%">${bar(s.percent, s.state === "complete")}</td><td class="num">${Number(s.percent).toFixed(1)} %</td>
        <td class="num">${rate > 0 ? bytes(rate) + "/s" : ""}</td><td>${esc(s.client)}<div class="muted">${esc(s.user_agent)}</div></td>
        <td>${esc(s.sn || "")}${s.task_id ? `<div><a href="#/ota/${esc(s.task_id)}">task</a></div>` : ""}</td>
        <td class="mono">${esc(s.firmware_id)}</td><td>${badge(s.state)}</td><td>${ago(s.last_seen_at)}</td></tr>`;
    }).join("") || `<tr><td colspan="8" class="muted">No download yet.</td></tr>`;
  });
}

// ------------------------------------------------------------------ devices

// Docks a page at a time (fleets run to tens of thousands), filtered by serial; the aircraft
// of a dock is read when its upgrade panel opens.
const DEVICE_PAGE = 100;

async function viewDevices() {
  main.innerHTML = `<h1>Devices</h1><div class="row"><input id="dev-filter" placeholder="Filter by serial" autocomplete="off">
    <button id="dev-prev" disabled>← Newer</button><button id="dev-next" disabled>Older →</button><span id="dev-where" class="muted"></span></div>
    <div id="upgrade-panel"></div><table id="dev-table"><thead><tr><th>Dock</th><th>Model</th><th>Firmware</th><th>Compatible</th><th>Last seen</th><th>Aircraft</th><th></th></tr></thead><tbody></tbody></table>`;
  // Cursors of the pages before the one shown ("" = the first page).
  const back = [];
  let cursor = "", next = null, shown = {};
  const load = async () => {
    const filter = $("#dev-filter") ? $("#dev-filter").value.trim() : "";
    const query = new URLSearchParams({ kind: "gateway", limit: String(DEVICE_PAGE) });
    if (filter) query.set("sn_contains", filter);
    if (cursor) query.set("cursor", cursor);
    const page = await api("GET", "/api/v1/devices?" + query).catch(() => null);
    const body = $("#dev-table tbody");
    if (!page || !body) return;
    next = page.next_cursor;
    $("#dev-next").disabled = !next;
    $("#dev-prev").disabled = back.length === 0;
    $("#dev-where").textContent = `page ${back.length + 1} · ${page.items.length} docks`;
    shown = Object.fromEntries(page.items.map((d) => [d.sn, d]));
    body.innerHTML = page.items.map((d) => {
      const acText = d.child_sn ? esc(d.child_sn) : `<span class="muted">none</span>`;
      return `<tr data-sn="${esc(d.sn)}"><td><b>${esc(d.sn)}</b> ${d.online ? badge("online") : `<span class="badge">offline</span>`}</td>
        <td>${esc(d.model || d.model_key || "?")}</td><td>${esc(d.firmware_version || "?")}</td>
        <td>${d.compatible_status == null ? "" : d.compatible_status === 0 ? "consistent" : "needs consistency upgrade"}</td>
        <td>${ago(d.last_seen_at)}</td><td>${acText}</td>
        <td><button class="upgrade" data-sn="${esc(d.sn)}">Upgrade…</button></td></tr>`;
    }).join("") || `<tr><td colspan="7" class="muted">${filter ? "No dock matches." : "No dock has connected yet."}</td></tr>`;
    body.querySelectorAll("button.upgrade").forEach((b) => b.onclick = async () => {
      const dock = shown[b.dataset.sn];
      const by = { [dock.sn]: dock };
      if (dock.child_sn) by[dock.child_sn] = await api("GET", "/api/v1/devices/" + encodeURIComponent(dock.child_sn)).catch(() => null);
      upgradePanel(dock, by);
    });
  };
  $("#dev-next").onclick = () => { if (next) { back.push(cursor); cursor = next; load(); } };
  $("#dev-prev").onclick = () => { if (back.length) { cursor = back.pop(); load(); } };
  let typing = null;
  // Typing, or a value set at once (pasted, cleared).
  $("#dev-filter").oninput = $("#dev-filter").onchange = () => {
    clearTimeout(typing);
    typing = setTimeout(() => { back.length = 0; cursor = ""; load(); }, 250);
  };
  every(5000, load);
}

// Every gateway the filter selects, page by page.
async function allGateways(extra) {
  const out = [];
  let cursor = "";
  for (;;) {
    const query = new URLSearchParams(Object.assign({ kind: "gateway", limit: "500" }, extra));
    if (cursor) query.set("cursor", cursor);
    const page = await api("GET", "/api/v1/devices?" + query);
    out.push(...page.items);
    if (!page.next_cursor) return out;
    cursor = page.next_cursor;
  }
}

async function upgradePanel(dock, by) {
  const ac = dock.child_sn ? by[dock.child_sn] : null;
  const fw = (await api("GET", "/api/v1/firmware?status=ready&limit=500")).items;
  const options = (model) => `<option value="">— no upgrade —</option>` + fw
    .filter((f) => !model || f.model.toLowerCase() === String(model).toLowerCase())
    .map((f) => `<option value="${esc(f.id)}">${esc(f.model)} ${esc(f.product_version)} · ${esc(f.file_name)}</option>`).join("");
  const panel = $("#upgrade-panel");
  panel.innerHTML = `<div class="card"><h2>Upgrade ${esc(dock.sn)}</h2><div class="grid">
      <label>Dock ${esc(dock.sn)} (${esc(dock.firmware_version || "?")})</label><select id="fw-dock">${options(dock.model)}</select>
      ${ac ? `<label>Aircraft ${esc(ac.sn)} (${esc(ac.firmware_version || "?")})</label><select id="fw-ac">${options(ac.model)}</select>` : ""}
    </div><div class="row" style="margin-top:.8rem"><button id="dry-run">Check</button><button class="primary" id="start-upgrade" disabled>Start upgrade</button><button id="close-upgrade">Close</button></div>
    <div id="plan"></div></div>`;
  const body = () => {
    const devices = [];
    if ($("#fw-dock").value) devices.push({ sn: dock.sn, firmware_id: $("#fw-dock").value });
    if (ac && $("#fw-ac").value) devices.push({ sn: ac.sn, firmware_id: $("#fw-ac").value });
    return { gateway_sn: dock.sn, devices };
  };
  $("#close-upgrade").onclick = () => { panel.innerHTML = ""; };
  $("#dry-run").onclick = async () => {
    const plan = $("#plan");
    try {
      const r = await api("POST", "/api/v1/ota", Object.assign(body(), { dry_run: true }));
      const t = r.task || r;
      plan.innerHTML = `<table id="plan-table"><thead><tr><th>Device</th><th>Target</th><th>Upgrade type</th><th>Why</th></tr></thead><tbody>${
        (t.devices || []).map((d) => `<tr><td>${esc(d.sn)}</td><td>${esc(d.product_version)}</td>
          <td>${d.upgrade_type === 2 ? "2 · consistency upgrade" : d.upgrade_type === 3 ? "3 · normal upgrade" : esc(d.upgrade_type)}</td>
          <td>${esc(d.policy_reason)}</td></tr>`).join("")}</tbody></table>
        ${(r.warnings || []).map((w) => `<p class="muted">⚠ ${esc(typeof w === "string" ? w : JSON.stringify(w))}</p>`).join("")}`;
      $("#start-upgrade").disabled = false;
    } catch (e) {
      plan.innerHTML = `<p class="error" id="plan-error">${esc(explain(e))}</p>`;
      $("#start-upgrade").disabled = true;
    }
  };
  $("#start-upgrade").onclick = async () => {
    try {
      const t = await api("POST", "/api/v1/ota", body());
      location.hash = "#/ota/" + t.id;
    } catch (e) {
      $("#plan").innerHTML = `<p class="error" id="plan-error">${esc(explain(e))}</p>`;
    }
  };
}

// ------------------------------------------------------------------ OTA tasks

function viewOtaList() {
  main.innerHTML = `<h1>OTA tasks</h1><table id="ota-table"><thead><tr><th>Task</th><th>Gateway</th><th>Devices</th><th>Status</th><th>Progress</th><th>Created</th></tr></thead><tbody></tbody></table>`;
  every(3000, async () => {
    const page = await api("GET", "/api/v1/ota?limit=100").catch(() => null);
    const body = $("#ota-table tbody");
    if (!page || !body) return;
    body.innerHTML = page.items.map((t) => `<tr><td><a href="#/ota/${esc(t.id)}" class="mono">${esc(t.id)}</a></td>
      <td>${esc(t.gateway_sn)}</td><td>${t.devices.map((d) => esc(d.sn) + " → " + esc(d.product_version)).join("<br>")}</td>
      <td>${badge(t.status)}</td><td>${t.progress && t.progress.percent != null ? bar(t.progress.percent, t.status === "ok") : ""}</td>
      <td>${when(t.created_at)}</td></tr>`).join("") || `<tr><td colspan="6" class="muted">No task yet: start one from Devices.</td></tr>`;
  });
}

function renderTask(t) {
  const steps = t.history.map((h) => `<tr><td>${when(h.at)}</td><td>${esc(h.source)}</td><td>${badge(h.status)}</td>
      <td>${esc(h.progress.step_key || "")}</td><td class="num">${h.progress.percent ?? ""}</td><td class="num">${h.repeats ? "×" + (h.repeats + 1) : ""}</td></tr>`).join("");
  $("#task").innerHTML = `<div class="card"><div class="row"><span>Status</span> <span id="task-status">${badge(t.status)}</span>
      <span class="muted">gateway ${esc(t.gateway_sn)} · created ${when(t.created_at)}${t.finished_at ? " · finished " + when(t.finished_at) : ""}</span></div>
      ${t.result_reason ? `<p class="error">${esc(t.result_reason)} (${esc(t.result_code)})</p>` : ""}</div>
    <h2>Devices</h2><table><thead><tr><th>Device</th><th>Target</th><th>Type</th><th>MQTT progress</th><th>Served bytes</th><th>Outcome</th></tr></thead><tbody>${
      t.devices.map((d) => {
        const s = d.download_session;
        const served = s ? s.percent : 0;
        return `<tr><td>${esc(d.sn)}</td><td>${esc(d.product_version)} <span class="muted">${esc(d.file_name)}</span></td>
          <td>${d.upgrade_type === 2 ? "2 · consistency" : d.upgrade_type === 3 ? "3 · normal" : esc(d.upgrade_type)}<div class="muted">${esc(d.policy_reason)}</div></td>
          <td>${bar(t.progress.percent, t.status === "ok")} ${t.progress.percent ?? 0} % ${esc(t.progress.step_key || "")}</td>
          <td>${bar(served, served >= 100)} ${Number(served || 0).toFixed(1)} %${s ? ` · ${bytes(s.bytes_covered)} of ${bytes(d.file_size)}` : ""}</td>
          <td>${badge(d.outcome)}</td></tr>`;
      }).join("")}</tbody></table>
    <h2>Timeline</h2><table id="task-history"><thead><tr><th>At</th><th>Source</th><th>Status</th><th>Step</th><th>%</th><th></th></tr></thead><tbody>${steps}</tbody></table>`;
}

// Calls fn at most once per `ms`, and once more after the last call of a burst.
function throttle(ms, fn) {
  let last = 0, timer = null;
  return () => {
    const wait = last + ms - Date.now();
    if (wait <= 0) { last = Date.now(); fn(); return; }
    if (!timer) timer = setTimeout(() => { timer = null; last = Date.now(); fn(); }, wait);
  };
}

function viewOta(id) {
  main.innerHTML = `<h1>OTA task <span class="mono">${esc(id)}</span></h1><div id="task"><p class="muted">Loading…</p></div>`;
  // The SSE events carry the task; GET adds each device's download session (served bytes).
  const load = () => api("GET", "/api/v1/ota/" + encodeURIComponent(id))
    .then((t) => { if ($("#task")) renderTask(t); })
    .catch((e) => { if ($("#task")) $("#task").innerHTML = `<p class="error">${esc(explain(e))}</p>`; });
  load();
  const refresh = throttle(1000, load);
  stream("/api/v1/ota/" + encodeURIComponent(id) + "/events", (name) => { if (name === "task") refresh(); });
  // Downloads move between MQTT reports too.
  timers.push(setInterval(() => { if ($("#task-status") && !/ok|failed|canceled|rejected|timeout/.test($("#task-status").textContent)) load(); }, 2000));
}

// ------------------------------------------------------------------ rollouts

function viewRollouts() {
  main.innerHTML = `<h1>Rollouts</h1><p><a href="#/rollouts/new"><button class="primary" id="new-rollout">New rollout</button></a></p>
    <table id="rollout-table"><thead><tr><th>Name</th><th>Status</th><th>Stage</th><th>Gateways</th><th>Devices</th><th>Created</th></tr></thead><tbody></tbody></table>`;
  every(3000, async () => {
    const page = await api("GET", "/api/v1/rollouts?limit=100").catch(() => null);
    const body = $("#rollout-table tbody");
    if (!page || !body) return;
    body.innerHTML = page.items.map((r) => `<tr><td><a href="#/rollouts/${esc(r.id)}">${esc(r.name)}</a></td><td>${badge(r.status)}</td>
      <td>${r.current_stage + 1} / ${r.stages.length}</td><td class="num">${r.gateways}</td>
      <td>${Object.entries(r.counts).map(([k, v]) => `${esc(k)} ${v}`).join(" · ")}</td><td>${when(r.created_at)}</td></tr>`).join("")
      || `<tr><td colspan="6" class="muted">No rollout yet.</td></tr>`;
  });
}

async function viewRolloutNew() {
  const fw = (await api("GET", "/api/v1/firmware?status=ready&limit=500")).items;
  main.innerHTML = `<h1>New rollout</h1><form id="rollout-form" class="card"><div class="grid">
      <label>Name</label><input id="r-name" required placeholder="fleet 2.0.0">
      <label>Packages (one per model)</label><select id="r-firmware" multiple size="6">${fw.map((f) =>
        `<option value="${esc(f.id)}">${esc(f.model)} ${esc(f.product_version)} · ${esc(f.file_name)}</option>`).join("")}</select>
      <label>Target gateways</label><div><textarea id="r-sns" rows="3" cols="60" placeholder="serials, one per line or comma-separated (or leave empty and give a model)"></textarea>
        <div><button type="button" id="r-all-online">Every online dock</button></div></div>
      <label>…or every dock of model</label><input id="r-model" placeholder="Dock">
      <label>Stages (percent)</label><input id="r-stages" value="10, 50, 100">
      <label>Gateways at once</label><input id="r-inflight" type="number" min="1" value="50">
      <label>Dispatches per minute</label><input id="r-rate" type="number" min="0" step="any" value="100" title="0 = unlimited">
      <label>Success threshold %</label><input id="r-success" type="number" min="0" max="100" value="95">
      <label>Error threshold %</label><input id="r-error" type="number" min="0" max="100" value="10">
      <label>Advance stages by itself</label><input id="r-auto" type="checkbox">
    </div><div class="row" style="margin-top:1rem"><button class="primary" id="r-create" type="submit">Create</button><span id="r-error-msg" class="error"></span></div></form>`;
  $("#r-all-online").onclick = async () => {
    const docks = await allGateways({}).catch(() => []);
    $("#r-sns").value = docks.filter((d) => d.online).map((d) => d.sn).join("\n");
  };
  $("#rollout-form").onsubmit = async (ev) => {
    ev.preventDefault();
    const sns = $("#r-sns").value.split(/[\s,]+/).filter(Boolean);
    const model = $("#r-model").value.trim();
    const rate = Number($("#r-rate").value);
    const body = {
      name: $("#r-name").value.trim(),
      firmware: [...$("#r-firmware").selectedOptions].map((o) => ({ firmware_id: o.value })),
      target: sns.length ? { gateway_sns: sns } : { model },
      stages: $("#r-stages").value.split(/[\s,]+/).filter(Boolean).map((p) => ({ percent: Number(p) })),
      max_in_flight: Number($("#r-inflight").value),
      rate_per_minute: rate > 0 ? rate : null,
      success_threshold: Number($("#r-success").value),
      error_threshold: Number($("#r-error").value),
      auto_advance: $("#r-auto").checked,
    };
    try {
      const r = await api("POST", "/api/v1/rollouts", body);
      location.hash = "#/rollouts/" + r.id;
    } catch (e) {
      $("#r-error-msg").textContent = explain(e);
    }
  };
}

const CHART = [["ok", "#1f9d55"], ["in_flight", "#2f6fdf"], ["failed", "#d64545"], ["pending", "#9aa5b5"]];

function chart(points, now) {
  if (now) points = points.concat([now]);
  if (!points.length) return `<p class="muted">No progress yet.</p>`;
  const W = 1000, H = 200;
  const t0 = new Date(points[0].at).getTime();
  const t1 = Math.max(t0 + 1000, new Date(points[points.length - 1].at).getTime());
  const max = Math.max(1, ...points.map((p) => Object.values(p.counts).reduce((a, b) => a + b, 0)));
  const x = (t) => (((new Date(t).getTime() - t0) / (t1 - t0)) * (W - 20) + 10).toFixed(1);
  const y = (v) => (H - 10 - (v / max) * (H - 20)).toFixed(1);
  // Steps: a count holds until the next sample.
  const steps = (k) => points.map((p, i) => {
    const here = x(p.at) + "," + y(p.counts[k] || 0);
    return i ? x(p.at) + "," + y(points[i - 1].counts[k] || 0) + " " + here : here;
  }).join(" ");
  const lines = CHART.map(([k, color]) => `<polyline fill="none" stroke="${color}" stroke-width="2" points="${steps(k)}"/>`).join("");
  return `<svg class="chart" id="rollout-chart" viewBox="0 0 ${W} ${H}" preserveAspectRatio="none">${lines}</svg>
    <div class="legend">${CHART.map(([k, c]) => `<span><i style="background:${c}"></i>${k}</span>`).join("")} <span class="muted">devices over time (max ${max})</span></div>`;
}

// A live update that came while a confirmation was open: shown once it is answered (a
// re-render would remove the question under the operator's pointer).
let heldRollout = null;

function renderRollout(r) {
  heldRollout = null;
  const actions = { draft: ["start", "cancel"], running: ["pause", "cancel"], paused: ["resume", "cancel"], waiting_approval: ["approve", "pause", "cancel"] }[r.status] || [];
  $("#rollout").innerHTML = `<div class="card"><div class="row"><span>Status</span> <span id="rollout-status">${badge(r.status)}</span>
      <span class="muted">stage ${r.current_stage + 1} of ${r.stages.length} · ${r.gateways} gateways${r.eta_s != null ? " · about " + Math.ceil(r.eta_s / 60) + " min left" : ""}</span>
      <span class="spacer"></span><span id="rollout-actions">${actions.map((a) =>
        `<button data-action="${a}" class="${a === "cancel" ? "danger" : "primary"}">${a[0].toUpperCase() + a.slice(1)}</button>`).join(" ")}</span></div>
      ${r.pause_reason ? `<p class="error" id="pause-reason">${esc(r.pause_reason)}</p>` : ""}
      <p>${Object.entries(r.counts).map(([k, v]) => `${badge(k)} ${v}`).join(" &nbsp; ")}</p></div>
    <h2>Stages</h2><table id="stage-table"><thead><tr><th>Stage</th><th>Percent</th><th>Gateways</th><th>Devices by state</th></tr></thead><tbody>${
      r.stages.map((s) => `<tr class="${s.index === r.current_stage ? "current" : ""}"><td>${s.index + 1}${s.index === r.current_stage ? " ◀" : ""}</td>
        <td class="num">${s.percent}</td><td class="num">${s.gateways}</td>
        <td>${Object.entries(s.counts).map(([k, v]) => `${badge(k)} ${v}`).join(" ")}</td></tr>`).join("")}</tbody></table>
    <h2>Progress</h2><div id="chart-box"></div>
    <h2>Events</h2><table><tbody>${(r.events || []).slice(-15).reverse().map((e) =>
      `<tr><td>${when(e.at)}</td><td>${esc(e.action || e.kind || "")}</td><td>${esc(e.reason || "")}</td></tr>`).join("")}</tbody></table>`;
  $("#rollout-actions").querySelectorAll("button").forEach((b) => b.onclick = async () => {
    if (!(await confirmInline(b, `${b.textContent} this rollout?`))) {
      if (heldRollout) renderRollout(heldRollout);
      return;
    }
    try {
      renderRollout(await api("POST", `/api/v1/rollouts/${encodeURIComponent(r.id)}/${b.dataset.action}`));
      flash("");
    } catch (e) {
      flash(explain(e));
    }
  });
  refreshChart(r);
}

// The timeline (sampled by the server) plus the counts of now as its last point.
let chartRollout = null;
const drawChart = throttle(1000, async () => {
  const r = chartRollout;
  try {
    const t = await api("GET", `/api/v1/rollouts/${encodeURIComponent(r.id)}/timeline`);
    if ($("#chart-box")) $("#chart-box").innerHTML = chart(t.items, { at: new Date().toISOString(), counts: r.counts });
  } catch (_) { /* drawn on the next change */ }
});
function refreshChart(r) {
  chartRollout = r;
  drawChart();
}

function viewRollout(id) {
  main.innerHTML = `<h1>Rollout <span class="mono">${esc(id)}</span></h1><div id="rollout"><p class="muted">Loading…</p></div>`;
  api("GET", "/api/v1/rollouts/" + encodeURIComponent(id)).then((r) => {
    $("h1").textContent = "Rollout: " + r.name;
    renderRollout(r);
  }).catch((e) => { $("#rollout").innerHTML = `<p class="error">${esc(explain(e))}</p>`; });
  stream("/api/v1/rollouts/" + encodeURIComponent(id) + "/events", (name, data) => {
    if (name !== "rollout" || !$("#rollout")) return;
    if ($("#rollout .confirm")) heldRollout = data;
    else renderRollout(data);
  });
}

// ------------------------------------------------------------------ routing

function route() {
  viewAbort.abort();
  viewAbort = new AbortController();
  while (timers.length) clearInterval(timers.pop());
  flash("");
  const parts = (location.hash || "#/firmware").slice(2).split("/");
  if (!token || parts[0] === "login") return viewLogin();
  $("#nav").hidden = false;
  $("#logout").hidden = false;
  document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.getAttribute("href") === "#/" + parts[0]));
  const fail = (e) => { if (e && e.error) flash(explain(e)); };
  switch (parts[0]) {
    case "downloads": return viewDownloads();
    case "devices": return viewDevices().catch(fail);
    case "ota": return parts[1] ? viewOta(parts[1]) : viewOtaList();
    case "rollouts":
      if (parts[1] === "new") return viewRolloutNew().catch(fail);
      return parts[1] ? viewRollout(parts[1]) : viewRollouts();
    default: return viewFirmware().catch(fail);
  }
}

$("#logout").onclick = () => logout();
window.addEventListener("hashchange", route);
route();
