"""Declarative routes: one table drives dispatch, auth, body validation and the OpenAPI doc.

Because /api/v1/openapi.json is generated from the same Route objects that the server
registers and validates with, it describes exactly what the server does.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import math
import re
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable

import fastjsonschema
import jsonschema
from aiohttp import web, web_urldispatcher

from raftmesh.cluster.commands import Command
from raftmesh.cluster.raft import Outcome, Raft
from raftmesh.proto.numbers import MAX_SAFE_INTEGER, parse_number

from . import auth, openapi_links, responses
from .console import sessions
from .errors import ERROR_CODES, APIError, error_body
from .read_barrier import applied_or_after_barrier
from .write_deadlines import WriteDeadlines

Handler = Callable[["Ctx"], Awaitable[web.StreamResponse]]
IDEMPOTENCY_KEY_MAX = 128
REPLAYED_HEADER = "Idempotent-Replayed"  # "true" on a write answered from its Idempotency-Key
STALENESS_HEADER = "Raftmesh-Staleness"  # on ?stale=true answers: what the local state may miss
MAX_VALIDATION_ERRORS = 50  # reported per request; also bounds the work spent on one body
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
WRITE_DEADLINES = web.AppKey("write_deadlines", WriteDeadlines)


@dataclass
class Route:
    method: str
    path: str
    handler: Handler
    needs: str | None  # "read", "write", "audit", "admin" or None (no auth)
    summary: str
    body: dict | None = None  # JSON schema of the request body
    query: dict[str, dict] = field(default_factory=dict)  # name -> schema
    status: int = 200
    response: dict | None = None  # JSON schema of the success answer (api/responses.py)
    response_type: str = "application/json"
    # Inputs a client copies from an answer on the same path: parameter name (or "body") ->
    # JSON pointer into that answer; documented as OpenAPI links (api/openapi_links.py).
    linked_inputs: dict[str, str] = field(default_factory=dict)


ROUTES: list[Route] = []


def route(method: str, path: str, needs: str | None, summary: str, body: dict | None = None,
          query: dict | None = None, status: int = 200, response: dict | None = None,
          response_type: str = "application/json", linked_inputs: dict | None = None):
    def register(fn: Handler) -> Handler:
        ROUTES.append(Route(method, path, fn, needs, summary, body, query or {}, status, response,
                            response_type, linked_inputs or {}))
        return fn
    return register


class Ctx:
    """Per-request helpers: the replica, the caller, the validated body and query."""

    def __init__(self, request: web.Request, replica: Raft, actor: str, scopes: list[str]):
        self.request, self.replica, self.actor, self.scopes = request, replica, actor, scopes
        self.body: Any = None
        self.query: dict[str, Any] = {}
        self.replayed = False  # a write answered from the Idempotency-Key record

    @property
    def config(self):
        return self.replica.config

    def param(self, name: str) -> str:
        return self.request.match_info[name]

    async def write(self, cmd: Command,
                    propose: Callable[[Command], asyncio.Future] | None = None) -> dict:
        """Propose `cmd`, stamped with the time, the caller and the request's idempotency
        key, through Raft (or `propose`, e.g. a group commit) and wait; never reports
        success that did not happen."""
        key = idempotency_key(self.request)
        # The key is scoped to the caller and to this exact request, so reusing it for a
        # different request can never replay an unrelated result as this one's success.
        cmd = replace(cmd, time=time.time(), actor=self.actor,
                      request_id=f"{self.actor}:{key}:{self.fingerprint()}" if key else None)
        try:
            outcome = await self.request.app[WRITE_DEADLINES].watch(
                (propose or self.replica.propose_async)(cmd))
        except TimeoutError:
            raise APIError(503, "outcome_unknown",
                           f"no commit within {self.config.write_timeout:g}s; the write may still "
                           "be applied" + (" (retry with the same Idempotency-Key)" if key else ""))
        if outcome.kind == Outcome.NOT_APPLIED:
            raise APIError(503, "no_leader", f"write not applied ({outcome.reason}); retry")
        if outcome.kind == Outcome.UNKNOWN:
            raise APIError(503, "outcome_unknown", f"leadership changed ({outcome.reason}); the "
                           "write may or may not be applied")
        result = outcome.result
        if not result["ok"]:
            raise APIError(result["status"], result["code"], result["message"])
        self.replayed = bool(result.get("replayed"))
        return result

    def token_seed(self, purpose: str) -> bytes | None:
        """A secret seed unique to this request (caller, Idempotency-Key, what was asked),
        the same on every replica and every retry; None without an Idempotency-Key or a
        cluster secret (without one, a seed would be computable from the request alone)."""
        key = idempotency_key(self.request)
        if key is None or not self.config.cluster_secret:
            return None
        what = f"{purpose}:{self.actor}:{key}:{self.fingerprint()}".encode()
        return hmac.new(self.config.cluster_secret.encode(), what, hashlib.sha256).digest()

    def fingerprint(self) -> str:
        """Short digest of what was asked: method, path, query and the validated body."""
        what = [self.request.method, self.request.path, sorted(self.request.query.items()), self.body]
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    async def read_version(self) -> tuple[int, bool]:
        """Wait for a read barrier unless ?stale=true; returns (version, stale)."""
        if self.query.get("stale"):
            return self.replica.store.applied_version(), True
        try:
            outcome = await asyncio.wait_for(asyncio.wrap_future(self.replica.barrier()),
                                             self.config.write_timeout)
        except asyncio.TimeoutError:
            outcome = None
        if outcome is None or outcome.kind != Outcome.APPLIED:
            raise APIError(503, "not_ready", "cannot confirm the latest state (no quorum?); "
                           "retry, or pass ?stale=true for this replica's local state")
        return outcome.result["version"], False


def idempotency_key(request: web.Request) -> str | None:
    """The Idempotency-Key header, checked: 1-128 printable ASCII characters (it becomes
    part of a storage key, whose size is bounded in bytes)."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= IDEMPOTENCY_KEY_MAX and key.isascii()
                                and key.isprintable()):
        raise APIError(400, "bad_request", f"Idempotency-Key must be 1-{IDEMPOTENCY_KEY_MAX} "
                       "printable ASCII characters")
    return key


STALE_QUERY = {
    "stale": {"type": "boolean", "description": "read this replica's local state without a read "
              "barrier (no round trip to the leader); the answer's Raftmesh-Staleness header "
              "says how old it may be: leader-contact-ms=<ms since this replica last heard its "
              "leader, or unknown>; unapplied=<committed entries not applied here yet>"},
    "max_staleness": {"type": "number", "minimum": 0, "maximum": 3600, "description":
                      "with stale=true: answer 503 not_ready instead when this replica last "
                      "heard its leader more than this many seconds ago, knows of committed "
                      "entries it has not applied, or knows no leader"}}


_COMPILED: dict[int, tuple[dict, Any, Callable[[Any], bool] | None]] = {}
# Keywords that mean the same in draft-07 (fastjsonschema's newest) and 2020-12 (jsonschema's,
# ours); prefixItems is translated (_as_draft7); a schema using any other keyword ($ref...)
# gets no fast check.
_SAME_IN_DRAFT7 = {"type", "pattern", "minLength", "maxLength", "minimum", "maximum", "enum",
                   "properties", "required", "additionalProperties", "minProperties", "items",
                   "minItems", "maxItems", "uniqueItems", "description", "x-raw-text"}


def _compiled(schema: dict) -> tuple[dict, Any, Callable[[Any], bool] | None]:
    """A route's (static) schema compiled once, keyed by identity (the entry keeps the schema
    alive): constructing a validator per request cost more than validating a small body.

    - the jsonschema validator: what jsonschema.validate() picks for a schema without
      "$schema" (the latest draft), minus its check_schema() on every call; it decides and
      words every error;
    - a cheap "definitely valid" check (fastjsonschema, compiled to Python), or None: True
      means jsonschema accepts the body too; False means "not sure". Even compiled,
      jsonschema was ~7% of the replicas' CPU per write (10x fastjsonschema's time), and
      12% during acks at 10,000 agents."""
    cached = _COMPILED.get(id(schema))
    if cached is None or cached[0] is not schema:
        draft7 = _as_draft7(schema)
        cached = _COMPILED[id(schema)] = (schema, jsonschema.Draft202012Validator(schema),
                                          None if draft7 is None else _compile(draft7))
    return cached


def _validator(schema: dict):
    return _compiled(schema)[1]


def _fast_check(schema: dict) -> Callable[[Any], bool] | None:
    return _compiled(schema)[2]


def conforms(schema: dict, body: Any) -> bool:
    """Does `body` (already parsed) satisfy a route's static `schema`? For bodies that come
    by another way than a request (ack datagrams, api/agent_api.py)."""
    fast = _fast_check(schema)
    return (fast is not None and fast(body)) or _validator(schema).is_valid(body)


def _as_draft7(schema: Any) -> dict | None:
    """The same schema in draft-07 terms, or None if that is not certain. A 2020-12 tuple
    (`prefixItems`, no `items` beside it: more items allowed) is draft-07's `items` list."""
    if not isinstance(schema, dict):
        return None
    out = dict(schema)
    if "prefixItems" in out:
        if "items" in out:
            return None
        out["items"] = out.pop("prefixItems")
    if set(out) - _SAME_IN_DRAFT7 or not isinstance(out.get("additionalProperties", True), bool):
        return None
    if "properties" in out:
        out["properties"] = {name: _as_draft7(sub) for name, sub in out["properties"].items()}
        if None in out["properties"].values():
            return None
    if "items" in out:
        items = out["items"]
        out["items"] = [_as_draft7(s) for s in items] if isinstance(items, list) else _as_draft7(items)
        if out["items"] is None or (isinstance(items, list) and None in out["items"]):
            return None
    return out


def _compile(schema: dict) -> Callable[[Any], bool]:
    validate = fastjsonschema.compile(schema)

    def check(body: Any) -> bool:
        try:
            validate(body)
            return True
        except fastjsonschema.JsonSchemaException:
            return False
    return check


def _coerce_query(request: web.Request, spec: dict[str, dict]) -> dict[str, Any]:
    if not request.query_string:
        return {}  # the common case; the checks below all start from the query's names
    unknown = sorted(set(request.query) - set(spec))
    if unknown:
        raise APIError(400, "bad_request", f"unknown query parameters {unknown}")
    repeated = sorted(n for n in set(request.query) if len(request.query.getall(n)) > 1)
    if repeated:
        raise APIError(400, "bad_request", f"query parameters {repeated} given more than once")
    out: dict[str, Any] = {}
    for name, schema in spec.items():
        if name not in request.query:
            continue
        raw = request.query[name]
        kind = schema.get("type")
        try:
            if kind == "boolean":
                if raw not in ("true", "false", "1", "0"):
                    raise ValueError
                value: Any = raw in ("true", "1")
            elif kind in ("integer", "number"):
                value = parse_number(raw, name, integer=kind == "integer",
                                     minimum=schema.get("minimum", -MAX_SAFE_INTEGER),
                                     maximum=schema.get("maximum", MAX_SAFE_INTEGER))
            else:
                value = raw
            _validator(schema).validate(value)
        except (ValueError, jsonschema.ValidationError):
            raise APIError(400, "bad_request", f"query parameter {name!r} must be {_describe(schema)}")
        out[name] = value
    return out


def _describe(schema: dict) -> str:
    if "enum" in schema:
        return "one of " + ", ".join(map(str, schema["enum"]))
    text = schema.get("type", "a value")
    if "minimum" in schema or "maximum" in schema:
        text += f" in [{schema.get('minimum', '')}, {schema.get('maximum', '')}]"
    return text


async def _parse_body(request: web.Request, schema: dict) -> Any:
    raw = await request.read()  # client_max_size enforces the limit (413)
    if not raw:
        raise APIError(400, "bad_request", "a body is required" if schema.get("x-raw-text")
                       else "a JSON body is required")
    _check_media_type(request, "text/plain" if schema.get("x-raw-text") else "application/json")
    if schema.get("x-raw-text"):
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise APIError(400, "bad_request", "body must be UTF-8 text")
    try:
        body = _strict_json(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, "bad_request", f"body is not valid JSON: {e}")
    except RecursionError:
        raise APIError(400, "bad_request", "body is nested too deeply")
    fast = _fast_check(schema)
    if fast is not None and fast(body):
        return body
    try:
        errors = list(itertools.islice(_validator(schema).iter_errors(body),
                                       MAX_VALIDATION_ERRORS))
    except RecursionError:
        raise APIError(400, "bad_request", "body is nested too deeply")
    errors.sort(key=lambda e: list(e.path))
    if errors:
        details = [{"field": _error_field(e), "message": _error_text(e)} for e in errors]
        raise APIError(400, "validation_failed",
                       "; ".join(f"{d['field']}: {d['message']}" for d in details), details)
    return body


def _check_media_type(request: web.Request, expected: str) -> None:
    """A body must say what it is: `expected`, with no parameter but charset=utf-8. Checked
    after reading (so an oversized body is still a 413), before decoding anything."""
    header = request.headers.get("Content-Type")
    media, *params = [p.strip().lower() for p in (header or "").split(";")]
    if media != expected or [p.replace('"', "") for p in params if p] not in ([], ["charset=utf-8"]):
        raise APIError(415, "unsupported_media_type", f"this operation takes a body of type {expected} "
                       f"(UTF-8, charset=utf-8 optional); Content-Type is {header or 'missing'}")


def _json_constant(name):
    raise ValueError(f"{name} is not a JSON value")


def _json_integer(text):
    value = int(text)
    if abs(value) > MAX_SAFE_INTEGER:
        raise ValueError(f"integer {text[:20]}{'...' if len(text) > 20 else ''} is out of range "
                         f"(at most {MAX_SAFE_INTEGER} in magnitude)")
    return value


def _json_number(text):
    """A whole number written with a fraction or exponent (5.0, 1e3) is an int: JSON Schema
    counts it as an integer, so validation let it through, and the commands' int fields
    refused it later (schemathesis: usage_limit 61724.0 was a 500). Float fields take ints."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    if value.is_integer() and abs(value) <= MAX_SAFE_INTEGER:
        return int(value)
    return value


# Built once: json.loads with hooks builds a decoder and its scanner on every call.
_strict_decode = json.JSONDecoder(parse_constant=_json_constant, parse_int=_json_integer,
                                  parse_float=_json_number).decode


def _strict_json(raw: bytes) -> Any:
    """json.loads refusing what is not interoperable JSON: other encodings than UTF-8 (RFC
    8259 8.1; json.loads would guess UTF-16/32), NaN/Infinity, numbers that do not fit a
    double, integers beyond 2**53 and unpaired surrogates (not encodable as UTF-8)."""
    body = _strict_decode(raw.decode("utf-8"))
    # Strict UTF-8 has no surrogates, so only a \u escape can make one: without "\u" in the
    # body, skip the re-encoding check (a dumps() per request).
    if b"\\u" not in raw:
        return body
    try:
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ValueError("a string contains an unpaired UTF-16 surrogate") from None
    return body


def _error_field(e: jsonschema.ValidationError) -> str:
    """The field a client must change; a dependentSchemas rule names its trigger field."""
    path = [str(p) for p in e.path]
    where = list(e.schema_path)
    if "dependentSchemas" in where:
        return ".".join(path[:-1] + [str(where[where.index("dependentSchemas") + 1])])
    return ".".join(path) or "(body)"


def _error_text(e: jsonschema.ValidationError) -> str:
    where = list(e.schema_path)
    if "dependentSchemas" in where:  # e.g. usage_limit requires reusable: true
        trigger = where[where.index("dependentSchemas") + 1]
        if e.validator == "required":
            prop = next(p for p in e.validator_value if p not in e.instance)
            value = e.schema.get("properties", {}).get(prop, {}).get("const", "set")
        else:
            prop, value = (e.path[-1] if e.path else "?"), e.validator_value
        return f"{trigger} requires {prop}: {json.dumps(value)}"
    if e.validator == "additionalProperties":
        extra = sorted(set(e.instance) - set(e.schema.get("properties", {})))
        return f"unknown fields {extra}"
    if e.validator == "required":
        return e.message.replace("is a required property", "is required")
    return e.message if len(e.message) < 200 else e.message[:200] + "..."


async def _authenticate(request: web.Request, replica: Raft,
                        keys: "ApiKeyCache | None" = None) -> tuple[str, list[str]]:
    peer = request.headers.get(auth.PEER_HEADER)
    if peer is not None and auth.hmac.compare_digest(peer, auth.peer_token(replica.config.cluster_secret)):
        return "replica:peer", ["read"]
    lookup = keys.get if keys is not None else (lambda kid: stored_api_key(replica, kid))
    if "Authorization" not in request.headers and sessions.COOKIE in request.cookies \
            and sessions.SESSIONS in request.app:
        key_id = (await sessions.session_of(request)).key_id
        record = lookup(key_id)
        if record is None or _expired(record):
            raise APIError(401, "unauthenticated", "the API key of this console session was "
                           "revoked or has expired; sign in again")
        return f"apikey:{key_id}", record["scopes"]
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":  # auth schemes are case-insensitive (RFC 9110 11.1)
        raise APIError(401, "unauthenticated", "missing 'Authorization: Bearer <api key>'")
    key_id, record = await api_key_record(token.strip(), replica, lookup)
    return f"apikey:{key_id}", record["scopes"]


async def api_key_record(token: str, replica: Raft, lookup) -> tuple[str, dict]:
    """The id and record of a valid, unexpired API key `token`; else the 401 saying why."""
    parts = auth.split_token(token, "rmk") if token.isascii() else None
    if parts is None:
        raise APIError(401, "unauthenticated", "malformed API key")
    key_id, secret = parts
    record = await applied_or_after_barrier(replica, lambda: lookup(key_id), "API key")
    if record is None or not auth.secret_matches(secret, record["hash"]):
        raise APIError(401, "unauthenticated", "unknown API key")
    if _expired(record):
        raise APIError(401, "unauthenticated", "API key has expired")
    return key_id, record


def _expired(record: dict) -> bool:
    return record.get("expires_at") is not None and record["expires_at"] <= time.time()


def stored_api_key(replica: Raft, key_id: str) -> dict | None:
    """The record of API key `key_id` as this replica has applied it (no cache, no barrier)."""
    with replica.store.read() as txn:
        return txn.get("api_keys", key_id)


class ApiKeyCache:
    """API-key records by id, so a request does not open an LMDB read and decode JSON.

    Emptied on the Raft thread after any applied batch with an API-key command
    (`changes_api_keys`: the only ones that change the api_keys table) and after a snapshot replaced the state, before that
    batch's futures resolve: once a revocation is acknowledged, or applied on a replica, no
    request there is authenticated with the old record. A lookup that raced with a clear
    does not store what it read (generation check). Unknown ids are not cached.
    """

    MAX_ENTRIES = 10_000

    def __init__(self, replica: Raft):
        self.replica = replica
        self._records: dict[str, dict] = {}
        self._generation = 0
        self._lock = threading.Lock()
        replica.add_apply_listener(self._on_batch)
        replica.add_reset_listener(self.clear)

    def _on_batch(self, batch: list) -> None:
        for _, cmd, _ in batch:
            if cmd.changes_api_keys:
                self.clear()
                return

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._records = {}

    def get(self, key_id: str) -> dict | None:
        record = self._records.get(key_id)
        if record is not None:
            return record
        generation = self._generation
        record = stored_api_key(self.replica, key_id)
        if record is not None:
            with self._lock:
                if generation == self._generation and len(self._records) < self.MAX_ENTRIES:
                    self._records[key_id] = record
        return record


def make_handler(r: Route, replica: Raft, keys: ApiKeyCache | None = None):
    async def handle(request: web.Request) -> web.StreamResponse:
        actor, scopes = "anonymous", []
        if r.needs is not None:
            actor, scopes = await _authenticate(request, replica, keys)
            if not auth.allows(scopes, r.needs):
                raise APIError(403, "forbidden", f"this operation needs scope "
                               f"{'admin' if r.needs == 'admin' else r.needs!r}; key has {scopes}")
        ctx = Ctx(request, replica, actor, scopes)
        ctx.query = _coerce_query(request, r.query)
        if request.method in WRITE_METHODS:
            idempotency_key(request)  # before any work: a bad key must change nothing
        if r.body is not None:
            ctx.body = await _parse_body(request, r.body)
        elif request.method in ("POST", "PUT", "PATCH") and await request.read():
            raise APIError(400, "bad_request", "this operation takes no body")
        stale = ctx.query.get("stale")
        if stale:
            _check_staleness(replica, ctx.query.get("max_staleness"))
        elif "max_staleness" in ctx.query:
            raise APIError(400, "bad_request", "max_staleness bounds a ?stale=true read; "
                           "without stale=true the read is linearizable")
        response = await r.handler(ctx)
        if ctx.replayed:
            response.headers[REPLAYED_HEADER] = "true"
        if stale:
            age, unapplied = staleness(replica)
            response.headers[STALENESS_HEADER] = (
                f"leader-contact-ms={'unknown' if age is None else round(age * 1e3)}; "
                f"unapplied={unapplied}")
        return response
    return handle


def staleness(replica: Raft) -> tuple[float | None, int]:
    """What a read of this replica's local state may miss: (seconds since it last heard its
    leader, entries it knows are committed but has not applied). The state then holds
    everything the leader had committed that long ago, plus the one-way delay from the
    leader. A leader with a quorum is current (0; it steps down within election_max of
    losing it). None: no leader known, the state may be arbitrarily old."""
    s = replica.status
    if not s or s["leader"] is None:
        return None, 0
    if s["state"] == "leader":
        return (0.0 if s["has_quorum"] else None), max(0, s["commit_index"] - s["applied_index"])
    heard = s.get("leader_heard")
    age = None if heard is None else max(0.0, time.monotonic() - heard)
    return age, max(0, (s["leader_commit_index"] or 0) - s["applied_index"])


def _check_staleness(replica: Raft, bound: float | None) -> None:
    """?max_staleness=S: refuse (503, before any work) a stale read that could miss writes
    committed more than S seconds ago."""
    if bound is None:
        return
    age, unapplied = staleness(replica)
    if age is None or age > bound or unapplied:
        heard = "no leader known" if age is None else f"leader last heard {age * 1e3:.0f} ms ago"
        raise APIError(503, "not_ready", f"this replica's state may be older than {bound:g} s "
                       f"({heard}, {unapplied} committed entries not applied yet); retry, read "
                       "another replica, or drop stale=true for a linearizable read")


async def _expect_100_continue(request: web.Request) -> None:
    """aiohttp's default Expect handler, answering anything but 100-continue with a JSON 417
    (it runs before the middlewares, which would otherwise word the error)."""
    expect = request.headers.get("Expect", "")
    if request.version >= (1, 1) and expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(
            text=json.dumps(error_body("expectation_failed", f"unsupported Expect: {expect[:100]!r}; "
                                       "only 100-continue is")), content_type="application/json")
    await web_urldispatcher._default_expect_handler(request)


def register(app: web.Application, replica: Raft) -> None:
    keys = ApiKeyCache(replica)
    app[WRITE_DEADLINES] = WriteDeadlines(replica.config.write_timeout)
    for r in ROUTES:
        app.router.add_route(r.method, r.path, make_handler(r, replica, keys), name=_route_name(r),
                             expect_handler=_expect_100_continue)


def _route_name(r: Route) -> str:
    return r.method.lower() + re.sub(r"[^a-z0-9]+", "_", r.path.lower()).rstrip("_")


def openapi() -> dict:
    """The OpenAPI 3.1 description generated from ROUTES."""
    paths: dict[str, dict] = {}
    for r in ROUTES:
        success: dict[str, Any] = {"description": "success",
                                   "content": {r.response_type: {"schema": r.response}}}
        if links := openapi_links.links(r, ROUTES, _route_name):
            success["links"] = links
        op: dict[str, Any] = {"summary": r.summary, "operationId": _route_name(r),
                              "responses": {str(r.status): success}}
        params = [{"name": n, "in": "path", "required": True,
                   "schema": {"type": "string", "minLength": 1}}
                  for n in re.findall(r"{(\w+)}", r.path)]
        params += [{"name": n, "in": "query", "required": False, "schema": _documented(s)}
                   for n, s in r.query.items()]
        if params:
            op["parameters"] = params
        if r.body is not None:
            media = "text/plain" if r.body.get("x-raw-text") else "application/json"
            op["requestBody"] = {"required": True, "description": f"Content-Type: {media}, "
                                 "UTF-8 (charset=utf-8 optional); anything else is a 415",
                                 "content": {media: {"schema": _documented(r.body)}}}
        if r.needs is not None:
            op["security"] = [{"apiKey": []}]
            op["x-required-scope"] = r.needs
        for code, (status, meaning) in ERROR_CODES.items():
            op["responses"].setdefault(str(status), {
                "description": "", "content": {"application/json": {"schema": ERROR_REF}}})
            op["responses"][str(status)]["description"] += f"{code}: {meaning}. "
        if r.method in WRITE_METHODS:
            op["parameters"] = op.get("parameters", []) + [
                {"name": "Idempotency-Key", "in": "header", "required": False,
                 "schema": {"type": "string", "minLength": 1, "maxLength": IDEMPOTENCY_KEY_MAX,
                            "pattern": "^[\\x20-\\x7e]+$"}}]
            success["headers"] = {REPLAYED_HEADER: {
                "description": "present on a retry answered with the first request's result "
                               "(same Idempotency-Key, same request, same API key)",
                "schema": {"type": "string", "enum": ["true"]}}}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "raftmesh admin API", "version": "1"},
        "components": {"securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
                       "schemas": {"Error": responses.ERROR}},
        "paths": paths,
    }


ERROR_REF = {"$ref": "#/components/schemas/Error"}


def _documented(schema: Any) -> Any:
    """A request schema with the limits the server enforces beyond it spelled out: integers
    within I-JSON's range (_strict_json, parse_number), text bodies not empty (_parse_body)."""
    if isinstance(schema, list):
        return [_documented(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _documented(v) if k in ("items", "prefixItems") else v for k, v in schema.items()}
    if "properties" in out:
        out["properties"] = {n: _documented(s) for n, s in out["properties"].items()}
    if out.get("type") == "integer":
        out = {"minimum": -MAX_SAFE_INTEGER, "maximum": MAX_SAFE_INTEGER, **out}
    if out.get("x-raw-text"):
        out.setdefault("minLength", 1)
    return out
