"""NAT routers for the namespace lab: the NAT types agents meet on real networks.

A router is a namespace with `eth0` on the lab's public bridge and a LAN bridge of its own
behind which agents' namespaces live; nftables does the NAT:

- `eim`: plain masquerade. Linux keeps the source port when it can, so one inside port
  maps to one outside port whatever the destination (endpoint-independent mapping): STUN's
  answer is what peers must probe, and hole punching works.
- `edm`: masquerade with random ports, a new outside port per destination
  (endpoint-dependent, "symmetric"): the STUN-mapped port is useless to peers, so a pair of
  these needs the relay.
- `udp_blocked`: `eim`, and no UDP leaves at all (only TCP to the replicas gets out).

Every router drops unsolicited inbound connections before conntrack keeps them (as home
routers do): otherwise a peer's probe arriving before our own left would leave an entry
that makes the masquerade pick another port for our probes, and punching would fail.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

from .namespaces import Lab, Namespace, add_netns
from .processes import run

MODES = ("eim", "edm", "udp_blocked")
_lans = itertools.count(1)


def public_gateway() -> str:
    """A public /24 unique to this lab (198.18.0.0/15, benchmarking range), gateway .254:
    for `Lab.connect_host(gateway, routed=True)`."""
    return f"198.18.{(os.getpid() * 7 + next(_lans)) % 250}.254/24"


def router_rules(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown NAT mode {mode!r}; one of {', '.join(MODES)}")
    masquerade = "masquerade random" if mode == "edm" else "masquerade"
    block = '  oifname "eth0" meta l4proto udp drop\n' if mode == "udp_blocked" else ""
    return ("table ip router {\n"
            " chain post {\n  type nat hook postrouting priority 100;\n"
            f'  oifname "eth0" {masquerade}\n }}\n'
            " chain pre {\n  type filter hook prerouting priority 0;\n"
            '  iifname "eth0" ct state new drop\n }\n'
            f" chain out {{\n  type filter hook forward priority 0;\n{block} }}\n"
            "}\n")


@dataclass
class Router:
    lab: Lab
    ns: Namespace
    mode: str
    lan: int  # the LAN is 10.<lan>.0.0/24, the router 10.<lan>.0.1
    hosts: int = 0

    def add_host(self, label: str) -> Namespace:
        """A namespace on this router's LAN, default route through it."""
        self.hosts += 1
        ip = f"10.{self.lan}.0.{10 + self.hosts}"
        name = f"{self.lab.tag}-{label}"
        add_netns(name)
        ns = self.lab.namespace_cls(self.lab, label, name, f"{ip}/24")
        self.lab.namespaces[label] = ns
        port = f"l{label}"[:15]
        run(["ip", "-n", self.ns.name, "link", "add", port, "type", "veth", "peer", "name",
             "eth0", "netns", name])
        run(["ip", "-n", self.ns.name, "link", "set", port, "master", "lan0", "up"])
        for cmd in (["addr", "add", ns.underlay, "dev", "eth0"], ["link", "set", "eth0", "up"],
                    ["link", "set", "lo", "up"], ["route", "add", "default", "via", f"10.{self.lan}.0.1"]):
            run(["ip", "-n", name, *cmd])
        return ns


def add_router(lab: Lab, label: str, wan: str, mode: str) -> Router:
    """A NAT router with public address `wan` (CIDR on the lab bridge); call after
    connect_host so it has a default route."""
    rules = router_rules(mode)
    ns = lab.add(label, wan)
    lan = next(_lans) % 250
    run(["ip", "-n", ns.name, "link", "add", "lan0", "type", "bridge"])
    run(["ip", "-n", ns.name, "addr", "add", f"10.{lan}.0.1/24", "dev", "lan0"])
    run(["ip", "-n", ns.name, "link", "set", "lan0", "up"])
    ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    ns.run("nft", "-f", "-", input=rules)
    return Router(lab, ns, mode, lan)
