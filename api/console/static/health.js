// Live health: every replica's histograms (netmap propagation, revoke, connection set-up)
// and open streams, as charts that move without reloading. One request a sample: the
// replica serving the page gathers its peers' figures (/api/v1/cluster/health); a replica
// that does not answer is shown down.
import { call, v1 } from "./api.js";
import { el, every } from "./dom.js";

const REFRESH_MS = 2000;
const KEEP = 60;  // samples on a chart (two minutes)
const SVG = "http://www.w3.org/2000/svg";
const HISTOGRAMS = [
  ["raftmesh_netmap_propagation_seconds", "Netmap propagation (s)", 1],
  ["raftmesh_revoke_seconds", "Revoke (s)", 0.5],
  ["raftmesh_connect_setup_seconds", "Connection set-up (s)", null],
];

// Cumulative buckets [[le, count]] -> the upper bound holding quantile q (bucketed, like Prometheus).
export function quantile(buckets, q) {
  const total = buckets.at(-1)?.[1] ?? 0;
  if (!total) return null;
  const hit = buckets.find(([, count]) => count >= q * total);
  return hit && Number.isFinite(hit[0]) ? hit[0] : (buckets.at(-2)?.[0] ?? null);
}

const bucketsOf = (replica, name) =>
  (replica.histograms?.[name] ?? []).map(([le, count]) => [le === "+Inf" ? Infinity : Number(le), count]);

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

function replicaFigures(replica, history) {
  const name = replica.id ?? replica.raft_addr;
  const head = el("h3", { class: replica.up ? "up" : "down" }, replica.up ? `${name}: up` : `${name}: down (${replica.error ?? "unreachable"})`);
  const figures = HISTOGRAMS.map(([metric, label, target]) => {
    const h = history[metric], buckets = replica.up ? bucketsOf(replica, metric) : [];
    const count = buckets.at(-1)?.[1] ?? 0;
    push(h.p50, quantile(buckets, 0.5));
    push(h.p99, quantile(buckets, 0.99));
    return el("figure", { id: `chart-${name}-${metric}` }, el("figcaption", {}, replica.up ? `${label}: ${count} observed` : `${label}: down`),
      chart(`${name} ${label}`, [{ name: "p50", cls: "p50", points: h.p50 }, { name: "p99", cls: "p99", points: h.p99 }], target));
  });
  const streams = replica.up ? replica.streams : null;
  push(history.streams, streams);
  figures.push(el("figure", { id: `chart-${name}-streams`, class: "streams" },
    el("figcaption", {}, replica.up ? `Open agent streams: ${streams}` : "Open agent streams: down"),
    chart(`${name} open agent streams`, [{ name: "streams", cls: "p50", points: history.streams }], null)));
  return el("section", { "aria-label": `Replica ${name}` },
    head, el("div", { class: "charts" }, ...figures));
}

function push(list, v) { list.push(v); if (list.length > KEEP) list.shift(); }

export async function render(main) {
  const all = el("div", {});
  const note = el("p", { class: "muted" }, "Every replica's figures, every 2 s. Lines: p50 (blue), p99 (red), target (dashed); histograms are bucketed, so quantiles are bucket bounds.");
  main.append(note, all);
  const histories = new Map();  // replica -> its samples
  const historyOf = (key) => {
    if (!histories.has(key)) {
      const h = { streams: [] };
      for (const [metric] of HISTOGRAMS) h[metric] = { p50: [], p99: [] };
      histories.set(key, h);
    }
    return histories.get(key);
  };
  const sample = async () => {
    const { replicas } = await call("GET", v1("/cluster/health"));
    replicas.sort((a, b) => String(a.id ?? a.raft_addr).localeCompare(String(b.id ?? b.raft_addr)));
    all.replaceChildren(...replicas.map((r) => replicaFigures(r, historyOf(r.raft_addr))));
  };
  await sample();
  return every(REFRESH_MS, sample);
}
