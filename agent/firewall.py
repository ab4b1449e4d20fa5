"""The packet filter: a netmap's FilterRules enforced with nftables on the WireGuard interface.

WireGuard's cryptokey routing only proves *who* sent a packet; what that peer may reach is
the policy's job, and it must hold even against a peer that ignores its own filter. So the
receiving node enforces its rules itself, in the kernel, for traffic arriving on the
WireGuard interface only: one nft table per interface (`inet raftmesh_<ifname>`), whose input
and forward hooks send that interface's packets through one chain of accepts ending in drop.
Other interfaces are never matched, so the host's own firewall and traffic stay untouched.

The ruleset text comes from a pure function (`render_ruleset`, unit-tested without root);
`PacketFilter.apply` loads it as a single transaction that creates-or-replaces the whole
table, so there is never a moment with no filter or half a filter: through nftables' own
Python binding (libnftables, in this process) when it is installed and the filter is for
this process's network namespace, else with `nft -f` (a process start: 15-40 ms on a busy
2-core host, the largest step of a netmap apply). Every value
written into the text is parsed and re-rendered first, so nothing from the netmap can
inject nft syntax.
"""
from __future__ import annotations

import functools
import ipaddress
import json
import re
import subprocess
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from raftmesh.proto.wire import PROTOCOLS, FilterRule, PortRange

TABLE_PREFIX = "raftmesh_"
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.=+-]{1,15}$")
ANY = "*"  # Tailscale's "any address"; accepted in src and dst prefixes


class FirewallError(RuntimeError):
    """nft refused a command; the previous ruleset (if any) is still in force."""


def table_name(ifname: str) -> str:
    """nft identifier for an interface's table; escaping keeps distinct names distinct."""
    check_ifname(ifname)
    return TABLE_PREFIX + "".join(c if c.isalnum() else f"_{ord(c):02x}" for c in ifname)


def check_ifname(ifname: str) -> str:
    if not IFNAME_RE.match(ifname):
        raise ValueError(f"invalid interface name {ifname!r}")
    return ifname


# -- rendering (pure) ----------------------------------------------------------------------

def _split_families(prefixes: Iterable[str]) -> dict[int, list[str]]:
    """Canonical CIDRs by IP version; '*' stands for both whole address spaces."""
    out: dict[int, list[str]] = {4: [], 6: []}
    for p in prefixes:
        nets = ["0.0.0.0/0", "::/0"] if p == ANY else [p]
        for n in nets:
            net = ipaddress.ip_network(n, strict=False)
            s = str(net)
            if s not in out[net.version]:
                out[net.version].append(s)
    return out


def _addr_match(family: int, direction: str, prefixes: list[str]) -> str:
    """`ip saddr {..}` clause, or nothing when the set is the whole family (any address)."""
    if any(ipaddress.ip_network(p).prefixlen == 0 for p in prefixes):
        return ""
    kw = "ip" if family == 4 else "ip6"
    return f"{kw} {direction} {{ {', '.join(sorted(prefixes, key=_net_key))} }} "


def _net_key(p: str):
    n = ipaddress.ip_network(p)
    return (n.network_address, n.prefixlen)


def _port_match(ports: PortRange) -> str:
    if not (0 <= ports.first <= ports.last <= 65535):
        raise ValueError(f"invalid port range {ports.first}-{ports.last}")
    if (ports.first, ports.last) == (0, 65535):
        return ""
    if ports.first == ports.last:
        return f"th dport {ports.first} "
    return f"th dport {ports.first}-{ports.last} "


def _protocols(rule: FilterRule) -> tuple[str, ...]:
    protos = rule.protos or PROTOCOLS
    for p in protos:
        if p not in PROTOCOLS:
            raise ValueError(f"unsupported protocol {p!r} in packet filter")
    return tuple(p for p in PROTOCOLS if p in protos)  # canonical order, no duplicates


def _group_ports(rule: FilterRule) -> dict[PortRange, list[str]]:
    """Destination prefixes grouped by port range, one nft rule per group."""
    groups: dict[PortRange, list[str]] = {}
    for d in rule.dst:
        groups.setdefault(d.ports, []).append(d.prefix)
    return groups


def _family_clause(fam: int, srcs: list[str], dsts: list[str]) -> str:
    """Address match for one IP family; pins the family when both sides are 'any'."""
    addr = _addr_match(fam, "saddr", srcs) + _addr_match(fam, "daddr", dsts)
    return addr or f"meta nfproto {'ipv4' if fam == 4 else 'ipv6'} "


def render_rule(rule: FilterRule) -> list[str]:
    """nft statements accepting what one FilterRule allows (empty if nothing can match).

    tcp/udp get one statement per port range; icmp (echo only, ports do not apply) gets
    one per family covering every destination.
    """
    protos = _protocols(rule)
    transport = [p for p in protos if p in ("tcp", "udp")]
    l4 = transport[0] if len(transport) == 1 else "{ tcp, udp }"
    srcs = _split_families(rule.src)
    lines: list[str] = []
    for fam in (4, 6):
        if not srcs[fam]:
            continue
        if transport:
            for ports, prefixes in sorted(_group_ports(rule).items()):
                dsts = _split_families(prefixes)[fam]
                if dsts:  # an IPv4 source can never reach an IPv6 destination
                    addr = _family_clause(fam, srcs[fam], dsts)
                    lines.append(f"{addr}meta l4proto {l4} {_port_match(ports)}accept")
        dsts = _split_families(d.prefix for d in rule.dst)[fam]
        if "icmp" in protos and dsts:
            icmp = "icmp type echo-request" if fam == 4 else "icmpv6 type echo-request"
            lines.append(f"{_family_clause(fam, srcs[fam], dsts)}{icmp} accept")
    return lines


def render_ruleset(ifname: str, rules: Sequence[FilterRule]) -> str:
    """The whole `nft -f` script: create-if-missing, delete, redefine, in one transaction.

    Deny by default: only established/related traffic and what a rule accepts gets through;
    everything else arriving on `ifname` is counted and dropped.
    """
    table = table_name(ifname)
    body = [line for r in rules for line in render_rule(r)]
    accepts = "".join(f"\t\t{line}\n" for line in body)
    hook = f'\t\tiifname "{ifname}" jump filter_in\n'
    return (
        f"table inet {table}\n"
        f"delete table inet {table}\n"
        f"table inet {table} {{\n"
        f"\tchain filter_in {{\n"
        f"\t\tct state established,related accept\n"
        f"\t\tct state invalid drop\n"
        f"{accepts}"
        f"\t\tcounter drop\n"
        f"\t}}\n"
        f"\tchain input {{\n"
        f"\t\ttype filter hook input priority filter; policy accept;\n"
        f"{hook}"
        f"\t}}\n"
        f"\tchain forward {{\n"
        f"\t\ttype filter hook forward priority filter; policy accept;\n"
        f"{hook}"
        f"\t}}\n"
        f"}}\n"
    )


def render_delete(ifname: str) -> str:
    """Script removing the table, succeeding whether or not it exists."""
    table = table_name(ifname)
    return f"table inet {table}\ndelete table inet {table}\n"


# -- applying (side effects) ---------------------------------------------------------------

@dataclass
class PacketFilter:
    """Enforces a FilterRule list on one interface, optionally inside a network namespace."""

    ifname: str
    netns: str | None = None
    nft: str = "nft"

    def __post_init__(self) -> None:
        check_ifname(self.ifname)

    @property
    def table(self) -> str:
        return table_name(self.ifname)

    def _argv(self, *args: str) -> list[str]:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        return [*prefix, self.nft, *args]

    def _nft(self, *args: str, script: str | None = None) -> str:
        proc = subprocess.run(self._argv(*args), input=script, capture_output=True,
                              text=True, timeout=30)
        if proc.returncode != 0:
            raise FirewallError(f"nft {' '.join(args)} failed on {self.ifname}: "
                                f"{proc.stderr.strip()[:2000]}")
        return proc.stdout

    def _load(self, script: str) -> None:
        """One transaction, like `nft -f -`: in process when the binding can do it."""
        library = None if self.netns or self.nft != "nft" else _libnftables()
        if library is None:
            self._nft("-f", "-", script=script)
            return
        with _LIBNFTABLES_LOCK:
            rc, _, error = library.cmd(script)
        if rc != 0:
            raise FirewallError(f"nft -f failed on {self.ifname}: {error.strip()[:2000]}")

    def apply(self, rules: Sequence[FilterRule]) -> None:
        """Replace the interface's filter with `rules` atomically (all or nothing)."""
        self._load(render_ruleset(self.ifname, rules))

    def close(self) -> None:
        """Remove the table; traffic on the interface is then unfiltered (used at teardown)."""
        self._load(render_delete(self.ifname))

    def exists(self) -> bool:
        proc = subprocess.run(self._argv("list", "table", "inet", self.table),
                              capture_output=True, text=True, timeout=30)
        return proc.returncode == 0

    def dropped_packets(self) -> int:
        """Packets dropped so far by the final deny rule; shows the filter doing its job."""
        out = json.loads(self._nft("-j", "list", "chain", "inet", self.table, "filter_in"))
        for item in out.get("nftables", []):
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    return int(expr["counter"]["packets"])
        return 0

    def __enter__(self) -> "PacketFilter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_LIBNFTABLES_LOCK = threading.Lock()  # one context for the process; calls one at a time


@functools.cache
def _libnftables():
    """nftables' Python binding (Debian python3-nftables, linked into the virtualenv by
    deploy/install.sh), one context for the process; None where it is missing or its
    library will not load, and `nft` is started instead."""
    try:
        import nftables
        return nftables.Nftables()
    except (ImportError, OSError):
        return None
