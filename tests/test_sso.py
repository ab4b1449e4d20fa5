"""Single sign-on of devices against a real OpenID Connect provider process and 3 real
replicas: the login starts on one replica and the provider's redirect lands on another."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
import sys
import urllib.parse

import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from raftmesh.agent.control_client import ControlClient, ControlError
from raftmesh.lab.local_cluster import LocalCluster
from raftmesh.lab.oidc_provider import OidcProvider
from raftmesh.proto.routes import REGISTER

CLIENT_SECRET = "sso-test-client-secret"
ALICE = {"sub": "alice-sub", "email": "Alice@Example.com", "groups": ["eng", "netadmins"]}
BOB = {"sub": "bob-sub", "email": "bob@example.com", "groups": ["eng"]}
CAROL = {"sub": "carol-sub", "email": "carol@example.com", "groups": ["contractors"]}


@pytest.fixture(scope="module")
def idp(tmp_path_factory):
    provider = OidcProvider([ALICE, BOB, CAROL], str(tmp_path_factory.mktemp("idp") / "idp.log"))
    yield provider
    provider.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, idp):
    data = tmp_path_factory.mktemp("sso")
    config = data / "sso.toml"
    config.write_text(f'oidc_issuer = "{idp.issuer}"\noidc_client_id = "raftmesh"\n'
                      'oidc_group_scopes = {netadmins = ["admin"], eng = ["read"]}\n')
    c = LocalCluster(str(data / "cluster"), replicas=3, extra_args=["--config", str(config)])
    os.environ["RAFTMESH_OIDC_CLIENT_SECRET"] = CLIENT_SECRET  # inherited by the replicas
    try:
        c.start_all()
    finally:
        del os.environ["RAFTMESH_OIDC_CLIENT_SECRET"]
    try:
        c.wait_ready(timeout=30)
        yield c
    finally:
        c.stop_all()


class Device:
    """A machine asking to register without an auth key, as `raftmesh agent up` does."""

    def __init__(self, url: str, hostname: str):
        self.client = ControlClient([url], SigningKey.generate())
        self.node_key = base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()
        self.hostname = hostname

    def register(self, url: str | None = None) -> dict:
        if url is not None:
            self.client.servers = [url]
        return self.client.signed_request("POST", REGISTER,
                                          {"node_key": self.node_key, "hostname": self.hostname})


def at(replica_url: str, redirect: str) -> str:
    """The provider's redirect, opened at `replica_url` (as a load balancer may send it)."""
    parts = urllib.parse.urlsplit(redirect)
    return f"{replica_url}{parts.path}?{parts.query}"


def audit_text(cluster) -> str:
    status, page = cluster.request(cluster.replicas[0], "GET", "/api/v1/audit?limit=1000")
    assert status == 200
    return json.dumps(page["entries"])


def test_device_login_started_on_one_replica_finishes_on_another(cluster, idp):
    r1, r2, r3 = (r.api_url for r in cluster.replicas)
    device = Device(r1, "laptop")
    first = device.register()
    assert set(first) == {"login_url", "login_expires_at"}
    url = first["login_url"]
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query["code_challenge_method"] == ["S256"] and query["nonce"] and query["state"]
    assert device.register(r2)["login_url"] == url  # polling while the login is in progress
    redirect = idp.sign_in(url, ALICE["sub"])
    status, done = cluster.request(r3, "GET", at(r3, redirect)[len(r3):], key="-")
    assert status == 200, done
    assert done["user"] == "alice@example.com"

    registered = device.register(r1)
    node = registered["node"]
    assert registered["approved"] and node["user"] == "alice@example.com"
    assert node["idp_groups"] == ["eng", "netadmins"]  # the groups claim, for group:idp/<name>
    status, user = cluster.request(r2, "GET", "/api/v1/users/alice@example.com")
    assert status == 200 and user["user"]["idp_subject"] == ALICE["sub"]
    assert user["user"]["idp_groups"] == ["eng", "netadmins"]

    # Single use: the same redirect again, on any replica, is refused and changes nothing.
    before = audit_text(cluster)
    for r in (r1, r2):
        status, err = cluster.request(r, "GET", at(r, redirect)[len(r):], key="-")
        assert (status, err["error"]["code"]) == (400, "login_invalid"), err
    assert audit_text(cluster) == before
    # Nothing secret reaches the audit log or the replicas' logs.
    secrets = [query["state"][0], query["nonce"][0],
               urllib.parse.parse_qs(urllib.parse.urlsplit(redirect).query)["code"][0]]
    logs = "".join(open(os.path.join(cluster.log_dir, f"{r.id}.log")).read() for r in cluster.replicas)
    for secret in secrets:
        assert secret not in before and secret not in logs

    # An expired node re-authenticates the same way: a new login, same node.
    status, _ = cluster.request(r1, "POST", f"/api/v1/nodes/{node['id']}/expire")
    assert status == 200
    again = device.register(r2)
    assert again["login_url"] != url
    redirect = idp.sign_in(again["login_url"], ALICE["sub"])
    status, done = cluster.request(r1, "GET", at(r1, redirect)[len(r1):], key="-")
    assert status == 200, done
    back = device.register(r3)
    assert back["node"]["id"] == node["id"] and not back["expired"] and back["approved"]


def test_another_person_cannot_take_over_a_device(cluster, idp):
    r1, r2, _ = (r.api_url for r in cluster.replicas)
    device = Device(r1, "desk")
    redirect = idp.sign_in(device.register()["login_url"], BOB["sub"])
    assert cluster.request(r2, "GET", at(r2, redirect)[len(r2):], key="-")[0] == 200
    node = device.register()["node"]
    status, _ = cluster.request(r1, "POST", f"/api/v1/nodes/{node['id']}/expire")
    assert status == 200
    redirect = idp.sign_in(device.register()["login_url"], ALICE["sub"])
    status, err = cluster.request(r2, "GET", at(r2, redirect)[len(r2):], key="-")
    assert (status, err["error"]["code"]) == (403, "forbidden"), err
    assert "another user" in err["error"]["message"]
    assert device.register()["login_url"]  # still waiting for its own user


@pytest.mark.parametrize("query, message", [
    ("code=abc&state=never-issued", "no login in progress"),
    ("code=abc", "needs the code and state"),
    ("error=access_denied&error_description=the+user+said+no", "refused the login: access_denied"),
])
def test_callbacks_without_a_login_in_progress_are_refused(cluster, query, message):
    before = audit_text(cluster)
    status, err = cluster.request(cluster.replicas[1], "GET", f"/oidc/callback?{query}", key="-")
    assert (status, err["error"]["code"]) == (400, "login_invalid")
    assert message in err["error"]["message"]
    assert audit_text(cluster) == before


def test_a_refused_code_is_a_clear_error(cluster, idp):
    r1 = cluster.replicas[0].api_url
    device = Device(r1, "phone")
    redirect = idp.sign_in(device.register()["login_url"], BOB["sub"])
    forged = redirect.replace("code=", "code=x", 1)
    status, err = cluster.request(r1, "GET", at(r1, forged)[len(r1):], key="-")
    assert (status, err["error"]["code"]) == (400, "login_invalid")
    assert "refused the authorization code" in err["error"]["message"]
    with pytest.raises(ControlError):  # and the device is not registered
        device.client.signed_request("POST", "/machine/report", {})


def admin_login(cluster, idp, person: dict, start_at, finish_at) -> tuple[str, int, dict]:
    """An admin login as the CLI does it: (the key, the callback's status and answer)."""
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    status, started = cluster.request(start_at, "POST", "/api/v1/auth/login", {
        "key_id": key_id, "key_hash": hashlib.sha256(secret.encode()).hexdigest()}, key="-")
    assert status == 201, started
    redirect = idp.sign_in(started["login_url"], person["sub"])
    url = finish_at.api_url
    status, done = cluster.request(url, "GET", at(url, redirect)[len(url):], key="-")
    return f"rmk_{key_id}_{secret}", status, done


def test_admin_logins_get_scopes_from_their_idp_groups(cluster, idp):
    r1, r2, r3 = cluster.replicas
    key, status, _ = admin_login(cluster, idp, ALICE, r1, r2)  # netadmins -> admin
    assert status == 200
    assert cluster.request(r3, "GET", "/api/v1/api-keys", key=key)[0] == 200
    key, status, _ = admin_login(cluster, idp, BOB, r2, r1)  # eng -> read only
    assert status == 200
    assert cluster.request(r1, "GET", "/api/v1/users", key=key)[0] == 200
    assert cluster.request(r1, "POST", "/api/v1/users", {"name": "x"}, key=key)[0] == 403
    assert cluster.request(r1, "GET", "/api/v1/api-keys", key=key)[0] == 403
    key, status, err = admin_login(cluster, idp, CAROL, r3, r3)  # no mapped group: no key
    assert (status, err["error"]["code"]) == (403, "forbidden"), err
    assert cluster.request(r1, "GET", "/api/v1/users", key=key)[0] == 401
    keys = cluster.request(r1, "GET", "/api/v1/api-keys")[1]["api_keys"]
    sso = [k for k in keys if k["name"].startswith("sso:")]
    assert {k["name"] for k in sso} == {"sso:alice@example.com", "sso:bob@example.com"}
    assert all(k["expires_at"] is not None for k in sso)


def test_raftmesh_login_saves_a_working_key(cluster, idp, tmp_path):
    config = tmp_path / "client.toml"
    proc = subprocess.Popen([sys.executable, "-m", "raftmesh.cli.main", "login", "--server",
                             cluster.replicas[0].api_url, "--client-config", str(config)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        url = next(line.strip() for line in proc.stderr if line.strip().startswith("http"))
        redirect = idp.sign_in(url, ALICE["sub"])
        r2 = cluster.replicas[1].api_url
        assert cluster.request(r2, "GET", at(r2, redirect)[len(r2):], key="-")[0] == 200
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stderr.close()
    assert config.stat().st_mode & 0o777 == 0o600
    done = subprocess.run([sys.executable, "-m", "raftmesh.cli.main", "--client-config", str(config),
                           "apikeys", "list"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "sso:alice@example.com" in done.stdout, done.stderr
