"""An exit node with real agents (wireguard-go) in namespaces: a client that selects it
reaches an "internet" host it has no route to otherwise, keeps its control-plane
connection (policy routing leaves the replicas outside the tunnel), loses the internet when
the policy stops granting autogroup:internet, and leaves no rule behind when it stops."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from netns import Lab, cleanup_stale, wait_for

from raftmesh.agent.exit_node import PRIORITIES, TABLE
from raftmesh.lab.local_cluster import LocalCluster
from raftmesh.lab.namespaces import RealAgent
from raftmesh.lab.sites import add_site

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not all(shutil.which(t) for t in ("wireguard-go", "wg", "nft")),
                       reason="needs root, wireguard-go, wg and nft"),
    pytest.mark.timeout(180),
]


GRANTS = {"internet": "autogroup:internet:*",  # the exit node forwards to the internet
          "peers": "dc@:22",  # the exit node is a peer, but forwards nothing
          "nothing": "10.9.9.9:22"}  # the exit node is no peer at all


def policy(grant: str) -> str:
    return json.dumps({"autoApprovers": {"exitNode": ["dc@"]},
                       "acls": [{"action": "accept", "src": ["dc@"], "dst": [GRANTS[grant]]}]})


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    cleanup_stale()
    tmp = str(tmp_path_factory.mktemp("exit"))
    lab, cluster, agents = Lab(), None, {}
    try:
        host = lab.connect_host()
        # the exit node has the "internet" (10.73.0.0/24, host www) behind it; the client
        # has no route there but through the mesh
        internet = add_site(lab, 73, [("ex", "192.0.2.31/24")], ["www"])
        client = lab.add("c", "192.0.2.32/24")
        cluster = LocalCluster(os.path.join(tmp, "cluster"), replicas=1, host=host,
                               extra_args=["--stream-keepalive", "2"])
        cluster.start_all()
        cluster.wait_ready(timeout=30)

        def api(method, path, body=None):
            status, answer = cluster.request(cluster.replicas[0], method, path, body)
            assert status in (200, 201), (method, path, status, answer)
            return answer
        api("POST", "/api/v1/users", {"name": "dc"})
        key = api("POST", "/api/v1/preauth-keys", {"user": "dc", "reusable": True})["key"]
        api("PUT", "/api/v1/policy", policy("internet"))
        servers = [r.api_url for r in cluster.replicas]
        agents["ex"] = RealAgent(lab, internet.routers["ex"], tmp, servers, key, "ex",
                                 ("--advertise-exit-node",))
        agents["c"] = RealAgent(lab, client, tmp, servers, key, "c", ("--exit-node", "host-ex"))
        for a in agents.values():
            a.start()
        yield {"lab": lab, "api": api, "agents": agents, "client": client,
               "www": internet.lan_ip("www")}
    finally:
        for a in agents.values():
            a.stop()
        if cluster is not None:
            cluster.stop_all()
        lab.close()


def rules(ns) -> list[dict]:
    return [r for r in json.loads(ns.run("ip", "-j", "-4", "rule", "show").stdout)
            if r.get("priority") in PRIORITIES]


def exit_node_of(api, name: str) -> tuple[str, str | None]:
    """(the node's id, the exit node its record says it uses)."""
    node = next(n for n in api("GET", "/api/v1/nodes")["nodes"] if n["name"] == name)
    return node["id"], node.get("exit_node")


def test_the_internet_through_the_exit_node_as_the_policy_allows(mesh):
    c, www, agent, api = mesh["client"], mesh["www"], mesh["agents"]["c"], mesh["api"]
    wait_for(lambda: c.ping(www), 60, what="the client reaches the internet via the exit node")
    ex, _ = exit_node_of(api, "host-ex")
    wait_for(lambda: exit_node_of(api, "host-c")[1] == ex, 30,
             what="the client reports the exit node it uses")
    assert {r["priority"] for r in rules(c)} >= {5200, 5201, 5220, 5230}
    routes = c.run("ip", "-4", "route", "show", "table", str(TABLE)).stdout
    assert routes.startswith(f"default dev {agent.ifname}")
    # the control plane stays reachable outside the tunnel: a change still arrives
    version = agent.status()["version"]
    mesh["api"]("PUT", "/api/v1/policy", policy("peers"))
    wait_for(lambda: (agent.status().get("version") or 0) > version, 30,
             what="the client streams the policy change")
    wait_for(lambda: not c.ping(www, timeout=0.5), 30, what="the exit node's filter drops it")
    mesh["api"]("PUT", "/api/v1/policy", policy("nothing"))
    wait_for(lambda: not rules(c), 30, what="no exit node any more: the rules are gone")
    wait_for(lambda: exit_node_of(api, "host-c")[1] is None, 30, what="and it reports none")
    client_id = exit_node_of(api, "host-c")[0]
    uses = [(e["before"].get("exit_node"), e["after"].get("exit_node")) for e in api(
        "GET", f"/api/v1/audit?target=node:{client_id}&action=node.report")["entries"]]
    assert [u for u in uses if u[0] != u[1]] == [(None, ex), (ex, None)]  # audited
    mesh["api"]("PUT", "/api/v1/policy", policy("internet"))
    wait_for(lambda: c.ping(www), 60, what="the internet back through the exit node")
    agent.stop()
    assert not rules(c) and not c.ping(www, timeout=0.5)  # no route there without the tunnel
    assert c.run("ip", "-4", "route", "show", "table", str(TABLE), check=False).stdout.strip() == ""
