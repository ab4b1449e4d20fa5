"""The agent's data plane: wireguard-go tunnels, reconcile and the nftables packet filter.

Pure tests (ruleset text, dump parsing, diffs) run anywhere. The rest build three network
namespaces A, B, C on a bridge (underlay 192.0.2.0/24) with a wireguard-go interface each
(overlay 100.64.0.0/10) and check real traffic. Every wait polls a condition with a deadline;
every process is ended by pid and every namespace deleted, on failure too.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace

import pytest
from netns import Lab, Namespace, cleanup_stale, list_netns, stop_proc, wait_for

from raftmesh.agent import firewall, wireguard
from raftmesh.agent.firewall import PacketFilter, render_delete, render_rule, render_ruleset
from raftmesh.agent.wireguard import (
    OVERLAY_ROUTES,
    DesiredPeer,
    PeerConfig,
    PeerOp,
    PeerStats,
    WireGuardError,
    WireGuardInterface,
    compute_peer_ops,
    compute_route_ops,
    desired_peers,
    desired_routes,
    generate_private_key,
    keepalive_once_handshaken,
    kernel_wireguard_available,
    parse_dump,
    public_key_of,
)
from raftmesh.proto.wire import FilterDest, FilterRule, Peer, PortRange

KEY_A = public_key_of(generate_private_key())
KEY_B = public_key_of(generate_private_key())
KEY_C = public_key_of(generate_private_key())


# == pure: nft ruleset generation ==============================================================

def test_ruleset_replaces_whole_table_in_one_script_and_denies_by_default():
    text = render_ruleset("wg0", [])
    lines = text.splitlines()
    # create-if-missing, delete, redefine: one `nft -f` transaction, never a window without it
    assert lines[:3] == ["table inet raftmesh_wg0", "delete table inet raftmesh_wg0",
                         "table inet raftmesh_wg0 {"]
    assert "ct state established,related accept" in text
    assert "counter drop" in text
    assert text.count('iifname "wg0" jump filter_in') == 2  # input and forward hooks
    assert "policy accept" in text  # other interfaces are not this table's business
    assert " accept\n" not in text.split("ct state invalid drop")[1].split("counter drop")[0]


def test_rule_tcp_port_and_icmp():
    rule = FilterRule(("100.64.0.1/32",), (FilterDest("100.64.0.2/32", PortRange(8080, 8080)),),
                      ("tcp", "icmp"))
    assert render_rule(rule) == [
        "ip saddr { 100.64.0.1/32 } ip daddr { 100.64.0.2/32 } meta l4proto tcp th dport 8080 accept",
        "ip saddr { 100.64.0.1/32 } ip daddr { 100.64.0.2/32 } icmp type echo-request accept",
    ]


def test_rule_default_protocols_port_ranges_and_families():
    rule = FilterRule(
        ("100.64.0.1/32", "fd7a:115c:a1e0::1/128", "100.64.0.9"),
        (FilterDest("100.64.0.2/32", PortRange(22, 22)), FilterDest("100.64.0.2/32"),
         FilterDest("10.1.0.0/16", PortRange(1000, 2000)),
         FilterDest("fd7a:115c:a1e0::2/128", PortRange(443, 443))),
    )
    lines = render_rule(rule)
    v4src = "ip saddr { 100.64.0.1/32, 100.64.0.9/32 }"
    assert f"{v4src} ip daddr {{ 100.64.0.2/32 }} meta l4proto {{ tcp, udp }} accept" in lines
    assert f"{v4src} ip daddr {{ 100.64.0.2/32 }} meta l4proto {{ tcp, udp }} th dport 22 accept" in lines
    assert (f"{v4src} ip daddr {{ 10.1.0.0/16 }} meta l4proto {{ tcp, udp }} th dport 1000-2000 "
            "accept") in lines
    assert f"{v4src} ip daddr {{ 10.1.0.0/16, 100.64.0.2/32 }} icmp type echo-request accept" in lines
    assert ("ip6 saddr { fd7a:115c:a1e0::1/128 } ip6 daddr { fd7a:115c:a1e0::2/128 } "
            "meta l4proto { tcp, udp } th dport 443 accept") in lines
    assert ("ip6 saddr { fd7a:115c:a1e0::1/128 } ip6 daddr { fd7a:115c:a1e0::2/128 } "
            "icmpv6 type echo-request accept") in lines
    assert len(lines) == 6


def test_rule_wildcards_pin_the_family_and_mismatched_families_yield_nothing():
    lines = render_rule(FilterRule(("*",), (FilterDest("*", PortRange(53, 53)),), ("udp",)))
    assert lines == ["meta nfproto ipv4 meta l4proto udp th dport 53 accept",
                     "meta nfproto ipv6 meta l4proto udp th dport 53 accept"]
    assert render_rule(FilterRule(("100.64.0.1/32",), (FilterDest("fd7a::1/128"),))) == []


@pytest.mark.parametrize("rule", [
    FilterRule(("100.64.0.1/32; flush ruleset",), (FilterDest("100.64.0.2/32"),)),
    FilterRule(("100.64.0.1/32",), (FilterDest("100.64.0.2/32 } accept",),)),
    FilterRule(("100.64.0.1/32",), (FilterDest("100.64.0.2/32", PortRange(10, 5)),)),
    FilterRule(("100.64.0.1/32",), (FilterDest("100.64.0.2/32", PortRange(1, 70000)),)),
    FilterRule(("100.64.0.1/32",), (FilterDest("100.64.0.2/32"),), ("sctp",)),
])
def test_ruleset_rejects_anything_that_is_not_a_clean_value(rule):
    with pytest.raises(ValueError):
        render_ruleset("wg0", [rule])


def test_table_names_are_valid_and_distinct_and_bad_ifnames_are_refused():
    assert firewall.table_name("rm-a") != firewall.table_name("rm_a")
    assert firewall.table_name("rm-a") == "raftmesh_rm_2da"
    for bad in ('wg0"', "a b", "", "x" * 16):
        with pytest.raises(ValueError):
            PacketFilter(bad)
    assert render_delete("wg0") == "table inet raftmesh_wg0\ndelete table inet raftmesh_wg0\n"


# == pure: dump parsing and reconcile diffs ===================================================

SECRET = "SECRETprivatekeySECRETprivatekeySECRETpriv="
PSK = "PRESHAREDkeyPRESHAREDkeyPRESHAREDkeyPRESHA="
DUMP = (f"{SECRET}\t{KEY_A}\t51820\toff\n"
        f"{KEY_B}\t{PSK}\t192.0.2.2:51820\t100.64.0.2/32,10.9.0.0/24\t1700000000\t1234\t5678\t25\n"
        f"{KEY_C}\t(none)\t(none)\t(none)\t0\t0\t0\toff\n")


def test_parse_dump_keeps_state_and_drops_secrets():
    d = parse_dump(DUMP)
    assert d.public_key == KEY_A and d.listen_port == 51820
    assert d.peers[KEY_B] == PeerConfig(KEY_B, "192.0.2.2:51820", ("10.9.0.0/24", "100.64.0.2/32"), 25)
    assert d.peers[KEY_C] == PeerConfig(KEY_C, None, (), 0)
    assert d.stats[KEY_B].latest_handshake == 1700000000.0
    assert (d.stats[KEY_B].rx_bytes, d.stats[KEY_B].tx_bytes) == (1234, 5678)
    assert d.stats[KEY_C].latest_handshake is None
    assert SECRET not in repr(d) and PSK not in repr(d)


def test_parse_errors_never_echo_the_dump():
    with pytest.raises(ValueError) as e:
        parse_dump(f"{SECRET}\t{KEY_A}\n")
    assert SECRET not in str(e.value)
    with pytest.raises(ValueError) as e:
        wireguard.check_key(SECRET[:-4], "private key")
    assert SECRET[:-4] not in str(e.value)


def _peer(key, n, endpoints=("192.0.2.9:51820",), extra=()):
    addr = f"100.64.0.{n}/32"
    return Peer(id=str(n), name=f"n{n}", node_key=key, addresses=(addr,),
                allowed_ips=(addr, *extra), endpoints=endpoints)


def test_peer_diff_add_remove_change_and_noop():
    current = parse_dump(DUMP).peers
    want = desired_peers([_peer(KEY_B, 2, ("192.0.2.2:51820",), ("10.9.0.0/24",))], keepalive=25,
                         self_key=KEY_A)
    assert compute_peer_ops(current, want) == [PeerOp(KEY_C, remove=True)]  # B unchanged
    want = desired_peers([_peer(KEY_B, 2, ("192.0.2.7:51820",), ("10.9.0.0/24",)),
                          _peer(KEY_C, 3, ())], keepalive=25)
    assert compute_peer_ops(current, want) == sorted([
        PeerOp(KEY_B, endpoint="192.0.2.7:51820"),
        PeerOp(KEY_C, allowed_ips=("100.64.0.3/32",), keepalive=25),
    ], key=lambda op: op.public_key)
    want = desired_peers([_peer(KEY_B, 2, ("192.0.2.2:51820",))], keepalive=0)
    assert compute_peer_ops({KEY_B: current[KEY_B]}, want) == [
        PeerOp(KEY_B, allowed_ips=("100.64.0.2/32",), keepalive=0)]


def test_peer_diff_keeps_an_acceptable_roamed_endpoint_and_new_peers():
    current = {KEY_B: PeerConfig(KEY_B, "198.51.100.7:4000", ("100.64.0.2/32",), 0)}
    want = desired_peers([_peer(KEY_B, 2, ("192.0.2.2:51820", "198.51.100.7:4000"))])
    assert compute_peer_ops(current, want) == []
    want = desired_peers([_peer(KEY_B, 2, ())])  # no endpoint known: leave the learned one
    assert compute_peer_ops(current, want) == []
    new = desired_peers([_peer(KEY_C, 3, ("[fd00:0::1]:51820",))])
    op = compute_peer_ops({}, new)[0]
    assert op == PeerOp(KEY_C, endpoint="[fd00::1]:51820", allowed_ips=("100.64.0.3/32",))
    assert op.wg_args() == ["peer", KEY_C, "endpoint", "[fd00::1]:51820",
                            "allowed-ips", "100.64.0.3/32"]
    assert PeerOp(KEY_C, keepalive=0).wg_args() == ["peer", KEY_C, "persistent-keepalive", "off"]
    assert PeerOp(KEY_C, remove=True).wg_args() == ["peer", KEY_C, "remove"]


def test_a_peer_taking_routes_over_gets_a_fresh_session():
    """Removed and re-added in the same `wg set`: the session it held may belong to a
    router's earlier run, and the first packet for the routes must start a new handshake."""
    current = {KEY_B: PeerConfig(KEY_B, "192.0.2.2:51820", ("100.64.0.2/32",), 25)}
    want = desired_peers([_peer(KEY_B, 2, ("192.0.2.2:51820",), ("10.9.0.0/24",))], keepalive=25)
    op = compute_peer_ops(current, want)[0]
    routes = ("10.9.0.0/24", "100.64.0.2/32")
    assert op == PeerOp(KEY_B, endpoint="192.0.2.2:51820", allowed_ips=routes, keepalive=25,
                        fresh=True)
    assert op.wg_args() == ["peer", KEY_B, "remove", "peer", KEY_B, "endpoint", "192.0.2.2:51820",
                            "allowed-ips", ",".join(routes), "persistent-keepalive", "25"]
    # giving routes up, or a changed address, keeps the session
    current = {KEY_B: PeerConfig(KEY_B, "192.0.2.2:51820", ("10.9.0.0/24", "100.64.0.2/32"), 25)}
    want = desired_peers([_peer(KEY_B, 2, ("192.0.2.2:51820",))], keepalive=25)
    assert compute_peer_ops(current, want) == [PeerOp(KEY_B, allowed_ips=("100.64.0.2/32",))]
    want = desired_peers([_peer(KEY_B, 7, ("192.0.2.2:51820",), ("10.9.0.0/24",))], keepalive=25)
    assert not compute_peer_ops(current, want)[0].fresh


def test_keepalive_waits_for_the_first_handshake():
    """For a peer that joins after us: a keepalive makes wireguard-go initiate at once, and
    it and we add each other at once, so our initiations would cross and both wait the 5 s
    retry. Armed after a handshake, and never taken from a peer that has it."""
    want = desired_peers([_peer(KEY_B, 2, ("192.0.2.2:51820",)), _peer(KEY_C, 3, ())], keepalive=25)
    fresh = PeerStats(KEY_B, None, None, 0, 0)
    done = replace(fresh, latest_handshake=1.7e9, rx_bytes=92, tx_bytes=148)
    new = keepalive_once_handshaken(want, {}, {})
    assert {k: d.keepalive for k, d in new.items()} == {KEY_B: 0, KEY_C: 0}
    assert PeerOp(KEY_B, endpoint="192.0.2.2:51820", allowed_ips=("100.64.0.2/32",)) \
        in compute_peer_ops({}, new)
    current = {KEY_B: PeerConfig(KEY_B, "192.0.2.2:51820", ("100.64.0.2/32",), 0),
               KEY_C: PeerConfig(KEY_C, None, ("100.64.0.3/32",), 25)}
    held = keepalive_once_handshaken(want, current, {KEY_B: fresh, KEY_C: replace(fresh, public_key=KEY_C)})
    assert {k: d.keepalive for k, d in held.items()} == {KEY_B: 0, KEY_C: 25}
    assert compute_peer_ops(current, held) == []
    armed = keepalive_once_handshaken(want, current, {KEY_B: done})
    assert compute_peer_ops(current, armed) == [PeerOp(KEY_B, keepalive=25)]
    off = desired_peers([_peer(KEY_C, 3, ())], keepalive=0)  # configured off: taken away
    taken = compute_peer_ops(current, keepalive_once_handshaken(off, current, {}))
    assert PeerOp(KEY_C, keepalive=0) in taken


def test_desired_peers_skips_self_and_rejects_bad_keys():
    assert list(desired_peers([_peer(KEY_A, 1), _peer(KEY_B, 2)], self_key=KEY_A)) == [KEY_B]
    with pytest.raises(ValueError):
        desired_peers([_peer("not-a-key", 2)])


def test_route_diff_touches_only_changes_and_never_installs_default_routes():
    want = {KEY_B: DesiredPeer(KEY_B, (), ("0.0.0.0/0", "100.64.0.2/32", "::/0",
                                           "fd7a:115c:a1e0::2/128")),
            KEY_C: DesiredPeer(KEY_C, (), ("100.64.0.3/32", "10.9.0.0/24", "100.64.9.0/24"))}
    routes = desired_routes(want)
    # the pools cover the peers' own addresses (and a subnet inside them): one route each
    assert routes == {*OVERLAY_ROUTES, "10.9.0.0/24"}
    assert desired_routes({}) == set(OVERLAY_ROUTES)
    assert compute_route_ops({*OVERLAY_ROUTES, "100.64.0.4/32"}, routes) == (
        ["10.9.0.0/24"], ["100.64.0.4/32"])
    assert compute_route_ops(routes, routes) == ([], [])


def test_private_key_goes_through_stdin_never_argv(monkeypatch):
    calls = []

    def fake_run(argv, input=None, **kw):
        calls.append((argv, input))
        out = "[]" if "-j" in argv else ""
        return subprocess.CompletedProcess(argv, 0, out, "")

    monkeypatch.setattr(wireguard.subprocess, "run", fake_run)
    key = generate_private_key()
    WireGuardInterface("rmfake0", "nsx", kernel=True).configure(key, 51820, ["100.64.0.1/32"])
    assert all(key not in " ".join(argv) for argv, _ in calls)
    assert [inp for _, inp in calls if inp and key in inp] == [key + "\n"]

    def failing_run(argv, input=None, **kw):
        return subprocess.CompletedProcess(argv, 1, "", f"Key is not valid: `{input}'")

    monkeypatch.setattr(wireguard.subprocess, "run", failing_run)
    with pytest.raises(WireGuardError) as e:
        WireGuardInterface("rmfake0", kernel=True).configure(key, 51820, [])
    assert key not in str(e.value)


def test_kernel_module_feature_check():
    # Not available on this machine's kind; the class picks userspace then.
    assert isinstance(kernel_wireguard_available(), bool)
    assert WireGuardInterface("rmprobe0").kernel == kernel_wireguard_available()


# == real namespaces, wireguard-go and nftables ================================================

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("wireguard-go", "wg", "ip", "nft")),
    reason="needs root, wireguard-go, wg, iproute2 and nft")

PORT_OK, PORT_DENIED = 8080, 8081


@dataclass
class Node:
    ns: Namespace
    wg: WireGuardInterface
    peer: Peer  # how the others see this node
    overlay: str
    private_key: str
    fw: PacketFilter | None = None


@dataclass
class Mesh:
    lab: Lab
    nodes: dict[str, Node]

    def __getitem__(self, label: str) -> Node:
        return self.nodes[label]

    def peers_of(self, label: str) -> list[Peer]:
        return [n.peer for lbl, n in sorted(self.nodes.items()) if lbl != label]


@pytest.fixture(scope="module", autouse=True)
def _no_stale_labs():
    if os.geteuid() == 0:
        cleanup_stale()
    yield


def _make_node(lab: Lab, label: str, n: int) -> Node:
    ns = lab.add(label, f"192.0.2.{n}/24")
    wg = WireGuardInterface(lab.ifname(label), ns.name)
    lab.on_close(wg.close)
    wg.create()
    lab.track_pid(wg.pid)  # belt and braces: ended by pid even if close() failed
    key = generate_private_key()
    overlay = f"100.64.0.{n}"
    wg.configure(key, 51820, [f"{overlay}/32"])
    peer = Peer(id=label, name=label.lower(), node_key=public_key_of(key),
                addresses=(f"{overlay}/32",), allowed_ips=(f"{overlay}/32",),
                endpoints=(f"192.0.2.{n}:51820",))
    return Node(ns, wg, peer, overlay, key)


def _add_filter(node: Node, lab: Lab, rules: list[FilterRule]) -> None:
    node.fw = PacketFilter(node.wg.name, node.ns.name)
    lab.on_close(node.fw.close)
    node.fw.apply(rules)


@pytest.fixture
def mesh():
    """A, B, C fully meshed. B accepts only A (tcp 8080 and ping); A accepts B and C;
    C has no filter at all (a peer that ignores policy)."""
    lab = Lab()
    try:
        nodes = {lbl: _make_node(lab, lbl, i) for i, lbl in enumerate("ABC", 1)}
        m = Mesh(lab, nodes)
        for lbl, node in nodes.items():
            node.wg.reconcile(m.peers_of(lbl), keepalive=0)
        a, b, c = nodes["A"].overlay, nodes["B"].overlay, nodes["C"].overlay
        _add_filter(nodes["B"], lab, [
            FilterRule((f"{a}/32",), (FilterDest(f"{b}/32", PortRange(PORT_OK, PORT_OK)),), ("tcp",)),
            FilterRule((f"{a}/32",), (FilterDest(f"{b}/32"),), ("icmp",)),
        ])
        _add_filter(nodes["A"], lab, [FilterRule((f"{b}/32", f"{c}/32"), (FilterDest(f"{a}/32"),))])
        yield m
    finally:
        lab.close()


def _wait_ping(src: Node, dst: Node, timeout: float = 10.0) -> None:
    wait_for(lambda: src.ns.ping(dst.overlay), timeout, what=f"ping {src.ns.label}->{dst.ns.label}")


def _ifindex(node: Node) -> tuple[int, list[str]]:
    link = json.loads(node.ns.run("ip", "-j", "link", "show", "dev", node.wg.name).stdout)[0]
    return link["ifindex"], link["flags"]


@needs_root
def test_tunnel_passes_ping_and_allowed_tcp_and_drops_denied_port(mesh):
    A, B = mesh["A"], mesh["B"]
    B.ns.tcp_server(PORT_OK)
    B.ns.tcp_server(PORT_DENIED)
    _wait_ping(A, B)
    assert A.ns.tcp_connect(B.overlay, PORT_OK) == "ok"
    drops = B.fw.dropped_packets()
    assert A.ns.tcp_connect(B.overlay, PORT_DENIED, timeout=1.0) == "timeout"  # dropped, no RST
    assert B.fw.dropped_packets() > drops
    # Only the WireGuard interface is filtered: the same port over loopback and underlay works.
    assert B.ns.tcp_connect(B.overlay, PORT_DENIED) == "ok"
    assert A.ns.tcp_connect(B.ns.ip, PORT_DENIED) == "ok"


@needs_root
def test_moving_a_responder_keeps_the_session_it_answered(mesh):
    """B answered A's initiation and A's first data has not reached B: WireGuard shows B no
    handshake until it does, yet B's session is live. Moving B's endpoint for A (a path proved
    meanwhile) keeps it; re-adding A, as for a peer never heard from, would drop it, and A,
    whose handshake completed, would send into it for 15 s before starting another."""
    A, B = mesh["A"], mesh["B"]
    a_key = A.peer.node_key
    # WireGuard data (message type 4, the first byte of the payload) to B is dropped
    B.ns.run("nft", "add table inet rm_hold; add chain inet rm_hold in { type filter hook input "
             "priority -10; }; add rule inet rm_hold in udp dport 51820 @th,64,8 4 drop")
    A.ns.ping(B.overlay, timeout=0.5)  # A initiates, B answers, A's echo request is dropped

    def answered_unconfirmed() -> bool:
        st = B.wg.peer_stats()[a_key]
        return st.rx_bytes > 0 and st.latest_handshake is None \
            and A.wg.peer_stats()[B.peer.node_key].latest_handshake is not None
    wait_for(answered_unconfirmed, 5, what="B answered A's initiation, no data yet")
    assert B.wg.set_endpoint(a_key, "192.0.2.1:51821")  # moved, not re-added
    assert B.wg.dump().peers[a_key].endpoint == "192.0.2.1:51821"
    B.ns.run("nft", "delete table inet rm_hold")
    # the session held: A's next data confirms it (and takes B's endpoint back to A's port)
    wait_for(lambda: A.ns.ping(B.overlay, timeout=0.5), 3, what="ping A->B on the held session")
    assert B.wg.peer_stats()[a_key].latest_handshake is not None


@needs_root
def test_a_proven_path_gets_a_new_initiation_at_once_only_from_the_side_that_sent_one(mesh):
    """A sent its first initiation on a path that does not answer; when a probe proves
    another, A's peer is re-added with keepalive, so a new initiation leaves at once (not
    with A's next packet). B, which never sent A anything, re-adds A without: B initiating
    too could cross A's initiation, and two crossed initiations both wait 5 s."""
    A, B = mesh["A"], mesh["B"]
    b_key, a_key = B.peer.node_key, A.peer.node_key
    assert A.wg.set_endpoint(b_key, "192.0.2.2:51821")  # nobody listens there
    assert not A.ns.ping(B.overlay, timeout=0.3)
    assert A.wg.peer_stats()[b_key].tx_bytes
    assert B.wg.set_endpoint(a_key, "192.0.2.1:51822", 25)  # roams back on A's initiation
    assert B.wg.dump().peers[a_key].keepalive == 0
    assert A.wg.set_endpoint(b_key, "192.0.2.2:51820", 25)
    assert A.wg.dump().peers[b_key].keepalive == 25
    wait_for(lambda: A.wg.peer_stats()[b_key].latest_handshake is not None, 2,
             what="A's handshake without another packet")


@needs_root
def test_an_initiation_sent_before_the_peer_knew_us_is_sent_again_at_once(mesh):
    """A's first initiation reached B before B had A (its netmap came later) and was
    dropped; WireGuard would send the next one after 5 s. When B says that it knows A now
    (its candidates over the relay), `retry_unanswered` sends one at once, and only then."""
    A, B = mesh["A"], mesh["B"]
    b_key = B.peer.node_key
    B.wg.reconcile([n.peer for lbl, n in sorted(mesh.nodes.items()) if lbl == "C"])  # B lacks A
    assert not A.ns.ping(B.overlay, timeout=0.3)
    st = A.wg.peer_stats()[b_key]
    assert st.tx_bytes and not st.rx_bytes and st.latest_handshake is None
    B.wg.reconcile(mesh.peers_of("B"))
    assert not A.ns.ping(B.overlay, timeout=0.3)  # still within WireGuard's 5 s retry
    assert A.wg.retry_unanswered(b_key, 25)
    wait_for(lambda: A.ns.ping(B.overlay, timeout=0.3), 2, what="ping A->B after the retry")
    assert not A.wg.retry_unanswered(b_key, 25)  # answered: nothing to redo
    assert A.wg.dump().peers[b_key].keepalive == 25
    assert not A.wg.retry_unanswered(mesh["C"].peer.node_key, 25)  # never sent to C


@needs_root
def test_filter_holds_against_a_peer_outside_it(mesh):
    A, B, C = mesh["A"], mesh["B"], mesh["C"]
    B.ns.tcp_server(PORT_OK)
    _wait_ping(C, A)  # C's tunnels work (A accepts C)
    _wait_ping(B, C)  # B may reach C; C's replies come back as established traffic
    drops = B.fw.dropped_packets()
    rx_before = B.wg.peer_stats()[C.peer.node_key].rx_bytes
    assert not C.ns.ping(B.overlay, timeout=1.0)
    assert C.ns.tcp_connect(B.overlay, PORT_OK, timeout=1.0) == "timeout"
    # The packets did arrive through the tunnel and were dropped by B's own nftables filter.
    assert B.wg.peer_stats()[C.peer.node_key].rx_bytes > rx_before
    assert B.fw.dropped_packets() >= drops + 2


@needs_root
def test_reconcile_of_one_peer_does_not_disturb_another(mesh, tmp_path):
    A, B, C = mesh["A"], mesh["B"], mesh["C"]
    _wait_ping(A, B)
    _wait_ping(A, C)
    handshake = A.wg.peer_stats()[B.peer.node_key].latest_handshake
    link_before = _ifindex(A)
    assert A.wg.reconcile(mesh.peers_of("A")).changed is False  # idempotent

    log = tmp_path / "ping.log"
    with open(log, "w") as out:
        pinger = A.ns.pinger(B.overlay, interval=0.02, out=out)
    wait_for(lambda: log.read_text().count(".") >= 10, 10, what="pings before the change")

    # C moves to another port and gains a subnet route; A and B follow with reconcile.
    C.wg.configure(C.private_key, 51821, [f"{C.overlay}/32"])
    c_new = replace(C.peer, endpoints=("192.0.2.3:51821",),
                    allowed_ips=(*C.peer.allowed_ips, "10.99.0.0/24"))
    C.peer = c_new
    res = A.wg.reconcile(mesh.peers_of("A"))
    assert [op.public_key for op in res.peer_ops] == [c_new.node_key]
    assert res.peer_ops[0].endpoint == "192.0.2.3:51821"
    assert (res.routes_added, res.routes_removed) == (("10.99.0.0/24",), ())
    B.wg.reconcile(mesh.peers_of("B"))
    _wait_ping(A, C)  # the changed peer works through its new endpoint

    seen = log.read_text().count(".")
    wait_for(lambda: log.read_text().count(".") >= seen + 10, 10, what="pings after the change")
    stop_proc(pinger)
    pings = log.read_text()
    assert "x" not in pings, f"A->B lost probes during C's change: {pings}"
    assert A.wg.peer_stats()[B.peer.node_key].latest_handshake == handshake  # no new session
    assert _ifindex(A) == link_before  # the interface never flapped
    assert "10.99.0.0/24" in A.wg.routes()


@needs_root
def test_removing_a_peer_stops_its_traffic_only(mesh):
    A, B, C = mesh["A"], mesh["B"], mesh["C"]
    _wait_ping(A, B)
    _wait_ping(A, C)
    res = A.wg.reconcile([C.peer])
    assert res.peer_ops == (PeerOp(B.peer.node_key, remove=True),)
    assert res.routes_removed == ()  # the pool's route still covers B's address
    assert B.peer.node_key not in A.wg.peer_stats()
    assert not A.ns.ping(B.overlay, timeout=0.5)
    assert not B.ns.ping(A.overlay, timeout=0.5)  # A no longer accepts B's key
    assert A.ns.ping(C.overlay)
    A.wg.reconcile(mesh.peers_of("A"))  # and it comes back
    _wait_ping(A, B)


@needs_root
def test_every_rule_shape_loads_in_nft_and_reapplies_atomically():
    rules = [
        FilterRule(("100.64.0.1/32", "fd7a:115c:a1e0::1/128"),
                   (FilterDest("100.64.0.2/32", PortRange(22, 22)), FilterDest("10.1.0.0/16"),
                    FilterDest("fd7a:115c:a1e0::2/128", PortRange(1000, 2000)))),
        FilterRule(("*",), (FilterDest("*", PortRange(53, 53)),), ("udp",)),
        FilterRule(("100.64.0.0/10",), (FilterDest("100.64.0.2/32"),), ("icmp",)),
    ]
    with Lab() as lab:
        ns = lab.add("N", "192.0.2.20/24")
        fw = PacketFilter("rm-n0", ns.name)
        fw.apply(rules)
        fw.apply(rules[:1])  # replacing an existing table in one transaction
        listed = ns.run("nft", "list", "table", "inet", fw.table).stdout
        assert "th dport 1000-2000" in listed and "udp dport 53" not in listed
        fw.close()
        fw.close()  # idempotent
        assert not fw.exists()


@needs_root
@pytest.mark.skipif(firewall._libnftables() is None, reason="needs nftables' Python binding (python3-nftables)")
def test_an_agent_in_its_namespace_loads_the_filter_in_process_with_the_same_result():
    """The agent runs inside its namespace, so PacketFilter there has no netns and loads its
    ruleset through libnftables; the table must be what `nft -f` makes, and nft's own error
    must come back for a ruleset the kernel refuses."""
    code = ("import json, sys\n"
            "from raftmesh.agent import firewall\n"
            "from raftmesh.proto.wire import FilterDest, FilterRule, PortRange\n"
            "fw = firewall.PacketFilter('rm-lib0')\n"
            "assert firewall._libnftables() is not None\n"
            "fw.apply([FilterRule(('100.64.0.1/32',), (FilterDest('100.64.0.2/32', PortRange(22, 22)),))])\n"
            "fw.apply([FilterRule(('100.64.0.1/32',), (FilterDest('100.64.0.2/32', PortRange(80, 80)),))])\n"
            "try:\n"
            "    fw._load('table inet raftmesh_x { chain c { type filter hook nowhere priority 0; } }')\n"
            "    print('refused: no')\n"
            "except firewall.FirewallError as e:\n"
            "    print('refused:', 'nowhere' in str(e))\n")
    with Lab() as lab:
        ns = lab.add("L", "192.0.2.21/24")
        out = ns.run(sys.executable, "-c", code).stdout
        assert "refused: True" in out, out
        listed = ns.run("nft", "list", "table", "inet", firewall.table_name("rm-lib0")).stdout
        assert "dport 80" in listed and "dport 22" not in listed, listed


@needs_root
def test_close_ends_wireguard_go_and_removes_interface_and_table():
    with Lab() as lab:
        ns = lab.add("X", "192.0.2.10/24")
        wg = WireGuardInterface(lab.ifname("X"), ns.name)
        lab.on_close(wg.close)
        wg.create()
        pid = wg.pid
        lab.track_pid(pid)
        assert pid and wg.kernel is False
        wg.configure(generate_private_key(), 51820, ["100.64.0.10/32"])
        fw = PacketFilter(wg.name, ns.name)
        fw.apply([])
        assert fw.exists()
        with pytest.raises(WireGuardError):  # names are host-wide with wireguard-go
            WireGuardInterface(wg.name, ns.name).create()
        fw.close()
        wg.close()
        assert not fw.exists()
        assert not os.path.exists(f"/proc/{pid}")
        assert not os.path.exists(wg.socket_path)
        assert not wg.link_exists()
        wg.close()  # idempotent
        fw.close()
    assert not any(n.startswith(lab.tag) for n in list_netns())


@needs_root
def test_lab_bridge_keeps_its_address_as_namespaces_come_and_go():
    """A bridge takes the lowest MAC of its ports unless set: the gateway's MAC changed under
    the other namespaces' ARP caches when one joined or left, and their new connections were
    lost for seconds (seen as agents' acks timing out in the revoke benchmark)."""
    from raftmesh.lab.namespaces import BRIDGE_MAC

    def bridge_mac(lab: Lab) -> str:
        out = subprocess.run(["ip", "-j", "-n", lab.hub, "link", "show", "br0"],
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out)[0]["address"]
    with Lab() as lab:
        seen = set()
        for i in range(4):
            lab.add(f"M{i}", f"192.0.2.{30 + i}/24")
            seen.add(bridge_mac(lab))
        lab.remove("M0")
        seen.add(bridge_mac(lab))
        assert seen == {BRIDGE_MAC}
