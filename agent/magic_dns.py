"""MagicDNS answers, sans I/O: what the agent's resolver on 100.100.100.100 does with a query.

`DnsTable` is built from the netmap alone (the cluster's DNS settings and the peers' names),
so names resolve from the cached netmap through a full control-plane outage, and a rename
resolves as soon as the netmap that carries it is applied. `decide` turns a query packet and
its source into a reply, a forward to upstream resolvers, or nothing (dropped). Packets are
read and written with dnspython; nothing here parses DNS by hand.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Iterable

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.rrset

from raftmesh.proto.wire import Netmap

SERVICE_ADDRESS = "100.100.100.100"  # where Tailscale clients look for MagicDNS too
MAX_QUERY_BYTES = 4096  # a query needs far less; anything larger is refused unread
TTL = 60
MESH_RANGES = (ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("fd7a:115c:a1e0::/48"))
# who may ask: the mesh, and this host itself (through loopback or the service address)
ALLOWED_SOURCES = (*MESH_RANGES, ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
_A, _AAAA, _PTR = dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.PTR


@dataclass(frozen=True)
class DnsTable:
    """What the resolver knows: names and addresses from one netmap, and where other names go."""

    enabled: bool = False
    domain: dns.name.Name | None = None
    # Plain text, not dnspython names: built on every netmap change, and parsing 10,000 peer
    # names took the agent a second per change; a query converts its one name instead.
    hosts: dict[str, tuple[str, ...]] = field(default_factory=dict)  # node name -> addresses
    reverse: dict[str, str] = field(default_factory=dict)  # address -> node name
    split: tuple[tuple[dns.name.Name, tuple[str, ...]], ...] = ()  # longest domain first
    upstreams: tuple[str, ...] = ()  # the cluster's nameservers, else the host's own

    @classmethod
    def from_netmap(cls, netmap: Netmap | None, host_upstreams: Iterable[str]) -> "DnsTable":
        settings = netmap.dns if netmap is not None else None
        if not settings or not settings.get("magic_dns", True):
            return cls(upstreams=tuple(host_upstreams))
        domain = dns.name.from_text(settings["domain"])
        hosts: dict[str, tuple[str, ...]] = {}
        reverse: dict[str, str] = {}
        for peer in (netmap.self_node, *netmap.peers.values()):
            name = peer.name.lower()
            addrs = tuple(a.split("/")[0] for a in peer.addresses)
            hosts[name] = addrs
            for a in addrs:
                reverse[a] = name
        split = tuple(sorted(((dns.name.from_text(d), tuple(r))
                              for d, r in settings.get("split", {}).items()),
                             key=lambda e: -len(e[0])))
        return cls(True, domain, hosts, reverse, split,
                   tuple(settings.get("nameservers") or ()) or tuple(host_upstreams))


@dataclass(frozen=True)
class Reply:
    wire: bytes


@dataclass(frozen=True)
class Forward:
    """Ask `resolvers` (in order, over the client's transport) and relay the answer to the
    client, fitted to `max_size`."""

    query: dns.message.Message
    resolvers: tuple[str, ...]
    max_size: int
    tcp: bool = False


Decision = Reply | Forward | None  # None: drop the packet


def source_allowed(source: str) -> bool:
    try:
        ip = ipaddress.ip_address(source.split("%")[0])
    except ValueError:
        return False
    return any(ip in net for net in ALLOWED_SOURCES)


TCP_MAX = 65535  # a TCP answer's length prefix is 16 bits


def max_size(query: dns.message.Message, tcp: bool) -> int:
    """How large an answer the client takes: over UDP 512 bytes, or its EDNS size."""
    if tcp:
        return TCP_MAX
    return max(512, query.payload) if query.edns >= 0 else 512


def fitted(response: dns.message.Message, max_size: int) -> bytes:
    """The response as wire bytes within the client's size; too large: truncated (TC), so
    the client knows to retry another way."""
    try:
        return response.to_wire(max_size=max_size)
    except dns.exception.TooBig:
        response.answer.clear()
        response.authority.clear()
        response.additional.clear()
        response.flags |= dns.flags.TC
        return response.to_wire(max_size=max_size)


def _error_for_unreadable(packet: bytes) -> Decision:
    """FORMERR with the query's id, or nothing when even the header is missing or the packet
    is itself a response (answering those would make reflection loops)."""
    if len(packet) < 12:
        return None
    qid, flags = struct.unpack("!HH", packet[:4])  # the header's fixed fields (RFC 1035 4.1.1)
    if flags & dns.flags.QR:
        return None
    reply = dns.message.Message(id=qid)
    reply.flags = dns.flags.QR
    reply.set_rcode(dns.rcode.FORMERR)
    return Reply(reply.to_wire())


def _error(query: dns.message.Message, rcode: int, limit: int = 512) -> Reply:
    reply = dns.message.make_response(query, recursion_available=True)
    reply.set_rcode(rcode)
    return Reply(fitted(reply, limit))


def decide(packet: bytes, source: str, table: DnsTable, tcp: bool = False) -> Decision:
    """What to do with one query from `source` (a UDP packet, or a TCP message without its
    length prefix)."""
    if not source_allowed(source):
        return None  # from outside the mesh: not ours to answer, and no amplification
    if len(packet) > MAX_QUERY_BYTES:
        return _error_for_unreadable(packet)
    try:
        query = dns.message.from_wire(packet)
    except dns.exception.DNSException:
        return _error_for_unreadable(packet)
    except ValueError:  # dnspython raises plain ValueErrors for some malformed fields
        return _error_for_unreadable(packet)
    if query.flags & dns.flags.QR:
        return None
    limit = max_size(query, tcp)
    if query.opcode() != dns.opcode.QUERY:
        return _error(query, dns.rcode.NOTIMP, limit)
    if len(query.question) != 1 or query.answer or query.authority:
        return _error(query, dns.rcode.FORMERR, limit)
    question = query.question[0]
    if question.rdclass != dns.rdataclass.IN:
        return _error(query, dns.rcode.REFUSED, limit)
    name = question.name
    if table.enabled and name.is_subdomain(table.domain):
        return Reply(fitted(_mesh_name(query, name, question.rdtype, table), limit))
    address = _mesh_address(name) if table.enabled else None
    if address is not None:
        return Reply(fitted(_mesh_address_name(query, address, question.rdtype, table), limit))
    resolvers = next((r for d, r in table.split if name.is_subdomain(d)), table.upstreams)
    if not resolvers:
        return _error(query, dns.rcode.REFUSED, limit)
    return Forward(query, resolvers, limit, tcp)


_REVERSE_ZONES = (dns.reversename.ipv4_reverse_domain, dns.reversename.ipv6_reverse_domain)


def _mesh_address(name: dns.name.Name) -> str | None:
    """The mesh address a reverse name stands for (its canonical text), or None."""
    if not any(name.is_subdomain(zone) for zone in _REVERSE_ZONES):
        return None
    try:
        ip = ipaddress.ip_address(dns.reversename.to_address(name))
    except (dns.exception.DNSException, ValueError):
        return None  # a partial reverse name (a zone cut), not an address
    return str(ip) if any(ip in net for net in MESH_RANGES) else None


def _answer(query: dns.message.Message) -> dns.message.Message:
    reply = dns.message.make_response(query, recursion_available=True)
    reply.flags |= dns.flags.AA
    return reply


def _mesh_address_name(query: dns.message.Message, address: str, rdtype: int,
                       table: DnsTable) -> dns.message.Message:
    """PTR for a node's address; NXDOMAIN for a mesh address no node has."""
    reply = _answer(query)
    host = table.reverse.get(address)
    if host is None:
        reply.set_rcode(dns.rcode.NXDOMAIN)
    elif rdtype in (_PTR, dns.rdatatype.ANY):
        reply.answer.append(dns.rrset.from_text(query.question[0].name, TTL, "IN", "PTR",
                                                f"{host}.{table.domain.to_text()}"))
    return reply


def _mesh_name(query: dns.message.Message, name: dns.name.Name, rdtype: int,
               table: DnsTable) -> dns.message.Message:
    """A and AAAA for a node's name in the domain; NXDOMAIN for a name no node has."""
    reply = _answer(query)
    if name == table.domain:
        return reply
    addrs = table.hosts.get(name.relativize(table.domain).to_text().lower())
    if addrs is None:
        reply.set_rcode(dns.rcode.NXDOMAIN)
        return reply
    for rdtype_wanted, family in ((_A, 4), (_AAAA, 6)):
        if rdtype in (rdtype_wanted, dns.rdatatype.ANY):
            matching = [a for a in addrs if ipaddress.ip_address(a).version == family]
            if matching:
                reply.answer.append(dns.rrset.from_text(
                    name, TTL, "IN", dns.rdatatype.to_text(rdtype_wanted), *matching))
    return reply


def forwarded_reply(query: dns.message.Message, answer: dns.message.Message | None,
                    max_size: int) -> bytes:
    """The upstream's answer for the client (its id), or SERVFAIL when none came."""
    if answer is None:
        return _error(query, dns.rcode.SERVFAIL, max_size).wire
    answer.id = query.id
    return fitted(answer, max_size)
