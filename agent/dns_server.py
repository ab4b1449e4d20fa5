"""The agent's resolver on 100.100.100.100:53 (UDP): the I/O around agent/magic_dns.py.

One thread reads packets and answers mesh names itself; forwarding waits on upstream
resolvers, so it runs in a small pool with a bound on queries in flight: past it, a query
gets SERVFAIL at once instead of queueing without limit (a flood cannot grow memory or
threads). Nothing a packet holds can end the loop.
"""
from __future__ import annotations

import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import dns.exception
import dns.query
import dns.rcode

from .magic_dns import SERVICE_ADDRESS, DnsTable, Forward, Reply, decide, forwarded_reply

log = logging.getLogger("raftmesh.agent.dns")
FORWARD_WORKERS = 8
MAX_IN_FLIGHT = 64
UPSTREAM_TIMEOUT = 2.0  # per resolver tried


class DnsServer:
    def __init__(self, address: str = SERVICE_ADDRESS, port: int = 53):
        self.table = DnsTable()  # replaced whole (one reference swap) on every netmap
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, port))
        self.sock.settimeout(0.5)  # lets close() end the loop
        self._pool = ThreadPoolExecutor(FORWARD_WORKERS, thread_name_prefix="dns-forward")
        self._slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="magic-dns", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.sock.close()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                packet, client = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                if self._closed.is_set():
                    return
                continue
            try:
                self._handle(packet, client)
            except Exception:  # a bug in one answer must not stop the resolver
                log.exception("DNS query from %s", client[0])

    def _handle(self, packet: bytes, client: tuple) -> None:
        decision = decide(packet, client[0], self.table)
        if isinstance(decision, Reply):
            self._send(decision.wire, client)
        elif isinstance(decision, Forward):
            if not self._slots.acquire(blocking=False):
                self._send(forwarded_reply(decision.query, None, decision.max_size), client)
                return
            self._pool.submit(self._forward, decision, client)

    def _forward(self, fwd: Forward, client: tuple) -> None:
        try:
            answer = None
            for resolver in fwd.resolvers:
                try:
                    answer = dns.query.udp(fwd.query, resolver, timeout=UPSTREAM_TIMEOUT,
                                           ignore_unexpected=True)
                except (dns.exception.DNSException, OSError, ValueError) as e:
                    log.debug("upstream %s: %s", resolver, e)
                    continue
                if answer.rcode() != dns.rcode.SERVFAIL:
                    break
            self._send(forwarded_reply(fwd.query, answer, fwd.max_size), client)
        finally:
            self._slots.release()

    def _send(self, wire: bytes, client: tuple) -> None:
        try:
            self.sock.sendto(wire, client)
        except OSError as e:
            log.debug("DNS reply to %s: %s", client[0], e)
