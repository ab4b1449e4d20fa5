"""Ports for local clusters: a replica that loses its port to another socket before binding
it exits at start-up, which failed a whole test module's shared cluster in CI."""
import socket

from raftmesh.cluster.launcher import _ports_outside_ephemeral_range, free_ports


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
