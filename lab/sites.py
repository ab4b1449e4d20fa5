"""Sites for the namespace lab: a LAN of hosts without agents behind subnet routers, for
the site-to-site test (tests/test_site_to_site.py) and the HA failover benchmark
(bench/route_failover.py). `TwoSites` is the "two datacenters" setup both use.

A site's LAN is a bridge in the lab's hub namespace (deleted with it): each router has
`eth0` on the lab's underlay and `lan0` on the site's bridge; each host has only `eth0` on
the bridge, at 10.<site>.0.<11+i>/24, routers at 10.<site>.0.<1+i>.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .local_cluster import LocalCluster
from .namespaces import Lab, Namespace, RealAgent
from .processes import run

USER = "dc"
# Routes are approved by the policy; site A may reach one host of site B, nothing else.
POLICY = json.dumps({
    "autoApprovers": {"routes": {"10.64.0.0/10": [f"{USER}@"]}},
    "acls": [{"action": "accept", "src": ["10.71.0.0/24"], "dst": ["10.72.0.11:*"]}],
})


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


class TwoSites:
    """Site A (10.71.0.0/24: routers a1, a2, host ha1) and site B (10.72.0.0/24: routers b1,
    b2, hosts hb1, hb2), a replica on the host, a router agent per router advertising its
    site's LAN. `lab` is closed with it (its processes ended by pid, namespaces deleted)."""

    def __init__(self, lab: Lab, workdir: str, keepalive: float = 1.0):
        self.lab, self.cluster, self.agents = lab, None, {}
        try:
            host = lab.connect_host()
            self.a = add_site(lab, 71, [("a1", "192.0.2.11/24"), ("a2", "192.0.2.12/24")], ["ha1"])
            self.b = add_site(lab, 72, [("b1", "192.0.2.21/24"), ("b2", "192.0.2.22/24")],
                              ["hb1", "hb2"])
            self.cluster = LocalCluster(os.path.join(workdir, "cluster"), replicas=1, host=host,
                                        extra_args=["--stream-keepalive", str(keepalive)])
            self.cluster.start_all()
            self.cluster.wait_ready(timeout=30)
            self.api("POST", "/api/v1/users", {"name": USER})
            key = self.api("POST", "/api/v1/preauth-keys", {"user": USER, "reusable": True})["key"]
            self.api("PUT", "/api/v1/policy", POLICY)
            servers = [r.api_url for r in self.cluster.replicas]
            for site in (self.a, self.b):
                for label, ns in site.routers.items():
                    self.agents[label] = RealAgent(lab, ns, workdir, servers, key, label,
                                                   ("--advertise-route", site.lan))
                    self.agents[label].start()
        except BaseException:
            self.close()
            raise

    def api(self, method: str, path: str, body=None):
        status, answer = self.cluster.request(self.cluster.replicas[0], method, path, body)
        if status not in (200, 201):
            raise RuntimeError(f"{method} {path}: {status} {answer}")
        return answer

    def routes(self) -> dict[str, dict]:
        return {r["cidr"]: r for r in self.api("GET", "/api/v1/routes")["routes"]}

    def all_serving(self) -> bool:
        """Both LANs have a primary and two candidates, all of them eligible."""
        table = self.routes()
        return all(cidr in table and table[cidr]["primary"] and len(table[cidr]["candidates"]) == 2
                   and all(c["eligible"] for c in table[cidr]["candidates"])
                   for cidr in (self.a.lan, self.b.lan))

    def warm(self, label: str) -> bool:
        """The router's agent has a direct path to each of its peers (a standby that just
        came back has none yet: until it has, a failover to it waits for path discovery)."""
        peers = self.agents[label].status().get("peers") or ()
        return bool(peers) and all((p.get("path") or {}).get("kind") == "direct" for p in peers)

    def primary(self, site: Site) -> str:
        """The label of the site's primary router."""
        node_id = self.routes()[site.lan]["primary"]
        return next(k for k, a in self.agents.items() if a.status().get("node_id") == node_id)

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        if self.cluster is not None:
            self.cluster.stop_all()
        self.lab.close()
