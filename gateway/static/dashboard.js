// Corral dashboard. Polls GET /cluster (topology, state, load) and GET /dashboard/summary
// (the gateway's cumulative request counters and histograms) about once a second, and turns
// successive summaries into rates and windowed percentiles. No framework, no build step.
// Every value from the server reaches the page through textContent, never as HTML.
// URLs are relative, so the page also works behind a reverse proxy under a sub-path.
"use strict";

const POLL_MS = 1000;
const RATE_WINDOW_S = 10;     // rates are averaged over this many seconds
const PCT_WINDOW_S = 60;      // percentiles cover this many seconds
const CHART_SPAN_S = 300;     // the throughput chart shows this many seconds
const HISTORY_S = CHART_SPAN_S + 5;

const history = [];           // summaries: {time, ...} oldest first
const chartPoints = [];       // {t, tps, rps}

// ---------------------------------------------------------------------------- helpers

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function fmtNum(v, digits) {
  if (v === null || v === undefined || !isFinite(v)) return "–";
  if (Math.abs(v) >= 1000) return (v / 1000).toFixed(1) + "k";
  return v.toFixed(digits === undefined ? (Math.abs(v) < 10 ? 1 : 0) : digits);
}

function fmtSeconds(v) {
  if (v === null || v === undefined || !isFinite(v)) return "–";
  if (v < 1) return Math.round(v * 1000) + " ms";
  return v.toFixed(v < 10 ? 2 : 1) + " s";
}

function fmtBytes(b) {
  if (!b && b !== 0) return "?";
  const gib = b / 1073741824;
  if (gib >= 1) return gib.toFixed(1) + " GiB";
  return (b / 1048576).toFixed(0) + " MiB";
}

function naturalCompare(a, b) {
  return String(a).localeCompare(String(b), undefined, { numeric: true, sensitivity: "base" });
}

// A closed gateway (API keys configured) answers 401: ask for a key or the cluster token
// once, keep it for this browser session only (sessionStorage), and send it as a bearer.
const TOKEN_KEY = "corral-token";

function askToken() {
  const form = document.getElementById("login");
  if (!form || !form.hidden) return;
  form.hidden = false;
  form.onsubmit = (ev) => {
    ev.preventDefault();
    const v = document.getElementById("login-token").value.trim();
    if (v) sessionStorage.setItem(TOKEN_KEY, v);
    form.hidden = true;
  };
}

async function getJSON(path) {
  const ctrl = new AbortController();
  const timer = setTimeout(() => ctrl.abort(), 3000);
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = token ? { Authorization: "Bearer " + token } : {};
  try {
    const r = await fetch(path, { cache: "no-store", signal: ctrl.signal, headers });
    if (r.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      askToken();
    }
    if (!r.ok) throw new Error(path + ": HTTP " + r.status);
    return await r.json();
  } finally {
    clearTimeout(timer);
  }
}

// ---------------------------------------------------------------------------- rates

function sumValues(obj) {
  let s = 0;
  for (const k in obj || {}) s += obj[k];
  return s;
}

function isErrorStatus(status) {
  const s = String(status);
  if (/^\d+$/.test(s)) return Number(s) >= 400;
  return !["ok", "success", "200", "done", "stop", "length"].includes(s.toLowerCase());
}

// The snapshot at least `seconds` older than the newest (or the oldest we have).
function snapshotBefore(seconds) {
  const now = history[history.length - 1];
  for (let i = history.length - 2; i >= 0; i--) {
    if (now.time - history[i].time >= seconds) return history[i];
  }
  return history.length > 1 ? history[0] : null;
}

// Counter increase, tolerating a gateway restart (the counter starts again from zero).
function increase(cur, old) {
  return cur >= old ? cur - old : cur;
}

function rate(pick, seconds) {
  const now = history[history.length - 1];
  const old = snapshotBefore(seconds);
  if (!now || !old || now.time <= old.time) return null;
  return increase(pick(now), pick(old)) / (now.time - old.time);
}

// histogram_quantile over the bucket increases between two snapshots (linear in a bucket).
function quantile(q, key, seconds) {
  const now = history[history.length - 1];
  const old = snapshotBefore(seconds);
  if (!now || !old || !now[key] || !old[key]) return null;
  const before = new Map((old[key].buckets || []).map(([le, c]) => [String(le), c]));
  const buckets = (now[key].buckets || []).map(([le, c]) => {
    const prev = before.get(String(le)) || 0;
    return [le === null ? Infinity : le, increase(c, prev)];
  });
  if (!buckets.length) return null;
  const total = buckets[buckets.length - 1][1];
  if (!total) return null;
  const rank = q * total;
  let lowerBound = 0, lowerCount = 0;
  for (const [le, c] of buckets) {
    if (c >= rank) {
      if (le === Infinity) return lowerBound;  // past the last finite bound: report it
      if (c === lowerCount) return le;
      return lowerBound + (le - lowerBound) * (rank - lowerCount) / (c - lowerCount);
    }
    lowerBound = le;
    lowerCount = c;
  }
  return lowerBound;
}

// ---------------------------------------------------------------------------- rendering

function setText(id, text, cls) {
  const e = document.getElementById(id);
  e.textContent = text;
  if (cls !== undefined) {
    e.classList.remove("warn", "bad");
    if (cls) e.classList.add(cls);
  }
}

function renderWarnings(cluster) {
  // E.g. a host whose workers decode on more threads than it has CPUs.
  const box = document.getElementById("warnings");
  const warnings = cluster.warnings || [];
  box.replaceChildren(...warnings.map((w) => el("div", "warning", "⚠ " + w.message)));
  box.hidden = !warnings.length;
}

function renderKpis(cluster) {
  const workers = cluster.workers || [];
  // An idle worker (no model by design, waiting to be placed) is up, not a problem; nor is
  // one asleep (put to sleep when idle, woken on demand) or draining by request.
  const up = workers.filter((w) => ["ready", "busy", "idle", "draining", "asleep"]
    .includes(w.state)).length;
  setText("k-workers", up + " / " + workers.length,
    workers.length && up < workers.length ? "warn" : (workers.length ? "" : "bad"));
  let busy = 0, total = 0, queued = 0, capacity = 0;
  for (const w of workers) {
    if (w.state === "down" || w.state === "asleep") continue;
    busy += w.slots_busy || 0;
    total += w.slots_total || 0;
    queued += w.queue_depth || 0;
    capacity += (w.tokens_per_second || 0) * (w.slots_total || 1);
  }
  setText("k-slots", busy + " / " + total, total && busy >= total ? "warn" : "");
  setText("k-queue", String(queued), queued > 0 ? "warn" : "");
  document.getElementById("k-tps-sub").textContent =
    capacity ? "capacity ≈ " + fmtNum(capacity) + "/s" : "";
}

function renderRates() {
  const s = history[history.length - 1];
  if (!s || s.available === false) {
    for (const id of ["k-tps", "k-rps", "k-eps", "k-ttft", "k-lat"]) setText(id, "–", "");
    document.getElementById("k-rps-sub").textContent = "metrics unavailable";
    return;
  }
  const tps = rate((x) => (x.tokens || {}).completion || 0, RATE_WINDOW_S);
  const rps = rate((x) => sumValues(x.requests), RATE_WINDOW_S);
  const eps = rate((x) => {
    let e = 0;
    for (const k in x.requests || {}) if (isErrorStatus(k)) e += x.requests[k];
    return e;
  }, RATE_WINDOW_S);
  setText("k-tps", fmtNum(tps), "");
  setText("k-rps", fmtNum(rps, rps !== null && rps < 10 ? 2 : 0), "");
  setText("k-eps", fmtNum(eps, eps !== null && eps < 10 ? 2 : 0), eps > 0 ? "bad" : "");
  document.getElementById("k-rps-sub").textContent = fmtNum(sumValues(s.requests), 0) + " total";
  const rej = sumValues(s.rejected), retr = sumValues(s.retries);
  document.getElementById("k-eps-sub").textContent =
    fmtNum(rej, 0) + " rejected · " + fmtNum(retr, 0) + " retried";
  const t50 = quantile(0.5, "ttft", PCT_WINDOW_S), t95 = quantile(0.95, "ttft", PCT_WINDOW_S);
  const l50 = quantile(0.5, "latency", PCT_WINDOW_S), l95 = quantile(0.95, "latency", PCT_WINDOW_S);
  setText("k-ttft", fmtSeconds(t50), "");
  setText("k-lat", fmtSeconds(l50), "");
  document.getElementById("k-ttft-sub").textContent =
    (t95 === null ? "" : "p95 " + fmtSeconds(t95) + " · ") + "last minute";
  document.getElementById("k-lat-sub").textContent =
    (l95 === null ? "" : "p95 " + fmtSeconds(l95) + " · ") + "last minute";
  chartPoints.push({ t: s.time, tps: tps || 0, rps: rps || 0 });
  while (chartPoints.length && s.time - chartPoints[0].t > CHART_SPAN_S) chartPoints.shift();
  renderReasons(s);
}

function renderReasons(s) {
  const box = document.getElementById("reasons");
  box.replaceChildren();
  const groups = [
    ["Requests by status", s.requests, isErrorStatus],
    ["Rejected", s.rejected, () => true],
    ["Retried", s.retries, () => false],
    ["Upstream errors", s.upstream_errors, () => true],
  ];
  let any = false;
  for (const [title, obj, bad] of groups) {
    const keys = Object.keys(obj || {}).filter((k) => obj[k] > 0).sort(naturalCompare);
    if (!keys.length) continue;
    any = true;
    box.append(el("div", "reason-group", title));
    for (const k of keys) {
      const row = el("div", "reason" + (bad(k) ? " bad" : ""));
      row.append(el("span", "k", k || "(none)"), el("span", "v", fmtNum(obj[k], 0)));
      box.append(row);
    }
  }
  if (!any) box.append(el("div", "empty", "no requests yet"));
}

function roleIn(placement, id) {
  if (placement.mode === "split") return placement.head === id ? "head" : "shard";
  return "replica";
}

function renderPlacements(cluster) {
  const box = document.getElementById("placements");
  const byId = new Map((cluster.workers || []).map((w) => [w.id, w]));
  const placements = (cluster.placements || []).slice().sort((a, b) => naturalCompare(a.model, b.model));
  box.replaceChildren();
  if (!placements.length) {
    // No placement plan: show the models the workers serve, as replicas.
    const models = new Map();
    for (const w of cluster.workers || []) {
      for (const m of w.models || []) {
        if (!models.has(m)) models.set(m, []);
        models.get(m).push(w.id);
      }
    }
    for (const [m, ids] of models) placements.push({ model: m, mode: "replica", workers: ids });
  }
  for (const p of placements) {
    const card = el("div", "placement");
    card.dataset.model = p.model;
    if (p.state === "unplaceable") {
      // Fits no worker and no split of them: say so, with the numbers, never just omit it.
      card.dataset.state = "unplaceable";
      const title = el("div", "name", p.model);
      title.append(el("span", "badge unplaceable", "unplaceable"));
      card.append(title, el("div", "reason-text", p.reason || "fits no worker"));
      box.append(card);
      continue;
    }
    const name = el("div", "name", p.model);
    name.append(el("span", "badge " + (p.mode === "split" ? "split" : "replica"),
      p.mode === "split" ? "split" : "replica ×" + (p.workers || []).length));
    // A load (on demand) or a drain in progress: say so on the model's card.
    if (p.state && p.state !== "ready") name.append(el("span", "badge " + p.state, p.state));
    const chips = el("div", "chips");
    for (const id of p.workers || []) {
      const w = byId.get(id);
      const chip = el("span", "chip mono", id);
      chip.dataset.state = w ? w.state : "down";
      if (p.mode === "split" && p.head === id) chip.append(el("span", "role", "head"));
      chips.append(chip);
    }
    card.append(name, chips);
    box.append(card);
  }
  if (!placements.length) box.append(el("div", "empty", "no model is being served"));
  document.getElementById("models-note").textContent =
    placements.length ? placements.length + (placements.length === 1 ? " model" : " models") : "";
}

function stat(label, value, cls) {
  const s = el("div", "stat");
  s.append(el("div", "l", label), el("div", "v" + (cls ? " " + cls : ""), value));
  return s;
}

function workerCard(w, placements) {
  const card = el("article", "worker");
  card.dataset.workerId = w.id;
  card.dataset.state = w.state || "down";

  const head = el("div", "w-head");
  const title = el("div");
  title.append(el("div", "w-id mono", w.id), el("div", "w-url mono", w.url || ""));
  const pill = el("span", "state", w.state || "unknown");
  pill.dataset.state = w.state || "down";
  head.append(title, pill);

  const hw = w.hardware || {};
  const hwLine = el("div", "w-hw");
  const cpu = el("b", null, hw.cpu || "unknown CPU");
  hwLine.append(cpu);
  const cores = [];
  if (hw.cores) cores.push(hw.cores + " cores");
  if (hw.threads) cores.push(hw.threads + " threads");
  if (hw.hostname) cores.push("host " + hw.hostname);
  if (cores.length) hwLine.append(document.createTextNode(" · " + cores.join(" · ")));
  const dev = el("div", "w-hw");
  dev.append(document.createTextNode("backend "), el("b", null, w.backend || "?"),
    document.createTextNode(" on "), el("b", null, hw.device || "CPU"));
  if (hw.devices && hw.devices.length > 1) {
    dev.append(document.createTextNode(" (" + hw.devices.join(", ") + ")"));
  }

  const stats = el("div", "w-stats");
  const busy = w.slots_busy || 0, total = w.slots_total || 0;
  stats.append(
    stat("Slots", busy + " / " + total, total && busy >= total ? "warn" : ""),
    stat("Queue", String(w.queue_depth || 0), w.queue_depth ? "warn" : ""),
    stat("In flight", w.inflight === undefined ? "–" : String(w.inflight)),
    stat("Prefill tok/s", w.prefill_tokens_per_second ? fmtNum(w.prefill_tokens_per_second) : "–"),
    stat("Decode tok/s/slot", fmtNum(w.decode_tokens_per_second || w.tokens_per_second)),
  );
  const slots = el("div", "slots");
  slots.title = busy + " of " + total + " slots busy";
  if (total <= 32) {
    for (let i = 0; i < total; i++) slots.append(el("span", "slot" + (i < busy ? " on" : "")));
  }

  const mem = w.memory || {};
  const memBox = el("div", "w-mem");
  if (mem.total) {
    const used = Math.max(0, mem.total - (mem.available || 0));
    const frac = Math.min(1, used / mem.total);
    const bar = el("div", "bar" + (frac > 0.9 ? " hot" : ""));
    const fill = el("i");
    fill.style.width = (frac * 100).toFixed(1) + "%";
    bar.append(fill);
    memBox.append(el("span", null, "memory " + fmtBytes(mem.available) + " free of " + fmtBytes(mem.total)), bar);
  }

  const models = el("div", "w-models");
  const roles = new Map();
  for (const p of placements) {
    if ((p.workers || []).includes(w.id)) roles.set(p.model, roleIn(p, w.id));
  }
  const own = w.placement || {};  // the gateway's placement record for this worker, if any
  if (own.model && !roles.has(own.model)) roles.set(own.model, own.role || "replica");
  for (const m of w.models || []) if (!roles.has(m)) roles.set(m, "replica");
  // A worker holding several models reports each one (per_model): its own state, a load
  // or drain in progress, download progress.
  const perModel = new Map((w.per_model || []).map((m) => [m.name, m]));
  for (const m of perModel.keys()) if (!roles.has(m)) roles.set(m, "replica");
  const chipState = { ready: "ready", loading: "loading", fetching: "loading",
    draining: "draining", failed: "down" };
  for (const [m, role] of roles) {
    const chip = el("span", "chip mono", m);
    const pm = perModel.get(m);
    chip.dataset.state = pm ? (chipState[pm.state] || "down") : (w.state || "down");
    if (role !== "replica") chip.append(el("span", "role", role));
    if (pm && pm.state !== "ready") {
      const dlm = pm.download;
      chip.append(el("span", "role", dlm && dlm.state === "downloading" && dlm.total
        ? "fetching " + Math.floor((100 * dlm.bytes) / dlm.total) + "%" : pm.state));
    } else if (pm && pm.slots_busy) {
      chip.append(el("span", "role", pm.slots_busy + "/" + pm.slots_total));
    }
    models.append(chip);
  }
  if (!roles.size) {
    models.append(el("span", "empty", w.state === "idle" ? "idle: waiting to be placed"
      : "no model placed"));
  }
  // Placement progress from the worker (worker.control): a model download, a broken split.
  const pl = w.placement || {};
  const dl = pl.download;
  if (dl && dl.state === "downloading" && dl.total) {
    models.append(el("span", "empty", "fetching " + dl.model + " " +
      Math.floor((100 * dl.bytes) / dl.total) + "% of " + fmtBytes(dl.total)));
  } else if ((pl.state === "loading" || pl.state === "fetching") && !perModel.size) {
    models.append(el("span", "empty", "loading " + (pl.model || "") + " as " + pl.role));
  } else if (pl.state === "broken" && pl.error) {
    models.append(el("span", "empty", "placement broken: " + pl.error));
  }

  // Lifecycle (gateway/lifecycle.py, worker/polite.py): why it takes no new work.
  if (w.state === "draining") {
    models.append(el("span", "empty", "draining: finishing its requests, taking no new ones"));
  } else if (w.state === "asleep") {
    models.append(el("span", "empty", "asleep" + (w.wake && w.wake.mac ? ": wakes on demand ("
      + w.wake.mac + ")" : "")));
  }
  if (w.capacity === 0 && w.polite) {
    models.append(el("span", "empty", "yielding to the box's owner" +
      (w.polite.reason ? ": " + w.polite.reason : "")));
  }
  card.append(head, hwLine, dev, stats);
  if (total <= 32) card.append(slots);
  card.append(memBox, models);
  const problem = w.last_error || own.error;
  if (problem && w.state !== "ready" && w.state !== "busy") {
    card.append(el("div", "w-error", String(problem)));
  }
  return card;
}

function renderWorkers(cluster) {
  const box = document.getElementById("workers");
  const workers = (cluster.workers || []).slice().sort((a, b) => naturalCompare(a.id, b.id));
  const placements = cluster.placements || [];
  box.replaceChildren(...workers.map((w) => workerCard(w, placements)));
  if (!workers.length) box.append(el("div", "empty", "no workers have joined yet"));
  const counts = {};
  for (const w of workers) counts[w.state] = (counts[w.state] || 0) + 1;
  document.getElementById("workers-note").textContent = Object.keys(counts).sort()
    .map((k) => counts[k] + " " + k).join(" · ");
}

function renderChart() {
  const canvas = document.getElementById("chart");
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const css = getComputedStyle(document.documentElement);
  const line = css.getPropertyValue("--line").trim();
  ctx.strokeStyle = line;
  ctx.lineWidth = 1;
  for (let i = 0; i <= 3; i++) {
    const y = 4 + (h - 8) * i / 3;
    ctx.beginPath(); ctx.moveTo(0, y); ctx.lineTo(w, y); ctx.stroke();
  }
  if (chartPoints.length < 2) return;
  const tEnd = chartPoints[chartPoints.length - 1].t, tStart = tEnd - CHART_SPAN_S;
  const x = (t) => (t - tStart) / CHART_SPAN_S * w;
  const series = [["tps", css.getPropertyValue("--tok").trim()], ["rps", css.getPropertyValue("--req").trim()]];
  for (const [key, colour] of series) {
    const max = Math.max(1e-9, ...chartPoints.map((p) => p[key]));
    ctx.strokeStyle = colour;
    ctx.lineWidth = 2;
    ctx.beginPath();
    chartPoints.forEach((p, i) => {
      const y = h - 4 - (h - 8) * (p[key] / max);
      if (i === 0) ctx.moveTo(x(p.t), y); else ctx.lineTo(x(p.t), y);
    });
    ctx.stroke();
    if (key === "tps") {  // tokens as a filled area under their line, requests as a line
      ctx.lineTo(x(chartPoints[chartPoints.length - 1].t), h - 4);
      ctx.lineTo(x(chartPoints[0].t), h - 4);
      ctx.closePath();
      ctx.globalAlpha = 0.25;
      ctx.fillStyle = colour;
      ctx.fill();
      ctx.globalAlpha = 1;
    }
    ctx.fillStyle = colour;
    ctx.font = "12px system-ui, sans-serif";
    ctx.fillText("max " + fmtNum(max) + (key === "tps" ? " tok/s" : " req/s"), 6, key === "tps" ? 16 : 32);
  }
}

function setConn(state, text) {
  const c = document.getElementById("conn");
  c.dataset.conn = state;
  document.getElementById("conn-text").textContent = text;
}

// ---------------------------------------------------------------------------- loop

async function tick() {
  let ok = true;
  try {
    const cluster = await getJSON("cluster");
    renderWarnings(cluster);
    renderKpis(cluster);
    renderPlacements(cluster);
    renderWorkers(cluster);
  } catch (err) {
    ok = false;
    setConn("lost", "gateway unreachable — showing last known state");
    for (const card of document.querySelectorAll(".worker")) card.classList.add("stale");
  }
  try {
    const s = await getJSON("dashboard/summary");
    history.push(s);
    while (history.length && s.time - history[0].time > HISTORY_S) history.shift();
    renderRates();
    renderChart();
  } catch (err) {
    // Rates stay as they were; the topology above is what matters most.
  }
  if (ok) {
    setConn("live", "live");
    document.getElementById("updated").textContent =
      "updated " + new Date().toLocaleTimeString();
    document.body.dataset.updated = String(Date.now());
  }
  setTimeout(tick, POLL_MS);
}

document.getElementById("endpoint").textContent = window.location.host;
window.addEventListener("resize", renderChart);
tick();
