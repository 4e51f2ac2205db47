// Corral dashboard: the topology map (boxes and measured links). Its own file and its own
// poll of GET /cluster (links: from, to, rtt_ms, mbit_s), so it stays out of dashboard.js.
// The gateway is drawn in the middle, workers on a circle; a link's label is its RTT (and
// throughput when a worker-to-worker probe measured one). No library: plain SVG.
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const el = (name, attrs, text) => {
    const e = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  function draw(cluster) {
    const svg = document.getElementById("topology");
    if (!svg) return;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const workers = (cluster.workers || []).map((w) => w.id).sort();
    const W = 640, H = 320, cx = W / 2, cy = H / 2, r = Math.min(W, H) / 2 - 40;
    const pos = new Map([["gateway", [cx, cy]]]);
    workers.forEach((id, i) => {
      const a = (2 * Math.PI * i) / Math.max(1, workers.length) - Math.PI / 2;
      pos.set(id, [cx + r * Math.cos(a) * 1.6, cy + r * Math.sin(a)]);
    });
    for (const l of cluster.links || []) {
      const a = pos.get(l.from), b = pos.get(l.to);
      if (!a || !b || l.rtt_ms == null) continue;
      const worker = l.from !== "gateway";
      svg.appendChild(el("line", { x1: a[0], y1: a[1], x2: b[0], y2: b[1],
        class: worker ? "link peer" : "link", "data-from": l.from, "data-to": l.to }));
      const label = l.rtt_ms.toFixed(2) + " ms" + (l.mbit_s ? " · " + Math.round(l.mbit_s) + " Mbit/s" : "");
      svg.appendChild(el("text", { x: (a[0] + b[0]) / 2, y: (a[1] + b[1]) / 2 - 4,
        class: "link-label" }, label));
    }
    for (const [id, [x, y]] of pos) {
      svg.appendChild(el("circle", { cx: x, cy: y, r: 8, class: id === "gateway" ? "box gw" : "box" }));
      svg.appendChild(el("text", { x: x, y: y + 22, class: "box-label" }, id));
    }
  }
  async function poll() {
    try {
      const token = sessionStorage.getItem("corral-token");
      const r = await fetch("cluster", { cache: "no-store",
        headers: token ? { Authorization: "Bearer " + token } : {} });
      if (r.ok) draw(await r.json());
    } catch (e) { /* the main dashboard reports fetch failures */ }
  }
  poll();
  setInterval(poll, 2000);
})();
