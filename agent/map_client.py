"""One map-stream connection: a signed GET, then decoded frames from a reader thread.

The agent's main loop must never block on a dead stream: frames arrive on a queue it polls
with a timeout (so local expiry and the keepalive watchdog keep running), and `close()`
shuts the socket down so the reader thread ends at once instead of at its read timeout.
"""
from __future__ import annotations

import http.client
import json
import queue
import secrets
import socket
import threading
import time
import urllib.parse

from nacl.signing import SigningKey

from raftmesh.proto.frames import FrameError, FrameReader, stream_keypair
from raftmesh.proto.machine_auth import sign_headers
from raftmesh.proto.routes import (DEFAULT_KEEPALIVE, HEADER_ACK_PORT, HEADER_KEEPALIVE, HEADER_REPLICA,
                                   HEADER_STUN_PORT, MAP, udp_port)
from raftmesh.proto.version import version_header
from raftmesh.proto.wire import HEADER_STREAM_KEY

from .control_client import ControlError


class MapStream:
    def __init__(self, server: str, key: SigningKey, since: int | None, read_timeout: float = 35.0):
        url = urllib.parse.urlsplit(server)
        if url.scheme not in ("http", "https"):
            raise ValueError(f"server URL must be http or https: {server!r}")
        conn_cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        self.server = server
        self.conn = conn_cls(url.hostname, url.port, timeout=read_timeout)
        path = (url.path.rstrip("/") + MAP) + ("" if since is None else f"?since={since}")
        signed_path = path.split("?")[0]
        self.nonce = secrets.token_hex(12)  # every frame of this stream is signed with it
        self.stream_keys = stream_keypair()  # frames after the first are tagged under it
        headers = sign_headers(key, "GET", signed_path, b"", time.time(), self.nonce)
        headers[HEADER_STREAM_KEY] = self.stream_keys[0].hex()
        headers.update(version_header())
        self.frames: queue.Queue = queue.Queue()
        self.replica: str | None = None
        self.keepalive = DEFAULT_KEEPALIVE
        self.stun: tuple[str, int] | None = None  # the replica's STUN responder (version 2)
        self.ack_addr: tuple[str, int] | None = None  # where it takes ack datagrams (version 3)
        self._closed = False
        try:
            self.conn.request("GET", path, headers=headers)
            resp = self.conn.getresponse()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            raise
        if resp.status != 200:
            raw = resp.read()
            self.conn.close()
            try:
                err = json.loads(raw)["error"]
                raise ControlError(resp.status, err["code"], err["message"])
            except (ValueError, KeyError, TypeError):
                raise ControlError(resp.status, "http_error", raw[:200].decode(errors="replace"))
        self.replica = resp.getheader(HEADER_REPLICA)
        try:
            self.keepalive = float(resp.getheader(HEADER_KEEPALIVE, DEFAULT_KEEPALIVE))
        except ValueError:
            pass
        if (stun_port := udp_port(resp.getheader(HEADER_STUN_PORT))) is not None:
            self.stun = (url.hostname, stun_port)
        if (ack_port := udp_port(resp.getheader(HEADER_ACK_PORT))) is not None:
            self.ack_addr = (url.hostname, ack_port)
        self._resp = resp
        self._thread = threading.Thread(target=self._read, name="map-stream", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        reader = FrameReader()
        try:
            while True:
                data = self._resp.read1(65536)
                if not data:
                    self.frames.put(("eof", None))
                    return
                for frame in reader.feed(data):
                    self.frames.put(("frame", frame))
        except FrameError as e:
            self.frames.put(("error", e))
        except Exception as e:  # socket errors, timeouts, the socket shut down by close()
            self.frames.put(("error", e if not self._closed else EOFError("closed")))

    def next(self, timeout: float):
        """("frame", dict) | ("eof", None) | ("error", exc) | None on timeout."""
        try:
            return self.frames.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._closed = True
        sock = self.conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conn.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
