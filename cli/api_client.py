"""A small synchronous client for the admin API (stdlib only, so the CLI starts fast).

Every replica serves the whole API, so the client takes several base URLs and moves on to
the next one when a replica cannot serve the request at all (unreachable, or 503
`no_leader`/`not_ready`, which both guarantee nothing was applied). Each write carries one
Idempotency-Key for all its attempts, so retrying it on another replica never applies it
twice, even after a timeout.
"""
from __future__ import annotations

import http.client
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

API_PREFIX = "/api/v1"
# Above the replicas' default write_timeout (5 s), so the server reports a slow write
# itself (outcome_unknown) instead of the client giving up first.
DEFAULT_TIMEOUT = 15.0
# 503s after which another replica may do better and nothing was applied here.
_TRY_NEXT = ("no_leader", "not_ready")
_WRITES = ("POST", "PUT", "PATCH", "DELETE")


class ClientError(Exception):
    """An error answer (or none at all); `code` is the server's stable error code."""

    def __init__(self, status: int | None, code: str, message: str, details: list | None = None):
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details or []


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else "http://" + url


def split_servers(value: str | list[str] | None) -> list[str]:
    """'a,b' or ['a', 'b,c'] -> normalized URLs, in order, without duplicates."""
    if not value:
        return []
    items = value if isinstance(value, list) else [value]
    urls = [normalize_url(u) for item in items for u in str(item).split(",") if u.strip()]
    return list(dict.fromkeys(urls))


class Client:
    def __init__(self, servers: str | list[str], api_key: str | None, timeout: float = DEFAULT_TIMEOUT):
        self.servers = split_servers(servers)
        if not self.servers:
            raise ValueError("no server URL given")
        self.api_key, self.timeout = api_key, timeout
        self.last_url: str | None = None  # the replica that answered last; tried first next time

    # -- verbs --------------------------------------------------------------------------
    def get(self, path: str, **query) -> Any:
        return self.request("GET", path, query=query)

    def post(self, path: str, body: Any = None, **query) -> Any:
        return self.request("POST", path, body=body, query=query)

    def put(self, path: str, body: Any = None, **query) -> Any:
        return self.request("PUT", path, body=body, query=query)

    def patch(self, path: str, body: Any = None) -> Any:
        return self.request("PATCH", path, body=body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    # -- core ---------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, query: dict | None = None) -> Any:
        """JSON answer of the first replica able to serve; ClientError otherwise.

        `body` may be a str (sent as text/plain, e.g. a policy) or anything JSON-serialisable.
        """
        data, headers = self._encode(method, body)
        target = API_PREFIX + path + _query_string(query)
        failures: list[str] = []
        last_error: ClientError | None = None
        for base in self._order():
            try:
                answer = self._send(base, method, target, data, headers)
            except ClientError as e:
                if e.code not in _TRY_NEXT:
                    raise
                last_error = e
                failures.append(f"{base} ({e.code})")
                continue
            except _Unreachable as e:
                failures.append(f"{base} ({e})")
                continue
            self.last_url = base
            return answer
        tried = "tried " + "; ".join(failures)
        if last_error is None:
            raise ClientError(None, "unreachable", "no server reachable: " + tried)
        if len(failures) == 1:
            raise last_error
        raise ClientError(last_error.status, last_error.code, f"{last_error.message} ({tried})")

    def _order(self) -> list[str]:
        if self.last_url in self.servers:
            return [self.last_url] + [u for u in self.servers if u != self.last_url]
        return list(self.servers)

    def _encode(self, method: str, body: Any) -> tuple[bytes | None, dict]:
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if method in _WRITES:
            headers["Idempotency-Key"] = "cli-" + uuid.uuid4().hex
        if body is None:
            return None, headers
        if isinstance(body, str):
            headers["Content-Type"] = "text/plain; charset=utf-8"
            return body.encode(), headers
        headers["Content-Type"] = "application/json"
        return json.dumps(body).encode(), headers

    def _send(self, base: str, method: str, target: str, data: bytes | None, headers: dict) -> Any:
        req = urllib.request.Request(base + target, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return _decode(resp.status, resp.read())
        except urllib.error.HTTPError as e:
            raise _error_from(e.code, e.read())
        except urllib.error.URLError as e:
            raise _Unreachable(str(e.reason)) from e
        except (OSError, http.client.HTTPException, socket.timeout) as e:
            raise _Unreachable(str(e) or type(e).__name__) from e


class _Unreachable(Exception):
    """No HTTP answer from one replica (refused, reset, timed out)."""


def _query_string(query: dict | None) -> str:
    if not query:
        return ""
    pairs = [(k, _query_value(v)) for k, v in query.items() if v is not None and v is not False]
    return "?" + urllib.parse.urlencode(pairs) if pairs else ""


def _query_value(v: Any) -> str:
    return "true" if v is True else str(v)


def _decode(status: int, raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        raise ClientError(status, "bad_response", f"HTTP {status} with a non-JSON body: {raw[:200]!r}")


def _error_from(status: int, raw: bytes) -> ClientError:
    try:
        err = json.loads(raw)["error"]
        return ClientError(status, err["code"], err.get("message", ""), err.get("details"))
    except (ValueError, KeyError, TypeError):
        text = raw[:200].decode(errors="replace").strip()
        return ClientError(status, f"http_{status}", text or "no error body")
