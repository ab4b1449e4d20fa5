"""Subnet routes and exit nodes (cluster/routes.py): auto-approval, primary election, and
what the state machine and netmaps make of them."""
import json
import random

import pytest

from raftmesh.cluster import routes
from raftmesh.cluster import state_machine as sm
from raftmesh.cluster.netmap import compute_netmaps
from raftmesh.cluster.netmap_feed import NetmapFeed
from raftmesh.cluster.policy import PolicyError, parse_policy
from raftmesh.cluster.policy_form import compile_policy, stored_policy

from test_state_machine import DictTxn, cmd

SITE = "10.2.0.0/24"


# -- pure pieces -------------------------------------------------------------------------
def test_canonical_routes_refuse_what_is_not_a_cidr():
    assert routes.canonical_routes(["10.2.0.0/24", "fd00::/64", "10.2.0.0/24"]) == \
        ["10.2.0.0/24", "fd00::/64"]
    for bad in ["10.2.0.1/24", "bogus", "10.0.0.0/33", 7, None, "::/129"]:
        with pytest.raises(routes.RouteError, match="is not a CIDR"):
            routes.canonical_routes([bad])


APPROVERS = {"routes": [["10.0.0.0/8", ["tag:router"]], ["192.168.1.0/24", ["user:alice"]],
                        ["fd00::/8", ["autogroup:member"]]],
             "exitNode": ["tag:exit"]}


@pytest.mark.parametrize("node, approved", [
    ({"tags": ["tag:router"], "advertised_routes": ["10.2.0.0/24", "10.0.0.0/8", "11.0.0.0/8"]},
     ["10.2.0.0/24", "10.0.0.0/8"]),  # within or equal to a listed CIDR, nothing else
    ({"tags": ["tag:router"], "advertised_routes": ["0.0.0.0/0", "::/0"]}, []),  # not an exit
    ({"tags": ["tag:exit"], "advertised_routes": ["0.0.0.0/0", "::/0", "10.1.0.0/16"]},
     ["0.0.0.0/0", "::/0"]),
    ({"user": "alice", "tags": [], "advertised_routes": ["192.168.1.0/25", "10.1.0.0/16"]},
     ["192.168.1.0/25"]),
    ({"user": "bob", "tags": [], "advertised_routes": ["192.168.1.0/25", "fd00:1::/64"]},
     ["fd00:1::/64"]),  # autogroup:member: any user's device, not tagged ones
    ({"tags": ["tag:other"], "advertised_routes": ["fd00:1::/64", "10.0.0.0/7"]}, []),
    ({"user": None, "tags": [], "advertised_routes": ["10.1.0.0/16"]}, []),  # nobody's node
])
def test_auto_approval_matches_owner_or_tag_for_a_containing_cidr(node, approved):
    assert routes.auto_approved(node, APPROVERS) == approved
    assert routes.auto_approved(node, None) == []


def test_election_keeps_an_eligible_primary_and_otherwise_takes_the_lowest():
    ok = {"a": True, "b": True, "c": True}
    assert routes.elect(None, ["b", "a"], ok.get) == "a"
    assert routes.elect("b", ["a", "b", "c"], ok.get) == "b"  # no flapping back to a
    assert routes.elect("b", ["a", "b", "c"], {**ok, "b": False}.get) == "a"
    assert routes.elect("a", ["a", "b", "c"], {"a": False, "b": False, "c": True}.get) == "c"
    # nobody eligible: the primary stays where it is; a new set takes its lowest router
    assert routes.elect("b", ["a", "b"], lambda r: False) == "b"
    assert routes.elect(None, ["b", "a"], lambda r: False) == "a"
    assert routes.elect("x", ["a"], lambda r: False) == "a"  # x no longer serves it
    assert routes.elect("a", [], ok.get) is None


def test_election_is_stable_over_random_flaps():
    """Whatever the order of changes, a primary only moves when it stops being eligible."""
    rng = random.Random(7)
    routers = ["r1", "r2", "r3"]
    up = dict.fromkeys(routers, True)
    primary = routes.elect(None, routers, up.get)
    for _ in range(500):
        up[rng.choice(routers)] = rng.random() < 0.6
        new = routes.elect(primary, routers, up.get)
        if up[primary]:
            assert new == primary
        elif any(up.values()):
            assert up[new] and new == min(r for r in routers if up[r])
        primary = new


# -- the replicated decision ---------------------------------------------------------------
POLICY = """{
  "tagOwners": {"tag:router": [], "tag:exit": []},
  "autoApprovers": {"routes": {"10.0.0.0/8": ["tag:router"]}, "exitNode": ["tag:exit"]},
  "acls": [{"action": "accept", "src": ["alice"], "dst": ["10.2.0.0/24:*", "tag:router:22"]},
           {"action": "accept", "src": ["bob"], "dst": ["tag:router:22"]}],
}"""
# bob may use part of the site too
POLICY_BOB = POLICY.replace('"dst": ["tag:router:22"]',
                            '"dst": ["tag:router:22", "10.2.0.128/25:*"]')


def policy_cmd(text=POLICY, **kw):
    return cmd("policy.set", text=text, compiled=compile_policy(parse_policy(text)), **kw)


def router(i, routes_=(SITE,), tags=("tag:router",)):
    return cmd("node.register", id=f"r{i}", name=f"router{i}", machine_key=f"mr{i}",
               node_key=f"kr{i}", user="alice", tags=list(tags), advertised_routes=list(routes_))


def presence(changes, replica="x"):
    return cmd("node.presence", replica=replica,
               changes=[{"id": n, "online": on, "session": f"s-{n}"} for n, on in changes])


class Cluster:
    """The state machine over a DictTxn, with a netmap feed following it as replicas do."""

    def __init__(self):
        self.txn, self.version = DictTxn(), 0
        self.feed = NetmapFeed(None, [], 0.0, 0)

    def apply(self, *commands):
        results = []
        for c in commands:
            self.version += 1
            r = sm.apply(self.txn, c, self.version)
            self.update = self.feed.apply_batch([(self.version, c, r)])
            results.append(r)
        return results[-1]

    def node(self, nid):
        return self.txn.get("nodes", nid)

    def primary(self, cidr=SITE):
        return (self.txn.get("route_sets", cidr) or {}).get("primary")

    def allowed_ips(self, viewer, peer):
        p = self.feed.full(viewer).peers.get(peer)
        return None if p is None else p.allowed_ips

    def check_feed_matches_definition(self):
        nodes = [n for _, n in self.txn.items("nodes")]
        head = self.txn.get("meta", "policy_head")
        pol = self.txn.get("policy_versions", f"{head['version']:010d}")
        want = compute_netmaps(stored_policy(pol), nodes, self.feed.clock, self.version)
        for k, m in want.items():
            assert self.feed.full(k).peers == m.peers, k


@pytest.fixture
def cluster():
    c = Cluster()
    c.apply(cmd("user.create", name="alice"), policy_cmd(),
            cmd("node.register", id="c1", name="client", machine_key="mc", node_key="kc",
                user="alice"),
            cmd("node.approve", id="c1"))
    return c


def test_policy_auto_approves_on_registration_and_elects_one_primary(cluster):
    r = cluster.apply(router(1))
    assert r["value"]["approved_routes"] == [SITE]
    cluster.apply(cmd("node.approve", id="r1"), router(2), cmd("node.approve", id="r2"))
    assert cluster.primary() == "r1"  # the lowest id while nobody is online
    assert cluster.node("r2")["standby_routes"] == [SITE]
    assert SITE in cluster.allowed_ips("c1", "r1") and SITE not in cluster.allowed_ips("c1", "r2")
    audits = [e for _, e in cluster.txn.items("audit") if e["target"] == "node:r2"]
    assert any(e["after"]["approved_routes"] == [SITE] for e in audits)
    cluster.check_feed_matches_definition()


def test_primary_moves_when_it_goes_offline_and_does_not_move_back(cluster):
    cluster.apply(router(1), router(2), cmd("node.approve", id="r1"), cmd("node.approve", id="r2"),
                  presence([("r1", True), ("r2", True)]))
    assert cluster.primary() == "r1"
    r = cluster.apply(presence([("r1", False)]))
    assert cluster.primary() == "r2"
    assert {n["id"] for n in r["routes_settled"]} == {"r1", "r2"}
    assert SITE in cluster.allowed_ips("c1", "r2") and SITE not in cluster.allowed_ips("c1", "r1")
    cluster.apply(presence([("r1", True)]))
    assert cluster.primary() == "r2"  # back online: no flapping
    cluster.apply(cmd("node.report", id="r2", unreachable_routes=[SITE]))
    assert cluster.primary() == "r1"  # its subnet is down
    cluster.apply(cmd("node.delete", id="r1"))
    assert cluster.primary() == "r2"  # the only router left, even though it reports trouble
    cluster.apply(cmd("node.delete", id="r2"))
    assert cluster.txn.get("route_sets", SITE) is None
    cluster.check_feed_matches_definition()


def ssh_client():
    """bob's device: a peer of the routers for SSH to them, not for the site behind them."""
    return [cmd("user.create", name="bob"),
            cmd("node.register", id="c2", name="ssh", machine_key="mc2", node_key="kc2",
                user="bob"),
            cmd("node.approve", id="c2")]


def test_a_route_is_shown_only_to_whom_the_policy_lets_use_it(cluster):
    cluster.apply(*ssh_client(), router(1), router(2), cmd("node.approve", id="r1"),
                  cmd("node.approve", id="r2"), presence([("r1", True), ("r2", True)]))
    assert SITE in cluster.allowed_ips("c1", "r1")
    for r in ("r1", "r2"):
        assert cluster.allowed_ips("c2", r) == cluster.feed.full(r).self_node.addresses
    cluster.apply(presence([("r1", False)]))  # the route moves, still out of bob's sight
    assert SITE in cluster.allowed_ips("c1", "r2") and SITE not in cluster.allowed_ips("c2", "r2")
    cluster.apply(policy_cmd(POLICY_BOB))
    assert SITE in cluster.allowed_ips("c2", "r2") and SITE not in cluster.allowed_ips("c2", "r1")
    cluster.check_feed_matches_definition()


def test_unapproving_or_unadvertising_leaves_the_set(cluster):
    cluster.apply(cmd("policy.set", text="{}", compiled=compile_policy(parse_policy("{}"))))
    cluster.apply(router(1), router(2), cmd("node.approve", id="r1"), cmd("node.approve", id="r2"))
    assert cluster.node("r1")["approved_routes"] == [] and cluster.primary() is None
    cluster.apply(cmd("node.routes", id="r2", approved_routes=[SITE]))
    assert cluster.primary() == "r2"
    cluster.apply(cmd("node.routes", id="r1", approved_routes=[SITE]))
    assert cluster.primary() == "r2" and cluster.node("r1")["standby_routes"] == [SITE]
    cluster.apply(cmd("node.report", id="r2", advertised_routes=[]))
    assert cluster.primary() == "r1" and cluster.node("r1")["standby_routes"] == []
    cluster.apply(cmd("node.routes", id="r1", approved_routes=[]))
    assert cluster.txn.get("route_sets", SITE) is None


def test_a_new_policy_approves_routes_already_advertised(cluster):
    cluster.apply(cmd("policy.set", text="{}", compiled=compile_policy(parse_policy("{}"))))
    cluster.apply(router(1, routes_=(SITE, "0.0.0.0/0")), cmd("node.approve", id="r1"))
    assert cluster.node("r1")["approved_routes"] == []
    cluster.apply(policy_cmd())
    assert cluster.node("r1")["approved_routes"] == [SITE]  # tag:router is no exit node
    assert cluster.primary() == "r1"


def test_exit_nodes_are_not_elected_and_offer_the_default_routes(cluster):
    cluster.apply(router(1, routes_=("0.0.0.0/0", "::/0"), tags=("tag:exit",)),
                  router(2, routes_=("0.0.0.0/0", "::/0"), tags=("tag:exit",)),
                  cmd("node.approve", id="r1"), cmd("node.approve", id="r2"))
    assert cluster.node("r2")["approved_routes"] == ["0.0.0.0/0", "::/0"]
    assert cluster.txn.get("route_sets", "0.0.0.0/0") is None
    table = routes.route_table(cluster.txn)
    assert [(e["cidr"], [c["id"] for c in e["candidates"]]) for e in table] == \
        [("0.0.0.0/0", ["r1", "r2"]), ("::/0", ["r1", "r2"])]


def test_exit_node_use_is_recorded_and_audited(cluster):
    cluster.apply(router(1, routes_=("0.0.0.0/0", "::/0"), tags=("tag:exit",)),
                  router(2, routes_=("0.0.0.0/0", "::/0"), tags=("tag:exit",)),
                  cmd("node.approve", id="r1"), cmd("node.approve", id="r2"))
    version = cluster.feed.version
    r = cluster.apply(cmd("node.report", id="c1", exit_node="r1", actor="node:c1"))
    assert r["ok"] and cluster.node("c1")["exit_node"] == "r1"
    assert cluster.update.deltas == {}  # nothing a netmap shows
    cluster.apply(cmd("node.report", id="c1", exit_node="r2", actor="node:c1"),
                  cmd("node.report", id="c1", exit_node="r2", actor="node:c1"),  # no change
                  cmd("node.report", id="c1", exit_node=None, actor="node:c1"))
    entries = [e for _, e in cluster.txn.items("audit") if e["version"] > version]
    uses = [(e["before"].get("exit_node"), e["after"]["exit_node"]) for e in entries
            if e["target"] == "node:c1" and e["action"] == "node.report"]
    assert uses == [(None, "r1"), ("r1", "r2"), ("r2", None)]
    assert all(e["actor"] == "node:c1" for e in entries)


@pytest.mark.parametrize("exit_node", ["c1", "nope", "r1"])
def test_an_exit_node_that_is_none_is_refused_and_changes_nothing(cluster, exit_node):
    cluster.apply(router(1))  # a subnet router, no exit node
    before = json.dumps(cluster.txn.tables, sort_keys=True)
    r = cluster.apply(cmd("node.report", id="c1", exit_node=exit_node))
    assert not r["ok"] and r["code"] == "invalid_exit_node" and r["status"] == 400
    assert repr(exit_node) in r["message"]
    assert json.dumps(cluster.txn.tables, sort_keys=True) == before


@pytest.mark.parametrize("approved, message", [
    (["10.9.0.0/24"], "not advertised"), (["10.2.0.1/24"], "not a CIDR"), (["x"], "not a CIDR")])
def test_bad_route_approvals_are_refused_and_change_nothing(cluster, approved, message):
    cluster.apply(router(1))
    before = json.dumps(cluster.txn.tables, sort_keys=True)
    r = cluster.apply(cmd("node.routes", id="r1", approved_routes=approved))
    assert not r["ok"] and r["code"] == "invalid_route" and r["status"] == 400
    assert message in r["message"]
    assert json.dumps(cluster.txn.tables, sort_keys=True) == before


def test_route_table_shows_primary_and_candidates(cluster):
    cluster.apply(router(2), router(1), cmd("node.approve", id="r1"), cmd("node.approve", id="r2"),
                  presence([("r2", True)]))
    assert routes.route_table(cluster.txn) == [{"cidr": SITE, "primary": "r2", "candidates": [
        {"id": "r1", "eligible": False}, {"id": "r2", "eligible": True}]}]


def test_replicas_agree_over_random_histories():
    rng = random.Random(3)
    ops = []
    for _ in range(120):
        r = f"r{rng.randint(1, 4)}"
        ops.append(rng.choice([
            presence([(r, rng.random() < 0.6)]),
            cmd("node.report", id=r, unreachable_routes=rng.choice([[], [SITE]])),
            cmd("node.report", id=r, advertised_routes=rng.choice([[SITE], [], [SITE, "10.3.0.0/24"]])),
            cmd("node.routes", id=r, approved_routes=[]),
            policy_cmd(rng.choice([POLICY, POLICY_BOB])),
        ]))
    states = []
    for _ in range(2):
        c = Cluster()
        c.apply(cmd("user.create", name="alice"), policy_cmd(), *ssh_client(),
                *[router(i, routes_=(SITE, "10.3.0.0/24")) for i in range(1, 5)],
                *[cmd("node.approve", id=f"r{i}") for i in range(1, 5)])
        for op in ops:
            c.apply(op)
            for cidr, s in c.txn.items("route_sets"):  # exactly the primary carries the route
                for nid in s["routers"]:
                    assert (cidr in (c.node(nid).get("standby_routes") or ())) == (nid != s["primary"])
                if s["primary"] and any(routes.eligible(c.node(n), cidr) for n in s["routers"]):
                    assert routes.eligible(c.node(s["primary"]), cidr)
            c.check_feed_matches_definition()
        states.append(c.txn.tables)
    assert states[0] == states[1]


# -- policy syntax ---------------------------------------------------------------------------
def test_auto_approvers_are_resolved_in_the_compiled_policy():
    p = parse_policy("""{"groups": {"group:net": ["bob@", "carol"]}, "tagOwners": {"tag:r": []},
        "autoApprovers": {"routes": {"10.1.0.0/16": ["group:net", "tag:r", "dave@"],
                                     "fd00::/8": ["autogroup:member"]},
                          "exitNode": ["user:erin"]}}""")
    assert compile_policy(p)["autoApprovers"] == {
        "routes": [["10.1.0.0/16", ["tag:r", "user:bob", "user:carol", "user:dave"]],
                   ["fd00::/8", ["autogroup:member"]]],
        "exitNode": ["user:erin"]}
    assert p.warnings == ()


@pytest.mark.parametrize("section, path", [
    ({"routes": {"10.1.0.0": ["tag:r"]}}, "autoApprovers.routes.10.1.0.0"),
    ({"routes": {"bogus": ["tag:r"]}}, "autoApprovers.routes.bogus"),
    ({"routes": {"10.1.0.0/16": ["tag:nope"]}}, "autoApprovers.routes.10.1.0.0/16[0]"),
    ({"routes": {"10.1.0.0/16": ["group:nope"]}}, "autoApprovers.routes.10.1.0.0/16[0]"),
    ({"routes": {"10.1.0.0/16": "tag:r"}}, "autoApprovers.routes.10.1.0.0/16"),
    ({"routes": []}, "autoApprovers.routes"),
    ({"exitNode": ["autogroup:internet"]}, "autoApprovers.exitNode[0]"),
    ({"exit": []}, "autoApprovers.exit"),
])
def test_bad_auto_approvers_are_refused_by_path(section, path):
    with pytest.raises(PolicyError) as e:
        parse_policy(json.dumps({"tagOwners": {"tag:r": []}, "autoApprovers": section}))
    assert path in [err["path"] for err in e.value.errors]


def test_autogroup_internet_reaches_exit_nodes_only():
    text = """{"tagOwners": {"tag:exit": []}, "acls": [
        {"action": "accept", "src": ["alice"], "dst": ["autogroup:internet:*"]},
        {"action": "accept", "src": ["bob"], "dst": ["*:*"]}]}"""
    pol = parse_policy(text)
    assert compile_policy(pol)["format"] == 2 and stored_policy(
        {"compiled": compile_policy(pol)}) == pol
    base = {"approved": True, "expired": False, "key_expiry": None, "endpoints": []}
    nodes = [dict(base, id="a", name="a", node_key="ka", ipv4="100.64.0.1", user="alice", tags=[]),
             dict(base, id="b", name="b", node_key="kb", ipv4="100.64.0.2", user="bob", tags=[]),
             dict(base, id="e", name="e", node_key="ke", ipv4="100.64.0.3", user=None,
                  tags=["tag:exit"], advertised_routes=["0.0.0.0/0", "::/0"],
                  approved_routes=["0.0.0.0/0", "::/0"])]
    m = compute_netmaps(pol, nodes, 0.0, 1)
    assert m["a"].peers["e"].allowed_ips == ("100.64.0.3/32", "0.0.0.0/0", "::/0")
    dests = {(r.src, d.prefix) for r in m["e"].packet_filter for d in r.dst}
    # alice reaches the internet through e; bob's * reaches e itself, not the internet
    assert dests == {(("100.64.0.1/32",), "0.0.0.0/0"), (("100.64.0.1/32",), "::/0"),
                     (("100.64.0.2/32",), "100.64.0.3/32")}
    # not advertised (any more): no exit routes, and alice's rule targets nothing
    nodes[2]["advertised_routes"] = []
    m = compute_netmaps(pol, nodes, 0.0, 2)
    assert "e" not in m["a"].peers and m["e"].peers["b"].allowed_ips == ("100.64.0.2/32",)
