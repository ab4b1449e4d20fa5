"""Which identity-provider groups a user is in: those of SCIM Groups listing its SCIM User,
and those its last sign-in's ID token named (for providers without SCIM). Lower-cased, as
`group:idp/<name>` in the policy is matched without regard to case.

Every node record carries its user's groups (`idp_groups`): a membership change rewrites the
records of that user's nodes, which the netmap feed then handles like any other node change
(only the netmaps that node's new groups or old groups concern are recomputed).
"""
from __future__ import annotations

from typing import Any


def idp_groups_of(txn: Any, user: str | None) -> list[str]:
    record = txn.get("users", user) if user else None
    if record is None:
        return []
    groups = {g.lower() for g in record.get("idp_groups") or ()}
    scim_id = record.get("scim_id")
    if scim_id:
        for key, group in txn.items("scim", "Group/"):
            if not key.startswith("Group/"):
                continue  # not a break: a staged transaction yields its own writes last
            if any(m.get("value") == scim_id for m in group.get("members") or ()):
                groups.add(str(group.get("displayName", "")).lower())
    return sorted(groups)


def node_owner(node: dict) -> str | None:
    """The user whose groups a node carries (a tagged node keeps its registrant's, unused
    while it is tagged, so untagging it needs no lookup)."""
    return node.get("user") or node.get("registered_by")


def scim_members(txn: Any, group: dict | None) -> set[str]:
    """The raftmesh users a SCIM Group lists."""
    names = set()
    for m in (group or {}).get("members") or ():
        user = txn.get("scim", f"User/{m.get('value')}")
        if user is not None:
            names.add(user["userName"].lower())
    return names
