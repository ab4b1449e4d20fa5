"""Admin API handlers (/api/v1): users, nodes, keys, policy, audit, cluster.

Handlers validate, decide everything non-deterministic (ids, secrets, time), propose one
command through Raft and answer with the state version it committed at. Reads are
linearizable unless ?stale=true.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import time

import aiohttp
from aiohttp import web

from raftmesh.cluster.commands import (ApiKeyCreate, ApiKeyDelete, ClusterKeyRotate, MemberAnnounce,
                                       MemberRemove, NodeApprove, NodeDelete, NodeExpire, NodeRoutes,
                                       NodeUpdate, PolicySet, PreauthKeyCreate, PreauthKeyDelete,
                                       UserCreate, UserDelete)
from raftmesh.cluster.names import USER_NAME_SCHEMA, is_user_name
from raftmesh.cluster.policy import Policy, PolicyError, PolicyTooLarge, parse_policy
from raftmesh.cluster.policy_form import UnreadablePolicy, compile_policy, stored_policy
from raftmesh.cluster.routes import route_table
from raftmesh.cluster.state_machine import public
from raftmesh.storage.audit_chain import GENESIS, verify
from raftmesh.storage.json_codec import compact_json

from . import auth
from .errors import APIError
from raftmesh.proto.machine_auth import new_cluster_key
from raftmesh.proto.numbers import MAX_SAFE_INTEGER
from .health import serving_readiness
from .map_stream import HUB
from .route_input import checked_routes
from .routing import STALE_QUERY, Ctx, openapi, route, staleness
from .responses import (ANY_OBJECT, API_KEY, AUDIT_PAGE, BOOL, CLUSTER, CLUSTER_KEY, DELETED, MEMBER,
                        NODE, NODE_WRITTEN, POLICY_VERSION, POLICY_WARNINGS, PREAUTH_KEY, ROUTE,
                        SECRET_SHOWN_ONCE, STR, STREAM, USER, VERSION, answer, listing, reading,
                        written)

V = "/api/v1"
NAME = {"type": "string", "pattern": r"^[a-z0-9][a-z0-9._-]{0,62}$"}
TAG = {"type": "string", "pattern": r"^tag:[a-z0-9][a-z0-9-]{0,62}$"}
CIDR = {"type": "string", "minLength": 3, "maxLength": 64}


def obj(properties: dict, required: tuple = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


_dumps = compact_json(sort_keys=False)  # json.dumps rebuilds its encoder on every call


def ok(body: dict, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=_dumps)


async def _get(ctx: Ctx, table: str, key: str, what: str) -> tuple[dict, int]:
    version, _ = await ctx.read_version()
    with ctx.replica.store.read() as txn:
        record = txn.get(table, key)
    if record is None:
        raise APIError(404, "not_found", f"{what} {key!r} does not exist")
    return public(record), version


async def _list(ctx: Ctx, table: str, keep=lambda r: True) -> tuple[list, int, bool]:
    version, stale = await ctx.read_version()
    with ctx.replica.store.read() as txn:
        return [public(r) for _, r in txn.items(table) if keep(r)], version, stale


# -- OpenAPI --------------------------------------------------------------------------------
@route("GET", V + "/openapi.json", None, "This document",
       response=answer({"openapi": STR, "paths": ANY_OBJECT}))
async def get_openapi(ctx: Ctx):
    return ok(openapi())


# -- users ------------------------------------------------------------------------------------
@route("POST", V + "/users", "write", "Create a user", status=201,
       body=obj({"name": USER_NAME_SCHEMA, "display_name": {"type": "string", "maxLength": 200}},
                ("name",)),
       response=written("user", USER))
async def create_user(ctx: Ctx):
    check_user_name("name", ctx.body["name"])
    r = await ctx.write(UserCreate(**ctx.body))
    return ok({"user": r["value"], "version": r["version"]}, 201)


@route("GET", V + "/users", "read", "List users", query=STALE_QUERY,
       response=listing("users", USER))
async def list_users(ctx: Ctx):
    users, version, stale = await _list(ctx, "users")
    return ok({"users": users, "version": version, "stale": stale})


@route("GET", V + "/users/{name}", "read", "Get a user", query=STALE_QUERY,
       response=reading("user", USER))
async def get_user(ctx: Ctx):
    user, version = await _get(ctx, "users", ctx.param("name"), "user")
    return ok({"user": user, "version": version, "stale": bool(ctx.query.get("stale"))})


@route("DELETE", V + "/users/{name}", "write", "Delete a user (must own no nodes)",
       response=DELETED)
async def delete_user(ctx: Ctx):
    r = await ctx.write(UserDelete(name=ctx.param("name")))
    return ok({"deleted": r["value"], "version": r["version"]})


def check_user_name(field: str, name: str) -> None:
    """The schema's pattern, as JSON Schema validators apply it, lets a trailing newline
    through (`$`); the rule itself (cluster/names.py) does not."""
    if not is_user_name(name):
        raise APIError(400, "validation_failed", f"{field}: {name!r} is not a valid user name",
                       [{"field": field, "message": "a user name is a plain name or an e-mail "
                                                    "address"}])


# -- pre-auth keys ----------------------------------------------------------------------------
@route("POST", V + "/preauth-keys", "write", "Create a pre-auth key (shown once)", status=201,
       body=obj({"user": USER_NAME_SCHEMA, "reusable": {"type": "boolean"}, "ephemeral": {"type": "boolean"},
                 "expiration_seconds": {"type": "integer", "minimum": 1, "maximum": 10 * 365 * 86400},
                 "usage_limit": {"type": "integer", "minimum": 1},
                 "tags": {"type": "array", "items": TAG, "uniqueItems": True, "maxItems": 32}},
                ("user",)) | {"dependentSchemas": {"usage_limit": {  # only reusable keys take one
                    "required": ["reusable"], "properties": {"reusable": {"const": True}}}}},
       response=written("preauth_key", PREAUTH_KEY, key=SECRET_SHOWN_ONCE))
async def create_preauth_key(ctx: Ctx):
    b = ctx.body
    check_user_name("user", b["user"])
    await check_tags(ctx, b.get("tags", []))
    key_id, token, digest = auth.new_secret_token("rmp", ctx.token_seed("preauth-key"))
    args = {"id": key_id, "user": b["user"], "hash": digest,
            "reusable": b.get("reusable", False), "ephemeral": b.get("ephemeral", False),
            "expires_at": time.time() + b.get("expiration_seconds", 3600),
            "usage_limit": b.get("usage_limit"), "tags": b.get("tags", [])}
    r = await ctx.write(PreauthKeyCreate(**args))
    return ok({"preauth_key": r["value"], "key": token, "version": r["version"]}, 201)


@route("GET", V + "/preauth-keys", "read", "List pre-auth keys",
       query={**STALE_QUERY, "user": USER_NAME_SCHEMA}, response=listing("preauth_keys", PREAUTH_KEY))
async def list_preauth_keys(ctx: Ctx):
    user = ctx.query.get("user")
    keys, version, stale = await _list(ctx, "preauth_keys", lambda k: user in (None, k["user"]))
    return ok({"preauth_keys": keys, "version": version, "stale": stale})


@route("DELETE", V + "/preauth-keys/{id}", "write", "Revoke a pre-auth key", response=DELETED)
async def delete_preauth_key(ctx: Ctx):
    r = await ctx.write(PreauthKeyDelete(id=ctx.param("id")))
    return ok({"deleted": r["value"], "version": r["version"]})


# -- API keys -------------------------------------------------------------------------------------
@route("POST", V + "/api-keys", "admin", "Create an API key (shown once)", status=201,
       body=obj({"name": {"type": "string", "minLength": 1, "maxLength": 100},
                 "scopes": {"type": "array", "minItems": 1, "uniqueItems": True,
                            "items": {"enum": list(auth.SCOPES)}},
                 "expiration_seconds": {"type": "integer", "minimum": 1,
                                        "maximum": 10 * 365 * 86400}}, ("name", "scopes")),
       response=written("api_key", API_KEY, key=SECRET_SHOWN_ONCE))
async def create_api_key(ctx: Ctx):
    key_id, token, digest = auth.new_secret_token("rmk", ctx.token_seed("api-key"))
    exp = ctx.body.get("expiration_seconds")
    args = {"id": key_id, "name": ctx.body["name"], "scopes": ctx.body["scopes"], "hash": digest,
            "expires_at": time.time() + exp if exp else None}
    r = await ctx.write(ApiKeyCreate(**args))
    return ok({"api_key": r["value"], "key": token, "version": r["version"]}, 201)


@route("GET", V + "/api-keys", "admin", "List API keys", query=STALE_QUERY,
       response=listing("api_keys", API_KEY))
async def list_api_keys(ctx: Ctx):
    keys, version, stale = await _list(ctx, "api_keys")
    return ok({"api_keys": keys, "version": version, "stale": stale})


@route("DELETE", V + "/api-keys/{id}", "admin", "Delete an API key", response=DELETED)
async def delete_api_key(ctx: Ctx):
    r = await ctx.write(ApiKeyDelete(id=ctx.param("id")))
    return ok({"deleted": r["value"], "version": r["version"]})


# -- nodes ------------------------------------------------------------------------------------------
@route("GET", V + "/nodes", "read", "List nodes", query={**STALE_QUERY, "user": USER_NAME_SCHEMA, "tag": TAG},
       response=listing("nodes", NODE))
async def list_nodes(ctx: Ctx):
    user, tag = ctx.query.get("user"), ctx.query.get("tag")
    nodes, version, stale = await _list(
        ctx, "nodes", lambda n: user in (None, n["user"]) and (tag is None or tag in n["tags"]))
    await _add_stream_info(ctx, nodes)
    return ok({"nodes": nodes, "version": version, "stale": stale})


@route("GET", V + "/nodes/{id}", "read", "Get a node", query=STALE_QUERY,
       response=reading("node", NODE))
async def get_node(ctx: Ctx):
    node, version = await _get(ctx, "nodes", ctx.param("id"), "node")
    await _add_stream_info(ctx, [node])
    return ok({"node": node, "version": version, "stale": bool(ctx.query.get("stale"))})


async def _add_stream_info(ctx: Ctx, nodes: list[dict]) -> None:
    """Per node, its stream as the replica serving it sees it (replica, acked version).

    Acks are kept by the replica that serves the stream, not replicated (they are as
    frequent as netmap changes), so this asks each replica that serves any of the nodes.
    """
    hub = ctx.request.app[HUB]
    wanted = {n["stream_replica"] for n in nodes if n.get("online") and n.get("stream_replica")}
    by_node: dict[str, dict] = {}
    unreachable: set[str] = set()
    with ctx.replica.store.read() as txn:
        members = {m["id"]: m for _, m in txn.items("members")}
    auth_header = {auth.PEER_HEADER: auth.peer_token(ctx.config.cluster_secret)}

    async def fetch(session, rid):
        if rid == ctx.config.id:
            return hub.stream_info()
        url = members.get(rid, {}).get("api_url")
        if not url:
            unreachable.add(rid)
            return []
        try:
            async with session.get(url + V + "/streams", headers=auth_header) as resp:
                return (await resp.json())["streams"]
        except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError):
            unreachable.add(rid)
            return []

    if wanted:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
            for streams in await asyncio.gather(*(fetch(session, r) for r in sorted(wanted))):
                for s in streams:
                    by_node[s["node_id"]] = s
    for n in nodes:
        n.pop("stream_session", None)
        s = by_node.get(n["id"])
        n["stream"] = None if s is None else {**{k: s[k] for k in (
            "replica", "connected_at", "sent_version", "acked_version", "acked_at")},
            "paths": s.get("paths")}  # peers direct or relayed, as the agent's last ack said
        if s is None and n.get("stream_replica") in unreachable and n.get("online"):
            n["stream"] = {"replica": n["stream_replica"], "error": "replica unreachable"}


@route("GET", V + "/nodes/{id}/netmap", "read", "The netmap this replica streams to a node now "
       "(what the agent should hold once it acknowledged this version)", query=STALE_QUERY,
       response=answer({"netmap": ANY_OBJECT, "version": VERSION, "replica": STR}))
async def get_node_netmap(ctx: Ctx):
    hub = ctx.request.app[HUB]
    if not ctx.query.get("stale") and not await hub.catch_up(ctx.replica, ctx.config.write_timeout):
        raise APIError(503, "not_ready", "cannot confirm the latest state (no quorum?); retry, or "
                       "pass ?stale=true for this replica's local view")
    if (reason := hub.unserved_reason()) is not None:
        raise APIError(503, "not_ready", reason)
    node_id = ctx.param("id")
    netmap = await hub.on_feed(lambda feed: feed.full(node_id))
    if netmap is None:
        with ctx.replica.store.read() as txn:
            exists = txn.get("nodes", node_id) is not None
        raise APIError(404, "not_found", f"node {node_id!r} " + (
            "is not part of the mesh now (pending, expired or logged out)" if exists
            else "does not exist"))
    return ok({"netmap": netmap.to_json(), "version": netmap.version, "replica": ctx.config.id})


@route("GET", V + "/streams", "read", "Agent map streams open on this replica",
       query={"node": {"type": "string", "maxLength": 64}},
       response=answer({"replica": STR, "streams": {"type": "array", "items": STREAM}}))
async def list_streams(ctx: Ctx):
    return ok({"replica": ctx.config.id,
               "streams": ctx.request.app[HUB].stream_info(ctx.query.get("node"))})


@route("PATCH", V + "/nodes/{id}", "write", "Rename a node or set its tags",
       body={**obj({"name": NAME, "tags": {"type": "array", "items": TAG, "uniqueItems": True,
                                           "maxItems": 32}}), "minProperties": 1},
       response=NODE_WRITTEN)
async def patch_node(ctx: Ctx):
    if "tags" in ctx.body:
        await _get(ctx, "nodes", ctx.param("id"), "node")  # a missing node is a 404, not a tag error
        await check_tags(ctx, ctx.body["tags"])
    r = await ctx.write(NodeUpdate(id=ctx.param("id"), **ctx.body))
    return ok({"node": r["value"], "version": r["version"]})


@route("DELETE", V + "/nodes/{id}", "write", "Delete a node (its streams close at once)",
       response=DELETED)
async def delete_node(ctx: Ctx):
    r = await ctx.write(NodeDelete(id=ctx.param("id")))
    return ok({"deleted": r["value"], "version": r["version"]})


@route("POST", V + "/nodes/{id}/approve", "write", "Approve a pending node (?user=: whose device it is)",
       query={"user": {"type": "string", "minLength": 1, "maxLength": 128,
                       "description": "the node's owner from now on"}},
       response=NODE_WRITTEN)
async def approve_node(ctx: Ctx):
    r = await ctx.write(NodeApprove(id=ctx.param("id"), **ctx.query))
    return ok({"node": r["value"], "version": r["version"]})


@route("POST", V + "/nodes/{id}/expire", "write", "Expire a node's key now", response=NODE_WRITTEN)
async def expire_node(ctx: Ctx):
    r = await ctx.write(NodeExpire(id=ctx.param("id")))
    return ok({"node": r["value"], "version": r["version"]})


@route("PUT", V + "/nodes/{id}/routes", "write", "Approve a subset of advertised routes",
       body=obj({"approved_routes": {"type": "array", "items": CIDR, "uniqueItems": True,
                                     "maxItems": 256}}, ("approved_routes",)),
       response=NODE_WRITTEN)
async def set_routes(ctx: Ctx):
    r = await ctx.write(NodeRoutes(id=ctx.param("id"),
                                   approved_routes=checked_routes(ctx.body["approved_routes"])))
    return ok({"node": r["value"], "version": r["version"]})


@route("GET", V + "/routes", "read", "Subnet routes and exit routes with the routers serving "
       "them: each subnet's primary (the one its traffic goes through) and candidates",
       query=STALE_QUERY, response=listing("routes", ROUTE))
async def list_routes(ctx: Ctx):
    version, stale = await ctx.read_version()
    with ctx.replica.store.read() as txn:
        return ok({"routes": route_table(txn), "version": version, "stale": stale})


# -- policy -------------------------------------------------------------------------------------------
POLICY_BODY = {"type": "string", "x-raw-text": True,
               "description": "the policy as HuJSON text (comments and trailing commas allowed)"}


# Parsing a large policy takes CPU-bound work, off the event loop in one worker thread
# (docs/benchmarks.md, policy): /healthz and every other request stay served meanwhile, and
# concurrent validations queue here instead of multiplying threads.
_POLICY_WORKER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="policy")


async def in_policy_worker(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(_POLICY_WORKER, fn, *args)


def parsed_policy(text: str) -> Policy:
    """A policy's text parsed and validated, or the APIError saying why not."""
    try:
        return parse_policy(text)
    except PolicyTooLarge as e:
        raise APIError(413, "payload_too_large", str(e), e.errors)
    except PolicyError as e:
        raise APIError(400, "validation_failed", "policy is invalid: " + "; ".join(
            f"{d['path']}: {d['message']}" for d in e.errors[:10]), e.errors)


def compiled_policy(text: str) -> tuple[dict, list[dict]]:
    """What policy.set carries besides the text (cluster/policy_form.py): the compiled form
    and the warnings (what the text holds that raftmesh does not enforce)."""
    policy = parsed_policy(text)
    return compile_policy(policy), list(policy.warnings)


async def current_policy(ctx: Ctx):
    with ctx.replica.store.read() as txn:
        head = txn.get("meta", "policy_head")
        record = txn.get("policy_versions", f"{head['version']:010d}") if head else None
    return record


def shown(record: dict) -> dict:
    """A policy record as answered: its text, not the compiled form derived from it."""
    return {k: v for k, v in record.items() if k != "compiled"}


def _tag_owners(record: dict) -> dict:
    try:
        return stored_policy(record).tag_owners
    except UnreadablePolicy as e:
        raise APIError(503, "not_ready", f"this replica cannot interpret policy version "
                       f"{record['version']}: {e}; use another replica") from None


async def check_tags(ctx: Ctx, tags: list[str]) -> None:
    """Tags must be declared in tagOwners; a non-admin caller must own them (API keys own none)."""
    if not tags:
        return
    if "admin" not in ctx.scopes:
        raise APIError(403, "forbidden", "only admin keys may assign tags")
    record = await current_policy(ctx)
    owners = await in_policy_worker(_tag_owners, record) if record else {}
    unknown = [t for t in tags if t not in owners]
    if unknown:
        raise APIError(400, "validation_failed", f"tags {unknown} are not declared in the policy's tagOwners",
                       [{"field": "tags", "message": f"{t} is not in tagOwners"} for t in unknown])


@route("GET", V + "/policy", "read", "The current policy", query=STALE_QUERY,
       response=answer({"policy": answer({"version": VERSION, "text": STR},
                                         {"warnings": POLICY_WARNINGS}), "version": VERSION}))
async def get_policy(ctx: Ctx):
    version, _ = await ctx.read_version()
    record = await current_policy(ctx)
    if record is None:
        raise APIError(404, "not_found", "no policy has been set (everything is denied)")
    return ok({"policy": shown(record), "version": version})


@route("PUT", V + "/policy", "write", "Replace the policy (validated, tests must pass)", body=POLICY_BODY,
       query={"expected_version": {"type": "integer", "minimum": 0}},
       response=written("policy", POLICY_VERSION, warnings=POLICY_WARNINGS),
       linked_inputs={"expected_version": "/policy/version", "body": "/policy/text"})
async def put_policy(ctx: Ctx):
    compiled, warnings = await in_policy_worker(compiled_policy, ctx.body)
    args = {"text": ctx.body, "compiled": compiled}
    if warnings:
        args["warnings"] = warnings
    if "expected_version" in ctx.query:
        args["expected_version"] = ctx.query["expected_version"]
    r = await ctx.write(PolicySet(**args))
    return ok({"policy": r["value"], "version": r["version"], "warnings": warnings})


@route("POST", V + "/policy/validate", "read", "Validate a policy without storing it", body=POLICY_BODY,
       response=answer({"valid": {"const": True}, "warnings": POLICY_WARNINGS}))
async def validate_policy_route(ctx: Ctx):
    policy = await in_policy_worker(parsed_policy, ctx.body)
    return ok({"valid": True, "warnings": list(policy.warnings)})


@route("GET", V + "/policy/versions", "read", "Every stored policy version",
       query={**STALE_QUERY, "include_text": {"type": "boolean"}},
       response=listing("versions", POLICY_VERSION))
async def list_policy_versions(ctx: Ctx):
    versions, version, stale = await _list(ctx, "policy_versions")
    versions = [shown(p) for p in versions]
    if not ctx.query.get("include_text"):
        versions = [{k: v for k, v in p.items() if k != "text"} for p in versions]
    return ok({"versions": versions, "version": version, "stale": stale})


TIME_QUERY = {"type": "number", "minimum": 0, "maximum": MAX_SAFE_INTEGER,
              "description": "Unix time"}


# -- audit ---------------------------------------------------------------------------------------------
@route("GET", V + "/audit", "audit", "Audit log, oldest first, paged by sequence number",
       query={**STALE_QUERY, "after_seq": {"type": "integer", "minimum": 0},
              "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
              "since": TIME_QUERY, "until": TIME_QUERY,
              "actor": {"type": "string"}, "target": {"type": "string"},
              "action": {"type": "string"}}, response=AUDIT_PAGE)
async def get_audit(ctx: Ctx):
    q = ctx.query
    version, stale = await ctx.read_version()
    limit, entries, last_seq = q.get("limit", 100), [], q.get("after_seq", 0)
    with ctx.replica.store.read() as txn:
        for key, e in txn.items("audit", f"{last_seq + 1:016d}"):
            last_seq = e["seq"]
            if (q.get("since") is not None and e["time"] < q["since"]) or \
               (q.get("until") is not None and e["time"] > q["until"]) or \
               any(q.get(f) not in (None, e[f]) for f in ("actor", "target", "action")):
                continue
            entries.append(e)
            if len(entries) >= limit:
                break
        head = txn.get("meta", "audit_head") or {"seq": 0, "hash": None}
    return ok({"entries": entries, "next_after_seq": last_seq, "head": head, "version": version,
               "stale": stale})


AUDIT_VERIFY_CHUNK = 1000  # entries per store read: the store's lock is held while reading


@route("GET", V + "/audit/verify", "audit", "Check the audit log's hash chain on this replica, "
       "from its first entry to its head", query=STALE_QUERY,
       response=answer({"intact": BOOL, "detail": STR, "head": answer({"seq": VERSION}),
                        "version": VERSION, "stale": BOOL}))
async def verify_audit(ctx: Ctx):
    version, stale = await ctx.read_version()
    prev_hash, next_seq, count, intact, detail = GENESIS, 1, 0, True, ""
    with ctx.replica.store.read() as txn:
        head = txn.get("meta", "audit_head") or {"seq": 0, "hash": None}
    while intact and next_seq <= head["seq"]:
        with ctx.replica.store.read() as txn:
            chunk = list(itertools.islice((e for _, e in txn.items("audit", f"{next_seq:016d}")),
                                          min(AUDIT_VERIFY_CHUNK, head["seq"] - next_seq + 1)))
        if not chunk:
            intact, detail = False, f"entries {next_seq}..{head['seq']} are missing"
            break
        intact, detail = verify(chunk, prev_hash, next_seq)
        prev_hash, next_seq, count = chunk[-1].get("hash"), chunk[-1].get("seq", 0) + 1, count + len(chunk)
        await asyncio.sleep(0)  # other requests between chunks
    if intact and head["seq"] and prev_hash != head["hash"]:
        intact, detail = False, f"the head's hash does not match entry {head['seq']}"
    return ok({"intact": intact, "detail": f"{count} entries verified" if intact else detail,
              "head": head, "version": version, "stale": stale})


# -- cluster -----------------------------------------------------------------------------------------
@route("GET", V + "/cluster/self", "read", "This replica's Raft status",
       response=answer({"replica": ANY_OBJECT}))
async def cluster_self(ctx: Ctx):
    ready, reason = serving_readiness(ctx.request.app, ctx.replica)
    status = {k: v for k, v in ctx.replica.status.items() if k != "leader_heard"}  # monotonic
    age, _ = staleness(ctx.replica)
    return ok({"replica": dict(status, api_url=ctx.config.api_url,
                               applied_version=ctx.replica.store.applied_version(),
                               leader_contact_ms=None if age is None else round(age * 1e3),
                               ready=ready, ready_reason=reason)})


def member_api_urls(store) -> dict[str, str | None]:
    """Each recorded member's API URL by Raft address (the replicated members table), for
    replicas that call each other."""
    with store.read() as txn:
        return {m["raft_addr"]: m.get("api_url") for _, m in txn.items("members")}


def raft_members(ctx: Ctx) -> list[dict]:
    """The members of the Raft configuration, each with its id and API URL if registered."""
    with ctx.replica.store.read() as txn:
        known = {m["raft_addr"]: m for _, m in txn.items("members")}
    return [known.get(a, {"id": None, "raft_addr": a, "api_url": None})
            for a in ctx.replica.status.get("members", [])]


@route("GET", V + "/cluster", "read", "Members, leader, term, commit index, applied versions",
       response=CLUSTER)
async def get_cluster(ctx: Ctx):
    status = ctx.replica.status
    auth_header = {auth.PEER_HEADER: auth.peer_token(ctx.config.cluster_secret)}

    async def probe(session, member):
        if member["raft_addr"] == ctx.config.raft_addr:
            ready, reason = serving_readiness(ctx.request.app, ctx.replica)
            return dict(member, **{k: status.get(k) for k in ("state", "term", "commit_index",
                                                              "applied_index")},
                        applied_version=ctx.replica.store.applied_version(), reachable=True,
                        ready=ready, ready_reason=reason)
        if not member.get("api_url"):
            return dict(member, reachable=False)
        try:
            async with session.get(member["api_url"] + V + "/cluster/self", headers=auth_header) as resp:
                rep = (await resp.json())["replica"]
            return dict(member, state=rep["state"], term=rep["term"], commit_index=rep["commit_index"],
                        applied_version=rep["applied_version"], reachable=True,
                        **{k: rep.get(k) for k in ("applied_index", "ready", "ready_reason")})
        except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError):
            return dict(member, reachable=False)

    timeout = aiohttp.ClientTimeout(total=1.0)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        members = await asyncio.gather(*(probe(session, m) for m in raft_members(ctx)))
    leader = next((m for m in members if m["raft_addr"] == status.get("leader")), None)
    return ok({"members": members, "leader": leader and leader.get("id"),
               "leader_raft_addr": status.get("leader"), "term": status.get("term"),
               "commit_index": status.get("commit_index"), "has_quorum": status.get("has_quorum")})


@route("GET", V + "/cluster/members", "read", "Registered members", query=STALE_QUERY,
       response=listing("members", MEMBER))
async def list_members(ctx: Ctx):
    members, version, stale = await _list(ctx, "members")
    return ok({"members": members, "version": version, "stale": stale})


MEMBER_BODY = obj({"id": NAME, "raft_addr": {"type": "string", "pattern": r"^[^:\s]+:\d{1,5}$"},
                   "api_url": {"type": "string", "pattern": r"^https?://\S+$"}},
                  ("id", "raft_addr", "api_url"))


async def _membership(ctx: Ctx, action: str, raft_addr: str) -> None:
    fut = ctx.replica.change_membership(action, raft_addr)
    try:
        outcome = await asyncio.wait_for(asyncio.wrap_future(fut), ctx.config.write_timeout)
    except asyncio.TimeoutError:
        raise APIError(503, "outcome_unknown", "membership change not confirmed in time")
    if outcome.kind == "applied":
        return
    if outcome.reason != "request_denied":
        raise APIError(503, "no_leader" if outcome.kind == "not_applied" else "outcome_unknown",
                       f"membership change not applied ({outcome.reason})")
    # The leader refuses a change that would change nothing and one made while another is
    # uncommitted alike; the membership tells which, so a client knows whether to retry.
    if action == "add" and raft_addr in ctx.replica.status.get("members", []):
        raise _already_member(raft_addr)
    raise APIError(409, "membership_change_in_progress",
                   "another membership change is not committed yet; retry shortly")


def _already_member(raft_addr: str) -> APIError:
    return APIError(409, "already_member", f"{raft_addr} is already a member")


@route("POST", V + "/cluster/members", "admin", "Add a replica (start it with --join)", status=201,
       body=MEMBER_BODY, response=written("member", MEMBER))
async def add_member(ctx: Ctx):
    if ctx.body["raft_addr"] in ctx.replica.status.get("members", []):
        raise _already_member(ctx.body["raft_addr"])
    await _membership(ctx, "add", ctx.body["raft_addr"])  # first: a refused change leaves no record
    r = await ctx.write(MemberAnnounce(**ctx.body))
    return ok({"member": r["value"], "version": r["version"]}, 201)


@route("DELETE", V + "/cluster/members/{id}", "admin", "Remove a replica (or the record of a former one)",
       response=written("deleted", MEMBER, nodes_marked_offline=VERSION))
async def remove_member(ctx: Ctx):
    member, _ = await _get(ctx, "members", ctx.param("id"), "member")
    if member["raft_addr"] in ctx.replica.status.get("members", []):
        await _membership(ctx, "remove", member["raft_addr"])
    r = await ctx.write(MemberRemove(id=member["id"]))
    return ok({"deleted": r["value"]["member"], "version": r["version"],
               "nodes_marked_offline": len(r["value"]["nodes"])})


@route("POST", V + "/cluster/snapshot", "admin", "Take a snapshot and compact this replica's log now",
       status=202, response=answer({"requested": {"const": True}}))
async def force_snapshot(ctx: Ctx):
    ctx.replica.request_snapshot()
    return ok({"requested": True}, 202)


# -- netmap signing keys ------------------------------------------------------------------
@route("GET", V + "/cluster/keys", "read", "Netmap signing keys (public halves)", query=STALE_QUERY,
       response=listing("keys", CLUSTER_KEY))
async def list_cluster_keys(ctx: Ctx):
    keys, version, stale = await _list(ctx, "cluster_keys")
    return ok({"keys": keys, "version": version, "stale": stale})


@route("POST", V + "/cluster/keys/rotate", "admin", "Start signing netmaps with a new key; the old "
       "one keeps verifying for overlap_seconds", status=201,
       body=obj({"overlap_seconds": {"type": "integer", "minimum": 0, "maximum": 30 * 86400}}),
       response=written("key", CLUSTER_KEY))
async def rotate_cluster_key(ctx: Ctx):
    args = dict(new_cluster_key(), overlap_seconds=ctx.body.get("overlap_seconds", 86400))
    r = await ctx.write(ClusterKeyRotate(**args))
    return ok({"key": r["value"], "version": r["version"]}, 201)
