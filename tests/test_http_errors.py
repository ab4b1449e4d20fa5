"""Requests the HTTP parser refuses get JSON errors and cost one log line, not a traceback.

Raw sockets against a real replica: each malformed request below once got a text/plain
answer from aiohttp and a multi-line ERROR traceback in the replica's log.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import socket

import pytest

from raftmesh.api.errors import ERROR_CODES
from raftmesh.api.http_errors import RateLimitedLog
from raftmesh.lab.local_cluster import LocalCluster
from waiting import wait_until

HOST = b"Host: replica\r\n"
MALFORMED = {
    "over-long request line": b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n" + HOST + b"\r\n",
    "over-long header": b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-Long: " + b"a" * 10_000 + b"\r\n\r\n",
    "too many headers": b"GET /healthz HTTP/1.1\r\n" + HOST
                        + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",
    "control byte in a header": b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-A: a\x01b\r\n\r\n",
    "NUL in the path": b"GET /a\x00b HTTP/1.1\r\n" + HOST + b"\r\n",
    "Content-Length and Transfer-Encoding": b"POST /api/v1/users HTTP/1.1\r\n" + HOST
        + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two Content-Lengths": b"POST /api/v1/users HTTP/1.1\r\n" + HOST
        + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    "bad chunk size": b"POST /api/v1/users HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
    "unknown method": b"FROB /api/v1/users HTTP/1.1\r\n" + HOST + b"\r\n",
    "method that is not a token": b"GE(T / HTTP/1.1\r\n" + HOST + b"\r\n",
    "unknown HTTP version": b"GET / HTTP/9.9\r\n" + HOST + b"\r\n",
    "TLS on the HTTP port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)),
    "no Host": b"GET /healthz HTTP/1.1\r\n\r\n",
}


def exchange(cluster: LocalCluster, data: bytes) -> tuple[int, dict, bytes]:
    """Send `data`, read the answer until the replica closes; (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", cluster.replicas[0].api_port), timeout=10) as s:
        s.sendall(data)
        raw = b""
        while b"\r\n\r\n" not in raw or len(raw) < raw.index(b"\r\n\r\n") + 4 + _length(raw):
            chunk = s.recv(65536)
            if not chunk:
                break
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _length(raw: bytes) -> int:
    for line in raw.split(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def assert_json_error(status: int, headers: dict, body: bytes, code: str) -> dict:
    where = f"{status} {headers} {body[:300]!r}"
    assert headers.get("content-type", "").startswith("application/json"), where
    err = json.loads(body)["error"]
    assert err["code"] == code and ERROR_CODES[code][0] == status and err["message"], where
    return err


def log_of(cluster: LocalCluster) -> str:
    with open(os.path.join(cluster.log_dir, cluster.replicas[0].id + ".log"), errors="replace") as f:
        return f.read()


@pytest.mark.parametrize("label", MALFORMED)
def test_malformed_requests_get_a_json_400(single_replica, label):
    status, headers, body = exchange(single_replica, MALFORMED[label])
    err = assert_json_error(status, headers, body, "bad_request")
    assert err["message"].startswith("malformed HTTP request"), err


def bad_gzip_requests(cluster: LocalCluster) -> list[bytes]:
    return [b"POST /api/v1/users HTTP/1.1\r\n" + HOST + f"Authorization: Bearer {cluster.admin_key}\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Encoding: gzip\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(data) + data
            for data in (b"not gzip", gzip.compress(b'{"name": "x"}')[:-9] + b"\xff" * 9)]


def test_a_body_that_does_not_decompress_is_a_json_400(single_replica):
    for request in bad_gzip_requests(single_replica):
        assert_json_error(*exchange(single_replica, request), "bad_request")


def test_an_unknown_expectation_is_a_json_417(single_replica):
    request = (b"POST /api/v1/users HTTP/1.1\r\n" + HOST + f"Authorization: Bearer {single_replica.admin_key}\r\n".encode()
               + b"Expect: garbage\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
               + b"Connection: close\r\n\r\n{}")
    err = assert_json_error(*exchange(single_replica, request), "expectation_failed")
    assert "garbage" in err["message"]


def test_a_flood_of_garbage_logs_a_few_lines_and_no_traceback(single_replica):
    before = len(log_of(single_replica).splitlines())
    rounds = 20
    for _ in range(rounds):
        for data in [*MALFORMED.values(), *bad_gzip_requests(single_replica)]:
            status, _, _ = exchange(single_replica, data)
            assert status == 400
    # a marker request that logs nothing itself: the replica has handled everything before it
    assert exchange(single_replica, b"GET /healthz HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")[0] == 200
    wait_until(lambda: "malformed HTTP request" in log_of(single_replica), timeout=10)
    log = log_of(single_replica)
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    new = log.splitlines()[before:]
    kinds = len(MALFORMED) + 2  # at most a line per kind of parser error, within the interval
    assert len(new) <= kinds < rounds * len(MALFORMED) // 10, new


def test_rate_limited_log_counts_what_it_did_not_log(caplog):
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("test.ratelimit"), 10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "test.ratelimit"):
        for t in (0, 1, 2, 9.9):
            now[0] = t
            limited.warning("LineTooLong", "line too long")
        limited.warning("BadStatusLine", "bad status line")  # another kind has its own budget
        now[0] = 10.5
        limited.warning("LineTooLong", "line too long")
    assert [r.getMessage() for r in caplog.records] == [
        "line too long", "bad status line",
        "line too long (and 3 more LineTooLong in the last 10s, not logged)"]
