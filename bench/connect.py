"""`raftmesh bench connect`: connection setup latency through NATs, raftmesh and Nebula side by
side on the same namespace lab (issue: peers behind NAT).

Real `raftmesh agent up` daemons with wireguard-go and nftables in network namespaces
(lab/namespaces.py), 3 replicas (`--replicas`) on the host end of a veth into the lab, whose
public side is routed (not masqueraded) so replicas see NAT routers' own addresses. For each
NAT type (lab/nat.py; `none` is a plain bridge, both sides public):

- a peer daemon runs for the whole type, behind its own router of that type;
- each round, a fresh namespace behind another router of the same type: a prober first (an
  ICMP echo to the peer's overlay address every 10 ms; sends fail while there is no route),
  then `raftmesh agent up` with a fresh state directory and a pre-auth key. connect = first
  echo reply - the pair's first appearance in a netmap (the earlier of the two agents' `since`
  for the other in status.json): the STUN, the probes or the relay, the WireGuard handshake.
  Also recorded: start = first echo reply - the agent's start, which adds the Python start,
  registration (a Raft write), wireguard-go's start and the map streams (and when its status
  first says `connected`). The path is then read from the new agent's WireGuard endpoint (a
  local relay socket or a direct address), after waiting up to UPGRADE_WAIT for a direct path
  (the first packet may go through the relay while the probes still search); direct = when
  the endpoint was first seen direct (polled every 50 ms) - the pair's first appearance.

Nebula (bench/nebula.py) runs the same rounds on the same topology: a lighthouse (also the
relay) on the public side, the peer host behind a router of the type, each round a new host
started and probed the same way; its connect is from the host's start (the lighthouse learns
of it then), so compare it with raftmesh's start too. Nebula has no TCP fallback, so with UDP
blocked its rounds are capped at NEBULA_BLOCKED_ROUNDS (they can only time out).
"""
from __future__ import annotations

import itertools
import os
import time

from raftmesh.bench import harness, nebula, report
from raftmesh.lab import namespaces, nat, processes

NAT_TYPES = ("none", "eim", "edm", "udp_blocked")
UPGRADE_WAIT = 5.0  # the first packet may go relayed while probes find the direct path
NEBULA_BLOCKED_ROUNDS = 3
# The prober sends every 10 ms and counts a reply to any probe. It waits no longer for a reply:
# its sends succeed once the overlay address is up, before the tunnel is, and a first probe
# lost in the handshake then held the next one back (0.2 s had rounded both systems up).
PROBE_INTERVAL = 0.01
TARGETS = {"p50_s": 1.0, "p99_s": 2.0}  # EIM: direct, p50 <= 1 s, p99 <= 2 s; relayed p99 <= 2 s


class Sides:
    """Namespaces for one side of a pair: public, or behind a router of its own."""

    def __init__(self, lab, public_base: str):
        self.lab, self.base = lab, public_base
        self._addr = itertools.cycle(range(20, 250))

    def add(self, nat_type: str, label: str):
        if nat_type == "none":
            return self.lab.add(label, f"{self.base}.{next(self._addr)}/24")
        router = nat.add_router(self.lab, f"{label}r", f"{self.base}.{next(self._addr)}/24", nat_type)
        return router.add_host(label)

    def remove(self, ns) -> None:
        self.lab.remove(ns.label)
        if f"{ns.label}r" in self.lab.namespaces:
            self.lab.remove(f"{ns.label}r")


def _first_reply(prober, timeout: float, tick=lambda: None) -> tuple[float | None, int | None]:
    """(wall time of the first reply, probes sent), or (None, None); `tick` runs every 20 ms
    meanwhile."""
    end = time.monotonic() + timeout
    while prober.poll() is None and time.monotonic() < end:
        tick()
        time.sleep(0.02)  # the prober times itself; this only waits for it to finish
    out = prober.stdout.read().split() if prober.poll() == 0 else []
    processes.stop_proc(prober)
    return (float(out[0]), int(out[1])) if out else (None, None)


def _path(agent: namespaces.RealAgent) -> tuple[str | None, float | None]:
    """('direct' or 'relay', from the agent's WireGuard endpoint for its (only) peer; the
    wall time it was first seen direct, or None)."""
    end = time.monotonic() + UPGRADE_WAIT
    path = None
    while time.monotonic() < end:
        out = agent.ns.run("wg", "show", agent.ifname, "endpoints", check=False).stdout.split()
        path = None if len(out) < 2 or out[1] == "(none)" else (
            "relay" if out[1].startswith("127.0.0.1:") else "direct")
        if path == "direct":
            return path, time.time()
        time.sleep(0.05)
    return path, None


def _appeared(agent: namespaces.RealAgent, peer: namespaces.RealAgent) -> float | None:
    """When the pair first appeared in a netmap: the earlier of the two agents' `since` for
    the other (status.json, wall time of the netmap that brought it in)."""
    times = [p.get("since") for a, other in ((agent, peer), (peer, agent))
             for p in a.status().get("peers", ()) if p["name"] == f"host-{other.label}"]
    return min((t for t in times if t), default=None)


def _raftmesh_rounds(bench_run, sides: Sides, cluster, key: str, nat_type: str, rounds: int,
                     timeout: float) -> list[dict]:
    servers = [r.api_url for r in cluster.replicas]
    rows, peer, current = [], None, None
    peer_ns = sides.add(nat_type, f"p{nat_type[:2]}")
    try:
        peer = namespaces.RealAgent(sides.lab, peer_ns, bench_run.path, servers, key, peer_ns.label)
        peer.start()
        st = processes.wait_until(lambda: peer.status().get("state") == "connected"
                                  and peer.status().get("addresses") and peer.status(), 60,
                                  "peer daemon connected")
        peer_ip = st["addresses"][0].split("/")[0]
        for r in range(rounds):
            ns = sides.add(nat_type, f"{nat_type[:2]}{r}")
            agent = current = namespaces.RealAgent(sides.lab, ns, bench_run.path,
                                                   namespaces.rotated(servers, r), key, ns.label)
            prober = ns.first_reply(peer_ip, interval=PROBE_INTERVAL, wait=PROBE_INTERVAL, timeout=timeout)
            connected: list[float] = []  # when status.json first said `connected` (±20 ms)

            def poll_status(agent=agent, connected=connected):
                if not connected and agent.status().get("state") == "connected":
                    connected.append(time.time())
            agent.start()
            first, sent = _first_reply(prober, timeout + 5, poll_status)
            poll_status()
            path, direct_at = _path(agent) if first else (None, None)
            node_id = agent.status().get("node_id")
            appeared = _appeared(agent, peer)
            rows.append({"system": "raftmesh", "nat": nat_type, "round": r + 1,
                         "connect_ms": (first - appeared) * 1e3 if first and appeared else None,
                         "start_ms": (first - agent.started) * 1e3 if first else None,
                         "stream_connected_ms": (connected[0] - agent.started) * 1e3 if connected else None,
                         "direct_ms": (direct_at - appeared) * 1e3 if direct_at and appeared else None,
                         "path": path, "probes_sent": sent, "node_id": node_id,
                         "started_at": agent.started, "first_reply_at": first, "appeared_at": appeared})
            bench_run.progress.update(f"raftmesh {nat_type} {r + 1}/{rounds}: "
                                      f"{rows[-1]['connect_ms'] or float('nan'):.0f} ms ({path})", force=True)
            if first is None:
                print(f"raftmesh {nat_type} round {r + 1}: no reply; agent log:\n{agent.log_tail()}")
            agent.stop()
            current = None
            if node_id:
                cluster.request(cluster.replicas[0], "DELETE", f"/api/v1/nodes/{node_id}")
            sides.remove(ns)
    finally:
        for a in (current, peer):
            if a is not None:
                a.stop()
        sides.remove(peer_ns)
    return rows


def _nebula_rounds(bench_run, sides: Sides, net: nebula.NebulaNet, nat_type: str, rounds: int,
                   timeout: float) -> list[dict]:
    if nat_type == "udp_blocked":
        rounds = min(rounds, NEBULA_BLOCKED_ROUNDS)
    rows = []
    peer_ns = sides.add(nat_type, f"n{nat_type[:2]}")
    try:
        config, peer_ip = net.host(peer_ns.name)
        net.start(peer_ns, config, os.path.join(bench_run.path, f"nebula-{peer_ns.label}.log"))
        for r in range(rounds):
            ns = sides.add(nat_type, f"n{nat_type[:2]}{r}")
            config, _ = net.host(ns.name)
            prober = ns.first_reply(peer_ip, interval=PROBE_INTERVAL, wait=PROBE_INTERVAL, timeout=timeout)
            started = time.time()
            proc = net.start(ns, config, os.path.join(bench_run.path, f"nebula-{ns.label}.log"))
            first, sent = _first_reply(prober, timeout + 5)
            rows.append({"system": "nebula", "nat": nat_type, "round": r + 1,
                         "connect_ms": (first - started) * 1e3 if first else None,
                         "start_ms": (first - started) * 1e3 if first else None,
                         "path": None, "probes_sent": sent})
            bench_run.progress.update(f"nebula {nat_type} {r + 1}/{rounds}: "
                                      f"{rows[-1]['connect_ms'] or float('nan'):.0f} ms", force=True)
            processes.stop_proc(proc)
            sides.remove(ns)
    finally:
        sides.remove(peer_ns)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for (system, nat_type), group in itertools.groupby(
            sorted(rows, key=lambda r: (r["nat"], r["system"])), key=lambda r: (r["system"], r["nat"])):
        group = list(group)
        ok = [r["connect_ms"] / 1e3 for r in group if r["connect_ms"] is not None]
        starts = sorted(r["start_ms"] / 1e3 for r in group if r["start_ms"] is not None)
        paths = [r["path"] for r in group if r["path"]]
        to_direct = sorted(r["direct_ms"] for r in group if r.get("direct_ms") is not None)
        out.append({"system": system, "nat": nat_type, "pairs": len(group),
                    "connected_pct": round(100 * len(ok) / len(group), 1),
                    "direct_pct": round(100 * paths.count("direct") / len(group), 1) if system == "raftmesh" else None,
                    **report.summarize(ok), "start_p50_ms": report.percentile(starts, 0.5) * 1e3,
                    "direct_p50_ms": report.percentile(to_direct, 0.5) if to_direct else None})
    return out


def run(out_dir: str, rounds: int = 20, keepalive: float = 10.0, timeout: float = 20.0,
        replicas: int = 3, nat_types: tuple[str, ...] = NAT_TYPES, with_nebula: bool = True) -> dict:
    with_nebula = with_nebula and nebula.available()
    try:
        with harness.namespace_lab() as lab, harness.BenchRun("connect") as bench_run:
            gateway = nat.public_gateway()
            base = gateway.rsplit(".", 1)[0]
            host = lab.connect_host(gateway, routed=True)
            sides = Sides(lab, base)
            rows: list[dict] = []
            with bench_run.cluster(replicas, keepalive, host=host) as cluster:
                key = harness.setup_cluster(cluster, topology="mesh")[harness.BENCH_USER]
                for t in nat_types:
                    rows += _raftmesh_rounds(bench_run, sides, cluster, key, t, rounds, timeout)
            if with_nebula:
                lighthouse = lab.add("lh", f"{base}.10/24")
                net = nebula.NebulaNet(bench_run.path, lighthouse.ip)
                config, _ = net.host("lighthouse", lighthouse=True)
                net.start(lighthouse, config, os.path.join(bench_run.path, "nebula-lighthouse.log"))
                for t in nat_types:
                    rows += _nebula_rounds(bench_run, sides, net, t, rounds, timeout)
    except harness.LabUnavailable as e:
        raise SystemExit(f"bench connect: {e}") from None

    summary = summarize(rows)
    failed = [f"{r['system']} {r['nat']} {r['round']}" for r in rows
              if r["connect_ms"] is None and r["system"] == "raftmesh"]
    result = {"benchmark": "connect", "machine": bench_run.machine(), "rounds": rows,
              "summary": summary, "failed_rounds": failed, "pids": bench_run.pids,
              "config": {"replicas": replicas, "stream_keepalive_s": keepalive,
                         "probe_interval_ms": PROBE_INTERVAL * 1e3,
                         "nat_types": list(nat_types), "nebula": with_nebula, "timeout_s": timeout}}
    report.print_table("connect: first appearance in a netmap (Nebula: host start) -> first ICMP "
                       "echo answered through the tunnel, by NAT type; start_p50: from the agent's "
                       "start; direct_p50: from the netmap to a direct WireGuard endpoint",
                       summary, ["system", "nat", "pairs", "connected_pct", "direct_pct",
                                 "p50_ms", "p99_ms", "max_ms", "start_p50_ms", "direct_p50_ms"])
    report.save(out_dir, "connect", result, lambda: report.plot_cdfs(
        out_dir, "connect", "netmap (Nebula: start) -> first packet through the tunnel, by NAT type",
        {f"{s['system']} {s['nat']}": [r["connect_ms"] / 1e3 for r in rows
                                        if r["system"] == s["system"] and r["nat"] == s["nat"]
                                        and r["connect_ms"] is not None] for s in summary}))
    return result


# -- CLI: `raftmesh bench connect` (bench/cli.py) --------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--rounds", type=int, default=20, help="pairs per NAT type")
    parser.add_argument("--nat", default=",".join(NAT_TYPES),
                        help=f"comma-separated NAT types (default all: {','.join(NAT_TYPES)})")
    parser.add_argument("--no-nebula", action="store_true", help="skip the Nebula side-by-side")
    harness.add_agent_options(parser, workers=False, register_concurrency=False)
    parser.add_argument("--timeout", type=float, default=20.0, help="per round")


def main(args) -> int:
    """0 when every raftmesh round got a packet through (whatever the time), else 1."""
    types = tuple(t for t in args.nat.split(",") if t)
    unknown = sorted(set(types) - set(NAT_TYPES))
    if unknown:
        raise SystemExit(f"bench connect: unknown NAT types {unknown}; use {', '.join(NAT_TYPES)}")
    result = run(args.out, args.rounds, args.stream_keepalive, args.timeout, args.replicas, types,
                 not args.no_nebula)
    return 1 if result["failed_rounds"] else 0
