"""ID token checks of the relying party (api/oidc.py), one bad token at a time, and the
provider being unreachable: each is refused with a clear error."""
from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.request

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, OctKey, RSAKey
from nacl.signing import SigningKey

from in_memory_api import ServedInMemory
from raftmesh.agent.control_client import ControlClient, ControlError
from raftmesh.api.errors import APIError
from raftmesh.api.oidc import RelyingParty
from raftmesh.cluster.config import ConfigError, ReplicaConfig
from raftmesh.lab.local_cluster import free_ports
from raftmesh.proto.routes import REGISTER

ISSUER, CLIENT, NONCE = "https://idp.example.com", "raftmesh", "the-nonce"
KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"})
OTHER_KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"})


def relying_party(**settings) -> RelyingParty:
    config = ReplicaConfig(id="r1", raft_addr="127.0.0.1:1", peers=[], oidc_issuer=ISSUER,
                           oidc_client_id=CLIENT, oidc_client_secret="s", **settings)
    rp = RelyingParty(config)
    rp._metadata = {"issuer": ISSUER, "jwks_uri": "unused"}
    rp._keys = KeySet([KEY])
    return rp


def claims(**changes) -> dict:
    now = int(time.time())
    c = {"iss": ISSUER, "aud": CLIENT, "sub": "alice-sub", "email": "alice@example.com",
         "iat": now, "exp": now + 300, "nonce": NONCE, "groups": ["eng"]}
    c.update(changes)
    return {k: v for k, v in c.items() if v is not None}


def signed(c: dict, key=KEY, alg="RS256") -> str:
    return jwt.encode({"alg": alg, "kid": "k1"}, c, key)


def unsigned(c: dict) -> str:
    part = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'none'})}.{part(c)}."


def validate(token: str, rp: RelyingParty | None = None) -> dict:
    return asyncio.run((rp or relying_party()).validated_claims(token, NONCE))


def test_a_good_token_names_the_user_and_groups():
    rp = relying_party()
    identity = rp.claims_identity(validate(signed(claims(email="Alice@Example.com")), rp))
    assert (identity.user, identity.subject, identity.groups) == ("alice@example.com", "alice-sub", ["eng"])


# Tokens are made when the test runs, not when it is collected: a token with exp = now + 300
# made at collection had expired by the time a full suite reached this test.
@pytest.mark.parametrize("make_token, problem", [
    (lambda: signed(claims(), key=OTHER_KEY), "bad_signature"),  # forged: a key the provider never had
    (lambda: signed(claims(exp=int(time.time()) - 3600)), "expired_token"),
    (lambda: unsigned(claims()), ""),
    (lambda: signed(claims(), key=OctKey.import_key(b"k" * 32), alg="HS256"), ""),  # a MAC, not a signature
    (lambda: signed(claims(iss="https://evil.example.com")), "iss"),
    (lambda: signed(claims(aud="another-client")), "aud"),
    (lambda: signed(claims(nonce="a-replayed-nonce")), "nonce"),
    (lambda: signed(claims(nonce=None)), "nonce"),
    (lambda: "not.a.token", ""),
], ids=["forged", "expired", "unsigned", "mac", "issuer", "audience", "replayed-nonce",
        "no-nonce", "not-a-token"])
def test_bad_id_tokens_are_refused(make_token, problem):
    with pytest.raises(APIError) as e:
        validate(make_token())
    assert (e.value.status, e.value.code) == (400, "login_invalid")
    assert e.value.message.startswith("ID token rejected") and problem in e.value.message


def test_admin_scopes_come_only_from_mapped_groups():
    rp = relying_party(oidc_group_scopes={"netadmins": ["admin"], "eng": ["read"]})
    assert rp.scopes_of(["eng"]) == ["read"]
    assert rp.scopes_of(["eng", "netadmins"]) == ["admin", "read"]
    assert rp.scopes_of(["Netadmins", "admins", "netadmins "]) == []  # only exact group names


def test_an_unusable_user_claim_is_refused():
    rp = relying_party()
    for bad in (claims(email=None), claims(groups="eng"), claims(email="x" * 200)):
        with pytest.raises(APIError) as e:
            rp.claims_identity(bad)
        assert e.value.code == "login_invalid"


def test_unreachable_provider_refuses_new_logins_but_not_auth_keys(tmp_path):
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    with ServedInMemory(str(tmp_path), oidc_issuer=dead, oidc_client_id=CLIENT,
                        oidc_client_secret="s") as api:
        url = api.replicas[0].api_url
        client = ControlClient([url], SigningKey.generate())
        body = {"node_key": "A" * 43 + "=", "hostname": "laptop"}
        with pytest.raises(ControlError) as e:
            client.signed_request("POST", REGISTER, body)
        assert (e.value.status, e.value.code) == (503, "idp_unavailable")
        assert dead in e.value.message
        # An auth key registers as before.
        headers = {"Authorization": f"Bearer {api.admin_key}", "Content-Type": "application/json"}
        for path, payload in (("/api/v1/users", {"name": "carol"}),
                              ("/api/v1/preauth-keys", {"user": "carol"})):
            req = urllib.request.Request(url + path, json.dumps(payload).encode(), headers)
            with urllib.request.urlopen(req, timeout=10) as resp:
                created = json.loads(resp.read())
        resp = client.signed_request("POST", REGISTER, dict(body, auth_key=created["key"]))
        assert resp["approved"] and resp["node"]["user"] == "carol"


@pytest.mark.parametrize("settings, problem", [
    ({"oidc_client_id": ""}, "oidc_client_id"),
    ({"oidc_client_secret": ""}, "oidc_client_secret"),
    ({"oidc_group_scopes": {"netadmins": "admin"}}, "oidc_group_scopes"),
    ({"login_timeout": 5.0}, "login_timeout"),
])
def test_incomplete_sso_settings_are_refused_at_start(settings, problem, monkeypatch):
    monkeypatch.delenv("RAFTMESH_OIDC_CLIENT_SECRET", raising=False)
    config = ReplicaConfig(id="r1", raft_addr="127.0.0.1:1", peers=[], cluster_secret="s" * 16,
                           oidc_issuer=ISSUER, **{"oidc_client_id": CLIENT,
                                                  "oidc_client_secret": "s", **settings})
    with pytest.raises(ConfigError, match=problem):
        config.validate()
