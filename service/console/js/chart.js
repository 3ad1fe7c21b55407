// A loss chart as inline SVG: train loss (solid line) and validation loss (dashed, dots) by step.

import { svg } from "./dom.js";

const PAD = { left: 52, right: 16, top: 16, bottom: 40 };

function ticks(lo, hi, n) {
  if (hi <= lo) return [lo];
  const step = (hi - lo) / (n - 1);
  return Array.from({ length: n }, (_, i) => lo + i * step);
}

function fmt(x) {
  return Math.abs(x) >= 100 ? x.toFixed(0) : Math.abs(x) >= 10 ? x.toFixed(1) : x.toFixed(2);
}

// series: [{name, points: [[step, value]], dashed, dots}]; drawn W user units wide (the box's
// width in CSS pixels: the text keeps its size on every screen).
export function lossChart(series, label, W = 640) {
  const H = Math.round(Math.min(260, Math.max(200, W * 0.45)));
  const all = series.flatMap((s) => s.points);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": label });
  chart.append(svg("title", {}, label));
  if (!all.length) {
    chart.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "axis" }, "No loss reported yet"));
    return chart;
  }
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs, Math.min(...xs) + 1)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (y1 - y0 < 1e-6) [y0, y1] = [y0 - 0.5, y1 + 0.5];
  const x = (v) => PAD.left + ((v - x0) / (x1 - x0)) * (W - PAD.left - PAD.right);
  const y = (v) => H - PAD.bottom - ((v - y0) / (y1 - y0)) * (H - PAD.top - PAD.bottom);
  for (const v of ticks(y0, y1, 5)) {
    chart.append(
      svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v), class: "grid" }),
      svg("text", { x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end", class: "axis" }, fmt(v)),
    );
  }
  for (const v of ticks(x0, x1, 5)) {
    chart.append(svg("text", { x: x(v), y: H - PAD.bottom + 18, "text-anchor": "middle", class: "axis" }, Math.round(v)));
  }
  chart.append(
    svg("line", { x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: H - PAD.bottom, class: "frame" }),
    svg("line", { x1: PAD.left, x2: W - PAD.right, y1: H - PAD.bottom, y2: H - PAD.bottom, class: "frame" }),
    svg("text", { x: (W + PAD.left) / 2, y: H - 6, "text-anchor": "middle", class: "axis" }, "step"),
  );
  series.forEach((s, i) => {
    if (!s.points.length) return;
    const d = s.points.map((p, j) => `${j ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
    chart.append(svg("path", { d, class: `series s${i}${s.dashed ? " dashed" : ""}`, "data-series": s.name }));
    if (s.dots || s.points.length === 1) {
      for (const p of s.points) chart.append(svg("circle", { cx: x(p[0]), cy: y(p[1]), r: 3.5, class: `dot s${i}` }));
    }
    const lx = W - PAD.right - 140;
    const ly = PAD.top + 8 + i * 18;
    chart.append(
      svg("line", { x1: lx, x2: lx + 24, y1: ly, y2: ly, class: `series s${i}${s.dashed ? " dashed" : ""}` }),
      svg("text", { x: lx + 30, y: ly + 4, class: "legend" }, s.name),
    );
  });
  return chart;
}
