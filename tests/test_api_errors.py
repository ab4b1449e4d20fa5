"""Bad input on every admin route gets the documented error and changes nothing.

The matrix is built from the route table itself, so a new endpoint is covered as soon as
it is registered.
"""
import re
import secrets

import pytest

import raftmesh.api.admin  # noqa: F401  (registers the routes)
import raftmesh.api.agent_api  # noqa: F401
from raftmesh.api.errors import ERROR_CODES
from raftmesh.api.routing import ROUTES

ADMIN_ROUTES = [r for r in ROUTES if r.path.startswith("/api/v1") and r.needs is not None]
BODY_ROUTES = [r for r in ADMIN_ROUTES if r.body is not None and not r.body.get("x-raw-text")]
SCOPE_FOR = {"read": "audit", "write": "read", "audit": "read", "admin": "operator"}


def concrete(path: str) -> str:
    return re.sub(r"{\w+}", "nonexistent-id", path)


def ids(routes):
    return [f"{r.method} {r.path}" for r in routes]


def assert_error(status, body, want_status, want_code=None):
    assert status == want_status, body
    assert isinstance(body, dict) and set(body["error"]) >= {"code", "message"}, body
    assert body["error"]["code"] in ERROR_CODES
    if want_code:
        assert body["error"]["code"] == want_code, body


@pytest.fixture(scope="module")
def c(shared_cluster):
    return shared_cluster


@pytest.fixture(scope="module")
def state(c):
    """A fingerprint of everything the API can show; compared after the bad inputs."""
    def fingerprint():
        out = {}
        for path in ("/api/v1/users", "/api/v1/nodes", "/api/v1/preauth-keys", "/api/v1/api-keys",
                     "/api/v1/policy/versions"):
            status, body = c.request(c.replicas[0], "GET", path)
            assert status == 200
            out[path] = {k: v for k, v in body.items() if k != "version"}
        out["audit_head"] = c.request(c.replicas[0], "GET", "/api/v1/audit?limit=1")[1]["head"]
        return out
    return fingerprint


@pytest.fixture(scope="module")
def scoped_keys(c):
    keys = {}
    for scope in ("read", "audit", "operator"):
        status, body = c.request(c.replicas[0], "POST", "/api/v1/api-keys", {"name": scope, "scopes": [scope]})
        assert status == 201
        keys[scope] = body["key"]
    return keys


@pytest.fixture(scope="module")
def baseline(c, scoped_keys, state):
    return state()


@pytest.mark.parametrize("route", ADMIN_ROUTES, ids=ids(ADMIN_ROUTES))
def test_authentication_is_required(c, baseline, route):
    path = concrete(route.path)
    req = lambda key: c.request(c.replicas[1], route.method, path, key=key)
    for key in ("", "garbage", f"rmk_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}",
                c.admin_key.rsplit("_", 1)[0] + "_" + secrets.token_urlsafe(32)):
        status, body = req(key) if key else c.request(c.replicas[1], route.method, path,
                                                      headers={"Authorization": ""})
        assert_error(status, body, 401, "unauthenticated")


@pytest.mark.parametrize("route", ADMIN_ROUTES, ids=ids(ADMIN_ROUTES))
def test_insufficient_scope_is_forbidden(c, baseline, scoped_keys, route):
    key = scoped_keys[SCOPE_FOR[route.needs]]
    status, body = c.request(c.replicas[2], route.method, concrete(route.path), key=key,
                             body={} if route.body is not None and not route.body.get("x-raw-text") else None)
    assert_error(status, body, 403, "forbidden")


@pytest.mark.parametrize("route", BODY_ROUTES, ids=ids(BODY_ROUTES))
def test_bodies_are_validated_field_by_field(c, baseline, route):
    path = concrete(route.path)
    send = lambda raw, ctype="application/json": c.request(
        c.replicas[0], route.method, path, body=raw, headers={"Content-Type": ctype})
    assert_error(*send("{not json"), 400, "bad_request")
    for wrong in ("[]", '"text"', "42", "null"):
        assert_error(*send(wrong), 400, "validation_failed")
    status, body = c.request(c.replicas[0], route.method, path, {"surprise": 1})
    assert_error(status, body, 400, "validation_failed")
    assert "surprise" in body["error"]["message"]
    for field in route.body.get("required", []):
        status, body = c.request(c.replicas[0], route.method, path, {})
        assert_error(status, body, 400, "validation_failed")
        assert field in body["error"]["message"]
    for field, schema in route.body["properties"].items():
        wrong = {"string": 12345, "integer": "twelve", "boolean": "yes", "array": "not-a-list",
                 "number": "NaN?"}.get(schema.get("type"), {"nested": "object"})
        status, body = c.request(c.replicas[0], route.method, path, {field: wrong})
        assert_error(status, body, 400, "validation_failed")
        assert any(d["field"] == field for d in body["error"]["details"]), body
    huge = '{"name": "' + "x" * (1 << 20) + '"}'
    assert_error(*send(huge), 413, "payload_too_large")


QUERY_ROUTES = [r for r in ADMIN_ROUTES if r.method == "GET"]


@pytest.mark.parametrize("route", QUERY_ROUTES, ids=ids(QUERY_ROUTES))
def test_unknown_and_badly_typed_query_parameters(c, baseline, route):
    path = concrete(route.path)
    assert_error(*c.request(c.replicas[0], "GET", path + "?bogus=1"), 400, "bad_request")
    for name, schema in route.query.items():
        if schema.get("type") in ("boolean", "integer", "number"):
            assert_error(*c.request(c.replicas[0], "GET", f"{path}?{name}=notanumber"), 400, "bad_request")


def test_unknown_routes_and_methods_are_json_errors(c, baseline):
    assert_error(*c.request(c.replicas[0], "GET", "/api/v1/nope"), 404, "not_found")
    assert_error(*c.request(c.replicas[0], "PATCH", "/api/v1/users"), 405, "method_not_allowed")
    assert_error(*c.request(c.replicas[0], "POST", "/api/v1/users", {"name": "a"},
                            headers={"Idempotency-Key": "k" * 200}), 400, "bad_request")


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/v1/users/ghost"), ("DELETE", "/api/v1/users/ghost"), ("GET", "/api/v1/nodes/ghost"),
    ("PATCH", "/api/v1/nodes/ghost"), ("DELETE", "/api/v1/nodes/ghost"), ("POST", "/api/v1/nodes/ghost/approve"),
    ("POST", "/api/v1/nodes/ghost/expire"), ("DELETE", "/api/v1/preauth-keys/ghost"),
    ("DELETE", "/api/v1/api-keys/ghost"), ("DELETE", "/api/v1/cluster/members/ghost")])
def test_missing_resources_are_404(c, baseline, method, path):
    body = {"name": "new-name"} if method == "PATCH" else None
    assert_error(*c.request(c.replicas[1], method, path, body), 404, "not_found")


def test_nothing_changed(c, baseline, state):
    """Runs last in this module: every refused request above left the state as it was."""
    assert state() == baseline


def test_duplicate_and_idempotent_writes(c, state):
    assert c.request(c.replicas[0], "POST", "/api/v1/users", {"name": "dup"})[0] == 201
    assert_error(*c.request(c.replicas[1], "POST", "/api/v1/users", {"name": "dup"}), 409, "conflict")
    before = state()
    first = c.request(c.replicas[0], "POST", "/api/v1/users", {"name": "once"}, headers={"Idempotency-Key": "x1"})
    again = c.request(c.replicas[2], "POST", "/api/v1/users", {"name": "once"}, headers={"Idempotency-Key": "x1"})
    assert first[0] == again[0] == 201 and first[1] == again[1]
    after = state()
    assert after["audit_head"]["seq"] == before["audit_head"]["seq"] + 1, "applied exactly once"


def test_openapi_describes_exactly_the_served_routes(c):
    status, doc = c.request(c.replicas[0], "GET", "/api/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == {(r.method, r.path) for r in ROUTES}
    for method, path in documented:
        status, body = c.request(c.replicas[0], method, concrete(path), body=None)
        assert status not in (405, 500), (method, path, body)
        if status == 404:
            assert body["error"]["message"] != f"no route {concrete(path)}", (method, path)
    for r in ADMIN_ROUTES:
        assert doc["paths"][r.path][r.method.lower()]["x-required-scope"] == r.needs
