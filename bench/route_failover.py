"""`raftmesh bench route-failover`: an HA subnet router killed until traffic flows through
the other one (issue #23).

Target: p99 <= 3 s. The two-datacenter lab (lab/sites.py: real `raftmesh agent up` daemons
with wireguard-go in network namespaces, one replica on the host): each round SIGKILLs site
B's primary router, its agent and its wireguard-go (a router that dies), then probes from a
host of site A (no agent) to a host of site B every 10 ms; the failover time is from the
kill to the first echo reply, which can only come through the other router. The prober
starts right after the kill, so times below its start-up (~0.1 s) read as that. The killed
router's agent is restarted between rounds (it comes back as the standby: no flapping),
so rounds alternate between the two routers; a round starts once every router has direct
paths to its peers again (a warm standby, as one that has been up for a while is).
`allowed_ips_moved_ms` is when site A's router's WireGuard gave the subnet to the standby
(`wg show`, polled every ~20 ms plus its own run time): the control plane's part;
`handshake_ms` is when its WireGuard session with the standby began, read after the first
reply (wg reports whole seconds: below -1000, a session it held from before the kill).
"""
from __future__ import annotations

import time

from raftmesh.bench import harness, report
from raftmesh.bench.connect import _first_reply
from raftmesh.lab import namespaces
from raftmesh.lab.sites import TwoSites

TARGET_S = 3.0


def _wait(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)  # polls the routes API; a bounded wait on a condition


def _node_key(sites: TwoSites, label: str) -> str:
    """The router's WireGuard public key, as its peers have it."""
    node_id = sites.agents[label].status()["node_id"]
    return sites.api("GET", f"/api/v1/nodes/{node_id}")["node"]["node_key"]


def _moved(gateway: namespaces.RealAgent, key: str, cidr: str, moved: list[float]) -> None:
    """Note when `gateway`'s WireGuard gives `cidr` to the peer `key` (one `wg show`)."""
    out = gateway.ns.run("wg", "show", gateway.ifname, "allowed-ips", check=False).stdout
    if any(line.startswith(key) and cidr in line for line in out.splitlines()):
        moved.append(time.time())


def _handshake(gateway: namespaces.RealAgent, key: str) -> float | None:
    """When `gateway`'s latest WireGuard handshake with the peer `key` was (Unix time)."""
    out = gateway.ns.run("wg", "show", gateway.ifname, "latest-handshakes", check=False).stdout
    for line in out.splitlines():
        peer, _, when = line.partition("\t")
        if peer == key and when.strip().isdigit() and int(when):
            return float(when)
    return None


def run(out_dir: str, rounds: int = 5, keepalive: float = 1.0, timeout: float = 30.0) -> dict:
    problems = namespaces.preflight()
    if problems:
        raise harness.LabUnavailable("; ".join(problems))
    namespaces.cleanup_stale()
    rows = []
    with harness.BenchRun("route-failover") as bench_run:
        sites = TwoSites(namespaces.Lab(), bench_run.path, keepalive)
        try:
            bench_run.pids += [r.pid for r in sites.cluster.replicas]
            bench_run.pids += [a.proc.pid for a in sites.agents.values()]
            _wait(sites.all_serving, 60, "both sites' routes approved and online")
            sites.a.route_hosts_via(sites.primary(sites.a))
            ha1, target = sites.a.hosts["ha1"], sites.b.lan_ip("hb1")
            for r in range(rounds):
                _wait(sites.all_serving, 60, "every router online again")
                _wait(lambda: all(sites.warm(lb) for lb in sites.agents), 60,
                      "every router's direct paths (a warm standby)")
                first, _ = _first_reply(ha1.first_reply(target, timeout=timeout), timeout + 5)
                if first is None:
                    raise RuntimeError("site A does not reach site B before the kill")
                victim = sites.primary(sites.b)
                gateway = sites.agents[sites.primary(sites.a)]
                standby = next(lb for lb in sites.b.routers if lb != victim)
                standby_key = _node_key(sites, standby)
                killed = time.time()
                sites.agents[victim].kill_hard()
                moved: list[float] = []  # when site A's router gave the subnet to the standby
                first, sent = _first_reply(ha1.first_reply(target, interval=0.01, wait=0.05,
                                                           timeout=timeout), timeout + 5,
                                           lambda: moved or _moved(gateway, standby_key, sites.b.lan, moved))
                handshake = _handshake(gateway, standby_key)
                rows.append({"round": r + 1, "killed": victim,
                             "failover_ms": (first - killed) * 1e3 if first else None,
                             "allowed_ips_moved_ms": (moved[0] - killed) * 1e3 if moved else None,
                             "handshake_ms": (handshake - killed) * 1e3 if handshake else None,
                             "probes_sent": sent, "primary_now": sites.primary(sites.b)})
                bench_run.progress.update(f"round {r + 1}/{rounds}: {victim} killed, traffic "
                                          f"back after {rows[-1]['failover_ms'] or float('nan'):.0f} ms",
                                          force=True)
                sites.agents[victim].start()
                bench_run.pids.append(sites.agents[victim].proc.pid)
        finally:
            sites.close()
    samples = [x["failover_ms"] / 1e3 for x in rows if x["failover_ms"] is not None]
    summary = report.summarize(samples)
    missing = sum(1 for x in rows if x["failover_ms"] is None)
    p99 = summary["p99_ms"] / 1e3
    targets = [{"target_p99_s": TARGET_S, "p99_s": p99,
                "met": not missing and bool(samples) and p99 <= TARGET_S}]
    result = {"benchmark": "route-failover", "machine": bench_run.machine(), "rounds": rows,
              "summary": summary, "missing": missing, "targets": targets,
              "config": {"rounds": rounds, "stream_keepalive_s": keepalive}, "pids": bench_run.pids}
    report.print_table("route-failover: SIGKILL of site B's primary router -> first reply through "
                       "the other router (ms)", rows,
                       ["round", "killed", "failover_ms", "allowed_ips_moved_ms", "handshake_ms",
                        "probes_sent",
                        "primary_now"])
    print(f"p50 {summary['p50_ms']:.0f} ms, p99 {summary['p99_ms']:.0f} ms over {len(samples)} rounds")
    report.print_p99_targets(targets, lambda t: "")
    report.save(out_dir, "route-failover", result, lambda: report.plot_cdfs(
        out_dir, "route-failover", "HA subnet router SIGKILL -> traffic via the other (CDF)",
        {"failover": samples}))
    return result


# -- CLI: `raftmesh bench route-failover` (bench/cli.py) ---------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--rounds", type=int, default=10, help="routers killed, one per round")
    parser.add_argument("--stream-keepalive", type=float, default=1.0,
                        help="the replica's map-stream keepalive, seconds")
    parser.add_argument("--timeout", type=float, default=30.0, help="per round")


def main(args) -> int:
    """0 when traffic came back in every round (whether or not within the target)."""
    try:
        result = run(args.out, args.rounds, args.stream_keepalive, args.timeout)
    except harness.LabUnavailable as e:
        print(f"route-failover needs a namespace lab: {e}")
        return 2
    return 1 if result["missing"] else 0
