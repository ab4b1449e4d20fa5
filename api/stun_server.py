"""The STUN responder every replica runs on UDP (proto/stun.py has the codec and its bounds).

Stateless: each well-formed binding request gets one small answer (MAX_ANSWER_BYTES), anything
else is dropped and counted, so a flood costs the replica only the packets it receives.
"""
from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Counter

from raftmesh.proto import stun

log = logging.getLogger("raftmesh.stun")


class StunResponder(asyncio.DatagramProtocol):
    def __init__(self, registry: CollectorRegistry):
        self.transport: asyncio.DatagramTransport | None = None
        self.packets = Counter("raftmesh_stun_packets", "STUN packets received, by outcome",
                               ["outcome"], registry=registry)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            reply = stun.answer(data, addr[:2])
        except stun.StunError:
            self.packets.labels("dropped").inc()
            return
        self.packets.labels("answered").inc()
        self.transport.sendto(reply, addr)


async def start(host: str, port: int, registry: CollectorRegistry) -> asyncio.DatagramTransport:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: StunResponder(registry),
                                                       local_addr=(host, port))
    log.info("STUN on udp %s:%d", host, port)
    return transport
