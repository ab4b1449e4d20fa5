"""Ports for local clusters: a replica that loses its port to another socket before binding
it exits at start-up, which failed a whole test module's shared cluster in CI."""
import json
import socket

from raftmesh.lab.local_cluster import _ports_outside_ephemeral_range, free_ports


def _ephemeral_range() -> range:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = (int(x) for x in f.read().split())
    return range(low, high + 1)


def test_ports_are_outside_the_kernels_ephemeral_range():
    ephemeral = _ephemeral_range()
    assert _ports_outside_ephemeral_range(), "this machine's ephemeral range leaves no room"
    ports = free_ports(20)
    assert not [p for p in ports if p in ephemeral]


def test_no_port_is_returned_twice_by_one_process():
    seen = []
    for _ in range(50):
        seen += free_ports(4)
    assert len(seen) == len(set(seen)) == 200


def test_a_returned_port_can_be_bound():
    for port in free_ports(5):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
            s.listen()


def test_the_cluster_description_is_replaced_whole(tmp_path):
    """`raftmesh dev` rewrites cluster.json while scripts read it: a reader must find the old
    file or the new one, never one cut short (it is renamed into place, not truncated)."""
    from raftmesh.lab.local_cluster import DESCRIPTION, LocalCluster
    cluster = LocalCluster(str(tmp_path), replicas=3)
    path = tmp_path / DESCRIPTION
    cluster.write_description(str(path))
    before = path.stat().st_ino
    cluster.write_description(str(path))
    assert path.stat().st_ino != before, "rewritten in place"
    assert json.loads(path.read_text())["admin_key"] == cluster.admin_key
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(DESCRIPTION)] == [DESCRIPTION]
