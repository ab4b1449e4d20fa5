"""Agent protocol endpoints (/machine/*), served by every replica.

Every request is signed with the agent's machine key (proto/machine_auth.py); there is no
bearer secret to leak. Registration consumes a pre-auth key (approved at once, tags from
the key), or sends the person to sign in at the identity provider when single sign-on is
configured (api/sso_api.py), or else leaves the node pending until an admin approves it.
"""
from __future__ import annotations

import secrets
import time

from aiohttp import web

from raftmesh.cluster.commands import NodeExpire, NodeReauthenticate, NodeRegister, NodeReport, NodeRotateKey
from raftmesh.cluster.state_machine import preauth_key_problem, public

from . import auth
from .errors import APIError
from .group_commit import REGISTRATIONS
from .health import serving_readiness
from raftmesh.proto.frames import FrameError, stream_key_bytes
from raftmesh.proto.machine_auth import (FRESHNESS_SECONDS, HEADER_NONCE, NonceCache, SignatureError,
                                         StaleTimestamp, request_key, verify_headers)
from raftmesh.proto import routes
from raftmesh.proto.ack_datagram import AckDatagramError, decode_ack, encode_confirm, tag_matches
from raftmesh.proto.version import HEADER_PROTOCOL_VERSION, UNSUPPORTED, VersionError, requested_version
from .cluster_clock import CLUSTER_CLOCK
from .map_stream import HUB, StreamHub
from .route_input import checked_routes
from .responses import BOOL, FRAMES, NODE_WRITTEN, REGISTERED, STR, VERSION, answer
from .routing import Ctx, conforms, route
from .sso_api import device_login, sso_enabled
from raftmesh.proto.wire import HEADER_STREAM_KEY

KEY32 = {"type": "string", "pattern": r"^[A-Za-z0-9+/]{43}=$"}  # base64 of 32 bytes
ENDPOINT = {"type": "string", "pattern": r"^[0-9a-fA-F:.\[\]]+:\d{1,5}$", "maxLength": 64}
HOSTNAME = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"}
CIDR = {"type": "string", "minLength": 3, "maxLength": 64}
_nonces = NonceCache()
MAP_BARRIER_TIMEOUT = 1.0


def obj(properties: dict, required: tuple = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


async def machine_of(ctx: Ctx, stream_nodes: dict[str, dict | None] | None = None) -> str:
    """The machine key this request proves possession of (401 otherwise). With
    `stream_nodes`, a tag under the key of the machine's stream on this replica will do
    (machine_auth); the node record read to find that stream is left in it (machine ->
    node), so the caller does not read it again. The agent's protocol version is checked
    first: a request in a version this replica cannot serve would be misread."""
    _check_protocol_version(ctx)
    body = await ctx.request.read()
    key = None if stream_nodes is None else _stream_request_key(ctx, stream_nodes)
    try:
        return verify_headers(ctx.request.headers, ctx.request.method, ctx.request.path, body,
                              time.time(), _nonces, key)
    except StaleTimestamp as e:
        cluster_clock = ctx.request.app[CLUSTER_CLOCK]
        offset = cluster_clock.offset()
        if offset is not None and abs(offset) > FRESHNESS_SECONDS / 2:
            raise APIError(503, "not_ready", f"this replica's clock is {offset:+.0f}s off the cluster's, so "
                           "it cannot check the signature's timestamp; retry on another replica")
        # No estimate yet: a replica that is not ready (just started, catching up, cut off)
        # or only just started has applied too few of the others' commands to know whose
        # clock is off (campaign seed 2: restarted with its clock a day ahead, it told a
        # correct agent to fix its clock). A ready replica of a quiet cluster, up for
        # ClusterClock.WARMUP, still says 401: most likely the agent; so does one alone in
        # its cluster, which nobody can correct.
        if offset is None:
            ready, reason = serving_readiness(ctx.request.app, ctx.replica)
            alone = len(ctx.replica.status.get("members", ())) <= 1
            if ready and not alone and cluster_clock.warming_up():
                ready, reason = False, "it has only just started"
            if not ready:
                raise APIError(503, "not_ready", f"the signature's timestamp is off this replica's clock "
                               f"and this replica cannot yet tell whose clock is wrong ({reason}); retry "
                               "on another replica")
        raise APIError(401, "unauthenticated", f"machine signature rejected: {e}")
    except SignatureError as e:
        raise APIError(401, "unauthenticated", f"machine signature rejected: {e}")


def _check_protocol_version(ctx: Ctx) -> None:
    try:
        requested_version(ctx.request.headers.get(HEADER_PROTOCOL_VERSION))
    except VersionError as e:
        raise APIError(400, "bad_request", str(e)) if e.malformed else APIError(426, UNSUPPORTED, str(e))


def _stream_request_key(ctx: Ctx, nodes: dict[str, dict | None]):
    streams = ctx.request.app[HUB].streams

    def key(machine: str, stream_nonce: str) -> bytes | None:
        node = nodes[machine] = node_for_machine(ctx, machine)
        for s in streams.get(node["id"], ()) if node else ():
            if s.nonce == stream_nonce and s.tag_key is not None:
                return request_key(s.tag_key)
        return None
    return key


def node_for_machine(ctx: Ctx, machine: str) -> dict | None:
    with ctx.replica.store.read() as txn:
        node_id = txn.get("node_by_machine", machine)
        return txn.get("nodes", node_id) if node_id else None


def cluster_public_keys(ctx: Ctx) -> list[dict]:
    now = time.time()
    with ctx.replica.store.read() as txn:
        return [{"id": k["id"], "public_key": k["public_key"]} for _, k in txn.items("cluster_keys")
                if k["retire_at"] is None or k["retire_at"] > now]


@route("POST", routes.REGISTER, None, "Register this machine (signed with its machine key)",
       status=200, body=obj({"node_key": KEY32, "hostname": HOSTNAME,
                             "auth_key": {"type": "string", "maxLength": 200},
                             "endpoints": {"type": "array", "items": ENDPOINT, "maxItems": 32},
                             "advertised_routes": {"type": "array", "items": CIDR, "maxItems": 256}},
                            ("node_key", "hostname")), response=REGISTERED)
async def register(ctx: Ctx):
    """A new machine registers without a read barrier first: the write itself is the
    linearizable step, and apply refuses a machine key or pre-auth key the state does not
    allow (state_machine._new_node). Only when this replica's own state cannot answer (the
    machine is known here, the key unknown here, or the write was refused, e.g. because
    the machine registered elsewhere a moment ago) does it catch up with a barrier and
    decide as before, so every answer is one a barrier-first replica could have given."""
    machine = await machine_of(ctx)
    b = dict(ctx.body, advertised_routes=checked_routes(ctx.body.get("advertised_routes", [])))
    if node_for_machine(ctx, machine) is None and ("auth_key" in b or not sso_enabled(ctx)):
        try:
            return await _register_new(ctx, machine, b)
        except APIError as e:
            if e.status == 503:  # outcome unknown or no leader: the agent retries
                raise
    await ctx.read_version()  # see keys and nodes created on other replicas just before
    existing = node_for_machine(ctx, machine)
    lifetime = ctx.config.node_key_lifetime
    key_expiry = time.time() + lifetime if lifetime else None
    if "auth_key" not in b and sso_enabled(ctx) and (existing is None or _expired(existing)):
        return await device_login(ctx, machine, b)
    if existing is not None:
        if not (_expired(existing) and "auth_key" in b):
            return web.json_response({"node": public(existing), "approved": existing["approved"],
                                      "expired": _expired(existing),
                                      "cluster_keys": cluster_public_keys(ctx)})
        ctx.actor = f"node:{existing['id']}"
        r = await ctx.write(NodeReauthenticate(
            id=existing["id"], preauth_key_id=_check_preauth_key(ctx, b["auth_key"]),
            node_key=b["node_key"], key_expiry=key_expiry))
        return web.json_response({"node": public(r["value"]), "approved": True, "expired": False,
                                  "cluster_keys": cluster_public_keys(ctx), "version": r["version"]})
    return await _register_new(ctx, machine, b)


async def _register_new(ctx: Ctx, machine: str, b: dict) -> web.Response:
    """Register the machine as a new node, through the replica's group commit."""
    lifetime = ctx.config.node_key_lifetime
    ctx.actor = f"machine:{machine}"
    args = {"id": "n" + secrets.token_hex(6), "name": b["hostname"].lower(), "machine_key": machine,
            "node_key": b["node_key"], "endpoints": b.get("endpoints", []),
            "advertised_routes": b["advertised_routes"],
            "key_expiry": time.time() + lifetime if lifetime else None}
    if "auth_key" in b:
        args["preauth_key_id"] = _check_preauth_key(ctx, b["auth_key"])
    r = await ctx.write(NodeRegister(**args), ctx.request.app[REGISTRATIONS].propose)
    node = r["value"]
    return web.json_response({"node": public(node), "approved": node["approved"], "expired": False,
                              "cluster_keys": cluster_public_keys(ctx), "version": r["version"]})


def _expired(node: dict) -> bool:
    return bool(node.get("expired")) or (node.get("key_expiry") is not None
                                         and node["key_expiry"] <= time.time())


def _check_preauth_key(ctx: Ctx, token: str) -> str:
    """Refuse bad keys here with a clear 401; the state machine re-checks use limits atomically."""
    parts = auth.split_token(token, "rmp")
    if parts is None:
        raise APIError(401, "unauthenticated", "malformed pre-auth key")
    key_id, secret = parts
    with ctx.replica.store.read() as txn:
        key = txn.get("preauth_keys", key_id)
    if key is None or not auth.secret_matches(secret, key["hash"]):
        raise APIError(401, "unauthenticated", "unknown pre-auth key")
    problem = preauth_key_problem(key, time.time())
    if problem:
        raise APIError(401, "unauthenticated", f"pre-auth key is {problem}")
    return key_id


async def _own_node(ctx: Ctx, stream_tagged: bool = False) -> dict:
    looked_up: dict[str, dict | None] = {}
    machine = await machine_of(ctx, looked_up if stream_tagged else None)
    node = looked_up[machine] if machine in looked_up else node_for_machine(ctx, machine)
    if node is None:
        raise APIError(404, "not_found", "this machine is not registered (or was deleted)")
    return node


@route("POST", routes.REPORT, None, "Report endpoints, advertised routes and which of them "
       "are unreachable now (their primary moves to another router), and the exit node in "
       "use (its id; null: none)",
       body=obj({"endpoints": {"type": "array", "items": ENDPOINT, "maxItems": 32},
                 "advertised_routes": {"type": "array", "items": CIDR, "maxItems": 256},
                 "unreachable_routes": {"type": "array", "items": CIDR, "maxItems": 256},
                 "exit_node": {"type": ["string", "null"], "minLength": 1, "maxLength": 64}}),
       response=NODE_WRITTEN)
async def report(ctx: Ctx):
    node = await _own_node(ctx)
    ctx.actor = f"node:{node['id']}"
    body = {k: checked_routes(v) if k.endswith("_routes") else v for k, v in ctx.body.items()}
    r = await ctx.write(NodeReport(id=node["id"], **body, last_seen=time.time()))
    return web.json_response({"node": public(r["value"]), "version": r["version"]})


@route("POST", routes.ROTATE_KEY, None, "Replace the WireGuard key (request signed by the machine key)",
       body=obj({"old_node_key": KEY32, "node_key": KEY32}, ("old_node_key", "node_key")),
       response=NODE_WRITTEN)
async def rotate_key(ctx: Ctx):
    node = await _own_node(ctx)
    ctx.actor = f"node:{node['id']}"
    r = await ctx.write(NodeRotateKey(id=node["id"], **ctx.body))
    return web.json_response({"node": public(r["value"]), "version": r["version"]})


@route("POST", routes.LOGOUT, None, "Expire this machine's node key", response=NODE_WRITTEN)
async def logout(ctx: Ctx):
    node = await _own_node(ctx)
    ctx.actor = f"node:{node['id']}"
    r = await ctx.write(NodeExpire(id=node["id"]))
    return web.json_response({"node": public(r["value"]), "version": r["version"]})


@route("GET", routes.MAP, None, "Stream this machine's netmap as signed frames (docs/agents.md)",
       query={"since": {"type": "integer", "minimum": 0, "maximum": 2**53 - 1,
                        "description": "the netmap version the agent holds"}},
       response=FRAMES, response_type=routes.FRAME_CONTENT_TYPE)
def map_stream(ctx: Ctx):
    # Not a coroutine itself: it returns serve()'s, so the stream's chain of suspended
    # frames is one shorter. The checks run in a coroutine of their own (awaited by serve),
    # which has ended, dropping the node record and the rest, by the time the stream
    # starts; serve() drops the first netmap once sent (docs/benchmarks.md, stream-memory).
    return ctx.request.app[HUB].serve(ctx.request, _map_start(ctx), ctx.config.stream_keepalive)


def _stream_key(ctx: Ctx) -> bytes | None:
    """The agent's X25519 public key for its stream, if it sent one (proto/frames.py). A
    header, not a query parameter: a replica holds each stream's request for the stream's
    life, and a parsed query cost ~1.5 KiB per stream where the header costs ~0.65."""
    text = ctx.request.headers.get(HEADER_STREAM_KEY)
    try:
        return None if text is None else stream_key_bytes(text)
    except FrameError as e:
        raise APIError(400, "bad_request", f"{HEADER_STREAM_KEY}: {e}") from None


async def _map_start(ctx: Ctx) -> tuple[object, object]:
    """Authenticate and check a map request; (its subscribed stream, first netmap or delta
    to send)."""
    machine = await machine_of(ctx)
    stream_key = _stream_key(ctx)
    hub = ctx.request.app[HUB]
    # Catch up with the leader first (bounded), so a node deleted or registered a moment
    # ago on another replica is seen as such; without a quorum, serve what is applied here.
    current = await hub.catch_up(ctx.replica, MAP_BARRIER_TIMEOUT)
    node = node_for_machine(ctx, machine)
    if not current and (node is None or not node["approved"]):
        # A refusal from a replica that may be behind (just added, cut off) could be wrong,
        # and an agent acts on it; send the agent elsewhere instead.
        raise APIError(503, "not_ready", "this replica cannot confirm this node's state right "
                       "now (behind or without quorum); use another replica")
    if node is None:
        raise APIError(404, "not_found", "this machine is not registered (or was deleted)")
    if not node["approved"]:
        raise APIError(403, "pending_approval", f"node {node['id']} waits for an admin to approve it")
    if (reason := hub.unserved_reason()) is not None:
        raise APIError(503, "not_ready", reason)
    since = ctx.query.get("since")
    if since is not None and not await hub.wait_version(since, ctx.config.write_timeout):
        raise APIError(503, "not_ready", f"this replica's netmaps are at version {hub.feed.version}, "
                       f"behind the agent's {since}; use another replica")
    try:
        stream, first = await hub.open_stream(node["id"], ctx.request.remote, since,
                                              ctx.request.headers[HEADER_NONCE], stream_key)
    except FrameError as e:  # an unusable key (e.g. a low-order point): nothing subscribed
        raise APIError(400, "bad_request", f"{HEADER_STREAM_KEY}: {e}") from None
    if first is None and not current:
        raise APIError(503, "not_ready", "this replica cannot confirm this node's state right "
                       "now (behind or without quorum); use another replica")
    if first is None:
        raise APIError(401, "node_expired", f"node {node['id']}'s key has expired or it logged out; "
                       "register again with an auth key")
    return stream, first


ACK_APPLIED = {"type": "array", "maxItems": 64, "description": "[version, seconds since the agent "
               "applied it] for versions applied since the last ack (coalesced, deferred acks)",
               "items": {"type": "array", "minItems": 2, "maxItems": 2,
                         "prefixItems": [{"type": "integer", "minimum": 0},
                                         {"type": "number", "minimum": 0, "maximum": 86400}]}}


COUNT = {"type": "integer", "minimum": 0, "maximum": 1 << 20}
ACK_PATHS = obj({"direct": COUNT, "relay": COUNT}, ("direct", "relay"))
ACK_SETUP = {"type": "array", "maxItems": 64, "description": "seconds from a peer's first "
             "appearance in the netmap to the first handshake with it, for peers connected since "
             "the last ack", "items": {"type": "number", "minimum": 0, "maximum": 3600}}


ACK_BODY = obj({"version": {"type": "integer", "minimum": 0}, "applied": ACK_APPLIED,
                "paths": ACK_PATHS, "setup": ACK_SETUP}, ("version",))


@route("POST", routes.ACK, None, "Acknowledge the netmap version this machine has applied",
       body=ACK_BODY, response=answer({"node_id": STR, "version": VERSION, "streaming_here": BOOL}))
async def ack(ctx: Ctx):
    node = await _own_node(ctx, stream_tagged=True)  # an ack may be tagged (machine_auth)
    hub = ctx.request.app[HUB]
    hub.report_paths(node["id"], ctx.body.get("paths"), ctx.body.get("setup"))
    streaming = hub.ack(node["id"], ctx.body["version"], ctx.body.get("applied"))
    return web.json_response({"node_id": node["id"], "version": ctx.body["version"],
                              "streaming_here": streaming})


def ack_datagram(hub: StreamHub, data: bytes) -> bytes | None:
    """An ack datagram (proto/ack_datagram.py) on the replica's UDP socket: its
    confirmation, or None (and nothing recorded) unless it is well formed, tagged under
    the key of a stream open here and a valid ack body as POST /machine/ack takes it."""
    try:
        nonce, body, tag, payload = decode_ack(data)
    except AckDatagramError:
        return None
    stream = hub.stream_by_nonce(nonce)
    if stream is None or not tag_matches(request_key(stream.tag_key), tag, payload) \
            or not conforms(ACK_BODY, body):
        return None
    hub.report_paths(stream.node_id, body.get("paths"), body.get("setup"))
    hub.ack(stream.node_id, body["version"], body.get("applied"))
    return encode_confirm(nonce, body["version"])
