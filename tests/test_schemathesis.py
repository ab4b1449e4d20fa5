"""schemathesis against a real replica: every answer is one the OpenAPI document declares.

Generated from /api/v1/openapi.json (routing.openapi()), with valid and invalid requests
per operation, as the admin: no 5xx, every status, content type, header and body as
documented, and invalid requests refused. Bounded: a few examples per operation, one
single-replica cluster (writes commit at once), about a minute in all.
"""
from __future__ import annotations

import jsonschema
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance)

import raftmesh.api.server  # noqa: F401  (registers every route)
from raftmesh.api import responses, routing

DOC = routing.openapi()


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
@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_answers_match_the_document(single_replica, case):
    case.call_and_validate(base_url=single_replica.replicas[0].api_url, checks=CHECKS, timeout=15,
                           headers={"Authorization": f"Bearer {single_replica.admin_key}"})
