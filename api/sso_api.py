"""Single sign-on endpoints: device logins started by agents, admin logins started by the
CLI, and the provider's redirect back (`/oidc/callback`), which any replica may receive.

The flow's checks are in api/oidc.py; what a login changes is decided in the state machine
(cluster/login_apply.py), which makes each login single-use.
"""
from __future__ import annotations

import secrets
import time

from aiohttp import web

from raftmesh.cluster.commands import LoginComplete, LoginStart
from raftmesh.cluster.login_apply import login_for, login_in_progress

from .console.sessions import sso_signed_in
from .errors import APIError
from .oidc import RelyingParty, expires_at, login_id
from .responses import LOGIN_NEEDED, STR, VERSION, answer
from .routing import Ctx, route

RELYING_PARTY = web.AppKey("relying_party", RelyingParty)
CALLBACK = "/oidc/callback"
ADMIN_LOGIN = "/api/v1/auth/login"
TEXT = {"type": "string", "minLength": 1, "maxLength": 4096}
# What providers add to their redirect besides code and state (Entra ID, Keycloak, Google).
_PROVIDER_EXTRAS = ("error", "error_description", "error_uri", "iss", "session_state", "scope",
                    "authuser", "hd", "prompt")


def relying_party(ctx: Ctx) -> RelyingParty:
    rp = ctx.request.app.get(RELYING_PARTY)
    if rp is None:
        raise APIError(404, "not_found", "single sign-on is not configured on this cluster "
                       "(oidc_issuer, docs/identity.md)")
    return rp


def sso_enabled(ctx: Ctx) -> bool:
    return ctx.request.app.get(RELYING_PARTY) is not None


async def device_login(ctx: Ctx, machine: str, body: dict) -> web.Response:
    """The answer to a registration without an auth key when SSO is configured: the URL the
    person must open. Asked again while that login is in progress, the same URL (an agent
    polls until its node exists)."""
    with ctx.replica.store.read() as txn:
        login = login_for(txn, f"machine:{machine}", time.time())
    if login is None or login["node_key"] != body["node_key"]:
        new, until = await relying_party(ctx).new_login(), expires_at(ctx.config)
        ctx.actor = f"machine:{machine}"
        await ctx.write(LoginStart(
            id=new.id, nonce=new.nonce, code_verifier=new.code_verifier, auth_url=new.auth_url,
            expires_at=until, machine_key=machine, node_key=body["node_key"],
            hostname=body["hostname"].lower(), endpoints=body.get("endpoints", []),
            advertised_routes=body.get("advertised_routes", [])))
        login = {"auth_url": new.auth_url, "expires_at": until}
    return web.json_response({"login_url": login["auth_url"], "login_expires_at": login["expires_at"]})


@route("GET", CALLBACK, None, "Where the identity provider sends the browser back",
       query={"code": TEXT, "state": TEXT, **{k: TEXT for k in _PROVIDER_EXTRAS}},
       response=answer({"user": STR, "message": STR, "version": VERSION}))
async def callback(ctx: Ctx):
    rp = relying_party(ctx)
    q = ctx.query
    if "error" in q:
        raise APIError(400, "login_invalid", f"the identity provider refused the login: "
                       f"{q['error']} {q.get('error_description', '')}".rstrip())
    if "code" not in q or "state" not in q:
        raise APIError(400, "login_invalid", "the callback needs the code and state the "
                       "identity provider sends")
    await ctx.read_version()  # see a login started on another replica just before
    with ctx.replica.store.read() as txn:
        login = login_in_progress(txn, login_id(q["state"]), time.time())
    if login is None:
        raise APIError(400, "login_invalid", "no login in progress for this state (unknown, "
                       "already used or expired); start the login again")
    identity = await rp.identity(q["code"], login)
    ctx.actor = f"user:{identity.user}"
    args = {"id": login["id"], "user": identity.user, "subject": identity.subject,
            "groups": identity.groups}
    if login.get("machine_key"):
        lifetime = ctx.config.node_key_lifetime
        args.update(node_id="n" + secrets.token_hex(6),
                    key_expiry=time.time() + lifetime if lifetime else None)
        what = "this device is now registered to you"
    else:
        args.update(scopes=rp.scopes_of(identity.groups),
                    key_expiry=time.time() + ctx.config.admin_login_lifetime)
        what = "the raftmesh CLI is now signed in"
    r = await ctx.write(LoginComplete(**args))
    if not login.get("machine_key"):
        to_console = await sso_signed_in(ctx, login["key_id"], args["key_expiry"])
        if to_console is not None:
            return to_console
    return web.json_response({"user": identity.user, "version": r["version"],
                              "message": f"signed in as {identity.user}: {what}; you can close "
                                         "this window"})


@route("POST", ADMIN_LOGIN, None, "Start an admin login at the identity provider (the CLI)",
       body={"type": "object", "additionalProperties": False, "required": ["key_id", "key_hash"],
             "properties": {"key_id": {"type": "string", "pattern": "^[0-9a-f]{12}$"},
                            "key_hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}},
       status=201, response=LOGIN_NEEDED)
async def admin_login(ctx: Ctx):
    """The CLI made the API key's secret itself and sends only its hash and id: the key it
    gets when the login completes never travels (api/oidc.py scopes_of decides its scopes)."""
    url, until = await start_admin_login(ctx, ctx.body["key_id"], ctx.body["key_hash"])
    return web.json_response({"login_url": url, "login_expires_at": until}, status=201)


async def start_admin_login(ctx: Ctx, key_id: str, key_hash: str) -> tuple[str, float]:
    """(the provider URL the person opens, until when) for a login that makes API key
    `key_id`; also how the console signs in with SSO (api/console/web.py)."""
    rp = relying_party(ctx)
    with ctx.replica.store.read() as txn:
        if txn.get("api_keys", key_id) is not None:
            raise APIError(409, "conflict", "that key id is taken; generate another")
    new, until = await rp.new_login(), expires_at(ctx.config)
    await ctx.write(LoginStart(id=new.id, nonce=new.nonce, code_verifier=new.code_verifier,
                               auth_url=new.auth_url, expires_at=until,
                               key_id=key_id, key_hash=key_hash))
    return new.auth_url, until


@route("GET", ADMIN_LOGIN + "/{key_id}", None, "Whether the admin login for this key id is done",
       response=answer({"signed_in": {"type": "boolean"}}))
async def admin_login_done(ctx: Ctx):
    """What the CLI polls: its key works once the person signed in (the key's secret never
    left the CLI, so answering this reveals nothing)."""
    relying_party(ctx)
    await ctx.read_version()
    key_id = ctx.param("key_id")
    with ctx.replica.store.read() as txn:
        key = txn.get("api_keys", key_id)
        waiting = login_for(txn, f"apikey:{key_id}", time.time()) is not None
    signed_in = key is not None and key.get("user") is not None
    if not (signed_in or waiting):
        raise APIError(404, "not_found", f"no admin login in progress for key {key_id!r} "
                       "(unknown, or expired: run `raftmesh login` again)")
    return web.json_response({"signed_in": signed_in})
