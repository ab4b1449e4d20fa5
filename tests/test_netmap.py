"""Netmaps: who sees whom, packet filters, visibility, and the incremental index's locality."""
from __future__ import annotations

import ipaddress
import json
import random

import pytest

import dataclasses
import pickle

from raftmesh.proto.wire import FilterDest, FilterRule, Netmap, NetmapDelta, PortRange, apply_delta
from raftmesh.cluster.netmap import NetmapIndex, _rule, compute_netmaps
from raftmesh.cluster.policy import Identity, Policy, parse_policy

NOW = 1_000_000.0
ANY = PortRange()


def node(i: int, user: str | None = None, tags=(), **kw) -> dict:
    """A node record as the replicated state holds it; addresses derive from `i`."""
    return {"id": f"n{i}", "name": f"host{i}", "user": None if tags else user, "tags": list(tags),
            "node_key": f"key{i}", "ipv4": f"100.64.{i // 250}.{i % 250 + 1}",
            "ipv6": f"fd7a:115c:a1e0::{i + 1:x}", "endpoints": [f"192.0.2.{i % 250 + 1}:41641"],
            "key_expiry": None, "expired": False, "approved": True, "approved_routes": [],
            "last_seen": None, "online": False, **kw}


def addrs(n: dict) -> tuple[str, str]:
    return (f"{n['ipv4']}/32", f"{n['ipv6']}/128")


def policy(acls, **extra) -> Policy:
    base = {"groups": {"group:eng": ["alice", "bob"]},
            "tagOwners": {"tag:web": [], "tag:db": [], "tag:router": []},
            "hosts": {"corp": "10.1.0.0/16", "printer": "10.1.0.9"}}
    return parse_policy(json.dumps({**base, **extra, "acls": acls}))


def acl(src, dst, **kw):
    return {"action": "accept", "src": src, "dst": dst, **kw}


def maps(pol, nodes, now=NOW, version=1) -> dict[str, Netmap]:
    """Both ways of computing, which must agree; returns the index's netmaps."""
    ref = compute_netmaps(pol, nodes, now, version)
    idx = NetmapIndex(pol, nodes, now)
    assert idx.visible_ids() == sorted(ref)
    got = {k: idx.netmap(k, version) for k in ref}
    assert got == ref
    return got


def peers(nm: Netmap) -> set[str]:
    return set(nm.peers)


# -- who sees whom ---------------------------------------------------------------------------
def test_deny_by_default():
    nodes = [node(1, "alice"), node(2, "bob"), node(3, tags=["tag:web"])]
    for pol in (None, Policy(), parse_policy("{}"), policy([acl(["carol"], ["tag:db:*"])])):
        for nm in maps(pol, nodes).values():
            assert nm.peers == {} and nm.packet_filter == ()


def test_group_to_tag_is_visible_both_ways_but_filtered_inbound_only():
    a, b, c, db = node(1, "alice"), node(2, "bob"), node(3, "carol"), node(4, tags=["tag:db"])
    m = maps(policy([acl(["group:eng"], ["tag:db:5432"])]), [a, b, c, db])
    assert peers(m["n1"]) == peers(m["n2"]) == {"n4"} and peers(m["n4"]) == {"n1", "n2"}
    assert m["n3"].peers == {} and m["n1"].packet_filter == ()
    assert m["n4"].packet_filter == (FilterRule(
        src=tuple(sorted(addrs(a) + addrs(b))),
        dst=tuple(FilterDest(x, PortRange(5432, 5432)) for x in sorted(addrs(db)))),)


def test_peer_record_and_self_node():
    a = node(1, "alice", endpoints=["198.51.100.1:1", "192.0.2.1:2"], online=True, last_seen=5.0,
             key_expiry=NOW + 10, approved_routes=["10.1.0.0/24", "fd00::/64", "bogus"])
    m = maps(policy([acl(["*"], ["*:*"])]), [a, node(2, "bob")])
    p = m["n2"].peers["n1"]
    assert p == m["n1"].self_node
    assert (p.id, p.name, p.node_key, p.user, p.tags) == ("n1", "host1", "key1", "alice", ())
    assert p.addresses == addrs(a)
    assert p.allowed_ips == addrs(a) + ("10.1.0.0/24", "fd00::/64")  # unparseable route ignored
    assert p.endpoints == ("192.0.2.1:2", "198.51.100.1:1")
    assert (p.online, p.last_seen, p.key_expiry) == (True, 5.0, NOW + 10)


def test_autogroup_self_member_and_tagged():
    a1, a2, b1 = node(1, "alice"), node(2, "alice"), node(3, "bob")
    w, d = node(4, tags=["tag:web"]), node(5, tags=["tag:db"])
    nodes = [a1, a2, b1, w, d]
    m = maps(policy([acl(["autogroup:member"], ["autogroup:self:22"])]), nodes)
    assert peers(m["n1"]) == {"n2"} and m["n3"].peers == {} and m["n4"].peers == {}
    assert m["n1"].packet_filter == (FilterRule(
        tuple(sorted(addrs(a1) + addrs(a2))),
        tuple(FilterDest(x, PortRange(22, 22)) for x in sorted(addrs(a1)))),)
    m = maps(policy([acl(["autogroup:member"], ["autogroup:tagged:80"])]), nodes)
    assert peers(m["n4"]) == peers(m["n5"]) == {"n1", "n2", "n3"} and peers(m["n1"]) == {"n4", "n5"}
    m = maps(policy([acl(["autogroup:tagged"], ["autogroup:tagged:*"])]), nodes)
    assert peers(m["n4"]) == {"n5"} and m["n1"].peers == {}


def test_tagged_node_is_not_its_registrants():
    t = dict(node(2, tags=["tag:web"]), user="alice")  # a record that kept its user
    m = maps(policy([acl(["alice"], ["alice:*"])]), [node(1, "alice"), t, node(3, "alice")])
    assert peers(m["n1"]) == {"n3"} and m["n2"].peers == {}


def test_star_source_and_protocols():
    nodes = [node(1, "alice"), node(2, tags=["tag:web"])]
    m = maps(policy([acl(["*"], ["tag:web:80,443"], proto="tcp"),
                     acl(["alice"], ["tag:web:*"], proto="icmp")]), nodes)
    w = nodes[1]
    assert m["n2"].packet_filter == (
        FilterRule(("*",), tuple(FilterDest(x, PortRange(p, p)) for x in sorted(addrs(w))
                                 for p in (80, 443)), ("tcp",)),
        FilterRule(addrs(nodes[0]), tuple(FilterDest(x, ANY) for x in sorted(addrs(w))), ("icmp",)))


def test_subnet_routes():
    r = node(1, tags=["tag:router"], approved_routes=["10.1.0.0/24", "10.9.0.0/16"])
    a, b = node(2, "alice"), node(3, "bob")
    nodes = [r, a, b]
    # a tag reaches the router itself, not its subnets
    m = maps(policy([acl(["alice"], ["tag:router:*"])]), nodes)
    assert {d.prefix for d in m["n1"].packet_filter[0].dst} == set(addrs(r))
    # a CIDR (or host alias) reaches the routes it overlaps, clipped to the overlap
    m = maps(policy([acl(["alice"], ["corp:22", "10.9.1.5:80"])]), nodes)
    assert peers(m["n1"]) == {"n2"} and peers(m["n2"]) == {"n1"} and m["n3"].peers == {}
    assert m["n1"].packet_filter[0].dst == (FilterDest("10.1.0.0/24", PortRange(22, 22)),
                                            FilterDest("10.9.1.5/32", PortRange(80, 80)))
    assert m["n2"].peers["n1"].allowed_ips == addrs(r) + ("10.1.0.0/24", "10.9.0.0/16")
    # * reaches addresses and routes
    m = maps(policy([acl(["bob"], ["*:*"])]), nodes)
    assert {d.prefix for d in m["n1"].packet_filter[0].dst} == {*addrs(r), "10.1.0.0/24", "10.9.0.0/16"}
    # a source CIDR behind a router makes the router a peer of the destination
    m = maps(policy([acl(["10.9.0.0/24"], ["alice:22"])]), nodes)
    assert peers(m["n2"]) == {"n1"}
    assert m["n2"].packet_filter[0].src == ("10.9.0.0/24",)


def test_a_router_peer_sees_only_the_routes_the_policy_lets_it_use():
    """Routes are shown per viewer: to who may reach them or be reached from them, not to
    every peer of the router (alice may only SSH to the router itself)."""
    r = node(1, tags=["tag:router"], approved_routes=["10.1.0.0/24", "10.9.0.0/16"])
    a, b, c, d = node(2, "alice"), node(3, "bob"), node(4, "carol"), node(5, "dave")
    routes = ("10.1.0.0/24", "10.9.0.0/16")
    m = maps(policy([acl(["alice"], ["tag:router:22"]),  # the router itself
                     acl(["bob"], ["10.1.0.5:443"]),  # one host behind one of its subnets
                     acl(["10.9.0.0/16"], ["carol:22"]),  # a subnet reaching carol
                     acl(["dave"], ["*:*"])]), [r, a, b, c, d])
    assert peers(m["n1"]) == {"n2", "n3", "n4", "n5"}
    assert m["n2"].peers["n1"].allowed_ips == addrs(r)
    assert m["n3"].peers["n1"].allowed_ips == addrs(r) + ("10.1.0.0/24",)
    assert m["n4"].peers["n1"].allowed_ips == addrs(r) + ("10.9.0.0/16",)
    assert m["n5"].peers["n1"].allowed_ips == addrs(r) + routes
    assert m["n1"].self_node.allowed_ips == addrs(r) + routes  # the router knows them all
    # only the viewers whose share changes hear of a policy change or a primary moving
    idx = NetmapIndex(policy([acl(["alice"], ["tag:router:22"])]), [r, a, b], NOW)
    assert idx.netmap("n2", 1).peers["n1"].allowed_ips == addrs(r)
    deltas, _ = idx.replace_policy(policy([acl(["alice"], ["tag:router:22"]),
                                           acl(["alice"], ["10.9.0.0/16:*"])]), 2)
    assert set(deltas) == {"n1", "n2"}  # the router's filter; alice's view of it
    assert deltas["n2"].peers_changed[0].allowed_ips == addrs(r) + ("10.9.0.0/16",)
    deltas, _ = idx.upsert_node(dict(r, standby_routes=["10.1.0.0/24"]), 3)
    assert set(deltas) == {"n1"}  # alice never saw 10.1.0.0/24
    deltas, _ = idx.upsert_node(dict(r, standby_routes=["10.9.0.0/16"]), 4)
    assert set(deltas) == {"n1", "n2"}
    assert deltas["n2"].peers_changed[0].allowed_ips == addrs(r)


def test_exit_routes_are_shown_to_who_may_use_the_internet_only():
    routes = ["0.0.0.0/0", "::/0", "10.1.0.0/24"]
    e = node(1, tags=["tag:router"], approved_routes=routes, advertised_routes=routes)
    a, b = node(2, "alice"), node(3, "bob")
    m = maps(policy([acl(["alice"], ["autogroup:internet:*"]), acl(["bob"], ["*:*"])]), [e, a, b])
    assert m["n2"].peers["n1"].allowed_ips == addrs(e) + ("0.0.0.0/0", "::/0")
    assert m["n3"].peers["n1"].allowed_ips == addrs(e) + ("10.1.0.0/24",)  # * is no internet


def test_cidr_source_and_destination_of_node_addresses():
    a, b = node(1, "alice"), node(2, "bob")
    m = maps(policy([acl(["100.64.0.2"], ["100.64.0.0/24:22"])]), [a, b])  # a's address
    assert peers(m["n2"]) == {"n1"}
    assert m["n2"].packet_filter == (FilterRule(("100.64.0.2/32",), (
        FilterDest(f"{b['ipv4']}/32", PortRange(22, 22)),)),)
    assert m["n1"].packet_filter[0].dst == (FilterDest(f"{a['ipv4']}/32", PortRange(22, 22)),)


@pytest.mark.parametrize("change", [dict(approved=False), dict(expired=True),
                                    dict(key_expiry=NOW), dict(key_expiry=NOW - 1)])
def test_invisible_nodes_vanish(change):
    nodes = [node(1, "alice"), node(2, "bob", **change), node(3, "bob", key_expiry=NOW + 1)]
    m = maps(policy([acl(["*"], ["*:*"])]), nodes)
    assert set(m) == {"n1", "n3"} and peers(m["n1"]) == {"n3"}
    assert all("n2" not in r.src for r in m["n1"].packet_filter)
    assert NetmapIndex(policy([acl(["*"], ["*:*"])]), nodes, NOW).netmap("n2", 1) is None


def test_deterministic_regardless_of_input_order():
    rng = random.Random(7)
    nodes = [node(i, rng.choice(["alice", "bob", "carol"])) for i in range(30)]
    pol = policy([acl(["group:eng", "carol"], ["autogroup:member:22,80"])])
    first = {k: v.to_json() for k, v in compute_netmaps(pol, nodes, NOW, 1).items()}
    rng.shuffle(nodes)
    idx = NetmapIndex(pol, nodes, NOW)
    assert {k: idx.netmap(k, 1).to_json() for k in first} == first


def filter_accepts(nm: Netmap, src_ip: str, dst: str, port: int, proto: str) -> bool:
    ip, d = ipaddress.ip_address(src_ip), ipaddress.ip_network(dst)
    for r in nm.packet_filter:
        if r.protos and proto not in r.protos:
            continue
        if not any(s == "*" or ip in ipaddress.ip_network(s) for s in r.src):
            continue
        if any(d.subnet_of(ipaddress.ip_network(x.prefix)) and x.ports.first <= port <= x.ports.last
               for x in r.dst if ipaddress.ip_network(x.prefix).version == d.version):
            return True
    return False


def test_netmaps_agree_with_policy_tests_semantics():
    """What `tests` check symbolically is what the packet filters enforce."""
    pol = policy([acl(["group:eng"], ["tag:web:80,443", "autogroup:self:22"]),
                  acl(["tag:web"], ["tag:db:5432"], proto="tcp"),
                  acl(["autogroup:tagged"], ["autogroup:member:8080"], proto="udp"),
                  acl(["carol"], ["*:9000-9100"])])
    ids = [("user", "alice"), ("user", "alice"), ("user", "bob"), ("user", "carol"),
           ("tag", "tag:web"), ("tag", "tag:db"), ("tag", "tag:db")]
    nodes = [node(i, v, []) if k == "user" else node(i, None, [v]) for i, (k, v) in enumerate(ids)]
    m = maps(pol, nodes)
    for s, (sk, sv) in zip(nodes, ids):
        for d, (dk, dv) in zip(nodes, ids):
            if s is d:
                continue
            for port in (22, 80, 443, 5432, 8080, 9050):
                for proto in ("tcp", "udp"):
                    want = pol.allows(Identity(sk, sv), Identity(dk, dv), port, proto)
                    got = filter_accepts(m[d["id"]], s["ipv4"], d["ipv4"] + "/32", port, proto)
                    assert got == want, (s["id"], d["id"], port, proto)
                    if got:
                        assert s["id"] in m[d["id"]].peers and d["id"] in m[s["id"]].peers


# -- the incremental index ----------------------------------------------------------------------
def content(nm: Netmap):
    return (nm.self_node, nm.peers, nm.packet_filter)


def test_new_node_gets_its_whole_netmap_and_peers_get_it():
    pol = policy([acl(["group:eng"], ["tag:db:5432"])])
    idx = NetmapIndex(pol, [node(1, "alice"), node(2, tags=["tag:db"]), node(3, "carol")], NOW)
    deltas, gone = idx.upsert_node(node(4, "bob"), 7)
    assert gone == () and set(deltas) == {"n4", "n2"}
    nm = apply_delta(Netmap(0, deltas["n4"].self_node), deltas["n4"])
    assert content(nm) == content(idx.netmap("n4", 7)) and set(nm.peers) == {"n2"}
    assert deltas["n4"].packet_filter == ()  # explicitly: nothing inbound
    d2 = deltas["n2"]
    assert [p.id for p in d2.peers_changed] == ["n4"] and d2.packet_filter is not None
    assert d2.version == 7 and d2.self_node is None


def test_record_only_change_reaches_exactly_the_peers():
    pol = policy([acl(["group:eng"], ["tag:db:5432"])])
    nodes = [node(1, "alice"), node(2, tags=["tag:db"]), node(3, "carol"), node(4, "bob")]
    idx = NetmapIndex(pol, nodes, NOW)
    deltas, gone = idx.upsert_node(dict(nodes[0], endpoints=["203.0.113.1:1"], online=True), 2)
    assert set(deltas) == {"n1", "n2"} and gone == ()
    assert deltas["n1"].self_node.online and deltas["n1"].peers_changed == ()
    assert deltas["n2"].peers_changed == (deltas["n1"].self_node,)
    assert deltas["n2"].packet_filter is None
    assert idx.upsert_node(dict(nodes[0], endpoints=["203.0.113.1:1"], online=True), 3) == ({}, ())
    assert idx.upsert_node(dict(nodes[0], endpoints=["203.0.113.1:1"], online=True,
                                created_at=1.0), 4) == ({}, ())  # fields netmaps ignore


def test_removal_expiry_and_unapproval_disconnect():
    pol = policy([acl(["*"], ["*:*"])])
    nodes = [node(1, "alice"), node(2, "bob", key_expiry=NOW + 50), node(3, "carol")]
    idx = NetmapIndex(pol, nodes, NOW)
    deltas, gone = idx.remove_node("n3", 2)
    assert gone == ("n3",) and set(deltas) == {"n1", "n2"}
    assert deltas["n1"].peers_removed == ("n3",)
    assert idx.remove_node("n3", 3) == ({}, ()) and idx.remove_node("zzz", 3) == ({}, ())
    assert idx.next_expiry() == NOW + 50
    assert idx.advance_time(NOW + 49, 4) == ({}, ())
    deltas, gone = idx.advance_time(NOW + 50, 5)
    assert gone == ("n2",) and deltas["n1"].peers_removed == ("n2",) and idx.netmap("n2", 5) is None
    assert idx.next_expiry() is None
    deltas, gone = idx.advance_time(NOW, 6)  # a clock that went back brings it back
    assert gone == () and set(deltas) == {"n1", "n2"} and deltas["n2"].self_node is not None
    deltas, gone = idx.upsert_node(dict(nodes[0], approved=False), 7)
    assert gone == ("n1",) and deltas["n2"].peers_removed == ("n1",)
    deltas, gone = idx.upsert_node(dict(nodes[0], approved=True), 8)
    assert set(deltas) == {"n1", "n2"} and deltas["n1"].self_node is not None


def test_policy_replacement_emits_only_real_changes():
    nodes = [node(1, "alice"), node(2, "bob"), node(3, "carol"), node(4, tags=["tag:web"])]
    p1 = policy([acl(["group:eng"], ["tag:web:80"])])
    idx = NetmapIndex(p1, nodes, NOW)
    assert idx.replace_policy(policy([acl(["group:eng"], ["tag:web:80"])]), 2) == ({}, ())
    deltas, gone = idx.replace_policy(policy([acl(["group:eng"], ["tag:web:80"]),
                                              acl(["carol"], ["carol:22"])]), 3)
    # carol has one device: no peers, but her filter now admits her own addresses (sources
    # are listed per ACL, shared by every destination, so a node may appear in its own)
    assert set(deltas) == {"n3"} and gone == ()
    assert deltas["n3"].peers_changed == () and len(deltas["n3"].packet_filter) == 1
    deltas, _ = idx.replace_policy(policy([acl(["group:eng"], ["tag:web:80,443"])]), 4)
    assert set(deltas) == {"n3", "n4"} and deltas["n3"].packet_filter == ()
    assert deltas["n4"].peers_changed == () and deltas["n4"].packet_filter
    deltas, _ = idx.replace_policy(policy([acl(["alice"], ["tag:web:443"])]), 5)
    assert set(deltas) == {"n2", "n4"} and deltas["n2"].peers_removed == ("n4",)
    deltas, _ = idx.replace_policy(None, 6)
    assert set(deltas) == {"n1", "n4"} and deltas["n4"].packet_filter == ()


def test_policy_change_of_cidr_sources_computes_no_peer_sets(monkeypatch):
    """An ACL from a CIDR that holds no node (an office range) makes no peers: flipping its
    port rewrites its targets' filters, and asks nobody's peer set (two unions per target
    were ~40% of such a change at 10,000 nodes)."""
    nodes = [node(i, "alice") for i in range(1, 5)] + [node(5, tags=["tag:web"])]
    office = lambda port: acl(["192.0.2.0/24"], [f"alice:{port}"])  # noqa: E731
    idx = NetmapIndex(policy([office(22), acl(["alice"], ["tag:web:80"])]), nodes, NOW)
    asked = []
    reach = idx._reach
    monkeypatch.setattr(idx, "_reach", lambda k, *a: asked.append(k) or reach(k, *a))
    deltas, gone = idx.replace_policy(policy([office(2222), acl(["alice"], ["tag:web:80"])]), 2)
    assert asked == [] and gone == () and set(deltas) == {"n1", "n2", "n3", "n4"}
    assert all(d.peers_changed == () and d.peers_removed == () for d in deltas.values())
    assert deltas["n1"].packet_filter[0].dst == tuple(
        FilterDest(a, PortRange(2222, 2222)) for a in addrs(nodes[0]))
    # an ACL with nodes on both sides still gets them: alice's devices lose tag:web
    deltas, _ = idx.replace_policy(policy([office(2222)]), 3)
    assert set(asked) == {"n1", "n2", "n3", "n4", "n5"}
    assert deltas["n5"].peers_removed == ("n1", "n2", "n3", "n4")


# -- incremental == from scratch, over random change sequences ------------------------------------
POLICIES = [
    None,
    [acl(["*"], ["*:*"])],
    [acl(["group:eng"], ["tag:db:5432", "autogroup:self:*"]),
     acl(["tag:web"], ["tag:db:5432"], proto="tcp"),
     acl(["alice"], ["corp:*"]),
     acl(["carol"], ["autogroup:self:22"])],
    [acl(["autogroup:member"], ["autogroup:tagged:80,443"]),
     acl(["tag:router"], ["autogroup:member:22"], proto="udp"),
     acl(["10.2.0.0/16", "printer"], ["tag:web:80"]),
     acl(["autogroup:tagged"], ["*:9000-9100"])],
    [acl(["100.64.0.0/29"], ["*:22"]), acl(["bob", "tag:db"], ["100.64.0.0/28:*", "10.0.0.0/8:*"]),
     acl(["*"], ["autogroup:self:*"])],
    [acl(["autogroup:member"], ["autogroup:internet:*"]),
     acl(["tag:web"], ["autogroup:internet:443", "10.1.0.0/16:80"])],
    # routers seen for their own sake (SSH), for one subnet, and from a routed subnet
    [acl(["alice", "tag:web"], ["tag:router:22", "autogroup:tagged:22"]),
     acl(["bob"], ["10.1.0.9:443"]), acl(["10.2.0.0/16"], ["carol:22", "tag:db:*"]),
     acl(["dave"], ["autogroup:internet:*"])],
]


def random_node(rng: random.Random, i: int, now: float) -> dict:
    tags = rng.choice([(), (), (), ("tag:web",), ("tag:db",), ("tag:router",), ("tag:web", "tag:db")])
    routes = rng.sample(["10.1.0.0/24", "10.2.0.0/16", "10.1.0.9/32", "fd00::/64", "0.0.0.0/0",
                         "::/0"], rng.randint(0, 2))
    return node(
        i, rng.choice(["alice", "bob", "carol", "dave", None]), tags,
        approved=rng.random() < 0.85, expired=rng.random() < 0.05,
        key_expiry=rng.choice([None, None, now + rng.uniform(-20, 60)]),
        approved_routes=routes, advertised_routes=routes if rng.random() < 0.8 else [],
        standby_routes=rng.sample(routes, rng.randint(0, len(routes))),
        endpoints=[f"192.0.2.{rng.randint(1, 9)}:41641"], online=rng.random() < 0.5,
        last_seen=rng.choice([None, now]))


def mutate(rng: random.Random, n: dict, now: float) -> dict:
    fresh = random_node(rng, int(n["id"][1:]), now)
    keys = rng.sample(sorted(fresh), rng.randint(1, 3))
    n = dict(n, **{k: fresh[k] for k in keys if k not in ("id", "ipv4", "ipv6")})
    if rng.random() < 0.05:  # addresses change too, rarely
        n["ipv4"] = f"100.64.1.{rng.randint(1, 200)}"
    if n["tags"]:
        n["user"] = None
    return n


def check_internals(idx: NetmapIndex) -> None:
    """White-box: every slot's cell registrations (what a changed source list rewrites)
    are exactly its current targets, pointing at their current cells and destinations."""
    for s in idx._slots:
        want_d, want_s = {}, {}
        for k, roles in idx._roles.items():
            at, cells = idx._rules[k]
            if s in roles.dst:
                want_d[k] = (cells, at[s], roles.dst[s])
            if s in roles.self_dst:
                want_s[k] = (cells, at[s] + 1, roles.self_dst[s])
        for got, want in ((s.dcells, want_d), (s.scells, want_s)):
            assert got.keys() == want.keys()
            for k, (cells, i, dests) in got.items():
                assert cells is want[k][0] and i == want[k][1] and dests == want[k][2], k
    for k, (at, cells) in idx._rules.items():
        assert idx._filter[k] == tuple(c for c in cells if c is not None)


def check_wire(deltas: dict) -> None:
    """Rules the index builds without FilterRule.__init__ are indistinguishable from
    constructed ones, and deltas encode exactly as their decoded copies do."""
    for d in deltas.values():
        for r in d.packet_filter or ():
            assert type(r) is FilterRule and r == FilterRule(r.src, r.dst, r.protos)
            assert hash(r) == hash(FilterRule(r.src, r.dst, r.protos))
        text = json.dumps(d.to_json(), sort_keys=True)
        assert json.dumps(NetmapDelta.from_json(json.loads(text)).to_json(), sort_keys=True) == text


def test_fast_rules_are_ordinary_filter_rules():
    src, dst = ("100.64.0.1/32", "*"), (FilterDest("100.64.0.2/32", PortRange(22, 22)),)
    fast, slow = _rule(src, dst, ("tcp",)), FilterRule(src, dst, ("tcp",))
    assert type(fast) is FilterRule and fast == slow and hash(fast) == hash(slow)
    assert repr(fast) == repr(slow) and vars(fast) == vars(slow)
    assert fast.to_json() == slow.to_json() and json.dumps(fast.to_json()) == json.dumps(slow.to_json())
    assert pickle.loads(pickle.dumps(fast)) == slow and dataclasses.astuple(fast) == dataclasses.astuple(slow)
    assert not (fast < slow or slow < fast) and fast != _rule(src, dst, ())
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.src = ()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_incremental_agrees_with_from_scratch(seed):
    rng = random.Random(seed)
    now, version = NOW, 1
    pols = [None if p is None else policy(p) for p in POLICIES]
    pol = pols[2]
    nodes = {f"n{i}": random_node(rng, i, now) for i in range(12)}
    idx = NetmapIndex(pol, list(nodes.values()), now)
    clients = {k: idx.netmap(k, version) for k in idx.visible_ids()}
    prev = compute_netmaps(pol, nodes.values(), now, version)
    for step in range(250):
        version += 1
        op = rng.random()
        if op < 0.25:
            i = rng.randint(0, 30)
            nodes[f"n{i}"] = random_node(rng, i, now)
            changes = idx.upsert_node(nodes[f"n{i}"], version)
        elif op < 0.65 and nodes:
            k = rng.choice(sorted(nodes))
            nodes[k] = mutate(rng, nodes[k], now)
            changes = idx.upsert_node(nodes[k], version)
        elif op < 0.8 and nodes:
            k = rng.choice(sorted(nodes))
            del nodes[k]
            changes = idx.remove_node(k, version)
        elif op < 0.93:
            now += rng.uniform(-15, 25)
            changes = idx.advance_time(now, version)
        else:
            pol = rng.choice(pols)
            changes = idx.replace_policy(pol, version)
        deltas, gone = changes
        for k in gone:
            del clients[k]
            assert k not in deltas
        for k, d in deltas.items():
            assert d.version == version and not d.is_empty()
            base = clients.get(k) or Netmap(0, d.self_node)
            clients[k] = apply_delta(base, d)
        ref = compute_netmaps(pol, nodes.values(), now, version)
        assert sorted(clients) == sorted(ref) == idx.visible_ids(), step
        check_internals(idx)
        check_wire(deltas)
        for k, nm in ref.items():
            assert content(clients[k]) == content(nm), (step, k)
            assert idx.netmap(k, version) == nm
            changed = k not in prev or content(prev[k]) != content(nm)
            assert (k in deltas) == changed, (step, k)  # a delta exactly when something changed
        assert set(gone) == set(prev) - set(ref)
        prev = ref


# -- locality at scale ---------------------------------------------------------------------------
def big_network():
    """2,000 nodes: 250 users with 6 devices each, 20 databases, 480 web servers.
    group:eng (10 users) reaches the databases; web servers reach them too; every user
    reaches their own devices."""
    users = [f"u{i}" for i in range(250)]
    nodes = [node(i, users[i // 6]) for i in range(1500)]
    nodes += [node(i, tags=["tag:db"]) for i in range(1500, 1520)]
    nodes += [node(i, tags=["tag:web"]) for i in range(1520, 2000)]
    pol = parse_policy(json.dumps({
        "groups": {"group:eng": users[:10]},
        "tagOwners": {"tag:db": [], "tag:web": []},
        "acls": [acl(["group:eng", "tag:web"], ["tag:db:5432"]),
                 acl(["autogroup:member"], ["autogroup:self:*"])]}))
    return pol, nodes


def snapshot(idx: NetmapIndex) -> dict:
    return {k: content(idx.netmap(k, 0)) for k in idx.visible_ids()}


def changed_ids(before: dict, after: dict) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def test_a_change_in_2000_nodes_touches_only_who_sees_it():
    pol, nodes = big_network()
    idx = NetmapIndex(pol, nodes, NOW)
    dbs = {f"n{i}" for i in range(1500, 1520)}
    siblings = {f"n{i}" for i in range(18, 24)}  # u3's devices (u3 is in group:eng)
    assert set(idx.netmap("n18", 0).peers) == (siblings - {"n18"}) | dbs

    def check(changes, expected, gone=()):
        nonlocal state
        after = snapshot(idx)
        assert set(changes.deltas) == expected == changed_ids(state, after) - set(gone)
        assert changes.gone == tuple(gone)
        state = after

    state = snapshot(idx)
    # presence/endpoints of an eng laptop: its own devices and the databases
    check(idx.upsert_node(dict(nodes[18], endpoints=["203.0.113.9:1"], online=True), 2),
          siblings | dbs)
    # a new eng laptop: the databases' filters now list it
    check(idx.upsert_node(node(2000, "u3"), 3), siblings | dbs | {"n2000"})
    # a non-eng user's laptop is unapproved: only that user's other devices notice
    check(idx.upsert_node(dict(nodes[600], approved=False), 4),
          {f"n{i}" for i in range(601, 606)}, gone=["n600"])
    # a web server is removed: only the databases notice
    check(idx.remove_node("n1999", 5), dbs, gone=["n1999"])
    # a web server becomes a database: every web server and eng device now sees it
    web = {f"n{i}" for i in range(1520, 1999)}
    eng = {f"n{i}" for i in range(60)} | {"n2000"}
    check(idx.upsert_node(dict(nodes[1600], tags=["tag:db"]), 6), web | eng | dbs)


# -- policy changes that keep, move, duplicate or drop some ACLs ---------------------------------
ACL_POOL = [
    acl(["group:eng"], ["tag:db:5432", "autogroup:self:*"]),
    acl(["tag:web"], ["tag:db:5432"], proto="tcp"),
    acl(["alice"], ["corp:*"]),
    acl(["carol"], ["autogroup:self:22"]),
    acl(["autogroup:member"], ["autogroup:tagged:80,443"]),
    acl(["tag:router"], ["autogroup:member:22"], proto="udp"),
    acl(["10.2.0.0/16", "printer"], ["tag:web:80"]),
    acl(["autogroup:tagged"], ["*:9000-9100"]),
    acl(["100.64.0.0/29"], ["*:22"]),
    acl(["bob", "tag:db"], ["100.64.0.0/28:*", "10.0.0.0/8:*"]),
    acl(["*"], ["autogroup:self:*"]),
    acl(["group:eng", "dave"], ["tag:web:443", "alice:22"]),
    acl(["192.0.2.0/24"], ["tag:web:22", "autogroup:member:22"]),  # sources that are no node
    acl(["alice", "tag:db"], ["tag:router:22"]),  # routers seen for their own sake
    acl(["carol"], ["10.1.0.9:443", "fd00::/64:*"]),  # one subnet's share
    acl(["10.2.0.0/16"], ["dave:22"]),  # a routed subnet reaching in
]


def pooled_policy(rng: random.Random) -> Policy | None:
    """A random subset of ACL_POOL in random order, sometimes with a duplicate ACL or a
    different group:eng, so consecutive policies share, move and drop ACLs."""
    if rng.random() < 0.05:
        return None
    acls = rng.sample(ACL_POOL, rng.randint(0, len(ACL_POOL)))
    if acls and rng.random() < 0.2:
        acls.insert(rng.randrange(len(acls) + 1), rng.choice(acls))
    eng = rng.choice([["alice", "bob"], ["alice", "bob"], ["bob", "dave"]])
    return policy(acls, groups={"group:eng": eng})


def nudge(rng: random.Random, pol: Policy | None) -> Policy | None:
    """The previous policy with one ACL added, removed or moved (the common edit)."""
    acls = list(pol.acls) if pol else []
    r = rng.random()
    if r < 0.4 or not acls:
        groups = {g: sorted(u) for g, u in pol.groups.items()} if pol and pol.groups else \
            {"group:eng": ["alice", "bob"]}
        extra = policy([rng.choice(ACL_POOL)], groups=groups).acls
        acls.insert(rng.randrange(len(acls) + 1), extra[0])
    elif r < 0.7:
        acls.pop(rng.randrange(len(acls)))
    else:
        acls.insert(rng.randrange(len(acls)), acls.pop(rng.randrange(len(acls))))
    base = pol or policy([])
    return Policy(base.groups, base.tag_owners, base.hosts, tuple(acls))


@pytest.mark.parametrize("seed", range(10, 22))
def test_incremental_agrees_with_from_scratch_across_overlapping_policies(seed):
    """Like the test above, with policies that keep most ACLs (the index keeps a kept ACL's
    indexes and only re-derives what added or removed ones touch), more nodes, more steps."""
    agrees_with_from_scratch(seed, nudge)


@pytest.mark.parametrize("seed", range(40, 52))
def test_incremental_agrees_with_from_scratch_across_port_edits(seed):
    """The same with edits of ports and protocols mixed in: an edited ACL keeps its slot
    and member indexes (`_retargetable`) and only its targets' filters are redone."""
    agrees_with_from_scratch(seed, lambda rng, pol: edit_ports(rng, nudge(rng, pol))
                             if rng.random() < 0.3 else edit_ports(rng, pol))


def edit_ports(rng: random.Random, pol: Policy | None) -> Policy | None:
    """The policy with the ports and/or protocols of one to three ACLs changed."""
    if not pol or not pol.acls:
        return pol
    acls = list(pol.acls)
    for i in rng.sample(range(len(acls)), min(len(acls), rng.randint(1, 3))):
        a = acls[i]
        ports = rng.choice([(ANY,), (PortRange(22, 22),), (PortRange(80, 80), PortRange(443, 443)),
                            (PortRange(9000, 9100),)])
        dst = tuple(dataclasses.replace(d, ports=ports if rng.random() < 0.8 else d.ports)
                    for d in a.dst)
        protos = rng.choice([a.protos, a.protos, ("tcp",), ("udp",), ()])
        acls[i] = dataclasses.replace(a, dst=dst, protos=protos)
    return dataclasses.replace(pol, acls=tuple(acls))


def agrees_with_from_scratch(seed: int, next_policy) -> None:
    """Random node, time and policy changes (`next_policy(rng, policy)` for most policy
    steps): every delta applied by a client gives what compute_netmaps gives from scratch."""
    rng = random.Random(seed)
    now, version = NOW, 1
    pol = pooled_policy(rng)
    nodes = {f"n{i}": random_node(rng, i, now) for i in range(20)}
    idx = NetmapIndex(pol, list(nodes.values()), now)
    clients = {k: idx.netmap(k, version) for k in idx.visible_ids()}
    prev = compute_netmaps(pol, nodes.values(), now, version)
    for step in range(300):
        version += 1
        op = rng.random()
        if op < 0.2:
            i = rng.randint(0, 40)
            nodes[f"n{i}"] = random_node(rng, i, now)
            changes = idx.upsert_node(nodes[f"n{i}"], version)
        elif op < 0.5 and nodes:
            k = rng.choice(sorted(nodes))
            nodes[k] = mutate(rng, nodes[k], now)
            changes = idx.upsert_node(nodes[k], version)
        elif op < 0.6 and nodes:
            k = rng.choice(sorted(nodes))
            del nodes[k]
            changes = idx.remove_node(k, version)
        elif op < 0.75:
            now += rng.uniform(-15, 25)
            changes = idx.advance_time(now, version)
        elif op < 0.92:
            pol = next_policy(rng, pol)
            changes = idx.replace_policy(pol, version)
        else:
            pol = pooled_policy(rng)
            changes = idx.replace_policy(pol, version)
        deltas, gone = changes
        for k in gone:
            del clients[k]
            assert k not in deltas
        for k, d in deltas.items():
            assert d.version == version and not d.is_empty()
            base = clients.get(k) or Netmap(0, d.self_node)
            clients[k] = apply_delta(base, d)
        ref = compute_netmaps(pol, nodes.values(), now, version)
        assert sorted(clients) == sorted(ref) == idx.visible_ids(), step
        check_internals(idx)
        check_wire(deltas)  # (deltas come in no particular order: nothing relies on id order)
        for k, nm in ref.items():
            assert content(clients[k]) == content(nm), (step, k)
            assert idx.netmap(k, version) == nm
            changed = k not in prev or content(prev[k]) != content(nm)
            assert (k in deltas) == changed, (step, k)
        assert set(gone) == set(prev) - set(ref)
        prev = ref


def test_policy_change_keeps_unrelated_nodes_untouched():
    """Adding one ACL re-derives only its members: nobody else gets a delta."""
    pol, nodes = big_network()
    idx = NetmapIndex(pol, nodes, NOW)
    state = snapshot(idx)
    extra = acl(["u20"], ["tag:db:22"])
    doc = {"groups": {"group:eng": [f"u{i}" for i in range(10)]},
           "tagOwners": {"tag:db": [], "tag:web": []},
           "acls": [acl(["group:eng", "tag:web"], ["tag:db:5432"]), extra,
                    acl(["autogroup:member"], ["autogroup:self:*"])]}
    changes = idx.replace_policy(parse_policy(json.dumps(doc)), 2)
    dbs = {f"n{i}" for i in range(1500, 1520)}
    u20 = {f"n{i}" for i in range(120, 126)}
    assert set(changes.deltas) == dbs | u20 == changed_ids(state, snapshot(idx))
    assert snapshot(idx) == snapshot(NetmapIndex(idx.policy, nodes, NOW))  # (built = reference)
    doc["acls"].reverse()  # reordering kept ACLs reorders the rules of nodes in both
    changes = idx.replace_policy(parse_policy(json.dumps(doc)), 3)
    assert set(changes.deltas) <= dbs | u20
    assert snapshot(idx) == snapshot(NetmapIndex(idx.policy, nodes, NOW))


def test_port_edit_touches_only_the_targets_and_matches_no_node(monkeypatch):
    """Editing an ACL's ports or protocols re-derives its targets' filters only: no node
    is matched against the edited ACL again (its slot is reused) and no peer set changes."""
    from raftmesh.cluster import netmap
    pol, nodes = big_network()
    idx = NetmapIndex(pol, nodes, NOW)
    state = snapshot(idx)
    edited = dataclasses.replace(pol.acls[0], protos=("tcp",), dst=tuple(
        dataclasses.replace(d, ports=(PortRange(5433, 5433),)) for d in pol.acls[0].dst))

    def no_matching(*a):
        raise AssertionError("a port edit matched nodes against an ACL")
    monkeypatch.setattr(netmap._SlotFinder, "candidates", no_matching)
    monkeypatch.setattr(netmap, "_acl_role", no_matching)
    changes = idx.replace_policy(dataclasses.replace(pol, acls=(edited, *pol.acls[1:])), 2)
    dbs = {f"n{i}" for i in range(1500, 1520)}
    assert set(changes.deltas) == dbs == changed_ids(state, snapshot(idx))
    assert all(d.peers_changed == () and d.peers_removed == () for d in changes.deltas.values())
    monkeypatch.undo()
    assert snapshot(idx) == snapshot(NetmapIndex(idx.policy, nodes, NOW))


def test_record_only_change_shares_one_delta_among_peers():
    pol, nodes = big_network()
    idx = NetmapIndex(pol, nodes, NOW)
    deltas, _ = idx.upsert_node(dict(nodes[18], online=True), 2)
    shared = {id(d) for k, d in deltas.items() if k != "n18"}
    assert len(deltas) == 26 and len(shared) == 1  # 20 databases, 5 siblings, itself


def test_prefix_texts_are_cached_and_bounded(monkeypatch):
    from raftmesh.cluster import netmap
    monkeypatch.setattr(netmap, "_TEXTS", {})
    monkeypatch.setattr(netmap, "MAX_TEXTS", 2)
    nets = [ipaddress.ip_network(t) for t in ("100.64.0.1/32", "fd7a:115c:a1e0::1/128", "10.0.0.0/8")]
    assert [netmap._prefix_text(n) for n in nets] == [str(n) for n in nets]
    assert len(netmap._TEXTS) <= 2 and netmap._prefix_text(nets[2]) == "10.0.0.0/8"
