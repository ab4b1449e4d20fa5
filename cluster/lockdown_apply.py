"""Lock-down: one command revokes a user (every device, every key) or one device, and
refuses them until an admin unlocks. The lock record says who locked and why; it is in the
audit entry of the change, as is every revocation it caused."""
from __future__ import annotations

from . import commands as c
from .revocation import revoke_node, revoke_user
from .state_machine import Context, Rejected, _update_node, handles


def _lock_record(ctx: Context, reason: str) -> dict:
    return {"by": ctx.cmd.actor, "reason": reason, "at": ctx.cmd.time}


@handles(c.UserLock)
def _user_lock(ctx: Context, cmd: c.UserLock) -> dict:
    before = ctx.require("users", cmd.name, "user")
    if before.get("locked"):
        raise Rejected("conflict", f"user {cmd.name!r} is already locked "
                       f"({before['locked']['reason']})")
    after = dict(before, locked=_lock_record(ctx, cmd.reason))
    ctx.txn.put("users", cmd.name, after)
    ctx.audit(f"user:{cmd.name}", before, after)
    return {"user": after, "nodes": revoke_user(ctx, cmd.name)}


@handles(c.UserUnlock)
def _user_unlock(ctx: Context, cmd: c.UserUnlock) -> dict:
    """Only the lock goes: revoked devices sign in again, revoked keys stay revoked."""
    before = ctx.require("users", cmd.name, "user")
    if not before.get("locked"):
        raise Rejected("conflict", f"user {cmd.name!r} is not locked")
    after = {k: v for k, v in before.items() if k != "locked"}
    ctx.txn.put("users", cmd.name, after)
    ctx.audit(f"user:{cmd.name}", before, after)
    return after


@handles(c.NodeLock)
def _node_lock(ctx: Context, cmd: c.NodeLock) -> dict:
    node = ctx.require("nodes", cmd.id, "node")
    if node.get("locked"):
        raise Rejected("conflict", f"node {cmd.id} is already locked ({node['locked']['reason']})")
    locked = _update_node(ctx, {"locked": _lock_record(ctx, cmd.reason)}, cmd.id)
    return {"nodes": [revoke_node(ctx, locked) or locked]}


@handles(c.NodeUnlock)
def _node_unlock(ctx: Context, cmd: c.NodeUnlock) -> dict:
    node = ctx.require("nodes", cmd.id, "node")
    if not node.get("locked"):
        raise Rejected("conflict", f"node {cmd.id} is not locked")
    return _update_node(ctx, {"locked": None})
