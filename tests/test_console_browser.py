"""The web console in a real browser (Debian's headless Chromium, Selenium) against real
replica processes: sign in, approve a node a real agent client registered, a policy saved
with an error then fixed (and a save that lost a race), the audit entry, a replica killed and
back on the cluster page, markup in names shown as text, changes refused without the CSRF
token, a read-only person without write controls. axe-core finds no serious or critical
problem on any page; the keyboard reaches the controls and Enter submits the forms.

Set RAFTMESH_CONSOLE_SCREENSHOTS=docs/console to refresh the screenshots of docs/console.md.
"""
from __future__ import annotations

import base64
import re
import time

import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from console_browser import SCREENSHOTS, Browser, needs_browser
from raftmesh.agent.control_client import ControlClient
from raftmesh.lab.local_cluster import free_ports
from raftmesh.lab.light_agents import LightAgents
from raftmesh.proto.routes import REGISTER
from waiting import wait_until

pytestmark = [needs_browser, pytest.mark.timeout(300)]

MARKUP = '<img src=x id=injected onerror="document.title=1">"\'<script>window.pwned=1</script>'
POLICY_WITH_ERROR = """{
  // who may reach what
  "groups": {"group:ops": ["ops@example.com"]},
  "acls": [
    {"action": "accept", "src": ["group:ops"], "dst": ["*:22"]},
    {"action": "deny", "src": ["*"], "dst": ["*:*"]},
  ],
  "tests": [
    {"src": "ops@example.com", "accept": ["100.64.0.1:22"], "deny": ["100.64.0.1:80"]},
  ],
}
"""
POLICY_FIXED = POLICY_WITH_ERROR.replace('    {"action": "deny", "src": ["*"], "dst": ["*:*"]},\n', "")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(str(tmp_path_factory.mktemp("chromium") / "chromedriver.log"))
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def cluster(shared_cluster):
    return shared_cluster


@pytest.fixture(scope="module")
def streaming(cluster, tmp_path_factory):
    """Three light agents of ops@example.com streaming netmaps, one homed on each replica."""
    assert api(cluster, "POST", "/api/v1/users", {"name": "ops@example.com"})[0] == 201
    status, made = api(cluster, "POST", "/api/v1/preauth-keys",
                       {"user": "ops@example.com", "reusable": True})
    assert status == 201, made
    with LightAgents([r.api_url for r in cluster.replicas], 1,
                     log_dir=str(tmp_path_factory.mktemp("agents"))) as agents:
        agents.register(3, made["key"], prefix="la")
        assert agents.connect(timeout=60)
        yield agents


@pytest.fixture(scope="module")
def console(cluster) -> str:
    return cluster.replicas[0].api_url + "/ui/"


def api(cluster, method, path, body=None, **kw):
    status, answer = cluster.request(cluster.replicas[0], method, path, body, **kw)
    return status, answer


def visit(browser, console, page: str, ready_text: str) -> None:
    """The page, rendered afresh (opening the URL already shown would not)."""
    target = console + "#" + page
    if browser.driver.current_url == target:
        browser.driver.refresh()
    else:
        browser.open(target)
    browser.wait_text(ready_text)


def set_editor(browser, text: str) -> None:
    browser.driver.execute_script("document.getElementById('policy-text').value = arguments[0];", text)


def test_sign_in_with_an_api_key_using_the_keyboard(browser, cluster, console):
    from selenium.webdriver.common.keys import Keys
    browser.open(console)
    browser.wait_text("API key")
    browser.screenshot("sign-in")
    assert browser.accessibility_problems() == []
    order = browser.tab_order(4)
    assert order[0].startswith("A:Skip to content") and "INPUT:api-key" in order
    assert any(o.startswith("BUTTON:Sign in with API key") for o in order), order
    browser.find("#api-key")[0].send_keys(cluster.admin_key + Keys.ENTER)  # Enter submits
    browser.wait_text("Serving replica")
    assert "Sign out" in browser.text("header") and "admin" in browser.text("header")


def test_machines_show_the_serving_replica_and_acknowledged_netmap(browser, cluster, console, streaming):
    browser.open(console + "#machines")

    def shown() -> bool:
        nodes = api(cluster, "GET", "/api/v1/nodes")[1]["nodes"]
        rows = {line.split()[0]: " ".join(line.split()) for line in browser.text("main table").splitlines()[1:] if line.strip()}
        streams = [(n["name"], n["stream"]) for n in nodes if n["name"].startswith("la")]
        return len(streams) == 3 and all(
            s and f"online" in rows.get(name, "") and f" {s['replica']} {s['acked_version']} " in rows[name]
            for name, s in streams)
    wait_until(lambda: shown() or browser.driver.refresh(), 20, interval=0.5,
               what=f"the agents' streams on the page: {browser.text('main table')!r}")


def test_approve_a_pending_node_a_real_agent_registered(browser, cluster, console):
    from selenium.webdriver.common.keys import Keys
    agent = ControlClient([r.api_url for r in cluster.replicas], SigningKey.generate())
    node_key = base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()
    registered = agent.call("POST", REGISTER, {"node_key": node_key, "hostname": "waiting-box",
                                               "advertised_routes": ["10.9.0.0/24"]})
    assert registered["approved"] is False
    node_id = registered["node"]["id"]
    visit(browser, console, "machines", "pending approval")
    assert browser.accessibility_problems() == []
    order = browser.tab_order(40)
    assert "BUTTON:Approve waiting-box" in order, order  # the keyboard reaches the row's actions
    browser.button("Approve waiting-box").click()
    wait_until(lambda: api(cluster, "GET", f"/api/v1/nodes/{node_id}")[1]["node"]["approved"],
               10, what="the node approved")
    wait_until(lambda: "pending approval" not in browser.text(), 10, what="the page to show it")
    assert "Approve waiting-box" not in browser.buttons()
    browser.button("Routes of waiting-box").click()  # a dialog; Enter in its field submits it
    field = wait_until(lambda: next(iter(browser.find("#dialog input[name=routes]")), None), 5, what="dialog")
    field.send_keys("10.9.0.0/24" + Keys.ENTER)
    wait_until(lambda: api(cluster, "GET", f"/api/v1/nodes/{node_id}")[1]["node"]["approved_routes"] == ["10.9.0.0/24"],
               10, what="the route approved")
    browser.wait_text("10.9.0.0/24 (approved, primary)")  # its only router
    # a second router of the same subnet: a high-availability set, waiting-box stays primary
    standby = ControlClient([r.api_url for r in cluster.replicas], SigningKey.generate())
    standby_id = standby.call("POST", REGISTER, {
        "node_key": base64.b64encode(bytes(PrivateKey.generate().public_key)).decode(),
        "hostname": "standby-box", "advertised_routes": ["10.9.0.0/24"]})["node"]["id"]
    assert api(cluster, "POST", f"/api/v1/nodes/{standby_id}/approve")[0] == 200
    assert api(cluster, "PUT", f"/api/v1/nodes/{standby_id}/routes", {"approved_routes": ["10.9.0.0/24"]})[0] == 200
    visit(browser, console, "machines", "standby-box")
    browser.wait_text("10.9.0.0/24 (approved, standby; primary: waiting-box)")
    browser.wait_text("10.9.0.0/24 (approved, primary; standby: standby-box)")
    browser.screenshot("machines")


def test_markup_in_names_is_shown_as_text(browser, cluster, console):
    assert api(cluster, "POST", "/api/v1/users", {"name": "mallory", "display_name": MARKUP})[0] == 201
    assert api(cluster, "POST", "/api/v1/api-keys", {"name": MARKUP[:100], "scopes": ["read"]})[0] == 201
    for page, text in (("users", MARKUP), ("keys", MARKUP[:60])):
        visit(browser, console, page, text)
        assert not browser.find("#injected") and not browser.find("main script")
        assert browser.driver.execute_script("return window.pwned === undefined && document.title !== '1'")


def test_users_page_creates_a_user_with_enter(browser, cluster, console):
    from selenium.webdriver.common.keys import Keys
    visit(browser, console, "users", "Create user")
    browser.screenshot("users")
    assert browser.accessibility_problems() == []
    browser.find("#new-user")[0].send_keys("dev@example.com" + Keys.ENTER)
    wait_until(lambda: api(cluster, "GET", "/api/v1/users/dev@example.com")[0] == 200, 10,
               what="the user created")


def test_a_policy_with_an_error_is_refused_at_its_line_then_fixed(browser, cluster, console):
    version_before = api(cluster, "GET", "/api/v1/policy/versions")[1]["versions"]
    visit(browser, console, "policy", "Policy (HuJSON)")
    set_editor(browser, POLICY_WITH_ERROR)
    browser.button("Save").click()
    problems = browser.wait_text("Line 6", "#policy-result")
    assert "acls[1].action" in problems and "not valid" in problems
    assert api(cluster, "GET", "/api/v1/policy/versions")[1]["versions"] == version_before
    browser.button("Line 6").click()  # the cursor goes to the offending line
    line = browser.driver.execute_script(
        "const e = document.getElementById('policy-text'); return e.value.slice(0, e.selectionStart).split('\\n').length;")
    assert line == 6
    set_editor(browser, POLICY_FIXED)
    browser.button("Validate").click()
    browser.wait_text("1 policy test passes", "#policy-result")
    browser.button("Show changes").click()
    diff = browser.text("pre.diff")
    assert "+   // who may reach what" in diff and '"action": "deny"' not in diff  # all new
    browser.screenshot("policy")
    assert browser.accessibility_problems() == []
    browser.button("Save").click()
    browser.wait_text("policy saved as version", "#status")
    status, body = api(cluster, "GET", "/api/v1/policy")
    assert status == 200 and body["policy"]["text"] == POLICY_FIXED


def test_a_policy_save_that_lost_a_race_fails_cleanly(browser, cluster, console):
    visit(browser, console, "policy", "Policy (HuJSON)")
    theirs = POLICY_FIXED.replace("who may reach what", "saved elsewhere first")
    assert api(cluster, "PUT", "/api/v1/policy", theirs)[0] == 200
    set_editor(browser, POLICY_FIXED.replace("who may reach what", "mine"))
    browser.button("Save").click()
    browser.wait_text("someone else saved a newer policy", "#policy-result")
    assert api(cluster, "GET", "/api/v1/policy")[1]["policy"]["text"] == theirs
    assert "mine" in browser.driver.execute_script("return document.getElementById('policy-text').value")


def test_the_audit_log_shows_the_policy_change_and_a_verified_chain(browser, cluster, console):
    from selenium.webdriver.common.keys import Keys
    visit(browser, console, "audit", "Hash chain intact")
    browser.find("#audit-action")[0].send_keys("policy.set" + Keys.ENTER)
    wait_until(lambda: "policy.set" in browser.text("main table") and "user.create" not in browser.text("main table"),
               10, what="the filtered audit page")
    admin_key_id = cluster.admin_key.split("_")[1]
    assert f"apikey:{admin_key_id}" in browser.text("main table")
    saved = [e["time"] for e in api(cluster, "GET", "/api/v1/audit?action=policy.set&limit=1000")[1]["entries"]]
    utc = lambda t: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))

    def shown_when_filtered(since: str, until: str, expected: bool) -> None:
        browser.driver.execute_script(
            "document.getElementById('audit-since').value = arguments[0];"
            "document.getElementById('audit-until').value = arguments[1];", since, until)
        browser.button("Filter").click()
        wait_until(lambda: ("policy.set" in browser.text("main table")) == expected, 10,
                   what=f"policy.set {'shown' if expected else 'hidden'} from {since!r} to {until!r}")
    shown_when_filtered(utc(max(saved) + 1), "", False)  # nothing after the last save
    shown_when_filtered(utc(min(saved) - 60), utc(max(saved) + 60), True)
    shown_when_filtered("", utc(min(saved) - 3600), False)  # nor an hour before the first
    browser.screenshot("audit")
    assert browser.accessibility_problems() == []


def test_keys_page_shows_a_new_pre_auth_key_once(browser, cluster, console):
    visit(browser, console, "keys", "Create pre-auth key")
    browser.find("#pk-user")[0].send_keys("ops@example.com")
    browser.button("Create pre-auth key").click()
    secret = browser.wait_text("rmp_", "#shown-once")
    key_id = secret.split("_")[1]
    assert any(k["id"] == key_id for k in api(cluster, "GET", "/api/v1/preauth-keys")[1]["preauth_keys"])
    browser.wait_text(f"Revoke pre-auth key {key_id}")  # listed at once
    browser.screenshot("keys")
    assert browser.accessibility_problems() == []
    browser.open(console + "#users")  # leave and come back: the secret is not shown again
    visit(browser, console, "keys", key_id)
    assert "rmp_" not in browser.text()


def test_rename_tag_and_expire_a_machine(browser, cluster, console):
    from selenium.webdriver.common.keys import Keys
    assert api(cluster, "PUT", "/api/v1/policy", POLICY_FIXED.replace(
        '"groups"', '"tagOwners": {"tag:web": ["group:ops"], "tag:db": ["group:ops"]},\n  "groups"'))[0] == 200
    node_id = next(n["id"] for n in api(cluster, "GET", "/api/v1/nodes")[1]["nodes"] if n["name"] == "waiting-box")
    node = lambda: api(cluster, "GET", f"/api/v1/nodes/{node_id}")[1]["node"]

    def answer_dialog(field: str, text: str) -> None:
        found = wait_until(lambda: next(iter(browser.find(f"#dialog input[name={field}]")), None), 5, what=field)
        found.clear()
        found.send_keys(text + Keys.ENTER)
    visit(browser, console, "machines", "waiting-box")
    browser.button("Rename waiting-box").click()
    answer_dialog("name", "renamed-box")
    wait_until(lambda: node()["name"] == "renamed-box", 10, what="the node renamed")
    browser.button("Tag renamed-box").click()
    answer_dialog("tags", "tag:web, tag:db")
    wait_until(lambda: sorted(node()["tags"]) == ["tag:db", "tag:web"], 10, what="the node tagged")
    browser.wait_text("tag:db")
    browser.button("Expire renamed-box").click()  # asks first; cancelled, nothing changes
    browser.wait_text("Expire the key of renamed-box now?", "#dialog")
    browser.button("Cancel").click()
    assert node()["expired"] is False
    browser.button("Expire renamed-box").click()
    browser.button("Yes, do it").click()
    wait_until(lambda: node()["expired"], 10, what="the node expired")
    wait_until(lambda: any(line.startswith("renamed-box") and "expired" in line
                           for line in browser.text("main table").splitlines()), 10, what="shown expired")


def test_deleting_a_machine_asks_first_and_revokes_it(browser, cluster, console, streaming):
    from selenium.webdriver.common.keys import Keys
    visit(browser, console, "machines", "la1")
    browser.button("Delete la1").click()
    browser.wait_text("Delete la1? Its streams close at once.", "#dialog")
    browser.find("#dialog button[type=button]")[0].send_keys(Keys.ENTER)  # Cancel: nothing happens
    assert any(n["name"] == "la1" for n in api(cluster, "GET", "/api/v1/nodes")[1]["nodes"])
    browser.button("Delete la1").click()
    browser.button("Yes, do it").click()
    wait_until(lambda: all(n["name"] != "la1" for n in api(cluster, "GET", "/api/v1/nodes")[1]["nodes"]),
               10, what="la1 deleted")
    wait_until(lambda: "Delete la1" not in browser.buttons(), 10, what="la1 gone from the page")


def test_live_health_charts_update_without_reloading(browser, cluster, console, streaming):
    visit(browser, console, "health", "Open agent streams")
    # every replica's figures: each has an agent, which acknowledged the policy's new peers
    # and la1's removal
    for r in cluster.replicas:
        browser.wait_text(f"{r.id}: up")
    observed = r"(\d+) observed"
    here = f'section[aria-label="Replica {cluster.replicas[0].id}"]'  # la0's figures
    for label in ("Netmap propagation", "Revoke"):
        wait_until(lambda: int(re.search(label + r" \(s\): " + observed, browser.text(here)).group(1)) > 0,
                   15, interval=0.5, what=f"{label} observations: {browser.text()!r}")
    browser.driver.execute_script("window.sameDocument = true;")
    points = ("return document.querySelector('#chart-%s-streams polyline').getAttribute('points')"
              ".split(' ').length" % cluster.replicas[1].id)  # a peer's figures, gathered by replica 0
    first = browser.driver.execute_script(points)
    wait_until(lambda: browser.driver.execute_script(points) > first, 10, interval=0.2,
               what="the chart to grow")
    assert browser.driver.execute_script("return window.sameDocument === true")
    assert "Netmap propagation" in browser.text() and "Revoke" in browser.text()
    if SCREENSHOTS:  # a chart with some history to show
        wait_until(lambda: browser.driver.execute_script(points) >= 12, 40, interval=0.5, what="history")
    browser.screenshot("health")
    assert browser.accessibility_problems() == []


def test_the_cluster_page_shows_a_killed_replica_down_and_back(browser, cluster, console):
    visit(browser, console, "cluster", "3 members")
    browser.screenshot("cluster")
    assert browser.accessibility_problems() == []
    victim = cluster.replicas[2]

    def row() -> str:
        cells = (line.split() for line in browser.text("main table").splitlines())
        return next((" ".join(c) + " " for c in cells if c and c[0] == victim.id), "")
    wait_until(lambda: " up " in row() and "not ready" not in row(), 15, what=f"{victim.id} up: {row()!r}")
    browser.button(f"Remove {victim.id}").click()  # asks first; cancelled, nothing changes
    browser.wait_text(f"Remove {victim.id} from the cluster?", "#dialog")
    browser.button("Cancel").click()
    assert len(api(cluster, "GET", "/api/v1/cluster/self")[1]["replica"]["members"]) == 3
    cluster.kill(victim)
    wait_until(lambda: " down " in row(), 15, what=f"{victim.id} shown down: {row()!r}")
    visit(browser, console, "health", f"{victim.id}: down")  # live health too, the others still up
    assert all(f"{r.id}: up" in browser.text() for r in cluster.replicas if r is not victim)
    visit(browser, console, "cluster", "3 members")
    cluster.start(victim)
    cluster.wait_ready([victim], timeout=30)
    wait_until(lambda: " up " in row() and " ready" in row() and "not ready" not in row(), 20,
               what=f"{victim.id} shown up and ready: {row()!r}")


def test_adding_a_member_asks_first_then_removing_it(browser, cluster, console):
    from selenium.webdriver.common.keys import Keys
    port = free_ports(1)[0]  # nothing listens there: a member added before its replica started
    fields = {"id": "r9", "raft_addr": f"127.0.0.1:{port}", "api_url": f"http://127.0.0.1:{port}"}
    members = lambda: api(cluster, "GET", "/api/v1/cluster/self")[1]["replica"]["members"]
    visit(browser, console, "cluster", "3 members")

    def fill_in_the_form() -> None:
        browser.button("Add a member").click()
        for name, value in fields.items():
            wait_until(lambda: next(iter(browser.find(f"#dialog input[name={name}]")), None), 5,
                       what=name).send_keys(value)
        browser.find("#dialog input[name=api_url]")[0].send_keys(Keys.ENTER)
        browser.wait_text(f"Add r9 at 127.0.0.1:{port} to the Raft membership?", "#dialog")
    fill_in_the_form()
    browser.button("Cancel").click()  # at the confirmation: nothing changes
    assert len(members()) == 3
    fill_in_the_form()
    browser.button("Yes, do it").click()
    wait_until(lambda: len(members()) == 4, 15, what="r9 added")
    browser.wait_text("4 members")
    browser.button("Remove r9").click()
    browser.button("Yes, do it").click()
    wait_until(lambda: len(members()) == 3, 15, what="r9 removed")
    browser.wait_text("3 members")


def test_changes_without_the_csrf_token_are_refused_and_change_nothing(browser, cluster, console):
    visit(browser, console, "users", "Create user")
    head = api(cluster, "GET", "/api/v1/audit?limit=1")[1]["head"]
    refused = browser.fetch("POST", "/api/v1/users", {"name": "no-token"}, csrf=False)
    assert refused["status"] == 403 and refused["body"]["error"]["code"] == "forbidden"
    assert api(cluster, "GET", "/api/v1/audit?limit=1")[1]["head"] == head


def test_a_read_only_person_sees_no_write_controls_and_is_refused_anyway(browser, cluster, console):
    from selenium.webdriver.common.keys import Keys
    status, made = api(cluster, "POST", "/api/v1/api-keys", {"name": "auditor", "scopes": ["read"]})
    assert status == 201
    browser.button("Sign out").click()
    browser.wait_text("API key")
    browser.find("#api-key")[0].send_keys(made["key"] + Keys.ENTER)
    browser.wait_text("Serving replica")
    assert "Audit log" not in browser.text("nav")  # the read scope does not include the audit log
    assert not [b for b in browser.buttons() if b.split(" ")[0] in ("Approve", "Rename", "Delete", "Expire")]
    visit(browser, console, "policy", "Policy (HuJSON)")
    assert "Save" not in browser.buttons()
    assert browser.driver.execute_script("return document.getElementById('policy-text').readOnly")
    visit(browser, console, "keys", "Pre-auth keys")
    assert "Create pre-auth key" not in browser.buttons() and not browser.find("#pk-user")
    head = api(cluster, "GET", "/api/v1/audit?limit=1")[1]["head"]
    refused = browser.fetch("POST", "/api/v1/users", {"name": "reader-made"})
    assert refused["status"] == 403, refused
    assert api(cluster, "GET", "/api/v1/audit?limit=1")[1]["head"] == head
