// The charts of the last 15 minutes, drawn by the vendored uPlot from /dashboard/api/history.
/* global uPlot */

const COLORS = ["#2454c5", "#d9480f", "#2b8a3e", "#ae3ec9", "#0b7285", "#e67700", "#c2255c", "#5f3dc4"];
const HEIGHT = 170;

// Each chart: which series it draws from a history answer, as [label, values] pairs.
const CHARTS = {
  "chart-tokens": (h) => h.models.map((m) => [m, h.tokens_per_s[m]]),
  "chart-requests": (h) => h.models.map((m) => [m, h.requests_per_s[m]]),
  "chart-ttft": (h) => [["p50", h.ttft_p50_ms], ["p99", h.ttft_p99_ms]],
  "chart-queue": (h) => h.models.map((m) => [m, h.queue_depth[m]]),
  "chart-errors": (h) => [["429s", h.rate_limited_per_s], ["errors", h.errors_per_s]],
  "chart-failovers": (h) => [["failovers", h.failovers_per_s]],
};

class Chart {
  constructor(box) {
    this.box = box;
    this.plot = null;
    this.labels = "";
    this.empty = box.appendChild(document.createElement("div"));
    this.empty.className = "empty";
    this.empty.textContent = "no data yet";
    new ResizeObserver(() => this.plot && this.plot.setSize(this.size())).observe(box);
  }

  size() {
    return { width: Math.max(200, this.box.clientWidth), height: HEIGHT };
  }

  update(t, series) {
    const labels = series.map(([label]) => label).join("\n");
    const data = [t, ...series.map(([, values]) => values)];
    if (!this.plot || labels !== this.labels) {
      if (this.plot) this.plot.destroy();
      this.labels = labels;
      this.plot = new uPlot({
        ...this.size(),
        scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
        series: [{}, ...series.map(([label], i) => ({ label, stroke: COLORS[i % COLORS.length], width: 1.5,
                                                       spanGaps: false }))],
        axes: [{}, { size: 48 }],
        legend: { show: true },
      }, data, this.box);
    } else {
      this.plot.setData(data);
    }
    // How many points have a value above zero: what a glance (or a test) checks for "the chart shows load".
    const points = series.reduce((n, [, values]) => n + values.filter((v) => v !== null && v > 0).length, 0);
    this.box.dataset.points = String(points);
    this.empty.hidden = t.length > 0;
  }
}

export class Charts {
  constructor() {
    this.charts = Object.fromEntries(Object.keys(CHARTS).map((id) => [id, new Chart(document.getElementById(id))]));
  }

  render(history) {
    for (const [id, pick] of Object.entries(CHARTS)) this.charts[id].update(history.t, pick(history));
  }
}
