"""The command registry: every op declared once, typed records validated, the log's bytes kept."""
from __future__ import annotations

import ast
import typing
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from raftmesh.cluster import state_machine as sm
from raftmesh.cluster.commands import (ABSENT, COMMANDS, Barrier, ClusterKeyRotate, Command,
                                       CommandError, Invalid, NodePresence, NodeUpdate, PolicySet,
                                       PreauthKeyCreate, UserCreate, build)

from test_state_machine import DictTxn

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("cluster", "storage", "proto", "api", "agent", "cli", "lab", "chaos", "bench")


def test_every_op_name_is_spelled_once_in_the_sources_in_its_declaration():
    found: dict[str, list[str]] = {op: [] for op in COMMANDS}
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for n in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(n, ast.Constant) and n.value in found:
                    found[n.value].append(f"{path.relative_to(ROOT)}:{n.lineno}")
    for op, places in found.items():
        assert len(places) == 1 and places[0].startswith("cluster/commands.py:"), (op, places)


def test_every_record_type_has_its_handler_and_nothing_else_does():
    assert set(sm.HANDLERS) == set(COMMANDS.values()) | {Invalid}


def test_declared_properties_are_what_the_feed_and_the_key_cache_relied_on():
    """The netmap feed's op lists and the API-key cache's `apikey.` prefix, as they were."""
    def ops(prop):
        return {op for op, cls in COMMANDS.items() if getattr(cls, prop)}
    node_record = {"node.register", "node.update", "node.approve", "node.expire", "node.routes",
                   "node.report", "node.rotate_key", "node.reauthenticate", "node.unlock",
                   "node.key_expiry"}
    assert ops("result_is_node") == node_record
    # Identity: a login registers a device or creates an admin's API key; deactivating or
    # locking a user revokes its devices and deletes the API keys its logins made.
    signed_in = {"login.complete", "scim.put", "scim.delete"}
    locks = {"user.lock", "node.lock"}
    assert ops("result_lists_nodes") == {"node.presence", "node.presence_sweep",
                                         "member.remove"} | signed_in | locks
    assert ops("changes_netmaps") == node_record | {"node.delete", "node.presence",
                                                    "node.presence_sweep", "member.remove",
                                                    "policy.set", "node.remove_ephemeral",
                                                    "dns.set"} | signed_in | locks
    assert ops("changes_cluster_keys") == {op for op in COMMANDS if op.startswith("clusterkey.")}
    assert ops("changes_api_keys") == {op for op in COMMANDS if op.startswith("apikey.")} | \
        signed_in | {"user.lock"}
    assert ops("read_barrier") == {"barrier"}


def _valid_args(cls: type[Command]) -> dict:
    hints = typing.get_type_hints(cls)
    def valid(tp):
        if typing.get_origin(tp) is list:
            return []
        return {float: 1.0, bool: True, dict: {}}.get(tp, "x")
    return {f.name: valid(hints[f.name]) for f in fields(cls) if f.default is MISSING}


def _wrong_value(cls: type[Command], name: str):
    """A JSON value of the wrong type for the field: a number where a string goes, else a string."""
    scalars = next(s for n, s, _, _ in cls._checks if n == name)
    return 7 if str in scalars else "7"


@pytest.mark.parametrize("op", sorted(COMMANDS))
def test_each_field_of_the_wrong_type_is_rejected_naming_the_op_and_the_field(op):
    cls = COMMANDS[op]
    assert build(op, _valid_args(cls)).__class__ is cls
    for f in fields(cls):
        if f.name in ("time", "actor", "request_id"):
            continue
        args = dict(_valid_args(cls), **{f.name: _wrong_value(cls, f.name)})
        cmd = build(op, args, time=5.0)
        assert isinstance(cmd, Invalid) and cmd.code == "bad_command", (op, f.name)
        assert cmd.message.startswith(f"{op}: {f.name} must be "), cmd.message
        txn = DictTxn()
        result = sm.apply(txn, Command.decode(cmd.encode()), 1)
        assert (result["ok"], result["code"], result["status"]) == (False, "bad_command", 400)
        assert result["message"] == cmd.message and txn.tables == {}, "a bad record changes nothing"


def test_missing_required_arguments_and_nested_shapes_are_rejected():
    cmd = build("node.update", {"name": "x"})
    assert isinstance(cmd, Invalid) and cmd.message == "node.update: id is required"
    bad_change = {"replica": "r1", "changes": [{"id": "n1", "online": "yes", "session": "s"}]}
    assert build("node.presence", bad_change).message.startswith("node.presence: changes must be a list")
    assert isinstance(build("user.create", {"name": "a", "display_name": None}), UserCreate)
    assert build("node.update", {"id": "n1", "name": None}).message == \
        "node.update: name must be a string, not null"
    assert build("preauthkey.create", {"id": "p", "user": "u", "hash": "h", "reusable": 1}).message \
        == "preauthkey.create: reusable must be a boolean, not int"
    with pytest.raises(CommandError, match="user.create: name must be a string, not int"):
        UserCreate(name=1)


def test_unknown_ops_and_broken_envelopes():
    cmd = Command.decode(b'{"v":1,"op":"user.rename","args":{"name":"a"},"time":1.0,"actor":"x"}')
    assert isinstance(cmd, Invalid) and cmd.op == "user.rename"
    result = sm.apply(DictTxn(), cmd, 1)
    assert (result["code"], result["message"]) == ("unknown_command", "unknown command 'user.rename'")
    for payload in (b"not json", b'{"v": 99, "op": "x"}', b'{"v":1,"op":3}', b'{"v":1,"op":"barrier","time":"0"}'):
        with pytest.raises(CommandError):
            Command.decode(payload)


def test_arguments_an_op_does_not_declare_are_ignored_as_before():
    """A newer proposer's extra argument must not make older replicas refuse what newer
    ones apply (rolling upgrades)."""
    cmd = Command.decode(b'{"v":1,"op":"user.create","args":{"name":"a","colour":"red"},'
                         b'"time":1.0,"actor":"x"}')
    assert cmd == UserCreate(name="a", time=1.0, actor="x")


def test_encoding_is_byte_for_byte_what_the_untyped_records_were():
    """Literal bytes the generic Command(op, args) of before produced for the same commands
    (journals on disk and replicas of the previous version read them)."""
    assert Barrier().encode() == b'{"actor":"system","args":{},"op":"barrier","time":0.0,"v":1}'
    assert UserCreate(name="alice", time=1700000000.5, actor="apikey:k1",
                      request_id="apikey:k1:idem:0123456789abcdef").encode() == (
        b'{"actor":"apikey:k1","args":{"name":"alice"},"op":"user.create",'
        b'"request_id":"apikey:k1:idem:0123456789abcdef","time":1700000000.5,"v":1}')
    assert PreauthKeyCreate(id="p1", user="alice", hash="h", reusable=False, ephemeral=True,
                            expires_at=1700003600.25, usage_limit=None, tags=["tag:web"],
                            time=1700000000.0, actor="apikey:k1").encode() == (
        b'{"actor":"apikey:k1","args":{"ephemeral":true,"expires_at":1700003600.25,"hash":"h",'
        b'"id":"p1","reusable":false,"tags":["tag:web"],"usage_limit":null,"user":"alice"},'
        b'"op":"preauthkey.create","time":1700000000.0,"v":1}')
    assert NodeUpdate(id="n1", tags=["tag:b", "tag:a"], time=1.0, actor="apikey:k1").encode() == (
        b'{"actor":"apikey:k1","args":{"id":"n1","tags":["tag:b","tag:a"]},"op":"node.update",'
        b'"time":1.0,"v":1}')
    assert NodePresence(replica="r1", changes=[{"id": "n1", "online": True, "session": "s1"}],
                        time=2, actor="replica:r1").encode() == (
        b'{"actor":"replica:r1","args":{"changes":[{"id":"n1","online":true,"session":"s1"}],'
        b'"replica":"r1"},"op":"node.presence","time":2,"v":1}')
    assert PolicySet(text='{"acls": []}', time=3.0, actor="apikey:k1").encode() == (
        b'{"actor":"apikey:k1","args":{"text":"{\\"acls\\": []}"},"op":"policy.set",'
        b'"time":3.0,"v":1}')
    assert ClusterKeyRotate(id="c1", public_key="pub", private_key="priv", overlap_seconds=86400,
                            time=4.0, actor="apikey:k1").encode() == (
        b'{"actor":"apikey:k1","args":{"id":"c1","overlap_seconds":86400,"private_key":"priv",'
        b'"public_key":"pub"},"op":"clusterkey.rotate","time":4.0,"v":1}')


def test_left_out_is_not_null_and_survives_a_round_trip():
    left_out = NodeUpdate(id="n1", tags=[], time=1.0)
    assert left_out.name is ABSENT and "name" not in left_out.args()
    assert Command.decode(left_out.encode()) == left_out
    assert Command.decode(PolicySet(text="{}", expected_version=None).encode()).expected_version is None

