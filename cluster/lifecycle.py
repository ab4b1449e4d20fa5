"""Node lifecycle: ephemeral nodes removed after a time offline, key expiry per node.

Removing ephemeral nodes is one replicated decision: the leader looks for nodes that are
due (`due_ephemeral`, pure) and proposes their removal; applying re-checks each against the
replicated state and the command's time, so a node that came back online meanwhile, or a
stale proposal from a deposed leader, removes nothing. Presence (`online`, `last_seen`) is
already replicated (node.presence), which is what makes the rule the same on every replica.
"""
from __future__ import annotations

from typing import Iterable

from .commands import LifecycleSet, NodeKeyExpiry, NodeRemoveEphemeral, unless_absent
from .state_machine import Context, Rejected, _update_node, delete_node, handles

DEFAULT_EPHEMERAL_OFFLINE_SECONDS = 300.0
MAX_REMOVALS_PER_COMMAND = 256  # a bounded command; the leader proposes again for the rest


def default_settings() -> dict:
    return {"ephemeral_offline_seconds": DEFAULT_EPHEMERAL_OFFLINE_SECONDS}


def stored_settings(txn) -> dict:
    return txn.get("meta", "lifecycle") or default_settings()


def ephemeral_due(node: dict, limit: float, now: float) -> bool:
    """An ephemeral node offline for `limit` seconds (since it was last seen, or since it was
    registered if it never connected)."""
    if not node.get("ephemeral") or node.get("online"):
        return False
    since = node.get("last_seen") or node.get("created_at") or 0.0
    return now - since >= limit


def due_ephemeral(nodes: Iterable[dict], limit: float, now: float) -> list[str]:
    """The ids of the ephemeral nodes to remove now, at most a command's worth."""
    due = sorted(n["id"] for n in nodes if ephemeral_due(n, limit, now))
    return due[:MAX_REMOVALS_PER_COMMAND]


@handles(NodeRemoveEphemeral)
def _remove_ephemeral(ctx: Context, cmd: NodeRemoveEphemeral) -> dict:
    limit = stored_settings(ctx.txn)["ephemeral_offline_seconds"]
    removed = []
    for nid in cmd.ids[:MAX_REMOVALS_PER_COMMAND]:
        node = ctx.txn.get("nodes", nid)
        if node is not None and ephemeral_due(node, limit, cmd.time):
            removed.append(delete_node(ctx, node)["id"])
    return {"removed": removed}


@handles(LifecycleSet)
def _lifecycle_set(ctx: Context, cmd: LifecycleSet) -> dict:
    if not 10 <= cmd.ephemeral_offline_seconds <= 365 * 86400:
        raise Rejected("invalid_setting", "ephemeral_offline_seconds must be between 10 seconds "
                       "and a year", 400)
    before = stored_settings(ctx.txn)
    record = {"ephemeral_offline_seconds": float(cmd.ephemeral_offline_seconds)}
    if record != before:
        ctx.txn.put("meta", "lifecycle", record)
        ctx.audit("lifecycle", before, record)
    return record


@handles(NodeKeyExpiry)
def _node_key_expiry(ctx: Context, cmd: NodeKeyExpiry) -> dict:
    """Exempt a node from key expiry (its key stops expiring at once), or end the exemption
    with the expiry the proposer gave."""
    node = ctx.require("nodes", cmd.id, "node")
    if cmd.disabled:
        return _update_node(ctx, {"key_expiry_disabled": True, "key_expiry": None})
    return _update_node(ctx, {"key_expiry_disabled": False,
                              "key_expiry": unless_absent(cmd.key_expiry, node["key_expiry"])})
