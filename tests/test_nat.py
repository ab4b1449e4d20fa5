"""Real agents behind nftables NAT routers (lab/nat.py): endpoint discovery by STUN from the
WireGuard port, coordinated probing, direct paths where NATs allow, repair after a NAT
rebinding and an agent restart, probes from outside the mesh left unanswered, and relayed
pairs whose sessions are on one replica or on two.

One lab for the module (a replica, three routers, a public host) keeps the time bounded."""
from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import time
from contextlib import closing

import pytest
from nacl.public import PrivateKey
from netns import AgentsLab, wait_for

from raftmesh.agent import disco
from raftmesh.lab import nat

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not all(shutil.which(t) for t in ("wireguard-go", "wg", "nft")),
                       reason="needs root, wireguard-go, wg and nft"),
    pytest.mark.timeout(240),
]


ROUTERS = {"r1": "eim", "r2": "eim", "r3": "eim", "r4": "edm", "r5": "edm", "r6": "udp_blocked"}
HOSTS = {"a": "r1", "b": "r2", "c": "r3", "d": "r3", "e": "r4", "f": "r5", "g": "r6"}


class NatLab(AgentsLab):
    """a behind EIM router r1, b behind EIM router r2, c and d behind EIM router r3, e and f
    behind EDM routers r4 and r5, g behind r6 that lets no UDP out, p public; three
    replicas; every agent may reach every other (the benchmark's mesh policy)."""

    def __init__(self, tmp: str):
        super().__init__()
        try:
            gateway = nat.public_gateway()
            self.public = gateway.rsplit(".", 1)[0]
            host = self.lab.connect_host(gateway, routed=True)
            self.routers = {name: nat.add_router(self.lab, name, f"{self.public}.{i}/24", mode)
                            for i, (name, mode) in enumerate(ROUTERS.items(), 1)}
            self.ns = {label: self.routers[r].add_host(label) for label, r in HOSTS.items()}
            self.ns["p"] = self.lab.add("p", f"{self.public}.10/24")
            self.start_cluster(tmp, host)
            for label in self.ns:
                self.start(label)
            for label in self.ns:
                wait_for(lambda lb=label: len(self.agents[lb].status().get("peers", ())) == len(self.ns) - 1,
                         30, what=f"agent {label} sees all its peers")
        except BaseException:
            self.close()
            raise

    def overlay(self, label: str) -> str:
        return self.agents[label].status()["addresses"][0].split("/")[0]

    def node_key(self, label: str) -> str:
        st = self.agents[label].status()
        return next(p["node_key"] for other in self.agents.values() if other is not self.agents[label]
                    for p in other.status()["peers"] if p["id"] == st["node_id"])

    def wg_endpoint(self, label: str, peer: str) -> str | None:
        """Where `label`'s WireGuard sends to `peer` now."""
        agent = self.agents[label]
        out = agent.ns.run("wg", "show", agent.ifname, "endpoints", check=False).stdout
        key = self.node_key(peer)
        return next((line.split("\t")[1] for line in out.splitlines() if line.startswith(key)), None)

    def wan(self, router: str) -> str:
        """The router's public address now (the rebinding test changes r1's)."""
        return self.routers[router].ns.run("ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout.split()[3].split("/")[0]

    def direct_via(self, label: str, peer: str, host_ip: str) -> bool:
        """`label` reaches `peer` through the tunnel, and WireGuard sends to `host_ip`."""
        endpoint = self.wg_endpoint(label, peer) or ""
        return endpoint.startswith(host_ip + ":") and self.ns[label].ping(self.overlay(peer))

    def status(self, label: str) -> dict:
        """`raftmesh agent status --json` run in the agent's namespace, peers by name."""
        agent = self.agents[label]
        out = agent.ns.run(sys.executable, "-m", "raftmesh.cli.main", "agent", "status",
                           "--state-dir", agent.state_dir, "--json").stdout
        st = json.loads(out)
        st["peers"] = {p["name"]: p for p in st["peers"]}
        return st



@pytest.fixture(scope="module")
def natlab(tmp_path_factory):
    with closing(NatLab(str(tmp_path_factory.mktemp("nat")))) as lab:
        yield lab


def test_agents_behind_different_nats_discover_and_go_direct(natlab):
    r2_wan = f"{natlab.public}.2"
    wait_for(lambda: natlab.direct_via("a", "b", r2_wan), 15, what="a -> b direct via r2")
    wait_for(lambda: natlab.direct_via("b", "a", f"{natlab.public}.1"), 5, what="b -> a direct")
    b_peers = {p["name"]: p for p in natlab.agents["a"].status()["peers"]}
    assert f"{r2_wan}:41641" in b_peers["host-b"]["endpoints"]  # b's STUN-mapped address
    assert f"{natlab.ns['b'].ip}:41641" in b_peers["host-b"]["endpoints"]  # and its LAN one
    b = natlab.status("a")["peers"]["host-b"]
    assert b["path"] == {"kind": "direct", "endpoint": f"{r2_wan}:41641"}
    assert b["last_handshake"] and b["rx_bytes"] > 0 and b["tx_bytes"] > 0


def test_agents_behind_one_nat_use_their_lan_addresses(natlab):
    wait_for(lambda: natlab.direct_via("c", "d", natlab.ns["d"].ip), 15, what="c -> d over the LAN")
    wait_for(lambda: natlab.direct_via("d", "c", natlab.ns["c"].ip), 5, what="d -> c over the LAN")


def test_agent_behind_nat_and_public_agent_go_direct(natlab):
    wait_for(lambda: natlab.direct_via("a", "p", natlab.ns["p"].ip), 15, what="a -> p direct")
    wait_for(lambda: natlab.direct_via("p", "a", f"{natlab.public}.1"), 5, what="p -> a direct")


def test_probe_from_outside_the_mesh_is_not_answered(natlab):
    """An outsider on the public side pings p's WireGuard port with a well-formed probe under
    a key that is not in p's netmap: no pong ever comes back."""
    outsider = natlab.lab.add("x", f"{natlab.public}.20/24")
    key = PrivateKey.generate()
    p_key = base64.b64decode(natlab.node_key("p"))
    probe = disco.seal(disco.Probe(disco.PING, b"o" * 12), bytes(key), bytes(key.public_key), p_key)
    script = ("import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
              "s.settimeout(1.5)\nfor _ in range(3):\n s.sendto(bytes.fromhex(sys.argv[1]),(sys.argv[2],41641))\n"
              "try:\n print(s.recv(2048).hex())\nexcept socket.timeout:\n print('none')\n")
    out = outsider.run("python3", "-c", script, probe.hex(), natlab.ns["p"].ip).stdout.strip()
    assert out == "none"
    natlab.lab.remove("x")


def test_nat_rebinding_is_repaired_within_seconds(natlab):
    """r1 comes back with another public address (its mappings flushed): a's STUN sees the
    new mapping, b learns it from its map stream, and the pair is direct again."""
    old, new = f"{natlab.public}.1", f"{natlab.public}.31"
    wait_for(lambda: natlab.direct_via("b", "a", old), 15, what="b -> a direct before")
    r1 = natlab.routers["r1"].ns
    r1.run("ip", "addr", "del", f"{old}/24", "dev", "eth0")
    r1.run("ip", "addr", "add", f"{new}/24", "dev", "eth0")
    r1.run("ip", "route", "add", "default", "via", natlab.lab.gateway)
    started = time.monotonic()
    wait_for(lambda: natlab.direct_via("b", "a", new), 20, what="b -> a direct via r1's new address")
    assert time.monotonic() - started < 10


def test_agent_restart_finds_its_paths_again(natlab):
    natlab.agents["b"].stop()
    natlab.start("b")
    wait_for(lambda: natlab.agents["b"].status().get("state") == "connected", 20, what="b back")
    wait_for(lambda: natlab.direct_via("b", "a", natlab.wan("r1"))
             and natlab.direct_via("a", "b", natlab.wan("r2")), 20, what="a <-> b direct again")


def test_pairs_no_direct_path_can_join_are_relayed(natlab):
    """Both behind endpoint-dependent NATs, or one whose UDP is blocked: through the relay."""
    for src, dst in (("e", "f"), ("f", "e"), ("g", "a"), ("a", "g")):
        wait_for(lambda: natlab.direct_via(src, dst, "127.0.0.1"), 15, what=f"{src} -> {dst} relayed")
    relay = sorted(r.api_url for r in natlab.cluster.replicas)[0]
    assert natlab.status("e")["peers"]["host-f"]["path"] == {"kind": "relay", "replica": relay}


def test_relay_moves_to_another_replica_when_its_replica_dies(natlab):
    """The relay's replica (every agent's first choice) is killed: e reaches f through the
    next replica within 2 s."""
    wait_for(lambda: natlab.direct_via("e", "f", "127.0.0.1"), 15, what="e -> f relayed")
    relay = sorted(natlab.cluster.replicas, key=lambda r: r.api_url)[0]
    natlab.cluster.kill(relay)
    killed = time.time()
    prober = natlab.ns["e"].first_reply(natlab.overlay("f"), interval=0.01, wait=0.2, timeout=20)
    reply = prober.stdout.readline().split()
    assert reply, "no reply through the relay after its replica died"
    assert float(reply[0]) - killed < 2.0


def test_replicas_expose_reported_paths_and_setup_times(natlab):
    """Agents' acks carry their peers' paths and setup times; the replicas they stream from
    export them (raftmesh_agent_peer_paths, raftmesh_connect_setup_seconds)."""
    import urllib.request

    def metrics() -> dict[str, float]:
        total: dict[str, float] = {}
        for r in natlab.cluster.replicas:
            if not r.alive():
                continue
            with urllib.request.urlopen(r.api_url + "/metrics", timeout=10) as resp:
                for line in resp.read().decode().splitlines():
                    name = line.split(" ")[0]
                    if name.startswith(("raftmesh_agent_peer_paths{", "raftmesh_connect_setup_seconds_count")):
                        total[name] = total.get(name, 0.0) + float(line.split()[-1])
        return total
    natlab.agents["c"].stop()  # a netmap change (c goes offline) makes every agent ack
    natlab.start("c")
    # a, b, c, d, p reach each other directly (10 or more paths) once c's probes succeed again
    m = wait_for(lambda: (lambda m: m.get('raftmesh_agent_peer_paths{kind="direct"}', 0) >= 10
                          and m.get('raftmesh_agent_peer_paths{kind="relay"}', 0) > 0
                          and m.get("raftmesh_connect_setup_seconds_count", 0) > 0 and m)(metrics()),
                 30, what="10 direct paths, a relayed one and setup times in the replicas' metrics")
    assert m['raftmesh_agent_peer_paths{kind="direct"}'] >= 10
    live = next(r for r in natlab.cluster.replicas if r.alive())  # the relay test killed one

    def paths_of_e() -> dict | None:
        """e's paths as its serving replica reports them (e may ack after the others: the
        relay test moved it to another replica)."""
        status, body = natlab.cluster.request(live, "GET", "/api/v1/nodes")
        assert status == 200, body
        return next(((n["stream"] or {}).get("paths") for n in body["nodes"] if n["name"] == "host-e"), None)
    paths = wait_for(lambda: (lambda p: p and p.get("relay", 0) >= 1 and p)(paths_of_e()), 30,
                     what="e's relayed path to f in its node record")
    assert paths["relay"] >= 1  # e has no direct path to f


def test_relayed_agents_on_different_replicas_reach_each_other(natlab):
    """f keeps its relay session on another replica than e's (the only one it is given): the
    replicas forward between the two sessions over their relay link. (Last of the lab's
    tests: restarting f disturbs no other; the relay test killed one replica.)"""
    first, second = sorted(r.api_url for r in natlab.cluster.replicas if r.alive())[:2]
    f = natlab.agents["f"]

    def relays() -> tuple:
        return tuple(natlab.status(a)["peers"].get(f"host-{b}", {}).get("path") for a, b in (("e", "f"), ("f", "e")))
    f.stop()
    f.servers = [second]
    natlab.start("f")
    try:
        wait_for(lambda: relays() == ({"kind": "relay", "replica": first}, {"kind": "relay", "replica": second}),
                 20, what="e's session on the first replica, f's on the second")
        prober = natlab.ns["e"].first_reply(natlab.overlay("f"), interval=0.01, wait=0.2, timeout=15)
        assert prober.stdout.readline().split(), "no reply from f through two replicas"
    finally:
        f.stop()
        f.servers = natlab.servers
        natlab.start("f")


def test_bench_connect_tiny(tmp_path):
    """`raftmesh bench connect` at its smallest: one pair through EIM NATs (direct) and one
    through EDM NATs (relayed), Nebula beside them when installed; table, JSON and plot."""
    from raftmesh.bench import connect, nebula
    result = connect.run(str(tmp_path), rounds=1, replicas=1, timeout=20, nat_types=("eim", "edm"),
                         with_nebula=nebula.available())
    ours = {r["nat"]: r for r in result["rounds"] if r["system"] == "raftmesh"}
    assert ours["eim"]["connect_ms"] and ours["eim"]["path"] == "direct"
    assert ours["edm"]["connect_ms"] and ours["edm"]["path"] == "relay"
    assert result["failed_rounds"] == []
    if nebula.available():
        assert {r["nat"] for r in result["rounds"] if r["system"] == "nebula"} == {"eim", "edm"}
    assert json.loads((tmp_path / "connect.json").read_text())["summary"]
    assert (tmp_path / "connect.png").exists()


def test_bench_throughput_tiny(tmp_path):
    """`raftmesh bench throughput` at its smallest: iperf3 once through each of the direct,
    hand-configured and relayed tunnels; table, targets, JSON and plot."""
    if shutil.which("iperf3") is None:
        pytest.skip("needs iperf3")
    from raftmesh.bench import throughput
    result = throughput.run(str(tmp_path), seconds=1, rounds=1, replicas=1)
    assert {s["path"]: s["rounds"] for s in result["summary"]} == {"direct": 1, "hand": 1, "relay": 1}
    assert all(r["mbit_s"] > 1 for r in result["rounds"])
    assert [t["what"].split()[0] for t in result["targets"]] == ["direct", "relay"]
    assert json.loads((tmp_path / "throughput.json").read_text())["summary"]
    assert (tmp_path / "throughput.png").exists()
