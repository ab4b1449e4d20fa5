"""Sites for the namespace lab: a LAN of hosts without agents behind subnet routers, for
the site-to-site test (tests/test_site_to_site.py) and the HA failover benchmark
(bench/route_failover.py).

A site's LAN is a bridge in the lab's hub namespace (deleted with it): each router has
`eth0` on the lab's underlay and `lan0` on the site's bridge; each host has only `eth0` on
the bridge, at 10.<site>.0.<11+i>/24, routers at 10.<site>.0.<1+i>.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .namespaces import Lab, Namespace
from .processes import run


@dataclass
class Site:
    lab: Lab
    number: int  # the LAN is 10.<number>.0.0/24
    routers: dict[str, Namespace] = field(default_factory=dict)
    hosts: dict[str, Namespace] = field(default_factory=dict)

    @property
    def lan(self) -> str:
        return f"10.{self.number}.0.0/24"

    def lan_ip(self, label: str) -> str:
        """A router's or host's address on the LAN."""
        if label in self.routers:
            return f"10.{self.number}.0.{1 + list(self.routers).index(label)}"
        return f"10.{self.number}.0.{11 + list(self.hosts).index(label)}"

    def route_hosts_via(self, router: str) -> None:
        """The hosts' default gateway (a site would use a VRRP address of its routers)."""
        for ns in self.hosts.values():
            run(["ip", "-n", ns.name, "route", "replace", "default", "via", self.lan_ip(router)])


def add_site(lab: Lab, number: int, routers: list[tuple[str, str]], hosts: list[str]) -> Site:
    """`routers`: (label, underlay CIDR on the lab bridge); `hosts`: labels. Call after
    Lab.connect_host so routers get their default route to the replicas."""
    site = Site(lab, number)
    bridge = f"lan{number}"
    run(["ip", "-n", lab.hub, "link", "add", bridge, "type", "bridge"])
    run(["ip", "-n", lab.hub, "link", "set", bridge, "up"])
    for label, underlay in routers:
        ns = lab.add(label, underlay)
        site.routers[label] = ns
        _plug(lab, bridge, ns.name, f"l{label}", "lan0", f"{site.lan_ip(label)}/24")
    for label in hosts:
        name = f"{lab.tag}-{label}"
        run(["ip", "netns", "add", name])
        site.hosts[label] = ns = lab.namespace_cls(lab, label, name, "")
        lab.namespaces[label] = ns
        ns.underlay = f"{site.lan_ip(label)}/24"
        _plug(lab, bridge, name, f"l{label}", "eth0", ns.underlay)
        run(["ip", "-n", name, "link", "set", "lo", "up"])
    return site


def _plug(lab: Lab, bridge: str, ns: str, port: str, ifname: str, address: str) -> None:
    run(["ip", "-n", lab.hub, "link", "add", port[:15], "type", "veth", "peer", "name", ifname,
         "netns", ns])
    run(["ip", "-n", lab.hub, "link", "set", port[:15], "master", bridge, "up"])
    run(["ip", "-n", ns, "addr", "add", address, "dev", ifname])
    run(["ip", "-n", ns, "link", "set", ifname, "up"])
