"""Identity end to end with real wireguard-go in network namespaces: `raftmesh agent up`
without an auth key prints a login URL and joins once the person signed in at a real OIDC
provider; then a SCIM deactivation of the peer's user cuts the running tunnel."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from netns import Lab, cleanup_stale, stop_proc, wait_for

from raftmesh.lab.local_cluster import LocalCluster
from test_sso import ALICE, CLIENT_SECRET, at, idp  # noqa: F401  (idp: the provider fixture)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces"),
    pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go not installed"),
    pytest.mark.timeout(240),
]
ALLOW_ALL = json.dumps({"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]})
SCIM_TYPE = {"Content-Type": "application/scim+json"}


class IdentityLab:
    def __init__(self, tmp_path, idp):
        cleanup_stale()
        self.tmp, self.lab, self.agents, self.cluster = tmp_path, Lab(), {}, None
        try:
            self.ns = {label: self.lab.add(label, f"192.0.2.{i + 1}/24")
                       for i, label in enumerate(("a", "b"))}
            config = tmp_path / "sso.toml"
            config.write_text(f'oidc_issuer = "{idp.issuer}"\noidc_client_id = "raftmesh"\n')
            self.cluster = LocalCluster(str(tmp_path / "cluster"), replicas=3,
                                        host=self.lab.connect_host(),
                                        extra_args=["--config", str(config), "--stream-keepalive", "2"])
            os.environ["RAFTMESH_OIDC_CLIENT_SECRET"] = CLIENT_SECRET
            try:
                self.cluster.start_all()
            finally:
                del os.environ["RAFTMESH_OIDC_CLIENT_SECRET"]
            self.cluster.wait_ready(timeout=30)
            assert self.admin("PUT", "/api/v1/policy", ALLOW_ALL)[0] == 200
        except BaseException:
            self.close()
            raise

    def admin(self, method, path, body=None, **kw):
        return self.cluster.request(self.cluster.replicas[0], method, path, body, **kw)

    def start_agent(self, label: str, auth_key: str | None) -> None:
        ns, env = self.ns[label], {k: v for k, v in os.environ.items() if k != "RAFTMESH_AUTH_KEY"}
        if auth_key:
            env["RAFTMESH_AUTH_KEY"] = auth_key
        with open(self.tmp / f"agent-{label}.log", "ab") as log:
            self.agents[label] = ns.spawn(
                sys.executable, "-m", "raftmesh.cli.main", "agent", "up", "--server",
                ",".join(r.api_url for r in self.cluster.replicas), "--state-dir",
                str(self.tmp / f"state-{label}"), "--interface", self.lab.ifname(label),
                "--hostname", f"host-{label}", "--endpoint", f"{ns.ip}:41641",
                stdout=log, stderr=subprocess.STDOUT, env=env)

    def status(self, label: str) -> dict:
        try:
            return json.loads((self.tmp / f"state-{label}" / "status.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def log_tail(self, label: str) -> str:
        return (self.tmp / f"agent-{label}.log").read_text(errors="replace")[-3000:]

    def address(self, label: str) -> str:
        return self.status(label)["addresses"][0].split("/")[0]

    def close(self) -> None:
        for proc in self.agents.values():
            stop_proc(proc, timeout=10)
        if self.cluster is not None:
            self.cluster.stop_all()
        self.lab.close()


@pytest.fixture
def identity_lab(tmp_path, idp):  # noqa: F811
    lab = IdentityLab(tmp_path, idp)
    try:
        yield lab
    finally:
        lab.close()


def test_sso_device_login_and_scim_deactivation_cutting_a_tunnel(identity_lab, idp):  # noqa: F811
    m = identity_lab
    status, bob = m.admin("POST", "/scim/v2/Users", {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "bob"}, headers=SCIM_TYPE)
    assert status == 201, bob
    key = m.admin("POST", "/api/v1/preauth-keys", {"user": "bob"})[1]["key"]
    m.start_agent("b", key)
    m.start_agent("a", None)  # no auth key: single sign-on
    try:
        wait_for(lambda: m.status("a").get("state") == "login_required", timeout=60,
                 what="agent a asks for a sign-in")
    except AssertionError as e:
        raise AssertionError(f"{e}; status {m.status('a')}; log:\n{m.log_tail('a')}") from None
    url = m.status("a")["error"]
    assert url in (m.tmp / "agent-a.log").read_text()  # printed for the person, as tailscale up does
    redirect = idp.sign_in(url, ALICE["sub"])
    r3 = m.cluster.replicas[2].api_url
    assert m.cluster.request(r3, "GET", at(r3, redirect)[len(r3):], key="-")[0] == 200
    for label in ("a", "b"):
        wait_for(lambda l=label: m.status(l).get("state") == "connected" and m.status(l).get("addresses"),
                 timeout=30, what=f"agent {label} connected")
    nodes = {n["name"]: n for n in m.admin("GET", "/api/v1/nodes")[1]["nodes"]}
    assert nodes["host-a"]["user"] == "alice@example.com"
    b_ip = m.address("b")
    wait_for(lambda: m.ns["a"].ping(b_ip), timeout=20, what="a pings b through the tunnel")

    patch = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
             "Operations": [{"op": "replace", "value": {"active": False}}]}
    assert m.admin("PATCH", f"/scim/v2/Users/{bob['id']}", patch, headers=SCIM_TYPE)[0] == 204
    wait_for(lambda: not m.ns["a"].ping(b_ip, timeout=0.5), timeout=10, what="the tunnel is cut")
    wait_for(lambda: m.status("b").get("state") in ("revoked", "expired"), timeout=10,
             what="agent b revoked")
    assert not m.status("b").get("peers")
