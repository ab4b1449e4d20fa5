"""Applying SCIM provisioning (api/scim.py) to the replicated state.

Resources are stored as the proposer validated them (table `scim`, key `<type>/<id>`); a
userName or a group's displayName is unique without regard to case (index `scim_names`).
A User is also the raftmesh user its userName names (created, renamed, deactivated with
it); a Group's members are what `group:idp/<displayName>` means in the policy.
"""
from __future__ import annotations

from . import commands as c
from .commands import unless_absent
from .revocation import devices_of, revoke_user
from .idp_groups import scim_members
from .state_machine import Context, Rejected, handles, refresh_idp_groups

UNIQUE_ATTRIBUTE = {"User": "userName", "Group": "displayName"}


def _name_key(resource_type: str, resource: dict) -> str:
    return f"{resource_type}/{str(resource.get(UNIQUE_ATTRIBUTE[resource_type], '')).lower()}"


def _stored(ctx: Context, resource_type: str, resource_id: str, expected: str | None) -> dict:
    stored = ctx.txn.get("scim", f"{resource_type}/{resource_id}")
    if stored is None:
        raise Rejected("not_found", f"{resource_type} {resource_id!r} not found", 404)
    if expected is not None and stored["meta"]["version"] != expected:
        raise Rejected("precondition_failed", f"{resource_type} {resource_id!r} is at version "
                       f"{stored['meta']['version']}, not {expected}", 412)
    return stored


@handles(c.ScimPut)
def _scim_put(ctx: Context, cmd: c.ScimPut) -> dict:
    if cmd.resource_type not in UNIQUE_ATTRIBUTE:
        raise Rejected("bad_command", f"no SCIM resource type {cmd.resource_type!r}", 400)
    key = f"{cmd.resource_type}/{cmd.id}"
    if cmd.create:
        if ctx.txn.get("scim", key) is not None:
            raise Rejected("conflict", f"{key} already exists")
        before = None
    else:
        before = _stored(ctx, cmd.resource_type, cmd.id, unless_absent(cmd.expected_version))
    name_key = _name_key(cmd.resource_type, cmd.resource)
    if ctx.txn.get("scim_names", name_key) not in (None, cmd.id):
        raise Rejected("uniqueness", f"{UNIQUE_ATTRIBUTE[cmd.resource_type]} "
                       f"{name_key.split('/', 1)[1]!r} is taken", 409)
    nodes = _user_changed(ctx, before, cmd.resource) if cmd.resource_type == "User" else []
    if before is not None:
        ctx.txn.delete("scim_names", _name_key(cmd.resource_type, before))
    ctx.txn.put("scim_names", name_key, cmd.id)
    ctx.txn.put("scim", key, cmd.resource)
    ctx.audit(f"scim:{key}", _summary(before), _summary(cmd.resource))
    if cmd.resource_type == "Group":
        nodes = _members_changed(ctx, before, cmd.resource)
    return {"resource": cmd.resource, "nodes": nodes}


@handles(c.ScimDelete)
def _scim_delete(ctx: Context, cmd: c.ScimDelete) -> dict:
    before = _stored(ctx, cmd.resource_type, cmd.id, unless_absent(cmd.expected_version))
    nodes = _user_changed(ctx, before, None) if cmd.resource_type == "User" else []
    ctx.txn.delete("scim", f"{cmd.resource_type}/{cmd.id}")
    ctx.txn.delete("scim_names", _name_key(cmd.resource_type, before))
    ctx.audit(f"scim:{cmd.resource_type}/{cmd.id}", _summary(before), None)
    if cmd.resource_type == "Group":
        nodes = _members_changed(ctx, before, None)
    return {"nodes": nodes}


def _members_changed(ctx: Context, before: dict | None, after: dict | None) -> list[dict]:
    """A Group written or deleted: the nodes of the users it lists (before or after) whose
    groups changed. Both, since a renamed group changes what its members are in."""
    return refresh_idp_groups(ctx, scim_members(ctx.txn, before) | scim_members(ctx.txn, after))


def _summary(resource: dict | None) -> dict | None:
    """What the audit log keeps of a resource: who it is, not all its attributes."""
    if resource is None:
        return None
    keep = ("id", "userName", "displayName", "active", "externalId")
    out = {k: resource[k] for k in keep if k in resource}
    if "members" in resource:
        out["members"] = sorted(m.get("value", "") for m in resource["members"])
    return out


def _user_changed(ctx: Context, before: dict | None, after: dict | None) -> list[dict]:
    """Keep the raftmesh user in step with its SCIM User; the nodes revoked by the change."""
    old = before["userName"].lower() if before else None
    new = after["userName"].lower() if after else None
    revoked: list[dict] = []
    if old is not None and old != new:  # renamed or deleted
        revoked = revoke_user(ctx, old)
        _unlink(ctx, old, before["id"])
    if new is None:
        return revoked
    record = ctx.txn.get("users", new)
    if record is not None and record.get("scim_id") not in (None, after["id"]):
        raise Rejected("uniqueness", f"user {new!r} is provisioned by another SCIM User", 409)
    active = after.get("active") is not False
    updated = dict(record or {"name": new, "created_at": ctx.cmd.time},
                   display_name=_display_name(after) or (record or {}).get("display_name") or new,
                   scim_id=after["id"], active=active)
    if updated != record:
        ctx.txn.put("users", new, updated)
        ctx.audit(f"user:{new}", record, updated)
    if not active:
        revoked += revoke_user(ctx, new)
    return revoked


def _display_name(user: dict) -> str | None:
    name = user.get("displayName") or (user.get("name") or {}).get("formatted")
    return name if isinstance(name, str) else None


def _unlink(ctx: Context, name: str, scim_id: str) -> None:
    """A SCIM User renamed or deleted: its old raftmesh user goes, or stays deactivated
    while devices (now revoked) still name it, for an admin to delete them."""
    record = ctx.txn.get("users", name)
    if record is None or record.get("scim_id") != scim_id:
        return
    if devices_of(ctx, name):
        after = dict(record, scim_id=None, active=False)
        ctx.txn.put("users", name, after)
    else:
        after = None
        ctx.txn.delete("users", name)
    ctx.audit(f"user:{name}", record, after)
