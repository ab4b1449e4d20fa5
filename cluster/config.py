"""Replica configuration: from a TOML file, flags or code, validated before anything starts."""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields

MIN_SECRET_BYTES = 16
MAX_REGISTER_BATCH = 256  # bounds an entry's size (~0.5 KiB a registration) and its apply


class ConfigError(ValueError):
    """A configuration a replica must refuse to start with; the message says why."""


@dataclass
class ReplicaConfig:
    id: str
    raft_addr: str  # host:port of this replica's Raft transport
    peers: list[str]  # Raft addresses of the other members at start
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    api_url: str = ""  # how clients and other replicas reach this replica's API
    data_dir: str = "./raftmesh-data"
    cluster_secret: str = field(default="", repr=False)
    # "fsync": the journal is synced before an entry is acknowledged (default).
    # "none": skip fsync; survives process crashes, but an OS crash or power loss on a
    # majority can lose acknowledged writes. See docs/durability.md.
    durability: str = "fsync"
    bootstrap_admin_key: str = field(default="", repr=False)  # proposed if no API key exists
    # Raft timing (seconds). Heartbeats every 50 ms, elections after 0.3-0.6 s of silence.
    heartbeat: float = 0.05
    election_min: float = 0.3
    election_max: float = 0.6
    tick: float = 0.05  # longest idle wait; commands and sockets wake the loop at once
    snapshot_min_entries: int = 5000
    snapshot_min_seconds: int = 300
    write_timeout: float = 5.0  # after this a write's outcome is reported unknown
    max_body_bytes: int = 1 << 20
    ready_max_lag: int = 100  # /readyz fails when applied index trails commit by more
    # at most this many registrations grouped in one Raft entry (api/group_commit.py); 1: one
    # entry each (held back anyway until every member applies them: api/command_gate.py)
    register_batch: int = 256
    audit_export_file: str = ""  # append audit entries as JSON lines here
    audit_export_url: str = ""  # or POST them to this HTTP endpoint
    stream_keepalive: float = 10.0  # map-stream keepalive period (agents give up after 2x)
    node_key_lifetime: float = 0.0  # default key expiry of new nodes, seconds (0: never)
    join: bool = False  # start as a new member being added to a running cluster
    # Single sign-on (docs/identity.md): the OpenID Connect provider devices and admins log in at.
    oidc_issuer: str = ""  # empty: no SSO; agents without an auth key wait for approval
    oidc_client_id: str = ""
    oidc_client_secret: str = field(default="", repr=False)  # or RAFTMESH_OIDC_CLIENT_SECRET
    oidc_redirect_url: str = ""  # the callback as browsers reach it (default api_url + /oidc/callback)
    oidc_scopes: str = "openid email profile"  # add "groups" for Okta's groups claim
    oidc_user_claim: str = "email"  # the ID token claim that names the raftmesh user
    oidc_groups_claim: str = "groups"
    oidc_group_scopes: dict = field(default_factory=dict)  # IdP group -> API scopes of admin logins
    login_timeout: float = 600.0  # a login not finished by then must start again
    admin_login_lifetime: float = 3600.0  # the API key an admin login gives expires after this
    # UDP port of the STUN responder agents ask for their outside address; 0: the API's
    # port number (UDP and TCP ports are separate, so one number serves API and STUN).
    stun_port: int = 0

    @property
    def stun_udp_port(self) -> int:
        return self.stun_port or self.api_port

    def __post_init__(self) -> None:
        if not self.api_url:
            self.api_url = f"http://{self.api_host}:{self.api_port}"
        if not self.oidc_redirect_url:
            self.oidc_redirect_url = self.api_url + "/oidc/callback"
        if not self.oidc_client_secret:
            self.oidc_client_secret = os.environ.get("RAFTMESH_OIDC_CLIENT_SECRET", "")

    def validate(self) -> None:
        secret = self.cluster_secret.encode()
        if not secret:
            raise ConfigError(
                "a cluster secret is required: pysyncobj unpickles whatever reaches the Raft "
                "port, so replicas must authenticate each other (set cluster_secret or "
                "RAFTMESH_CLUSTER_SECRET)")
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"the cluster secret must be at least {MIN_SECRET_BYTES} bytes, "
                              f"got {len(secret)}")
        if self.durability not in ("fsync", "none"):
            raise ConfigError(f"durability must be 'fsync' or 'none', not {self.durability!r}")
        if self.raft_addr in self.peers:
            raise ConfigError("peers must not include this replica's own raft_addr")
        if not 0 <= self.stun_port <= 65535:
            raise ConfigError(f"stun_port must be a UDP port (0: the API port), not {self.stun_port}")
        if not 0 < self.stream_keepalive <= 15:
            raise ConfigError("stream_keepalive must be in (0, 15] seconds")
        if self.node_key_lifetime < 0:
            raise ConfigError("node_key_lifetime must be >= 0 (0 means keys never expire)")
        if self.oidc_issuer and not (self.oidc_client_id and self.oidc_client_secret):
            raise ConfigError("oidc_issuer needs oidc_client_id and oidc_client_secret "
                              "(or RAFTMESH_OIDC_CLIENT_SECRET)")
        if not isinstance(self.oidc_group_scopes, dict) or not all(
                isinstance(s, list) and all(isinstance(x, str) for x in s)
                for s in self.oidc_group_scopes.values()):
            raise ConfigError('oidc_group_scopes maps group names to lists of API scopes, e.g. '
                              '{netadmins = ["admin"]}')
        if not 1 <= self.register_batch <= MAX_REGISTER_BATCH:
            raise ConfigError(f"register_batch must be in [1, {MAX_REGISTER_BATCH}], not "
                              f"{self.register_batch}")
        if not 30 <= self.login_timeout <= 3600:
            raise ConfigError("login_timeout must be in [30, 3600] seconds")
        if not self.heartbeat > 0:
            raise ConfigError(f"heartbeat must be > 0 seconds, not {self.heartbeat}")
        if not self.election_min > 3 * self.heartbeat or not self.election_max > self.election_min:
            raise ConfigError("need election_min > 3 x heartbeat and election_max > election_min")

    @classmethod
    def from_toml(cls, path: str, **overrides) -> "ReplicaConfig":
        with open(path, "rb") as f:
            raw = tomllib.load(f)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown settings {unknown}")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        raw.setdefault("cluster_secret", os.environ.get("RAFTMESH_CLUSTER_SECRET", ""))
        return cls(**raw)
