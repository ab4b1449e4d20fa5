"""The STUN responder every replica runs on UDP (proto/stun.py has the codec and its bounds).

Stateless: each well-formed binding request gets one small answer (MAX_ANSWER_BYTES), anything
else is dropped and counted, so a flood costs the replica only the packets it receives.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from prometheus_client import CollectorRegistry, Counter

from raftmesh.proto import stun
from raftmesh.proto.ack_datagram import ACK_MAGIC

log = logging.getLogger("raftmesh.stun")


class StunResponder(asyncio.DatagramProtocol):
    """Also takes the agents' ack datagrams (protocol version 3, proto/ack_datagram.py):
    `on_ack` records one and gives its confirmation, or None to drop it."""

    def __init__(self, registry: CollectorRegistry, on_ack: Callable[[bytes], bytes | None]):
        self.transport: asyncio.DatagramTransport | None = None
        self.on_ack = on_ack
        self.packets = Counter("raftmesh_stun_packets", "STUN packets received, by outcome",
                               ["outcome"], registry=registry)
        self.acks = Counter("raftmesh_ack_datagrams", "ack datagrams received, by outcome",
                            ["outcome"], registry=registry)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        if data.startswith(ACK_MAGIC):
            confirm = self.on_ack(data)
            self.acks.labels("dropped" if confirm is None else "taken").inc()
            if confirm is not None:
                self.transport.sendto(confirm, addr)
            return
        try:
            reply = stun.answer(data, addr[:2])
        except stun.StunError:
            self.packets.labels("dropped").inc()
            return
        self.packets.labels("answered").inc()
        self.transport.sendto(reply, addr)


async def start(host: str, port: int, registry: CollectorRegistry,
                on_ack: Callable[[bytes], bytes | None]) -> asyncio.DatagramTransport:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: StunResponder(registry, on_ack),
                                                       local_addr=(host, port))
    log.info("STUN on udp %s:%d", host, port)
    return transport
