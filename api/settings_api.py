"""Cluster settings endpoints: DNS (MagicDNS), node lifecycle, and per-node key expiry."""
from __future__ import annotations

import time

from aiohttp import web

from raftmesh.cluster import dns_config, lifecycle
from raftmesh.cluster.commands import DnsSet, LifecycleSet, NodeKeyExpiry

from .errors import APIError
from .responses import BOOL, NODE, VERSION, answer, reading, written
from .routing import STALE_QUERY, Ctx, route

V = "/api/v1"
ADDRESSES = {"type": "array", "items": {"type": "string", "maxLength": 64},
             "maxItems": dns_config.MAX_NAMESERVERS}
DNS = {"type": "object", "additionalProperties": False, "properties": {
    "magic_dns": {"type": "boolean", "description": "agents answer <hostname>.<domain>"},
    "domain": {"type": "string", "maxLength": 253, "description": "default "
               + dns_config.DEFAULT_DOMAIN},
    "nameservers": {**ADDRESSES, "description": "resolvers for other names (none: the "
                    "host's own)"},
    "split": {"type": "object", "maxProperties": dns_config.MAX_SPLIT_DOMAINS,
              "additionalProperties": ADDRESSES,
              "description": "domain -> resolvers for names in it"}}}
LIFECYCLE = {"type": "object", "additionalProperties": False,
             "required": ["ephemeral_offline_seconds"],
             "properties": {"ephemeral_offline_seconds": {
                 "type": "integer", "minimum": 10, "maximum": 365 * 86400,
                 "description": "an ephemeral node offline this long is removed"}}}
KEY_EXPIRY = {"type": "object", "additionalProperties": False, "required": ["disabled"],
              "properties": {"disabled": {**BOOL, "description": "true: the node's key never "
                                          "expires; false: it expires like new nodes' keys"}}}


async def _setting(ctx: Ctx, read) -> web.Response:
    version, stale = await ctx.read_version()
    with ctx.replica.store.read() as txn:
        return web.json_response({"settings": read(txn), "version": version, "stale": stale})


@route("GET", V + "/dns", "read", "The cluster's DNS settings (MagicDNS)", query=STALE_QUERY,
       response=reading("settings", DNS))
async def get_dns(ctx: Ctx):
    return await _setting(ctx, dns_config.stored_settings)


@route("PUT", V + "/dns", "write", "Set the DNS settings (left out: the default)", body=DNS,
       response=written("settings", DNS), linked_inputs={"body": "/settings"})
async def put_dns(ctx: Ctx):
    try:
        settings = dns_config.validated(ctx.body)
    except dns_config.DnsSettingsError as e:
        raise APIError(400, "invalid_setting", str(e)) from None
    r = await ctx.write(DnsSet(settings=settings))
    return web.json_response({"settings": r["value"], "version": r["version"]})


@route("GET", V + "/lifecycle", "read", "Node lifecycle settings", query=STALE_QUERY,
       response=reading("settings", LIFECYCLE))
async def get_lifecycle(ctx: Ctx):
    return await _setting(ctx, lifecycle.stored_settings)


@route("PUT", V + "/lifecycle", "write", "Set the node lifecycle settings", body=LIFECYCLE,
       response=written("settings", LIFECYCLE), linked_inputs={"body": "/settings"})
async def put_lifecycle(ctx: Ctx):
    r = await ctx.write(LifecycleSet(**ctx.body))
    return web.json_response({"settings": r["value"], "version": r["version"]})


@route("PUT", V + "/nodes/{id}/key-expiry", "write", "Disable or enable key expiry for one node",
       body=KEY_EXPIRY, response=answer({"node": NODE, "version": VERSION}))
async def put_key_expiry(ctx: Ctx):
    args = {"id": ctx.param("id"), "disabled": ctx.body["disabled"]}
    if not ctx.body["disabled"]:
        lifetime = ctx.config.node_key_lifetime
        args["key_expiry"] = time.time() + lifetime if lifetime else None
    r = await ctx.write(NodeKeyExpiry(**args))
    return web.json_response({"node": r["value"], "version": r["version"]})
