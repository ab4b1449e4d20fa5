"""`raftmesh bench throughput`: iperf3 through raftmesh tunnels, direct and relayed, beside
wireguard-go configured by hand between the same two namespaces (issue: peers behind NAT).

On the namespace lab of `bench connect` (real `raftmesh agent up` daemons, nftables NAT
routers, replicas on the host end of a routed veth), in one run:

- direct: two agents behind endpoint-independent NATs, once probes proved a direct path;
- hand: the baseline, a second WireGuard interface in the same two namespaces, wireguard-go
  configured by hand (`wg set`: keys, the NATs' public addresses, persistent keepalive), so
  the packets cross the same routers; no raftmesh process touches them;
- relay: two agents behind NATs that let no UDP out, relayed by a replica.

Each round measures the three in turn (the order rotates: the machine is shared, and load
drifts), iperf3 TCP for `--seconds`; the summary is each path's median Mbit/s and the
targets: direct at least 90% of hand (the median of the rounds' ratios), relay at least
100 Mbit/s.
"""
from __future__ import annotations

import json
import statistics
import subprocess

from raftmesh.agent.wireguard import WireGuardInterface, generate_private_key, public_key_of
from raftmesh.bench import harness, report
from raftmesh.bench.connect import Sides
from raftmesh.lab import nat, namespaces, processes

PATHS = ("direct", "hand", "relay")
HAND_PORT = 41642  # beside the agents' 41641
HAND_NET = "10.254.0"  # the NAT lab's LANs are 10.<n>.0.0/24 with n < 250
TARGETS = {"direct_of_hand": 0.9, "relay_mbit_s": 100.0}


def _iperf(client: namespaces.Namespace, server_ip: str, seconds: float) -> float:
    """Mbit/s that iperf3 (TCP, one stream) got through to `server_ip`."""
    out = client.run("iperf3", "-c", server_ip, "-t", f"{seconds:g}", "-J",
                     timeout=seconds + 30, check=False).stdout
    result = json.loads(out) if out.strip() else {"error": "no output"}
    if "error" in result:
        raise RuntimeError(f"iperf3 to {server_ip}: {result['error']}")
    return result["end"]["sum_received"]["bits_per_second"] / 1e6


def _pair(bench_run, sides: Sides, servers: list[str], key: str, nat_type: str, label: str,
          kind: str):
    """Two agents behind routers of `nat_type`, up, each seeing the other by a `kind` path;
    returns them and the second one's overlay address."""
    agents = []
    for side in "ab":
        ns = sides.add(nat_type, f"{label}{side}")
        agent = namespaces.RealAgent(sides.lab, ns, bench_run.path, servers, key, ns.label)
        agent.start()
        agents.append(agent)

    def path_to(agent, other) -> dict | None:
        name = f"host-{other.label}"
        return next((p["path"] for p in agent.status().get("peers", ()) if p["name"] == name), None)
    for agent, other in (agents, agents[::-1]):
        processes.wait_until(lambda: (path_to(agent, other) or {}).get("kind") == kind, 60,
                             f"{agent.label} reaches {other.label} by a {kind} path")
    return agents, agents[1].status()["addresses"][0].split("/")[0]


def _hand_tunnel(lab, a: namespaces.RealAgent, b: namespaces.RealAgent) -> str:
    """wireguard-go set up by hand between the two agents' namespaces, through their NATs
    (whose public addresses the agents' direct endpoints name); returns b's tunnel address."""
    keys = [generate_private_key() for _ in range(2)]
    wan = {a: _direct_endpoint(b, a).rsplit(":", 1)[0], b: _direct_endpoint(a, b).rsplit(":", 1)[0]}
    ifaces = []
    for i, agent in enumerate((a, b)):
        iface = WireGuardInterface(lab.ifname("hw"), netns=agent.ns.name, kernel=False,
                                   covering_routes=())  # the agent's route to the mesh stays
        lab.on_close(iface.close)
        iface.create()
        lab.track_pid(iface.pid)
        iface.configure(keys[i], HAND_PORT, [f"{HAND_NET}.{i + 1}/24"])
        ifaces.append(iface)
    for i, (agent, other) in enumerate(((a, b), (b, a))):
        agent.ns.run("wg", "set", ifaces[i].name, "peer", public_key_of(keys[1 - i]),
                     "endpoint", f"{wan[other]}:{HAND_PORT}", "allowed-ips", f"{HAND_NET}.{2 - i}/32",
                     "persistent-keepalive", "1")
    _answers(a.ns, f"{HAND_NET}.2", "the hand-made tunnel")
    return f"{HAND_NET}.2"


def _answers(ns: namespaces.Namespace, ip: str, what: str, timeout: float = 30.0) -> None:
    """Return once an ICMP echo to `ip` is answered, or TimeoutError naming `what`."""
    prober = ns.first_reply(ip, interval=0.05, wait=0.5, timeout=timeout)
    try:
        if prober.wait(timeout + 5) != 0:
            raise TimeoutError(f"no answer from {ip} through {what} in {timeout:g} s")
    finally:
        processes.stop_proc(prober)


def _direct_endpoint(agent: namespaces.RealAgent, peer: namespaces.RealAgent) -> str:
    name = f"host-{peer.label}"
    return next(p["path"]["endpoint"] for p in agent.status()["peers"] if p["name"] == name)


def run(out_dir: str, seconds: float = 5.0, rounds: int = 3, replicas: int = 1,
        keepalive: float = 10.0) -> dict:
    rows: list[dict] = []
    try:
        with harness.namespace_lab() as lab, harness.BenchRun("throughput") as bench_run:
            gateway = nat.public_gateway()
            host = lab.connect_host(gateway, routed=True)
            sides = Sides(lab, gateway.rsplit(".", 1)[0])
            with bench_run.cluster(replicas, keepalive, host=host) as cluster:
                key = harness.setup_cluster(cluster, topology="mesh")[harness.BENCH_USER]
                servers = [r.api_url for r in cluster.replicas]
                (da, db), direct_ip = _pair(bench_run, sides, servers, key, "eim", "td", "direct")
                (ra, rb), relay_ip = _pair(bench_run, sides, servers, key, "udp_blocked", "tr", "relay")
                hand_ip = _hand_tunnel(lab, da, db)
                for server in (db, rb):
                    server.ns.spawn("iperf3", "-s", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                targets = {"direct": (da.ns, direct_ip), "hand": (da.ns, hand_ip), "relay": (ra.ns, relay_ip)}
                for r in range(rounds):
                    for path in PATHS[r % 3:] + PATHS[:r % 3]:
                        client, ip = targets[path]
                        _answers(client, ip, f"the {path} tunnel")
                        mbit = _iperf(client, ip, seconds)
                        rows.append({"path": path, "round": r + 1, "mbit_s": mbit})
                        bench_run.progress.update(f"round {r + 1}/{rounds} {path}: {mbit:.0f} Mbit/s", force=True)
                for agent in (da, db, ra, rb):
                    agent.stop()
    except harness.LabUnavailable as e:
        raise SystemExit(f"bench throughput: {e}") from None

    summary = summarize(rows)
    result = {"benchmark": "throughput", "machine": bench_run.machine(), "rounds": rows,
              "summary": summary, "targets": verdicts(rows, summary),
              "config": {"seconds": seconds, "rounds": rounds, "replicas": replicas,
                         "tool": "iperf3 TCP, one stream"}}
    report.print_table("throughput: iperf3 through the tunnel, median of the rounds", summary,
                       ["path", "rounds", "median_mbit_s", "min_mbit_s", "max_mbit_s"])
    for t in result["targets"]:
        print(f"target {t['what']}: {t['value']:.2f} -> {'met' if t['met'] else 'MISSED'}")
    report.save(out_dir, "throughput", result, lambda: _plot(out_dir, summary))
    return result


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for path in PATHS:
        values = [r["mbit_s"] for r in rows if r["path"] == path]
        if values:
            out.append({"path": path, "rounds": len(values), "median_mbit_s": statistics.median(values),
                        "min_mbit_s": min(values), "max_mbit_s": max(values)})
    return out


def verdicts(rows: list[dict], summary: list[dict]) -> list[dict]:
    """The targets' values: direct/hand as the median of each round's ratio (the two measured
    back to back, so load that drifts between rounds cancels out), relay as its median."""
    median = {s["path"]: s["median_mbit_s"] for s in summary}
    by_round = {(r["round"], r["path"]): r["mbit_s"] for r in rows}
    ratios = [by_round[n, "direct"] / by_round[n, "hand"] for n, path in by_round
              if path == "hand" and by_round[n, "hand"] and (n, "direct") in by_round]
    out = []
    if ratios:
        ratio = statistics.median(ratios)
        out.append({"what": f"direct / hand-configured >= {TARGETS['direct_of_hand']:g}",
                    "value": ratio, "met": ratio >= TARGETS["direct_of_hand"]})
    if "relay" in median:
        out.append({"what": f"relay Mbit/s >= {TARGETS['relay_mbit_s']:g}", "value": median["relay"],
                    "met": median["relay"] >= TARGETS["relay_mbit_s"]})
    return out


def _plot(out_dir: str, summary: list[dict]) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([s["path"] for s in summary], [s["median_mbit_s"] for s in summary],
           yerr=[[s["median_mbit_s"] - s["min_mbit_s"] for s in summary],
                 [s["max_mbit_s"] - s["median_mbit_s"] for s in summary]], capsize=6)
    ax.set_ylabel("Mbit/s (median, min-max)")
    ax.set_title("iperf3 through the tunnel")
    return report.save_figure(fig, out_dir, "throughput")


# -- CLI: `raftmesh bench throughput` (bench/cli.py) -------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--seconds", type=float, default=5.0, help="iperf3 duration per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per path")
    harness.add_agent_options(parser, workers=False, register_concurrency=False)


def main(args) -> int:
    """0 when both targets are met, else 1."""
    result = run(args.out, args.seconds, args.rounds, args.replicas, args.stream_keepalive)
    return 0 if all(t["met"] for t in result["targets"]) else 1
