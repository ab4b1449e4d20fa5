"""Wire types shared by the control plane and the agent (raftmesh's `tailcfg`).

Everything an agent receives or sends is defined here once, as plain dataclasses with
explicit JSON forms, so server and agent cannot drift apart and nothing is pickled.
Field names follow Tailscale's MapResponse where a concept is shared, in snake_case.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Overlay address pools (Tailscale's CGNAT range and ULA prefix).
IPV4_POOL = "100.64.0.0/10"
IPV6_POOL = "fd7a:115c:a1e0::/48"


def node_addresses(node: dict) -> tuple[str, ...]:
    """A node record's overlay addresses as CIDRs, as its netmap lists them: known to the
    agent from its registration's answer, before its first netmap."""
    return tuple(f"{a}/{bits}" for a, bits in ((node.get("ipv4"), 32), (node.get("ipv6"), 128))
                 if a)


PROTOCOLS = ("tcp", "udp", "icmp")
EXIT_ROUTES = ("0.0.0.0/0", "::/0")  # what an exit node advertises (agent/exit_node.py)


@dataclass(frozen=True, order=True)
class PortRange:
    """Inclusive port range; (0, 65535) means any port."""

    first: int = 0
    last: int = 65535

    def to_json(self) -> str:
        if (self.first, self.last) == (0, 65535):
            return "*"
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"

    @classmethod
    def from_json(cls, text: str) -> "PortRange":
        if text == "*":
            return cls()
        lo, _, hi = text.partition("-")
        return cls(int(lo), int(hi or lo))


@dataclass(frozen=True, order=True)
class FilterDest:
    """A destination prefix and the ports allowed on it."""

    prefix: str  # CIDR, e.g. "100.64.0.2/32"
    ports: PortRange = PortRange()

    def to_json(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "ports": self.ports.to_json()}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "FilterDest":
        return cls(obj["prefix"], PortRange.from_json(obj["ports"]))


@dataclass(frozen=True, order=True)
class FilterRule:
    """Accept packets from any of `src` to any of `dst` with a protocol in `protos`.

    An empty `protos` means tcp, udp and icmp (Tailscale's default). The packet filter is a
    list of rules; anything not accepted is dropped (deny by default). Rules are evaluated
    by the receiving node against inbound traffic.
    """

    src: tuple[str, ...]  # CIDRs
    dst: tuple[FilterDest, ...]
    protos: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "src": list(self.src),
            "dst": [d.to_json() for d in self.dst],
            "protos": list(self.protos),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "FilterRule":
        return cls(
            tuple(obj["src"]),
            tuple(FilterDest.from_json(d) for d in obj["dst"]),
            tuple(obj.get("protos", ())),
        )


@dataclass(frozen=True)
class Peer:
    """What a node knows about one peer (or about itself, as `Netmap.self_node`)."""

    id: str
    name: str
    node_key: str  # base64 X25519 public key (WireGuard key)
    addresses: tuple[str, ...]  # overlay addresses as /32 and /128 CIDRs
    allowed_ips: tuple[str, ...]  # addresses plus approved routes
    endpoints: tuple[str, ...] = ()  # "ip:port" underlay endpoints
    key_expiry: float | None = None  # unix seconds; None = never
    online: bool = False
    last_seen: float | None = None
    user: str | None = None
    tags: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("addresses", "allowed_ips", "endpoints", "tags"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Peer":
        return cls(
            id=obj["id"],
            name=obj["name"],
            node_key=obj["node_key"],
            addresses=tuple(obj["addresses"]),
            allowed_ips=tuple(obj["allowed_ips"]),
            endpoints=tuple(obj.get("endpoints", ())),
            key_expiry=obj.get("key_expiry"),
            online=bool(obj.get("online", False)),
            last_seen=obj.get("last_seen"),
            user=obj.get("user"),
            tags=tuple(obj.get("tags", ())),
        )


@dataclass
class Netmap:
    """A node's whole view of the network at one state version."""

    version: int
    self_node: Peer
    peers: dict[str, Peer] = field(default_factory=dict)  # by peer id
    packet_filter: tuple[FilterRule, ...] = ()
    dns: dict[str, Any] | None = None  # the cluster's DNS settings (cluster/dns_config.py)

    def to_json(self) -> dict[str, Any]:
        d = {
            "version": self.version,
            "self": self.self_node.to_json(),
            "peers": [self.peers[k].to_json() for k in sorted(self.peers)],
            "packet_filter": [r.to_json() for r in self.packet_filter],
        }
        if self.dns is not None:
            d["dns"] = self.dns
        return d

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Netmap":
        peers = [Peer.from_json(p) for p in obj["peers"]]
        return cls(
            version=obj["version"],
            self_node=Peer.from_json(obj["self"]),
            peers={p.id: p for p in peers},
            packet_filter=tuple(FilterRule.from_json(r) for r in obj["packet_filter"]),
            dns=obj.get("dns"),
        )


@dataclass
class NetmapDelta:
    """Difference between two netmaps of one node; None/empty means unchanged.

    `packet_filter` is None when unchanged; an empty tuple means "block everything".
    """

    version: int
    peers_changed: tuple[Peer, ...] = ()  # added or changed, whole records
    peers_removed: tuple[str, ...] = ()  # peer ids
    packet_filter: tuple[FilterRule, ...] | None = None
    self_node: Peer | None = None
    dns: dict[str, Any] | None = None  # the new DNS settings; None when unchanged

    def is_empty(self) -> bool:
        return not (self.peers_changed or self.peers_removed or self.self_node) and (
            self.packet_filter is None and self.dns is None
        )

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"version": self.version}
        if self.peers_changed:
            d["peers_changed"] = [p.to_json() for p in self.peers_changed]
        if self.peers_removed:
            d["peers_removed"] = list(self.peers_removed)
        if self.packet_filter is not None:
            d["packet_filter"] = [r.to_json() for r in self.packet_filter]
        if self.self_node is not None:
            d["self"] = self.self_node.to_json()
        if self.dns is not None:
            d["dns"] = self.dns
        return d

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "NetmapDelta":
        pf = obj.get("packet_filter")
        return cls(
            version=obj["version"],
            peers_changed=tuple(Peer.from_json(p) for p in obj.get("peers_changed", ())),
            peers_removed=tuple(obj.get("peers_removed", ())),
            packet_filter=None if pf is None else tuple(FilterRule.from_json(r) for r in pf),
            self_node=Peer.from_json(obj["self"]) if "self" in obj else None,
            dns=obj.get("dns"),
        )


def diff_netmaps(old: Netmap, new: Netmap) -> NetmapDelta:
    """The delta that turns `old` into `new` (both of the same node)."""
    changed = tuple(p for pid, p in sorted(new.peers.items()) if old.peers.get(pid) != p)
    removed = tuple(sorted(set(old.peers) - set(new.peers)))
    pf = new.packet_filter if new.packet_filter != old.packet_filter else None
    me = new.self_node if new.self_node != old.self_node else None
    return NetmapDelta(new.version, changed, removed, pf, me,
                       new.dns if new.dns != old.dns else None)


def apply_delta(netmap: Netmap, delta: NetmapDelta) -> Netmap:
    """Return a new netmap with `delta` applied; the caller checks version order."""
    peers = dict(netmap.peers)
    for pid in delta.peers_removed:
        peers.pop(pid, None)
    for p in delta.peers_changed:
        peers[p.id] = p
    return Netmap(
        version=delta.version,
        self_node=delta.self_node or netmap.self_node,
        peers=peers,
        packet_filter=netmap.packet_filter if delta.packet_filter is None else delta.packet_filter,
        dns=netmap.dns if delta.dns is None else delta.dns,
    )


def compose_deltas(first: NetmapDelta, then: NetmapDelta) -> NetmapDelta:
    """One delta with the net effect of `first` followed by `then`.

    Deltas carry whole records and final values, so the result applied to any netmap
    between the two (one that already has part of `first`) still gives the final netmap:
    that is what lets a replica resume an agent from a version it never streamed itself.
    """
    changed = {p.id: p for p in first.peers_changed if p.id not in then.peers_removed}
    changed.update((p.id, p) for p in then.peers_changed)
    removed = (set(first.peers_removed) - changed.keys()) | set(then.peers_removed)
    return NetmapDelta(
        version=then.version,
        peers_changed=tuple(changed[k] for k in sorted(changed)),
        peers_removed=tuple(sorted(removed)),
        packet_filter=first.packet_filter if then.packet_filter is None else then.packet_filter,
        self_node=then.self_node or first.self_node,
        dns=first.dns if then.dns is None else then.dns,
    )


# -- map stream frames --------------------------------------------------------------------
# A map stream is one long HTTP response of frames: 4-byte little-endian length, then
# canonical JSON {"kind", "node_id", "version", "body", "nonce", "seq", "key_id", "sig"}.
# `sig` is the cluster key's Ed25519 signature over the canonical JSON of everything else, so
# an agent accepts a frame only from its cluster, whichever replica or proxy relays it. On a
# stream whose agent sent HEADER_STREAM_KEY, frames after the first carry `tag` (a keyed
# hash under a key only that agent and replica know) instead of `key_id` and `sig`
# (proto/frames.py).
FRAME_KINDS = ("full", "delta", "keepalive", "bye")
MAX_FRAME_BYTES = 16 << 20
HEADER_STREAM_KEY = "X-Raftmesh-Stream-Key"  # an agent's X25519 public key for one stream (hex)


def canonical_json(obj: Any) -> bytes:
    import json
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def frame_bytes(frame: dict[str, Any]) -> bytes:
    data = canonical_json(frame)
    return len(data).to_bytes(4, "little") + data


def signed_part(frame: dict[str, Any]) -> bytes:
    """What a frame's signature or tag covers: everything else."""
    return canonical_json({k: v for k, v in frame.items() if k != "sig" and k != "tag"})
