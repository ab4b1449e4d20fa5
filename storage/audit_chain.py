"""Hash chain over audit entries: any edit, deletion or reordering breaks it.

Each entry's `hash` is sha256 over the previous entry's hash and the entry's canonical
JSON (without its own hash). Pure functions, shared by the state machine (which appends)
and `raftmesh audit verify` (which checks an export or the live log).
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable

from .json_codec import compact_json

GENESIS = "0" * 64


_canonical_str = compact_json(sort_keys=True)


def canonical(entry: dict[str, Any]) -> bytes:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return _canonical_str(body).encode()


def chain_hash(prev_hash: str, entry: dict[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical(entry)).hexdigest()


def seal(prev_hash: str, body: dict[str, Any]) -> tuple[str, bytes]:
    """(hash, stored JSON) of a new entry `body` (non-empty, no "hash" key yet).

    The stored JSON is the canonical encoding with the hash appended as the last member, so
    the entry is encoded once for both hashing and storage; verify() re-derives the same
    canonical bytes from it because key order does not matter to canonical()."""
    data = _canonical_str(body).encode()
    digest = hashlib.sha256(prev_hash.encode() + b"\n" + data).hexdigest()
    return digest, data[:-1] + b',"hash":"' + digest.encode() + b'"}'


def verify(entries: Iterable[dict[str, Any]], prev_hash: str = GENESIS,
           first_seq: int = 1) -> tuple[bool, str]:
    """Check an ordered run of entries; returns (ok, a sentence saying what is wrong).

    `prev_hash`/`first_seq` let an export that starts mid-log be checked from its anchor.
    """
    expected_seq = first_seq
    count = 0
    for entry in entries:
        seq = entry.get("seq")
        if seq != expected_seq:
            return False, f"entry {count + 1}: expected seq {expected_seq}, found {seq} (deleted or reordered)"
        if entry.get("prev_hash") != prev_hash:
            return False, f"seq {seq}: prev_hash does not match the previous entry (deleted or reordered)"
        if chain_hash(prev_hash, entry) != entry.get("hash"):
            return False, f"seq {seq}: hash does not match its content (edited)"
        prev_hash = entry["hash"]
        expected_seq += 1
        count += 1
    return True, f"{count} entries verified"
