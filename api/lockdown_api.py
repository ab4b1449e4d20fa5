"""Lock-down endpoints: lock a user or a device in one call (cluster/lockdown_apply.py)."""
from __future__ import annotations

from aiohttp import web

from raftmesh.cluster.commands import NodeLock, NodeUnlock, UserLock, UserUnlock

from .responses import NODE, USER, VERSION, answer, written
from .routing import Ctx, route

V = "/api/v1"
REASON = {"type": "object", "additionalProperties": False, "required": ["reason"],
          "properties": {"reason": {"type": "string", "minLength": 1, "maxLength": 500,
                                    "description": "why, for the audit log"}}}
NODES = {"type": "array", "items": NODE}


@route("POST", V + "/users/{name}/lock", "write", "Lock a user: revoke every device and key of "
       "theirs, refuse them until unlocked", body=REASON,
       response=answer({"user": USER, "revoked": NODES, "version": VERSION}))
async def lock_user(ctx: Ctx):
    r = await ctx.write(UserLock(name=ctx.param("name"), reason=ctx.body["reason"]))
    return web.json_response({"user": r["value"]["user"], "revoked": r["value"]["nodes"],
                              "version": r["version"]})


@route("POST", V + "/users/{name}/unlock", "admin", "Unlock a user (their devices sign in again)",
       response=written("user", USER))
async def unlock_user(ctx: Ctx):
    r = await ctx.write(UserUnlock(name=ctx.param("name")))
    return web.json_response({"user": r["value"], "version": r["version"]})


@route("POST", V + "/nodes/{id}/lock", "write", "Lock a device: revoke it, refuse its machine "
       "until unlocked", body=REASON, response=written("node", NODE))
async def lock_node(ctx: Ctx):
    r = await ctx.write(NodeLock(id=ctx.param("id"), reason=ctx.body["reason"]))
    return web.json_response({"node": r["value"]["nodes"][0], "version": r["version"]})


@route("POST", V + "/nodes/{id}/unlock", "admin", "Unlock a device (it re-authenticates)",
       response=written("node", NODE))
async def unlock_node(ctx: Ctx):
    r = await ctx.write(NodeUnlock(id=ctx.param("id")))
    return web.json_response({"node": r["value"], "version": r["version"]})
