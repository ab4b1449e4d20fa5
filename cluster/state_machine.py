"""Deterministic apply of commands to the replicated state.

`apply(txn, command, version)` is a pure function of the current state (seen through the
`Txn` protocol of storage/state_store.py), the command and its Raft index: no clock, no
randomness, no I/O. Every replica therefore reaches the same state at the same version.
A command the state does not allow is rejected with a stable error code and changes
nothing (writes are staged and only flushed on success). Every change appends a
hash-chained audit entry in the same transaction.
"""
from __future__ import annotations

import ipaddress
from itertools import islice
from typing import Any, Callable, Protocol

from raftmesh.storage.audit_chain import GENESIS, seal

from . import commands as c
from . import routes
from .commands import ABSENT, Command, unless_absent
from .idp_groups import idp_groups_of, node_owner

IPV4_BASE = int(ipaddress.IPv4Address("100.64.0.0"))
IPV4_SLOTS = 1 << 22  # 100.64.0.0/10
IPV6_BASE = int(ipaddress.IPv6Address("fd7a:115c:a1e0::"))
IDEMPOTENCY_TTL = 24 * 3600.0
SECRET_FIELDS = ("hash", "private_key")


class Txn(Protocol):
    def get(self, table: str, key: str) -> Any: ...
    def put(self, table: str, key: str, value: Any) -> None: ...
    def delete(self, table: str, key: str) -> None: ...
    def items(self, table: str, start: str = ""): ...


class Rejected(Exception):
    """The state does not allow this command; nothing was changed."""

    def __init__(self, code: str, message: str, status: int = 409):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


class StagedTxn:
    """Buffers writes over a base transaction so a rejected command leaves no trace.

    A value may come with its JSON encoding already made (`encoded`); a base that can store
    bytes as they are (`put_raw`, storage/state_store.py) gets those instead of re-encoding.
    """

    _DELETED = object()

    def __init__(self, base: Txn):
        self.base = base
        self.writes: dict[tuple[str, str], Any] = {}
        self.encoded: dict[tuple[str, str], bytes] = {}

    def get(self, table, key):
        v = self.writes.get((table, key), None)
        if v is self._DELETED:
            return None
        return v if (table, key) in self.writes else self.base.get(table, key)

    def put(self, table, key, value, encoded: bytes | None = None):
        self.writes[(table, key)] = value
        if encoded is not None:
            self.encoded[(table, key)] = encoded
        elif self.encoded:
            self.encoded.pop((table, key), None)

    def delete(self, table, key):
        self.writes[(table, key)] = self._DELETED
        if self.encoded:
            self.encoded.pop((table, key), None)

    def items(self, table, start=""):
        staged = {k: v for (t, k), v in self.writes.items() if t == table and k >= start}
        for k, v in self.base.items(table, start):
            if k in staged:
                continue
            yield k, v
        for k in sorted(staged):
            if staged[k] is not self._DELETED:
                yield k, staged[k]

    def flush(self):
        put_raw = getattr(self.base, "put_raw", None) if self.encoded else None
        nested = isinstance(self.base, StagedTxn)  # a batched command's: the encodings go on
        for (table, key), value in self.writes.items():
            if value is self._DELETED:
                self.base.delete(table, key)
            elif put_raw is not None and (table, key) in self.encoded:
                put_raw(table, key, self.encoded[(table, key)])
            elif nested:
                self.base.put(table, key, value, self.encoded.get((table, key)))
            else:
                self.base.put(table, key, value)


def public(record: dict | None) -> dict | None:
    """A record without stored secrets (hashes), as shown in audit and API answers."""
    if record is None:
        return None
    return {k: v for k, v in record.items() if k not in SECRET_FIELDS}


class Context:
    """What a handler needs: the staged state, the command and a way to audit."""

    def __init__(self, txn: StagedTxn, cmd: Command, version: int):
        self.txn, self.cmd, self.version = txn, cmd, version
        self.audits: list[tuple[str, dict | None, dict | None]] = []

    def audit(self, target: str, before: dict | None, after: dict | None) -> None:
        self.audits.append((target, public(before), public(after)))

    def require(self, table: str, key: str, what: str) -> dict:
        record = self.txn.get(table, key)
        if record is None:
            raise Rejected("not_found", f"{what} {key!r} does not exist", 404)
        return record


HANDLERS: dict[type[Command], Callable[[Context, Any], dict]] = {}


def handles(kind: type[Command]):
    """Register `fn(ctx, cmd)` as what applying a `kind` record does."""
    def register(fn):
        HANDLERS[kind] = fn
        return fn
    return register


def apply(txn: Txn, cmd: Command, version: int) -> dict:
    """Apply `cmd` at Raft index `version`; returns {"ok": True, ...} or a rejection."""
    staged = StagedTxn(txn)
    if cmd.request_id:
        seen = staged.get("idempotency", cmd.request_id)
        if seen is not None:
            return dict(seen["result"], replayed=True)
    fn = HANDLERS[type(cmd)]  # every record type has one (tests/test_command_registry.py)
    ctx = Context(staged, cmd, version)
    try:
        value = fn(ctx, cmd)
        settled = routes.settle(staged, ctx.audit)
        result = {"ok": True, "version": version, "value": _resettled(value, settled)}
        if settled:
            result["routes_settled"] = settled
    except Rejected as r:
        return {"ok": False, "version": version, "code": r.code, "message": r.message,
                "status": r.status}
    except (KeyError, TypeError, ValueError) as e:  # a bug must not escape apply on every replica
        return {"ok": False, "version": version, "code": "bad_command",
                "message": f"{cmd.op}: malformed arguments ({e})", "status": 400}
    for target, before, after in ctx.audits:
        _append_audit(staged, cmd, version, target, before, after)
    if cmd.request_id:
        _remember(staged, cmd, result)
    if not cmd.read_barrier:
        _advance_clock(staged, cmd.time)
    staged.flush()
    return result


def _resettled(value: Any, settled: list[dict]) -> Any:
    """A handler's answer with the node records routes.settle rewrote after it."""
    if not settled:
        return value
    by_id = {n["id"]: n for n in settled}
    if isinstance(value, dict) and value.get("id") in by_id and "node_key" in value:
        return by_id[value["id"]]
    if isinstance(value, dict) and isinstance(value.get("nodes"), list):
        return dict(value, nodes=[by_id.get(n.get("id"), n) for n in value["nodes"]])
    return value


def _advance_clock(txn: Txn, t: float) -> None:
    """The replicated clock: the latest proposer time among applied changes (by max).

    Netmaps depend on time (key expiry); deriving them from this clock instead of each
    replica's wall clock makes every replica compute the same netmap at the same version,
    which is what lets an agent resume a stream on another replica from its version.
    """
    if t > (txn.get("meta", "clock") or 0.0):
        txn.put("meta", "clock", t)


def clock(txn: Txn) -> float:
    return txn.get("meta", "clock") or 0.0


# -- audit and idempotency -------------------------------------------------------------
def _append_audit(txn: StagedTxn, cmd: Command, version: int, target: str,
                  before: dict | None, after: dict | None) -> None:
    head = txn.get("meta", "audit_head") or {"seq": 0, "hash": GENESIS}
    entry = {"seq": head["seq"] + 1, "version": version, "time": cmd.time,
             "actor": cmd.actor, "action": cmd.op, "target": target,
             "before": before, "after": after, "prev_hash": head["hash"]}
    entry["hash"], encoded = seal(head["hash"], entry)  # one canonical encoding: hash and store
    txn.put("audit", f"{entry['seq']:016d}", entry, encoded)
    txn.put("meta", "audit_head", {"seq": entry["seq"], "hash": entry["hash"]})


def _remember(txn: StagedTxn, cmd: Command, result: dict) -> None:
    """Store the result under the request id; forget ids older than the TTL (by command time)."""
    txn.put("idempotency", cmd.request_id, {"result": result, "time": cmd.time})
    order_key = f"{cmd.time:020.6f}:{cmd.request_id}"
    txn.put("meta", "idem:" + order_key, cmd.request_id)
    for key, rid in islice(txn.items("meta", "idem:"), 8):  # the oldest; never the whole range
        if not key.startswith("idem:") or float(key[5:].split(":")[0]) > cmd.time - IDEMPOTENCY_TTL:
            break
        txn.delete("meta", key)
        txn.delete("idempotency", rid)


# -- cluster ----------------------------------------------------------------------------
@handles(c.Invalid)
def _invalid(ctx: Context, cmd: c.Invalid) -> dict:
    """An unknown op or arguments that do not fit it (Command.decode): refused as such."""
    raise Rejected(cmd.code, cmd.message, 400)


@handles(c.ClockTick)
def _clock_tick(ctx: Context, cmd: c.ClockTick) -> dict:
    """Moves the replicated clock (apply() does that for every command) when a key expiry
    is due and nothing else is being written. Not audited: it changes no record."""
    return {"clock": cmd.time}


@handles(c.Barrier)
def _barrier(ctx: Context, cmd: c.Barrier) -> dict:
    """No state change: its application proves everything before it is applied here."""
    return {}


@handles(c.MemberAnnounce)
def _member_announce(ctx: Context, cmd: c.MemberAnnounce) -> dict:
    record = {"id": cmd.id, "raft_addr": cmd.raft_addr, "api_url": cmd.api_url}
    before = ctx.txn.get("members", cmd.id)
    if before != record:
        ctx.txn.put("members", cmd.id, record)
        ctx.audit(f"member:{cmd.id}", before, record)
    return record


@handles(c.MemberRemove)
def _member_remove(ctx: Context, cmd: c.MemberRemove) -> dict:
    """A removed replica never restarts to sweep its own streams (node.presence_sweep):
    nodes last seen streaming from it are marked offline here, or stay "online" for good."""
    before = ctx.require("members", cmd.id, "member")
    ctx.txn.delete("members", cmd.id)
    ctx.audit(f"member:{cmd.id}", before, None)
    return {"member": before, "nodes": _sweep_streams(ctx, before["id"])}


# -- API keys ---------------------------------------------------------------------------
def _create_api_key(ctx: Context, cmd: c.ApiKeyBootstrap | c.ApiKeyCreate) -> dict:
    if ctx.txn.get("api_keys", cmd.id) is not None:
        raise Rejected("conflict", f"API key {cmd.id!r} already exists")
    record = {"id": cmd.id, "name": cmd.name, "scopes": sorted(cmd.scopes),
              "hash": cmd.hash, "created_at": cmd.time,
              "expires_at": unless_absent(cmd.expires_at), "created_by": cmd.actor}
    ctx.txn.put("api_keys", cmd.id, record)
    ctx.audit(f"api_key:{cmd.id}", None, record)
    return public(record)


def _refuse_unless_empty(ctx: Context, table: str, what: str) -> None:
    """Bootstrap commands: every replica may propose one; the first applied wins."""
    if next(iter(ctx.txn.items(table)), None) is not None:
        raise Rejected("already_bootstrapped", f"{what} already exists")


@handles(c.ApiKeyBootstrap)
def _apikey_bootstrap(ctx: Context, cmd: c.ApiKeyBootstrap) -> dict:
    """The first admin key."""
    _refuse_unless_empty(ctx, "api_keys", "an API key")
    return _create_api_key(ctx, cmd)


@handles(c.ApiKeyCreate)
def _apikey_create(ctx: Context, cmd: c.ApiKeyCreate) -> dict:
    return _create_api_key(ctx, cmd)


@handles(c.ApiKeyDelete)
def _apikey_delete(ctx: Context, cmd: c.ApiKeyDelete) -> dict:
    before = ctx.require("api_keys", cmd.id, "API key")
    if "admin" in before["scopes"] and not any(
            "admin" in k["scopes"] and (k.get("expires_at") is None or k["expires_at"] > cmd.time)
            for kid, k in ctx.txn.items("api_keys") if kid != before["id"]):
        raise Rejected("conflict", "refusing to delete the last unexpired admin key "
                       "(create another first)")
    ctx.txn.delete("api_keys", cmd.id)
    ctx.audit(f"api_key:{cmd.id}", before, None)
    return public(before)


# -- users ------------------------------------------------------------------------------
@handles(c.UserCreate)
def _user_create(ctx: Context, cmd: c.UserCreate) -> dict:
    name = cmd.name
    if ctx.txn.get("users", name) is not None:
        raise Rejected("conflict", f"user {name!r} already exists")
    record = {"name": name, "display_name": cmd.display_name or name, "created_at": cmd.time}
    ctx.txn.put("users", name, record)
    ctx.audit(f"user:{name}", None, record)
    return record


@handles(c.UserDelete)
def _user_delete(ctx: Context, cmd: c.UserDelete) -> dict:
    name = cmd.name
    before = ctx.require("users", name, "user")
    owned = [n["id"] for _, n in ctx.txn.items("nodes") if n.get("user") == name]
    if owned:
        raise Rejected("conflict", f"user {name!r} still owns nodes {owned[:5]}; delete them first")
    for kid, key in list(ctx.txn.items("preauth_keys")):
        if key["user"] == name:
            ctx.txn.delete("preauth_keys", kid)
            ctx.audit(f"preauth_key:{kid}", key, None)
    ctx.txn.delete("users", name)
    ctx.audit(f"user:{name}", before, None)
    return before


# -- pre-auth keys ----------------------------------------------------------------------
@handles(c.PreauthKeyCreate)
def _preauth_create(ctx: Context, cmd: c.PreauthKeyCreate) -> dict:
    ctx.require("users", cmd.user, "user")
    if ctx.txn.get("preauth_keys", cmd.id) is not None:
        raise Rejected("conflict", f"pre-auth key {cmd.id!r} already exists")
    record = {"id": cmd.id, "user": cmd.user, "hash": cmd.hash,
              "reusable": bool(cmd.reusable), "ephemeral": bool(cmd.ephemeral),
              "expires_at": unless_absent(cmd.expires_at),
              "usage_limit": unless_absent(cmd.usage_limit),
              "used": 0, "tags": sorted(unless_absent(cmd.tags, [])), "revoked": False,
              "created_at": cmd.time}
    ctx.txn.put("preauth_keys", cmd.id, record)
    ctx.audit(f"preauth_key:{cmd.id}", None, record)
    return public(record)


@handles(c.PreauthKeyDelete)
def _preauth_delete(ctx: Context, cmd: c.PreauthKeyDelete) -> dict:
    before = ctx.require("preauth_keys", cmd.id, "pre-auth key")
    ctx.txn.delete("preauth_keys", cmd.id)
    ctx.audit(f"preauth_key:{cmd.id}", before, None)
    return public(before)


def barred(user_record: dict | None) -> str | None:
    """Why this user may not register or re-authenticate a device now, or None."""
    if user_record is None:
        return None
    if user_record.get("locked"):
        return f"user {user_record['name']!r} is locked by an admin"
    if user_record.get("active") is False:
        return f"user {user_record['name']!r} is deactivated by the identity provider"
    return None


def _refuse_if_barred(ctx: Context, user: str | None) -> None:
    reason = barred(ctx.txn.get("users", user)) if user else None
    if reason:
        raise Rejected("user_locked", reason, 403)


def _refuse_if_node_locked(node: dict) -> None:
    if node.get("locked"):
        raise Rejected("user_locked", f"node {node['id']} is locked by an admin "
                       f"({node['locked']['reason']}); an admin must unlock it", 403)


def preauth_key_problem(key: dict, now: float) -> str | None:
    """Why a pre-auth key cannot register a node now, or None if it can."""
    if key.get("revoked"):
        return "revoked"
    if key.get("expires_at") is not None and key["expires_at"] <= now:
        return "expired"
    limit = 1 if not key["reusable"] else key.get("usage_limit")
    if limit is not None and key["used"] >= limit:
        return "used up"
    return None


# -- policy -----------------------------------------------------------------------------
@handles(c.PolicySet)
def _policy_set(ctx: Context, cmd: c.PolicySet) -> dict:
    """Store a policy already validated by the proposer; every version is kept. `compiled`
    (cluster/policy_form.py) is what netmaps are derived from; entries proposed before it
    existed carry only the text."""
    head = ctx.txn.get("meta", "policy_head") or {"version": 0}
    if unless_absent(cmd.expected_version) not in (None, head["version"]):
        raise Rejected("version_conflict",
                       f"policy is at version {head['version']}, not {cmd.expected_version}")
    record = {"version": head["version"] + 1, "text": cmd.text,
              "created_at": cmd.time, "actor": cmd.actor, "state_version": ctx.version}
    if cmd.compiled is not ABSENT:
        record["compiled"] = cmd.compiled
    if cmd.warnings:
        record["warnings"] = cmd.warnings
    ctx.txn.put("policy_versions", f"{record['version']:010d}", record)
    ctx.txn.put("meta", "policy_head", {"version": record["version"]})
    before = ctx.txn.get("policy_versions", f"{head['version']:010d}") if head["version"] else None
    def summary(r: dict | None) -> dict | None:
        """The audit's view of a policy version: the codes of its warnings, not its text."""
        if r is None:
            return None
        codes = sorted({w["code"] for w in r.get("warnings", ()) if isinstance(w, dict)
                        and isinstance(w.get("code"), str)})
        out = {"version": r["version"], "bytes": len(r["text"])}
        return {**out, "warnings": codes} if codes else out
    ctx.audit("policy", summary(before), summary(record))
    return {k: record[k] for k in ("version", "created_at", "actor", "state_version")}


# -- nodes ------------------------------------------------------------------------------
def _allocate_ips(txn: StagedTxn) -> tuple[str, str]:
    """Lowest free slot at or after the cursor; deterministic, collision-free."""
    cursor = (txn.get("meta", "ip_cursor") or 1)
    for step in range(IPV4_SLOTS):
        slot = (cursor + step) % IPV4_SLOTS
        if slot in (0, IPV4_SLOTS - 1):
            continue
        v4 = str(ipaddress.IPv4Address(IPV4_BASE + slot))
        if txn.get("node_ips", v4) is None:
            txn.put("meta", "ip_cursor", slot + 1)
            return v4, str(ipaddress.IPv6Address(IPV6_BASE + slot))
    raise Rejected("address_pool_exhausted", "no free overlay address left in 100.64.0.0/10", 507)


def _unique_name(txn: StagedTxn, wanted: str, exclude_id: str | None = None) -> str:
    """`wanted`, or `wanted-N` with the lowest free N at or after the last one handed out.

    The name index and the per-name hint keep this O(1) per registration however many nodes
    exist (a scan of every node record made registering N nodes O(N²)).
    """
    owner = txn.get("node_names", wanted)
    if owner is None or owner == exclude_id:
        return wanted
    i = txn.get("node_names", "#" + wanted) or 1  # names never start with "#"
    while True:
        i += 1
        owner = txn.get("node_names", f"{wanted}-{i}")
        if owner is None or owner == exclude_id:
            txn.put("node_names", "#" + wanted, i)
            return f"{wanted}-{i}"


@handles(c.NodeRegister)
def _node_register(ctx: Context, cmd: c.NodeRegister) -> dict:
    return _new_node(ctx, cmd)


@handles(c.NodeRegisterBatch)
def _node_register_batch(ctx: Context, cmd: c.NodeRegisterBatch) -> dict:
    """Each registration applied as if it were its own entry at this version: through
    apply(), over this batch's staged state, so one refused leaves no trace and the next
    sees every one before it."""
    return {"results": [apply(ctx.txn, r, ctx.version) for r in cmd.registrations]}


def _new_node(ctx: Context, cmd: c.NodeRegister, approved: bool = False) -> dict:
    """Register a node; `approved` when whoever registers it was authenticated otherwise
    (a single sign-on) than by a pre-auth key."""
    now = cmd.time
    if ctx.txn.get("nodes", cmd.id) is not None:
        raise Rejected("conflict", f"node {cmd.id!r} already exists")
    existing = ctx.txn.get("node_by_machine", cmd.machine_key)
    if existing is not None:
        raise Rejected("conflict", f"this machine key is already registered as node {existing!r}")
    user, tags = unless_absent(cmd.user), sorted(unless_absent(cmd.tags, []))
    ephemeral = False
    if cmd.preauth_key_id:
        key = ctx.require("preauth_keys", cmd.preauth_key_id, "pre-auth key")
        problem = preauth_key_problem(key, now)
        if problem:
            raise Rejected("preauth_key_invalid", f"pre-auth key is {problem}", 401)
        updated = dict(key, used=key["used"] + 1)
        ctx.txn.put("preauth_keys", key["id"], updated)
        ctx.audit(f"preauth_key:{key['id']}", key, updated)
        user, tags, approved, ephemeral = key["user"], key["tags"], True, key["ephemeral"]
    _refuse_if_barred(ctx, user)
    if user is not None and not tags:
        ctx.require("users", user, "user")
    v4, v6 = _allocate_ips(ctx.txn)
    record = {"id": cmd.id, "name": _unique_name(ctx.txn, cmd.name),
              "user": None if tags else user, "tags": tags,
              "registered_by": user, "machine_key": cmd.machine_key,
              "node_key": cmd.node_key, "ipv4": v4, "ipv6": v6,
              "endpoints": sorted(unless_absent(cmd.endpoints, [])), "created_at": now,
              "last_seen": None, "key_expiry": unless_absent(cmd.key_expiry), "expired": False,
              "approved": approved, "ephemeral": ephemeral,
              "online": False, "stream_replica": None, "stream_session": None,
              "advertised_routes": sorted(unless_absent(cmd.advertised_routes, [])),
              "approved_routes": [], "idp_groups": idp_groups_of(ctx.txn, user)}
    ctx.txn.put("nodes", cmd.id, record)
    ctx.txn.put("node_ips", v4, cmd.id)
    ctx.txn.put("node_by_machine", cmd.machine_key, cmd.id)
    ctx.txn.put("node_names", record["name"], cmd.id)
    ctx.audit(f"node:{cmd.id}", None, record)
    return record


def refresh_idp_groups(ctx: Context, users: set[str]) -> list[dict]:
    """After a change of these users' identity-provider groups: their nodes' new records
    (idp_groups.py), for the netmap feed."""
    changed, groups = [], {u: idp_groups_of(ctx.txn, u) for u in users}
    for _, node in list(ctx.txn.items("nodes")):
        owner = node_owner(node)
        if owner in groups and (node.get("idp_groups") or []) != groups[owner]:
            changed.append(_update_node(ctx, {"idp_groups": groups[owner]}, node["id"]))
    return changed


def _update_node(ctx: Context, changes: dict, node_id: str | None = None) -> dict:
    before = ctx.require("nodes", node_id or ctx.cmd.id, "node")
    after = dict(before, **changes)
    if after != before:
        ctx.txn.put("nodes", before["id"], after)
        ctx.audit(f"node:{before['id']}", before, after)
    return after


@handles(c.NodeUpdate)
def _node_update(ctx: Context, cmd: c.NodeUpdate) -> dict:
    changes = {}
    node = ctx.require("nodes", cmd.id, "node")  # first: a missing node is a 404
    if cmd.name is not ABSENT:
        if cmd.name != _unique_name(ctx.txn, cmd.name, cmd.id):
            raise Rejected("conflict", f"node name {cmd.name!r} is taken")
        ctx.txn.delete("node_names", node["name"])
        ctx.txn.put("node_names", cmd.name, node["id"])
        changes["name"] = cmd.name
    if cmd.tags is not ABSENT:
        changes["tags"] = sorted(cmd.tags)
        if changes["tags"]:
            changes["user"] = None
        else:
            changes["user"] = node.get("user") or node.get("registered_by")
    return _update_node(ctx, changes)


@handles(c.NodeApprove)
def _node_approve(ctx: Context, cmd: c.NodeApprove) -> dict:
    """Approve a pending node; with `user`, it becomes that user's device (a pending node
    registered without an auth key belongs to nobody)."""
    node = ctx.require("nodes", cmd.id, "node")  # first: a missing node is a 404
    if node.get("locked"):
        raise Rejected("user_locked", f"node {cmd.id} is locked by an admin; unlock it first", 403)
    if cmd.user is ABSENT:
        return _update_node(ctx, {"approved": True})
    ctx.require("users", cmd.user, "user")
    _refuse_if_barred(ctx, cmd.user)
    owner = {"registered_by": cmd.user, "idp_groups": idp_groups_of(ctx.txn, cmd.user)}
    if not node["tags"]:
        owner["user"] = cmd.user
    return _update_node(ctx, {"approved": True, **owner})


@handles(c.NodeExpire)
def _node_expire(ctx: Context, cmd: c.NodeExpire) -> dict:
    return _update_node(ctx, {"expired": True, "key_expiry": cmd.time})


@handles(c.NodeRoutes)
def _node_routes(ctx: Context, cmd: c.NodeRoutes) -> dict:
    node = ctx.require("nodes", cmd.id, "node")
    try:
        approved = routes.canonical_routes(cmd.approved_routes)
    except routes.RouteError as e:
        raise Rejected("invalid_route", str(e), 400) from None
    missing = [r for r in approved if r not in node["advertised_routes"]]
    if missing:
        raise Rejected("invalid_route", f"routes {missing} are not advertised by the node", 400)
    return _update_node(ctx, {"approved_routes": approved})


@handles(c.NodeReport)
def _node_report(ctx: Context, cmd: c.NodeReport) -> dict:
    """What an agent reports about itself: endpoints, advertised routes (and which of them
    it cannot reach now: routes.py moves their primary elsewhere), the exit node it sends
    its internet traffic through (in the record, so that its use is audited), liveness."""
    changes = {k: sorted(v) for k in ("endpoints", "advertised_routes", "unreachable_routes")
               if (v := getattr(cmd, k)) is not ABSENT}
    if cmd.exit_node is not ABSENT:
        if cmd.exit_node is not None and (cmd.exit_node == cmd.id or not routes.exit_routes(
                ctx.txn.get("nodes", cmd.exit_node) or {})):
            raise Rejected("invalid_exit_node", f"node {cmd.exit_node!r} is not an exit node "
                           "(a node offering approved exit routes)", 400)
        changes["exit_node"] = cmd.exit_node
    if cmd.last_seen is not ABSENT:
        changes["last_seen"] = cmd.last_seen
    return _update_node(ctx, changes)


def kept_expiry(node: dict, proposed: float | None) -> float | None:
    """The key expiry a new or re-authenticated key gets: none for a node an admin exempted
    from expiry (node.key_expiry, cluster/lifecycle.py), else what the proposer decided."""
    return None if node.get("key_expiry_disabled") else proposed


@handles(c.NodeRotateKey)
def _node_rotate_key(ctx: Context, cmd: c.NodeRotateKey) -> dict:
    node = ctx.require("nodes", cmd.id, "node")
    if node["node_key"] != cmd.old_node_key:
        raise Rejected("conflict", "old node key does not match the registered one")
    return _update_node(ctx, {"node_key": cmd.node_key,
                              "key_expiry": kept_expiry(node, unless_absent(cmd.key_expiry,
                                                                            node["key_expiry"]))})


@handles(c.NodeReauthenticate)
def _node_reauthenticate(ctx: Context, cmd: c.NodeReauthenticate) -> dict:
    """An expired or logged-out machine proves itself again with a pre-auth key."""
    node = ctx.require("nodes", cmd.id, "node")
    key = ctx.require("preauth_keys", cmd.preauth_key_id, "pre-auth key")
    problem = preauth_key_problem(key, cmd.time)
    if problem:
        raise Rejected("preauth_key_invalid", f"pre-auth key is {problem}", 401)
    if key["user"] != node.get("registered_by"):
        raise Rejected("forbidden", "the pre-auth key belongs to another user than the node", 403)
    _refuse_if_barred(ctx, key["user"])
    _refuse_if_node_locked(node)
    updated = dict(key, used=key["used"] + 1)
    ctx.txn.put("preauth_keys", key["id"], updated)
    ctx.audit(f"preauth_key:{key['id']}", key, updated)
    return _update_node(ctx, {"expired": False,
                              "key_expiry": kept_expiry(node, unless_absent(cmd.key_expiry)),
                              "node_key": unless_absent(cmd.node_key, node["node_key"]),
                              "approved": True})


@handles(c.NodePresence)
def _node_presence(ctx: Context, cmd: c.NodePresence) -> dict:
    """Map streams opened (online) or closed (offline) on one replica, batched by it.

    Offline applies only to the session that went away, so a late close cannot hide a newer
    stream elsewhere; nodes deleted meanwhile are skipped. Not audited: presence is frequent
    and changes no configuration."""
    changed = []
    for change in cmd.changes:
        node = ctx.txn.get("nodes", change["id"])
        if node is None:
            continue
        if change["online"]:
            after = dict(node, online=True, stream_replica=cmd.replica,
                         stream_session=change["session"], last_seen=cmd.time)
        elif node.get("stream_session") == change["session"]:
            after = dict(node, online=False, stream_session=None, last_seen=cmd.time)
        else:
            continue
        ctx.txn.put("nodes", node["id"], after)
        changed.append(after)
    return {"nodes": changed}


@handles(c.NodePresenceSweep)
def _node_presence_sweep(ctx: Context, cmd: c.NodePresenceSweep) -> dict:
    """A replica (re)started: the streams it served before are gone."""
    return {"nodes": _sweep_streams(ctx, cmd.replica)}


def _sweep_streams(ctx: Context, replica: str) -> list[dict]:
    """Streams of a replica that restarted or left: offline, last seen now (the stream may have
    lived until then; removing ephemeral nodes counts from it, cluster/lifecycle.py)."""
    swept = []
    for nid, node in list(ctx.txn.items("nodes")):
        if node.get("online") and node.get("stream_replica") == replica:
            after = dict(node, online=False, stream_session=None, last_seen=ctx.cmd.time)
            ctx.txn.put("nodes", nid, after)
            swept.append(after)
    return swept


@handles(c.NodeDelete)
def _node_delete(ctx: Context, cmd: c.NodeDelete) -> dict:
    return delete_node(ctx, ctx.require("nodes", cmd.id, "node"))


def delete_node(ctx: Context, before: dict) -> dict:
    ctx.txn.delete("nodes", before["id"])
    ctx.txn.delete("node_ips", before["ipv4"])
    ctx.txn.delete("node_by_machine", before["machine_key"])
    ctx.txn.delete("node_names", before["name"])
    ctx.audit(f"node:{before['id']}", before, None)
    return before


# -- cluster signing keys ---------------------------------------------------------------
def _add_cluster_key(ctx: Context, cmd: c.ClusterKeyBootstrap | c.ClusterKeyRotate) -> dict:
    record = {"id": cmd.id, "public_key": cmd.public_key, "private_key": cmd.private_key,
              "created_at": cmd.time, "retire_at": None}
    for kid, key in list(ctx.txn.items("cluster_keys")):
        if key["retire_at"] is None:  # the previous signing key keeps verifying for a while
            retired = dict(key, retire_at=cmd.time + unless_absent(cmd.overlap_seconds, 86400))
            ctx.txn.put("cluster_keys", kid, retired)
            ctx.audit(f"cluster_key:{kid}", key, retired)
    ctx.txn.put("cluster_keys", cmd.id, record)
    ctx.audit(f"cluster_key:{cmd.id}", None, record)
    return public(record)


@handles(c.ClusterKeyBootstrap)
def _clusterkey_bootstrap(ctx: Context, cmd: c.ClusterKeyBootstrap) -> dict:
    """The first netmap signing key."""
    _refuse_unless_empty(ctx, "cluster_keys", "a cluster key")
    return _add_cluster_key(ctx, cmd)


@handles(c.ClusterKeyRotate)
def _clusterkey_rotate(ctx: Context, cmd: c.ClusterKeyRotate) -> dict:
    return _add_cluster_key(ctx, cmd)


# Handlers of their own modules, which use the above: DNS settings, node lifecycle,
# lock-down, logins, SCIM provisioning, console sessions.
from . import dns_config, lifecycle, lockdown_apply, login_apply, scim_apply, session_apply  # noqa: E402,F401
