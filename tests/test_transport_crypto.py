"""Replica-to-replica traffic: sealed with AES-GCM (cluster/raft/transport_crypto.py), refused
unless sealed with the cluster secret, and coalesced per tick (cluster/raft/pysyncobj_replica.py).

pysyncobj unpickles what reaches the Raft port once it decrypts, so the tests that matter
send a pickle that would create a file if it were ever unpickled.
"""
from __future__ import annotations

import os
import pickle
import socket
import struct
import time
import zlib
from concurrent.futures import wait

import pytest
from pysyncobj.encryptor import getEncryptor

from raftmesh.cluster.commands import UserCreate
from raftmesh.cluster.config import ReplicaConfig
from raftmesh.lab.local_cluster import free_ports
from raftmesh.cluster.raft import Outcome
from raftmesh.cluster.raft.pysyncobj_replica import BATCH, RaftReplica
from raftmesh.cluster.raft.transport_crypto import AeadEncryptor, InvalidFrame
from waiting import wait_until

SECRET = "correct-cluster-secret-0123456789"
WRONG = "wrong-cluster-secret-0123456789ab"


# -- the encryptor on its own ---------------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    a = AeadEncryptor(SECRET)
    return a, AeadEncryptor(SECRET, _master=a._master)  # skip a second PBKDF2


def test_round_trip_and_counter_as_timestamp(pair):
    a, b = pair
    t1, t2 = a.encrypt_at_time(b"one", 123), a.encrypt_at_time(b"two", 0)
    assert b.extract_timestamp(t2) == b.extract_timestamp(t1) + 1
    assert b.decrypt(t1) == b"one" and b.decrypt(t2) == b"two"
    assert b"one" not in t1 and b"two" not in t2


def test_wrong_secret_is_refused(pair):
    _, b = pair
    with pytest.raises(InvalidFrame):
        b.decrypt(AeadEncryptor(WRONG).encrypt_at_time(b"hello", 0))


def test_every_tampered_byte_is_refused(pair):
    a, b = pair
    token = a.encrypt_at_time(b"payload", 0)
    for i in range(len(token)):
        bad = bytearray(token)
        bad[i] ^= 0x01
        with pytest.raises(InvalidFrame):
            b.decrypt(bytes(bad))
    for cut in (0, 1, 24, len(token) - 1):
        with pytest.raises(InvalidFrame):
            b.decrypt(token[:cut])
    assert b.decrypt(token) == b"payload"  # the original still opens


def test_replayed_frame_is_refused(pair):
    a, b = pair
    first, second = a.encrypt_at_time(b"1", 0), a.encrypt_at_time(b"2", 0)
    assert b.decrypt(first) == b"1" and b.decrypt(second) == b"2"
    with pytest.raises(InvalidFrame):
        b.decrypt(second)  # the same frame again
    with pytest.raises(InvalidFrame):
        b.decrypt(first)  # an older frame


def test_fernet_frames_are_refused(pair):
    _, b = pair
    token = getEncryptor(SECRET).encrypt_at_time(b"x", 1)
    with pytest.raises(InvalidFrame):
        b.extract_timestamp(token)
    with pytest.raises(InvalidFrame):
        b.decrypt(token)


# -- a running replica's Raft port ------------------------------------------------------
class _CreatesFile:
    """Unpickling this creates a file: proof that a frame reached pickle.loads."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _frame(encryptor: AeadEncryptor, message) -> bytes:
    data = encryptor.encrypt_at_time(zlib.compress(pickle.dumps(message), 3), 0)
    return struct.pack("i", len(data)) + data


def _closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True if the replica closed the connection; False if it answered instead."""
    sock.settimeout(timeout)
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def replica(tmp_path):
    (port,) = free_ports(1)
    r = RaftReplica(ReplicaConfig(id="solo", raft_addr=f"127.0.0.1:{port}", peers=[],
                                  data_dir=str(tmp_path / "solo"), cluster_secret=SECRET))
    wait_until(lambda: r.status.get("state") == "leader", what="single replica leads")
    yield r, port
    r.stop()


@pytest.mark.parametrize("case", ["wrong_secret", "tampered", "garbage"])
def test_replica_refuses_unauthenticated_frames_without_unpickling(replica, tmp_path, case):
    r, port = replica
    marker = str(tmp_path / f"unpickled-{case}")
    if case == "wrong_secret":
        frame = _frame(AeadEncryptor(WRONG), _CreatesFile(marker))
    elif case == "tampered":
        good = bytearray(_frame(AeadEncryptor(SECRET, _master=r.encryptor._master), _CreatesFile(marker)))
        good[-20] ^= 0x40  # one bit of the ciphertext
        frame = bytes(good)
    else:
        data = zlib.compress(pickle.dumps(_CreatesFile(marker)))
        frame = struct.pack("i", len(data)) + data  # unencrypted, as without a secret
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(frame)
        assert _closed_by_peer(sock), "the replica must drop the connection"
    assert not os.path.exists(marker), "the frame reached pickle.loads"
    assert r.status["state"] == "leader"  # and the replica carries on


def test_replica_answers_a_frame_sealed_with_the_secret(replica, tmp_path):
    """The control for the test above: the same frame, correctly sealed, is unpickled."""
    r, port = replica
    marker = str(tmp_path / "unpickled-ok")
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(_frame(AeadEncryptor(SECRET, _master=r.encryptor._master), _CreatesFile(marker)))
        wait_until(lambda: os.path.exists(marker), what="the sealed frame to be read")


# -- replicas together ----------------------------------------------------------------
def _cluster(tmp_path, secrets: list[str]) -> list[RaftReplica]:
    ports = free_ports(len(secrets))
    addrs = [f"127.0.0.1:{p}" for p in ports]
    return [RaftReplica(ReplicaConfig(id=f"r{i}", raft_addr=a, peers=[x for x in addrs if x != a],
                                      data_dir=str(tmp_path / f"r{i}"), cluster_secret=s))
            for i, (a, s) in enumerate(zip(addrs, secrets))]


def test_a_peer_with_the_wrong_secret_never_joins(tmp_path):
    replicas = _cluster(tmp_path, [SECRET, WRONG])
    try:
        deadline = time.monotonic() + 2.0  # more than 3 election timeouts
        while time.monotonic() < deadline:
            assert not any(r.status.get("has_quorum") for r in replicas)
            assert all(r.status.get("leader") is None for r in replicas)
            time.sleep(0.05)
        outcome = replicas[0].propose(UserCreate(name="x", time=1.0)).result(5)
        assert outcome.kind != Outcome.APPLIED
    finally:
        for r in replicas:
            r.stop()


def test_commands_forwarded_by_a_follower_are_batched_and_all_resolve(tmp_path):
    replicas = _cluster(tmp_path, [SECRET] * 3)
    try:
        leader = wait_until(lambda: next((r for r in replicas if r.status.get("state") == "leader"
                                          and r.status.get("has_quorum")), None), what="a leader")
        follower = next(r for r in replicas if r is not leader)
        wait_until(lambda: follower.status.get("leader") == leader.config.raft_addr, what="follower")
        sent = []
        send = follower._send_now
        follower._send_now = lambda node, message: (sent.append(message), send(node, message))[1]
        futures = [follower.propose(UserCreate(name=f"u{i}", time=1.0))
                   for i in range(40)]
        done, _ = wait(futures, timeout=10)
        assert len(done) == 40
        outcomes = [f.result() for f in futures]
        assert all(o.kind == Outcome.APPLIED and o.result["ok"] for o in outcomes)
        assert len({o.result["version"] for o in outcomes}) == 40, "each its own log entry"
        forwarded = [m for m in sent if m.get("type") == "apply_command"] + \
            [x for m in sent if m.get("type") == BATCH for x in m["messages"]
             if x.get("type") == "apply_command"]
        assert len(forwarded) == 40
        assert any(m.get("type") == BATCH for m in sent), "forwards share messages"
        # The leader ships the commit index before applying, so a follower may answer first:
        # read the leader as the API does, behind a read barrier.
        assert leader.barrier().result(timeout=10).kind == Outcome.APPLIED
        with leader.store.read() as txn:
            assert {f"u{i}" for i in range(40)} <= {k for k, _ in txn.items("users")}
    finally:
        for r in replicas:
            r.stop()
