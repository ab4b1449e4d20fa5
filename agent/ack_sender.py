"""Sends the daemon's acks from their own thread.

An ack only feeds the control plane's metrics, so it must never hold up the loop that
applies frames: a replica slow to answer (overloaded, or failing) would otherwise delay the
next netmap by the ack's timeout. Acks that cannot be sent are dropped (logged), not retried:
a later ack covers every earlier version.
"""
from __future__ import annotations

import logging
import queue
import threading

from nacl.signing import SigningKey

from .control_client import ControlClient, ControlError

log = logging.getLogger("raftmesh.agent")
ACK_TIMEOUT = 5.0
MAX_QUEUED = 8


class AckSender:
    def __init__(self, machine_key: SigningKey):
        self.machine_key = machine_key
        self._queue: queue.Queue = queue.Queue(MAX_QUEUED)
        self._thread = threading.Thread(target=self._run, name="acks", daemon=True)
        self._thread.start()

    def send(self, server: str, body: dict) -> None:
        """To `server`, the replica that sent the frames (it holds their cause times)."""
        try:
            self._queue.put_nowait((server, body))
        except queue.Full:
            log.info("ack of %d dropped: %d acks still unsent", body["version"], MAX_QUEUED)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=ACK_TIMEOUT + 1)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            server, body = item
            try:
                ControlClient([server], self.machine_key, timeout=ACK_TIMEOUT).signed_request(
                    "POST", "/machine/ack", body, timeout=ACK_TIMEOUT)
            except (ControlError, OSError) as e:
                log.info("ack of %d failed: %s", body["version"], e)
