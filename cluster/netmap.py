"""Netmaps: what each node sees (its peers and its inbound packet filter), kept incrementally.

Headscale recomputes every netmap on every change, O(n²), and falls over at a few hundred
nodes. Here each ACL is compiled against each node once (its `Roles`: which ACLs it may
send under, which target it and with what prefixes/ports), reverse indexes map every ACL
to its member nodes, and a change to one node re-derives only that node's peer set and the
entries of the nodes that see it. See docs/netmap-complexity.md.

`compute_netmaps` is the definition, written plainly and O(n²); `NetmapIndex` must always
agree with it (tests check this over random change sequences). Nothing here reads a clock:
the caller passes `now` and tells the index when time advances.
"""
from __future__ import annotations

import bisect
import ipaddress
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Callable, Iterable, NamedTuple

from raftmesh.api.wire import FilterDest, FilterRule, Netmap, NetmapDelta, Peer
from raftmesh.cluster.policy import Acl, Network, NodeView, Policy

_EXPIRY = itemgetter(0)


# -- one node ------------------------------------------------------------------------------
def visible(node: dict, now: float) -> bool:
    """A node exists for the mesh (anyone's netmap, including its own) only when approved,
    not expired by an admin and its key has not expired."""
    expiry = node.get("key_expiry")
    return bool(node.get("approved")) and not node.get("expired") and (
        expiry is None or expiry > now)


def _net_key(n: Network):
    return (n.version, int(n.network_address), n.prefixlen)


def node_view(node: dict) -> NodeView:
    """The policy-relevant part of a node record; unparseable routes are ignored."""
    addrs = tuple(ipaddress.ip_network(f"{a}/{bits}") for a, bits in (
        (node.get("ipv4"), 32), (node.get("ipv6"), 128)) if a)
    routes = set()
    for r in node.get("approved_routes") or ():
        try:
            routes.add(ipaddress.ip_network(r, strict=False))
        except ValueError:
            pass
    return NodeView(node.get("user"), frozenset(node.get("tags") or ()), addrs,
                    tuple(sorted(routes, key=_net_key)))


def peer_record(node: dict, view: NodeView | None = None) -> Peer:
    """How this node appears to others (and to itself, as `self_node`)."""
    view = view or node_view(node)
    addresses = tuple(str(a) for a in view.addresses)
    return Peer(
        id=node["id"], name=node["name"], node_key=node["node_key"], addresses=addresses,
        allowed_ips=addresses + tuple(str(r) for r in view.routes),
        endpoints=tuple(sorted(node.get("endpoints") or ())), key_expiry=node.get("key_expiry"),
        online=bool(node.get("online")), last_seen=node.get("last_seen"),
        user=node.get("user"), tags=tuple(sorted(view.tags)))


@dataclass(frozen=True)
class Roles:
    """One node's part in every ACL (by index), a function of the node and the policy only.

    `src`: ACLs it may send under; `addr_src`: those whose filter sources list its own
    addresses (node selectors, not `*` or CIDRs); `dst`: ACLs targeting it, with what it
    accepts; `self_src`/`self_dst`: the same for autogroup:self, among its user's devices.
    """

    src: frozenset[int] = frozenset()
    addr_src: frozenset[int] = frozenset()
    dst: dict[int, tuple[FilterDest, ...]] = field(default_factory=dict)
    self_src: frozenset[int] = frozenset()
    self_dst: dict[int, tuple[FilterDest, ...]] = field(default_factory=dict)


def node_roles(policy: Policy, view: NodeView) -> Roles:
    src, addr_src, self_src, dst, self_dst = set(), set(), set(), {}, {}
    for i, acl in enumerate(policy.acls):
        matched = [s for s in acl.src if s.matches_node(view)]
        if matched:
            src.add(i)
            if not acl.src_any and any(s.kind in ("users", "member", "tagged", "tag")
                                       for s in matched):
                addr_src.add(i)
        dests, selfs = set(), set()
        for entry in acl.dst:
            if entry.selector.kind == "self":
                if view.owner is not None:
                    selfs.update(FilterDest(str(a), p) for a in view.addresses for p in entry.ports)
            else:
                dests.update(FilterDest(str(n), p) for n in entry.selector.node_prefixes(view)
                             for p in entry.ports)
        if dests:
            dst[i] = tuple(sorted(dests))
        if selfs:
            self_dst[i] = tuple(sorted(selfs))
            if matched:
                self_src.add(i)
    return Roles(frozenset(src), frozenset(addr_src), dst, frozenset(self_src), self_dst)


def src_cidrs(acl: Acl, member_addresses: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    """An ACL's packet-filter sources: `*`, or its raw CIDRs plus the addresses of the
    visible nodes its node selectors match."""
    if acl.src_any:
        return ("*",)
    return tuple(sorted({*acl.src_prefixes, *(a for addrs in member_addresses for a in addrs)}))


def _packet_filter(policy: Policy, roles: Roles, srcs: Callable[[int], tuple],
                   self_srcs: Callable[[int], tuple]) -> tuple[FilterRule, ...]:
    """Inbound rules of one node, in ACL order; rules nobody can match are left out."""
    rules = []
    for i in sorted(roles.dst.keys() | roles.self_dst.keys()):
        protos = policy.acls[i].protos
        if i in roles.dst and (s := srcs(i)):
            rules.append(FilterRule(s, roles.dst[i], protos))
        if i in roles.self_dst and (s := self_srcs(i)):
            rules.append(FilterRule(s, roles.self_dst[i], protos))
    return tuple(rules)


# -- the definition ------------------------------------------------------------------------
def compute_netmaps(policy: Policy | None, nodes: Iterable[dict], now: float,
                    version: int) -> dict[str, Netmap]:
    """Every visible node's netmap from scratch, pairwise: the reference NetmapIndex is
    tested against. Two nodes are peers when either may reach the other (a WireGuard
    session needs both ends to know each other); each filters only its inbound traffic."""
    policy = policy or Policy()
    vis = {n["id"]: n for n in nodes if visible(n, now)}
    views = {k: node_view(n) for k, n in vis.items()}
    roles = {k: node_roles(policy, v) for k, v in views.items()}

    def reach(s: str, d: str) -> bool:
        if roles[s].src & roles[d].dst.keys():
            return True
        owner = views[s].owner
        return owner is not None and owner == views[d].owner and bool(
            roles[s].self_src & roles[d].self_dst.keys())

    addresses = {k: tuple(str(a) for a in v.addresses) for k, v in views.items()}
    srcs = [src_cidrs(acl, [addresses[k] for k in vis if i in roles[k].addr_src])
            for i, acl in enumerate(policy.acls)]

    def self_srcs(i: int, owner: str) -> tuple[str, ...]:
        return tuple(sorted(a for k in vis if views[k].owner == owner
                            and i in roles[k].self_src for a in addresses[k]))

    out = {}
    for k in sorted(vis):
        peers = {p: peer_record(vis[p], views[p]) for p in sorted(vis)
                 if p != k and (reach(k, p) or reach(p, k))}
        pf = _packet_filter(policy, roles[k], srcs.__getitem__,
                            lambda i, o=views[k].owner: self_srcs(i, o))
        out[k] = Netmap(version, peer_record(vis[k], views[k]), peers, pf)
    return out


# -- the incremental index -----------------------------------------------------------------
class Changes(NamedTuple):
    """The result of one change: deltas only for nodes whose netmap changed, and the nodes
    that left the mesh (removed, expired, unapproved), whose streams should be closed."""

    deltas: dict[str, NetmapDelta]
    gone: tuple[str, ...] = ()


NO_CHANGES = Changes({}, ())


class NetmapIndex:
    """All visible nodes' netmaps, kept up to date one change at a time.

    Built once from (policy, node records, now); then `upsert_node`, `remove_node`,
    `replace_policy` and `advance_time` each return `Changes` stamped with the caller's
    state version. A node that appears receives its whole netmap as a delta (apply it to
    an empty netmap). Not thread-safe: the caller serialises changes.
    """

    def __init__(self, policy: Policy | None, nodes: Iterable[dict], now: float):
        self.now = now
        self._nodes: dict[str, dict] = {}  # every known record (a copy), visible or not
        self._expiry: list[tuple[float, str]] = []  # sorted (key_expiry, id)
        self._expiry_of: dict[str, float] = {}
        for n in nodes:
            self._nodes[n["id"]] = dict(n)
            self._track_expiry(n["id"], n.get("key_expiry"))
        self._set_policy(policy)

    # -- queries ---------------------------------------------------------------------------
    @property
    def policy(self) -> Policy:
        return self._policy

    def netmap(self, node_id: str, version: int) -> Netmap | None:
        """The node's full netmap, or None when it is unknown or not visible."""
        if node_id not in self._roles:
            return None
        peers = {p: self._peer[p] for p in sorted(self._peers[node_id])}
        return Netmap(version, self._peer[node_id], peers, self._filter[node_id])

    def is_visible(self, node_id: str) -> bool:
        return node_id in self._roles

    def knows(self, node_id: str) -> bool:
        """The node exists (visible or not)."""
        return node_id in self._nodes

    def visible_ids(self) -> list[str]:
        return sorted(self._roles)

    def next_expiry(self) -> float | None:
        """The earliest key expiry after `now`: when to call `advance_time` next."""
        i = bisect.bisect_right(self._expiry, self.now, key=_EXPIRY)
        return self._expiry[i][0] if i < len(self._expiry) else None

    # -- changes ---------------------------------------------------------------------------
    def upsert_node(self, node: dict, version: int) -> Changes:
        """A node was added or any of its fields changed (pass the whole new record)."""
        nid = node["id"]
        self._nodes[nid] = node = dict(node)  # callers may reuse or mutate their dict
        self._track_expiry(nid, node.get("key_expiry"))
        if nid in self._roles and visible(node, self.now) and node_view(node) == self._views[nid]:
            return self._record_changed(nid, node, version)  # the common case: no ACL impact
        return self._apply([nid], version)

    def remove_node(self, node_id: str, version: int) -> Changes:
        if self._nodes.pop(node_id, None) is None:
            return NO_CHANGES
        self._track_expiry(node_id, None)
        return self._apply([node_id], version)

    def advance_time(self, now: float, version: int) -> Changes:
        """Time moved (either way): nodes whose key expiry was crossed appear or vanish."""
        lo, hi = sorted((self.now, now))
        self.now = now
        a = bisect.bisect_right(self._expiry, lo, key=_EXPIRY)
        b = bisect.bisect_right(self._expiry, hi, key=_EXPIRY)
        ids = [nid for _, nid in self._expiry[a:b]]
        return self._apply(ids, version) if ids else NO_CHANGES

    def replace_policy(self, policy: Policy | None, version: int) -> Changes:
        """Rebuild everything (every role may change), emit deltas only where needed."""
        old = {k: (self._peers[k], self._filter[k]) for k in self._roles}
        self._set_policy(policy)
        deltas = {}
        for k in sorted(self._roles):  # visibility does not depend on the policy
            old_peers, old_filter = old[k]
            peers = self._peers[k]
            pf = self._filter[k]
            d = NetmapDelta(version, tuple(self._peer[p] for p in sorted(peers - old_peers)),
                            tuple(sorted(old_peers - peers)), None if pf == old_filter else pf)
            if not d.is_empty():
                deltas[k] = d
        return Changes(deltas, ())

    # -- internals -------------------------------------------------------------------------
    def _set_policy(self, policy: Policy | None) -> None:
        self._policy = policy = policy or Policy()
        acls = range(len(policy.acls))
        self._views: dict[str, NodeView] = {}  # the visible nodes' views, roles, Peer records
        self._roles: dict[str, Roles] = {}
        self._peer: dict[str, Peer] = {}
        self._peers: dict[str, set[str]] = {}
        self._filter: dict[str, tuple[FilterRule, ...]] = {}
        # reverse indexes: ACL -> visible nodes in each role; user -> their visible devices
        self._src: list[set[str]] = [set() for _ in acls]
        self._dst: list[set[str]] = [set() for _ in acls]
        self._addr: list[set[str]] = [set() for _ in acls]
        self._owned: dict[str, set[str]] = {}
        self._self_src: dict[tuple[int, str], set[str]] = {}
        self._srcs: list[tuple[str, ...]] = [src_cidrs(a, ()) for a in policy.acls]
        self._self_srcs: dict[tuple[int, str], tuple[str, ...]] = {}
        live = [k for k in sorted(self._nodes) if visible(self._nodes[k], self.now)]
        dirty: set = set()
        for k in live:
            self._attach(k, dirty)
        for k in live:
            self._peers[k] = self._reach(k)
        self._refresh_srcs(dirty)
        for k in live:
            self._filter[k] = self._compute_filter(k)

    def _track_expiry(self, nid: str, expiry: float | None) -> None:
        old = self._expiry_of.pop(nid, None)
        if old is not None:
            del self._expiry[bisect.bisect_left(self._expiry, (old, nid))]
        if expiry is not None:
            self._expiry_of[nid] = expiry
            bisect.insort(self._expiry, (expiry, nid))

    def _attach(self, k: str, dirty: set) -> None:
        """Add a visible node to the reverse indexes; note the filter sources it alters."""
        view = node_view(self._nodes[k])
        roles = node_roles(self._policy, view)
        self._views[k], self._roles[k] = view, roles
        self._peer[k] = peer_record(self._nodes[k], view)
        for i in roles.src:
            self._src[i].add(k)
        for i in roles.dst:
            self._dst[i].add(k)
        for i in roles.addr_src:
            self._addr[i].add(k)
            dirty.add(i)
        if view.owner is not None:
            self._owned.setdefault(view.owner, set()).add(k)
            for i in roles.self_src:
                self._self_src.setdefault((i, view.owner), set()).add(k)
                dirty.add((i, view.owner))

    def _detach(self, k: str, dirty: set) -> None:
        view, roles = self._views.pop(k), self._roles.pop(k)
        del self._peer[k], self._filter[k]
        for i in roles.src:
            self._src[i].discard(k)
        for i in roles.dst:
            self._dst[i].discard(k)
        for i in roles.addr_src:
            self._addr[i].discard(k)
            dirty.add(i)
        if view.owner is not None:
            self._owned[view.owner].discard(k)
            for i in roles.self_src:
                self._self_src[(i, view.owner)].discard(k)
                dirty.add((i, view.owner))

    def _reach(self, k: str) -> set[str]:
        """Who k may reach or be reached by: a union of index sets, never a scan of all."""
        roles, owner = self._roles[k], self._views[k].owner
        out: set[str] = set()
        for i in roles.src:
            out |= self._dst[i]
        for i in roles.dst:
            out |= self._src[i]
        if owner is not None:
            if roles.self_src:
                out |= self._owned[owner]
            for i in roles.self_dst:
                out |= self._self_src.get((i, owner), set())
        out.discard(k)
        return out

    def _refresh_srcs(self, dirty: set) -> set[str]:
        """Recompute the filter sources in `dirty`; return the nodes whose filter uses a
        source list that actually changed."""
        stale: set[str] = set()
        for key in dirty:
            if isinstance(key, int):
                new = src_cidrs(self._policy.acls[key],
                                (self._peer[k].addresses for k in self._addr[key]))
                if new != self._srcs[key]:
                    self._srcs[key] = new
                    stale |= self._dst[key]
            else:
                members = self._self_src.get(key, ())
                new = tuple(sorted(a for k in members for a in self._peer[k].addresses))
                if new != self._self_srcs.get(key, ()):
                    self._self_srcs[key] = new
                    stale |= self._owned.get(key[1], set())
        return stale

    def _compute_filter(self, k: str) -> tuple[FilterRule, ...]:
        owner = self._views[k].owner
        return _packet_filter(self._policy, self._roles[k], self._srcs.__getitem__,
                              lambda i: self._self_srcs.get((i, owner), ()))

    def _record_changed(self, k: str, node: dict, version: int) -> Changes:
        """Only the Peer record changed (endpoints, presence, key, name...): tell k's peers."""
        rec = peer_record(node, self._views[k])
        if rec == self._peer[k]:
            return NO_CHANGES
        self._peer[k] = rec
        deltas = {p: NetmapDelta(version, peers_changed=(rec,)) for p in self._peers[k]}
        deltas[k] = NetmapDelta(version, self_node=rec)
        return Changes(dict(sorted(deltas.items())), ())

    def _apply(self, ids: Iterable[str], version: int) -> Changes:
        """Re-derive the nodes in `ids` from their current records: detach the old ones,
        attach the visible ones, then diff only the nodes that saw them before or see them
        now (the only ones whose peers or filter sources can involve them)."""
        changed = set(ids)
        before = sorted(k for k in changed if k in self._roles)
        old_rec = {k: self._peer[k] for k in before}
        old_peers = {k: set(self._peers[k]) for k in before}
        old_filter = {k: self._filter[k] for k in before}
        touched: dict[str, dict[str, bool]] = {}  # other node -> {changed node: was its peer}
        dirty: set = set()
        for k in before:
            for p in self._peers.pop(k):
                self._peers[p].discard(k)
                touched.setdefault(p, {}).setdefault(k, True)
            self._detach(k, dirty)
        after = sorted(k for k in changed if k in self._nodes and visible(self._nodes[k], self.now))
        for k in after:
            self._attach(k, dirty)
        for k in after:
            self._peers[k] = peers = self._reach(k)
            for p in peers:
                self._peers.setdefault(p, set()).add(k)
                touched.setdefault(p, {}).setdefault(k, False)
        new_filter = {}  # nodes that stayed visible and whose filter changed
        for k in self._refresh_srcs(dirty) | set(after):
            old = old_filter.get(k) if k in changed else self._filter[k]
            self._filter[k] = pf = self._compute_filter(k)
            if pf != old:
                new_filter[k] = pf

        deltas = {}
        for k in after:  # the changed nodes themselves
            if k not in old_rec:  # appeared: its whole netmap
                deltas[k] = NetmapDelta(version, tuple(self._peer[p] for p in sorted(self._peers[k])),
                                        (), self._filter[k], self._peer[k])
                continue
            now_peers, was = self._peers[k], old_peers[k]
            deltas[k] = NetmapDelta(
                version, tuple(self._peer[p] for p in sorted(now_peers) if p not in was
                               or old_rec.get(p, self._peer[p]) != self._peer[p]),
                tuple(sorted(was - now_peers)), new_filter.get(k),
                self._peer[k] if self._peer[k] != old_rec[k] else None)
        for p in (touched.keys() | new_filter.keys()) - changed:  # the nodes that see them
            log, now_peers = touched.get(p, {}), self._peers[p]
            deltas[p] = NetmapDelta(
                version, tuple(self._peer[k] for k, was in sorted(log.items()) if k in now_peers
                               and (not was or old_rec.get(k) != self._peer[k])),
                tuple(sorted(k for k, was in log.items() if was and k not in now_peers)),
                new_filter.get(p))
        gone = tuple(k for k in before if k not in self._roles)
        return Changes({k: d for k, d in sorted(deltas.items()) if not d.is_empty()}, gone)
