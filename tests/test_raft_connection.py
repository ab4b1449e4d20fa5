"""Replica-to-replica reads after connection.install(): one recv per message, and
everything pysyncobj's own reads did (split and batched messages, end of stream).

The override works through pysyncobj's private method names; if an upgrade renamed them,
these tests fail instead of the override quietly never running."""
import socket
import time
from types import SimpleNamespace

import pysyncobj.tcp_server as pso_tcp_server
import pysyncobj.transport as pso_transport
import pytest
from pysyncobj.poller import PollPoller

from raftmesh.cluster.raft import connection
from raftmesh.cluster.raft.connection import OneCallReadConnection

RECV_BUFFER = 1024
QUIET_TIMEOUT = 0.2  # seconds; pysyncobj's connectionTimeout on the test links that need one


class CountingSocket:
    """A socket whose system calls are counted (pysyncobj takes any socket-like object)."""

    def __init__(self, sock):
        self.sock, self.calls = sock, []

    def __getattr__(self, name):
        attr = getattr(self.sock, name)
        if name in ("recv", "getsockopt", "send"):
            def counted(*args):
                self.calls.append(name)
                return attr(*args)
            return counted
        return attr


def _open_link(timeout: float) -> SimpleNamespace:
    """Our connection on one end of a socket pair, the peer's raw socket on the other."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    counting = CountingSocket(ours)
    link = SimpleNamespace(theirs=theirs, counting=counting, received=[], closed=[],
                           poller=PollPoller())
    link.conn = OneCallReadConnection(link.poller, onMessageReceived=link.received.append,
                                      onDisconnected=lambda: link.closed.append(True),
                                      socket=counting, recvBufferSize=RECV_BUFFER,
                                      timeout=timeout)
    link.poller.poll(0)  # the first event of a new connection: writable (pysyncobj's own path)
    counting.calls.clear()
    return link


@pytest.fixture(params=[10.0])
def link(request):
    """A link with pysyncobj's timeout `request.param` (10 s unless a test asks otherwise)."""
    link = _open_link(request.param)
    yield link
    link.conn.disconnect()
    link.theirs.close()


short_timeout = pytest.mark.parametrize("link", [QUIET_TIMEOUT], indirect=True)


def _poll_until(poller, condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        poller.poll(0.05)


def _framed(message) -> bytes:
    """What a peer's pysyncobj sends for `message` (its own encoder, ours for reading)."""
    sender = OneCallReadConnection(PollPoller())
    sender._TcpConnection__trySendBuffer = lambda: None  # keep the bytes instead of sending
    sender.send(message)
    return sender._TcpConnection__writeBuffer


def test_install_makes_pysyncobj_build_these_connections():
    connection.install()
    assert pso_transport.TcpConnection is OneCallReadConnection
    assert pso_tcp_server.TcpConnection is OneCallReadConnection


def test_a_message_costs_one_recv_and_no_getsockopt(link):
    link.theirs.sendall(_framed(("append_entries", 1)))
    _poll_until(link.poller, lambda: link.received)
    assert link.received == [("append_entries", 1)]
    assert link.counting.calls == ["recv"]


def test_split_batched_and_large_messages_arrive_whole_and_in_order(link):
    first, second = _framed("first"), _framed("second")
    link.theirs.sendall(first[:3])  # not even a length prefix yet
    link.poller.poll(0.05)
    assert link.received == []
    link.theirs.sendall(first[3:] + second)  # the rest of one and a whole other
    _poll_until(link.poller, lambda: len(link.received) == 2)
    large = bytes(range(256)) * 64  # 16 KiB: many reads of a 1 KiB buffer
    link.theirs.sendall(_framed(large))
    _poll_until(link.poller, lambda: len(link.received) == 3)
    assert link.received == ["first", "second", large]


def test_the_end_of_the_peers_stream_disconnects_after_what_it_sent(link):
    link.theirs.sendall(_framed("last words"))
    link.theirs.shutdown(socket.SHUT_WR)  # end of stream without a hang-up event: recv says so
    _poll_until(link.poller, lambda: link.closed)
    assert link.received == ["last words"]
    assert link.conn.fileno() is None  # unsubscribed and closed


def _let_pass(poller, seconds: float) -> None:
    """Handle the link's events while `seconds` go by (the tests below are about silence)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        poller.poll(min(0.05, max(0.0, deadline - time.monotonic())))


@short_timeout
def test_a_link_quiet_on_both_sides_for_longer_than_the_timeout_still_sends(link):
    """Two followers say nothing to each other until one asks for a vote: that request must
    leave, not find the link timed out (pysyncobj dropped it, and the election its vote)."""
    _let_pass(link.poller, 2.5 * QUIET_TIMEOUT)
    link.conn.send("request_vote")
    assert not link.closed, "a quiet link was dropped by its first send"
    link.theirs.settimeout(5)
    assert link.theirs.recv(1 << 16), "the vote request did not leave"


@short_timeout
def test_a_message_on_a_link_quiet_for_longer_than_the_timeout_is_read(link):
    """The other end of that: the follower asked for its vote must read the request, not
    find the link timed out first (pysyncobj checked before reading, and closed it)."""
    _let_pass(link.poller, 2.5 * QUIET_TIMEOUT)
    link.theirs.sendall(_framed("request_vote"))
    _poll_until(link.poller, lambda: link.received or link.closed)
    assert link.received == ["request_vote"] and not link.closed


@short_timeout
def test_a_peer_that_reads_nothing_of_what_it_is_kept_sent_is_cut_off(link):
    """A stopped follower (SIGSTOP, a hung process) keeps its socket open: the leader still
    gives up on the link after `timeout` without an answer instead of buffering for it."""
    deadline = time.monotonic() + 10 * QUIET_TIMEOUT
    while not link.closed:
        assert time.monotonic() < deadline, "a peer that never answered kept its link"
        link.conn.send("append_entries")
        _let_pass(link.poller, QUIET_TIMEOUT / 4)
    assert link.conn.fileno() is None
