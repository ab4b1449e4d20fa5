"""`raftmesh bench revoke`: a node revoked through the API until its key is gone from every
peer (issue #5 `revoke`).

Targets: p99 <= 500 ms with real WireGuard, <= 1.5 s at 1,000 light agents.

Two parts, each optional:

- light (`--light N`, default 1,000): N light agents (lab/light_agents.py, the real
  protocol) of user `bench` spread over the replicas (3, or `--replicas`), and one `svc` node
  per round that every agent has as a peer (harness.policy_text). Each round DELETEs
  one svc node through the leader; per agent: from the API's answer until the agent applied
  the netmap without that peer, and until its ack of that version was answered.
- real (`--real K`, default 3; needs root, wireguard-go, nft): K `raftmesh agent up` daemons
  in network namespaces (lab/namespaces.py) with wireguard-go, plus one svc daemon per
  round that all of them have as a WireGuard peer. Each round DELETEs the svc node; per
  daemon: from the API's answer until `wg show <if> peers` no longer lists the node's key
  (one poller thread per daemon, each `ip netns exec ... wg show` is a process, so the
  resolution is one such call, reported as `poll_ms`).

The replicas' `raftmesh_revoke_seconds` histograms (revocation command -> each peer's ack of
the removal) are read back from /metrics for the measured rounds and printed next to these.
"""
from __future__ import annotations

import os
import threading
import time

from raftmesh.bench import harness, metrics, report
from raftmesh.lab import namespaces, processes
from raftmesh.lab.light_agents import default_workers
from raftmesh.lab.local_cluster import LocalCluster

TARGET_REAL_S = 0.5
TARGET_LIGHT_S = 1.5
METRIC = "raftmesh_revoke_seconds"


def timed_request(cluster: LocalCluster, method: str, path: str, body=None,
                  ok: int = 200) -> dict:
    """One revoking request through the leader: when it was sent and answered."""
    leader = cluster.leader()
    sent = time.time()
    status, answer = cluster.request(leader, method, path, body, headers={
        "Content-Type": "application/scim+json"} if path.startswith("/scim/") else None)
    if status != ok:
        raise RuntimeError(f"{method} {path}: {status} {answer}")
    return {"sent": sent, "acked": time.time()}


class DeleteNode:
    """How a round revokes its victim: this benchmark DELETEs it (bench/lockdown.py locks
    its user or deactivates it by SCIM instead)."""

    name = "DELETE node"

    def setup(self, cluster: LocalCluster, keys: dict[str, str]) -> None:
        self.keys = keys

    def victim_key(self, cluster: LocalCluster, r: int) -> str:
        """The auth key round `r`'s victim registers with."""
        return self.keys[harness.SVC_USER]

    def revoke(self, cluster: LocalCluster, node_id: str) -> dict:
        return timed_request(cluster, "DELETE", f"/api/v1/nodes/{node_id}")


# -- light agents ----------------------------------------------------------------------------
def run_light(bench_run: harness.BenchRun, n: int, rounds: int, workers: int | None, keepalive: float,
              concurrency: int, timeout: float, replicas: int = 3) -> dict:
    progress = bench_run.progress
    workers = workers or default_workers(n)
    with bench_run.cluster(replicas, keepalive, subdir=os.path.join("light", "raftmesh")) as cluster:
        keys = harness.setup_cluster(cluster)
        with bench_run.light_agents(cluster, workers) as agents:
            progress.update(f"light: registering {n} agents and {rounds} svc nodes", force=True)
            t = time.monotonic()
            agents.register(n, keys[harness.BENCH_USER], prefix="la", concurrency=concurrency)
            svc = agents.register(rounds, keys[harness.SVC_USER], prefix="svc", concurrency=concurrency)
            register_s = time.monotonic() - t
            progress.update(f"light: registered in {register_s:.1f}s; connecting", force=True)
            harness.connect_all(agents, n)
            agents.settle()
            before = metrics.read_histogram(cluster, METRIC)
            applied, acked, from_sent, per_round, missing = [], [], [], [], 0
            for r, victim in enumerate(svc):
                vid = victim["node_id"]
                having = agents.note_peer(vid)
                d = DeleteNode().revoke(cluster, vid)
                rows = agents.wait_gone(vid, timeout)
                a = [x["applied"] - d["acked"] for x in rows if x["applied"] is not None]
                k = [x["acked"] - d["acked"] for x in rows if x["acked"] is not None]
                applied += a
                acked += k
                from_sent += [x["applied"] - d["sent"] for x in rows if x["applied"] is not None]
                missing += len(rows) - len(k)
                per_round.append({"round": r + 1, "victim": vid, "peers_having_it": having,
                                  "measured": len(rows), "api_ms": (d["acked"] - d["sent"]) * 1e3,
                                  "all_removed_ms": max(a) * 1e3 if a else None,
                                  "all_acked_ms": max(k) * 1e3 if k else None,
                                  "missing": len(rows) - len(k)})
                progress.update(f"light: round {r + 1}/{rounds}: {having} peers had it; all removed "
                                f"after {per_round[-1]['all_removed_ms']:.0f} ms, acked after "
                                f"{per_round[-1]['all_acked_ms'] or float('nan'):.0f} ms", force=True)
                agents.settle(quiet=0.5)
            server = metrics.histogram_since(cluster, METRIC, before)
            status = agents.status()
    return {"agents": n, "workers": workers, "rounds": per_round, "register_s": register_s,
            "removed": report.summarize(applied), "acked": report.summarize(acked),
            "from_request": report.summarize(from_sent), "missing": missing,
            "server_histogram": server, "final_status": status, "samples_removed_s": applied}


# -- real wireguard-go daemons ---------------------------------------------------------------
def run_real(bench_run: harness.BenchRun, k: int, rounds: int, keepalive: float, timeout: float,
             replicas: int = 3, revocation: DeleteNode | None = None, part: str = "real") -> dict:
    """`part`: the folder of this run's cluster (one per run in a BenchRun)."""
    try:
        with harness.namespace_lab() as lab:
            nss = [lab.add(f"p{i}", f"192.0.2.{i + 1}/24") for i in range(k)]
            with bench_run.cluster(replicas, keepalive, subdir=os.path.join(part, "raftmesh"),
                                   host=lab.connect_host()) as cluster:
                return {"daemons": k, **_real_rounds(bench_run, lab, nss, cluster, rounds, timeout,
                                                     revocation or DeleteNode())}
    except harness.LabUnavailable as e:
        return {"skipped": str(e)}


def _real_rounds(bench_run: harness.BenchRun, lab: namespaces.Lab, nss: list[namespaces.Namespace],
                 cluster: LocalCluster, rounds: int, timeout: float, revocation: DeleteNode) -> dict:
    """One daemon per namespace of `nss`, then per round a svc daemon revoked (module doc)."""
    agents: list[namespaces.RealAgent] = []
    progress = bench_run.progress
    try:
        keys = harness.setup_cluster(cluster)
        revocation.setup(cluster, keys)
        servers = [r.api_url for r in cluster.replicas]
        for i, ns in enumerate(nss):
            a = namespaces.RealAgent(lab, ns, bench_run.path, namespaces.rotated(servers, i),
                                     keys[harness.BENCH_USER], f"p{i}")
            a.start()
            agents.append(a)
        for a in agents:
            processes.wait_until(lambda a=a: a.status().get("state") == "connected", 60,
                                 f"agent {a.label} connected")
        before = metrics.read_histogram(cluster, METRIC)
        samples, per_round, polls, missing = [], [], [], 0
        for r in range(rounds):
            ns = lab.add(f"v{r}", f"192.0.2.{100 + r}/24")
            victim = namespaces.RealAgent(lab, ns, bench_run.path, servers,
                                          revocation.victim_key(cluster, r), f"v{r}")
            victim.start()
            node_id = processes.wait_until(lambda: victim.status().get("node_id"), 60, "victim registered")
            status, body = cluster.request(cluster.replicas[0], "GET", f"/api/v1/nodes/{node_id}")
            key = body["node"]["node_key"]
            processes.wait_until(lambda: all(key in (a.ns.wg_peers(a.ifname) or ()) for a in agents),
                                 60, "every daemon has the svc node as a WireGuard peer")
            gone: dict[str, float] = {}
            counts: dict[str, int] = {}
            start = threading.Event()
            end = time.monotonic() + timeout

            def poll(a: namespaces.RealAgent) -> None:
                start.wait()
                n = 0
                while time.monotonic() < end:
                    peers = a.ns.wg_peers(a.ifname)
                    n += 1
                    if peers is not None and key not in peers:
                        gone[a.label] = time.time()
                        break
                counts[a.label] = n
            threads = [threading.Thread(target=poll, args=(a,), daemon=True) for a in agents]
            for t in threads:
                t.start()
            d = revocation.revoke(cluster, node_id)
            t0 = time.time()
            start.set()
            for t in threads:
                t.join(timeout + 5)
            poll_window = time.time() - t0
            lat = [gone[a.label] - d["acked"] for a in agents if a.label in gone]
            samples += lat
            missing += len(agents) - len(lat)
            polls.append(poll_window / max(1, max(counts.values(), default=1)))
            per_round.append({"round": r + 1, "victim": node_id, "peers": len(agents),
                              "api_ms": (d["acked"] - d["sent"]) * 1e3,
                              "all_removed_ms": max(lat) * 1e3 if lat else None,
                              "missing": len(agents) - len(lat)})
            progress.update(f"real: round {r + 1}/{rounds}: key gone from all {len(lat)}/{len(agents)} "
                            f"after {per_round[-1]['all_removed_ms'] or float('nan'):.0f} ms", force=True)
            victim.stop()
            lab.remove(f"v{r}")
        server = metrics.histogram_since(cluster, METRIC, before, expect=len(samples))
        # acks missing from the replicas' histogram: keep the daemons' side of the story
        logs = {a.label: a.log_tail() for a in agents} if server["count"] < len(samples) else None
    finally:
        for a in agents:
            a.stop()
    return {"rounds": per_round, "removed": report.summarize(samples),
            "missing": missing, "poll_ms": sum(polls) / len(polls) * 1e3 if polls else None,
            "server_histogram": server, "samples_removed_s": samples, "logs": logs}


def run(out_dir: str, light: int = 1000, light_rounds: int = 5, real: int = 3, real_rounds: int = 5,
        workers: int | None = None, keepalive: float = 10.0, concurrency: int = 64,
        timeout: float = 60.0, replicas: int = 3) -> dict:
    with harness.BenchRun("revoke") as bench_run:
        result = {"benchmark": "revoke", "machine": bench_run.machine(), "pids": bench_run.pids,
                  "config": {"replicas": replicas, "stream_keepalive_s": keepalive, "light": light,
                             "light_rounds": light_rounds, "real": real, "real_rounds": real_rounds}}
        if real:
            result["real"] = run_real(bench_run, real, real_rounds, keepalive, timeout, replicas)
        if light:
            result["light"] = run_light(bench_run, light, light_rounds, workers, keepalive, concurrency,
                                        timeout, replicas)

    result["machine"] = bench_run.machine()
    rows, targets, series = [], [], {}
    real_r = result.get("real")
    if real_r and "skipped" not in real_r:
        s, h = real_r["removed"], real_r["server_histogram"]
        rows.append({"part": f"real wireguard-go, {real_r['daemons']} daemons", "samples": s["n"],
                     "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "max_ms": s["max_ms"],
                     "missing": real_r["missing"], "poll_ms": real_r["poll_ms"],
                     "server_n": h["count"], "server_p50_le_ms": h["p50_le_ms"],
                     "server_p99_le_ms": h["p99_le_ms"], "server_mean_ms": h["mean_ms"]})
        targets.append({"part": "real", "target_p99_s": TARGET_REAL_S, "p99_s": s["p99_ms"] / 1e3,
                        "met": real_r["missing"] == 0 and s["p99_ms"] <= TARGET_REAL_S * 1e3})
        series[f"wg show, {real_r['daemons']} daemons"] = real_r["samples_removed_s"]
    elif real_r:
        print(f"real part skipped: {real_r['skipped']}")
    light_r = result.get("light")
    if light_r:
        s, h = light_r["removed"], light_r["server_histogram"]
        rows.append({"part": f"light agents, {light_r['agents']}", "samples": s["n"],
                     "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "max_ms": s["max_ms"],
                     "ack_p99_ms": light_r["acked"]["p99_ms"], "missing": light_r["missing"],
                     "server_n": h["count"], "server_p50_le_ms": h["p50_le_ms"],
                     "server_p99_le_ms": h["p99_le_ms"], "server_mean_ms": h["mean_ms"]})
        targets.append({"part": f"light {light_r['agents']}", "target_p99_s": TARGET_LIGHT_S,
                        "p99_s": s["p99_ms"] / 1e3,
                        "met": light_r["missing"] == 0 and s["p99_ms"] <= TARGET_LIGHT_S * 1e3})
        series[f"light agents, {light_r['agents']}"] = light_r["samples_removed_s"]
    result["targets"], result["table"] = targets, rows
    report.print_table("revoke: DELETE node -> its key gone from every peer (ms from the API's answer)",
                       rows, ["part", "samples", "p50_ms", "p99_ms", "max_ms", "ack_p99_ms", "missing",
                              "poll_ms", "server_n", "server_p50_le_ms", "server_p99_le_ms",
                              "server_mean_ms"])
    print("server_*: the replicas' raftmesh_revoke_seconds for the same rounds (command time -> "
          "each peer's ack; p50/p99 are bucket upper bounds)")
    report.print_p99_targets(targets, lambda t: f" ({t['part']})")
    report.save(out_dir, "revoke", result, lambda: report.plot_cdfs(
        out_dir, "revoke", "revoke: API answer -> key gone from peer (CDF)", series))
    return result


# -- CLI: `raftmesh bench revoke` (bench/cli.py) ---------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--light", "--agents", type=int, default=1000,
                        help="light agents (0: skip that part)")
    parser.add_argument("--light-rounds", type=int, default=5, help="revocations with light agents")
    parser.add_argument("--real", type=int, default=3,
                        help="real agent daemons with wireguard-go (0: skip; needs root)")
    parser.add_argument("--real-rounds", type=int, default=5, help="revocations with real daemons")
    harness.add_agent_options(parser)
    parser.add_argument("--timeout", type=float, default=60.0, help="per round")


def main(args) -> int:
    """0 when every peer dropped every revoked node (whether or not within the target), else 1."""
    r = run(args.out, args.light, args.light_rounds, args.real, args.real_rounds, args.workers or None,
            args.stream_keepalive, args.register_concurrency, args.timeout, args.replicas)
    return 1 if any(r.get(p, {}).get("missing") for p in ("light", "real")) else 0
