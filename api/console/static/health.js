// Live health: this replica's histograms (netmap propagation, revoke, connection set-up)
// and open streams from /metrics, as charts that move without reloading.
import { el, every } from "./dom.js";

const REFRESH_MS = 2000;
const KEEP = 60;  // samples on a chart (two minutes)
const SVG = "http://www.w3.org/2000/svg";
const HISTOGRAMS = [
  ["raftmesh_netmap_propagation_seconds", "Netmap propagation (s)", 1],
  ["raftmesh_revoke_seconds", "Revoke (s)", 0.5],
  ["raftmesh_connect_setup_seconds", "Connection set-up (s)", null],
];

// Prometheus text format: {name: [{labels, value}]} for the lines we read.
export function parseMetrics(text) {
  const out = {};
  for (const line of text.split("\n")) {
    const m = /^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = Object.fromEntries([...(m[2] ?? "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((l) => [l[1], l[2]]));
    (out[m[1]] ??= []).push({ labels, value: Number(m[3]) });
  }
  return out;
}

// Cumulative buckets [[le, count]] -> the upper bound holding quantile q (bucketed, like Prometheus).
export function quantile(buckets, q) {
  const total = buckets.at(-1)?.[1] ?? 0;
  if (!total) return null;
  const hit = buckets.find(([, count]) => count >= q * total);
  return hit && Number.isFinite(hit[0]) ? hit[0] : (buckets.at(-2)?.[0] ?? null);
}

function bucketsOf(metrics, name) {
  return (metrics[`${name}_bucket`] ?? []).map((b) => [b.labels.le === "+Inf" ? Infinity : Number(b.labels.le), b.value])
    .sort((a, b) => a[0] - b[0]);
}

function chart(label, series, target) {
  const values = series.flatMap((s) => s.points).filter((v) => v != null).concat(target ?? []);
  const top = Math.max(...values, 1e-3) * 1.1;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("viewBox", "0 0 300 100");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `${label}: ${series.map((s) => `${s.name} ${s.points.at(-1) ?? "no data"}`).join(", ")}`);
  const y = (v) => 95 - (v / top) * 85;
  const line = (cls, pts) => {
    const p = document.createElementNS(SVG, "polyline");
    p.setAttribute("class", cls);
    p.setAttribute("points", pts.map(([x, v]) => `${x.toFixed(1)},${y(v).toFixed(1)}`).join(" "));
    svg.append(p);
  };
  for (const s of series) {
    line(s.cls, s.points.map((v, i) => [i * 300 / (KEEP - 1), v]).filter(([, v]) => v != null));
  }
  if (target != null) line("target", [[0, target], [300, target]]);
  const t = document.createElementNS(SVG, "text");
  t.setAttribute("x", "2");
  t.setAttribute("y", "9");
  t.textContent = `max ${top.toPrecision(2)}`;
  svg.append(t);
  return svg;
}

export async function render(main) {
  const grid = el("div", { class: "charts" });
  const note = el("p", { class: "muted" }, "This replica's figures, every 2 s. Lines: p50 (blue), p99 (red), target (dashed); histograms are bucketed, so quantiles are bucket bounds.");
  main.append(note, grid);
  const history = { streams: [] };
  for (const [name] of HISTOGRAMS) history[name] = { p50: [], p99: [], count: [] };
  const push = (list, v) => { list.push(v); if (list.length > KEEP) list.shift(); };
  const sample = async () => {
    const response = await fetch("/metrics", { credentials: "same-origin" });
    const metrics = parseMetrics(await response.text());
    const figures = HISTOGRAMS.map(([name, label, target]) => {
      const h = history[name], buckets = bucketsOf(metrics, name);
      const count = buckets.at(-1)?.[1] ?? 0;
      push(h.p50, quantile(buckets, 0.5));
      push(h.p99, quantile(buckets, 0.99));
      push(h.count, count);
      return el("figure", { id: `chart-${name}` }, el("figcaption", {}, `${label}: ${count} observed`),
        chart(label, [{ name: "p50", cls: "p50", points: h.p50 }, { name: "p99", cls: "p99", points: h.p99 }], target));
    });
    const streams = metrics.raftmesh_map_streams?.[0]?.value ?? 0;
    push(history.streams, streams);
    figures.push(el("figure", { id: "chart-streams" }, el("figcaption", {}, `Open agent streams: ${streams}`),
      chart("Open agent streams", [{ name: "streams", cls: "p50", points: history.streams }], null)));
    grid.replaceChildren(...figures);
  };
  await sample();
  return every(REFRESH_MS, sample);
}
