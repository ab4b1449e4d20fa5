"""`raftmesh bench connect`: agent start until its first packet reaches a peer over the
tunnel (issue #5 `connect`).

Real `raftmesh agent up` daemons with wireguard-go and nftables in network namespaces
(lab/namespaces.py), 3 replicas (`--replicas`) on the host end of a veth into the lab. One
peer daemon (a `svc` node, which every `bench` node may reach, see harness.policy_text)
runs for the whole benchmark. Each round, in a fresh namespace:

1. a prober starts first: an ICMP echo to the peer's overlay address every 10 ms (sends fail
   while there is no route yet), which reports the time the first reply arrives;
2. t0, then `raftmesh agent up` starts with a fresh state directory and a pre-auth key, so the
   round includes Python start-up, registration (a Raft write), the map stream, wireguard-go
   and nftables set-up, the peer learning the new node from *its* stream and configuring it,
   and the WireGuard handshake;
3. connect = first echo reply - t0. The reply proves the request reached the peer through the
   tunnel (the peer only accepts packets from keys in its netmap), one veth RTT later.

Also recorded (polled every 20 ms, so ±20 ms): when the new agent's status.json first says
`connected`. Then the daemon is stopped, its node deleted, its namespace removed.
"""
from __future__ import annotations

import time

from raftmesh.bench import harness, report
from raftmesh.lab import namespaces, processes

TARGET_S = None  # issue #5 gives no number for `connect`; reported as measured


def _rounds(bench_run: harness.BenchRun, lab, peer_ns, cluster, rounds: int,
            timeout: float) -> list[dict]:
    """A peer daemon for the whole run, then one fresh agent per round (module doc)."""
    rows, peer, current, progress = [], None, None, bench_run.progress
    try:
        keys = harness.setup_cluster(cluster)
        servers = [r.api_url for r in cluster.replicas]
        peer = namespaces.RealAgent(lab, peer_ns, bench_run.path, servers, keys[harness.SVC_USER],
                                    "peer")
        peer.start()
        st = processes.wait_until(lambda: peer.status().get("state") == "connected"
                                  and peer.status().get("addresses") and peer.status(), 60,
                                  "peer daemon connected")
        peer_ip = st["addresses"][0].split("/")[0]
        for r in range(rounds):
            label = f"a{r}"
            ns = lab.add(label, f"192.0.2.{10 + r}/24")
            agent = current = namespaces.RealAgent(lab, ns, bench_run.path,
                                                   namespaces.rotated(servers, r),
                                                   keys[harness.BENCH_USER], label)
            prober = ns.first_reply(peer_ip, interval=0.01, wait=0.2, timeout=timeout)
            agent.start()
            t0 = agent.started
            connected_at = None
            end = time.monotonic() + timeout
            while prober.poll() is None and time.monotonic() < end:
                if connected_at is None and agent.status().get("state") == "connected":
                    connected_at = time.time()
                time.sleep(0.02)  # polling status.json; the probe times itself
            out = prober.stdout.read().split() if prober.poll() == 0 else []
            first = float(out[0]) if out else None
            if connected_at is None and agent.status().get("state") == "connected":
                connected_at = time.time()
            node_id = agent.status().get("node_id")
            row = {"round": r + 1, "connect_ms": (first - t0) * 1e3 if first else None,
                   "stream_connected_ms": (connected_at - t0) * 1e3 if connected_at else None,
                   "probes_sent": int(out[1]) if len(out) > 1 else None,
                   "replica": agent.status().get("replica"), "node_id": node_id}
            rows.append(row)
            progress.update(f"round {r + 1}/{rounds}: first reply after "
                            f"{row['connect_ms'] or float('nan'):.0f} ms (stream connected after "
                            f"{row['stream_connected_ms'] or float('nan'):.0f} ms)", force=True)
            if first is None:
                print(f"round {r + 1}: no reply within {timeout:g}s; agent log:\n{agent.log_tail()}")
            agent.stop()
            processes.stop_proc(prober)
            if node_id:
                cluster.request(cluster.replicas[0], "DELETE", f"/api/v1/nodes/{node_id}")
            lab.remove(label)
            current = None
    finally:
        if current is not None:
            current.stop()
        if peer is not None:
            peer.stop()
    return rows


def run(out_dir: str, rounds: int = 10, keepalive: float = 10.0, timeout: float = 60.0,
        replicas: int = 3) -> dict:
    try:
        with harness.namespace_lab() as lab, harness.BenchRun("connect") as bench_run:
            peer_ns = lab.add("peer", "192.0.2.1/24")
            with bench_run.cluster(replicas, keepalive, host=lab.connect_host()) as cluster:
                rows = _rounds(bench_run, lab, peer_ns, cluster, rounds, timeout)
    except harness.LabUnavailable as e:
        raise SystemExit(f"bench connect: {e}") from None

    summary = [{"metric": label, **report.summarize([r[k] / 1e3 for r in rows if r[k] is not None])}
               for k, label in (("connect_ms", "agent start -> first packet through the tunnel"),
                                ("stream_connected_ms", "agent start -> status 'connected'"))]
    failed = [r["round"] for r in rows if r["connect_ms"] is None]
    result = {"benchmark": "connect", "machine": bench_run.machine(), "rounds": rows, "summary": summary,
              "failed_rounds": failed, "pids": bench_run.pids,
              "config": {"replicas": replicas, "stream_keepalive_s": keepalive, "probe_interval_ms": 10}}
    report.print_table("connect: `raftmesh agent up` -> first ICMP echo answered by a peer over "
                       "WireGuard (ms)", rows, ["round", "connect_ms", "stream_connected_ms",
                                                "probes_sent", "replica"])
    report.print_table("connect distribution", summary, ["metric", "n", "p50_ms", "p99_ms", "max_ms",
                                                          "mean_ms"])
    report.save(out_dir, "connect", result, lambda: report.plot_cdfs(
        out_dir, "connect", "agent start -> first packet over the tunnel",
        {"first packet": [r["connect_ms"] / 1e3 for r in rows if r["connect_ms"] is not None],
         "stream connected": [r["stream_connected_ms"] / 1e3 for r in rows
                              if r["stream_connected_ms"] is not None]}))
    return result


# -- CLI: `raftmesh bench connect` (bench/cli.py) --------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--rounds", type=int, default=10, help="agent starts")
    harness.add_agent_options(parser, workers=False, register_concurrency=False)
    parser.add_argument("--timeout", type=float, default=60.0, help="per round")


def main(args) -> int:
    """0 when every round got a packet through (whatever the time), else 1."""
    result = run(args.out, args.rounds, args.stream_keepalive, args.timeout, args.replicas)
    return 1 if result["failed_rounds"] else 0
