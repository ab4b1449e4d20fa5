"""NetmapFeed: committed commands -> deltas, the replicated clock, and resuming anywhere.

The property that matters: two replicas fed the same log in different batches derive the
same netmaps, and an agent holding version V from either one resumes on the other with
a delta (or full netmap) that brings it exactly to the current netmap.
"""
from __future__ import annotations

import json
import random
import typing
from dataclasses import MISSING, fields

from raftmesh.proto.wire import Netmap, NetmapDelta, apply_delta
from raftmesh.cluster.commands import COMMANDS, Command
from raftmesh.cluster.netmap import compute_netmaps
from raftmesh.cluster.netmap_feed import NetmapFeed
from raftmesh.cluster.policy import parse_policy
from raftmesh.cluster.policy_form import compile_policy

from test_netmap import NOW, node

POLICIES = [
    json.dumps({"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}),
    json.dumps({"groups": {"group:eng": ["alice"]}, "tagOwners": {"tag:db": []},
                "acls": [{"action": "accept", "src": ["group:eng"], "dst": ["tag:db:5432"]},
                         {"action": "accept", "src": ["autogroup:member"],
                          "dst": ["autogroup:self:*"]}]}),
    json.dumps({"acls": [{"action": "accept", "src": ["bob"], "dst": ["alice:22"]}]}),
]


def ok(value) -> dict:
    return {"ok": True, "value": value}


def record(op: str, args: dict, time: float) -> Command:
    """A valid `op` record: the feed reads its kind, its time and the fields it names;
    required arguments not given here get placeholders."""
    cls = COMMANDS[op]
    hints = typing.get_type_hints(cls)
    placeholders = {f.name: [] if typing.get_origin(hints[f.name]) is list else "x"
                    for f in fields(cls) if f.default is MISSING}
    return cls(**placeholders | args, time=time)


def stored(text: str, compiled: bool = True) -> dict:
    """policy.set's args (and so the stored record) for `text`: as the API proposes it, or
    only the text, as journals written before the compiled form hold it."""
    if not compiled:
        return {"text": text}
    return {"text": text, "compiled": compile_policy(parse_policy(text))}

class World:
    """A random log of node and policy commands, with the state it produces."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.nodes: dict[str, dict] = {}
        self.policy = POLICIES[0]
        self.clock = NOW
        self.version = 10
        self.next_id = 0

    def step(self) -> tuple[int, Command, dict]:
        self.version += self.rng.choice((1, 1, 2))  # gaps: barriers never reach the feed
        self.clock += self.rng.choice((0.0, 1.0, 5.0))
        r = self.rng.random()
        live = sorted(self.nodes)
        if r < 0.3 or not live:
            self.next_id += 1
            i = self.next_id
            n = node(i, user=self.rng.choice(("alice", "bob")),
                     tags=self.rng.choice(((), (), ("tag:db",))),
                     key_expiry=self.rng.choice((None, self.clock + self.rng.choice((3, 20, 400)))))
            self.nodes[n["id"]] = n
            return self.version, record("node.register", {}, time=self.clock), ok(n)
        if r < 0.4:
            self.policy = self.rng.choice(POLICIES)
            args = stored(self.policy, compiled=self.version % 2 == 0)  # both kinds of entry
            return self.version, record("policy.set", args, time=self.clock), ok({})
        nid = self.rng.choice(live)
        if r < 0.5:
            del self.nodes[nid]
            return self.version, record("node.delete", {"id": nid}, time=self.clock), ok({})
        if r < 0.55:  # a rejected command changes nothing, not even the clock
            return self.version, record("node.update", {}, time=self.clock + 1e6), {"ok": False}
        n = dict(self.nodes[nid])
        kind = self.rng.choice(("endpoints", "expire", "online", "tags", "reauth"))
        if kind == "endpoints":
            n["endpoints"] = [f"203.0.113.{self.rng.randrange(1, 250)}:41641"]
        elif kind == "expire":
            n.update(expired=True, key_expiry=self.clock)
        elif kind == "online":
            n["online"] = not n.get("online")
        elif kind == "tags":
            n["tags"] = [] if n["tags"] else ["tag:db"]
            n["user"] = None if n["tags"] else "alice"
        else:
            n.update(expired=False, key_expiry=None)
        self.nodes[nid] = n
        return self.version, record("node.update", {}, time=self.clock), ok(n)

    def expected(self, version: int, clock: float) -> dict[str, Netmap]:
        return compute_netmaps(parse_policy(self.policy), self.nodes.values(), clock, version)


def feed_batches(feed: NetmapFeed, items, rng: random.Random):
    """Feed `items` in random batch sizes; yield after each batch."""
    i = 0
    while i < len(items):
        n = rng.randint(1, 4)
        yield feed.apply_batch(items[i:i + n])
        i += n


def test_feed_agrees_with_the_reference_after_every_batch():
    for seed in range(20):
        world = World(seed)
        feed = NetmapFeed(stored(world.policy), [], NOW, world.version)
        rng = random.Random(seed + 100)
        for _ in range(12):
            items = [world.step() for _ in range(rng.randint(1, 5))]
            feed.apply_batch(items)
            want = world.expected(feed.version, feed.clock)
            got = {k: feed.full(k) for k in feed.index.visible_ids()}
            assert got == want, f"seed {seed} at version {feed.version}"


def held_versions(feed: NetmapFeed, items, rng: random.Random) -> dict[str, list[Netmap]]:
    """Feed `items` to `feed`: every netmap the agents streaming from it held, per node."""
    held: dict[str, list[Netmap]] = {}
    for update in feed_batches(feed, items, rng):
        for k, d in update.deltas.items():
            if k in update.gone:
                held.pop(k, None)
            elif k in held:
                held[k].append(apply_delta(held[k][-1], d))
            elif feed.full(k) is not None:
                held[k] = [feed.full(k)]
        for k in update.gone:
            held.pop(k, None)
    return held


def test_agents_resume_on_another_replica_from_any_version_they_held():
    for seed in range(30):
        world = World(seed)
        items = [world.step() for _ in range(60)]
        a = NetmapFeed(stored(POLICIES[0]), [], NOW, 10)
        b = NetmapFeed(stored(POLICIES[0]), [], NOW, 10, history_per_node=4)
        held = held_versions(a, items, random.Random(seed))  # what agents streaming from `a` held
        for _ in feed_batches(b, items, random.Random(seed + 1)):
            pass
        assert a.version == b.version and a.clock == b.clock
        check_resumes(a, b, held, seed)


def check_resumes(a: NetmapFeed, b: NetmapFeed, held: dict[str, list[Netmap]], seed: int) -> int:
    """From every version an agent of `a` held, `b`'s resume brings it to exactly `a`'s
    current netmap; returns how many of those resumes were deltas (not full netmaps)."""
    deltas = 0
    for k, versions in held.items():
        final = b.full(k)
        assert final == a.full(k)
        for old in versions:
            got = b.resume(k, old.version)
            if got is None:
                continue
            deltas += isinstance(got, NetmapDelta)
            result = got if isinstance(got, Netmap) else apply_delta(old, got)
            assert result == final, f"seed {seed} node {k} from version {old.version}"
    return deltas


def test_resume_without_version_ahead_or_too_old_gives_a_full_netmap():
    n1, n2 = node(1, "alice"), node(2, "bob")
    feed = NetmapFeed(stored(POLICIES[0]), [n1, n2], NOW, 5, history_per_node=2)
    assert isinstance(feed.resume("n1", None), Netmap)
    assert isinstance(feed.resume("n1", 4), Netmap)  # from before the feed started
    assert isinstance(feed.resume("n1", 99), Netmap)  # ahead: the caller waits first
    nothing = feed.resume("n1", 5)
    assert isinstance(nothing, NetmapDelta) and nothing.is_empty() and nothing.version == 5
    for v in (6, 7, 8):
        feed.apply_batch([(v, record("node.report", {}, time=NOW), ok(dict(n2, endpoints=[f"192.0.2.{v}:1"])))])
    assert isinstance(feed.resume("n1", 6), NetmapDelta)
    assert isinstance(feed.resume("n1", 5), Netmap)  # its history holds only 2 deltas
    assert feed.resume("n9", None) is None


def test_revocation_and_expiry_by_the_replicated_clock():
    n1, n2 = node(1, "alice"), node(2, "bob", key_expiry=NOW + 60)
    feed = NetmapFeed(stored(POLICIES[0]), [n1, n2], NOW, 5)
    assert feed.next_expiry() == NOW + 60
    u = feed.apply_batch([(6, record("clock.tick", {}, time=NOW + 30), ok({}))])
    assert u.deltas == {} and not u.gone
    u = feed.apply_batch([(7, record("clock.tick", {}, time=NOW + 61), ok({}))])
    assert u.gone == {"n2"} and u.deltas["n1"].peers_removed == ("n2",)
    assert feed.resume("n2", 6) is None
    u = feed.apply_batch([(8, record("node.delete", {"id": "n1"}, time=NOW + 62), ok({}))])
    assert u.gone == {"n1"} and "n1" not in feed._history
    # a replayed idempotent write or a rejected one moves nothing
    u = feed.apply_batch([(9, record("clock.tick", {}, time=NOW + 1e6), {"ok": True, "replayed": True})])
    assert feed.clock == NOW + 62 and u.version == 9


def test_cluster_key_commands_are_flagged_and_cause_times_kept():
    feed = NetmapFeed(stored(POLICIES[0]), [node(1, "alice"), node(2, "bob")], NOW, 1)
    u = feed.apply_batch([(2, record("clusterkey.rotate", {}, time=NOW), ok({})),
                          (3, record("node.report", {}, time=NOW + 1),
                           ok(node(2, "bob", endpoints=["192.0.2.9:1"]))),
                          (4, record("node.report", {}, time=NOW + 2),
                           ok(node(2, "bob", endpoints=["192.0.2.8:1"])))])
    assert u.keys_changed and u.cause_time["n1"] == NOW + 1
    assert u.deltas["n1"].version == 4 and u.deltas["n1"].peers_changed[0].endpoints == ("192.0.2.8:1",)


def test_member_removal_sends_the_offline_records_it_swept():
    n1, n2 = node(1, "alice", online=True), node(2, "alice", online=True)
    feed = NetmapFeed(stored(POLICIES[0]), [n1, n2], NOW, 10)
    u = feed.apply_batch([(11, record("member.remove", {"id": "r3"}, time=NOW),
                           ok({"member": {"id": "r3"}, "nodes": [dict(n1, online=False)]}))])
    assert [p.online for p in u.deltas["n2"].peers_changed] == [False]
    assert feed.full("n2").peers["n1"].online is False


def test_only_batches_that_cannot_change_a_netmap_skip_the_feed_thread():
    """The hub applies such batches on its event loop (api/map_stream.py); anything a
    netmap is derived from, a key command or a key expiry reached must not qualify, and
    the fast path must leave the feed where apply_batch would."""
    nodes = [node(1, "alice"), node(2, "bob", key_expiry=NOW + 10)]
    feed = NetmapFeed(stored(POLICIES[0]), nodes, NOW, 1)
    reference = NetmapFeed(stored(POLICIES[0]), nodes, NOW, 1)
    user = (2, record("user.create", {"name": "carol"}, time=NOW + 1), ok({"name": "carol"}))
    for op in ("node.update", "node.delete", "node.presence", "policy.set", "member.remove",
               "clusterkey.rotate"):
        assert not feed.apply_if_only_time([user, (3, record(op, {}, time=NOW + 1), ok({}))]), op
        assert (feed.version, feed.clock) == (1, NOW), "a refused batch changes nothing"
    late = (3, record("user.create", {"name": "dave"}, time=NOW + 10), ok({"name": "dave"}))
    assert not feed.apply_if_only_time([user, late])  # n2's key expires at that time
    refused = (3, record("user.create", {"name": "x"}, time=NOW + 5), {"ok": False})
    assert feed.apply_if_only_time([user, refused])
    reference.apply_batch([user, refused])
    assert (feed.version, feed.clock) == (reference.version, reference.clock) == (3, NOW + 1)
    assert feed.apply_if_only_time([user]), "already applied: skipped"
    assert (feed.version, feed.clock) == (3, NOW + 1)
    u = feed.apply_batch([(4, late[1], late[2])])
    assert u.gone == {"n2"} and set(u.deltas) == {"n1"}  # what the thread path derives


def test_a_policy_it_cannot_interpret_changes_no_netmap_and_says_why():
    """Never deny-all: the feed keeps the last netmaps it derived, makes no deltas for that
    change, and names the policy version and the reason until a readable policy arrives."""
    nodes = [node(1, "alice"), node(2, "bob")]
    feed = NetmapFeed(stored(POLICIES[0]), nodes, NOW, 10)
    before = {k: feed.full(k).peers for k in ("n1", "n2")}
    newer = {"text": "{}", "compiled": {**stored(POLICIES[2])["compiled"], "format": 3}}
    broken = {"text": "{}", "compiled": {"format": 1, "selectors": [], "acls": [["nonsense"]]}}
    for v, args in ((11, newer), (12, broken), (13, {"text": "{not json"})):
        u = feed.apply_batch([(v, record("policy.set", args, time=NOW), ok({"version": v - 9}))])
        assert u.deltas == {} and feed.version == v
        assert {k: feed.full(k).peers for k in ("n1", "n2")} == before
        assert feed.policy_problem.startswith(f"cannot interpret policy version {v - 9} "
                                              f"(state version {v}): ")
    assert "format 3; this raftmesh reads formats 1 and 2" in \
        NetmapFeed(newer, nodes, NOW, 11).policy_problem
    u = feed.apply_batch([(14, record("policy.set", stored(POLICIES[2]), time=NOW), ok({}))])
    assert feed.policy_problem is None and set(u.deltas) == {"n1", "n2"}


def test_a_feed_built_from_a_policy_it_cannot_interpret_serves_nothing_until_one_it_can():
    nodes = [node(1, "alice"), node(2, "bob")]
    newer = {"text": "{}", "compiled": {"format": 2}, "version": 3}
    feed = NetmapFeed(newer, nodes, NOW, 10)
    assert not feed.serving and "policy version 3" in feed.policy_problem
    assert NetmapFeed(None, nodes, NOW, 10).serving  # no policy at all: deny all, as ever
    feed.apply_batch([(11, record("policy.set", stored(POLICIES[0]), time=NOW), ok({}))])
    assert feed.serving and feed.policy_problem is None and "n2" in feed.full("n1").peers


def test_registrations_applied_together_are_one_change_with_the_same_result():
    """Runs of node.register in one batch go through the index as one change
    (NetmapFeed._registrations): agents applying its deltas hold what they would have held
    had each registration come in its own batch, and the reference's netmaps."""
    for seed in range(12):
        rng = random.Random(seed)
        policy = rng.choice(POLICIES)
        items, version, clock = [], 10, NOW
        for i in range(rng.randint(8, 40)):
            version += 1
            clock += rng.choice((0.0, 0.0, 2.0))
            n = node(i, user=rng.choice(("alice", "bob")), tags=rng.choice(((), ("tag:db",))),
                     key_expiry=rng.choice((None, clock + rng.choice((1, 3, 400)))))
            result = ok(n) if rng.random() < 0.9 else {"ok": False}
            items.append((version, record("node.register", {}, time=clock), result))
        together = NetmapFeed(stored(policy), [], NOW, 10)
        apart = NetmapFeed(stored(policy), [], NOW, 10)
        clients: dict[str, Netmap] = {}
        cut = rng.randint(1, len(items))
        for update in (together.apply_batch(items[:cut]), together.apply_batch(items[cut:])):
            for k, d in update.deltas.items():
                clients[k] = apply_delta(clients.get(k) or Netmap(0, d.self_node), d)
            for k in update.gone:
                clients.pop(k, None)
        held: dict[str, list[Netmap]] = {}  # what agents streaming from `apart` held
        for item in items:
            update = apart.apply_batch([item])
            for k in update.deltas:
                if k not in update.gone and apart.full(k) is not None:
                    held.setdefault(k, []).append(apart.full(k))
            for k in update.gone:
                held.pop(k, None)
        assert together.version == apart.version and together.clock == apart.clock
        for k, versions in held.items():  # each resumes on the replica that batched them
            for old in versions:
                got = together.resume(k, old.version)
                result = got if isinstance(got, Netmap) else apply_delta(old, got)
                assert result == together.full(k), f"seed {seed} node {k} from {old.version}"
        nodes = [r["value"] for _, _, r in items if r["ok"]]
        want = compute_netmaps(parse_policy(policy), nodes, together.clock, together.version)
        assert {k: together.full(k) for k in together.index.visible_ids()} == want
        assert {k: apart.full(k) for k in apart.index.visible_ids()} == want
        assert {k: nm.peers for k, nm in clients.items()} == {k: nm.peers for k, nm in want.items()}
        assert {k: nm.packet_filter for k, nm in clients.items()} == \
            {k: nm.packet_filter for k, nm in want.items()}
