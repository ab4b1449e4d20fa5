"""Signing in to the console with single sign-on through a real OpenID Connect provider
process: in the browser (the provider's own form), with the scopes of the person's groups;
and a callback completed by another browser than the one that started it signs nobody in."""
from __future__ import annotations

import http.client
from urllib.parse import urlsplit

import pytest

from console_browser import Browser, needs_browser
from raftmesh.api.console.sessions import COOKIE, SSO_COOKIE

from test_sso import ALICE, BOB, cluster, idp  # noqa: F401  (fixtures: a provider, a cluster using it)

pytestmark = pytest.mark.timeout(180)
SCOPES = {ALICE["sub"]: "admin, read", BOB["sub"]: "read"}  # test_sso's oidc_group_scopes for their groups


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


def test_a_callback_completed_elsewhere_signs_nobody_in(cluster, idp):
    status, head, cookies = get(cluster.replicas[0].api_url + "/ui/sso")
    assert status == 303 and head["location"].startswith(idp.issuer)
    nonce = cookie_value(cookies, SSO_COOKIE)
    sso_cookie = next(c for c in cookies if c.startswith(SSO_COOKIE + "="))
    assert nonce and "samesite=lax" in sso_cookie.lower() and "httponly" in sso_cookie.lower()
    back = idp.sign_in(head["location"], ALICE["sub"])
    path = urlsplit(back)
    status, _, cookies = get(cluster.replicas[0].api_url + path.path + "?" + path.query)  # no cookie
    assert status == 200 and cookie_value(cookies, COOKIE) is None


@needs_browser
def test_sign_in_with_single_sign_on_in_the_browser(cluster, tmp_path):
    browser = Browser(str(tmp_path / "chromedriver.log"))
    try:
        for person in (ALICE, BOB):
            browser.open(cluster.replicas[0].api_url + "/ui/")
            browser.wait_text("Sign in with single sign-on")
            browser.find("#sso")[0].click()
            field = browser.find("input[name=sub]")
            assert field, browser.driver.page_source[:500]
            field[0].send_keys(person["sub"])
            field[0].submit()
            browser.wait_text(f"{person['email'].lower()} ({SCOPES[person['sub']]})", "header")
            assert browser.driver.current_url.startswith(cluster.replicas[0].api_url + "/ui/")
            browser.button("Sign out").click()
            browser.wait_text("API key")
    finally:
        browser.close()
