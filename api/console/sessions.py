"""Console sessions: what a browser holds instead of an API key.

A session is a replicated record (cluster/session_apply.py): a short-lived credential
`rms_<id>_<secret>`, stored as a hash like an API key and bound to the API key the person
signed in with (or the one single sign-on made for them). Every replica knows it, so a
browser stays signed in through any replica and through the loss of one. Every request
through a session is checked against that key's current record: revoking or expiring the
key ends its sessions at once, and a session never outlives its key. The session token is
only ever a cookie: it is not an API key (another prefix, another table), so it gives
nothing through an Authorization header.

Nothing here is per-replica state. Because a browser sends cookies by itself, every change
made through a session must also carry the session's CSRF token in a header (an HMAC of the
session id under a key derived from the cluster secret, so any replica can check it) and
come from this site's own origin. The idle timeout is a last-activity time in the cookie,
signed the same way and refreshed on every answer.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable
from urllib.parse import urlsplit

from aiohttp import web

from raftmesh.cluster.commands import SessionCreate, SessionEnd
from raftmesh.cluster.raft import Raft

from .. import auth
from ..errors import APIError
from ..read_barrier import applied_or_after_barrier

if TYPE_CHECKING:
    from ..routing import Ctx

COOKIE = "rm_session"
CSRF_HEADER = "X-CSRF-Token"
TOKEN_PREFIX = "rms"
LIFETIME = 8 * 3600.0  # at most, whatever the key's own expiry
IDLE = 3600.0  # unused this long, a session ends


@dataclass
class Session:
    id: str
    key_id: str
    csrf: str
    expires_at: float


class Sessions:
    """Session cookies minted and checked by this replica from replicated records and keys
    derived from the cluster secret; `clock` is the wall clock (a test moves it)."""

    def __init__(self, replica: Raft, clock: Callable[[], float] = time.time):
        self.replica, self.clock = replica, clock
        secret = replica.config.cluster_secret.encode()
        self._csrf_key = _derive(secret, b"raftmesh console csrf v1")
        self._activity_key = _derive(secret, b"raftmesh console activity v1")
        self._sso_key = _derive(secret, b"raftmesh console sso v1")

    async def create(self, ctx: "Ctx", key_id: str, key_expires_at: float | None) -> tuple[str, Session]:
        """A new session through Raft; (the cookie's value, the session)."""
        now = self.clock()
        sid, token, digest = auth.new_secret_token(TOKEN_PREFIX)
        until = now + LIFETIME if key_expires_at is None else min(now + LIFETIME, key_expires_at)
        made = await ctx.write(SessionCreate(id=sid, key_id=key_id, hash=digest, expires_at=until))
        return self.cookie_value(token, now), Session(sid, key_id, self.csrf(sid), made["value"]["expires_at"])

    async def end(self, session_id: str) -> None:
        """Best effort (the session is refused anyway): forgotten on every replica, so a
        replica whose clock lags cannot revive it."""
        cmd = SessionEnd(time=time.time(), actor="system", id=session_id)
        try:
            await asyncio.wait_for(self.replica.propose_async(cmd), self.replica.config.write_timeout)
        except asyncio.TimeoutError:
            pass

    async def find(self, cookie: str) -> tuple[Session, str] | None:
        """The live session of a cookie and the cookie's refreshed value; an expired or idle
        session is ended."""
        token, _, activity = cookie.partition(".")
        parts = auth.split_token(token, TOKEN_PREFIX) if cookie.isascii() else None
        if parts is None:
            return None
        sid, secret = parts
        record = await applied_or_after_barrier(self.replica, lambda: self._stored(sid), "console session")
        if record is None or not auth.secret_matches(secret, record["hash"]):
            return None
        now = self.clock()
        if now >= record["expires_at"] or now - self._last_active(sid, activity) >= IDLE:
            await self.end(sid)
            return None
        return (Session(sid, record["key_id"], self.csrf(sid), record["expires_at"]),
                self.cookie_value(token, now))

    def csrf(self, session_id: str) -> str:
        return _mac(self._csrf_key, session_id)

    def cookie_value(self, token: str, active_at: float) -> str:
        """The token, then when it was last used and that time's signature."""
        sid = token.split("_", 2)[1]
        return f"{token}.{int(active_at)}.{_mac(self._activity_key, f'{sid}.{int(active_at)}')}"

    def _last_active(self, session_id: str, activity: str) -> float:
        """The signed last-activity time; 0 (long idle) if missing or forged."""
        at, _, mac = activity.partition(".")
        if not at.isdigit() or not hmac.compare_digest(mac, _mac(self._activity_key, f"{session_id}.{at}")):
            return 0.0
        return float(at)

    def _stored(self, session_id: str) -> dict | None:
        with self.replica.store.read() as txn:
            return txn.get("console_sessions", session_id)

    def sso_nonce(self, key_id: str) -> str:
        """What binds a single sign-on to the browser that started it (its rm_sso cookie):
        computable by any replica, so the provider's redirect may land on any of them."""
        return _mac(self._sso_key, key_id)


def _derive(secret: bytes, purpose: bytes) -> bytes:
    return hmac.new(secret, purpose, hashlib.sha256).digest()


def _mac(key: bytes, what: str) -> str:
    return base64.urlsafe_b64encode(hmac.new(key, what.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()


SESSIONS = web.AppKey("console_sessions", Sessions)
# On every console answer: its own scripts and styles only (none inline, none from elsewhere),
# never framed, never cached.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


ACTIVITY = web.RequestKey("console_activity", tuple)


async def session_of(request: web.Request) -> Session:
    """The request's session, checked for a change: CSRF token and origin. Raises 401/403."""
    cookie = request.cookies.get(COOKIE, "")
    found = await request.app[SESSIONS].find(cookie) if cookie else None
    if found is None:
        raise APIError(401, "unauthenticated", "console session unknown or expired; sign in again")
    session, refreshed = found
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        check_origin(request)
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
            raise APIError(403, "forbidden", f"a change through a console session needs its "
                           f"{CSRF_HEADER} header")
    request[ACTIVITY] = (refreshed, session.expires_at)
    return session


@web.middleware
async def refresh_activity(request: web.Request, handler) -> web.StreamResponse:
    """The cookie of a session just used, with its new last-activity time (unless the answer
    sets the cookie itself: signing in or out)."""
    response = await handler(request)
    if ACTIVITY in request and COOKIE not in response.cookies:
        value, expires_at = request[ACTIVITY]
        set_cookie(response, request, COOKIE, value, expires_at - request.app[SESSIONS].clock())
    return response


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


def sso_nonce_matches(request: web.Request, key_id: str) -> bool:
    """Whether this browser started the single sign-on that makes API key `key_id` as a
    console sign-in (its rm_sso cookie): a callback URL someone else's browser completes
    signs nobody in."""
    sessions = request.app.get(SESSIONS)
    return sessions is not None and hmac.compare_digest(
        request.cookies.get(SSO_COOKIE, "").encode(), sessions.sso_nonce(key_id).encode())


async def sso_signed_in(ctx: "Ctx", key_id: str, key_expiry: float | None) -> web.Response | None:
    """After a completed admin login: a console session and the way back to the console if
    this browser started it as a console sign-in, else None (the CLI's login)."""
    request = ctx.request
    if not sso_nonce_matches(request, key_id):
        return None
    sessions = request.app[SESSIONS]
    cookie, session = await sessions.create(ctx, key_id, key_expiry)
    response = web.Response(status=303, headers={"Location": "/ui/", **SECURITY_HEADERS})
    set_cookie(response, request, COOKIE, cookie, session.expires_at - sessions.clock())
    response.del_cookie(SSO_COOKIE, path=SSO_COOKIE_PATH)
    return response
