"""The console's sessions (api/console/): signing in, CSRF token and origin on every change,
expiry, revocation, scopes, and the security headers of its pages. A refused change must
change nothing (the audit head stays where it was). Real app, in-memory Raft."""
from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest

from in_memory_api import ServedInMemory
from raftmesh.api.console.sessions import COOKIE, CSRF_HEADER, IDLE, LIFETIME, SESSIONS


class Browser:
    """Just enough of a browser: one cookie jar, an Origin it sends on changes."""

    def __init__(self, base: str, origin: str | None = None):
        self.base, self.cookie = base, None
        self.origin = base if origin is None else origin
        self.csrf = ""

    def __call__(self, method: str, path: str, body=None, headers: dict | None = None,
                 csrf: bool = True) -> tuple[int, dict, object]:
        u = urlsplit(self.base)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        hdrs = dict(headers or {})
        if self.cookie:
            hdrs["Cookie"] = f"{COOKIE}={self.cookie}"
        if method != "GET":
            if self.origin:
                hdrs.setdefault("Origin", self.origin)
            if csrf:
                hdrs.setdefault(CSRF_HEADER, self.csrf)
        data = None
        if body is not None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw, head = resp.read(), {k.lower(): v for k, v in resp.getheaders()}
        head["set-cookie-all"] = resp.headers.get_all("Set-Cookie") or []
        conn.close()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = raw.decode(errors="replace")
        return resp.status, head, payload

    def sign_in(self, key: str, **kw) -> tuple[int, dict, object]:
        status, head, body = self("POST", "/ui/session", {"api_key": key}, **kw)
        for c in head["set-cookie-all"]:
            if c.startswith(COOKIE + "="):
                self.cookie = c.split(";")[0].split("=", 1)[1]
        if status == 200:
            self.csrf = body["csrf_token"]
        return status, head, body


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    server = ServedInMemory(str(tmp_path_factory.mktemp("console")))
    with server as api:
        yield server, api


@pytest.fixture
def base(served) -> str:
    return served[1].replicas[0].api_url


@pytest.fixture
def admin(base, served) -> Browser:
    b = Browser(base)
    assert b.sign_in(served[1].admin_key)[0] == 200
    return b


def audit_head(browser: Browser) -> dict:
    status, _, body = browser("GET", "/api/v1/audit?limit=1")
    assert status == 200, body
    return body["head"]


def make_key(admin: Browser, scopes: list[str], **extra) -> tuple[str, str]:
    status, _, body = admin("POST", "/api/v1/api-keys", {"name": "k", "scopes": scopes, **extra})
    assert status == 201, body
    return body["api_key"]["id"], body["key"]


def test_sign_in_sets_a_strict_http_only_session_cookie(base, served):
    b = Browser(base)
    status, head, body = b.sign_in(served[1].admin_key)
    assert status == 200 and body["signed_in"] and body["key"]["scopes"] == ["admin"]
    cookie = next(c for c in head["set-cookie-all"] if c.startswith(COOKIE))
    attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")}
    assert {"httponly", "path", "max-age"} <= attrs and "samesite=strict" in cookie.lower()
    assert "secure" not in attrs  # plain HTTP here; behind TLS it is Secure (next test)
    assert 0 < int(cookie.lower().split("max-age=")[1].split(";")[0]) <= LIFETIME
    status, _, who = b("GET", "/ui/session")
    assert status == 200 and who["signed_in"] and who["csrf_token"] == b.csrf


def test_the_cookie_is_secure_when_the_browser_came_over_tls(base, served):
    _, head, _ = Browser(base).sign_in(served[1].admin_key, headers={"X-Forwarded-Proto": "https"})
    cookie = next(c for c in head["set-cookie-all"] if c.startswith(COOKIE))
    assert "secure" in {a.strip().lower() for a in cookie.split(";")}


@pytest.mark.parametrize("key, status", [("rmk_nothere_x", 401), ("garbage", 401), ("", 401)])
def test_a_bad_key_signs_nobody_in(base, key, status):
    b = Browser(base)
    code, head, body = b.sign_in(key)
    assert code == status and not head["set-cookie-all"], body
    assert b("GET", "/ui/session")[2]["signed_in"] is False


def test_sign_in_from_a_foreign_origin_is_refused(base, served):
    code, head, body = Browser(base, origin="https://evil.example").sign_in(served[1].admin_key)
    assert code == 403 and body["error"]["code"] == "forbidden" and not head["set-cookie-all"]


def test_a_session_reads_and_changes_through_the_admin_api(admin):
    before = audit_head(admin)
    status, _, body = admin("POST", "/api/v1/users", {"name": "console-made"})
    assert status == 201, body
    assert audit_head(admin)["seq"] == before["seq"] + 1
    entry = admin("GET", f"/api/v1/audit?after_seq={before['seq']}")[2]["entries"][0]
    assert entry["action"] == "user.create" and entry["actor"].startswith("apikey:")


@pytest.mark.parametrize("case", ["no csrf token", "wrong csrf token", "foreign origin", "no origin"])
def test_a_change_without_csrf_token_or_from_elsewhere_is_refused_and_changes_nothing(admin, case):
    before = audit_head(admin)
    headers, csrf = {}, True
    if case == "no csrf token":
        csrf = False
    elif case == "wrong csrf token":
        headers[CSRF_HEADER] = "x" + admin.csrf
    elif case == "foreign origin":
        headers["Origin"] = "http://attacker.example"
    else:
        admin.origin = ""
    status, _, body = admin("POST", "/api/v1/users", {"name": "not-made"}, headers=headers, csrf=csrf)
    assert status == 403 and body["error"]["code"] == "forbidden", body
    assert audit_head(admin) == before
    admin.origin = admin.base
    assert admin("GET", "/api/v1/users/not-made")[0] == 404


def test_an_expired_or_idle_session_is_refused_and_changes_nothing(served, base):
    sessions = served[0]._server.app[SESSIONS]
    for elapsed in (LIFETIME + 1, IDLE + 1):
        b = Browser(base)
        b.sign_in(served[1].admin_key)
        before = audit_head(b)
        real_clock = sessions.clock
        sessions.clock = lambda: real_clock() + elapsed
        try:
            status, _, body = b("POST", "/api/v1/users", {"name": "too-late"})
            assert status == 401 and body["error"]["code"] == "unauthenticated", body
            assert b("GET", "/ui/session")[2]["signed_in"] is False
        finally:
            sessions.clock = real_clock
        assert b("GET", "/api/v1/users")[0] == 401  # forgotten, not revived by the real clock
        admin = Browser(base)
        admin.sign_in(served[1].admin_key)
        assert audit_head(admin) == before


def test_revoking_the_key_ends_its_sessions(admin, base):
    key_id, key = make_key(admin, ["operator"])
    b = Browser(base)
    assert b.sign_in(key)[0] == 200 and b("GET", "/api/v1/users")[0] == 200
    assert admin("DELETE", f"/api/v1/api-keys/{key_id}")[0] == 200
    status, _, body = b("GET", "/api/v1/users")
    assert status == 401 and "revoked" in body["error"]["message"]


def test_a_read_scoped_session_is_refused_writes(admin, base):
    _, key = make_key(admin, ["read"])
    b = Browser(base)
    assert b.sign_in(key)[2]["key"]["scopes"] == ["read"]
    before = audit_head(admin)
    status, _, body = b("POST", "/api/v1/users", {"name": "reader-made"})
    assert status == 403 and body["error"]["code"] == "forbidden", body
    assert b("GET", "/api/v1/users")[0] == 200
    assert audit_head(admin) == before


def test_sign_out_needs_the_token_and_ends_the_session(base, served):
    b = Browser(base)
    b.sign_in(served[1].admin_key)
    assert b("DELETE", "/ui/session", csrf=False)[0] == 403
    assert b("GET", "/api/v1/users")[0] == 200
    status, head, _ = b("DELETE", "/ui/session")
    assert status == 200 and any(c.startswith(COOKIE + '=""') or "max-age=0" in c.lower()
                                 for c in head["set-cookie-all"])
    assert b("GET", "/api/v1/users")[0] == 401


def test_an_api_key_header_wins_over_a_cookie(admin, served):
    """CLI and scripts are unaffected: with Authorization, no CSRF token is asked for."""
    status, _, body = admin("POST", "/api/v1/users", {"name": "via-bearer"}, csrf=False,
                            headers={"Authorization": f"Bearer {served[1].admin_key}"})
    assert status == 201, body


@pytest.mark.parametrize("path", ["/ui/", "/ui/app.js", "/ui/style.css", "/ui/session"])
def test_console_answers_carry_a_strict_content_security_policy(base, path):
    status, head, _ = Browser(base)("GET", path)
    assert status == 200
    csp = head["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
    assert "unsafe-inline" not in csp and head["x-frame-options"] == "DENY"
    assert head["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", ["/ui/nothere.js", "/ui/..%2fadmin.py", "/ui/%2e%2e/server.py"])
def test_only_the_console_files_are_served(base, path):
    status, _, body = Browser(base)("GET", path)
    assert status == 404 and body["error"]["code"] == "not_found"


def test_the_pages_hold_no_inline_script_and_nothing_from_elsewhere(base):
    _, _, html = Browser(base)("GET", "/ui/")
    assert "<script>" not in html and "http://" not in html and "https://" not in html


def test_single_sign_on_is_not_offered_without_a_provider(base):
    b = Browser(base)
    assert b("GET", "/ui/session")[2]["sso"] is False
    status, _, body = b("GET", "/ui/sso")
    assert status == 404 and "single sign-on" in body["error"]["message"]


def test_the_audit_chain_verifies(admin):
    status, _, body = admin("GET", "/api/v1/audit/verify")
    assert status == 200 and body["intact"] is True, body
    assert body["detail"] == f"{body['head']['seq']} entries verified"


def test_the_audit_chain_verifies_across_chunks(admin, monkeypatch):
    from raftmesh.api import admin as admin_api
    monkeypatch.setattr(admin_api, "AUDIT_VERIFY_CHUNK", 2)  # every link between chunks checked too
    status, _, body = admin("GET", "/api/v1/audit/verify")
    assert status == 200 and body["intact"] is True and body["head"]["seq"] > 4, body


def test_a_session_token_is_no_api_key(admin, served):
    """The cookie gives nothing through an Authorization header (no CSRF check to skip there)."""
    before = audit_head(admin)
    token = admin.cookie.split(".")[0]
    for credential in (admin.cookie, token):
        status, _, body = admin("POST", "/api/v1/users", {"name": "via-session-bearer"},
                                headers={"Authorization": f"Bearer {credential}"})
        assert status == 401 and body["error"]["code"] == "unauthenticated", body
    assert audit_head(admin) == before


def test_sessions_are_replicated_records_stored_as_hashes(admin, served):
    session_id, secret = admin.cookie.split(".")[0].split("_", 2)[1:]
    with served[1].raft.store.read() as txn:
        record = txn.get("console_sessions", session_id)
    assert record["key_id"] == served[1].admin_key.split("_")[1] and secret not in str(record)


@pytest.mark.parametrize("forged", ["no activity", "activity moved"])
def test_a_forged_last_activity_is_idle(base, served, forged):
    b = Browser(base)
    b.sign_in(served[1].admin_key)
    token, at, mac = b.cookie.split(".")
    b.cookie = token if forged == "no activity" else f"{token}.{int(at) + 10}.{mac}"
    assert b("GET", "/api/v1/users")[0] == 401
    b.cookie = f"{token}.{at}.{mac}"  # ended, not just refused
    assert b("GET", "/api/v1/users")[0] == 401


def test_each_answer_refreshes_the_last_activity(admin):
    status, head, _ = admin("GET", "/api/v1/users")
    cookie = next(c for c in head["set-cookie-all"] if c.startswith(COOKIE + "="))
    assert status == 200 and "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert cookie.split(";")[0].split("=", 1)[1].split(".")[0] == admin.cookie.split(".")[0]
