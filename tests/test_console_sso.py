"""Signing in to the console with single sign-on through a real OpenID Connect provider
process: in the browser (the provider's own form), with the scopes of the person's groups;
and a callback completed by another browser than the one that started it signs nobody in."""
from __future__ import annotations

import http.client
import os
from urllib.parse import urlsplit

import pytest

from console_browser import Browser, needs_browser
from raftmesh.api.console.sessions import COOKIE, SSO_COOKIE
from raftmesh.lab.local_cluster import LocalCluster
from raftmesh.lab.oidc_provider import OidcProvider

pytestmark = pytest.mark.timeout(180)
CLIENT_SECRET = "console-sso-client-secret"
ALICE = {"sub": "alice-sub", "email": "alice@example.com", "groups": ["netadmins"]}
BOB = {"sub": "bob-sub", "email": "bob@example.com", "groups": ["eng"]}


@pytest.fixture(scope="module")
def idp(tmp_path_factory):
    provider = OidcProvider([ALICE, BOB], str(tmp_path_factory.mktemp("idp") / "idp.log"))
    yield provider
    provider.stop()


@pytest.fixture(scope="module")
def replica(tmp_path_factory, idp):
    data = tmp_path_factory.mktemp("console-sso")
    config = data / "sso.toml"
    config.write_text(f'oidc_issuer = "{idp.issuer}"\noidc_client_id = "raftmesh"\n'
                      'oidc_group_scopes = {netadmins = ["admin"], eng = ["read"]}\n')
    c = LocalCluster(str(data / "cluster"), replicas=1, extra_args=["--config", str(config)])
    os.environ["RAFTMESH_OIDC_CLIENT_SECRET"] = CLIENT_SECRET  # inherited by the replica
    try:
        c.start_all()
    finally:
        del os.environ["RAFTMESH_OIDC_CLIENT_SECRET"]
    try:
        c.wait_ready(timeout=30)
        yield c
    finally:
        c.stop_all()


def get(url: str, cookie: str | None = None) -> tuple[int, dict, list[str]]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("GET", u.path + ("?" + u.query if u.query else ""), headers={"Cookie": cookie} if cookie else {})
    resp = conn.getresponse()
    resp.read()
    head = {k.lower(): v for k, v in resp.getheaders()}
    cookies = resp.headers.get_all("Set-Cookie") or []
    conn.close()
    return resp.status, head, cookies


def cookie_value(cookies: list[str], name: str) -> str | None:
    return next((c.split(";")[0].split("=", 1)[1] for c in cookies if c.startswith(name + "=")), None)


def test_a_callback_completed_elsewhere_signs_nobody_in(replica, idp):
    status, head, cookies = get(replica.replicas[0].api_url + "/ui/sso")
    assert status == 303 and head["location"].startswith(idp.issuer)
    nonce = cookie_value(cookies, SSO_COOKIE)
    sso_cookie = next(c for c in cookies if c.startswith(SSO_COOKIE + "="))
    assert nonce and "samesite=lax" in sso_cookie.lower() and "httponly" in sso_cookie.lower()
    back = idp.sign_in(head["location"], ALICE["sub"])
    path = urlsplit(back)
    status, _, cookies = get(replica.replicas[0].api_url + path.path + "?" + path.query)  # no cookie
    assert status == 200 and cookie_value(cookies, COOKIE) is None


@needs_browser
def test_sign_in_with_single_sign_on_in_the_browser(replica, tmp_path):
    browser = Browser(str(tmp_path / "chromedriver.log"))
    try:
        for person, scopes in ((ALICE, "admin"), (BOB, "read")):
            browser.open(replica.replicas[0].api_url + "/ui/")
            browser.wait_text("Sign in with single sign-on")
            browser.find("#sso")[0].click()
            field = browser.find("input[name=sub]")
            assert field, browser.driver.page_source[:500]
            field[0].send_keys(person["sub"])
            field[0].submit()
            browser.wait_text(f"{person['email']} ({scopes})", "header")
            assert browser.driver.current_url.startswith(replica.replicas[0].api_url + "/ui/")
            browser.button("Sign out").click()
            browser.wait_text("API key")
    finally:
        browser.close()
