"""schemathesis against a real replica: every answer is one the OpenAPI document declares.

Generated from /api/v1/openapi.json (routing.openapi()), with valid and invalid requests
per operation, as the admin: no 5xx, every status, content type, header and body as
documented, and invalid requests refused. Bounded: a few examples per operation, one
single-replica cluster (writes commit at once), about a minute and over 2,000 requests
(positive and negative data) in all; afterwards the replica must still serve and its audit
chain verify. RAFTMESH_FUZZ_EXAMPLES raises the examples per operation for the long run
(docs/chaos.md, "API fuzzing"). Not stateful: the document declares no links between
operations for schemathesis to follow.
"""
from __future__ import annotations

import collections
import os

import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance)

import raftmesh.api.server  # noqa: F401  (registers every route)
from raftmesh.api import responses, routing
from raftmesh.cli.main import main as cli_main

DOC = routing.openapi()
EXAMPLES = int(os.environ.get("RAFTMESH_FUZZ_EXAMPLES", "20"))  # per operation and phase
MIN_REQUESTS = 2_000  # the bound for the CI run
SENT: collections.Counter = collections.Counter()  # requests by data mode (positive, negative)


@schemathesis.check
def body_is_documented(ctx, response, case) -> None:
    """The schema checks pass vacuously for an answer the document gives no body schema."""
    media = response.headers.get("content-type", [""])[0].split(";")[0]
    operation = DOC["paths"][case.operation.path].get(case.method.lower())
    if operation is None:  # schemathesis probing a method the path does not serve
        assert (response.status_code, media) == (405, "application/json"), response.status_code
        jsonschema.validate(response.json(), responses.ERROR)
        return
    declared = operation["responses"]
    schema = declared.get(str(response.status_code), {}).get("content", {}).get(media, {}).get("schema")
    assert schema, f"{case.method} {case.operation.path}: {response.status_code} {media} has no schema"


# Not negative_data_rejection: it blames the server for parts of an invalid case that the
# HTTP client drops (a query parameter set to None) or that we add (the admin's key);
# tests/test_api_bad_input.py checks every refusal route by route instead.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, body_is_documented]
# Membership changes would cut the one replica off from its quorum for the rest of the run.
schema = schemathesis.openapi.from_dict(DOC).exclude(path_regex="^/api/v1/cluster/members")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_answers_match_the_document(single_replica, case):
    SENT[str(getattr(case.meta.generation, "mode", "unknown")) if case.meta else "unknown"] += 1
    case.call_and_validate(base_url=single_replica.replicas[0].api_url, checks=CHECKS, timeout=15,
                           headers={"Authorization": f"Bearer {single_replica.admin_key}"})


def test_the_fuzzing_was_large_and_left_the_replica_healthy(single_replica, capsys):
    """Runs after the generated tests (file order): it judges the whole run."""
    if not SENT:
        pytest.skip("the generated tests did not run in this session")
    with capsys.disabled():
        print(f"\nschemathesis: {sum(SENT.values())} requests, {dict(SENT)}")
    assert sum(SENT.values()) >= MIN_REQUESTS * min(EXAMPLES, 20) // 20, dict(SENT)
    assert {"positive", "negative"} <= set(SENT), dict(SENT)
    replica = single_replica.replicas[0]
    assert single_replica.request(replica, "GET", "/readyz")[0] == 200
    status, body = single_replica.request(replica, "POST", "/api/v1/users", {"name": "after-fuzzing"})
    assert status == 201, body
    rc = cli_main(["--server", replica.api_url, "--api-key", single_replica.admin_key, "audit", "verify"])
    out = capsys.readouterr().out
    assert rc == 0 and "verified" in out, out
