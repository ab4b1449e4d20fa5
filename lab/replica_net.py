"""Network namespaces, a bridge and nftables rules for chaos runs of real replicas.

Each replica gets its own namespace with `eth0` on a bridge in the host namespace, so the
chaos driver (the client) reaches every replica directly and is never partitioned itself,
as Jepsen's control node. Faults are nftables rules inside a replica's namespace; they
match only peer replicas' addresses, so the client's view of the cluster is untouched.

Names carry the creating pid (`rmc<pid>x<hex>`) so parallel runs never collide and a run
killed before its cleanup is removed by the next one (`cleanup_stale`). The replica subnet
is a free /28 of 198.51.100.0/24 (documentation range), chosen under a lock.
"""
from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass, field

# Process and namespace primitives shared with the benchmarks' lab.
from raftmesh.lab.namespaces import delete_netns
from raftmesh.lab.processes import run

PREFIX = "rmc"
SUPERNET = ipaddress.ip_network("198.51.100.0/24")
LOCK_FILE = "/run/raftmesh-chaos.lock"
TABLE = "rmchaos"


def preflight() -> list[str]:
    """Why a chaos run cannot work on this machine (empty if it can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (network namespaces, nftables)")
    for tool in ("ip", "nft"):
        if run(["which", tool], check=False).returncode != 0:
            problems.append(f"{tool} is not installed")
    return problems


@dataclass
class NetRules:
    """What one replica's namespace drops or redirects; applied as one nft transaction."""

    blocked: set[str] = field(default_factory=set)  # peer IPs: all traffic dropped both ways
    deaf_to: set[str] = field(default_factory=set)  # peer IPs: only what they send here is dropped
    loss_in: int = 0  # per mille of packets from peers dropped
    loss_out: int = 0  # per mille of packets to peers dropped


class ReplicaNet:
    """A bridge with one namespace per replica; `close()` removes all of it, even half-built."""

    def __init__(self, replicas: int):
        self.tag = f"{PREFIX}{os.getpid() % 10**7}x{secrets.token_hex(1)}"
        self.bridge = f"{self.tag}b"
        self.namespaces = [f"{self.tag}-r{i}" for i in range(1, replicas + 1)]
        self.veths = [f"{self.tag}v{i}" for i in range(1, replicas + 1)]
        self.subnet: ipaddress.IPv4Network | None = None
        self.ips: list[str] = []
        self.host_ip = ""
        # replica index -> [(source addresses, port, proxy port)]; no sources: its peers
        self.redirects: dict[int, list[tuple[tuple[str, ...], int, int]]] = {}
        self.rules: dict[int, NetRules] = {}
        self._pids: list[int] = []
        self._spares_taken = 0

    # -- build and tear down ---------------------------------------------------------------
    def setup(self) -> None:
        cleanup_stale()
        try:
            with open(LOCK_FILE, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self.subnet = _free_subnet()
                hosts = list(self.subnet.hosts())
                self.host_ip = str(hosts[0])
                self.ips = [str(h) for h in hosts[1:1 + len(self.namespaces)]]
                # fixed MAC: else it follows the lowest port's as veths join (lab/namespaces.py)
                mac = "02:72:6e:" + ":".join(f"{b:02x}" for b in hashlib.sha256(
                    self.bridge.encode()).digest()[:3])
                run(["ip", "link", "add", self.bridge, "address", mac, "type", "bridge"])
                run(["ip", "addr", "add", f"{self.host_ip}/{self.subnet.prefixlen}", "dev", self.bridge])
                run(["ip", "link", "set", self.bridge, "up"])
            for i, (ns, veth, ip) in enumerate(zip(self.namespaces, self.veths, self.ips)):
                run(["ip", "netns", "add", ns])
                run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
                run(["ip", "link", "set", veth, "master", self.bridge, "up"])
                run(["ip", "-n", ns, "addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", "eth0"])
                run(["ip", "-n", ns, "link", "set", "eth0", "up"])
                run(["ip", "-n", ns, "link", "set", "lo", "up"])
                self.rules[i] = NetRules()
                self.apply(i)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """End what still runs in our namespaces (by pid), delete them, then the bridge.
        The veths are deleted explicitly: a namespace's own teardown is asynchronous."""
        for ns, veth in zip(self.namespaces, self.veths):
            delete_netns(ns)
            if run(["ip", "link", "show", veth], check=False).returncode == 0:
                run(["ip", "link", "del", veth], check=False)
        run(["ip", "link", "del", self.bridge], check=False)

    def add_host_addresses(self, n: int) -> list[str]:
        """n more addresses of the host on the bridge, after the replicas', so the lab can
        tell clients apart by source (the geo lab's regions); gone with the bridge."""
        added = self.spare_addresses(n)
        for ip in added:
            run(["ip", "addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", self.bridge])
        return added

    def spare_addresses(self, n: int) -> list[str]:
        """n addresses of the subnet no replica, host or earlier caller has."""
        hosts = list(self.subnet.hosts())[1 + len(self.namespaces) + self._spares_taken:]
        if len(hosts) < n:
            raise RuntimeError(f"a /{self.subnet.prefixlen} has room for {len(hosts)} more addresses, not {n}")
        self._spares_taken += n
        return [str(h) for h in hosts[:n]]

    def prefix(self, i: int) -> list[str]:
        """argv prefix that runs a command inside replica i's namespace (0-based)."""
        return ["ip", "netns", "exec", self.namespaces[i]]

    # -- faults --------------------------------------------------------------------------------
    def redirect(self, i: int, port: int, proxy_port: int, sources: tuple[str, ...] = ()) -> None:
        """Send connections to replica i's `port` through its latency proxy: from its peer
        replicas (its Raft port), or from the given source addresses (the geo lab's regions)."""
        self.redirects.setdefault(i, []).append((tuple(sources), port, proxy_port))
        self.apply(i)

    def set_rules(self, i: int, rules: NetRules) -> None:
        self.rules[i] = rules
        self.apply(i)

    def heal(self) -> None:
        for i in range(len(self.namespaces)):
            if self.rules.get(i) != NetRules():
                self.set_rules(i, NetRules())

    def apply(self, i: int) -> None:
        """Replace the namespace's table in one nft transaction (never a half-applied set)."""
        rules = self.rules.get(i, NetRules())
        peers = [ip for j, ip in enumerate(self.ips) if j != i]
        peer_set = "{ " + ", ".join(peers) + " }"
        pre, inp, out = [], [], []
        for sources, port, proxy_port in self.redirects.get(i, []):
            source_set = "{ " + ", ".join(sources) + " }" if sources else peer_set
            pre.append(f"ip saddr {source_set} tcp dport {port} redirect to :{proxy_port}")
        if rules.blocked:
            blocked = "{ " + ", ".join(sorted(rules.blocked)) + " }"
            inp.append(f"ip saddr {blocked} drop")
            out.append(f"ip daddr {blocked} drop")
        if rules.deaf_to:
            inp.append("ip saddr { " + ", ".join(sorted(rules.deaf_to)) + " } drop")
        if rules.loss_in:
            inp.append(f"ip saddr {peer_set} numgen random mod 1000 < {rules.loss_in} drop")
        if rules.loss_out:
            out.append(f"ip daddr {peer_set} numgen random mod 1000 < {rules.loss_out} drop")
        text = (f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\n"
                f"table inet {TABLE} {{\n"
                + _chain("pre", "type nat hook prerouting priority dstnat", pre)
                + _chain("in", "type filter hook input priority filter", inp)
                + _chain("out", "type filter hook output priority filter", out) + "}\n")
        run(self.prefix(i) + ["nft", "-f", "-"], input=text)

    def ruleset(self, i: int) -> str:
        """The live nft ruleset of replica i's namespace, for evidence in reports."""
        return run(self.prefix(i) + ["nft", "list", "ruleset"], check=False).stdout


def _chain(name: str, hook: str, rules: list[str]) -> str:
    body = "".join(f"    {r}\n" for r in rules)
    return f"  chain {name} {{\n    {hook}; policy accept;\n{body}  }}\n"


def _free_subnet() -> ipaddress.IPv4Network:
    """A /28 of the documentation range that no host address or route uses yet."""
    used = []
    for argv in (["ip", "-4", "-o", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
        for token in run(argv, check=False).stdout.split():
            try:
                used.append(ipaddress.ip_network(token, strict=False))
            except ValueError:
                continue
    for candidate in SUPERNET.subnets(new_prefix=28):
        if not any(candidate.overlaps(u) for u in used if u.prefixlen > 0):
            return candidate
    raise RuntimeError(f"no free /28 left in {SUPERNET} (too many chaos runs at once?)")


def cleanup_stale() -> None:
    """Remove namespaces and bridges of chaos runs whose process is gone."""
    pattern = re.compile(rf"^{PREFIX}(\d+)x[0-9a-f]{{2}}")
    for line in run(["ip", "netns", "list"], check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = pattern.match(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            delete_netns(name)
    for line in run(["ip", "-o", "link", "show", "type", "bridge"], check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        m = pattern.match(name)
        if m and name.endswith("b") and not os.path.exists(f"/proc/{m.group(1)}"):
            run(["ip", "link", "del", name], check=False)
