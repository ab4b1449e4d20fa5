"""The agent's resolver on 100.100.100.100:53, UDP and TCP: the I/O around agent/magic_dns.py.

One thread reads UDP packets and answers mesh names itself; forwarding waits on upstream
resolvers, so it runs in a small pool with a bound on queries in flight: past it, a query
gets SERVFAIL at once instead of queueing without limit (a flood cannot grow memory or
threads). TCP (for answers too large for UDP) is served by a few connection threads, each
connection idle-limited and closed after a few queries; past them a connection is closed at
once. Nothing a packet holds can end either loop.
"""
from __future__ import annotations

import logging
import socket
import struct
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
TCP_CONNECTIONS = 4
TCP_IDLE = 5.0  # seconds a TCP client may take to send its next query
TCP_QUERIES = 16  # per connection


class DnsServer:
    def __init__(self, address: str = SERVICE_ADDRESS, port: int = 53):
        self.table = DnsTable()  # replaced whole (one reference swap) on every netmap
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, port))
        self.sock.settimeout(0.5)  # lets close() end the loop
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((address, port))
        self.listener.listen(TCP_CONNECTIONS)
        self.listener.settimeout(0.5)
        self._pool = ThreadPoolExecutor(FORWARD_WORKERS, thread_name_prefix="dns-forward")
        self._slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        self._tcp_pool = ThreadPoolExecutor(TCP_CONNECTIONS, thread_name_prefix="dns-tcp")
        self._tcp_slots = threading.BoundedSemaphore(TCP_CONNECTIONS)
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=self._serve, name="magic-dns", daemon=True),
                         threading.Thread(target=self._accept, name="magic-dns-tcp", daemon=True)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def close(self) -> None:
        self._closed.set()
        for t in self._threads:
            t.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._tcp_pool.shutdown(wait=False, cancel_futures=True)
        self.sock.close()
        self.listener.close()

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
            self._send(forwarded_reply(fwd.query, self._ask(fwd), fwd.max_size), client)
        finally:
            self._slots.release()

    @staticmethod
    def _ask(fwd: Forward):
        """The first answer other than SERVFAIL from the resolvers in turn, over the client's
        transport; else the last answer, or None."""
        answer = None
        for resolver in fwd.resolvers:
            try:
                if fwd.tcp:
                    answer = dns.query.tcp(fwd.query, resolver, timeout=UPSTREAM_TIMEOUT)
                else:
                    answer = dns.query.udp(fwd.query, resolver, timeout=UPSTREAM_TIMEOUT,
                                           ignore_unexpected=True)
            except (dns.exception.DNSException, OSError, ValueError) as e:
                log.debug("upstream %s: %s", resolver, e)
                continue
            if answer.rcode() != dns.rcode.SERVFAIL:
                break
        return answer

    # -- TCP ------------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, client = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            if not self._tcp_slots.acquire(blocking=False):
                conn.close()  # as many connections as it serves: the client may retry
                continue
            self._tcp_pool.submit(self._connection, conn, client)

    def _connection(self, conn: socket.socket, client: tuple) -> None:
        """Queries on one connection, each a 2-byte length and a message (RFC 1035 4.2.2)."""
        try:
            conn.settimeout(TCP_IDLE)
            for _ in range(TCP_QUERIES):
                prefix = _read_exactly(conn, 2)
                message = prefix and _read_exactly(conn, struct.unpack("!H", prefix)[0])
                if not message:
                    return
                decision = decide(message, client[0], self.table, tcp=True)
                if isinstance(decision, Forward):
                    decision = Reply(forwarded_reply(decision.query, self._ask(decision),
                                                     decision.max_size))
                if not isinstance(decision, Reply):
                    return
                conn.sendall(struct.pack("!H", len(decision.wire)) + decision.wire)
        except OSError as e:
            log.debug("DNS over TCP from %s: %s", client[0], e)
        except Exception:  # a bug in one answer must not take a connection thread down
            log.exception("DNS over TCP from %s", client[0])
        finally:
            conn.close()
            self._tcp_slots.release()

    def _send(self, wire: bytes, client: tuple) -> None:
        try:
            self.sock.sendto(wire, client)
        except OSError as e:
            log.debug("DNS reply to %s: %s", client[0], e)


def _read_exactly(conn: socket.socket, n: int) -> bytes | None:
    """`n` bytes, or None if the client closed the connection first."""
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data
