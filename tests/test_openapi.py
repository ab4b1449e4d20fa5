"""/api/v1/openapi.json describes exactly what the server does.

Every documented operation is served; every route the real aiohttp app registers is
documented; `x-required-scope` is what the server enforces; request-body schemas reject
what the server rejects (checked with the document's own schemas, not the route table's).
Nothing here changes state: requests that pass authentication are stopped by an unknown
query parameter or aimed at resources that do not exist.
"""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import jsonschema
import openapi_spec_validator
import pytest

import raftmesh.api.server as server
from raftmesh.api import openapi_links, routing
from raftmesh.api.errors import ERROR_CODES
from in_memory_api import ServedInMemory
from raftmesh.proto.numbers import MAX_SAFE_INTEGER
from test_api_bad_input import (ADMIN, GHOST, GRANTS, LIMITED_KEYS, Api, assert_error, concrete,
                                names, quick_state, sample, wrong_values)

DOC = routing.openapi()  # what the server generates; the served copy is compared below
OPS = [(path, method, op) for path, ops in DOC["paths"].items() for method, op in ops.items()]
SCOPE_KEY = {"read": "read", "write": "operator", "audit": "audit"}  # least key holding a scope


def oid(op) -> str:
    return f"{op[1].upper()} {op[0]}"


def json_body_schema(op: dict) -> dict | None:
    return op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Api:
    """The real app on the in-memory Raft: what is checked here does not need replication."""
    with ServedInMemory(str(tmp_path_factory.mktemp("openapi"))) as served:
        yield Api(served)


@pytest.fixture(scope="module")
def keys(api) -> dict[str, str]:
    """Deliberate setup writes: limited API keys and one user (for a conflict)."""
    out = {}
    for name, scopes in LIMITED_KEYS.items():
        rep = api("POST", "/api/v1/api-keys", {"name": name, "scopes": scopes})
        assert rep.status == 201, rep
        out[name] = rep.body["key"]
    assert api("POST", "/api/v1/users", {"name": "existing"}).status == 201
    return out


@pytest.fixture(autouse=True)
def unchanged(api, keys):
    before = quick_state(api)
    yield
    assert quick_state(api) == before, "a request in this test changed the state"


def test_served_document_is_the_generated_one_and_valid(api):
    rep = api("GET", "/api/v1/openapi.json", key=None)
    assert rep.status == 200 and rep.headers["Content-Type"].startswith("application/json")
    assert rep.body == json.loads(json.dumps(DOC))
    assert rep.body["openapi"].startswith("3.1")
    openapi_spec_validator.validate(rep.body)


def test_document_lists_exactly_the_registered_routes():
    """Compare with the routes of the app the server really builds (not the route table)."""
    config = SimpleNamespace(max_body_bytes=1 << 20, write_timeout=5.0, oidc_issuer="",
                             cluster_secret="stub-cluster-secret", register_batch=1,
                             raft_addr="127.0.0.1:1")
    stub = SimpleNamespace(config=config, status={},
                           add_apply_listener=lambda fn: None, add_reset_listener=lambda fn: None,
                           add_propose_listener=lambda fn: None)
    app = server.build_app(stub)
    registered = {(r.method, r.resource.canonical) for r in app.router.routes()
                  if r.method != "HEAD" and r.resource is not None}
    documented = {(m.upper(), p) for p, ops in DOC["paths"].items() for m in ops}
    api_routes = {(m, p) for m, p in registered if p.startswith("/api/")}
    assert api_routes <= documented, f"served but undocumented: {sorted(api_routes - documented)}"
    assert documented <= registered, f"documented but not served: {sorted(documented - registered)}"
    undocumented = {p for _, p in registered - documented}
    # SCIM describes itself (/scim/v2/ServiceProviderConfig, Schemas, ResourceTypes); the
    # console's pages and its sign-in are the browser's (docs/console.md), not the API.
    assert undocumented <= {"/healthz", "/readyz", "/metrics", "/scim/v2", "/scim/v2/{tail}", "/ui",
                            "/ui/", "/ui/session", "/ui/sso", "/ui/{name}"}, undocumented
    assert len({op["operationId"] for _, _, op in OPS}) == len(OPS), "operationIds must be unique"


@pytest.mark.parametrize("op", OPS, ids=oid)
def test_every_documented_operation_is_served(api, op):
    path, method, spec = op
    # With proper credentials the route is reached: it then refuses the unknown query parameter.
    err = assert_error(api(method.upper(), concrete(path) + "?served_probe=1"), 400, "bad_request")
    assert "served_probe" in err["message"], err
    for p in spec.get("parameters", []):
        assert p["in"] in ("path", "query", "header")
        if p["in"] == "path":
            assert "{" + p["name"] + "}" in path
    assert set(re.findall(r"{(\w+)}", path)) == {p["name"] for p in spec.get("parameters", []) if p["in"] == "path"}


@pytest.mark.parametrize("op", OPS, ids=oid)
def test_required_scope_is_what_the_server_enforces(api, keys, op):
    path, method, spec = op
    url = concrete(path)
    scope = spec.get("x-required-scope")
    if scope is None:
        assert "security" not in spec
        err = assert_error(api(method.upper(), url + "?scope_probe=1", key=None), 400, "bad_request")
        assert "scope_probe" in err["message"]  # no API key needed to get past authentication
        return
    assert scope in ("read", "write", "audit", "admin") and spec["security"] == [{"apiKey": []}]
    assert_error(api(method.upper(), url, key=None), 401, "unauthenticated")
    for name, scopes in LIMITED_KEYS.items():
        if scope in set().union(*(GRANTS[s] for s in scopes)):
            assert_error(api(method.upper(), url + "?scope_probe=1", key=keys[name]), 400, "bad_request")
        else:
            assert_error(api(method.upper(), url, key=keys[name]), 403, "forbidden")
    least = keys[SCOPE_KEY[scope]] if scope in SCOPE_KEY else ADMIN
    assert_error(api(method.upper(), url + "?scope_probe=1", key=least), 400, "bad_request")


LINKS = [(op, status, link) for op in OPS for status, answer in op[2]["responses"].items()
         for link in answer.get("links", {}).values()]
BY_ID = {op["operationId"]: (path, method, op) for path, method, op in OPS}


def linked(source: str, target: str) -> dict:
    """The link from operation `source` to `target` ("METHOD /path"), or {} if none."""
    return next((link for op, _, link in LINKS if oid(op) == source
                 and oid(BY_ID[link["operationId"]]) == target), {})


@pytest.mark.parametrize("link", LINKS, ids=lambda link: f"{oid(link[0])} -> {link[2]['operationId']}")
def test_every_link_gives_its_target_inputs_the_source_has(link):
    """What schemathesis' stateful phase follows: each link names an operation, gives every
    path parameter of it, and takes each value from a field the source's answer declares
    (or from the source's own path)."""
    (path, _, spec), status, link = link
    target_path, _, target = BY_ID[link["operationId"]]
    declared = {p["name"]: p["in"] for p in target.get("parameters", [])}
    given = link.get("parameters", {})
    assert set(re.findall(r"{(\w+)}", target_path)) <= set(given) <= set(declared), (given, declared)
    assert given or link.get("requestBody")
    answer = spec["responses"][status]["content"]["application/json"]["schema"]
    for expression in [*given.values(), *([link["requestBody"]] if "requestBody" in link else [])]:
        if expression.startswith("$request.path."):
            assert "{" + expression.removeprefix("$request.path.") + "}" in path, expression
        else:
            pointer = expression.removeprefix("$response.body#")
            assert pointer != expression and openapi_links.schema_at(answer, pointer), expression


def test_links_follow_each_resource_through_its_lifecycle():
    assert linked("POST /api/v1/users", "GET /api/v1/users/{name}")["parameters"] == {
        "name": "$response.body#/user/name"}
    assert linked("POST /api/v1/users", "DELETE /api/v1/users/{name}")
    assert linked("GET /api/v1/users/{name}", "POST /api/v1/users/{name}/lock")["parameters"] == {
        "name": "$request.path.name"}
    assert linked("POST /api/v1/preauth-keys", "DELETE /api/v1/preauth-keys/{id}")["parameters"] == {
        "id": "$response.body#/preauth_key/id"}
    assert linked("POST /api/v1/api-keys", "DELETE /api/v1/api-keys/{id}")
    assert linked("GET /api/v1/nodes", "PATCH /api/v1/nodes/{id}")["parameters"] == {
        "id": "$response.body#/nodes/0/id"}
    assert linked("POST /api/v1/nodes/{id}/approve", "GET /api/v1/nodes/{id}")
    assert linked("GET /api/v1/policy", "PUT /api/v1/policy") == {
        "operationId": "put_api_v1_policy", "requestBody": "$response.body#/policy/text",
        "parameters": {"expected_version": "$response.body#/policy/version"}}
    assert linked("GET /api/v1/dns", "PUT /api/v1/dns")["requestBody"] == "$response.body#/settings"
    # Not "delete the first listed": a client following that would delete its own API key.
    assert not linked("GET /api/v1/api-keys", "DELETE /api/v1/api-keys/{id}")
    assert not linked("GET /api/v1/nodes", "DELETE /api/v1/nodes/{id}")
    assert linked("GET /api/v1/nodes/{id}", "DELETE /api/v1/nodes/{id}")
    # A deleted resource leads nowhere; operations on other resources are not linked.
    assert not [link for op, _, link in LINKS if op[1] == "delete"]
    assert not linked("POST /api/v1/users", "GET /api/v1/nodes/{id}")


@pytest.mark.parametrize("op", OPS, ids=oid)
def test_documented_responses(op):
    _, method, spec = op
    text = " ".join(r["description"] for r in spec["responses"].values())
    for code, (status, _) in ERROR_CODES.items():
        assert str(status) in spec["responses"] and f"{code}:" in text
    assert any(s.startswith("2") or s == "101" for s in spec["responses"])  # 101: a WebSocket
    if method.upper() in routing.WRITE_METHODS:
        idem = [p for p in spec["parameters"] if p["name"] == "Idempotency-Key"]
        assert idem and idem[0]["schema"]["maxLength"] == routing.IDEMPOTENCY_KEY_MAX


def integer_schemas(schema):
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            yield schema
        for sub in [*schema.get("properties", {}).values(), *schema.get("prefixItems", []), schema.get("items")]:
            yield from integer_schemas(sub)


@pytest.mark.parametrize("op", OPS, ids=oid)
def test_answers_and_enforced_limits_are_documented(op):
    """What the server answers and refuses beyond the route's own schemas: a success body
    schema, the error object for every error, the replay header on writes, the I-JSON
    integer range (refused while decoding) and non-empty text bodies."""
    path, method, spec = op
    for status, response in spec["responses"].items():
        (media, content), = response["content"].items()
        assert content["schema"], (status, media)
        if not (status.startswith("2") or status == "101"):  # 101: the relay's WebSocket
            assert (media, content["schema"]) == ("application/json", {"$ref": "#/components/schemas/Error"})
    if method.upper() in routing.WRITE_METHODS:
        success = next(r for s, r in spec["responses"].items() if s.startswith("2"))
        assert success["headers"][routing.REPLAYED_HEADER]["schema"]["enum"] == ["true"]
    schemas = [p["schema"] for p in spec.get("parameters", []) if p["in"] == "query"]
    schemas += [c["schema"] for c in spec.get("requestBody", {}).get("content", {}).values()]
    for schema in schemas:
        for integer in integer_schemas(schema):
            assert -MAX_SAFE_INTEGER <= integer["minimum"] <= integer["maximum"] <= MAX_SAFE_INTEGER
    for media, content in spec.get("requestBody", {}).get("content", {}).items():
        if media == "text/plain":
            assert content["schema"]["minLength"] == 1
    for p in spec.get("parameters", []):
        if p["in"] == "path":
            assert p["schema"]["minLength"] == 1


BODY_OPS = [op for op in OPS if json_body_schema(op[2]) is not None]


def beyond_json_int(value) -> bool:
    return type(value) is int and abs(value) > MAX_SAFE_INTEGER


@pytest.mark.parametrize("op", BODY_OPS, ids=oid)
def test_body_schema_rejects_what_the_server_rejects(api, op):
    path, method, spec = op
    schema = json_body_schema(spec)
    validator = jsonschema.Draft202012Validator(schema)
    good = sample(schema)
    bad = [("array", []), ("unknown field", {**good, "surprise": 1})]
    bad += [(f"without {f}", {k: v for k, v in good.items() if k != f}) for f in schema.get("required", [])]
    bad += [(f"{f}: {label}", {**good, f: v}) for f, s in schema["properties"].items() for label, v in wrong_values(s)]
    for label, body in bad:
        assert not validator.is_valid(body), f"document accepts {label}"
        if isinstance(body, dict) and any(map(beyond_json_int, body.values())):
            # the documented I-JSON bound: refused while decoding, before the schema
            err = assert_error(api(method.upper(), concrete(path), body), 400, "bad_request")
            assert "out of range" in err["message"], (label, err)
            continue
        err = assert_error(api(method.upper(), concrete(path), body), 400, "validation_failed")
        if ":" in label:
            assert names(err, label.split(":")[0]), (label, err)


# Bodies the document accepts, sent where they cannot change anything: the server must not
# call them invalid (it answers with what the state says instead).
ACCEPTED = [
    ("POST", "/api/v1/users", {"name": "existing", "display_name": "x" * 200}, 409),
    ("POST", "/api/v1/preauth-keys", {"user": GHOST, "expiration_seconds": 315360000, "tags": [],
                                       "reusable": True, "usage_limit": 3, "ephemeral": False}, 404),
    ("PATCH", "/api/v1/nodes/{id}", {"name": "n" * 63, "tags": []}, 404),
    ("PUT", "/api/v1/nodes/{id}/routes", {"approved_routes": ["10.0.0.0/8", "fd00::/8"]}, 404),
]


@pytest.mark.parametrize("method,path,body,status", ACCEPTED, ids=[f"{m} {p}" for m, p, _, _ in ACCEPTED])
def test_bodies_the_document_accepts_are_not_invalid(api, method, path, body, status):
    schema = json_body_schema(DOC["paths"][path][method.lower()])
    jsonschema.Draft202012Validator(schema).validate(body)
    assert_error(api(method, concrete(path), body), status)


def test_usage_limit_rule_is_in_the_document(api):
    body = {"user": GHOST, "usage_limit": 3}
    server_says = api("POST", "/api/v1/preauth-keys", body)
    assert_error(server_says, 400, "validation_failed")
    schema = json_body_schema(DOC["paths"]["/api/v1/preauth-keys"]["post"])
    assert not jsonschema.Draft202012Validator(schema).is_valid(body)


EDGE_VALUES = [True, False, 0, 1, -1, 1.0, 0.5, -0.0, 1e300, 2**53, "", "a", "A", "a\n", "a" * 63,
               "a" * 64, "é", "tag:a", "tag:a\n", "10.0.0.0/8", None, [], {}, ["x"], ["x", "x"],
               [1, True], [True, 1], [1, 1.0], ["tag:a", "tag:b"], ["read", "read"], ["admin"],
               [[1, 0.5]], [[1.0, 0.5]], [[True, 0]], [[1, 0.5, 3]], [[1]], [[-1, 0]], [[1, 86401]],
               [[1, "0"]], [[1, None]], [[1, 2], [3]]]


def test_fast_body_check_only_accepts_what_jsonschema_accepts():
    """routing._fast_check is a shortcut for bodies that are certainly valid: whenever it says
    yes, jsonschema must agree (when it says no, jsonschema decides and words the errors)."""
    import random
    rng = random.Random(7)
    covered = []
    for r in routing.ROUTES:
        if r.body is None or r.body.get("x-raw-text") or routing._fast_check(r.body) is None:
            continue
        fast, validator = routing._fast_check(r.body), jsonschema.Draft202012Validator(r.body)
        good, props = sample(r.body), r.body["properties"]
        assert fast(good), (r.path, good)  # the usual body takes the shortcut
        bodies = [good, [], "x", None, 1, {**good, "surprise": 1}]
        bodies += [{k: v for k, v in good.items() if k != f} for f in r.body.get("required", [])]
        bodies += [{**good, f: v} for f, s in props.items() for _, v in wrong_values(s)]
        bodies += [{**good, f: v} for f in props for v in EDGE_VALUES]
        for _ in range(300):  # random mixtures of fields and values
            names = rng.sample(sorted(props) + ["surprise"], rng.randint(0, len(props) + 1))
            bodies.append({n: rng.choice(EDGE_VALUES + [sample(props[n]) if n in props else 1])
                           for n in names})
        for body in bodies:
            assert not fast(body) or validator.is_valid(body), (r.method, r.path, body)
        covered.append(f"{r.method} {r.path}")
    assert {"POST /api/v1/users", "POST /machine/ack"} <= set(covered) and len(covered) >= 5, covered
