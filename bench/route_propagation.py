"""`raftmesh bench route-propagation`: a subnet route approved (or withdrawn) through the
admin API, until every agent applied it (issue #23).

Target: p99 <= 1 s at 1,000 agents. The cluster and light agents are bench/propagation.py's
(`grow`: `bench` agents, star topology); one `svc` node, which every agent has as a peer,
advertises a route the policy lets every agent use (others would not see it), and each
change PUTs /api/v1/nodes/{id}/routes through the leader, alternately approving and withdrawing it: every agent gets one delta (that peer's
AllowedIPs). Per change and agent: from the API's answer until the agent applied a netmap
at or after the change's version.
"""
from __future__ import annotations

import base64
import time

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from raftmesh.agent.control_client import ControlClient
from raftmesh.bench import harness, report
from raftmesh.bench.propagation import grow
from raftmesh.lab.light_agents import default_workers
from raftmesh.lab.local_cluster import LocalCluster
from raftmesh.proto.routes import REGISTER

TARGETS_S = {1000: 1.0}
ROUTE = "10.99.0.0/24"


def register_router(cluster: LocalCluster, key: str) -> str:
    """A node advertising ROUTE, registered with `key` the way an agent does; its id."""
    client = ControlClient([r.api_url for r in cluster.replicas], SigningKey.generate())
    node_key = base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()
    answer = client.call("POST", REGISTER, {"node_key": node_key, "hostname": "bench-router",
                                            "auth_key": key, "advertised_routes": [ROUTE]})
    return answer["node"]["id"]


def approve(cluster: LocalCluster, node_id: str, routes: list[str]) -> dict:
    """One approval through the leader: its version and when it was sent and answered."""
    sent = time.time()
    status, answer = cluster.request(cluster.leader(), "PUT", f"/api/v1/nodes/{node_id}/routes",
                                     {"approved_routes": routes})
    if status != 200:
        raise RuntimeError(f"route approval: {status} {answer}")
    return {"version": answer["version"], "sent": sent, "acked": time.time()}


def run(out_dir: str, sizes=(100, 1000), changes: int = 5, workers: int | None = None,
        keepalive: float = 10.0, concurrency: int = 64, timeout: float = 120.0,
        replicas: int = 3) -> dict:
    workers = workers or default_workers(max(sizes))
    per_size = []
    with harness.BenchRun("route-propagation") as bench_run, \
            bench_run.cluster(replicas, keepalive) as cluster:
        keys = harness.setup_cluster(cluster, "star", port=22, routes=(ROUTE,))
        router = register_router(cluster, keys[harness.SVC_USER])
        approved = False
        with bench_run.light_agents(cluster, workers) as agents:
            for n in sorted(sizes):
                grow(agents, cluster, keys[harness.BENCH_USER], n, concurrency,
                     bench_run.progress, f"N={n}")
                samples, all_applied, missing = [], [], 0
                for c in range(changes):
                    approved = not approved
                    change = approve(cluster, router, [ROUTE] if approved else [])
                    agents.wait_applied(change["version"], timeout, prefix="la")
                    rows = agents.wait_version(change["version"], timeout, prefix="la")
                    applied = [r["applied"] - change["acked"] for r in rows if r["applied"] is not None]
                    samples += applied
                    all_applied.append(max(applied) if applied else None)
                    missing += len(rows) - len(applied)
                    bench_run.progress.update(f"N={n}: change {c + 1}/{changes}: all "
                                              f"{len(applied)} applied after "
                                              f"{(max(applied) if applied else float('nan')) * 1e3:.0f} ms",
                                              force=True)
                    agents.settle(quiet=0.5)
                per_size.append({"agents": n, "apply": report.summarize(samples),
                                 "all_applied_s": all_applied, "missing": missing,
                                 "samples_apply_s": samples})
    rows = [{"agents": s["agents"], "samples": s["apply"]["n"], "p50_ms": s["apply"]["p50_ms"],
             "p99_ms": s["apply"]["p99_ms"], "max_ms": s["apply"]["max_ms"],
             "missing": s["missing"]} for s in per_size]
    targets = [{"agents": s["agents"], "target_p99_s": TARGETS_S[s["agents"]],
                "p99_s": s["apply"]["p99_ms"] / 1e3,
                "met": not s["missing"] and s["apply"]["p99_ms"] / 1e3 <= TARGETS_S[s["agents"]]}
               for s in per_size if s["agents"] in TARGETS_S]
    result = {"benchmark": "route-propagation", "machine": bench_run.machine(), "sizes": per_size,
              "targets": targets, "table": rows, "pids": bench_run.pids,
              "config": {"replicas": replicas, "workers": workers, "changes": changes,
                         "stream_keepalive_s": keepalive}}
    report.print_table(f"route-propagation: route approval -> every agent applied it ({workers} "
                       f"agent processes, {replicas} replicas); ms from the API's answer", rows,
                       ["agents", "samples", "p50_ms", "p99_ms", "max_ms", "missing"])
    report.print_p99_targets(targets, lambda t: f" at {t['agents']} agents")
    report.save(out_dir, "route-propagation", result, lambda: report.plot_cdfs(
        out_dir, "route-propagation", "route approval: API answer -> agent applied (CDF)",
        {f"{s['agents']} agents": s["samples_apply_s"] for s in per_size}))
    return result


# -- CLI: `raftmesh bench route-propagation` (bench/cli.py) -------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--sizes", "--agents", default="100,1000",
                        help="comma-separated agent counts, grown on one cluster (default 100,1000)")
    parser.add_argument("--changes", type=int, default=5, help="approvals (and withdrawals) per size")
    harness.add_agent_options(parser)
    parser.add_argument("--timeout", type=float, default=120.0, help="per change")


def main(args) -> int:
    """0 when every agent applied every change (whether or not within the target), else 1."""
    sizes = [int(x) for x in str(args.sizes).split(",") if x.strip()]
    result = run(args.out, sizes, args.changes, args.workers or None, args.stream_keepalive,
                 args.register_concurrency, args.timeout, args.replicas)
    return 1 if any(s["missing"] for s in result["sizes"]) else 0
