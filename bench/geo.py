"""`raftmesh bench geo`: replicas a WAN apart (issue #26), measured from each region.

The geo lab (lab/geo_net.py): one replica per region, in its own namespace, with user-space
round trips between regions (default 40, 80 and 150 ms for the pairs r1-r2, r1-r3, r2-r3)
and 1 ms from a region's clients to its own replica. N light agents per region
(lab/light_agents.py, the real protocol and the daemon's failover) stream from their
region's replica. Measured, in this order:

1. writes: per region, sequential `POST /api/v1/users` through its own replica (a kept-alive
   connection from the region's address), next to the floor (Topology.write_floor_ms: one
   round trip from the leader to its nearest peer, plus the forward to the leader and the
   commit back when the replica is a follower). Also reads through the same replica, with
   `?stale=true` (served from local state) and linearizable (a read barrier, which on a
   follower asks the leader);
2. propagation: policy changes (harness.policy_text: every agent gets one small delta)
   written through the leader, from its answer (the change is committed) until each agent
   applied it, per region, next to the floor: half the round trip from the leader to the
   region's replica (the commit index travels with the leader's next message) and to its
   agents;
3. leader failover, `--kills` times: SIGKILL the leader; from the kill until the first
   write sent after the process was reaped is acknowledged by a survivor (client requests
   go over the driver's undelayed address; the Raft traffic between survivors has its
   round trip); then the old leader is restarted and every agent moved back home;
4. agent failover: SIGKILL a follower region's replica; a policy change is written right
   after; its agents' time from the kill until their stream is open on another region's
   replica, and until they applied the change (current again).
"""
from __future__ import annotations

import http.client
import json
import signal
import time
from contextlib import ExitStack

from raftmesh.bench import harness, report
from raftmesh.lab import replica_net
from raftmesh.lab.geo_net import API_PORT, RAFT_PORT, GeoNet, Topology, parse_topology
from raftmesh.lab.light_agents import LightAgents, default_workers
from raftmesh.lab.local_cluster import LocalCluster


class RegionClient:
    """Admin API requests from a region's address to one replica, on one kept-alive
    connection (a client near its replica does not pay a handshake per request)."""

    def __init__(self, host: str, source: str, admin_key: str):
        self.host, self.source, self.key = host, source, admin_key
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, float]:
        """(status, seconds)."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, API_PORT, timeout=15,
                                                   source_address=(self.source, 0))
        headers = {"Authorization": f"Bearer {self.key}"}
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        t = time.perf_counter()
        try:
            self.conn.request(method, path, body=data, headers=headers)
            resp = self.conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        return resp.status, time.perf_counter() - t

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def region_of(replica) -> int:
    return int(replica.id[1:]) - 1


def term(cluster: LocalCluster) -> int:
    """The leader's Raft term: a rise between two reads means an election happened."""
    status, body = cluster.request(cluster.leader(), "GET", "/api/v1/cluster/self")
    if status != 200:
        raise RuntimeError(f"/cluster/self: {status} {body}")
    return body["replica"]["term"]


def measure_region(client: RegionClient, region: int, writes: int, reads: int) -> dict:
    """Sequential writes, then stale and linearizable reads, through the region's replica."""
    samples = {"write": [], "stale_read": [], "read": []}
    client.request("POST", "/api/v1/users", {"name": f"geo{region}-warm"})  # opens the connection
    for i in range(writes):
        status, took = client.request("POST", "/api/v1/users", {"name": f"geo{region}-{i}"})
        if status != 201:
            raise RuntimeError(f"write via r{region + 1} answered {status}")
        samples["write"].append(took)
    for kind, path in (("stale_read", "/api/v1/users?stale=true"), ("read", "/api/v1/users")):
        for _ in range(reads):
            status, took = client.request("GET", path)
            if status != 200:
                raise RuntimeError(f"{kind} via r{region + 1} answered {status}")
            samples[kind].append(took)
    return samples


class PolicyFlipper:
    """Each call writes a policy change through the current leader (harness.policy_text,
    flipping its port) and returns its version and the times it was sent and answered."""

    def __init__(self, cluster: LocalCluster):
        self.cluster, self.port = cluster, 22

    def __call__(self) -> dict:
        self.port = 2222 if self.port == 22 else 22
        leader = self.cluster.leader()
        sent = time.time()
        status, body = self.cluster.request(leader, "PUT", "/api/v1/policy",
                                            harness.policy_text(self.port))
        if status != 200:
            raise RuntimeError(f"policy change via leader {leader.id}: {status} {body}")
        return {"version": body["version"], "sent": sent, "acked": time.time(), "via": leader.id}


def leader_failover(cluster: LocalCluster, timeout: float) -> dict:
    """SIGKILL the leader; until a write sent after it was reaped is acknowledged."""
    leader = cluster.leader()
    kill_at = time.time()
    leader.proc.send_signal(signal.SIGKILL)
    leader.proc.wait(10)
    reaped, n = time.time(), 0
    while time.time() - kill_at < timeout:
        for r in (x for x in cluster.replicas if x.alive()):
            n += 1
            try:
                status, _ = cluster.request(r, "POST", "/api/v1/users", {"name": f"geo-fo-{n}"},
                                            timeout=3)
            except OSError:
                continue
            if status == 201:
                return {"killed": leader.id, "resume_ms": (time.time() - kill_at) * 1e3,
                        "reaped_ms": (reaped - kill_at) * 1e3, "first_ack_via": r.id,
                        "new_leader": cluster.leader(timeout=timeout).id}
        time.sleep(0.02)  # a client's retry pause, not synchronisation
    raise TimeoutError(f"no write acknowledged within {timeout:g}s of killing leader {leader.id}")


def agent_failover(cluster: LocalCluster, agents: list[LightAgents], victim, timeout: float,
                   flip) -> dict:
    """SIGKILL `victim`; its region's agents until they stream elsewhere and are current."""
    region = region_of(victim)
    kill_at = time.time()
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    change = flip()
    rows = agents[region].wait_version(change["version"], timeout)
    current = [r["applied"] - kill_at for r in rows if r["applied"] is not None]
    moved = agents[region].reconnects(kill_at)
    reconnect = [r["connected"] - kill_at for r in moved]
    return {"killed": victim.id, "region": region + 1, "agents": len(rows),
            "write_ms": (change["acked"] - kill_at) * 1e3,
            "moved_to": sorted({r["replica"] or "?" for r in moved}),
            "reconnect": report.summarize(reconnect), "current": report.summarize(current),
            "missing": len(rows) - len(current), "samples_current_s": current}


def run(out_dir: str, topology: Topology, agents_per_region: int = 200, writes: int = 50,
        reads: int = 20, changes: int = 3, workers: int = 0, keepalive: float = 10.0,
        raft_args: list[str] | None = None, timeout: float = 60.0, kills: int = 1) -> dict:
    n = topology.regions
    workers = workers or default_workers(agents_per_region)
    with harness.BenchRun("geo") as bench_run, ExitStack() as stack:
        progress = bench_run.progress
        geo = stack.enter_context(GeoNet(topology, bench_run.path))
        bench_run.pids += geo.pids
        progress.update(f"{n} regions on {geo.net.bridge} {geo.net.subnet}; starting replicas", force=True)
        cluster = stack.enter_context(bench_run.cluster(
            n, keepalive, extra_args=raft_args, hosts=geo.ips, ports=(RAFT_PORT, API_PORT),
            command_prefix=geo.prefix))
        keys = harness.setup_cluster(cluster)
        urls = [r.api_url for r in cluster.replicas]
        agents = []
        for x in range(n):
            la = stack.enter_context(LightAgents(urls, workers, bench_run.path, source=geo.region_ips[x]))
            bench_run.pids += la.pids
            progress.update(f"region {x + 1}: registering {agents_per_region} agents", force=True)
            la.register(agents_per_region, keys[harness.BENCH_USER], prefix=f"g{x + 1}-")
            if not la.connect(timeout=max(120.0, agents_per_region / 10), home=x):
                raise RuntimeError(f"region {x + 1}: not every agent got a netmap: {la.status()}")
            agents.append(la)
        for la in agents:
            la.settle()
        leader, term_start = region_of(cluster.leader()), term(cluster)

        regions = []
        for x, r in enumerate(cluster.replicas):
            progress.update(f"region {x + 1}: {writes} writes, {reads} + {reads} reads via {r.id}", force=True)
            client = RegionClient(r.host, geo.region_ips[x], cluster.admin_key)
            try:
                samples = measure_region(client, x, writes, reads)
            finally:
                client.close()
            regions.append({"region": x + 1, "replica": r.id, "role": "leader" if x == leader else "follower",
                            "floor_ms": topology.write_floor_ms(x, leader),
                            "prop_floor_ms": (topology.link_rtt_ms(x, leader) * (x != leader)
                                              + topology.local_rtt_ms) / 2,
                            **{k: report.summarize(v) for k, v in samples.items()},
                            "samples_s": samples, "propagation_s": []})

        flip = PolicyFlipper(cluster)
        for c in range(changes):
            change = flip()
            for x, la in enumerate(agents):
                rows = la.wait_version(change["version"], timeout)
                regions[x]["propagation_s"] += [row["applied"] - change["acked"] for row in rows
                                                if row["applied"] is not None]
                regions[x]["propagation_missing"] = regions[x].get("propagation_missing", 0) + sum(
                    row["applied"] is None for row in rows)
            progress.update(f"change {c + 1}/{changes} (v{change['version']}) applied everywhere", force=True)
        for reg in regions:
            reg["propagation"] = report.summarize(reg["propagation_s"])

        steady_elections = term(cluster) - term_start
        leader_fo = []
        for k in range(kills):
            progress.update(f"leader failover {k + 1}/{kills}: SIGKILL the leader", force=True)
            leader_fo.append(leader_failover(cluster, timeout))
            killed = next(r for r in cluster.replicas if r.id == leader_fo[-1]["killed"])
            cluster.start(killed)
            bench_run.pids.append(killed.pid)
            cluster.wait_ready(timeout=60)
            for la in agents:
                la.rehome(timeout=60)
                la.settle(quiet=1.0)

        leader = cluster.leader()
        victim = next(r for r in cluster.replicas if r is not leader)
        progress.update(f"agent failover: SIGKILL {victim.id} (a follower)", force=True)
        agent_fo = agent_failover(cluster, agents, victim, timeout, flip)
        status = [la.status() for la in agents]

    rows = [{"region": r["region"], "replica": r["replica"], "role": r["role"],
             "write_p50_ms": r["write"]["p50_ms"], "write_p99_ms": r["write"]["p99_ms"],
             "floor_ms": r["floor_ms"], "stale_read_p50_ms": r["stale_read"]["p50_ms"],
             "read_p50_ms": r["read"]["p50_ms"], "prop_p50_ms": r["propagation"]["p50_ms"],
             "prop_p99_ms": r["propagation"]["p99_ms"], "prop_floor_ms": r["prop_floor_ms"],
             "prop_missing": r.get("propagation_missing", 0)}
            for r in regions]
    result = {"benchmark": "geo", "machine": bench_run.machine(), "regions": rows,
              "detail": regions, "leader_failover": leader_fo,
              "leader_failover_resume": report.summarize([f["resume_ms"] / 1e3 for f in leader_fo]),
              "agent_failover": agent_fo,
              "elections_in_steady_state": steady_elections,
              "final_status": status, "pids": bench_run.pids,
              "config": {"rtt_ms": topology.rtt_ms, "local_rtt_ms": topology.local_rtt_ms,
                         "agents_per_region": agents_per_region, "workers_per_region": workers,
                         "writes": writes, "reads": reads, "changes": changes, "kills": kills,
                         "stream_keepalive_s": keepalive, "raft_args": raft_args or []}}
    pairs = ", ".join(f"r{i + 1}-r{j + 1} {topology.rtt_ms[i][j]:g}"
                      for i in range(n) for j in range(i + 1, n))
    report.print_table(f"geo: {n} regions, RTT ms {pairs}, local {topology.local_rtt_ms:g}; "
                       f"{agents_per_region} agents per region (ms)", rows, list(rows[0]))
    print("floor_ms: local RTT + (forward to the leader and back, on a follower) + the leader's "
          "RTT to its nearest peer; prop_*: policy change, the leader's answer -> agent applied "
          "(floor: half the RTT leader -> region's replica -> agent)")
    print(f"elections while nothing failed (writes, reads, propagation): {steady_elections}")
    print("leader failover, kill -> first write acknowledged: " + ", ".join(
        f"{f['killed']} {f['resume_ms']:.0f} ms (new leader {f['new_leader']})" for f in leader_fo))
    print(f"agent failover: killed {agent_fo['killed']}; its {agent_fo['agents']} agents streamed from "
          f"{', '.join(agent_fo['moved_to']) or '-'} after p99 {agent_fo['reconnect']['p99_ms']:.0f} ms "
          f"and were current after p99 {agent_fo['current']['p99_ms']:.0f} ms (max "
          f"{agent_fo['current']['max_ms']:.0f}); missing {agent_fo['missing']}")
    report.save(out_dir, "geo", result, lambda: report.plot_cdfs(
        out_dir, "geo", "geo lab: writes via each region's replica, propagation to its agents",
        {**{f"write via {r['replica']} ({r['role']})": r["samples_s"]["write"] for r in regions},
         **{f"propagation, region {r['region']}": r["propagation_s"] for r in regions},
         "agents of the killed replica: current again": agent_fo["samples_current_s"]}))
    return result


# -- CLI: `raftmesh bench geo` (bench/cli.py) --------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--rtts", default="40,80,150",
                        help="round trips in ms between regions, pairs (1,2),(1,3),(2,3)...")
    parser.add_argument("--local-rtt", type=float, default=1.0,
                        help="round trip in ms from a region's agents and clients to its replica")
    parser.add_argument("--agents", type=int, default=200, help="light agents per region")
    parser.add_argument("--writes", type=int, default=50, help="sequential writes per region")
    parser.add_argument("--reads", type=int, default=20, help="reads of each kind per region")
    parser.add_argument("--changes", type=int, default=3, help="policy changes for propagation")
    parser.add_argument("--kills", type=int, default=3, help="leader failovers (SIGKILL, restart)")
    parser.add_argument("--workers", type=int, default=0,
                        help="light-agent processes per region (default: one per 400 agents)")
    parser.add_argument("--stream-keepalive", type=float, default=10.0,
                        help="the replicas' map-stream keepalive, seconds")
    for flag in ("heartbeat", "election-min", "election-max"):
        parser.add_argument(f"--{flag}", type=float, help=f"the replicas' Raft {flag} seconds "
                            "(default: the replica's)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per wait")


def main(args) -> int:
    """0 when every step finished and every agent got every change, 1 if not, 2 when this
    machine cannot host the lab or the options are wrong."""
    problems = replica_net.preflight()
    problems += [f"--{name} must be at least {least}, got {getattr(args, name)}"
                 for name, least in (("agents", 1), ("writes", 1), ("reads", 1), ("changes", 1),
                                     ("kills", 0)) if getattr(args, name) < least]
    try:
        topology = parse_topology(args.rtts, args.local_rtt)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        print("raftmesh bench geo: " + "; ".join(problems))
        return 2
    raft_args = [x for flag in ("heartbeat", "election_min", "election_max")
                 if getattr(args, flag) is not None
                 for x in (f"--{flag.replace('_', '-')}", f"{getattr(args, flag):g}")]
    result = run(args.out, topology, args.agents, args.writes, args.reads, args.changes,
                 args.workers, args.stream_keepalive, raft_args, args.timeout, args.kills)
    failed = result["agent_failover"]["missing"] or any(r["prop_missing"] for r in result["regions"])
    return 1 if failed else 0
