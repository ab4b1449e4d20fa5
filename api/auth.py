"""API keys: generated once, shown once, stored as hashes, checked against scopes.

A key is `rmk_<id>_<secret>`: the id finds the record without scanning, the 256-bit
secret is stored as sha256 (a slow hash adds nothing for random secrets of this size)
and compared in constant time.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

SCOPES = ("admin", "operator", "read", "audit", "scim")
# What each scope grants, besides `admin` which grants everything.
SCOPE_GRANTS = {
    "read": {"read"},
    "operator": {"read", "write"},
    "audit": {"audit"},
    "scim": {"scim"},  # provisioning users and groups (api/scim.py), nothing else
}


def new_secret_token(prefix: str, seed: bytes | None = None) -> tuple[str, str, str]:
    """(id, full token shown once, hash stored). With `seed` (secret and unique to one
    request, see Ctx.token_seed) the same token every time: a create retried with its
    Idempotency-Key is answered with the record it made the first time, and must hand out
    that record's credential, not a fresh one that matches nothing (found by chaos: a
    retried pre-auth key create returned a key every replica called unknown)."""
    if seed is None:
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    else:
        raw = hmac.new(seed, b"raftmesh secret token", hashlib.sha512).digest()
        key_id, secret = raw[:6].hex(), base64.urlsafe_b64encode(raw[6:38]).rstrip(b"=").decode()
    return key_id, f"{prefix}_{key_id}_{secret}", hash_secret(secret)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_token(token: str, prefix: str) -> tuple[str, str] | None:
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != prefix or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def allows(scopes: list[str], needed: str) -> bool:
    """`needed` is one of read, write, audit, admin."""
    if "admin" in scopes:
        return True
    return any(needed in SCOPE_GRANTS.get(s, ()) for s in scopes)


PEER_HEADER = "X-Raftmesh-Peer"


def peer_token(cluster_secret: str) -> str:
    """What one replica shows another for read-only status calls, so fan-out never
    forwards a client's API key to a member URL (which an admin could have mistyped)."""
    return hmac.new(cluster_secret.encode(), b"raftmesh peer read v1", hashlib.sha256).hexdigest()
