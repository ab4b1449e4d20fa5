"""Typed, versioned command records: what travels through the Raft log.

A command is canonical JSON bytes, never a pickled object of ours, so any replica version
can read it and nothing executable crosses the wire. Everything non-deterministic (time,
IDs, generated secrets) is decided by the proposer and carried in the record.

Every command is declared once, below, as a frozen dataclass: its op name (the only place
it is spelled), its argument fields with their types, and what it can affect (netmaps,
cluster keys, API keys). The field annotations are the validation: `int`, `float` (any
number), `str`, `bool`, `dict` (any object), `list[T]`, a TypedDict, unions, `None`, and
`Absent` for an argument a proposer may leave out. Left out and null are different
records (a node update without `name` keeps the name), and the log keeps the proposer's
bytes, so an absent argument stays absent: the field holds ABSENT and is not encoded.
"""
from __future__ import annotations

import types
import typing
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, Callable, ClassVar, TypedDict

from raftmesh.storage.json_codec import compact_json, loads_utf8

FORMAT_VERSION = 1
_encode = compact_json(sort_keys=True)


class CommandError(ValueError):
    """A record that is not a valid command (never produced by a correct proposer)."""


class Absent:
    """The type of ABSENT: an argument the proposer left out. Falsy, like a missing key; one
    instance, even through copy or pickle, so that `is ABSENT` always holds."""

    _instance: ClassVar["Absent | None"] = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = Absent()


def unless_absent(value: Any, default: Any = None) -> Any:
    """`value`, or `default` when the proposer left the argument out."""
    return default if value is ABSENT else value


# -- field validation, compiled once per command class ---------------------------------------
# Exact types, looked up in a set: decoded JSON has no subclasses, and True is not an int here.
_SCALARS: dict[Any, tuple[frozenset[type], str]] = {
    str: (frozenset({str}), "a string"),
    bool: (frozenset({bool}), "a boolean"),
    int: (frozenset({int}), "an integer"),
    float: (frozenset({int, float}), "a number"),
    dict: (frozenset({dict}), "an object"),
    type(None): (frozenset({type(None)}), "null"),
    Absent: (frozenset({Absent}), "left out"),
}
_LISTS = frozenset({list, tuple})
_Check = Callable[[Any], bool]
_Spec = tuple[frozenset[type], "_Check | None", str]  # exact types, else a check, and in words


def _spec(tp: Any) -> _Spec:
    """What values of annotation `tp` may be, and how to say it. Apply checks every command
    against these: a set lookup per scalar field, no per-command schema."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    scalars = frozenset().union(*(_SCALARS[o][0] for o in options if o in _SCALARS))
    compounds = [_compound(o) for o in options if o not in _SCALARS]
    if len(compounds) > 1:
        raise TypeError(f"one list or object type per field, not {tp!r}")
    wanted = " or ".join([_SCALARS[o][1] for o in options if o in _SCALARS and o is not Absent]
                         + [w for _, w in compounds])
    return scalars, compounds[0][0] if compounds else None, wanted


def _fits(spec: _Spec, value: Any) -> bool:
    return type(value) in spec[0] or (spec[1] is not None and spec[1](value))


def _compound(tp: Any) -> tuple[_Check, str]:
    if typing.get_origin(tp) is list:
        item = _spec(typing.get_args(tp)[0])
        return (lambda v: type(v) in _LISTS and all(_fits(item, x) for x in v)), f"a list of ({item[2]})"
    if typing.is_typeddict(tp):
        keys = tuple((k, _spec(t)) for k, t in typing.get_type_hints(tp).items())
        return ((lambda v: type(v) is dict and all(k in v and _fits(s, v[k]) for k, s in keys)),
                "an object with " + ", ".join(f"{k} ({s[2]})" for k, s in keys))
    raise TypeError(f"no validation for the annotation {tp!r}")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# -- the records ------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Command:
    """One replicated command: the envelope every record has, plus its op's arguments."""

    op: ClassVar[str]
    changes_netmaps: ClassVar[bool] = False  # a netmap is derived from what it changes
    result_is_node: ClassVar[bool] = False  # its result value is the node's whole new record
    result_lists_nodes: ClassVar[bool] = False  # its result value has the changed records
    changes_cluster_keys: ClassVar[bool] = False  # the netmap signer must be re-read
    changes_api_keys: ClassVar[bool] = False  # the only writers of the api_keys table
    read_barrier: ClassVar[bool] = False  # proves prior entries applied; changes nothing
    # added by a release: proposed only once every member's release applies it, since an
    # older replica would refuse what the others apply (api/command_gate.py)
    needs_every_member: ClassVar[bool] = False
    _arguments: ClassVar[tuple[tuple[str, bool], ...]] = ()  # (name, required)
    _checks: ClassVar[tuple[tuple[str, frozenset[type], _Check | None, str], ...]] = ()

    time: float = 0.0  # proposer's wall clock, unix seconds
    actor: str = "system"  # "apikey:<id>", "node:<id>", "replica:<id>" or "system"
    request_id: str | None = None  # idempotency key: replays return the first result

    def __post_init__(self):
        for name, scalars, compound, wanted in self._checks:
            value = getattr(self, name)
            if type(value) not in scalars and (compound is None or not compound(value)):
                raise CommandError(f"{self.op}: {name} must be {wanted}, not {_kind(value)}"
                                   if value is not ABSENT else f"{self.op}: {name} is required")

    def args(self) -> dict[str, Any]:
        """The arguments as they are encoded: every field given, none left out."""
        return {name: v for name, _ in self._arguments
                if (v := getattr(self, name)) is not ABSENT}

    def record(self) -> dict[str, Any]:
        """What encode() writes, before it is JSON (a batch holds its commands so)."""
        record = {"v": FORMAT_VERSION, "op": self.op, "args": self.args(),
                  "time": self.time, "actor": self.actor}
        if self.request_id is not None:
            record["request_id"] = self.request_id
        return record

    def encode(self) -> bytes:
        return _encode(self.record()).encode()

    @staticmethod
    def decode(data: bytes) -> "Command":
        """The record in `data`; a broken envelope raises CommandError, while an unknown op
        or arguments that do not fit the op give an Invalid record (applied as a rejection,
        like any other the state machine refuses)."""
        try:
            record = loads_utf8(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise CommandError(f"not JSON: {e}") from None
        return Command.from_record(record)

    @staticmethod
    def from_record(record: Any) -> "Command":
        """decode() of a record already parsed from JSON (one inside a batch)."""
        if not isinstance(record, dict) or record.get("v") != FORMAT_VERSION:
            raise CommandError(f"unsupported command format {record.get('v') if isinstance(record, dict) else None!r}")
        op, args = record.get("op"), record.get("args", {})
        if not isinstance(op, str) or not isinstance(args, dict):
            raise CommandError("command needs a string op and an object args")
        time = record.get("time", 0.0)
        if not isinstance(time, (int, float)):
            raise CommandError("command time must be a number")
        return build(op, args, time=float(time), actor=str(record.get("actor", "system")),
                     request_id=record.get("request_id"))


@dataclass(frozen=True, kw_only=True)
class Invalid(Command):
    """A decoded record no handler may apply: its op is unknown, or its arguments do not
    fit the op. The state machine rejects it with `code`, so it still takes its place in
    the log's order (and in the applied batches) like any other refused command."""

    op: str  # type: ignore[misc]  # as the record spelled it
    given: dict
    code: str  # "unknown_command" or "bad_command"
    message: str

    def args(self) -> dict[str, Any]:
        return self.given


COMMANDS: dict[str, type[Command]] = {}


def build(op: str, args: dict, *, time: float = 0.0, actor: str = "system",
          request_id: str | None = None) -> Command:
    """The typed record for `op` with `args` (what decode does inside the envelope), or an
    Invalid one. Arguments the op does not declare are ignored, as replicas always did (a
    newer proposer's extra argument must not split the cluster during an upgrade)."""
    envelope = {"time": time, "actor": actor, "request_id": request_id}
    cls = COMMANDS.get(op)
    if cls is None:
        return Invalid(op=op, given=args, code="unknown_command",
                       message=f"unknown command {op!r}", **envelope)
    # Filled in place rather than through the frozen __init__ (one object.__setattr__ per
    # field): every replica decodes every command, and this halves the cost of a large one.
    record = object.__new__(cls)
    values = record.__dict__
    for name, required in cls._arguments:
        if name in args:
            values[name] = args[name]
        elif required:
            return Invalid(op=op, given=args, code="bad_command",
                           message=f"{op}: {name} is required", **envelope)
        else:
            values[name] = ABSENT
    values.update(envelope)
    try:
        record.__post_init__()
    except CommandError as e:
        return Invalid(op=op, given=args, code="bad_command", message=str(e), **envelope)
    return record


def command(op: str, **properties: bool):
    """Declare a command class: a frozen record for op `op`, registered for decoding, its
    fields' checks compiled from their annotations."""
    def declare(cls: type[Command]) -> type[Command]:
        if op in COMMANDS:
            raise TypeError(f"command {op!r} is declared twice")
        cls = dataclass(frozen=True, kw_only=True)(cls)
        cls.op = op
        for name, value in properties.items():
            if not isinstance(getattr(Command, name, None), bool):
                raise TypeError(f"{cls.__name__}: {name} is not a command property")
            setattr(cls, name, value)
        hints = typing.get_type_hints(cls)
        own = [f for f in fields(cls) if f.name not in ("time", "actor", "request_id")]
        cls._arguments = tuple((f.name, f.default is not ABSENT) for f in own)
        cls._checks = tuple((f.name, *_spec(hints[f.name])) for f in own)
        COMMANDS[op] = cls
        return cls
    return declare


# -- cluster ------------------------------------------------------------------------------
@command("clock.tick")
class ClockTick(Command):
    """Moves the replicated clock when a key expiry is due and nothing else is written."""


@command("barrier", read_barrier=True)
class Barrier(Command):
    """Its application proves everything before it is applied here (linearizable reads)."""


@command("member.announce")
class MemberAnnounce(Command):
    id: str
    raft_addr: str
    api_url: str


@command("member.remove", changes_netmaps=True, result_lists_nodes=True)
class MemberRemove(Command):
    id: str


# -- API keys -----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class _NewApiKey(Command):
    id: str
    name: str
    scopes: list[str]
    hash: str
    expires_at: float | None | Absent = ABSENT


@command("apikey.bootstrap", changes_api_keys=True)
class ApiKeyBootstrap(_NewApiKey):
    """The first admin key, proposed by every replica configured with one."""


@command("apikey.create", changes_api_keys=True)
class ApiKeyCreate(_NewApiKey):
    pass


@command("apikey.delete", changes_api_keys=True)
class ApiKeyDelete(Command):
    id: str


# -- console sessions (cluster/session_apply.py) -----------------------------------------------
@command("session.create")
class SessionCreate(Command):
    """A console sign-in: a credential bound to API key `key_id`, stored as a hash."""
    id: str
    key_id: str
    hash: str
    expires_at: float


@command("session.end")
class SessionEnd(Command):
    id: str


# -- users and pre-auth keys ------------------------------------------------------------------
@command("user.create")
class UserCreate(Command):
    name: str
    display_name: str | None | Absent = ABSENT


@command("user.delete")
class UserDelete(Command):
    name: str


@command("preauthkey.create")
class PreauthKeyCreate(Command):
    id: str
    user: str
    hash: str
    reusable: bool | Absent = ABSENT
    ephemeral: bool | Absent = ABSENT
    expires_at: float | None | Absent = ABSENT
    usage_limit: int | None | Absent = ABSENT
    tags: list[str] | Absent = ABSENT


@command("preauthkey.delete")
class PreauthKeyDelete(Command):
    id: str


# -- policy -----------------------------------------------------------------------------------
@command("policy.set", changes_netmaps=True)
class PolicySet(Command):
    """A policy the proposer validated; `expected_version` guards against lost updates.
    `compiled` (cluster/policy_form.py) is what netmaps are derived from; entries written
    before it existed carry only the text. `warnings` are what the proposer's parser found
    the text to hold that raftmesh does not enforce ({code, path, message}, cluster/policy.py):
    decided there, so applying stays a function of the command."""

    text: str
    compiled: dict | Absent = ABSENT
    expected_version: int | None | Absent = ABSENT
    warnings: list[dict] | Absent = ABSENT


# -- nodes ------------------------------------------------------------------------------------
@command("node.register", changes_netmaps=True, result_is_node=True)
class NodeRegister(Command):
    id: str
    name: str
    machine_key: str
    node_key: str
    user: str | None | Absent = ABSENT
    tags: list[str] | Absent = ABSENT
    preauth_key_id: str | None | Absent = ABSENT
    endpoints: list[str] | Absent = ABSENT
    advertised_routes: list[str] | Absent = ABSENT
    key_expiry: float | None | Absent = ABSENT


@command("node.register_batch", needs_every_member=True)
class NodeRegisterBatch(Command):
    """Registrations that reached one replica together, as one Raft entry (group commit:
    one log append, replication and apply wake-up for them all instead of one each).

    `commands` holds node.register records as a single one is logged. Each is applied as
    if alone, in order, with its own result, idempotency record and audit entry
    (state_machine.py); one that is malformed or refused fails alone. Apply listeners get
    them one by one (cluster/raft/applied.py), so nothing downstream sees the batch."""

    commands: list[dict]

    @cached_property
    def registrations(self) -> tuple[Command, ...]:
        """The records, decoded once per replica; anything but a node.register is Invalid."""
        return tuple(_batched(NodeRegister, record, self) for record in self.commands)


def _batched(kind: type[Command], record: dict, batch: Command) -> Command:
    envelope = {"time": batch.time, "actor": batch.actor}
    try:
        cmd = Command.from_record(record)
    except CommandError as e:
        return Invalid(op=kind.op, given=record, code="bad_command", message=str(e), **envelope)
    if type(cmd) is not kind and not isinstance(cmd, Invalid):
        return Invalid(op=cmd.op, given=record, code="bad_command",
                       message=f"{batch.op} holds only {kind.op} records, not {cmd.op}", **envelope)
    return cmd


@command("node.update", changes_netmaps=True, result_is_node=True)
class NodeUpdate(Command):
    """Rename or retag; a field left out keeps its value."""

    id: str
    name: str | Absent = ABSENT
    tags: list[str] | Absent = ABSENT


@command("node.approve", changes_netmaps=True, result_is_node=True)
class NodeApprove(Command):
    """`user`: who the node belongs to from now on (left out: it keeps its owner, if any)."""

    id: str
    user: str | Absent = ABSENT


@command("node.expire", changes_netmaps=True, result_is_node=True)
class NodeExpire(Command):
    id: str


@command("node.routes", changes_netmaps=True, result_is_node=True)
class NodeRoutes(Command):
    id: str
    approved_routes: list[str]


@command("node.report", changes_netmaps=True, result_is_node=True)
class NodeReport(Command):
    """What an agent reports about itself; a field left out keeps its value."""

    id: str
    endpoints: list[str] | Absent = ABSENT
    advertised_routes: list[str] | Absent = ABSENT
    unreachable_routes: list[str] | Absent = ABSENT  # advertised, but its subnet is down
    exit_node: str | None | Absent = ABSENT  # the exit node it uses (its id), null: none
    last_seen: float | None | Absent = ABSENT


@command("node.rotate_key", changes_netmaps=True, result_is_node=True)
class NodeRotateKey(Command):
    id: str
    old_node_key: str
    node_key: str
    key_expiry: float | None | Absent = ABSENT  # left out: the expiry stays


@command("node.reauthenticate", changes_netmaps=True, result_is_node=True)
class NodeReauthenticate(Command):
    id: str
    preauth_key_id: str
    node_key: str | Absent = ABSENT  # left out: the key stays
    key_expiry: float | None | Absent = ABSENT


class PresenceChange(TypedDict):
    id: str
    online: bool
    session: str


@command("node.presence", changes_netmaps=True, result_lists_nodes=True)
class NodePresence(Command):
    """Map streams opened or closed on one replica, batched by it."""

    replica: str
    changes: list[PresenceChange]


@command("node.presence_sweep", changes_netmaps=True, result_lists_nodes=True)
class NodePresenceSweep(Command):
    """A replica (re)started: the streams it served before are gone."""

    replica: str


@command("node.delete", changes_netmaps=True)
class NodeDelete(Command):
    id: str


@command("node.key_expiry", changes_netmaps=True, result_is_node=True)
class NodeKeyExpiry(Command):
    """Disable key expiry for one node (a server), or enable it again with the expiry the
    proposer decided (`key_expiry`, null: never)."""

    id: str
    disabled: bool
    key_expiry: float | None | Absent = ABSENT


@command("node.remove_ephemeral", changes_netmaps=True)
class NodeRemoveEphemeral(Command):
    """The leader found these ephemeral nodes offline past the cluster's limit
    (cluster/lifecycle.py); each is removed only if that still holds when applied."""

    ids: list[str]


# -- cluster settings (cluster/dns_config.py, cluster/lifecycle.py) ---------------------------
@command("dns.set", changes_netmaps=True)
class DnsSet(Command):
    """The whole DNS settings record, as the proposer validated it."""

    settings: dict


@command("lifecycle.set")
class LifecycleSet(Command):
    """How long an ephemeral node may stay offline before it is removed (seconds)."""

    ephemeral_offline_seconds: float


# -- cluster signing keys ---------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class _NewClusterKey(Command):
    id: str
    public_key: str
    private_key: str
    overlap_seconds: float | Absent = ABSENT  # how long the previous key keeps verifying


@command("clusterkey.bootstrap", changes_cluster_keys=True)
class ClusterKeyBootstrap(_NewClusterKey):
    """The first netmap signing key, proposed by every replica until one exists."""


@command("clusterkey.rotate", changes_cluster_keys=True)
class ClusterKeyRotate(_NewClusterKey):
    pass


# -- single sign-on (api/oidc.py) -------------------------------------------------------------
@command("login.start")
class LoginStart(Command):
    """A login at the identity provider begins: what any replica needs to finish it when
    the browser comes back there (the callback may land on another replica than the one
    that started it). `id` is the sha256 of the OAuth `state`, which itself is never stored.
    `machine_key` and `node_key` for a device login; an admin login instead carries the hash
    of the API key secret its CLI generated (`key_hash`)."""

    id: str
    nonce: str
    code_verifier: str
    auth_url: str
    expires_at: float
    machine_key: str | Absent = ABSENT
    node_key: str | Absent = ABSENT
    hostname: str | Absent = ABSENT
    endpoints: list[str] | Absent = ABSENT
    advertised_routes: list[str] | Absent = ABSENT
    key_id: str | Absent = ABSENT
    key_hash: str | Absent = ABSENT


@command("login.complete", changes_netmaps=True, result_lists_nodes=True, changes_api_keys=True)
class LoginComplete(Command):
    """The identity provider vouched for `user` (a validated ID token) for login `id`: the
    login is used up, the user exists, and its device is registered (or re-authenticated) or
    its admin key is created. `node_id` and `key_expiry` are decided by the proposer."""

    id: str
    user: str
    subject: str
    groups: list[str]
    node_id: str | Absent = ABSENT
    key_expiry: float | None | Absent = ABSENT
    scopes: list[str] | Absent = ABSENT


# -- provisioning by SCIM 2.0 (api/scim.py) ---------------------------------------------------
@command("scim.put", changes_netmaps=True, result_lists_nodes=True, changes_api_keys=True)
class ScimPut(Command):
    """Create (`create`) or replace a SCIM User or Group: the whole resource as the proposer
    validated and stamped it (id, meta.created, meta.lastModified, meta.version). A User is
    also the raftmesh user named by its userName; deactivating it revokes its devices."""

    resource_type: str
    id: str
    resource: dict
    create: bool
    expected_version: str | None | Absent = ABSENT


@command("scim.delete", changes_netmaps=True, result_lists_nodes=True, changes_api_keys=True)
class ScimDelete(Command):
    resource_type: str
    id: str
    expected_version: str | None | Absent = ABSENT


# -- lock-down (cluster/revocation.py) --------------------------------------------------------
@command("user.lock", changes_netmaps=True, result_lists_nodes=True, changes_api_keys=True)
class UserLock(Command):
    """Revoke everything the user holds and refuse them until an admin unlocks them."""

    name: str
    reason: str


@command("user.unlock")
class UserUnlock(Command):
    name: str


@command("node.lock", changes_netmaps=True, result_lists_nodes=True)
class NodeLock(Command):
    """Revoke one device and refuse its machine until an admin unlocks it."""

    id: str
    reason: str


@command("node.unlock", changes_netmaps=True, result_is_node=True)
class NodeUnlock(Command):
    id: str
