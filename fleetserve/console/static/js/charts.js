// Time-series charts over a deployment's /metrics `series`, drawn with the vendored uPlot.

import { h, num } from "./ui.js";

export const CHARTS = [
  { id: "requests", title: "Requests/s", series: [{ key: "requests_per_s", label: "requests/s" }], digits: 2 },
  {
    id: "ttft", title: "Time to first token (ms)", digits: 0,
    series: [{ key: "ttft_p50_ms", label: "p50" }, { key: "ttft_p95_ms", label: "p95" }],
  },
  { id: "tokens", title: "Tokens/s", series: [{ key: "tokens_per_s", label: "tokens/s" }], digits: 1 },
  {
    id: "queue", title: "Queue depth and running", digits: 0,
    series: [{ key: "queue_depth", label: "waiting" }, { key: "running", label: "running" }],
  },
  {
    id: "replicas", title: "Replicas and load", digits: 0,
    series: [{ key: "replicas", label: "ready" }, { key: "desired_replicas", label: "desired" },
      { key: "in_flight", label: "in flight" }],
  },
  {
    id: "kv", title: "KV cache usage (%)", digits: 1,
    series: [{ key: "kv_usage", label: "KV usage", scale: 100 }], max: 100,
  },
];

const INTEGER_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000];

const cssVar = (name, fallback) =>
  getComputedStyle(document.documentElement).getPropertyValue(name).trim() || fallback;

function palette() {
  return [cssVar("--chart-1", "#2563eb"), cssVar("--chart-2", "#db2777")];
}

// One chart card; returns {element, update(points)}.
export function chart(def) {
  const value = h("span", { class: "chart-value" }, "—");
  const plotBox = h("div", { class: "chart-plot" });
  const empty = h("p", { class: "chart-empty muted" }, "No data yet");
  const element = h("figure", { class: "card chart", dataset: { chart: def.id }, role: "group", "aria-label": def.title },
    h("figcaption", {}, h("span", { class: "chart-title" }, def.title), value),
    plotBox, empty);
  let plot = null;
  let observer = null;
  let last = [[]];

  const make = () => {
    if (plot || !window.uPlot || !plotBox.isConnected) return;
    const width = Math.max(200, plotBox.clientWidth);
    const colors = palette();
    const axisColor = cssVar("--muted", "#6b7280");
    const gridColor = cssVar("--grid", "rgba(128,128,128,0.15)");
    const axis = { stroke: axisColor, grid: { stroke: gridColor, width: 1 }, ticks: { stroke: gridColor, width: 1 },
      font: "11px system-ui, sans-serif" };
    plot = new window.uPlot({
      width, height: 160,
      cursor: { drag: { x: false, y: false } },
      legend: { show: def.series.length > 1 },
      scales: { x: { time: true }, y: { range: (_u, _min, max) => [0, def.max ?? Math.max(1, max * 1.15)] } },
      // counts get whole-number ticks; rates keep uPlot's own decimal steps
      axes: [{ ...axis }, { ...axis, size: 46, ...(def.digits === 0 ? { incrs: INTEGER_STEPS } : {}) }],
      series: [{}, ...def.series.map((s, i) => ({
        label: s.label, stroke: colors[i % colors.length], width: 2, spanGaps: true, points: { show: false },
        fill: def.series.length === 1 ? `${colors[0]}22` : undefined,
        value: (_u, v) => (v === null || v === undefined ? "—" : num(v, def.digits)),
      }))],
    }, last, plotBox);
    observer = new ResizeObserver(() => {
      const w = Math.max(200, plotBox.clientWidth);
      if (plot && Math.abs(w - plot.width) > 1) plot.setSize({ width: w, height: 160 });
    });
    observer.observe(plotBox);
  };

  return {
    element,
    update(points) {
      const xs = points.map((p) => p.ts);
      const ys = def.series.map((s) => points.map((p) =>
        (p[s.key] === null || p[s.key] === undefined ? null : p[s.key] * (s.scale || 1))));
      last = [xs, ...ys];
      empty.hidden = points.length > 0;
      // the newest value of each series (TTFT is null in windows without requests: show the last one seen)
      const latest = (key) => {
        for (let i = points.length - 1; i >= 0; i--) {
          if (points[i][key] !== null && points[i][key] !== undefined) return points[i][key];
        }
        return null;
      };
      value.textContent = points.length
        ? def.series.map((s) => {
          const v = latest(s.key);
          const text = v === null ? "—" : num(v * (s.scale || 1), def.digits);
          return def.series.length > 1 ? `${s.label} ${text}` : text;
        }).join(" · ")
        : "—";
      element.setAttribute("aria-label", `${def.title}: ${value.textContent}`);
      make();
      if (plot) plot.setData(last);
    },
    destroy() {
      if (observer) observer.disconnect();
      if (plot) plot.destroy();
      plot = null;
    },
  };
}
