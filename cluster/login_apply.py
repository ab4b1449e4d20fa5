"""Applying single sign-on logins (api/oidc.py) to the replicated state.

A login is replicated from its start, so the identity provider's redirect may come back to
any replica. It is single-use and short-lived: completing it deletes it, and it cannot be
completed after `expires_at` (by the proposer's clock, carried in the command). Logins never
finished are dropped by later starts, a few at a time, oldest first.
"""
from __future__ import annotations

from itertools import islice

from . import commands as c
from .commands import unless_absent
from .state_machine import (Context, Rejected, _new_node, _refuse_if_node_locked, _update_node,
                            barred, handles, kept_expiry, public, refresh_idp_groups)

PRUNE_PER_START = 8


@handles(c.LoginStart)
def _login_start(ctx: Context, cmd: c.LoginStart) -> dict:
    """Not audited: a login that is never finished changes nothing; its completion is."""
    _prune_expired(ctx, cmd.time)
    if ctx.txn.get("logins", cmd.id) is not None:
        raise Rejected("conflict", "this login is already in progress")
    record = {"id": cmd.id, "nonce": cmd.nonce, "code_verifier": cmd.code_verifier,
              "auth_url": cmd.auth_url, "expires_at": cmd.expires_at, "created_at": cmd.time,
              **cmd.args()}
    ctx.txn.put("logins", cmd.id, record)
    ctx.txn.put("meta", _expiry_key(record), cmd.id)
    ctx.txn.put("login_index", index_key(record), cmd.id)
    return {"id": cmd.id, "expires_at": cmd.expires_at}


def index_key(login: dict) -> str:
    """What finds a login in progress: the machine it registers, or the API key it makes."""
    return f"machine:{login['machine_key']}" if login.get("machine_key") else f"apikey:{login['key_id']}"


def login_for(txn, index: str, now: float) -> dict | None:
    """The login in progress for `index` (index_key), if it can still be completed."""
    login_id = txn.get("login_index", index)
    return login_in_progress(txn, login_id, now) if login_id else None


def _expiry_key(login: dict) -> str:
    return f"login_exp:{login['expires_at']:020.6f}:{login['id']}"


def _forget(ctx: Context, login: dict) -> None:
    ctx.txn.delete("logins", login["id"])
    ctx.txn.delete("meta", _expiry_key(login))
    if ctx.txn.get("login_index", index_key(login)) == login["id"]:
        ctx.txn.delete("login_index", index_key(login))


def _prune_expired(ctx: Context, now: float) -> None:
    for key, login_id in list(islice(ctx.txn.items("meta", "login_exp:"), PRUNE_PER_START)):
        if not key.startswith("login_exp:") or float(key.split(":")[1]) > now:
            break
        login = ctx.txn.get("logins", login_id)
        if login is None:
            ctx.txn.delete("meta", key)
        else:
            _forget(ctx, login)


def login_in_progress(txn, login_id: str, now: float) -> dict | None:
    """The login `login_id`, if it can still be completed at `now`."""
    login = txn.get("logins", login_id)
    return login if login is not None and login["expires_at"] > now else None


@handles(c.LoginComplete)
def _login_complete(ctx: Context, cmd: c.LoginComplete) -> dict:
    login = login_in_progress(ctx.txn, cmd.id, cmd.time)
    if login is None:
        raise Rejected("login_invalid", "no login in progress for this state (unknown, "
                       "already used or expired); start the login again", 400)
    _forget(ctx, login)
    known = ctx.txn.get("users", cmd.user)
    user = _signed_in_user(ctx, cmd)
    regrouped = _groups_changed(ctx, cmd, known)
    ctx.audit(f"login:{cmd.id[:12]}", None, {"user": cmd.user, "subject": cmd.subject,
                                             "groups": sorted(cmd.groups)})
    if login.get("machine_key"):  # `nodes`: what the netmap feed upserts (result_lists_nodes)
        node = _device_signed_in(ctx, cmd, login)
        return {"user": user, "nodes": [n for n in regrouped if n["id"] != node["id"]] + [node]}
    return {"user": user, "nodes": regrouped, "api_key": _admin_signed_in(ctx, cmd, login)}


def _signed_in_user(ctx: Context, cmd: c.LoginComplete) -> dict:
    """The user the identity provider named, created on first sign-in; its groups are
    those of the ID token (for providers that do not provision groups by SCIM)."""
    before = ctx.txn.get("users", cmd.user)
    if before is not None and before.get("idp_subject") not in (None, cmd.subject):
        raise Rejected("forbidden", f"user {cmd.user!r} belongs to another identity at the "
                       "identity provider", 403)
    if barred(before):
        raise Rejected("user_locked", barred(before), 403)
    after = dict(before or {"name": cmd.user, "display_name": cmd.user, "created_at": cmd.time},
                 idp_subject=cmd.subject, idp_groups=sorted(cmd.groups))
    if after != before:
        ctx.txn.put("users", cmd.user, after)
        ctx.audit(f"user:{cmd.user}", before, after)
    return after


def _groups_changed(ctx: Context, cmd: c.LoginComplete, before: dict | None) -> list[dict]:
    """The user's other nodes, if the ID token named other groups than the last one."""
    if before is not None and sorted(before.get("idp_groups") or []) == sorted(cmd.groups):
        return []
    return refresh_idp_groups(ctx, {cmd.user})


def _device_signed_in(ctx: Context, cmd: c.LoginComplete, login: dict) -> dict:
    existing_id = ctx.txn.get("node_by_machine", login["machine_key"])
    key_expiry = unless_absent(cmd.key_expiry)
    if existing_id is None:
        return _new_node(ctx, c.NodeRegister(
            id=cmd.node_id, name=login["hostname"], machine_key=login["machine_key"],
            node_key=login["node_key"], user=cmd.user, endpoints=login.get("endpoints", []),
            advertised_routes=login.get("advertised_routes", []), key_expiry=key_expiry,
            time=cmd.time, actor=cmd.actor), approved=True)
    node = ctx.require("nodes", existing_id, "node")
    _refuse_if_node_locked(node)
    if cmd.user not in (node.get("user"), node.get("registered_by")):
        raise Rejected("forbidden", f"this machine is registered as node {node['id']} of "
                       "another user", 403)
    return _update_node(ctx, {"expired": False, "key_expiry": kept_expiry(node, key_expiry),
                              "node_key": login["node_key"], "approved": True}, node["id"])


def _admin_signed_in(ctx: Context, cmd: c.LoginComplete, login: dict) -> dict:
    scopes = sorted(unless_absent(cmd.scopes, []))
    if ctx.txn.get("api_keys", login["key_id"]) is not None:
        raise Rejected("conflict", f"API key {login['key_id']!r} already exists")
    if not scopes:
        raise Rejected("forbidden", f"none of {cmd.user!r}'s groups grants an API scope", 403)
    record = {"id": login["key_id"], "name": f"sso:{cmd.user}", "scopes": scopes,
              "hash": login["key_hash"], "created_at": cmd.time,
              "expires_at": unless_absent(cmd.key_expiry), "created_by": f"user:{cmd.user}",
              "user": cmd.user}
    ctx.txn.put("api_keys", record["id"], record)
    ctx.audit(f"api_key:{record['id']}", None, record)
    return public(record)
