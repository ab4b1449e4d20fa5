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
import dataclasses
import ipaddress
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from typing import Callable, Container, Iterable, NamedTuple

from raftmesh.proto.wire import FilterDest, FilterRule, Netmap, NetmapDelta, Peer, node_addresses
from raftmesh.cluster.policy import NODE_KINDS, Acl, Network, NodeView, Policy, Selector
from raftmesh.cluster.routes import exit_routes

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
    """The policy-relevant part of a node record; unparseable routes are ignored, and so
    are exit routes: only autogroup:internet reaches those, not `*` or a prefix."""
    addrs = tuple(ipaddress.ip_network(a) for a in node_addresses(node))
    routes = set()
    for r in node.get("approved_routes") or ():
        try:
            net = ipaddress.ip_network(r, strict=False)
        except ValueError:
            continue
        if net.prefixlen:
            routes.add(net)
    return NodeView(node.get("user"), frozenset(node.get("tags") or ()), addrs,
                    tuple(sorted(routes, key=_net_key)), frozenset(node.get("idp_groups") or ()),
                    tuple(ipaddress.ip_network(r) for r in exit_routes(node)))


def peer_record(node: dict, view: NodeView | None = None) -> Peer:
    """How this node appears to itself (`self_node`) and, before `with_routes_shown` keeps a
    viewer's share of them, to others: its AllowedIPs carry the routes it is the primary
    router for (cluster/routes.py) and the exit routes it offers, which a client uses only
    for the exit node it selected."""
    view = view or node_view(node)
    addresses = view.address_texts
    standby = node.get("standby_routes") or ()
    return Peer(
        id=node["id"], name=node["name"], node_key=node["node_key"], addresses=addresses,
        allowed_ips=addresses + tuple(t for r in view.routes if (t := str(r)) not in standby)
        + tuple(exit_routes(node)),
        endpoints=tuple(sorted(node.get("endpoints") or ())), key_expiry=node.get("key_expiry"),
        online=bool(node.get("online")), last_seen=node.get("last_seen"),
        user=node.get("user"), tags=tuple(sorted(view.tags)))


def with_routes_shown(rec: Peer, shown: frozenset[str]) -> Peer:
    """`rec` as one viewer gets it: of the routes it carries, only those in `shown` (the
    record itself when it keeps them all, so that viewers share it)."""
    routes = rec.allowed_ips[len(rec.addresses):]
    if all(r in shown for r in routes):
        return rec
    return dataclasses.replace(rec, allowed_ips=rec.addresses + tuple(
        r for r in routes if r in shown))


def shown_routes(sends: Container, receives: Container, route_dst: dict,
                 route_src: dict) -> frozenset[str]:
    """Which routes of a router a viewer may exchange traffic with, from the viewer's ACLs
    (`sends` under, `receives` under) and the router's routes per ACL as destination and as
    source: a route is shown when an ACL lets the viewer reach it, or lets it reach the
    viewer (the replies, or the traffic, arrive through the router). As Tailscale and
    Headscale do; nobody else sees it, not even a peer of the router for its own sake."""
    out: set[str] = set()
    for acl, routes in route_dst.items():
        if acl in sends:
            out |= routes
    for acl, routes in route_src.items():
        if acl in receives:
            out |= routes
    return frozenset(out)


@dataclass(frozen=True)
class Roles:
    """One node's part in every ACL (by index), a function of the node and the policy only.

    `src`: ACLs it may send under; `addr_src`: those whose filter sources list its own
    addresses (node selectors, not `*` or CIDRs); `dst`: ACLs targeting it, with what it
    accepts; `self_src`/`self_dst`: the same for autogroup:self, among its user's devices;
    `route_src`/`route_dst`: its routes each ACL names as a source / destination.
    """

    src: frozenset[int] = frozenset()
    addr_src: frozenset[int] = frozenset()
    dst: dict[int, tuple[FilterDest, ...]] = field(default_factory=dict)
    self_src: frozenset[int] = frozenset()
    self_dst: dict[int, tuple[FilterDest, ...]] = field(default_factory=dict)
    route_src: dict[int, frozenset[str]] = field(default_factory=dict)
    route_dst: dict[int, frozenset[str]] = field(default_factory=dict)


def _acl_role(acl: Acl, view: NodeView, text: Callable[[Network], str] = str) -> tuple | None:
    """One ACL's part in a node's `Roles`: (sends, lists_addresses, dst, self_dst, self_src,
    route_src, route_dst), or None when the node plays no part in it. Shared by `node_roles`
    and the index (which passes a cached `text`: formatting IPv6 networks dominated the
    index build)."""
    matched = [s for s in acl.src if s.matches_node(view)]
    dests, selfs, route_dst = _acl_dests(acl, view, text)
    if not (matched or dests or selfs):
        return None
    addr = bool(matched) and not acl.src_any and any(
        s.kind in NODE_KINDS for s in matched)
    route_src = frozenset(text(r) for s in matched for r in s.routes_named(view)) \
        if view.routes or view.exit_routes else _NONE
    return (bool(matched), addr, dests, selfs, bool(matched) and bool(selfs), route_src,
            route_dst)


def _acl_dests(acl: Acl, view: NodeView,
               text: Callable[[Network], str] = str) -> tuple[tuple, tuple, frozenset]:
    """What the node accepts under `acl`: (dst, self_dst, route_dst) as in `_acl_role`, whose
    source matching (prefix tests above all) a port edit need not redo
    (NetmapIndex._retarget; an edit that keeps every destination's ports non-empty leaves
    route_dst as it was)."""
    dests, selfs = set(), set()
    routed = bool(view.routes or view.exit_routes)
    route_dst: set[str] = set()
    for entry in acl.dst:
        sel = entry.selector
        if sel.kind == "self":
            if view.owner is not None:
                selfs.update(FilterDest(t, p) for t in view.address_texts for p in entry.ports)
        elif sel.kind in NODE_KINDS:  # node_prefixes would be all of its own addresses
            if sel.matches_node(view):
                dests.update(FilterDest(t, p) for t in view.address_texts for p in entry.ports)
        else:
            dests.update(FilterDest(text(n), p) for n in sel.node_prefixes(view)
                         for p in entry.ports)
            if routed and entry.ports:
                route_dst.update(map(text, sel.routes_named(view)))
    return tuple(sorted(dests)), tuple(sorted(selfs)), frozenset(route_dst)


def node_roles(policy: Policy, view: NodeView) -> Roles:
    src, addr_src, self_src, dst, self_dst, route_src, route_dst = \
        set(), set(), set(), {}, {}, {}, {}
    for i, acl in enumerate(policy.acls):
        role = _acl_role(acl, view)
        if role is None:
            continue
        sends, addr, dests, selfs, self_sends, routes_from, routes_to = role
        if routes_from:
            route_src[i] = routes_from
        if routes_to:
            route_dst[i] = routes_to
        if sends:
            src.add(i)
        if addr:
            addr_src.add(i)
        if dests:
            dst[i] = dests
        if selfs:
            self_dst[i] = selfs
        if self_sends:
            self_src.add(i)
    return Roles(frozenset(src), frozenset(addr_src), dst, frozenset(self_src), self_dst,
                 route_src, route_dst)


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
                    version: int, dns: dict | None = None) -> dict[str, Netmap]:
    """Every visible node's netmap from scratch, pairwise: the reference NetmapIndex is
    tested against. Two nodes are peers when either may reach the other (a WireGuard
    session needs both ends to know each other); each filters only its inbound traffic.
    A router's routes are in its record as each peer gets it only as `shown_routes` says."""
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

    records = {k: peer_record(vis[k], views[k]) for k in vis}

    def seen(k: str, p: str) -> Peer:
        return with_routes_shown(records[p], shown_routes(roles[k].src, roles[k].dst,
                                                     roles[p].route_dst, roles[p].route_src))

    out = {}
    for k in sorted(vis):
        peers = {p: seen(k, p) for p in sorted(vis) if p != k and (reach(k, p) or reach(p, k))}
        pf = _packet_filter(policy, roles[k], srcs.__getitem__,
                            lambda i, o=views[k].owner: self_srcs(i, o))
        out[k] = Netmap(version, records[k], peers, pf, dns)
    return out


# -- the incremental index -----------------------------------------------------------------
class Changes(NamedTuple):
    """The result of one change: deltas only for nodes whose netmap changed, and the nodes
    that left the mesh (removed, expired, unapproved), whose streams should be closed.

    `deltas` is in no particular order (it used to be in id order; nothing relied on that,
    and ordering up to 10,000 ids cost 10-15% of a change at 10,000 nodes). Each delta's
    own lists (peers_changed, peers_removed) are in id order, as the wire format has them."""

    deltas: dict[str, NetmapDelta]
    gone: tuple[str, ...] = ()


NO_CHANGES = Changes({}, ())


class _Slot:
    """One ACL of the current policy and its reverse indexes over the visible nodes.

    A policy change keeps the slot (and so its indexes) of every ACL it keeps, compared by
    value, wherever the ACL moves: only added and removed ACLs cost work. The filter source
    list is kept incrementally (`counts` per address, `addrs` sorted and distinct), never
    rebuilt and re-sorted from its members; `srcs` is the tuple every target's rule shares.
    """

    __slots__ = ("acl", "pos", "protos", "src", "dst", "counts", "addrs", "srcs",
                 "self_src", "self_dst", "self_srcs", "outsiders", "dcells", "scells",
                 "changed_at")

    def __init__(self, acl: Acl):
        self.acl, self.pos, self.protos = acl, 0, acl.protos
        # Without prefix selectors, whether a node plays any part in the ACL depends only
        # on its owner, tags, routes (exit routes too) and having addresses: remember the
        # kinds of node that play none, most (node, ACL) pairs at build or policy change.
        self.outsiders: set | None = None if any(
            sel.kind == "prefix" for sel in (*acl.src, *(d.selector for d in acl.dst))) else set()
        self.src: set[str] = set()  # visible nodes that may send under it
        self.dst: set[str] = set()  # visible nodes it targets (other than autogroup:self)
        prefixes = acl.src_prefixes
        self.counts: dict[str, int] = dict.fromkeys(prefixes, 1)
        self.addrs: list[str] | None = None  # None while filling a new slot: sorted once

        self.srcs: tuple[str, ...] = ("*",) if acl.src_any else tuple(prefixes)
        self.self_src: dict[str, set[str]] = {}  # owner -> their devices that send under it
        self.self_dst: dict[str, set[str]] = {}  # owner -> their devices it targets via self
        self.self_srcs: dict[str, tuple[str, ...]] = {}  # owner -> the self rule's sources
        # target -> (its cell list, index of this ACL's dst / self cell in it, the rule's
        # destinations): what a changed source list rewrites, without per-target lookups.
        # Kept by NetmapIndex._build_filter (which (re)builds a node's cells) and _detach.
        self.dcells: dict[str, tuple[list, int, tuple]] = {}
        self.scells: dict[str, tuple[list, int, tuple]] = {}
        # the last version its rule changed for every target (its sources, or its ports by
        # a port edit): what an unwatched target, holding no cells, was not told
        self.changed_at = -1

    def add_addresses(self, addrs: Iterable[str]) -> bool:
        """Count a member's addresses in; True when the distinct list grew."""
        grew = False
        for a in addrs:
            c = self.counts.get(a, 0)
            self.counts[a] = c + 1
            if not c and self.addrs is not None:
                bisect.insort(self.addrs, a)
                grew = True
        return grew

    def publish(self) -> None:
        """Fix the sources of a newly filled slot (its members are all counted in)."""
        self.addrs = sorted(self.counts)
        if not self.acl.src_any:
            self.srcs = tuple(self.addrs)

    def remove_addresses(self, addrs: Iterable[str]) -> bool:
        shrank = False
        for a in addrs:
            c = self.counts[a] - 1
            if c:
                self.counts[a] = c
            else:
                del self.counts[a]
                del self.addrs[bisect.bisect_left(self.addrs, a)]
                shrank = True
        return shrank


class _SlotFinder:
    """The slots a node may play a part in, found from what their selectors name (a user, a
    tag, a prefix) instead of trying every slot: a 20,000-rule policy made every node's
    roles try every rule, 20-28 s per policy change on each replica (with 100 nodes), on
    the feed thread. A superset of the slots `_acl_role` finds a part in, in slot order."""

    def __init__(self, slots: list[_Slot]):
        self.slots = slots
        self.everyone: list[int] = []  # `*`
        self.owned: list[int] = []  # autogroup:member and autogroup:self: any user's device
        self.tagged: list[int] = []  # autogroup:tagged
        self.by_user: dict[str, list[int]] = {}
        self.by_tag: dict[str, list[int]] = {}
        self.by_group: dict[str, list[int]] = {}  # group:idp/<name>
        self.exits: list[int] = []  # autogroup:internet: exit nodes
        by_prefix: dict[Network, tuple[Selector, list[int]]] = {}
        for i, slot in enumerate(slots):
            for sel in (*slot.acl.src, *(d.selector for d in slot.acl.dst)):
                k = sel.kind
                if k == "any":
                    self.everyone.append(i)
                elif k in ("member", "self"):
                    self.owned.append(i)
                elif k == "tagged":
                    self.tagged.append(i)
                elif k == "users":
                    for u in sel.users:
                        self.by_user.setdefault(u, []).append(i)
                elif k == "tag":
                    self.by_tag.setdefault(sel.tag, []).append(i)
                elif k == "idp_group":
                    self.by_group.setdefault(sel.group, []).append(i)
                elif k == "internet":
                    self.exits.append(i)
                elif k == "prefix":
                    by_prefix.setdefault(sel.prefix, (sel, []))[1].append(i)
        # one selector per distinct prefix: as a source or a destination, a prefix concerns
        # a node exactly when it `matches_node` (an address within, a route overlapping)
        self.prefixes = list(by_prefix.values())

    def candidates(self, view: NodeView) -> list[_Slot]:
        found = set(self.everyone)
        if view.owner is not None:
            found.update(self.owned)
            found.update(self.by_user.get(view.owner, ()))
            for g in view.groups:
                found.update(self.by_group.get(g, ()))
        if view.tags:
            found.update(self.tagged)
            for t in view.tags:
                found.update(self.by_tag.get(t, ()))
        if view.exit_routes:
            found.update(self.exits)
        for sel, ords in self.prefixes:
            if sel.matches_node(view):
                found.update(ords)
        return [self.slots[i] for i in sorted(found)]


class _Roles:
    """`Roles` keyed by slot instead of ACL index, mutable so that a policy change only
    edits the slots it adds or removes."""

    __slots__ = ("src", "addr_src", "dst", "self_src", "self_dst", "route_src", "route_dst")

    def __init__(self):
        self.src: set[_Slot] = set()
        self.addr_src: set[_Slot] = set()
        self.dst: dict[_Slot, tuple[FilterDest, ...]] = {}
        self.self_src: set[_Slot] = set()
        self.self_dst: dict[_Slot, tuple[FilterDest, ...]] = {}
        self.route_src: dict[_Slot, frozenset[str]] = {}
        self.route_dst: dict[_Slot, frozenset[str]] = {}

    def add(self, slots: Iterable[_Slot], view: NodeView) -> bool:
        """Compile `slots` for this node; True when it plays a part in any of them."""
        part = False
        kind = (view.owner, view.tags, view.routes, bool(view.addresses), view.groups,
                view.exit_routes)
        text = _prefix_text
        for s in slots:
            if s.outsiders is not None and kind in s.outsiders:
                continue
            role = _acl_role(s.acl, view, text)
            if role is None:
                if s.outsiders is not None:
                    s.outsiders.add(kind)
                continue
            part = True
            sends, addr, dests, selfs, self_sends, routes_from, routes_to = role
            if routes_from:
                self.route_src[s] = routes_from
            if routes_to:
                self.route_dst[s] = routes_to
            if sends:
                self.src.add(s)
            if addr:
                self.addr_src.add(s)
            if dests:
                self.dst[s] = dests
            if selfs:
                self.self_dst[s] = selfs
            if self_sends:
                self.self_src.add(s)
        return part

    def drop(self, s: _Slot) -> None:
        self.src.discard(s)
        self.addr_src.discard(s)
        self.dst.pop(s, None)
        self.self_src.discard(s)
        self.self_dst.pop(s, None)
        self.route_src.pop(s, None)
        self.route_dst.pop(s, None)


_POS = attrgetter("pos")
_TEXTS: dict[Network, str] = {}
MAX_TEXTS = 1 << 18  # formatted prefixes kept; the cache starts over beyond this


def _prefix_text(n: Network) -> str:
    """`str(n)`, cached across calls: a node's own prefixes are formatted again whenever its
    roles are recompiled, e.g. for every node a policy change touches, and formatting (IPv6
    above all) was half the CPU of a policy change affecting 10,000 nodes."""
    t = _TEXTS.get(n)
    if t is None:
        if len(_TEXTS) >= MAX_TEXTS:
            _TEXTS.clear()
        _TEXTS[n] = t = str(n)
    return t
_NONE = frozenset()


_new = object.__new__
_set = object.__setattr__
# _rule relies on FilterRule being a frozen dataclass of exactly these fields, with instance
# attributes (no __slots__, no __post_init__): check at import, not on the hot path.
assert tuple(FilterRule.__dataclass_fields__) == ("src", "dst", "protos") and not hasattr(
    FilterRule, "__slots__") and not hasattr(FilterRule, "__post_init__")


def _rule(src: tuple, dst: tuple, protos: tuple) -> FilterRule:
    """`FilterRule(src, dst, protos)` at half the cost: a frozen dataclass's __init__ sets
    each field through `object.__setattr__` from Python code (~1 us), and a changed source
    list builds one rule per target. Same class, fields and attribute storage, so equality,
    hashing, pickling and `to_json` cannot tell the difference (tests check it). The hot
    loop in `_refresh_srcs` inlines this."""
    r = _new(FilterRule)
    _set(r, "src", src)
    _set(r, "dst", dst)
    _set(r, "protos", protos)
    return r


def _compose(cells: list) -> tuple[FilterRule, ...]:
    """A node's filter from its rule cells: (dst rule, self rule) per ACL in ACL order, None
    where the rule is left out. Swapping one cell and recomposing is what a changed source
    list costs each of its targets."""
    return tuple(filter(None, cells))


class NetmapIndex:
    """All visible nodes' netmaps, kept up to date one change at a time.

    Built once from (policy, node records, now); then `upsert_node`, `remove_node`,
    `replace_policy` and `advance_time` each return `Changes` stamped with the caller's
    state version. A node that appears receives its whole netmap as a delta (apply it to
    an empty netmap). Not thread-safe: the caller serialises changes.

    Peer sets are not stored: a node's peers are a union of its ACLs' index sets, computed
    when needed (O(its peers), as storing them would cost anyway on every change). Storing
    them meant ~15 M set entries at 10,000 nodes for the garbage collector to walk on every
    full collection (0.6-0.8 s each). Deltas that are the same for many nodes (one changed
    peer record, one removed peer) are one shared `NetmapDelta` object: treat them as
    immutable.
    """

    def __init__(self, policy: Policy | None, nodes: Iterable[dict], now: float,
                 dns: dict | None = None, watch_all: bool = True):
        self.now = now
        # Filters are derived for watched nodes only (all with `watch_all`): see `watch`.
        self._watch_all = watch_all
        self._watched: set[str] = set()
        self._stale: dict[str, int] = {}  # unwatched node -> last version its filter changed
        self._released: dict[str, int] = {}  # node -> version it was last unwatched at
        self.dns = dns  # the cluster's DNS settings, the same in every netmap
        self._nodes: dict[str, dict] = {}  # every known record (a copy), visible or not
        self._expiry: list[tuple[float, str]] = []  # sorted (key_expiry, id)
        self._expiry_of: dict[str, float] = {}
        for n in nodes:
            self._nodes[n["id"]] = dict(n)
            self._track_expiry(n["id"], n.get("key_expiry"))
        self._build(policy)

    # -- queries ---------------------------------------------------------------------------
    @property
    def policy(self) -> Policy:
        return self._policy

    def netmap(self, node_id: str, version: int) -> Netmap | None:
        """The node's full netmap, or None when it is unknown or not visible."""
        if node_id not in self._roles:
            return None
        peers = {p: self._seen(node_id, p) for p in self._in_order(self._reach(node_id))}
        pf = self._filter.get(node_id)
        if pf is None:  # not watched: derived now, as it would have been kept
            self._refresh_dests(node_id)
            pf = self._build_filter(node_id, register=False)
        return Netmap(version, self._peer[node_id], peers, pf, self.dns)

    # -- which filters are kept --------------------------------------------------------------
    def watch(self, node_id: str, version: int) -> None:
        """Keep `node_id`'s filter current from `version` on, as every change's deltas for it.

        A replica serves the streams of its own agents only (about a third of them), yet
        deriving every node's new filter was most of a policy change on each replica. An
        index built with `watch_all=False` derives the filters of the nodes the caller
        watches (those with a stream here) and, for the others, keeps only their roles and
        the version their filter last changed (`filter_changed_after`): their peer deltas
        still come, their filter is derived when asked (`netmap`) or watched again. Which
        nodes are watched is the caller's input: netmaps do not depend on it, only which
        deltas carry filters."""
        if self._watch_all or node_id in self._watched:
            return
        self._watched.add(node_id)
        if node_id in self._roles:
            self._stale[node_id] = self._stale_version(node_id)
            self._refresh_dests(node_id)
            self._filter[node_id] = self._build_filter(node_id)

    def unwatch(self, node_id: str, version: int) -> None:
        """Stop deriving `node_id`'s filter after `version` (its last stream here closed)."""
        if self._watch_all or node_id not in self._watched:
            return
        self._watched.discard(node_id)
        self._released[node_id] = version
        if self._filter.pop(node_id, None) is not None:
            roles = self._roles[node_id]
            for s in roles.dst:
                s.dcells.pop(node_id, None)
            for s in roles.self_dst:
                s.scells.pop(node_id, None)
            del self._rules[node_id]

    def filter_changed_after(self, node_id: str, since: int) -> bool:
        """Whether the node's filter may have changed after `since` without a delta saying so
        (it was not watched then): its history cannot bring an agent from `since` to now."""
        if self._watch_all:
            return False
        if node_id in self._filter:  # watched: every change since it was is in its deltas
            return self._stale.get(node_id, -1) > since
        return self._stale_version(node_id) > since

    def _stale_version(self, k: str) -> int:
        """The last version k's filter changed while unwatched: marked on k itself, or on
        a slot targeting it since it was last unwatched (before that it was watched, and
        changes before it was watched were folded into its mark by `watch`)."""
        stale, roles = self._stale.get(k, -1), self._roles.get(k)
        if roles is not None:
            released = self._released.get(k, -1)
            for s in (*roles.dst, *roles.self_dst):
                if s.changed_at > stale and s.changed_at > released:
                    stale = s.changed_at
        return stale

    def _refresh_dests(self, k: str) -> None:
        """Redo k's destinations under every ACL targeting it: a port edit while k was
        unwatched left them as they were (`_retarget` redoes only watched targets)."""
        roles, view = self._roles[k], self._views[k]
        for s in roles.dst.keys() | roles.self_dst.keys():
            dests, selfs, _ = _acl_dests(s.acl, view, _prefix_text)
            if s in roles.dst:
                roles.dst[s] = dests
            if s in roles.self_dst:
                roles.self_dst[s] = selfs

    def is_visible(self, node_id: str) -> bool:
        return node_id in self._roles

    def knows(self, node_id: str) -> bool:
        """The node exists (visible or not)."""
        return node_id in self._nodes

    def visible_ids(self) -> list[str]:
        return list(self._ids)

    def visible_count(self) -> int:
        return len(self._ids)

    def next_expiry(self, after: float | None = None) -> float | None:
        """The earliest key expiry after `now` (or `after`): when to call `advance_time` next."""
        i = bisect.bisect_right(self._expiry, self.now if after is None else after, key=_EXPIRY)
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

    def upsert_nodes(self, nodes: list[dict], version: int) -> Changes:
        """Several records at once (new nodes registered together): one `_apply` for all."""
        for node in nodes:
            self._nodes[node["id"]] = node = dict(node)
            self._track_expiry(node["id"], node.get("key_expiry"))
        return self._apply([n["id"] for n in nodes], version)

    def remove_node(self, node_id: str, version: int) -> Changes:
        if self._nodes.pop(node_id, None) is None:
            return NO_CHANGES
        self._track_expiry(node_id, None)
        self._stale.pop(node_id, None)  # gone for good: its history starts over (the feed)
        self._released.pop(node_id, None)
        return self._apply([node_id], version)

    def advance_time(self, now: float, version: int) -> Changes:
        """Time moved (either way): nodes whose key expiry was crossed appear or vanish."""
        lo, hi = sorted((self.now, now))
        self.now = now
        a = bisect.bisect_right(self._expiry, lo, key=_EXPIRY)
        b = bisect.bisect_right(self._expiry, hi, key=_EXPIRY)
        ids = [nid for _, nid in self._expiry[a:b]]
        return self._apply(ids, version) if ids else NO_CHANGES

    def set_dns(self, dns: dict | None, version: int) -> Changes:
        """New DNS settings: every visible node gets them, in one shared delta."""
        if dns == self.dns:
            return NO_CHANGES
        self.dns = dns
        return Changes(dict.fromkeys(self._ids, NetmapDelta(version, dns=dns)), ())

    def replace_policy(self, policy: Policy | None, version: int) -> Changes:
        """Swap the policy, re-deriving only what the ACLs it adds or removes touch.

        ACLs are matched old to new by value, so a kept ACL keeps its slot and indexes
        wherever it moved. Only members of an added or removed ACL can gain or lose a peer
        (an edge needs an ACL both ends are in), and only its targets' filters change,
        unless kept ACLs were reordered, which reorders rules (then every filter is redone).
        Visibility does not depend on the policy.
        """
        policy = policy or Policy()
        pool: dict[Acl, list[_Slot]] = {}
        for s in self._slots:
            pool.setdefault(s.acl, []).append(s)
        slots, added = [], []
        for acl in policy.acls:
            same = pool.get(acl)
            if same:
                slots.append(same.pop(0))
            else:
                slots.append(_Slot(acl))
                added.append(slots[-1])
        removed = [s for left in pool.values() for s in left]
        retargeted = _retargetable(added, removed, slots)
        if retargeted:
            added = [s for s in added if s not in retargeted]
            removed = [s for s in removed if s not in retargeted.values()]
        added_set, removed_set = set(added), set(removed)
        kept_order = [s for s in slots if s not in added_set]  # (a set: 20,000 rules)
        reordered = any(a.pos > b.pos for a, b in zip(kept_order, kept_order[1:]))
        self._policy = policy
        if not added and not removed and not reordered and not retargeted:
            self._set_slots(slots)
            return NO_CHANGES

        # who can gain or lose a peer, and what they reached through the removed ACLs
        new_roles: dict[str, _Roles] = {}
        if added:
            r = _Roles()
            finder = _SlotFinder(added)
            for k, view in self._views.items():
                if r.add(finder.candidates(view), view):
                    new_roles[k], r = r, _Roles()
        members = self._may_change_peers(new_roles, removed)
        targets = {k for k, r in new_roles.items() if r.dst or r.self_dst}
        for s in removed:
            targets |= s.dst
            for devices in s.self_dst.values():
                targets |= devices
        lost = {k: self._reach(k, removed_set.__contains__) for k in members if k in self._roles}
        old_view = {v: {r: self._seen(v, r) for r in routers}
                    for v, routers in self._route_pairs(new_roles, removed).items()}
        old_filter = self._filter

        # edit the indexes: drop the removed slots, add the new ones
        for s in removed:
            for k in s.src | s.dst | {k for d in s.self_dst.values() for k in d}:
                self._roles[k].drop(s)  # its cells go when the filter is rebuilt below
        self._set_slots(slots)
        retouched: dict[str, list] = {}
        for s in retargeted.values():
            retouched.update(self._retarget(s, version))
        for k, part in new_roles.items():
            roles, view, addrs = self._roles[k], self._views[k], self._peer[k].addresses
            for s in part.src:
                roles.src.add(s)
                s.src.add(k)
            for s in part.addr_src:
                roles.addr_src.add(s)
                s.add_addresses(addrs)
            for s, dests in part.dst.items():
                roles.dst[s] = dests
                s.dst.add(k)
            owner = view.owner
            for s in part.self_src:
                roles.self_src.add(s)
                s.self_src.setdefault(owner, set()).add(k)
            for s, dests in part.self_dst.items():
                roles.self_dst[s] = dests
                s.self_dst.setdefault(owner, set()).add(k)
            roles.route_src.update(part.route_src)
            roles.route_dst.update(part.route_dst)
        for s in added:
            s.publish()
            for owner, devices in s.self_src.items():
                s.self_srcs[owner] = self._self_sources(devices)

        self._filter = filters = dict(old_filter)
        deltas: dict[str, NetmapDelta] = {}
        for k in (self._roles if reordered else targets):
            if k not in filters:  # not watched
                self._stale[k] = version
                continue
            filters[k] = pf = self._build_filter(k)
            if pf != old_filter[k]:
                deltas[k] = NetmapDelta(version, packet_filter=pf)
        for k, cells in retouched.items():  # (built above if also a target: from these cells)
            if not reordered and k not in targets:
                filters[k] = pf = tuple(filter(None, cells))  # _compose, inlined
                if pf != old_filter[k]:
                    deltas[k] = NetmapDelta(version, packet_filter=pf)
        records: dict[frozenset, tuple[Peer, ...]] = {}  # many members gain the same peers
        for k, was in lost.items():
            got = self._reach(k, added_set.__contains__)
            # routers whose share of routes k sees changed (and that stay its peers: a share
            # of routes needs an ACL between them, so one of them had or has one)
            viewed = {r for r, prev in old_view.get(k, {}).items() if self._seen(k, r) != prev}
            if not (got or was or viewed):
                continue
            kept = self._reach(k, lambda s: s not in added_set, got ^ was)
            gained = got - was - kept
            dropped = was - got - kept
            viewed -= gained | dropped
            if gained or dropped or viewed:
                if viewed or gained & self._routers:
                    recs = tuple(self._seen(k, p) for p in sorted(gained | viewed))
                elif (recs := records.get(key := frozenset(gained))) is None:
                    recs = records[key] = tuple(self._peer[p] for p in sorted(gained))
                d = deltas.get(k)
                deltas[k] = NetmapDelta(version, recs, tuple(sorted(dropped)),
                                        d.packet_filter if d else None)
        return Changes(deltas, ())

    def _route_pairs(self, new_roles: dict[str, _Roles], removed: list[_Slot]
                     ) -> dict[str, set[str]]:
        """viewer -> the routers whose share of routes shown to it may change with the ACLs
        a policy change adds (`new_roles`: the nodes' parts in them) or removes: the routers
        those ACLs name routes of, with the nodes on the ACLs' other side."""
        pairs: dict[str, set[str]] = {}
        to_dst: dict[_Slot, list[str]] = {}  # added slot -> routers it names routes of
        to_src: dict[_Slot, list[str]] = {}
        for r in self._routers:
            rr = self._roles[r]
            for s in removed:
                for v in (s.src if s in rr.route_dst else ()):
                    pairs.setdefault(v, set()).add(r)
                for v in (s.dst if s in rr.route_src else ()):
                    pairs.setdefault(v, set()).add(r)
            if (part := new_roles.get(r)) is not None:
                for s in part.route_dst:
                    to_dst.setdefault(s, []).append(r)
                for s in part.route_src:
                    to_src.setdefault(s, []).append(r)
        if to_dst or to_src:
            for v, part in new_roles.items():
                for s in part.src & to_dst.keys():
                    pairs.setdefault(v, set()).update(to_dst[s])
                for s in part.dst.keys() & to_src.keys():
                    pairs.setdefault(v, set()).update(to_src[s])
        for v, routers in pairs.items():
            routers.discard(v)
        return pairs

    def _may_change_peers(self, new_roles: dict[str, _Roles], removed: list[_Slot]) -> set[str]:
        """Who can gain or lose a peer: the members of an added or removed ACL that has
        nodes on both sides (an edge joins a sender and a receiver of one ACL, or devices of
        one user under autogroup:self). An ACL whose sources are only CIDRs, such as an
        office range allowed to a port, changes filters and no peer, and its targets then
        skip the two peer-set unions each (~40% of a 10,000-node policy change)."""
        sends: dict = {}  # added slot, or (slot, owner) under autogroup:self -> node ids
        receives: dict = {}
        for k, part in new_roles.items():
            for s in part.src:
                sends.setdefault(s, []).append(k)
            for s in part.dst:
                receives.setdefault(s, []).append(k)
            if part.self_src or part.self_dst:
                owner = self._views[k].owner
                for s in part.self_src:
                    sends.setdefault((s, owner), []).append(k)
                for s in part.self_dst:
                    receives.setdefault((s, owner), []).append(k)
        members: set[str] = set()
        for key, senders in sends.items():
            if key in receives:
                members.update(senders, receives[key])
        for s in removed:
            if s.src and s.dst:
                members |= s.src
                members |= s.dst
            for owner, devices in s.self_dst.items():
                if s.self_src.get(owner):
                    members |= devices
                    members |= s.self_src[owner]
        return members

    def _retarget(self, s: _Slot, version: int) -> dict[str, list]:
        """Re-derive what slot `s` (given its new ACL by `_retargetable`) lets each of its
        watched targets accept and swap its rule cells in place, as `_refresh_srcs` does for
        a changed source list; return those targets' cells (the caller composes them, or
        `_build_filter` reuses them). Its members and sources stay: only ports and protocols
        changed. Unwatched targets are told by the slot's `changed_at`."""
        acl, text, protos, touched = s.acl, _prefix_text, s.protos, {}
        s.changed_at = version
        for k in s.dcells.keys() | s.scells.keys():
            roles = self._roles[k]
            dests, selfs, _ = _acl_dests(acl, self._views[k], text)
            if (e := s.dcells.get(k)) is not None:
                cells, i, _ = e
                roles.dst[s] = dests
                s.dcells[k] = (cells, i, dests)
                cells[i] = _rule(s.srcs, dests, protos) if dests and s.srcs else None
            if (e := s.scells.get(k)) is not None:
                cells, i, _ = e
                roles.self_dst[s] = selfs
                s.scells[k] = (cells, i, selfs)
                ss = s.self_srcs.get(self._views[k].owner, ())
                cells[i] = _rule(ss, selfs, protos) if ss else None
            touched[k] = cells
        return touched

    # -- internals -------------------------------------------------------------------------
    def _build(self, policy: Policy | None) -> None:
        self._policy = policy = policy or Policy()
        self._set_slots([_Slot(acl) for acl in policy.acls])
        self._views: dict[str, NodeView] = {}  # the visible nodes' views, roles, Peer records
        self._roles: dict[str, _Roles] = {}
        self._peer: dict[str, Peer] = {}
        self._routers: set[str] = set()  # visible nodes whose record carries routes
        self._variants: dict[str, tuple[Peer, dict[frozenset, Peer]]] = {}  # see _seen
        # per node: (slot -> position of its two cells, cells); see _compose
        self._rules: dict[str, tuple[dict[_Slot, int], list]] = {}
        self._filter: dict[str, tuple[FilterRule, ...]] = {}
        live = [k for k in sorted(self._nodes) if visible(self._nodes[k], self.now)]
        self._ids: list[str] = []  # the visible ids, sorted: see _in_order
        dirty: set = set()
        for k in live:
            self._attach(k, dirty, dirty)
        for s in self._slots:
            s.publish()
            for owner, devices in s.self_src.items():
                s.self_srcs[owner] = self._self_sources(devices)
        for k in live:
            if self._watch_all or k in self._watched:
                self._filter[k] = self._build_filter(k)

    def _set_slots(self, slots: list[_Slot]) -> None:
        for pos, s in enumerate(slots):
            s.pos = pos
        self._slots = slots
        self._finder = _SlotFinder(slots)

    def _track_expiry(self, nid: str, expiry: float | None) -> None:
        old = self._expiry_of.pop(nid, None)
        if old is not None:
            del self._expiry[bisect.bisect_left(self._expiry, (old, nid))]
        if expiry is not None:
            self._expiry_of[nid] = expiry
            bisect.insort(self._expiry, (expiry, nid))

    def _self_sources(self, devices: Iterable[str]) -> tuple[str, ...]:
        return tuple(sorted(a for k in devices for a in self._peer[k].addresses))

    def _attach(self, k: str, dirty: set, dirty_self: set) -> None:
        """Add a visible node to the reverse indexes; note the filter sources it may alter."""
        node = self._nodes[k]
        view = node_view(node)
        bisect.insort(self._ids, k)  # (appends while building: `live` is sorted)
        roles = _Roles()
        roles.add(self._finder.candidates(view), view)
        self._views[k], self._roles[k] = view, roles
        self._set_record(k, rec := peer_record(node, view))
        for s in roles.src:
            s.src.add(k)
        for s in roles.dst:
            s.dst.add(k)
        for s in roles.addr_src:
            if s.add_addresses(rec.addresses):
                dirty.add(s)
        owner = view.owner
        for s in roles.self_src:
            s.self_src.setdefault(owner, set()).add(k)
            dirty_self.add((s, owner))
        for s in roles.self_dst:
            s.self_dst.setdefault(owner, set()).add(k)

    def _detach(self, k: str, dirty: set, dirty_self: set) -> None:
        view, roles = self._views.pop(k), self._roles.pop(k)
        del self._ids[bisect.bisect_left(self._ids, k)]
        addrs = self._peer.pop(k).addresses
        self._routers.discard(k)
        self._variants.pop(k, None)
        if self._filter.pop(k, None) is not None:
            del self._rules[k]
        for s in roles.src:
            s.src.discard(k)
        for s in roles.dst:
            s.dst.discard(k)
            s.dcells.pop(k, None)
        for s in roles.addr_src:
            if s.remove_addresses(addrs):
                dirty.add(s)
        owner = view.owner
        for s in roles.self_src:
            _discard(s.self_src, owner, k)
            dirty_self.add((s, owner))
        for s in roles.self_dst:
            _discard(s.self_dst, owner, k)
            s.scells.pop(k, None)

    def _in_order(self, ids: Iterable[str]) -> list[str]:
        """`sorted(ids)` for visible ids. A node's peer lists are sent in id order, and a
        changed node can gain or lose thousands of peers (a retag at 10,000 nodes): sorting
        that many ids costs more than filtering the already sorted list of all ids; small
        sets are still sorted. (Changes.deltas itself is in no particular order.)"""
        if not isinstance(ids, (set, dict)):
            ids = set(ids)
        if len(ids) * 8 < len(self._ids):
            return sorted(ids)
        out = [k for k in self._ids if k in ids]
        return out if len(out) == len(ids) else sorted(ids)  # (some were not visible)

    def _reach(self, k: str, only: Callable[[_Slot], bool] | None = None,
               within: set[str] | None = None) -> set[str]:
        """Who k may reach or be reached by (through the slots `only` accepts; among
        `within` only, if given): a union of index sets, never a scan of all nodes."""
        roles, owner = self._roles[k], self._views[k].owner
        sets = [s.dst for s in roles.src if only is None or only(s)]
        sets += [s.src for s in roles.dst if only is None or only(s)]
        if owner is not None:
            sets += [s.self_dst.get(owner, _NONE) for s in roles.self_src if only is None or only(s)]
            sets += [s.self_src.get(owner, _NONE) for s in roles.self_dst if only is None or only(s)]
        out: set[str] = set()
        for members in sets:  # `&` walks the smaller side: O(min(|members|, |within|))
            out |= members if within is None else members & within
        out.discard(k)
        return out

    def _build_filter(self, k: str, register: bool = True) -> tuple[FilterRule, ...]:
        """(Re)build k's rule cells in ACL order, reusing the rules already built, and
        register them with their slots (`_Slot.dcells` / `scells`); with `register` False,
        only derive the filter (an unwatched node's, asked for once)."""
        roles, owner = self._roles[k], self._views[k].owner
        old_at, old_cells = self._rules.get(k, (None, None)) if register else (None, None)
        at, cells = {}, []
        for s in sorted(roles.dst.keys() | roles.self_dst.keys(), key=_POS):
            at[s] = i = len(cells)
            dests, selfs = roles.dst.get(s), roles.self_dst.get(s)
            if register:
                if dests:
                    s.dcells[k] = (cells, i, dests)
                if selfs:
                    s.scells[k] = (cells, i + 1, selfs)
            if old_at is not None and s in old_at:
                j = old_at[s]
                cells += old_cells[j:j + 2]
                continue
            ss = s.self_srcs.get(owner, ()) if selfs else ()
            cells.append(_rule(s.srcs, dests, s.protos) if dests and s.srcs else None)
            cells.append(_rule(ss, selfs, s.protos) if ss else None)
        if register:
            self._rules[k] = at, cells
        return _compose(cells)

    def _refresh_srcs(self, dirty: set, dirty_self: set, version: int) -> dict[str, list]:
        """Publish the source lists in `dirty` and swap the one rule each target built from
        a list that changed; return those targets' cells (the caller composes their new
        filters: a rule of theirs changed, so their filter did).

        The targets are the slot's registered cells (`dcells` / `scells`): nodes detached by
        this change are no longer there, and nodes attached by it are not yet (the caller
        builds their filters whole afterwards); unwatched ones are told by the slot's
        `changed_at` (autogroup:self rules: marked each, few per owner). This loop is the O(targets) part of a
        change, so it does as little per target as it can: one registration lookup, one
        rule (built as `_rule` does, inlined), one cell store."""
        touched: dict[str, list] = {}
        new_, set_, rule_cls = _new, _set, FilterRule
        for s in dirty:
            new = tuple(s.addrs)
            if new == s.srcs:
                continue
            s.srcs, s.changed_at = new, version
            protos = s.protos
            if not new:
                for k, (cells, i, _) in s.dcells.items():
                    cells[i] = None
                    touched[k] = cells
                continue
            for k, (cells, i, dests) in s.dcells.items():
                r = new_(rule_cls)
                set_(r, "src", new)
                set_(r, "dst", dests)
                set_(r, "protos", protos)
                cells[i] = r
                touched[k] = cells
        for s, owner in dirty_self:
            new = self._self_sources(s.self_src.get(owner, ()))
            if new == s.self_srcs.get(owner, ()):
                continue
            if new:
                s.self_srcs[owner] = new
            else:
                del s.self_srcs[owner]
            scells = s.scells
            for k in s.self_dst.get(owner, _NONE):
                if (e := scells.get(k)) is None:
                    # attached by this change (the caller builds it whole) or not watched
                    if not self._watch_all and k not in self._watched:
                        self._stale[k] = version
                    continue
                cells, i, selfs = e
                cells[i] = _rule(new, selfs, s.protos) if new else None
                touched[k] = cells
        return touched

    def _record_changed(self, k: str, node: dict, version: int) -> Changes:
        """Only the Peer record changed (endpoints, presence, key, name...): tell k's peers,
        all with one shared delta."""
        rec, old = peer_record(node, self._views[k]), self._peer[k]
        if rec == old:
            return NO_CHANGES
        routed = k in self._routers
        self._set_record(k, rec)
        peers = self._reach(k)
        if routed or k in self._routers:  # the peers whose share of it changed
            olds: dict[frozenset, Peer] = {}

            def before(p: str) -> Peer:
                shown = self._shown(p, k)
                if (o := olds.get(shown)) is None:
                    o = olds[shown] = with_routes_shown(old, shown)
                return o
            peers = self._news_of_router(k, peers, peers, before)
        deltas = self._shared_news(k, peers, version)
        deltas[k] = NetmapDelta(version, self_node=rec)
        return Changes(deltas, ())

    def _set_record(self, k: str, rec: Peer) -> None:
        self._peer[k] = rec
        if len(rec.allowed_ips) > len(rec.addresses):
            self._routers.add(k)
        else:
            self._routers.discard(k)

    def _shown(self, viewer: str, router: str) -> frozenset[str]:
        v, r = self._roles[viewer], self._roles[router]
        return shown_routes(v.src, v.dst, r.route_dst, r.route_src)

    def _seen(self, viewer: str, k: str) -> Peer:
        """k's record as `viewer` gets it (`with_routes_shown`): one object per distinct
        share of a router's routes, so that the viewers of one share can share a delta."""
        rec = self._peer[k]
        if k not in self._routers:
            return rec
        shown = self._shown(viewer, k)
        cached = self._variants.get(k)
        if cached is None or cached[0] is not rec:
            cached = self._variants[k] = (rec, {})
        seen = cached[1].get(shown)
        if seen is None:
            seen = cached[1][shown] = with_routes_shown(rec, shown)
        return seen

    def _news_of_router(self, k: str, now: Iterable[str], was: set[str],
                        before: Callable[[str], Peer]) -> set[str]:
        """The peers that must hear of router k: those it newly appears to, and those whose
        view of it (`before`, for old peers) changed: its record or their share of routes."""
        return {p for p in now if p not in was or self._seen(p, k) != before(p)}

    def _told(self, k: str, now: set[str], was: set[str], moved: set[str],
              seen_before: dict[str, Peer] | None, old: Peer | None) -> set[str]:
        """The peers that must hear of changed node k, whose record was `old`; when k was a
        router, `seen_before` is how each of its old peers saw it."""
        if seen_before is None and k not in self._routers:
            return now if k in moved else now - was
        return self._news_of_router(k, now, was, seen_before.__getitem__
                                    if seen_before is not None else lambda p: old)

    def _shared_news(self, k: str, told: Iterable[str], version: int) -> dict[str, NetmapDelta]:
        """k's record for each of `told`, one shared delta per distinct view of it."""
        if k not in self._routers:
            return dict.fromkeys(told, NetmapDelta(version, (self._peer[k],)))
        deltas: dict[str, NetmapDelta] = {}
        by_view: dict[int, NetmapDelta] = {}
        for p in told:
            seen = self._seen(p, k)
            if (d := by_view.get(id(seen))) is None:
                d = by_view[id(seen)] = NetmapDelta(version, (seen,))
            deltas[p] = d
        return deltas

    def _apply(self, ids: Iterable[str], version: int) -> Changes:
        """Re-derive the nodes in `ids` from their current records: detach the old ones,
        attach the visible ones, then diff only the nodes that saw them before or see them
        now (the only ones whose peers or filter sources can involve them)."""
        changed = set(ids)
        before = sorted(k for k in changed if k in self._roles)
        old_peers = {k: self._reach(k) for k in before}
        old_rec = {k: self._peer[k] for k in before}
        old_filter = {k: self._filter.get(k) for k in before}
        # how the changed nodes saw the peers that may look different to them now (routers,
        # changed nodes), and how the changed routers' peers saw them
        old_view = {k: {p: self._seen(k, p) for p in (old_peers[k] & self._routers)
                        | (old_peers[k] & changed)} for k in before}
        old_seen = {k: {p: self._seen(p, k) for p in old_peers[k]}
                    for k in before if k in self._routers}
        dirty: set = set()
        dirty_self: set = set()
        for k in before:
            self._detach(k, dirty, dirty_self)
        after = sorted(k for k in changed if k in self._nodes and visible(self._nodes[k], self.now))
        for k in after:
            self._attach(k, dirty, dirty_self)
        touched = self._refresh_srcs(dirty, dirty_self, version)
        for k in after:
            if self._watch_all or k in self._watched:
                self._filter[k] = self._build_filter(k)
            else:
                self._stale[k] = version  # its own delta is left out: resume gives a full one
        new_peers = {k: self._reach(k) for k in after}
        moved = {k for k in after if k not in old_rec or old_rec[k] != self._peer[k]}

        # the nodes that see them: a shared delta per kind of news, unless their filter changed
        deltas: dict[str, NetmapDelta] = {}
        if len(changed) == 1:
            (k,) = changed
            was, now = old_peers.get(k, _NONE), new_peers.get(k, _NONE)
            if now and (told := self._told(k, now, was, moved, old_seen.get(k), old_rec.get(k))):
                deltas = self._shared_news(k, told, version)
            if was and (gone := was - now):
                deltas.update(dict.fromkeys(gone, NetmapDelta(version, (), (k,))))
        else:
            news_of: dict[str, list[str]] = {}
            gone_of: dict[str, list[str]] = {}
            for k in changed:
                was, now = old_peers.get(k, _NONE), new_peers.get(k, _NONE)
                for p in self._told(k, now, was, moved, old_seen.get(k), old_rec.get(k)) - changed:
                    news_of.setdefault(p, []).append(k)
                for p in was - now - changed:
                    gone_of.setdefault(p, []).append(k)
            for p in news_of.keys() | gone_of.keys():
                deltas[p] = NetmapDelta(
                    version, tuple(self._seen(p, k) for k in sorted(news_of.get(p, ()))),
                    tuple(sorted(gone_of.get(p, ()))))
        get, filters = deltas.get, self._filter
        for p, cells in touched.items():  # their filters changed: compose, send
            filters[p] = pf = tuple(filter(None, cells))  # _compose, inlined
            d = get(p)
            deltas[p] = NetmapDelta(version, d.peers_changed, d.peers_removed, pf) if d else \
                NetmapDelta(version, (), (), pf)

        seen = self._seen
        for k in after:  # the changed nodes themselves (all others' deltas are non-empty)
            if k not in filters:
                continue  # not watched
            now = new_peers[k]
            if k not in old_rec:  # appeared: its whole netmap
                deltas[k] = NetmapDelta(version, tuple(seen(k, p) for p in self._in_order(now)),
                                        (), self._filter[k], self._peer[k], self.dns)
                continue
            was = old_peers[k]
            pf = self._filter[k]
            # gained peers, peers that look different, and lost ones: one ordering pass
            viewed = {p for p, prev in old_view[k].items() if p in now and seen(k, p) != prev}
            news = self._in_order((now ^ was) | viewed)
            deltas[k] = NetmapDelta(
                version, tuple([seen(k, p) for p in news if p in now]),
                tuple([p for p in news if p not in now]), None if pf == old_filter[k] else pf,
                self._peer[k] if k in moved else None)
            if deltas[k].is_empty():
                del deltas[k]
        gone = tuple(k for k in before if k not in self._roles)
        return Changes(deltas, gone)


def _shape(acl: Acl) -> tuple | None:
    """What decides who plays which part in `acl`: its selectors, not its ports or
    protocols (None if a destination has no ports, which would take its targets out)."""
    if not all(d.ports for d in acl.dst):
        return None
    return acl.src, tuple(d.selector for d in acl.dst)


def _retargetable(added: list[_Slot], removed: list[_Slot], slots: list[_Slot]) -> dict:
    """Pair each new slot with a removed one of the same shape (an ACL whose ports or
    protocols were edited: the benchmark's and a common edit) and move the removed slot,
    with its member indexes, into the new one's place with the new ACL: {new: reused}.
    Its members cannot gain or lose a peer and only its targets' filters change, so a
    port edit costs O(its targets) instead of matching every node against the new ACL."""
    if not added or not removed:
        return {}
    spare: dict[tuple, list[_Slot]] = {}
    for s in removed:
        if (shape := _shape(s.acl)) is not None:
            spare.setdefault(shape, []).append(s)
    pairs = {}
    for s in added:
        old = spare.get(_shape(s.acl))
        if old:
            pairs[s] = reused = old.pop(0)
            reused.acl, reused.protos = s.acl, s.acl.protos
    if pairs:
        slots[:] = [pairs.get(s, s) for s in slots]
    return pairs


def _discard(index: dict[str, set[str]], key: str, k: str) -> None:
    members = index[key]
    members.discard(k)
    if not members:
        del index[key]
