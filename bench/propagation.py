"""`raftmesh bench propagation`: a policy change, from the API's acknowledgement until every
affected agent has applied it (issue #5 `propagation`); `raftmesh bench dns-propagation` the
same for a change of the cluster's DNS settings (issue #23; bench/dns_propagation.py).

Target: p99 <= 1 s at 1,000 agents and <= 2 s at 10,000. 3 replicas (`--replicas`; durable
journals) and light agents (lab/light_agents.py: real protocol, every request signed, every
frame's cluster signature verified, every applied version acked) run on this machine, spread
over the replicas (agent i streams from replica i mod their number). Sizes grow on one
cluster: the agents of the first size stay connected while more register for the next.

The policy (harness.policy_text) gives every `bench` agent an inbound rule from an
office CIDR to its own addresses on one port; each change flips that port, so every agent
gets one small delta (a new packet filter) and nothing else changes. A DNS change flips the
mesh domain instead: every agent gets one small delta (the DNS settings). Per change and agent:

- apply: the agent verified and applied a netmap at or after the change's version, measured
  from the moment the PUT /api/v1/policy answer reached the benchmark (the issue's "from the
  API's acknowledgement"; a follower may deliver before the leader's answer arrives, so a few
  samples can be slightly negative);
- acked: the agent's POST /machine/ack for it was answered;
- all: per change, the slowest agent's apply (what "until every agent" means).

At the end the replicas' own `raftmesh_netmap_propagation_seconds` histograms (fed by acks,
from the command's time to the ack's arrival) are read back from /metrics, for the measured
changes only (diff of two reads), and printed next to the client-side numbers; they are
bucketed, so their p50/p99 are bucket upper bounds.
"""
from __future__ import annotations

import time
from typing import Callable

from raftmesh.bench import baseline, harness, metrics, report
from raftmesh.lab import processes
from raftmesh.lab.light_agents import LightAgents, default_workers
from raftmesh.lab.local_cluster import LocalCluster

TARGETS_S = {1000: 1.0, 10000: 2.0}  # issue #5: p99 at N agents
METRIC = "raftmesh_netmap_propagation_seconds"


def grow(agents: LightAgents, cluster: LocalCluster, key: str, n: int, concurrency: int,
         progress: report.Progress, label: str) -> dict:
    """Register and connect agents until there are `n` bench agents; returns timings."""
    have = sum(1 for x in agents.nodes if x["hostname"].startswith("la"))
    out = {"registered": 0, "register_s": 0.0, "connect_s": 0.0}
    if n > have:
        progress.update(f"{label}: registering {n - have} agents (concurrency {concurrency})", force=True)
        t = time.monotonic()
        agents.register(n - have, key, prefix="la", concurrency=concurrency)
        out["registered"], out["register_s"] = n - have, time.monotonic() - t
        progress.update(f"{label}: registered {n - have} in {out['register_s']:.1f}s; connecting",
                        force=True)
        t = time.monotonic()
        harness.connect_all(agents, n)
        out["connect_s"] = time.monotonic() - t
    agents.settle()
    return out


def flipper(cluster: LocalCluster, change: str, topology: str) -> Callable[[], dict]:
    """What one measured change does: flip the policy's port, or the DNS domain. Returns
    harness.put_until_accepted's times and version."""
    state = {"port": 22, "domain": "mesh.internal"}

    def policy() -> dict:
        state["port"] = 2222 if state["port"] == 22 else 22
        return harness.put_policy(cluster, state["port"], topology)

    def dns() -> dict:
        state["domain"] = "bench.internal" if state["domain"] == "mesh.internal" else "mesh.internal"
        return harness.put_until_accepted(cluster, "/api/v1/dns", {"domain": state["domain"]})
    return {"policy": policy, "dns": dns}[change]


def measure(agents: LightAgents, cluster: LocalCluster, n: int, changes: int, timeout: float,
            progress: report.Progress, flip: Callable[[], dict]) -> dict:
    """`changes` changes, one after another (each waits for every agent's ack).

    Each change also records the CPU the replicas and the light-agent workers spent from the
    PUT until every agent applied it (delivery) and until every ack was answered: on a machine
    they share, the delivery sum over the CPU count is a floor under the slowest agent's time."""
    replica_pids = [r.pid for r in cluster.replicas if r.pid]
    before = metrics.read_histogram(cluster, METRIC)
    samples_apply, samples_ack, samples_sent, per_change, missing = [], [], [], [], 0
    for c in range(changes):
        threads0 = metrics.read_thread_cpu(cluster)  # scraped outside the process-CPU window
        cpu0 = processes.cpu_seconds(replica_pids), processes.cpu_seconds(agents.pids)
        change = flip()
        agents.wait_applied(change["version"], timeout, prefix="la")
        cpu_applied = processes.cpu_seconds(replica_pids), processes.cpu_seconds(agents.pids)
        threads1 = metrics.read_thread_cpu(cluster)
        rows = agents.wait_version(change["version"], timeout, prefix="la")
        cpu1 = processes.cpu_seconds(replica_pids), processes.cpu_seconds(agents.pids)
        applied = [r["applied"] - change["acked"] for r in rows if r["applied"] is not None]
        acked = [r["acked"] - change["acked"] for r in rows if r["acked"] is not None]
        samples_apply += applied
        samples_ack += acked
        samples_sent += [r["applied"] - change["sent"] for r in rows if r["applied"] is not None]
        missing += len(rows) - len(acked)
        per_change.append({"change": c + 1, "version": change["version"], "agents": len(rows),
                           "api_ms": (change["acked"] - change["sent"]) * 1e3,
                           "all_applied_ms": max(applied) * 1e3 if applied else None,
                           "all_acked_ms": max(acked) * 1e3 if acked else None,
                           "missing": len(rows) - len(acked),
                           "replica_cpu_s": cpu1[0] - cpu0[0], "agent_cpu_s": cpu1[1] - cpu0[1],
                           "delivery_cpu_s": [cpu_applied[0] - cpu0[0], cpu_applied[1] - cpu0[1]],
                           "delivery_cpu_s_by_thread": {k: v - threads0.get(k, 0.0)
                                                        for k, v in threads1.items()}})
        progress.update(f"N={n}: change {c + 1}/{changes}: all {len(rows)} applied after "
                        f"{_ms(per_change[-1]['all_applied_ms'])}, acked after "
                        f"{_ms(per_change[-1]['all_acked_ms'])}", force=True)
        agents.settle(quiet=0.5)
    server = metrics.histogram_since(cluster, METRIC, before)
    return {"agents": n, "changes": per_change, "apply": report.summarize(samples_apply),
            "acked": report.summarize(samples_ack), "from_request": report.summarize(samples_sent),
            "all_applied": report.summarize([p["all_applied_ms"] / 1e3 for p in per_change
                                             if p["all_applied_ms"] is not None]),
            "missing": missing, "server_histogram": server, "samples_apply_s": samples_apply,
            "replica_cpu_s_per_change": sum(p["replica_cpu_s"] for p in per_change) / changes,
            "agent_cpu_s_per_change": sum(p["agent_cpu_s"] for p in per_change) / changes,
            "delivery_cpu_s_per_change": [sum(p["delivery_cpu_s"][i] for p in per_change) / changes
                                          for i in (0, 1)],
            "delivery_cpu_s_by_thread": _mean_by_key([p["delivery_cpu_s_by_thread"]
                                                      for p in per_change])}


def _mean_by_key(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in keys} if rows else {}


def _ms(v):
    return "-" if v is None else f"{v:.0f} ms"


def run(out_dir: str, sizes=(100, 1000), changes: int = 5, workers: int | None = None,
        keepalive: float = 10.0, concurrency: int = 64, timeout: float = 120.0,
        topology: str = "star", replicas: int = 3, change: str = "policy") -> dict:
    """`change`: "policy" or "dns" (what each measured change is, see `flipper`)."""
    workers = workers or default_workers(max(sizes))
    name = bench_name(change)
    per_size = []
    status, failed_size = {}, None
    with harness.BenchRun(name) as bench_run, bench_run.cluster(replicas, keepalive) as cluster:
        keys = harness.setup_cluster(cluster, topology, port=22)
        flip = flipper(cluster, change, topology)
        with bench_run.light_agents(cluster, workers) as agents:
            for n in sorted(sizes):
                try:
                    g = grow(agents, cluster, keys[harness.BENCH_USER], n, concurrency,
                             bench_run.progress, f"N={n}")
                except (RuntimeError, TimeoutError) as e:  # report the sizes reached
                    failed_size = {"agents": n, "error": str(e)[-2000:], "reached": agents.status()}
                    print(f"N={n} not reached: {str(e)[-500:]}")
                    break
                per_size.append({**measure(agents, cluster, n, changes, timeout,
                                           bench_run.progress, flip), "setup": g})
            status = agents.status()

    rows = []
    for s in per_size:
        h = s["server_histogram"]
        rows.append({"agents": s["agents"], "samples": s["apply"]["n"], "p50_ms": s["apply"]["p50_ms"],
                     "p99_ms": s["apply"]["p99_ms"], "max_ms": s["apply"]["max_ms"],
                     "ack_p99_ms": s["acked"]["p99_ms"], "all_p50_ms": s["all_applied"]["p50_ms"],
                     "missing": s["missing"], "server_n": h["count"], "server_p50_le_ms": h["p50_le_ms"],
                     "server_p99_le_ms": h["p99_le_ms"], "server_mean_ms": h["mean_ms"],
                     "register_per_s": (s["setup"]["registered"] / s["setup"]["register_s"])
                     if s["setup"]["register_s"] else None,
                     "delivery_cpu_s": "{:.2f} / {:.2f}".format(*s["delivery_cpu_s_per_change"]),
                     "replica_us_per_delta": s["delivery_cpu_s_per_change"][0] / s["agents"] * 1e6,
                     "agent_us_per_delta": s["delivery_cpu_s_per_change"][1] / s["agents"] * 1e6,
                     "replica_cpu_s": s["replica_cpu_s_per_change"],
                     "agent_cpu_s": s["agent_cpu_s_per_change"]})
    targets = []
    for s in per_size:
        if s["agents"] in TARGETS_S:
            t = TARGETS_S[s["agents"]]
            p99 = s["apply"]["p99_ms"] / 1e3
            targets.append({"agents": s["agents"], "target_p99_s": t, "p99_s": p99,
                            "met": s["missing"] == 0 and p99 <= t})
    result = {"benchmark": name, "machine": bench_run.machine(), "sizes": per_size,
              "config": {"replicas": replicas, "workers": workers, "changes": changes,
                         "stream_keepalive_s": keepalive, "topology": topology,
                         "register_concurrency": concurrency, "change": change},
              "targets": targets, "pids": bench_run.pids, "final_status": status, "table": rows,
              "not_reached": failed_size}
    report.print_table(f"{name}: {change} change -> every agent applied it ({workers} agent "
                       f"processes, {replicas} replicas); ms from the API's answer", rows,
                       ["agents", "samples", "p50_ms", "p99_ms", "max_ms", "ack_p99_ms", "all_p50_ms",
                        "missing", "server_n", "server_p50_le_ms", "server_p99_le_ms", "server_mean_ms",
                        "register_per_s", "delivery_cpu_s", "replica_us_per_delta",
                        "agent_us_per_delta", "replica_cpu_s", "agent_cpu_s"])
    print("server_*: the replicas' raftmesh_netmap_propagation_seconds for the same changes "
          "(command time -> ack arrival; p50/p99 are bucket upper bounds); delivery_cpu_s: CPU "
          "seconds per change of all replicas / all light-agent workers, PUT until every agent "
          "applied it; *_us_per_delta: that CPU per delivered delta (one per agent and change); "
          "replica_cpu_s, agent_cpu_s: the same, PUT to the last ack")
    for s in per_size:
        by_thread = {k: v for k, v in s["delivery_cpu_s_by_thread"].items() if v >= 0.005}
        print(f"{s['agents']} agents: replicas' delivery CPU by thread, s per change (all "
              f"replicas) and µs per delivered delta: " + (", ".join(
                  f"{k} {v:.2f} ({v / s['agents'] * 1e6:.1f} µs)" for k, v in sorted(
                      by_thread.items(), key=lambda kv: -kv[1])) or "-"))
    report.print_p99_targets(targets, lambda t: f" at {t['agents']} agents")
    report.save(out_dir, name, result, lambda: report.plot_cdfs(
        out_dir, name, f"{change} change: API answer -> agent applied (CDF)",
        {f"{s['agents']} agents": s["samples_apply_s"] for s in per_size}))
    return result


# -- CLI: `raftmesh bench propagation` (bench/cli.py) ----------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--sizes", "--agents", default="100,1000",
                        help="comma-separated agent counts, grown on one cluster (default 100,1000)")
    parser.add_argument("--changes", type=int, default=5, help="changes per size")
    harness.add_agent_options(parser)
    parser.add_argument("--timeout", type=float, default=120.0, help="per change")
    parser.add_argument("--topology", choices=["star", "mesh"], default="star",
                        help="star: agents see only the svc nodes; mesh: also every other agent")
    parser.add_argument("--baseline", metavar="TREE",
                        help="first run the same on the raftmesh checkout TREE (e.g. a git "
                             "worktree of main), then print both side by side (bench/baseline.py)")


def bench_name(change: str) -> str:
    return "propagation" if change == "policy" else f"{change}-propagation"


def main(args, change: str = "policy") -> int:
    """0 when every agent applied every change (whether or not within the target), else 1."""
    sizes = [int(x) for x in str(args.sizes).split(",") if x.strip()]
    before = None
    if args.baseline:
        before = baseline.run(args.baseline, [
            bench_name(change), "--sizes", ",".join(map(str, sizes)), "--changes", str(args.changes),
            "--workers", str(args.workers or 0), "--stream-keepalive", str(args.stream_keepalive),
            "--register-concurrency", str(args.register_concurrency), "--timeout", str(args.timeout),
            "--topology", args.topology, "--replicas", str(args.replicas)], args.out,
            timeout=3600 + args.timeout * args.changes * len(sizes))
    result = run(args.out, sizes, args.changes, args.workers or None, args.stream_keepalive,
                 args.register_concurrency, args.timeout, args.topology, args.replicas, change)
    if before is not None:
        compare(args.out, args.baseline, before, result)
    return 1 if result["not_reached"] or any(s["missing"] for s in result["sizes"]) else 0


def compare(out_dir: str, tree: str, before: dict, after: dict) -> None:
    """The baseline's and this run's figures per size, side by side, with their ratios; a
    PNG of the replicas' and agents' CPU per delivered delta, by thread."""
    rows, bars = [], {}
    runs = sorted(((s["agents"], label, s) for label, result in (("baseline", before),
                                                                 ("this", after))
                   for s in result["sizes"]), key=lambda r: r[0])
    for n, label, s in runs:
        per_delta = {k: v / n * 1e6 for k, v in s["delivery_cpu_s_by_thread"].items()
                     if v / n * 1e6 >= 0.5}
        per_delta["light agents"] = s["delivery_cpu_s_per_change"][1] / n * 1e6
        bars[f"{label}, {n} agents"] = per_delta
        rows.append({"code": label, "agents": n, "p50_ms": s["apply"]["p50_ms"],
                     "p99_ms": s["apply"]["p99_ms"], "missing": s["missing"],
                     "replica_us_per_delta": s["delivery_cpu_s_per_change"][0] / n * 1e6,
                     "agent_us_per_delta": per_delta["light agents"],
                     **{f"{k}_us": v for k, v in per_delta.items() if k != "light agents"}})
    columns = ["code", "agents", "p50_ms", "p99_ms", "missing", "replica_us_per_delta",
               "agent_us_per_delta"] + sorted({k for r in rows for k in r if k.endswith("_us")})
    report.print_table(f"propagation side by side: baseline = {tree}, this = this checkout "
                       "(CPU per delivered delta in µs, all replicas)", rows, columns)
    by_size = {}
    for r in rows:
        by_size.setdefault(r["agents"], {})[r["code"]] = r
    for n, pair in sorted(by_size.items()):
        if len(pair) == 2:
            b, a = pair["baseline"], pair["this"]
            print(f"{n} agents, this / baseline: p99 {_ratio(a['p99_ms'], b['p99_ms'])}, replica "
                  f"CPU per delta {_ratio(a['replica_us_per_delta'], b['replica_us_per_delta'])}, "
                  f"agent CPU per delta {_ratio(a['agent_us_per_delta'], b['agent_us_per_delta'])}")
    report.write_json(out_dir, "propagation-compare", {"baseline": tree, "rows": rows})
    path = report.plot_bars(out_dir, "propagation-compare", "CPU per delivered delta (µs), "
                              "by replica thread (all replicas) and light agents", "µs", bars)
    print(f"comparison plot: {path}")


def _ratio(new, old) -> str:
    return "-" if not new or not old else f"{new / old:.2f}x"
