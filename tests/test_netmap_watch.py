"""Filters derived only for watched nodes (NetmapIndex.watch, `watch_all=False`) must change
nothing an agent can see: a watched node's deltas are exactly the eager index's, every
node's netmap is exactly the eager one whenever asked, and a resume from any version an agent
held elsewhere brings it to exactly the current netmap."""
from __future__ import annotations

import dataclasses
import random

import pytest

from raftmesh.proto.wire import Netmap, apply_delta
from raftmesh.cluster.netmap import NetmapIndex, compute_netmaps
from raftmesh.cluster.netmap_feed import NetmapFeed

from test_netmap import NOW, content, edit_ports, mutate, nudge, pooled_policy, random_node
from test_netmap_feed import POLICIES, World, check_resumes, feed_batches, held_versions, stored


def check_watched_internals(idx: NetmapIndex) -> None:
    """White-box: exactly the watched visible nodes hold cells, registered with their slots."""
    held = {k for k in idx.visible_ids() if k in idx._watched}
    assert idx._filter.keys() == idx._rules.keys() == held
    for s in idx._slots:
        want_d = {k for k in held if s in idx._roles[k].dst}
        want_s = {k for k in held if s in idx._roles[k].self_dst}
        assert s.dcells.keys() == want_d and s.scells.keys() == want_s
        for k, (cells, i, dests) in s.dcells.items():
            assert cells is idx._rules[k][1] and dests == idx._roles[k].dst[s]


def next_policy(rng: random.Random, pol):
    r = rng.random()
    if r < 0.4:
        return edit_ports(rng, pol)  # the propagation benchmark's kind of change
    if r < 0.85:
        return nudge(rng, pol)
    return pooled_policy(rng)


@pytest.mark.parametrize("seed", range(60, 72))
def test_watched_nodes_get_the_eager_deltas_and_every_netmap_is_the_eager_one(seed):
    rng = random.Random(seed)
    now, version = NOW, 1
    pol = pooled_policy(rng)
    nodes = {f"n{i}": random_node(rng, i, now) for i in range(20)}
    eager = NetmapIndex(pol, list(nodes.values()), now)
    lazy = NetmapIndex(pol, list(nodes.values()), now, watch_all=False)
    clients: dict[str, Netmap] = {}  # the watched nodes' agents, from their first netmap on
    unwatched_filters = 0
    for step in range(300):
        if rng.random() < 0.3:  # streams open and close between changes
            k = f"n{rng.randint(0, 40)}"
            if k in clients or (k in lazy._watched and rng.random() < 0.5):
                lazy.unwatch(k, version)
                clients.pop(k, None)
            else:
                lazy.watch(k, version)
                if (nm := lazy.netmap(k, version)) is not None:
                    clients[k] = nm
        version += 1
        op = rng.random()
        if op < 0.2:
            i = rng.randint(0, 40)
            nodes[f"n{i}"] = random_node(rng, i, now)
            changes = [idx.upsert_node(nodes[f"n{i}"], version) for idx in (eager, lazy)]
        elif op < 0.45 and nodes:
            k = rng.choice(sorted(nodes))
            nodes[k] = mutate(rng, nodes[k], now)
            changes = [idx.upsert_node(nodes[k], version) for idx in (eager, lazy)]
        elif op < 0.55 and nodes:
            k = rng.choice(sorted(nodes))
            del nodes[k]
            changes = [idx.remove_node(k, version) for idx in (eager, lazy)]
        elif op < 0.7:
            now += rng.uniform(-15, 25)
            changes = [idx.advance_time(now, version) for idx in (eager, lazy)]
        else:
            pol = next_policy(rng, pol)
            changes = [idx.replace_policy(pol, version) for idx in (eager, lazy)]
        (want, want_gone), (got, got_gone) = changes
        assert got_gone == want_gone
        for k in got_gone:
            clients.pop(k, None)
        for k in lazy._watched:
            assert got.get(k) == want.get(k), (step, k)
        for k, d in got.items():  # an unwatched node's delta is the eager one minus its filter
            if k not in lazy._watched:
                assert d == dataclasses.replace(want[k], packet_filter=None), (step, k)
        unwatched_filters += sum(k not in lazy._watched and d.packet_filter is not None
                                 for k, d in want.items())
        for k, d in got.items():
            if k in lazy._watched:
                base = clients.get(k) or Netmap(0, d.self_node)
                clients[k] = apply_delta(base, d)
        ref = compute_netmaps(pol, nodes.values(), now, version)
        assert lazy.visible_ids() == eager.visible_ids() == sorted(ref)
        for k, nm in ref.items():
            assert lazy.netmap(k, version) == nm == eager.netmap(k, version), (step, k)
            if k in clients:
                assert content(clients[k]) == content(nm), (step, k)
        assert set(clients) == {k for k in ref if k in lazy._watched}
        check_watched_internals(lazy)
    assert unwatched_filters > 0  # filter work was left out, not absent from the sequence


@pytest.mark.parametrize("seed", range(30))
def test_resume_from_any_held_version_on_a_feed_watching_some_nodes(seed):
    """Agents stream from eager feed `a`; feed `b` watches a random, changing set of nodes
    (streams open and close on it). From every version an agent held, `b`'s resume gives
    exactly `a`'s current netmap: a delta when its history can, a full netmap when the
    node was unwatched across a filter change. Agents streaming from `b` track it too."""
    world = World(seed)
    items = [world.step() for _ in range(80)]
    a = NetmapFeed(stored(POLICIES[0]), [], NOW, 10)
    b = NetmapFeed(stored(POLICIES[0]), [], NOW, 10, watch_all=False)
    held = held_versions(a, items, random.Random(seed))
    rng = random.Random(seed + 7)
    on_b: dict[str, Netmap] = {}
    for update in feed_batches(b, items, random.Random(seed + 1)):
        for k, d in update.deltas.items():
            if k in on_b and k not in update.gone:
                on_b[k] = apply_delta(on_b[k], d)
        for k in update.gone:
            on_b.pop(k, None)
        for k in b.index.visible_ids():
            if k in on_b and rng.random() < 0.2:
                b.unwatch(k)
                del on_b[k]
            elif k not in on_b and rng.random() < 0.2:
                b.watch(k)
                on_b[k] = b.full(k)
        for k, nm in on_b.items():
            assert content(nm) == content(b.full(k)), (seed, k, b.version)
    assert a.version == b.version
    assert check_resumes(a, b, held, seed) or not held  # history serves resumes where it can
