"""Bad input gets the documented error and changes nothing, on every route.

The matrix is generated from the route table (`raftmesh.api.routing.ROUTES`, filled by the
modules the server imports), so a new endpoint is covered the moment it is registered:
credentials, scopes, bodies (field by field, from the route's own JSON schema), query
parameters, sizes, methods, missing resources, conflicts and Idempotency-Key handling.

"Changes nothing": the module fixture `world` makes every deliberate write first, then
fingerprints all state visible through linearizable reads; each test is wrapped in a cheap
check (audit head + Raft membership on every replica) and the module ends by comparing the
full fingerprint. Every state change appends an audit entry in the same transaction, so an
unchanged audit head means no command changed the state.

The matrix runs on the real app over the in-memory Raft (cluster/raft/in_memory.py): one
replica, no processes. What only replicas can show (followers agree on expiry and replays)
runs on a real cluster at the end.
"""
from __future__ import annotations

import gzip
import http.client
import itertools
import json
import re
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import pytest
from nacl.signing import SigningKey

import raftmesh.api.server  # noqa: F401  (imports every module whose routes the server serves)
from raftmesh.api.errors import ERROR_CODES
from raftmesh.proto.machine_auth import HEADER_KEY, HEADER_NONCE, sign_headers
from raftmesh.api.routing import IDEMPOTENCY_KEY_MAX, REPLAYED_HEADER, ROUTES
from raftmesh.cluster.config import ReplicaConfig
from in_memory_api import ServedInMemory
from raftmesh.proto.routes import MACHINE, REGISTER
from waiting import wait_until

MAX_BODY = ReplicaConfig.__dataclass_fields__["max_body_bytes"].default
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
ALL_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
# What each scope may do, as documented (docs/api.md), written out independently of auth.allows.
GRANTS = {"admin": {"read", "write", "audit", "admin"}, "operator": {"read", "write"},
          "read": {"read"}, "audit": {"audit"}}
LIMITED_KEYS = {"read": ["read"], "audit": ["audit"], "operator": ["operator"],
                "read+audit": ["audit", "read"]}
GHOST = "ghost-" + secrets.token_hex(4)


def is_text(r) -> bool:
    return r.body is not None and bool(r.body.get("x-raw-text"))


def rid(r) -> str:
    return f"{r.method} {r.path}"


AUTH_ROUTES = [r for r in ROUTES if r.needs is not None]
MACHINE_ROUTES = [r for r in ROUTES if r.path.startswith(MACHINE + "/")]
JSON_ROUTES = [r for r in ROUTES if r.body is not None and not is_text(r)]
TEXT_ROUTES = [r for r in ROUTES if is_text(r)]
BODYLESS_ROUTES = [r for r in ROUTES if r.body is None and r.method in ("POST", "PUT", "PATCH")]
UPLOAD_ROUTES = [r for r in ROUTES if r.method in ("POST", "PUT", "PATCH")]
PARAM_ROUTES = [r for r in ROUTES if "{" in r.path]
WRITE_ROUTES = [r for r in ROUTES if r.method in WRITE_METHODS]
QUERY_ROUTES = [r for r in ROUTES if r.query]
PATHS = sorted({r.path for r in ROUTES})


# -- HTTP --------------------------------------------------------------------------------------
@dataclass
class Reply:
    status: int
    body: Any
    headers: Any = field(repr=False)


ADMIN = object()  # the cluster's bootstrap admin key


class Api:
    """Raw HTTP against the cluster, spreading requests over all replicas (followers too)."""

    def __init__(self, cluster):
        self.cluster = cluster
        self._next = itertools.cycle(range(len(cluster.replicas)))

    def url(self, replica: int | None = None) -> str:
        return self.cluster.replicas[next(self._next) if replica is None else replica].api_url

    def __call__(self, method: str, path: str, body: Any = None, *, key: Any = ADMIN,
                 headers: dict | None = None, replica: int | None = None) -> Reply:
        hdrs: dict[str, Any] = {}
        if key is ADMIN:
            key = self.cluster.admin_key
        if key is not None:
            hdrs["Authorization"] = f"Bearer {key}"
        data = None
        if isinstance(body, bytes):
            data = body
            hdrs["Content-Type"] = "application/json"
        elif isinstance(body, str):
            data = body.encode()
            hdrs["Content-Type"] = "text/plain; charset=utf-8"
        elif body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        req = urllib.request.Request(self.url(replica) + path, data=data, method=method,
                                     headers={k: v for k, v in hdrs.items() if v is not None})
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                raw, status, rh = resp.read(), resp.status, resp.headers
        except urllib.error.HTTPError as e:
            raw, status, rh = e.read(), e.code, e.headers
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw.decode(errors="replace")
        return Reply(status, parsed, rh)


def assert_error(rep: Reply, status: int, code: str | None = None) -> dict:
    """The documented error shape, a documented code whose documented status is `status`."""
    where = f"got {rep.status} {str(rep.body)[:400]}"
    assert rep.status == status, where
    assert rep.headers.get("Content-Type", "").startswith("application/json"), where
    assert isinstance(rep.body, dict) and set(rep.body) == {"error"}, where
    err = rep.body["error"]
    assert isinstance(err.get("code"), str) and isinstance(err.get("message"), str) and err["message"], where
    assert err["code"] in ERROR_CODES, where
    assert ERROR_CODES[err["code"]][0] == status, f"{err['code']} is documented as {ERROR_CODES[err['code']][0]}; {where}"
    if code is not None:
        assert err["code"] == code, where
    if "details" in err:
        assert isinstance(err["details"], list) and err["details"], where
        assert all(isinstance(d, dict) and isinstance(d.get("message"), str) for d in err["details"]), where
    return err


def fields_named(err: dict) -> list[str]:
    return [d.get("field") for d in err.get("details", [])]


def names(err: dict, name: str) -> bool:
    """Every detail is about `name` (the field itself or something inside it)."""
    fs = fields_named(err)
    return bool(fs) and all(f == name or str(f).startswith(name + ".") for f in fs)


# -- bodies generated from a route's JSON schema -------------------------------------------------
STRING_CANDIDATES = ["a", "tag:a", "127.0.0.1:1", "http://127.0.0.1:1", "A" * 43 + "=", "10.0.0.0/8",
                     "rmk_aaaaaaaaaaaa_x", "a" * 10, "a" * 12, "a" * 64]


def valid(value, schema) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def kind_of(schema: dict) -> str | None:
    """The schema's type; for a nullable one (["string", "null"]), the type besides null."""
    kind = schema.get("type")
    return next(k for k in kind if k != "null") if isinstance(kind, list) else kind


def sample(schema: dict) -> Any:
    """A small instance that satisfies `schema` (required fields only; minProperties honoured)."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = kind_of(schema)
    if kind == "object":
        props = schema.get("properties", {})
        out = {k: sample(props[k]) for k in schema.get("required", [])}
        for k in props:
            if len(out) >= schema.get("minProperties", 0):
                break
            out.setdefault(k, sample(props[k]))
        value = out
    elif kind == "array" and "prefixItems" in schema:
        value = [sample(s) for s in schema["prefixItems"]]
    elif kind == "array":
        value = [sample(schema["items"])] * schema.get("minItems", 0)
    elif kind == "string":
        value = next((s for s in STRING_CANDIDATES if valid(s, schema)), None)
    elif kind == "integer":
        value = max(schema.get("minimum", 1), 1)
    elif kind == "number":
        value = 1.5
    elif kind == "boolean":
        value = True
    else:
        value = None
    assert valid(value, schema), f"add a STRING_CANDIDATES entry satisfying {schema}"
    return value


def wrong_values(schema: dict) -> list[tuple[str, Any]]:
    """(label, value) pairs that `schema` rejects: wrong types, out of range, bad items..."""
    kind = kind_of(schema)
    out: list[tuple[str, Any]] = [("null", None)]
    out += {"string": [("number", 12345), ("list", ["a"])],
            "integer": [("string", "12"), ("float", 1.5), ("bool", True)],
            "number": [("string", "1.5")],
            "boolean": [("string", "true"), ("int", 1)],
            "array": [("string", "not-a-list"), ("object", {"a": 1})],
            "object": [("list", [])]}.get(kind, [])
    if kind == "string":
        if "pattern" in schema:
            out.append(("pattern", "!! not valid !!"))
        if "maxLength" in schema:
            out.append(("too long", "a" * (schema["maxLength"] + 1)))
        if schema.get("minLength", 0) > 0:
            out.append(("too short", "a" * (schema["minLength"] - 1)))
    if kind in ("integer", "number"):
        if "minimum" in schema:
            out.append(("below minimum", schema["minimum"] - 1))
        if "maximum" in schema:
            out.append(("above maximum", schema["maximum"] + 1))
    if "enum" in schema:
        out.append(("not in enum", "not-an-option"))
    if kind == "array" and "prefixItems" in schema:  # a tuple: break one position at a time
        good = [sample(s) for s in schema["prefixItems"]]
        for i, position in enumerate(schema["prefixItems"]):
            out += [(f"position {i} {label}", good[:i] + [v] + good[i + 1:])
                    for label, v in wrong_values(position)[:2]]
    if kind == "array" and "items" in schema:
        item = schema["items"]
        out += [(f"item {label}", [v]) for label, v in wrong_values(item)[:3]]
        if "maxItems" in schema:
            out.append(("too many", [f"x{i}" for i in range(schema["maxItems"] + 1)]))
        if schema.get("minItems", 0) > 0:
            out.append(("empty", []))
        if schema.get("uniqueItems"):
            out.append(("duplicates", [sample(item)] * 2))
    bad = [(label, v) for label, v in out if not valid(v, schema)]
    assert bad, schema
    return bad


def concrete(path: str, ident: str = GHOST) -> str:
    return re.sub(r"{\w+}", ident, path)


def semantic(r) -> tuple[str, Any]:
    """A well-formed request aimed at a resource that does not exist: rejected by the state
    at worst; if a check that should come first were missing, it would change something."""
    if r.body is None:
        return concrete(r.path), None
    return concrete(r.path), ("{}" if is_text(r) else sample(r.body))


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Api:
    """The real app on the in-memory Raft; what needs replicas to agree is checked on a real
    cluster at the end of this module."""
    with ServedInMemory(str(tmp_path_factory.mktemp("bad_input"))) as served:
        yield Api(served)


def quick_state(api: Api) -> dict:
    """Audit head (every state change appends to the audit chain) and Raft membership."""
    rep = api("GET", "/api/v1/audit?limit=1", replica=0)
    assert rep.status == 200, rep
    members = []
    for i in range(len(api.cluster.replicas)):
        s = api("GET", "/api/v1/cluster/self", replica=i)
        assert s.status == 200, s
        members.append(sorted(s.body["replica"]["members"]))
    return {"audit_head": rep.body["head"], "raft_members": members}


def full_state(api: Api) -> dict:
    out = quick_state(api)
    for path in ("/api/v1/users", "/api/v1/nodes", "/api/v1/preauth-keys", "/api/v1/api-keys",
                 "/api/v1/policy/versions?include_text=true", "/api/v1/cluster/members",
                 "/api/v1/cluster/keys"):
        rep = api("GET", path, replica=0)
        assert rep.status == 200, (path, rep)
        out[path] = {k: v for k, v in rep.body.items() if k not in ("version", "stale")}
    rep = api("GET", "/api/v1/policy", replica=0)
    out["policy"] = (rep.status, rep.body.get("policy") if isinstance(rep.body, dict) else None)
    entries, after = [], 0
    while True:
        rep = api("GET", f"/api/v1/audit?limit=1000&after_seq={after}", replica=0)
        assert rep.status == 200, rep
        entries += rep.body["entries"]
        if rep.body["next_after_seq"] == after:
            break
        after = rep.body["next_after_seq"]
    out["audit"] = entries
    return out


@dataclass
class World:
    keys: dict[str, str]  # limited scope name -> token
    key_ids: dict[str, str]
    expiring: str
    dup_user: str
    idem_key: str
    idem_body: dict
    idem_reply: Reply
    admin_id: str


@pytest.fixture(scope="module")
def world(api) -> World:
    """Every deliberate write of this module, then the baseline; compared at module end."""
    keys, ids = {}, {}
    for name, scopes in LIMITED_KEYS.items():
        rep = api("POST", "/api/v1/api-keys", {"name": name, "scopes": scopes})
        assert rep.status == 201, rep
        keys[name], ids[name] = rep.body["key"], rep.body["api_key"]["id"]
    # Not admin: an (expired) admin key would still count as "another admin" for deletes.
    rep = api("POST", "/api/v1/api-keys", {"name": "expiring", "scopes": ["read"], "expiration_seconds": 1})
    assert rep.status == 201, rep
    expiring = rep.body["key"]
    assert api("POST", "/api/v1/users", {"name": "dup-user"}).status == 201
    idem_key, idem_body = "idem-" + secrets.token_hex(8), {"name": "idem-user"}
    idem_reply = api("POST", "/api/v1/users", idem_body, headers={"Idempotency-Key": idem_key})
    assert idem_reply.status == 201, idem_reply
    w = World(keys, ids, expiring, "dup-user", idem_key, idem_body, idem_reply,
              api.cluster.admin_key.split("_")[1])
    baseline = full_state(api)
    yield w
    after = full_state(api)
    for part in baseline:
        assert after[part] == baseline[part], f"bad input changed {part}"


@pytest.fixture(autouse=True)
def unchanged(api, world):
    before = quick_state(api)
    yield
    assert quick_state(api) == before, "a rejected request changed the state"


# -- credentials ---------------------------------------------------------------------------------
def bad_credentials(api: Api, world: World) -> list[tuple[str, dict]]:
    admin = api.cluster.admin_key
    unknown = f"rmk_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"
    return [
        ("no header", {"Authorization": None}),
        ("empty header", {"Authorization": ""}),
        ("basic scheme", {"Authorization": "Basic YWRtaW46YWRtaW4="}),
        ("bearer without token", {"Authorization": "Bearer"}),
        ("bearer blank", {"Authorization": "Bearer    "}),
        ("garbage", {"Authorization": "Bearer garbage"}),
        ("empty id", {"Authorization": "Bearer rmk__" + secrets.token_urlsafe(32)}),
        ("empty secret", {"Authorization": f"Bearer rmk_{world.admin_id}_"}),
        ("wrong prefix", {"Authorization": "Bearer " + admin.replace("rmk_", "rmp_", 1)}),
        ("unknown key", {"Authorization": f"Bearer {unknown}"}),
        ("wrong secret for admin id", {"Authorization": f"Bearer rmk_{world.admin_id}_{secrets.token_urlsafe(32)}"}),
        ("wrong secret for read id", {"Authorization": f"Bearer rmk_{world.key_ids['read']}_{secrets.token_urlsafe(32)}"}),
        ("admin key plus a char", {"Authorization": f"Bearer {admin}x"}),
        ("admin key truncated", {"Authorization": f"Bearer {admin[:-1]}"}),
        ("id longer than a storage key", {"Authorization": f"Bearer rmk_{'a' * 600}_x"}),
        ("non-UTF-8 bytes", {"Authorization": b"Bearer rmk_\xff\xfe_x"}),
        ("non-UTF-8 secret", {"Authorization": f"Bearer rmk_{world.admin_id}_".encode() + b"\xff"}),
        ("non-ASCII UTF-8", {"Authorization": "Bearer rmk_é_x".encode()}),
    ]


@pytest.mark.parametrize("r", AUTH_ROUTES, ids=rid)
def test_bad_credentials_are_401(api, world, r):
    path, body = semantic(r)
    for label, headers in bad_credentials(api, world):
        err = assert_error(api(r.method, path, body, key=None, headers=headers), 401, "unauthenticated")
        assert "Bearer" in err["message"] or "key" in err["message"], (label, err)


def test_expired_key_is_401(api, world):
    def rejected():
        rep = api("GET", "/api/v1/users", key=world.expiring)
        return rep if rep.status == 401 else None
    err = assert_error(wait_until(rejected, timeout=10, what="the 1 s API key to expire"), 401, "unauthenticated")
    assert "expired" in err["message"]
    for i in range(len(api.cluster.replicas)):  # every replica agrees
        assert_error(api("GET", "/api/v1/users", key=world.expiring, replica=i), 401, "unauthenticated")


@pytest.mark.parametrize("r", AUTH_ROUTES, ids=rid)
def test_insufficient_scope_is_403(api, world, r):
    path, body = semantic(r)
    for name, scopes in LIMITED_KEYS.items():
        granted = set().union(*(GRANTS[s] for s in scopes))
        if r.needs in granted:
            # Scope accepted: an unknown query parameter is then refused before anything runs.
            err = assert_error(api(r.method, path + "?scope_probe=1", body, key=world.keys[name]),
                               400, "bad_request")
            assert "scope_probe" in err["message"]
        else:
            err = assert_error(api(r.method, path, body, key=world.keys[name]), 403, "forbidden")
            assert r.needs in err["message"], err


# -- JSON bodies -----------------------------------------------------------------------------------
NOT_JSON = [
    ("empty", b""), ("garbage", b"{not json"), ("single quotes", b"{'name': 'a'}"),
    ("truncated", b'{"a": 1'), ("two documents", b'{"a": 1} {"b": 2}'), ("not UTF-8", b"\xff\xfe\x00{"),
    ("NaN", b'{"a": NaN}'), ("Infinity", b'{"a": Infinity}'), ("-Infinity", b'{"a": -Infinity}'),
    ("float overflow", b'{"a": 1e400}'), ("huge integer", b'{"a": ' + b"9" * 400 + b"}"),
    ("integer beyond 2^53", b'{"a": 9007199254740993}'),
    ("unpaired surrogate", b'{"a": "\\ud800"}'),
    ("nested too deeply", b"[" * 100_000 + b"]" * 100_000),
    ("nested too deeply, unterminated", b'{"a": ' + b"[" * 200_000),
]
WRONG_TOP = [b"[]", b'[{"name": "a"}]', b'"text"', b"42", b"4.2", b"true", b"null"]


@pytest.mark.parametrize("r", JSON_ROUTES, ids=rid)
def test_body_that_is_not_json_is_bad_request(api, r):
    path, _ = semantic(r)
    for label, raw in NOT_JSON:
        err = assert_error(api(r.method, path, raw), 400, "bad_request")
        assert "JSON" in err["message"] or "body" in err["message"], (label, err)


@pytest.mark.parametrize("r", JSON_ROUTES, ids=rid)
def test_body_of_the_wrong_type_fails_validation(api, r):
    path, _ = semantic(r)
    for raw in WRONG_TOP:
        err = assert_error(api(r.method, path, raw), 400, "validation_failed")
        assert fields_named(err) == ["(body)"], (raw, err)


@pytest.mark.parametrize("r", JSON_ROUTES, ids=rid)
def test_unknown_fields_are_named(api, r):
    path, good = semantic(r)
    err = assert_error(api(r.method, path, {**good, "surprise": 1, "zz_extra": [1]}), 400, "validation_failed")
    assert "surprise" in err["message"] and "zz_extra" in err["message"], err
    assert any("surprise" in d["message"] and "zz_extra" in d["message"] for d in err["details"]), err


@pytest.mark.parametrize("r", [r for r in JSON_ROUTES if r.body.get("required")], ids=rid)
def test_each_missing_required_field_is_named(api, r):
    path, good = semantic(r)
    for name in r.body["required"]:
        body = {k: v for k, v in good.items() if k != name}
        err = assert_error(api(r.method, path, body), 400, "validation_failed")
        assert [d for d in err["details"] if repr(name) in d["message"]], (name, err)
        assert len(err["details"]) == 1, (name, err)


@pytest.mark.parametrize("r", JSON_ROUTES, ids=rid)
def test_each_field_with_a_wrong_value_is_named(api, r):
    path, good = semantic(r)
    for name, schema in r.body["properties"].items():
        for label, value in wrong_values(schema):
            err = assert_error(api(r.method, path, {**good, name: value}), 400, "validation_failed")
            assert names(err, name), (name, label, err)


def test_validation_errors_are_bounded(api):
    """A body with a huge number of mistakes gets a bounded answer, quickly."""
    r = next(r for r in JSON_ROUTES if any(s.get("type") == "array" for s in r.body["properties"].values()))
    name = next(n for n, s in r.body["properties"].items() if s.get("type") == "array")
    path, good = semantic(r)
    started = time.monotonic()
    err = assert_error(api(r.method, path, {**good, name: [12345] * 100_000}), 400, "validation_failed")
    assert time.monotonic() - started < 5
    assert 0 < len(err["details"]) <= 100 and names(err, name), len(err["details"])


# -- text bodies (policy) ------------------------------------------------------------------------
@pytest.mark.parametrize("r", TEXT_ROUTES, ids=rid)
def test_text_bodies(api, r):
    path = concrete(r.path)
    assert_error(api(r.method, path, b"\xff\xfe not UTF-8", headers={"Content-Type": "text/plain"}),
                 400, "bad_request")
    assert_error(api(r.method, path, b"", headers={"Content-Type": "text/plain"}), 400, "bad_request")
    for text in ("[]", '"text"', '{"acls": 5}', '{"surprise": {}}', "{", "[" * 100_000,
                 '{"acls": [{"action": "accept", "src": ["*"], "dst": ["nowhere:99999"]}]}'):
        err = assert_error(api(r.method, path, text), 400, "validation_failed")
        assert err["message"].startswith("policy is invalid"), (text[:40], err)


# -- content types and encodings -------------------------------------------------------------------
def expected_media(r) -> str:
    return "text/plain" if is_text(r) else "application/json"


def wrong_content_types(r) -> list[str | None]:
    media = expected_media(r)
    other = "application/json" if is_text(r) else "text/plain"
    return [None, "", other, "image/png", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
            f"{media}x", f"{media}; charset=utf-16", f"{media}; charset=latin-1", f"{media}; charset=utf-8; v=2",
            f"{media}; version=1", f"{media},{media}"]


def send_raw(api: Api, method: str, path: str, raw: bytes, ctype: str | None) -> Reply:
    """Exactly these headers (urllib would add a form Content-Type to a body without one)."""
    conn = http.client.HTTPConnection("127.0.0.1", api.cluster.replicas[0].api_port, timeout=15)
    try:
        conn.putrequest(method, path)
        for name, value in {"Authorization": f"Bearer {api.cluster.admin_key}", "Content-Type": ctype,
                            "Content-Length": str(len(raw))}.items():
            if value is not None:
                conn.putheader(name, value)
        conn.endheaders(raw)
        resp = conn.getresponse()
        return Reply(resp.status, json.loads(resp.read()), resp.headers)
    finally:
        conn.close()


@pytest.mark.parametrize("r", JSON_ROUTES + TEXT_ROUTES, ids=rid)
def test_bodies_in_another_media_type_are_415(api, r):
    path, good = semantic(r)
    raw = b"[]" if is_text(r) else json.dumps({**good, "surprise": 1}).encode()  # invalid either way
    for ctype in wrong_content_types(r):
        err = assert_error(send_raw(api, r.method, path, raw, ctype), 415, "unsupported_media_type")
        assert expected_media(r) in err["message"], (ctype, err)
    # what the rule allows is read (and refused for what it says, not for its type)
    for ctype in (expected_media(r), expected_media(r).upper() + '; Charset="UTF-8"'):
        assert_error(send_raw(api, r.method, path, raw, ctype), 400)


@pytest.mark.parametrize("r", JSON_ROUTES, ids=rid)
def test_json_bodies_are_utf8_only(api, r):
    path, good = semantic(r)
    for codec in ("utf-16", "utf-16-le", "utf-32", "utf-8-sig"):
        err = assert_error(api(r.method, path, json.dumps(good).encode(codec)), 400, "bad_request")
        assert "JSON" in err["message"], (codec, err)


def test_patching_a_missing_node_is_404_whatever_the_body(api):
    for body in ({"tags": ["tag:undeclared"]}, {"tags": []}, {"name": "n1"}, {"name": "x", "tags": ["tag:a"]}):
        err = assert_error(api("PATCH", f"/api/v1/nodes/{GHOST}", body), 404, "not_found")
        assert GHOST in err["message"], (body, err)


# -- sizes, encodings, bodies where none belongs --------------------------------------------------
@pytest.mark.parametrize("r", UPLOAD_ROUTES, ids=rid)
def test_body_over_the_limit_is_413(api, r):
    path = concrete(r.path)
    if is_text(r):
        at_limit, code = b"!" * MAX_BODY, "validation_failed"
    elif r.body is not None:
        at_limit, code = b'{"surprise": "' + b"x" * (MAX_BODY - 16) + b'"}', "validation_failed"
    else:
        at_limit, code = b"x" * MAX_BODY, "bad_request"
    assert len(at_limit) == MAX_BODY
    ctype = {"Content-Type": "text/plain" if is_text(r) else "application/json"}
    assert_error(api(r.method, path, at_limit, headers=ctype), 400, code)  # at the limit: read
    assert_error(api(r.method, path, at_limit + b" ", headers=ctype), 413, "payload_too_large")


def test_compressed_and_chunked_bodies_respect_the_limit(api):
    bomb = gzip.compress(b'{"name": "' + b"a" * (2 * MAX_BODY) + b'"}')
    assert len(bomb) < MAX_BODY // 100
    assert_error(api("POST", "/api/v1/users", bomb, headers={"Content-Encoding": "gzip"}), 413, "payload_too_large")
    for encoding in ("gzip", "deflate"):
        assert_error(api("POST", "/api/v1/users", b"not compressed", headers={"Content-Encoding": encoding}),
                     400, "bad_request")
    conn = http.client.HTTPConnection("127.0.0.1", api.cluster.replicas[0].api_port, timeout=15)
    try:
        conn.request("POST", "/api/v1/users", body=(b"x" * 100_000 for _ in range(2 * MAX_BODY // 100_000)),
                     headers={"Authorization": f"Bearer {api.cluster.admin_key}"}, encode_chunked=True)
        resp = conn.getresponse()
        assert_error(Reply(resp.status, json.loads(resp.read()), resp.headers), 413, "payload_too_large")
    finally:
        conn.close()


@pytest.mark.parametrize("r", BODYLESS_ROUTES, ids=rid)
def test_body_where_none_belongs_is_bad_request(api, r):
    path, _ = semantic(r)
    for body in ({"surprise": 1}, b"x"):
        assert_error(api(r.method, path, body), 400, "bad_request")


# -- query parameters ------------------------------------------------------------------------------
def good_query_value(schema: dict) -> str:
    return {"boolean": "false", "integer": str(max(schema.get("minimum", 1), 1)), "number": "1.5"}.get(
        schema.get("type"), str(sample(schema)))


def bad_query_values(schema: dict) -> list[str]:
    kind = schema.get("type")
    strict = ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", " 1", "1 ", "+1", "1_0", "\u0663"]
    out = {"boolean": ["yes", "", "TRUE", "2", "null"],
           "integer": ["abc", "", "1.5", "1e3", "0x10", "9" * 5000, *strict],
           "number": ["abc", "", "1,5", "1e3", "1.", ".5", *strict]}.get(kind, [])
    if kind in ("integer", "number"):
        if "minimum" in schema:
            out.append(str(schema["minimum"] - 1))
        if "maximum" in schema:
            out.append(str(schema["maximum"] + 1))
    if kind == "string" and "pattern" in schema:
        out += ["!!", "", "a" * 300]
    if "enum" in schema:
        out.append("not-an-option")
    return out


@pytest.mark.parametrize("r", ROUTES, ids=rid)
def test_unknown_and_repeated_query_parameters_are_bad_request(api, r):
    path, body = semantic(r)
    for query in ("bogus=1", "bogus", "STALE=true", "stale=true&bogus=", "%ff=1"):
        err = assert_error(api(r.method, f"{path}?{query}", body), 400, "bad_request")
        assert "query" in err["message"], (query, err)
    for name, schema in r.query.items():
        v = urllib.parse.quote(good_query_value(schema))
        assert_error(api(r.method, f"{path}?{name}={v}&{name}={v}", body), 400, "bad_request")


@pytest.mark.parametrize("r", QUERY_ROUTES, ids=rid)
def test_badly_typed_query_values_are_bad_request(api, r):
    path, body = semantic(r)
    for name, schema in r.query.items():
        for value in bad_query_values(schema):
            err = assert_error(api(r.method, f"{path}?{name}={urllib.parse.quote(value)}", body),
                               400, "bad_request")
            assert name in err["message"], (name, value[:20], err)


# -- routes and methods ----------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/api/v1/nope", "/api/v1/users/a/b/c", "/api/v2/users", "/api/v1/users/",
                                  "/API/V1/USERS", "/api/v1", "/api/v1/", "/", MACHINE + "/nope",
                                  "/api/v1/openapi.yaml", "/api/v1/nodes/x/approve/now", "/api/v1/%ff"])
def test_unknown_routes_are_404(api, path):
    for method in ("GET", "POST", "DELETE"):
        for key in (ADMIN, None):
            err = assert_error(api(method, path, key=key), 404, "not_found")
            assert "no route" in err["message"]


@pytest.mark.parametrize("path", PATHS + ["/healthz", "/readyz", "/metrics"])
def test_wrong_methods_are_405_with_allow(api, path):
    served = {r.method for r in ROUTES if r.path == path} or {"GET"}
    for method in sorted(set(ALL_METHODS + ("OPTIONS",)) - served):
        rep = api(method, concrete(path), {"surprise": 1} if method in ("POST", "PUT", "PATCH") else None)
        assert_error(rep, 405, "method_not_allowed")
        allow = {m.strip() for m in rep.headers.get("Allow", "").split(",") if m.strip()}
        assert served <= allow <= served | {"HEAD"}, (method, path, rep.headers.get("Allow"))


# -- missing resources and conflicts --------------------------------------------------------------
@pytest.mark.parametrize("r", PARAM_ROUTES, ids=rid)
def test_missing_resources_are_404(api, r):
    for ident in (GHOST, "x" * 600, "%F0%9F%98%80", "%FF", "a%00b", "..."):
        _, body = semantic(r)
        err = assert_error(api(r.method, concrete(r.path, ident), body), 404, "not_found")
        assert "no route" not in err["message"], err


def test_conflicts_are_409(api, world):
    err = assert_error(api("POST", "/api/v1/users", {"name": world.dup_user}), 409, "conflict")
    assert world.dup_user in err["message"]
    me = api.cluster.replicas[0]
    assert_error(api("POST", "/api/v1/cluster/members", {"id": me.id, "raft_addr": me.raft_addr,
                                                         "api_url": me.api_url}), 409, "already_member")
    err = assert_error(api("DELETE", f"/api/v1/api-keys/{world.admin_id}"), 409, "conflict")
    assert "admin" in err["message"]
    assert_error(api("PUT", "/api/v1/policy?expected_version=41", "{}"), 409, "version_conflict")


def test_semantic_body_checks(api, world):
    err = assert_error(api("POST", "/api/v1/preauth-keys", {"user": world.dup_user, "usage_limit": 2}),
                       400, "validation_failed")
    assert fields_named(err) == ["usage_limit"]
    tagged = {"user": world.dup_user, "tags": ["tag:undeclared"]}
    assert_error(api("POST", "/api/v1/preauth-keys", tagged, key=world.keys["operator"]), 403, "forbidden")
    err = assert_error(api("POST", "/api/v1/preauth-keys", tagged), 400, "validation_failed")
    assert fields_named(err) == ["tags"]
    assert_error(api("POST", "/api/v1/preauth-keys", {"user": GHOST}), 404, "not_found")


# -- Idempotency-Key -----------------------------------------------------------------------------
BAD_IDEMPOTENCY_KEYS = [
    ("empty", ""), ("too long", "k" * (IDEMPOTENCY_KEY_MAX + 1)), ("tab", "a\tb"),
    ("non-ASCII", "clé".encode()), ("4-byte characters", ("\U0001F600" * IDEMPOTENCY_KEY_MAX).encode()),
    ("not UTF-8", b"k\xff\xfe"),
]


@pytest.mark.parametrize("r", WRITE_ROUTES, ids=rid)
def test_bad_idempotency_keys_are_refused_before_anything_happens(api, r):
    path, body = semantic(r)
    if r.path == "/api/v1/cluster/members" and r.method == "POST":
        # A new member: the membership change must not happen before the key is checked.
        body = {"id": "phantom", "raft_addr": "127.0.0.1:9", "api_url": "http://127.0.0.1:9"}
    for label, key in BAD_IDEMPOTENCY_KEYS:
        err = assert_error(api(r.method, path, body, headers={"Idempotency-Key": key}), 400, "bad_request")
        assert "Idempotency-Key" in err["message"], (label, err)


def test_idempotency_key_at_the_limit_is_accepted(api, world):
    key = "k" * IDEMPOTENCY_KEY_MAX
    assert_error(api("POST", "/api/v1/users", {"name": world.dup_user}, headers={"Idempotency-Key": key}),
                 409, "conflict")


def test_retry_with_the_same_idempotency_key_replays_and_creates_nothing(api, world):
    first = world.idem_reply
    for i in range(len(api.cluster.replicas)):
        for body in (world.idem_body, b'{ "name" :\n "idem-user" }'):
            again = api("POST", "/api/v1/users", body, headers={"Idempotency-Key": world.idem_key}, replica=i)
            assert (again.status, again.body) == (first.status, first.body)
            assert again.headers.get(REPLAYED_HEADER) == "true"
    assert REPLAYED_HEADER not in first.headers
    users = api("GET", "/api/v1/users").body["users"]
    assert [u["name"] for u in users].count("idem-user") == 1
    # Without the key it is a new request: the user exists.
    assert_error(api("POST", "/api/v1/users", world.idem_body), 409, "conflict")
    # The key belongs to the API key that used it: another key's request is not a replay.
    assert_error(api("POST", "/api/v1/users", world.idem_body, key=world.keys["operator"],
                     headers={"Idempotency-Key": world.idem_key}), 409, "conflict")


def test_reusing_an_idempotency_key_for_another_request_is_not_a_replay(api, world):
    """Before the fix this answered 200 {"deleted": <idem-user>} without deleting anything."""
    err = assert_error(api("DELETE", f"/api/v1/users/{GHOST}", headers={"Idempotency-Key": world.idem_key}),
                       404, "not_found")
    assert GHOST in err["message"]
    assert_error(api("POST", "/api/v1/users", {"name": world.dup_user}, headers={"Idempotency-Key": world.idem_key}),
                 409, "conflict")


# -- agent (machine-signed) routes ---------------------------------------------------------------
def signed(key: SigningKey, method: str, path: str, body: bytes, when: float | None = None) -> dict:
    return sign_headers(key, method, path, body, time.time() if when is None else when, secrets.token_hex(8))


@pytest.mark.parametrize("r", MACHINE_ROUTES, ids=rid)
def test_machine_routes_need_a_valid_signature(api, r):
    path, body = semantic(r)
    raw = b"" if body is None else json.dumps(body).encode()
    machine = SigningKey.generate()
    h = signed(machine, r.method, path, raw)
    variants = [
        ("unsigned", {}),
        ("garbage headers", {k: "garbage" for k in h}),
        ("stale", signed(machine, r.method, path, raw, when=time.time() - 3600)),
        ("other body", signed(machine, r.method, path, raw + b" ")),
        ("other path", signed(machine, r.method, MACHINE + "/elsewhere", raw)),
        ("short nonce", {**signed(machine, r.method, path, raw), HEADER_NONCE: "x"}),
        ("other key", {**h, HEADER_KEY: signed(SigningKey.generate(), r.method, path, raw)[HEADER_KEY]}),
    ]
    for label, headers in variants:
        err = assert_error(api(r.method, path, raw or None, key=None, headers=headers), 401, "unauthenticated")
        assert "signature" in err["message"], (label, err)


def test_signed_requests_from_unknown_machines(api):
    machine = SigningKey.generate()
    for r in MACHINE_ROUTES:
        path, body = semantic(r)
        raw = b"" if body is None else json.dumps(body).encode()
        if r.path == REGISTER:
            for auth_key in ("rmp_bad", f"rmp_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}", "rmk_x_y"):
                raw = json.dumps({**body, "auth_key": auth_key}).encode()
                assert_error(api(r.method, path, raw, key=None, headers=signed(machine, r.method, path, raw)),
                             401, "unauthenticated")
            continue
        headers = signed(machine, r.method, path, raw)
        assert_error(api(r.method, path, raw or None, key=None, headers=headers, replica=0), 404, "not_found")
        err = assert_error(api(r.method, path, raw or None, key=None, headers=headers, replica=0),
                           401, "unauthenticated")
        assert "replay" in err["message"]


# -- across replicas (real Raft) -----------------------------------------------------------------
def test_every_replica_agrees_on_expired_keys_and_replays(shared_cluster):
    """Followers too: an expired key is refused and an Idempotency-Key retry replays the
    leader's answer and creates nothing, whichever replica is asked."""
    api = Api(shared_cluster)
    rep = api("POST", "/api/v1/api-keys", {"name": "expiring", "scopes": ["read"], "expiration_seconds": 1})
    assert rep.status == 201, rep
    expiring = rep.body["key"]
    key, body = "idem-" + secrets.token_hex(8), {"name": "idem-everywhere"}
    first = api("POST", "/api/v1/users", body, headers={"Idempotency-Key": key})
    assert first.status == 201, first
    for i in range(len(api.cluster.replicas)):
        def rejected():
            rep = api("GET", "/api/v1/users", key=expiring, replica=i)
            return rep if rep.status == 401 else None
        err = assert_error(wait_until(rejected, timeout=10, what="the 1 s API key to expire"), 401,
                           "unauthenticated")
        assert "expired" in err["message"]
        for again_body in (body, b'{ "name" :\n "idem-everywhere" }'):
            again = api("POST", "/api/v1/users", again_body, headers={"Idempotency-Key": key}, replica=i)
            assert (again.status, again.body) == (first.status, first.body)
    users = api("GET", "/api/v1/users").body["users"]
    assert [u["name"] for u in users].count("idem-everywhere") == 1
