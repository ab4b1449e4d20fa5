"""Sends the daemon's acks from their own thread.

An ack only feeds the control plane's metrics, so it must never hold up the loop that
applies frames: a replica slow to answer (overloaded, or failing) would otherwise delay the
next netmap by the ack's timeout. An ack that fails in transit (no answer, a 5xx) is tried
again a few times unless a newer one is waiting (which covers every earlier version): after a
quiet change, such as a revocation, no later ack may come to report it. Its ages grow by the
time it waited, so the replica still computes when each version was applied.
"""
from __future__ import annotations

import logging
import queue
import socket
import threading
import time

from nacl.signing import SigningKey

from raftmesh.proto.ack_datagram import CONFIRM_WAIT, AckDatagramError, decode_confirm, encode_ack
from raftmesh.proto.routes import ACK

from .control_client import ControlClient, ControlError

log = logging.getLogger("raftmesh.agent")
ACK_TIMEOUT = 5.0
MAX_QUEUED = 8
ATTEMPTS = 3
RETRY_AFTER = 1.0  # seconds before the second attempt, doubling
MAX_AGE = 86400.0  # the API's limit on an age
UDP_RETRY_AFTER = 60.0  # after an unconfirmed datagram, acks to that replica go over HTTP this long


class AckSender:
    def __init__(self, machine_key: SigningKey):
        self.machine_key = machine_key
        self._queue: queue.Queue = queue.Queue(MAX_QUEUED)
        self._closing = threading.Event()
        self._udp: socket.socket | None = None  # for ack datagrams, made on first use
        # Replica ack addresses whose last datagram went unconfirmed, until when to use HTTP
        # only: behind a TCP-only load balancer every datagram would otherwise cost a wait.
        self._udp_unconfirmed: dict[tuple[str, int], float] = {}
        self._thread = threading.Thread(target=self._run, name="acks", daemon=True)
        self._thread.start()

    def send(self, server: str, body: dict, stream_auth: tuple[str, bytes] | None = None,
             ack_addr: tuple[str, int] | None = None) -> None:
        """To `server`, the replica that sent the frames (it holds their cause times);
        tagged under the stream's key when `stream_auth` is given (AgentNetmap.stream_auth),
        then as a datagram first if the stream named an `ack_addr` (proto/ack_datagram.py)."""
        try:
            self._queue.put_nowait((server, body, stream_auth, ack_addr, time.monotonic()))
        except queue.Full:
            log.info("ack of %d dropped: %d acks still unsent", body["version"], MAX_QUEUED)

    def close(self) -> None:
        self._closing.set()  # ends a retry wait
        self._queue.put(None)
        self._thread.join(timeout=ACK_TIMEOUT + 1)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                if self._udp is not None:
                    self._udp.close()
                return
            server, body, stream_auth, ack_addr, queued_at = item
            if ack_addr is not None and stream_auth is not None and \
                    self._udp_unconfirmed.get(ack_addr, 0.0) <= time.monotonic():
                if self._datagram(ack_addr, stream_auth, aged(body, time.monotonic() - queued_at)):
                    self._udp_unconfirmed.pop(ack_addr, None)
                    continue
                self._udp_unconfirmed[ack_addr] = time.monotonic() + UDP_RETRY_AFTER
            client = ControlClient([server], self.machine_key, timeout=ACK_TIMEOUT)
            for attempt in range(ATTEMPTS):
                try:
                    client.signed_request("POST", ACK,
                                          aged(body, time.monotonic() - queued_at),
                                          timeout=ACK_TIMEOUT, stream_auth=stream_auth)
                    break
                except (ControlError, OSError) as e:
                    if (isinstance(e, ControlError) and e.status < 500) or attempt + 1 == ATTEMPTS \
                            or not self._queue.empty() \
                            or self._closing.wait(RETRY_AFTER * 2 ** attempt):
                        log.info("ack of %d failed: %s", body["version"], e)
                        break

    def _datagram(self, addr: tuple[str, int], stream_auth: tuple[str, bytes], body: dict) -> bool:
        """Send the ack as one datagram; True once the replica confirmed it in time (else
        the caller sends it over HTTP: a datagram may be lost, or the path block UDP)."""
        try:
            data = encode_ack(stream_auth, body)
            if self._udp is None:
                self._udp = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET,
                                          socket.SOCK_DGRAM)
            self._udp.sendto(data, addr)
            deadline = time.monotonic() + CONFIRM_WAIT
            while (left := deadline - time.monotonic()) > 0:
                self._udp.settimeout(left)
                if decode_confirm(self._udp.recv(2048)) == (stream_auth[0], body["version"]):
                    return True
        except (OSError, AckDatagramError):  # (a timeout is an OSError)
            pass
        return False


def aged(body: dict, waited: float) -> dict:
    """`body` with each version's age grown by `waited` seconds (time spent queued)."""
    if waited <= 0 or not body.get("applied"):
        return body
    return dict(body, applied=[[v, min(MAX_AGE, age + waited)] for v, age in body["applied"]])
