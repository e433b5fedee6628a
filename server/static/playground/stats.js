// Per-reply figures, measured in the page: time to first token (from sending to the first content), decode
// speed, the usage the server reports (prompt, completion, cached tokens) and the finish reason; and a live
// chart of the stream's rate. The live rate counts stream events (one per engine step, normally one token);
// the final tokens/s uses the server's exact completion token count.

const WINDOW_MS = 1000;     // the live rate: events in the last second

export class ReplyTimer {
  constructor() {
    this.start = performance.now();
    this.first = null;
    this.last = null;
    this.times = [];
    this.oldest = 0;        // the first of `times` inside the window
    this.points = [];       // [ms since the first event, events per second]
  }

  event() {
    const now = performance.now();
    if (this.first === null) this.first = now;
    this.last = now;
    this.times.push(now);
    while (this.times[this.oldest] <= now - WINDOW_MS) this.oldest++;
    const recent = this.times.length - this.oldest;
    const span = Math.min(WINDOW_MS, now - this.first);
    this.points.push([now - this.first, span > 0 ? (recent - 1) / (span / 1000) : 0]);
  }

  /** {label: value} for the reply's stats line. */
  summary(usage, finish) {
    const ms = (v) => `${Math.round(v)} ms`;
    const s = {};
    s.TTFT = this.first === null ? "–" : ms(this.first - this.start);
    const n = usage ? usage.completion_tokens : null;
    s["tokens/s"] = n > 1 && this.last > this.first ? ((n - 1) / ((this.last - this.first) / 1000)).toFixed(1) : "–";
    s.total = ms((this.last ?? performance.now()) - this.start);
    s.prompt = usage ? String(usage.prompt_tokens) : "–";
    s.completion = n === null ? "–" : String(n);
    const cached = usage && usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : null;
    s.cached = cached === null || cached === undefined ? "–" : String(cached);
    s.finish = finish;
    return s;
  }
}

export function statsList(summary) {
  const dl = document.createElement("dl");
  dl.className = "stats";
  for (const [k, v] of Object.entries(summary)) {
    const wrap = document.createElement("div");
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    dd.dataset.stat = k;
    wrap.append(dt, dd);
    dl.append(wrap);
  }
  return dl;
}

/** The live tokens/s chart on a canvas: the rate over time since the first token. */
export function drawChart(canvas, points) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  if (!w || !h) return;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const style = getComputedStyle(canvas);
  const ink = style.color;
  const accent = style.getPropertyValue("--accent").trim() || ink;
  const top = Math.max(1, ...points.map((p) => p[1]));
  const end = Math.max(1000, ...points.map((p) => p[0]));
  const pad = { l: 4, r: 4, t: 14, b: 4 };
  const x = (t) => pad.l + (t / end) * (w - pad.l - pad.r);
  const y = (v) => h - pad.b - (v / top) * (h - pad.t - pad.b);
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = ink;
  g.globalAlpha = 0.7;
  g.fillText(`${top.toFixed(0)} tok/s · ${(end / 1000).toFixed(1)} s`, pad.l, 11);
  g.globalAlpha = 1;
  if (points.length < 2) return;
  g.strokeStyle = accent;
  g.lineWidth = 1.5;
  g.beginPath();
  points.forEach(([t, v], i) => (i ? g.lineTo(x(t), y(v)) : g.moveTo(x(t), y(v))));
  g.stroke();
}
