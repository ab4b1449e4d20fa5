"""The web console's HTTP side: its pages under /ui/, signing in (API key or single sign-on)
and out. Everything the pages show or change goes through the admin API itself
(/api/v1, api/admin.py), which accepts a console session in place of an API key
(api/routing.py), so the console has no logic of its own to keep in step."""
from __future__ import annotations

import json
import secrets
from importlib import resources

from aiohttp import web

from raftmesh.cluster.commands import SessionEnd
from raftmesh.cluster.raft import Raft

from .. import auth
from ..errors import APIError
from ..routing import Ctx, api_key_record, stored_api_key
from ..sso_api import RELYING_PARTY, start_admin_login
from .sessions import (COOKIE, SECURITY_HEADERS, SESSIONS, SSO_COOKIE, SSO_COOKIE_PATH, Sessions,
                       check_origin, refresh_activity, session_of, set_cookie)

TYPES = {"html": "text/html", "js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}
MAX_SIGN_IN_BYTES = 4096


def _assets() -> dict[str, tuple[bytes, str]]:
    """Every file under static/, read once: nothing outside this set is ever served."""
    folder = resources.files(__package__) / "static"
    return {f.name: (f.read_bytes(), TYPES[f.name.rsplit(".", 1)[-1]])
            for f in folder.iterdir() if f.name.rsplit(".", 1)[-1] in TYPES}


def add_routes(app: web.Application, replica: Raft) -> None:
    app[SESSIONS] = Sessions(replica)
    app.middlewares.append(refresh_activity)
    assets = _assets()

    def served(name: str) -> web.Response:
        body, media = assets[name]
        return web.Response(body=body, content_type=media, charset="utf-8", headers=SECURITY_HEADERS)

    async def index(request):
        return served("index.html")

    async def asset(request):
        name = request.match_info["name"]
        if name not in assets:
            raise APIError(404, "not_found", f"no console file {name!r}")
        return served(name)

    async def to_index(request):
        return web.Response(status=308, headers={"Location": "/ui/", **SECURITY_HEADERS})

    def principal(key_id: str, record: dict, session) -> dict:
        return {"signed_in": True, "replica": replica.config.id, "csrf_token": session.csrf,
                "expires_at": session.expires_at,
                "key": {"id": key_id, "name": record["name"], "user": record.get("user"),
                        "scopes": record["scopes"]}}

    async def whoami(request):
        """Who the session is (and its CSRF token, readable by this site's scripts only)."""
        try:
            session = await session_of(request)
        except APIError:
            session = None
        record = session and stored_api_key(replica, session.key_id)
        if not record:
            return _json({"signed_in": False, "replica": replica.config.id,
                          "sso": RELYING_PARTY in request.app})
        return _json(principal(session.key_id, record, session))

    async def sign_in(request):
        check_origin(request)  # no signing a browser into someone else's key (login CSRF)
        raw = await request.content.read(MAX_SIGN_IN_BYTES + 1)
        try:
            token = json.loads(raw)["api_key"] if len(raw) <= MAX_SIGN_IN_BYTES else None
        except (ValueError, KeyError, TypeError):
            token = None
        if not isinstance(token, str):
            raise APIError(400, "bad_request", 'sign in with a JSON body {"api_key": "rmk_..."}')
        key_id, record = await api_key_record(token.strip(), replica,
                                              lambda kid: stored_api_key(replica, kid))
        ctx = Ctx(request, replica, f"apikey:{key_id}", record["scopes"])
        cookie, session = await request.app[SESSIONS].create(ctx, key_id, record.get("expires_at"))
        response = _json(principal(key_id, record, session))
        set_cookie(response, request, COOKIE, cookie, session.expires_at - request.app[SESSIONS].clock())
        return response

    async def sign_out(request):
        session = await session_of(request)  # a change like any other: CSRF token and origin
        await Ctx(request, replica, f"apikey:{session.key_id}", []).write(SessionEnd(id=session.id))
        response = _json({"signed_in": False, "replica": replica.config.id})
        response.del_cookie(COOKIE, path="/")
        return response

    async def sso_start(request):
        """Off to the identity provider; its redirect (api/sso_api.py callback) ends in a
        session for the API key the login makes, with the scopes of the person's groups."""
        if RELYING_PARTY not in request.app:
            raise APIError(404, "not_found", "single sign-on is not configured on this cluster")
        key_id = secrets.token_hex(6)
        url, until = await start_admin_login(Ctx(request, replica, "anonymous", []), key_id,
                                             auth.hash_secret(secrets.token_urlsafe(32)))
        sessions = request.app[SESSIONS]
        response = web.Response(status=303, headers={"Location": url, **SECURITY_HEADERS})
        set_cookie(response, request, SSO_COOKIE, sessions.sso_nonce(key_id), until - sessions.clock(),
                   same_site="Lax", path=SSO_COOKIE_PATH)  # Lax: sent on the provider's redirect
        return response

    app.router.add_get("/ui", to_index)
    app.router.add_get("/ui/", index)
    app.router.add_get("/ui/session", whoami)
    app.router.add_post("/ui/session", sign_in)
    app.router.add_delete("/ui/session", sign_out)
    app.router.add_get("/ui/sso", sso_start)
    app.router.add_get("/ui/{name}", asset)


def _json(body: dict) -> web.Response:
    return web.json_response(body, headers=SECURITY_HEADERS)
