"""A create retried with its Idempotency-Key hands out the credential it created.

Found by the chaos campaign (seed 6, 5 replicas): the workload's pre-auth key create got
`503 outcome_unknown`, its retry on another replica was answered with the first attempt's
record, but with a token minted for the retry, so every replica answered the workload's
registrations `401 unknown pre-auth key`."""
from __future__ import annotations

import pytest

from conftest import wait_until


def created(c, r, path, body, idem=None):
    """The 201 answer (retrying the same request while an election makes it 503)."""
    headers = {"Idempotency-Key": idem} if idem else {}
    return wait_until(lambda: (lambda a: a[1] if a[0] == 201 else None)(
        c.request(r, "POST", path, body, headers=headers)), 20, what=f"POST {path}")


@pytest.mark.timeout(90)
def test_a_retried_create_returns_the_same_working_credential_from_any_replica(make_cluster):
    c = make_cluster(3)
    r1, r2, r3 = c.replicas
    created(c, r1, "/api/v1/users", {"name": "owner"})
    body = {"user": "owner", "reusable": True}
    first = created(c, r1, "/api/v1/preauth-keys", body, "pak-1")
    retry = created(c, r2, "/api/v1/preauth-keys", body, "pak-1")
    assert retry["key"] == first["key"] and retry["preauth_key"]["id"] == first["preauth_key"]["id"]
    assert retry["key"].split("_")[1] == retry["preauth_key"]["id"], "the token names the record"
    assert created(c, r1, "/api/v1/preauth-keys", body, "pak-2")["key"] != first["key"], "another request"
    assert created(c, r1, "/api/v1/preauth-keys", body)["key"] != first["key"], "no key: a random token"

    spec = {"name": "ops", "scopes": ["read"]}
    first = created(c, r1, "/api/v1/api-keys", spec, "apikey-1")
    retry = created(c, r3, "/api/v1/api-keys", spec, "apikey-1")
    assert retry["key"] == first["key"]
    assert wait_until(lambda: c.request(r3, "GET", "/api/v1/users", key=retry["key"])[0] == 200, 20,
                      what="the retried token to authenticate")
