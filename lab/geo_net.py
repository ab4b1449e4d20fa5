"""The geo lab (issue #26): replicas in "regions" a WAN apart, on one machine.

This kernel has no `tc netem`, so the round trips are added in user space. Each replica runs
in its own network namespace (lab/replica_net.py), where one delay proxy
(lab/latency_proxy.py) relays both its Raft port and its API port, holding every chunk for
half the round trip of the link it belongs to, each way. Links are told apart by source
address: a peer replica's (pysyncobj opens one connection per pair of replicas, so a pair's
traffic crosses exactly one proxy and gets the pair's round trip whichever side dialled),
or a region's (the host has one address per region on the bridge; a region's agents and
clients bind it). Region i hosts replica i; its clients reach it with `local_rtt_ms` and
the other replicas with the inter-region round trips.

Why not the alternatives: a proxy per ordered pair on loopback would make replicas dial
each other at the proxies' addresses, but Raft names members by address, so each would know
its peers under other names; an NFQUEUE delayer needs a queue binding and per-packet
verdicts for the same delays. Limits: delay only (no loss, no bandwidth cap, no jitter by
default), and the proxies share this machine's CPUs with everything else.

The driver's own address (the bridge's first) is not redirected: control requests (ready
checks, leader polls) see no delay, as Jepsen's control node.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from raftmesh.lab import latency_proxy
from raftmesh.lab.processes import stop_pid, wait_until
from raftmesh.lab.replica_net import ReplicaNet

RAFT_PORT, API_PORT, RAFT_PROXY_PORT, API_PROXY_PORT, CONTROL_PORT = 7200, 8200, 7201, 8201, 7202


@dataclass(frozen=True)
class Topology:
    """Round trips between regions (ms); region i hosts replica i."""

    rtt_ms: tuple[tuple[float, ...], ...]  # symmetric, zero diagonal
    local_rtt_ms: float = 1.0  # a region's clients to their own replica

    @property
    def regions(self) -> int:
        return len(self.rtt_ms)

    def link_rtt_ms(self, region: int, replica: int) -> float:
        return self.local_rtt_ms if region == replica else self.rtt_ms[region][replica]

    def write_floor_ms(self, region: int, leader: int) -> float:
        """The least a write through `region`'s replica can take: the client's round trip,
        the command forwarded to the leader and the commit back (when it lands on a
        follower), and the leader's round trip to its nearest other member (with 3
        replicas, one more makes a quorum)."""
        nearest = min(self.rtt_ms[leader][j] for j in range(self.regions) if j != leader)
        return self.local_rtt_ms + self.link_rtt_ms(region, leader) * (region != leader) + nearest


def parse_topology(rtts: str, local_rtt_ms: float = 1.0) -> Topology:
    """"40,80,150": the round trips of the pairs (1,2), (1,3), (2,3), ... in that order, for
    as many regions as the count of pairs implies."""
    try:
        values = [float(x) for x in rtts.split(",")]
    except ValueError:
        raise ValueError(f"round trips must be comma-separated milliseconds, got {rtts!r}") from None
    n = 2
    while n * (n - 1) // 2 < len(values):
        n += 1
    if n < 3 or n * (n - 1) // 2 != len(values):
        raise ValueError(f"{len(values)} round trips do not make the pairs of 3 or more regions "
                         "(3 regions: 3 values, 4: 6, 5: 10)")
    if any(v <= 0 for v in values) or local_rtt_ms < 0:
        raise ValueError("round trips must be > 0 ms (the local one >= 0)")
    matrix = [[0.0] * n for _ in range(n)]
    pairs = ((i, j) for i in range(n) for j in range(i + 1, n))
    for (i, j), v in zip(pairs, values):
        matrix[i][j] = matrix[j][i] = v
    return Topology(tuple(tuple(row) for row in matrix), local_rtt_ms)


class GeoNet:
    """Namespaces, one delay proxy per replica and the region addresses; `close()` ends the
    proxies by pid and removes it all, also when half-built."""

    def __init__(self, topology: Topology, log_dir: str):
        self.topology, self.log_dir = topology, log_dir
        self.net = ReplicaNet(topology.regions)
        self.region_ips: list[str] = []
        self.proxies: list[subprocess.Popen] = []

    @property
    def ips(self) -> list[str]:
        return self.net.ips

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.proxies]

    def prefix(self, replica) -> list[str]:
        """LocalCluster's command_prefix: replica rN runs in namespace N."""
        return self.net.prefix(int(replica.id[1:]) - 1)

    def __enter__(self) -> "GeoNet":
        try:
            self.net.setup()
            self.region_ips = self.net.add_host_addresses(self.topology.regions)
            for i in range(self.topology.regions):
                self._start_proxy(i)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start_proxy(self, i: int) -> None:
        ip = self.ips[i]
        with open(os.path.join(self.log_dir, f"delay-proxy-r{i + 1}.log"), "ab") as log:
            proc = subprocess.Popen(self.net.prefix(i) + [
                sys.executable, "-m", "raftmesh.lab.latency_proxy",
                "--listen", f"{ip}:{RAFT_PROXY_PORT}", "--target", f"{ip}:{RAFT_PORT}",
                "--listen", f"{ip}:{API_PROXY_PORT}", "--target", f"{ip}:{API_PORT}",
                "--control", f"{ip}:{CONTROL_PORT}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.proxies.append(proc)
        wait_until(lambda: proc.poll() is not None or self._answers(ip), 15, f"delay proxy of r{i + 1}")
        if proc.poll() is not None:
            raise RuntimeError(f"delay proxy of r{i + 1} exited with {proc.returncode} "
                               f"(log: {self.log_dir}/delay-proxy-r{i + 1}.log)")
        for j, peer in enumerate(self.ips):
            if j != i:
                self._set(ip, peer, self.topology.rtt_ms[i][j])
        for region, source in enumerate(self.region_ips):
            self._set(ip, source, self.topology.link_rtt_ms(region, i))
        self.net.redirect(i, RAFT_PORT, RAFT_PROXY_PORT)
        self.net.redirect(i, API_PORT, API_PROXY_PORT, sources=tuple(self.region_ips))

    @staticmethod
    def _answers(ip: str) -> bool:
        try:
            return latency_proxy.send((ip, CONTROL_PORT), "ping", timeout=0.5) == "ok"
        except OSError:
            return False

    @staticmethod
    def _set(proxy_ip: str, source: str, rtt_ms: float) -> None:
        answer = latency_proxy.send((proxy_ip, CONTROL_PORT), f"set {source} {rtt_ms / 2:g} 0")
        if answer != "ok":
            raise RuntimeError(f"delay proxy {proxy_ip}: {answer}")

    def close(self) -> None:
        for p in self.proxies:
            if p.poll() is None:
                stop_pid(p.pid)
            p.wait(5)
        self.net.close()
