"""A subnet router's (or exit node's) side: the kernel forwards between the mesh and the
subnet, and by default masquerades mesh traffic as the router's own address where it
leaves, so hosts of the subnet answer without any route back into the mesh. Sites that
route the mesh's addresses back to their routers themselves turn masquerading off
(`--no-masquerade`) and see the peers' real addresses.

Masquerading lives in its own nft table per interface (`inet raftmesh_<ifname>_nat`),
created or replaced in one transaction and deleted at stop; forwarding sysctls are
restored to what they were. What the mesh may reach through the router stays the packet
filter's job (agent/firewall.py filters forwarded traffic from the interface too).
"""
from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterable

from .firewall import FirewallError, table_name

SYSCTLS = {4: "/proc/sys/net/ipv4/ip_forward", 6: "/proc/sys/net/ipv6/conf/all/forwarding"}


def nat_table(ifname: str) -> str:
    """Distinct from every packet-filter table: their escaped names never end in `_nat`."""
    return table_name(ifname) + "_nat"


def render_masquerade(ifname: str) -> str:
    """Create-or-replace the table: what enters from the mesh and leaves by another
    interface takes that interface's address."""
    table = nat_table(ifname)
    return (f"table inet {table}\n"
            f"delete table inet {table}\n"
            f"table inet {table} {{\n"
            f"\tchain postrouting {{\n"
            f"\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
            f'\t\tiifname "{ifname}" oifname != "{ifname}" masquerade\n'
            f"\t}}\n"
            f"}}\n")


def render_delete(ifname: str) -> str:
    table = nat_table(ifname)
    return f"table inet {table}\ndelete table inet {table}\n"


def families(routes: Iterable[str]) -> set[int]:
    return {ipaddress.ip_network(r).version for r in routes}


class Forwarding:
    """Forwarding (and masquerading) on while a router agent runs; `close` undoes both."""

    def __init__(self, ifname: str, routes: Iterable[str], masquerade: bool = True):
        self.ifname, self.masquerade = ifname, masquerade
        self.families = families(routes)
        self._previous: dict[int, str] = {}

    def start(self) -> None:
        for fam in sorted(self.families):
            with open(SYSCTLS[fam]) as f:
                before = f.read().strip()
            if before != "1":
                _write(SYSCTLS[fam], "1")
                self._previous[fam] = before
        if self.masquerade:
            _nft(render_masquerade(self.ifname))
        else:  # a table left by an earlier run with masquerading must not linger
            _nft(render_delete(self.ifname))

    def close(self) -> None:
        _nft(render_delete(self.ifname))
        for fam, value in self._previous.items():
            _write(SYSCTLS[fam], value)
        self._previous.clear()


def unreachable_routes(routes: Iterable[str], ifname: str) -> list[str]:
    """The subnet routes this host has no working route to: a router whose LAN link is
    down reports them, and the cluster moves their primary to another router."""
    out = []
    for r in routes:
        net = ipaddress.ip_network(r)
        if net.prefixlen == 0:
            continue  # exit routes: the internet is not probed
        proc = subprocess.run(["ip", "-j", "route", "show", "match", str(net.network_address)],
                              capture_output=True, text=True, timeout=10)
        if not routed_elsewhere(proc.returncode, proc.stdout, ifname):
            out.append(r)
    return out


def routed_elsewhere(returncode: int, output: str, ifname: str) -> bool:
    """Does `ip -j route show match` list a route other than the default one, not into the
    mesh, on a link that is up? (The default route would send the subnet's traffic away.)"""
    try:
        found = json.loads(output) if returncode == 0 else []
    except ValueError:
        return False
    return any(r.get("dst") not in (None, "default") and r.get("dev") != ifname
               and "linkdown" not in (r.get("flags") or ()) and
               r.get("type", "unicast") == "unicast" for r in found)


def remove_masquerade(ifname: str) -> None:
    """For `agent logout` after a daemon that could not clean up (SIGKILL)."""
    _nft(render_delete(ifname))


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value + "\n")


def _nft(script: str) -> None:
    proc = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True,
                          timeout=30)
    if proc.returncode != 0:
        raise FirewallError(f"nft: {proc.stderr.strip()[:2000]}")
