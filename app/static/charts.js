// Inline-SVG charts drawn by hand: bars (Figure 4 style), scatter with the y = x line
// (Tables 6–8 style) and lines with a legend (Figure 6 style). Each chart is an <svg role="img"> with a title and a description, so
// screen readers get the numbers too.

import { fmt } from "./ui.js";

const NS = "http://www.w3.org/2000/svg";
const WIDTH = 440;
const HEIGHT = 280;
const PAD = { left: 64, right: 16, top: 28, bottom: 52 };
export const PALETTE = ["#1f5fa8", "#b0451c", "#23734a", "#6d3fa0", "#8a6d00", "#444444"];

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function frame(title, description) {
  const root = svg("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    role: "img",
    class: "chart",
    "aria-label": title,
  });
  root.append(svg("title", {}, title), svg("desc", {}, description));
  root.append(svg("text", { x: WIDTH / 2, y: 16, class: "chart-title", "text-anchor": "middle" }, title));
  return root;
}

function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const step = 10 ** Math.floor(Math.log10((hi - lo) / count));
  const multiple = [1, 2, 5, 10].find((m) => (hi - lo) / (m * step) <= count) ?? 10;
  const size = multiple * step;
  const ticks = [];
  for (let t = Math.ceil(lo / size) * size; t <= hi + size * 1e-9; t += size) ticks.push(t);
  return ticks;
}

function scale(lo, hi, from, to) {
  const span = hi - lo || 1;
  return (value) => from + ((value - lo) / span) * (to - from);
}

function axes(root, x, y, xTicks, yTicks, xLabel, yLabel, tickText = fmt) {
  const bottom = HEIGHT - PAD.bottom;
  root.append(
    svg("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: bottom, y2: bottom, class: "axis" }),
    svg("line", { x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: bottom, class: "axis" }),
  );
  for (const t of yTicks) {
    root.append(
      svg("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: y(t), y2: y(t), class: "gridline" }),
      svg("text", { x: PAD.left - 6, y: y(t) + 4, "text-anchor": "end", class: "tick" }, tickText(t)),
    );
  }
  for (const t of xTicks ?? []) {
    root.append(svg("text", { x: x(t), y: bottom + 16, "text-anchor": "middle", class: "tick" }, fmt(t, 3)));
  }
  root.append(
    svg("text", { x: (PAD.left + WIDTH - PAD.right) / 2, y: HEIGHT - 8, "text-anchor": "middle", class: "axis-label" }, xLabel),
    svg(
      "text",
      { x: 14, y: (PAD.top + bottom) / 2, "text-anchor": "middle", class: "axis-label", transform: `rotate(-90 14 ${(PAD.top + bottom) / 2})` },
      yLabel,
    ),
  );
}

/**
 * Bars with optional ± error whiskers on a log axis (the gaps span decades, as in the
 * paper's Figure 4). bars: [{label, value, error}].
 */
export function barChart({ title, bars, yLabel }) {
  const positive = bars.filter((b) => Number(b.value) > 0);
  const description = bars.map((b) => `${b.label}: ${fmt(b.value)}${b.error ? ` ± ${fmt(b.error)}` : ""}`).join("; ");
  const root = frame(title, description);
  if (!positive.length) return root;
  const tops = positive.map((b) => Number(b.value) + Number(b.error || 0));
  const lows = positive.map((b) => Math.max(Number(b.value) - Number(b.error || 0), Number(b.value) / 10));
  const lo = Math.floor(Math.log10(Math.min(...lows)));
  const hi = Math.ceil(Math.log10(Math.max(...tops)));
  const top = hi > lo ? hi : lo + 1;
  const y = scale(lo, top, HEIGHT - PAD.bottom, PAD.top);
  const yTicks = [];
  for (let e = lo; e <= top; e += 1) yTicks.push(e);
  const slot = (WIDTH - PAD.left - PAD.right) / bars.length;
  axes(root, null, y, null, yTicks, "", yLabel, (e) => `1e${e}`);
  bars.forEach((bar, i) => {
    const cx = PAD.left + slot * (i + 0.5);
    const value = Number(bar.value);
    root.append(svg("text", { x: cx, y: HEIGHT - PAD.bottom + 16, "text-anchor": "middle", class: "tick" }, bar.label));
    if (!(value > 0)) return;
    const yv = y(Math.log10(value));
    root.append(
      svg(
        "rect",
        { x: cx - slot * 0.3, y: yv, width: slot * 0.6, height: HEIGHT - PAD.bottom - yv, fill: PALETTE[i % PALETTE.length], class: "bar" },
        svg("title", {}, `${bar.label}: ${fmt(value)}`),
      ),
    );
    const error = Number(bar.error || 0);
    if (error > 0) {
      const y1 = y(Math.log10(Math.max(value - error, 10 ** lo)));
      const y2 = y(Math.log10(value + error));
      root.append(svg("line", { x1: cx, x2: cx, y1, y2, class: "whisker" }));
    }
  });
  return root;
}

function padded(values) {
  const finite = values.map(Number).filter(Number.isFinite);
  const lo = Math.min(...finite);
  const hi = Math.max(...finite);
  const margin = (hi - lo) * 0.08 || Math.abs(hi) * 0.1 || 1;
  return [lo - margin, hi + margin];
}

/**
 * Points {x, y, label} on independent x and y scales (predicted and actual changes may
 * differ by orders of magnitude), with the y = x line where the two ranges overlap.
 */
export function scatterChart({ title, points, xLabel, yLabel }) {
  const root = frame(title, `${points.length} points. ${title}`);
  if (!points.length) return root;
  const [xlo, xhi] = padded(points.map((p) => p.x));
  const [ylo, yhi] = padded(points.map((p) => p.y));
  const x = scale(xlo, xhi, PAD.left, WIDTH - PAD.right);
  const y = scale(ylo, yhi, HEIGHT - PAD.bottom, PAD.top);
  axes(root, x, y, niceTicks(xlo, xhi, 4), niceTicks(ylo, yhi, 4), xLabel, yLabel);
  const from = Math.max(xlo, ylo);
  const to = Math.min(xhi, yhi);
  if (from < to) root.append(svg("line", { x1: x(from), y1: y(from), x2: x(to), y2: y(to), class: "diagonal" }));
  for (const p of points) {
    root.append(
      svg(
        "circle",
        { cx: x(Number(p.x)), cy: y(Number(p.y)), r: 4, class: "dot", fill: p.color ?? PALETTE[0] },
        svg("title", {}, `${p.label ?? ""} predicted ${fmt(p.x)}, actual ${fmt(p.y)}`),
      ),
    );
  }
  return root;
}

/**
 * Lines {label, points: [{x, y}]} on shared linear axes, with a legend (Figure 6 style).
 * xDomain / yDomain fix the axis ranges (default: the data's).
 */
export function lineChart({ title, lines, xLabel, yLabel, xDomain, yDomain, tickText = fmt }) {
  const description = lines
    .map((line) => {
      const last = line.points[line.points.length - 1];
      return `${line.label}: ${line.points.length} points${last ? `, ending at (${fmt(last.x, 3)}, ${fmt(last.y, 3)})` : ""}`;
    })
    .join("; ");
  const root = frame(title, `${title}. ${description}`);
  const all = lines.flatMap((line) => line.points).filter((p) => Number.isFinite(Number(p.x)) && Number.isFinite(Number(p.y)));
  if (!all.length) return root;
  const [xlo, xhi] = xDomain ?? [Math.min(...all.map((p) => Number(p.x))), Math.max(...all.map((p) => Number(p.x)))];
  const [ylo, yhi] = yDomain ?? [Math.min(...all.map((p) => Number(p.y))), Math.max(...all.map((p) => Number(p.y)))];
  const x = scale(xlo, xhi, PAD.left, WIDTH - PAD.right);
  const y = scale(ylo, yhi, HEIGHT - PAD.bottom, PAD.top);
  axes(root, x, y, niceTicks(xlo, xhi, 5), niceTicks(ylo, yhi, 5), xLabel, yLabel, tickText);
  lines.forEach((line, i) => {
    const color = line.color ?? PALETTE[i % PALETTE.length];
    const path = line.points
      .filter((p) => Number.isFinite(Number(p.x)) && Number.isFinite(Number(p.y)))
      .map((p) => `${x(Number(p.x)).toFixed(1)},${y(Number(p.y)).toFixed(1)}`)
      .join(" ");
    root.append(
      svg(
        "polyline",
        { points: path, fill: "none", stroke: color, "stroke-width": 2, class: "line", "data-label": line.label, ...(line.dash ? { "stroke-dasharray": line.dash } : {}) },
        svg("title", {}, line.label),
      ),
    );
  });
  // legend: bottom right inside the plot area (below the diagonal, where rising curves
  // that end at (1, 1) seldom go); the labels are in the description for screen readers
  const legend = svg("g", { class: "legend", "aria-hidden": "true" });
  const left = WIDTH - PAD.right - 150;
  lines.forEach((line, i) => {
    const color = line.color ?? PALETTE[i % PALETTE.length];
    const ly = HEIGHT - PAD.bottom - 12 - (lines.length - 1 - i) * 16;
    legend.append(
      svg("line", { x1: left, x2: left + 20, y1: ly, y2: ly, stroke: color, "stroke-width": 2, ...(line.dash ? { "stroke-dasharray": line.dash } : {}) }),
      svg("text", { x: left + 26, y: ly + 4, class: "tick legend-label" }, line.label),
    );
  });
  root.append(legend);
  return root;
}
