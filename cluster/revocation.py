"""Revoking a person's access at once: every device of theirs leaves the mesh (its key is
expired, so peers drop it and its stream gets a revoked `bye`), their pre-auth keys stop
working and the API keys their admin logins made are deleted. Used when SCIM deactivates or
deletes a user and when an admin locks one."""
from __future__ import annotations

from .state_machine import Context, _update_node


def devices_of(ctx: Context, user: str) -> list[dict]:
    return [n for _, n in ctx.txn.items("nodes") if user in (n.get("user"), n.get("registered_by"))]


def revoke_node(ctx: Context, node: dict) -> dict | None:
    """The node's new record, or None if it was already out of the mesh."""
    if node.get("expired"):
        return None
    return _update_node(ctx, {"expired": True, "key_expiry": ctx.cmd.time}, node["id"])


def revoke_user(ctx: Context, user: str) -> list[dict]:
    """Revoke everything `user` holds; the node records that changed."""
    changed = [r for n in devices_of(ctx, user) if (r := revoke_node(ctx, n)) is not None]
    for kid, key in list(ctx.txn.items("preauth_keys")):
        if key["user"] == user and not key.get("revoked"):
            after = dict(key, revoked=True)
            ctx.txn.put("preauth_keys", kid, after)
            ctx.audit(f"preauth_key:{kid}", key, after)
    for kid, key in list(ctx.txn.items("api_keys")):
        if key.get("user") == user:
            ctx.txn.delete("api_keys", kid)
            ctx.audit(f"api_key:{kid}", key, None)
    return changed

