"""The agent's HTTP client for the control plane: signed requests, failover between replicas.

Every request is signed with the machine key. A connection error or a 5xx answer moves on
to the next replica (or load-balancer URL) with exponential backoff and jitter, so a dead
replica costs one attempt, and a cluster-wide outage does not turn into a retry storm.
"""
from __future__ import annotations

import json
import random
import secrets
import time
import urllib.error
import urllib.request

from nacl.signing import SigningKey

from raftmesh.proto.machine_auth import b64, sign_headers, tag_headers
from raftmesh.proto.version import version_header

from .session import Backoff


class ControlError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class ControlClient:
    def __init__(self, servers: list[str], machine_key: SigningKey, timeout: float = 10.0):
        if not servers:
            raise ValueError("at least one server URL is needed")
        self.servers = [s.rstrip("/") for s in servers]
        self.key, self.timeout = machine_key, timeout
        self.current = 0

    @property
    def server(self) -> str:
        return self.servers[self.current]

    def rotate(self) -> None:
        self.current = (self.current + 1) % len(self.servers)

    def signed_request(self, method: str, path: str, body: dict | None = None,
                       stream: bool = False, timeout: float | None = None,
                       stream_auth: tuple[str, bytes] | None = None):
        """`stream_auth` (AgentNetmap.stream_auth): tag the request under the stream's key
        instead of signing it (only acks accept that, on the stream's replica)."""
        data = b"" if body is None else json.dumps(body).encode()
        nonce = secrets.token_hex(12)
        if stream_auth is None:
            headers = sign_headers(self.key, method, path, data, time.time(), nonce)
        else:
            headers = tag_headers(stream_auth[1], stream_auth[0], b64(bytes(self.key.verify_key)),
                                  method, path, data, time.time(), nonce)
        headers.update(version_header())
        if body is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.server + path, data=data if body is not None else None,
                                     method=method, headers=headers)
        try:
            resp = urllib.request.urlopen(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                err = json.loads(raw)["error"]
                raise ControlError(e.code, err["code"], err["message"]) from None
            except (ValueError, KeyError, TypeError):
                raise ControlError(e.code, "http_error", raw[:200].decode(errors="replace")) from None
        if stream:
            return resp
        with resp:
            return json.loads(resp.read())

    def call(self, method: str, path: str, body: dict | None = None, deadline: float = 30.0):
        """One logical request, failing over across servers until `deadline` seconds pass."""
        backoff = Backoff(random.Random())
        end = time.monotonic() + deadline
        while True:
            try:
                return self.signed_request(method, path, body)
            except ControlError as e:
                if e.status < 500:
                    raise
                last = e
            except OSError as e:
                last = e
            self.rotate()
            if time.monotonic() > end:
                raise last
            time.sleep(min(backoff.next_delay(), max(0.0, end - time.monotonic())))
