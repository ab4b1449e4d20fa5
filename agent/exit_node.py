"""Using an exit node: the internet through one chosen peer, with policy routing (as
wg-quick does) so that the host's own underlay and the mesh keep working.

Every approved exit node's peer record carries 0.0.0.0/0 and ::/0; WireGuard cannot give
one allowed IP to two peers, so `wireguard_peers` keeps them on the chosen exit node only.
The default route then lives in a table of its own (TABLE), chosen by ip rules:

    5200  fwmark TABLE  -> main    WireGuard's own packets (the interface's fwmark)
    5201+ to <replica>  -> main    the control plane, relay and STUN servers
    5210  to <LAN>      -> TABLE   the local networks, unless LAN access is kept
    5220  main, suppress_prefixlength 0   every more specific route (mesh, LAN) wins
    5230  -> TABLE                 everything else: the exit node

`ExitRouting.use(None)` or `close()` removes all of it.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import socket
import subprocess
from collections.abc import Iterable
from urllib.parse import urlsplit

from raftmesh.proto.wire import EXIT_ROUTES, Peer

TABLE = 51820
PRIORITIES = range(5200, 5240)


def find_exit_node(peers: Iterable[Peer], wanted: str | None) -> Peer | None:
    """The peer `wanted` names (id, name or overlay address), if it offers exit routes."""
    if not wanted:
        return None
    for p in peers:
        if wanted in (p.id, p.name) or f"{wanted}/32" in p.addresses or \
                f"{wanted}/128" in p.addresses:
            return p if any(r in EXIT_ROUTES for r in p.allowed_ips) else None
    return None


def wireguard_peers(peers: Iterable[Peer], exit_node: Peer | None) -> list[Peer]:
    """Peers as WireGuard gets them: exit routes on the chosen exit node only."""
    out = []
    for p in peers:
        if p is not exit_node and any(r in EXIT_ROUTES for r in p.allowed_ips):
            p = dataclasses.replace(p, allowed_ips=tuple(
                r for r in p.allowed_ips if r not in EXIT_ROUTES))
        out.append(p)
    return out


def rule_commands(families: Iterable[int], bypass: Iterable[str], lans: Iterable[str],
                  allow_lan: bool) -> list[list[str]]:
    """`ip` argvs installing the rules above for each family (pure)."""
    cmds = []
    for fam in sorted(families):
        v = f"-{fam}"
        cmds.append(["ip", v, "rule", "add", "fwmark", str(TABLE), "table", "main",
                     "priority", "5200"])
        for i, addr in enumerate(a for a in sorted(set(bypass))
                                 if ipaddress.ip_address(a).version == fam):
            cmds.append(["ip", v, "rule", "add", "to", addr, "table", "main",
                         "priority", str(5201 + min(i, 8))])
        if not allow_lan:
            for lan in sorted(set(n for n in lans if ipaddress.ip_network(n).version == fam)):
                cmds.append(["ip", v, "rule", "add", "to", lan, "table", str(TABLE),
                             "priority", "5210"])
        cmds.append(["ip", v, "rule", "add", "table", "main", "suppress_prefixlength", "0",
                     "priority", "5220"])
        cmds.append(["ip", v, "rule", "add", "table", str(TABLE), "priority", "5230"])
    return cmds


def server_addresses(urls: Iterable[str]) -> list[str]:
    """The addresses of the control plane's hosts (host:port or URLs), as resolved now."""
    out = set()
    for u in urls:
        host = urlsplit(u if "//" in u else f"//{u}").hostname
        if not host:
            continue
        try:
            out.update(ai[4][0] for ai in socket.getaddrinfo(host, None))
        except OSError:
            continue
    return sorted(out)


class ExitRouting:
    """Policy routing towards the chosen exit node on interface `ifname`."""

    def __init__(self, ifname: str, servers: Iterable[str], allow_lan: bool = False):
        self.ifname, self.servers, self.allow_lan = ifname, list(servers), allow_lan
        self.active: tuple[str, frozenset[int]] | None = None  # (node key, families)

    def use(self, peer: Peer | None) -> None:
        """Route the internet through `peer` (None: through the underlay again)."""
        fams = frozenset(ipaddress.ip_network(r).version for r in
                         (peer.allowed_ips if peer else ()) if r in EXIT_ROUTES)
        want = (peer.node_key, fams) if peer is not None and fams else None
        if want == self.active:
            return
        self.close()
        if want is None:
            return
        _run(["wg", "set", self.ifname, "fwmark", str(TABLE)])
        _run(["sysctl", "-qw", "net.ipv4.conf.all.src_valid_mark=1"])
        for fam in sorted(fams):
            _run(["ip", f"-{fam}", "route", "replace", "default", "dev", self.ifname,
                  "table", str(TABLE)])
        for argv in rule_commands(fams, server_addresses(self.servers), self._lans(),
                                  self.allow_lan):
            _run(argv)
        self.active = want

    def close(self) -> None:
        for fam in (4, 6):
            _delete_rules(fam)
            subprocess.run(["ip", f"-{fam}", "route", "flush", "table", str(TABLE)],
                           capture_output=True, timeout=10)
        self.active = None

    def _lans(self) -> list[str]:
        """The networks the host is directly attached to (other than the mesh)."""
        out = []
        for fam in (4, 6):
            proc = subprocess.run(["ip", "-j", f"-{fam}", "route", "show", "table", "main",
                                   "scope", "link"], capture_output=True, text=True, timeout=10)
            for r in json.loads(proc.stdout or "[]"):
                if r.get("dev") != self.ifname and "/" in r.get("dst", ""):
                    out.append(str(ipaddress.ip_network(r["dst"], strict=False)))
        return out


def _delete_rules(fam: int) -> None:
    """Every rule in our priority range (left by this run or a SIGKILLed one)."""
    proc = subprocess.run(["ip", "-j", f"-{fam}", "rule", "show"], capture_output=True,
                          text=True, timeout=10)
    for r in json.loads(proc.stdout or "[]"):
        if r.get("priority") in PRIORITIES:
            subprocess.run(["ip", f"-{fam}", "rule", "del", "priority", str(r["priority"])],
                           capture_output=True, timeout=10)


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise OSError(f"{' '.join(argv)}: {proc.stderr.strip()[:500]}")
