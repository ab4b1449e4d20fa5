"""schemathesis against a real replica: every answer is one the OpenAPI document declares.

Generated from /api/v1/openapi.json (routing.openapi()), with valid and invalid requests
per operation, as the admin: no 5xx, every status, content type, header and body as
documented, and invalid requests refused. Then stateful: scenarios that follow the
document's links (create a user, then read, lock or delete that user; read the policy,
then replace it at the version read; approve, rename or delete a registered node...),
checked the same way and also for a resource still served after its deletion or missing
right after its creation. Bounded: a few examples per operation and 56 scenarios of at
most 10 steps, one single-replica cluster (writes commit at once), about a minute and
over 2,000 requests in all; afterwards the replica must still serve and its audit
chain verify. RAFTMESH_FUZZ_EXAMPLES raises the examples per operation, and the scenarios
with them, for the long run (docs/chaos.md, "API fuzzing").
"""
from __future__ import annotations

import base64
import collections
import json
import os

import jsonschema
import pytest
import schemathesis
import hypothesis
from hypothesis import HealthCheck, Phase, settings
from nacl.public import PrivateKey
from nacl.signing import SigningKey
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (content_type_conformance, ensure_resource_availability,
                                               response_headers_conformance,
                                               response_schema_conformance, status_code_conformance,
                                               use_after_free)

import raftmesh.api.server  # noqa: F401  (registers every route)
from raftmesh.agent.control_client import ControlClient
from raftmesh.api import responses, routing
from raftmesh.cli.main import main as cli_main
from raftmesh.proto.routes import REGISTER

DOC = routing.openapi()
EXAMPLES = int(os.environ.get("RAFTMESH_FUZZ_EXAMPLES", "14"))  # per operation and phase
SCENARIOS = 4 * EXAMPLES  # stateful: link-following sequences of up to STEPS requests
STEPS = 10
MIN_REQUESTS = 2_000  # the bound for the CI run
SENT: collections.Counter = collections.Counter()  # requests: positive, negative, stateful
RUNS: collections.Counter = collections.Counter()  # stateful scenarios, restarts (Flaky)
FAILURES: list[str] = []  # of the stateful phase
PENDING_NODES = 6  # registered before the scenarios, so the node links lead somewhere
POLICY = json.dumps({"tagOwners": {"tag:fuzzed": ["admin@example.com"]},
                     "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]})


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
# A deletion must stick and a creation be readable at once (one replica, linearizable reads).
STATEFUL_CHECKS = CHECKS + [use_after_free, ensure_resource_availability]


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_answers_match_the_document(single_replica, case):
    SENT[str(getattr(case.meta.generation, "mode", "unknown")) if case.meta else "unknown"] += 1
    case.call_and_validate(base_url=single_replica.replicas[0].api_url, checks=CHECKS, timeout=15,
                           headers={"Authorization": f"Bearer {single_replica.admin_key}"})


class Workflows(schema.as_state_machine()):
    """The stateful phase: scenarios chained by the document's links, checked like the rest."""

    base_url = ""
    headers: dict[str, str] = {}

    def get_call_kwargs(self, case):
        return {"base_url": self.base_url, "headers": self.headers, "timeout": 15}

    def call(self, case, **kwargs):
        try:
            return super().call(case, **kwargs)
        except Exception as error:  # no answer at all: kept even if hypothesis cannot replay it
            FAILURES.append(f"{case.method} {case.formatted_path}: no answer: {error!r}")
            raise

    def after_call(self, response, case):
        super().after_call(response, case)
        SENT["stateful"] += 1

    def teardown(self):
        super().teardown()
        RUNS["scenarios"] += 1

    def validate_response(self, response, case, additional_checks=None, **kwargs):
        """Collects a failure instead of raising it: hypothesis would replay the scenario to
        shrink it, against a server whose state the first run already changed."""
        try:
            case.validate_response(response, checks=STATEFUL_CHECKS, transport_kwargs=kwargs,
                                   recorder=self.recorder)
        except FailureGroup as group:
            FAILURES.append(f"{case.method} {case.formatted_path}: " + "\n".join(
                str(failure) for failure in group.exceptions))


@pytest.fixture(scope="module")
def linked_resources(single_replica) -> None:
    """What the links start from besides what scenarios create: a policy (read, then stored
    again at the version read) and nodes waiting for approval, each advertising a route."""
    replica = single_replica.replicas[0]
    assert single_replica.request(replica, "PUT", "/api/v1/policy", POLICY)[0] == 200
    for i in range(PENDING_NODES):
        agent = ControlClient([replica.api_url], SigningKey.generate())
        node_key = base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()
        agent.call("POST", REGISTER, {"node_key": node_key, "hostname": f"fuzzed-{i}",
                                      "advertised_routes": [f"10.77.{i}.0/24"]})


@pytest.mark.timeout(60 + SCENARIOS * STEPS)  # a second a request at worst; ~0.03 s is usual
def test_workflows_along_the_links_match_the_document(single_replica, linked_resources):
    """Like schemathesis' own runner: when the server's state (changed by earlier scenarios)
    makes hypothesis draw differently than it did for the same choices before, start over
    with the next seed; failures are collected, never replayed to shrink."""
    Workflows.base_url = single_replica.replicas[0].api_url
    Workflows.headers = {"Authorization": f"Bearer {single_replica.admin_key}"}
    for seed in range(SCENARIOS):
        left = SCENARIOS - RUNS["scenarios"]
        if left <= 0:
            break
        try:
            hypothesis.seed(seed)(Workflows).run(settings=settings(
                max_examples=left, stateful_step_count=STEPS, phases=[Phase.generate],
                deadline=None, database=None, suppress_health_check=list(HealthCheck)))
        except hypothesis.errors.FlakyStrategyDefinition:
            RUNS["restarts"] += 1
    assert not FAILURES, f"{len(FAILURES)} failures; the first:\n{FAILURES[0]}"
    assert RUNS["scenarios"] >= SCENARIOS and SENT["stateful"] >= 2 * SCENARIOS, (dict(SENT), RUNS)


def test_the_fuzzing_was_large_and_left_the_replica_healthy(single_replica, capsys):
    """Runs after the generated tests (file order): it judges the whole run."""
    if not SENT:
        pytest.skip("the generated tests did not run in this session")
    with capsys.disabled():
        print(f"\nschemathesis: {sum(SENT.values())} requests, {dict(SENT)}; stateful: {dict(RUNS)}")
    assert sum(SENT.values()) >= MIN_REQUESTS * min(EXAMPLES, 14) // 14, dict(SENT)
    assert {"positive", "negative", "stateful"} <= set(SENT), dict(SENT)
    replica = single_replica.replicas[0]
    assert single_replica.request(replica, "GET", "/readyz")[0] == 200
    status, body = single_replica.request(replica, "POST", "/api/v1/users", {"name": "after-fuzzing"})
    assert status == 201, body
    rc = cli_main(["--server", replica.api_url, "--api-key", single_replica.admin_key, "audit", "verify"])
    out = capsys.readouterr().out
    assert rc == 0 and "verified" in out, out
