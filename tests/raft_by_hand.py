"""A RaftReplica whose ticks the test drives by hand, and the Raft messages it is fed.

No background tick thread races the test; what the replica sends is captured instead of
leaving (its peers are addresses nobody listens on).
"""
from __future__ import annotations

import struct

from pysyncobj import pickle as pso_pickle

from raftmesh.cluster.commands import UserCreate
from raftmesh.cluster.config import ReplicaConfig
from raftmesh.cluster.raft.pysyncobj_replica import RaftReplica

REGULAR = struct.pack("B", 0)


def hand_driven(data_dir: str, me: str, peers: list[str]) -> RaftReplica:
    r = RaftReplica(ReplicaConfig(id="r", raft_addr=me, peers=peers, data_dir=data_dir,
                                  cluster_secret="s" * 16))
    r._stopping = True
    r._wake()
    r._thread.join(5)
    return r


def close(r: RaftReplica) -> None:
    r.destroy()
    r.store.close()


def capture_sends(r: RaftReplica) -> list:
    """Every message the replica flushes to a peer, batches opened, as (node, message)."""
    sent: list = []

    def send(node, message):
        for m in message["messages"] if message.get("type") == "rm_batch" else [message]:
            sent.append((node, m))
        return True
    r._send_now = send
    return sent


def regular(obj, method_name, *args) -> bytes:
    return REGULAR + pso_pickle.dumps((obj._methodToID[obj._getFuncName(method_name)], args))


def append_entries(term, prev_idx, prev_term, entries, commit) -> dict:
    return {"type": "append_entries", "term": term, "commit_index": commit,
            "prevLogIdx": prev_idx, "prevLogTerm": prev_term, "entries": entries}


def user_entry(r, idx, term, name):
    payload = UserCreate(name=name, time=1.0).encode()
    return (regular(r, "apply_command", payload), idx, term)


def users(r) -> list:
    with r.store.read() as txn:
        return sorted(k for k, _ in txn.items("users"))
