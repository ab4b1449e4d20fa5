"""The agent's router and exit-node pieces that need no root: nft text, route checks,
which peer carries the exit routes, the policy-routing rules."""
import json

import pytest

from raftmesh.agent import exit_node, forwarding
from raftmesh.agent.firewall import table_name
from raftmesh.proto.wire import Peer


def test_masquerade_table_is_its_own_and_matches_mesh_traffic_only():
    text = forwarding.render_masquerade("wg0")
    table = forwarding.nat_table("wg0")
    assert table != table_name("wg0") and table.endswith("_nat")
    assert text.startswith(f"table inet {table}\ndelete table inet {table}\n")
    assert 'iifname "wg0" oifname != "wg0" masquerade' in text
    assert "priority srcnat" in text
    assert forwarding.render_delete("wg0") == f"table inet {table}\ndelete table inet {table}\n"
    with pytest.raises(ValueError):
        forwarding.render_masquerade('wg0" accept')  # nothing from outside reaches nft text
    # no interface name can make another interface's packet-filter table
    assert forwarding.nat_table("a") != table_name("a_nat")


def test_forwarding_families_follow_the_routes():
    assert forwarding.families(["10.0.0.0/24"]) == {4}
    assert forwarding.families(["0.0.0.0/0", "::/0"]) == {4, 6}


@pytest.mark.parametrize("rc, out, ok", [
    (0, json.dumps([{"dst": "default", "gateway": "192.0.2.1", "dev": "eth0"},
                    {"dst": "10.2.0.0/24", "dev": "lan0", "prefsrc": "10.2.0.1"}]), True),
    (0, json.dumps([{"dst": "10.0.0.0/8", "gateway": "10.9.0.1", "dev": "eth1"}]), True),
    (0, json.dumps([{"dst": "default", "dev": "eth0"}]), False),  # would leave the site
    (0, json.dumps([{"dst": "10.2.0.0/24", "dev": "wg0"}]), False),  # back into the mesh
    (0, json.dumps([{"dst": "10.2.0.0/24", "dev": "lan0", "flags": ["linkdown"]}]), False),
    (0, json.dumps([{"dst": "10.2.0.0/24", "type": "unreachable"}]), False),
    (2, "", False), (0, "not json", False), (0, "[]", False)])
def test_a_subnet_is_reachable_only_by_a_working_route_of_its_own(rc, out, ok):
    assert forwarding.routed_elsewhere(rc, out, "wg0") is ok


def peer(i, *extra):
    return Peer(id=f"n{i}", name=f"host{i}", node_key=f"k{i}", addresses=(f"100.64.0.{i}/32",),
                allowed_ips=(f"100.64.0.{i}/32", *extra))


def test_exit_routes_go_to_the_chosen_exit_node_only():
    peers = [peer(1, "10.2.0.0/24"), peer(2, "0.0.0.0/0", "::/0"), peer(3, "0.0.0.0/0")]
    for wanted in ("n2", "host2", "100.64.0.2"):
        assert exit_node.find_exit_node(peers, wanted) is peers[1]
    assert exit_node.find_exit_node(peers, "host1") is None  # no exit routes: not an exit node
    assert exit_node.find_exit_node(peers, None) is None
    out = exit_node.wireguard_peers(peers, peers[1])
    assert [p.allowed_ips for p in out] == [
        ("100.64.0.1/32", "10.2.0.0/24"), ("100.64.0.2/32", "0.0.0.0/0", "::/0"),
        ("100.64.0.3/32",)]
    assert [p.allowed_ips for p in exit_node.wireguard_peers(peers, None)][1:] == [
        ("100.64.0.2/32",), ("100.64.0.3/32",)]


def test_policy_rules_keep_underlay_and_control_plane_outside_the_tunnel():
    rules = exit_node.rule_commands({4}, ["192.0.2.10", "2001:db8::1"], ["192.168.1.0/24"],
                                    allow_lan=False)
    text = [" ".join(r) for r in rules]
    assert text == [
        "ip -4 rule add fwmark 51820 table main priority 5200",
        "ip -4 rule add to 192.0.2.10 table main priority 5201",
        "ip -4 rule add to 192.168.1.0/24 table 51820 priority 5210",
        "ip -4 rule add table main suppress_prefixlength 0 priority 5220",
        "ip -4 rule add table 51820 priority 5230"]
    kept = exit_node.rule_commands({4, 6}, [], ["192.168.1.0/24"], allow_lan=True)
    assert not any("5210" in r for r in kept) and len(kept) == 6
    assert all(int(r[-1]) in exit_node.PRIORITIES for r in rules + kept)


def test_server_addresses_resolve_urls_and_host_ports():
    got = exit_node.server_addresses(["http://127.0.0.1:8080/x", "127.0.0.2:9", "[::1]:80",
                                      "http://", "no such host.invalid:1"])
    assert got == ["127.0.0.1", "127.0.0.2", "::1"]


def test_agent_flags_advertise_exit_routes_and_refuse_non_cidrs():
    from argparse import Namespace

    from raftmesh.agent.cli import advertised
    assert advertised(Namespace(advertise_route=["10.1.0.0/24"], advertise_exit_node=True)) == \
        ["10.1.0.0/24", "0.0.0.0/0", "::/0"]
    for bad in ("10.1.0.1/24", "bogus"):
        with pytest.raises(ValueError):
            advertised(Namespace(advertise_route=[bad], advertise_exit_node=False))
