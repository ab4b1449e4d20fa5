"""Console sessions as replicated records, so a browser stays signed in on every replica and
through the loss of one (api/console/sessions.py). A session is a short-lived credential
bound to the API key it was signed in with: never longer-lived than that key, and useless
once the key is gone. Not audited: signing in changes no configuration. Expired or orphaned
sessions are pruned on the replicated clock at each sign-in and sign-out, so the table holds
at most what was signed into within one lifetime, and at most MAX_SESSIONS."""
from __future__ import annotations

from . import commands as c
from .state_machine import Context, Rejected, clock, handles

MAX_SESSIONS = 10_000  # beyond it, signing in ends the session closest to its expiry


def _prune(ctx: Context) -> None:
    now = max(clock(ctx.txn), ctx.cmd.time)  # the replicated clock once this command applies
    for sid, s in list(ctx.txn.items("console_sessions")):
        key = ctx.txn.get("api_keys", s["key_id"])
        if s["expires_at"] <= now or key is None or (
                key.get("expires_at") is not None and key["expires_at"] <= now):
            ctx.txn.delete("console_sessions", sid)


@handles(c.SessionCreate)
def _session_create(ctx: Context, cmd: c.SessionCreate) -> dict:
    key = ctx.txn.get("api_keys", cmd.key_id)
    if key is None:
        raise Rejected("not_found", f"API key {cmd.key_id!r} not found")
    if ctx.txn.get("console_sessions", cmd.id) is not None:
        raise Rejected("conflict", f"session {cmd.id!r} already exists")
    _prune(ctx)
    live = list(ctx.txn.items("console_sessions"))
    if len(live) >= MAX_SESSIONS:
        ctx.txn.delete("console_sessions", min(live, key=lambda kv: (kv[1]["expires_at"], kv[0]))[0])
    until = cmd.expires_at if key.get("expires_at") is None else min(cmd.expires_at, key["expires_at"])
    if until <= cmd.time:
        raise Rejected("conflict", f"API key {cmd.key_id!r} has expired")
    record = {"id": cmd.id, "key_id": cmd.key_id, "hash": cmd.hash, "created_at": cmd.time,
              "expires_at": until}
    ctx.txn.put("console_sessions", cmd.id, record)
    return {"id": cmd.id, "key_id": cmd.key_id, "expires_at": until}


@handles(c.SessionEnd)
def _session_end(ctx: Context, cmd: c.SessionEnd) -> dict:
    """Ending an unknown (already pruned) session is not an error: the outcome is the same."""
    ended = ctx.txn.get("console_sessions", cmd.id) is not None
    ctx.txn.delete("console_sessions", cmd.id)
    _prune(ctx)
    return {"id": cmd.id, "ended": ended}
