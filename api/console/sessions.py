"""Console sessions: what a browser holds instead of an API key.

A session is a random token in an HttpOnly, SameSite=Strict cookie, kept server-side (in
this replica's memory, by hash) and bound to the API key the person signed in with (or the
one single sign-on made for them), so every request through a session is checked against
that key's current record: revoking or expiring the key ends its sessions at once. Because a
browser sends cookies by itself, every change made through a session must also carry the
session's CSRF token in a header and come from this site's own origin.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from aiohttp import web

from ..errors import APIError

COOKIE = "rm_session"
CSRF_HEADER = "X-CSRF-Token"
LIFETIME = 8 * 3600.0  # at most, whatever the key's own expiry
IDLE = 3600.0  # unused this long, a session ends
MAX_SESSIONS = 10_000  # memory bound: beyond it the oldest sessions end


@dataclass
class Session:
    key_id: str
    csrf: str
    expires_at: float
    last_used: float


class Sessions:
    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._by_hash: dict[str, Session] = {}

    def create(self, key_id: str, key_expires_at: float | None) -> tuple[str, Session]:
        now = self.clock()
        token = secrets.token_urlsafe(32)
        until = now + LIFETIME if key_expires_at is None else min(now + LIFETIME, key_expires_at)
        session = Session(key_id, secrets.token_urlsafe(24), until, now)
        if len(self._by_hash) >= MAX_SESSIONS:
            del self._by_hash[min(self._by_hash, key=lambda h: self._by_hash[h].last_used)]
        self._by_hash[_digest(token)] = session
        return token, session

    def get(self, token: str) -> Session | None:
        """The live session of `token`; an expired or idle one is forgotten."""
        h = _digest(token)
        session, now = self._by_hash.get(h), self.clock()
        if session is None:
            return None
        if now >= session.expires_at or now - session.last_used >= IDLE:
            del self._by_hash[h]
            return None
        session.last_used = now
        return session

    def end(self, token: str) -> None:
        self._by_hash.pop(_digest(token), None)


SESSIONS = web.AppKey("console_sessions", Sessions)
# On every console answer: its own scripts and styles only (none inline, none from elsewhere),
# never framed, never cached.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def session_of(request: web.Request) -> Session:
    """The request's session, checked for a change: CSRF token and origin. Raises 401/403."""
    token = request.cookies.get(COOKIE, "")
    session = request.app[SESSIONS].get(token) if token else None
    if session is None:
        raise APIError(401, "unauthenticated", "console session unknown or expired; sign in again")
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        check_origin(request)
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
            raise APIError(403, "forbidden", f"a change through a console session needs its "
                           f"{CSRF_HEADER} header")
    return session


def check_origin(request: web.Request) -> None:
    """The Origin a browser puts on every change must be this site (Host: what the browser
    addressed, also through a load balancer)."""
    origin = request.headers.get("Origin")
    if not origin or urlsplit(origin).netloc.lower() != request.host.lower():
        raise APIError(403, "forbidden", f"a change through a console session must come from "
                       f"this site's pages (Origin {origin or 'missing'})")


def is_tls(request: web.Request) -> bool:
    """HTTPS as the browser sees it: directly, or terminated by the load balancer."""
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def set_cookie(response: web.StreamResponse, request: web.Request, name: str, value: str,
               max_age: float, same_site: str = "Strict", path: str = "/") -> None:
    response.set_cookie(name, value, max_age=max(0, int(max_age)), path=path, httponly=True,
                        samesite=same_site, secure=is_tls(request))


SSO_COOKIE = "rm_sso"
SSO_COOKIE_PATH = "/oidc/callback"
MAX_SSO_LOGINS = 1000


class SsoLogins:
    """Console sign-ins waiting for the identity provider's redirect, by the id of the API key
    the login will create, each bound to the browser that started it (a nonce in a cookie):
    a callback URL someone else's browser completes signs nobody in here. Held by the replica
    that started the login, which the load balancer's console stickiness brings it back to
    (deploy/haproxy); a callback landing elsewhere completes the login without a session."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._waiting: dict[str, tuple[str, float]] = {}  # key id -> (nonce hash, until)

    def start(self, key_id: str, until: float) -> str:
        now = self.clock()
        self._waiting = {k: w for k, w in self._waiting.items() if w[1] > now}
        if len(self._waiting) >= MAX_SSO_LOGINS:
            del self._waiting[min(self._waiting, key=lambda k: self._waiting[k][1])]
        nonce = secrets.token_urlsafe(24)
        self._waiting[key_id] = (_digest(nonce), until)
        return nonce

    def finish(self, key_id: str, nonce: str) -> bool:
        waiting = self._waiting.pop(key_id, None)
        return (waiting is not None and waiting[1] > self.clock()
                and hmac.compare_digest(waiting[0], _digest(nonce)))


SSO_LOGINS = web.AppKey("console_sso_logins", SsoLogins)


def sso_signed_in(request: web.Request, key_id: str, key_expiry: float | None) -> web.Response | None:
    """After a completed admin login: a console session and the way back to the console if
    this browser started it here as a console sign-in, else None (the CLI's login)."""
    logins = request.app.get(SSO_LOGINS)
    if logins is None or not logins.finish(key_id, request.cookies.get(SSO_COOKIE, "")):
        return None
    token, session = request.app[SESSIONS].create(key_id, key_expiry)
    response = web.Response(status=303, headers={"Location": "/ui/", **SECURITY_HEADERS})
    set_cookie(response, request, COOKIE, token, session.expires_at - request.app[SESSIONS].clock())
    response.del_cookie(SSO_COOKIE, path=SSO_COOKIE_PATH)
    return response
