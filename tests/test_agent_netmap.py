"""The agent's safety rules, pure: signatures, never an older version, local expiry, staleness."""
from __future__ import annotations

import base64
import json
import secrets

import pytest
from nacl.signing import SigningKey

from raftmesh.agent.netmap_state import AgentNetmap, effective, next_expiry
from raftmesh.api.frames import ClusterKey, FrameError, FrameReader, FrameSigner, endorse
from raftmesh.api.machine_auth import b64
from raftmesh.api.wire import Netmap, NetmapDelta, Peer

NOW = 1_000_000.0


def cluster_key() -> ClusterKey:
    k = SigningKey.generate()
    return ClusterKey(secrets.token_hex(3), b64(bytes(k.verify_key)), b64(bytes(k)))


def peer(i: int, expiry=None) -> Peer:
    return Peer(f"n{i}", f"h{i}", b64(bytes(32 - len(str(i))) + str(i).encode()),
                (f"100.64.0.{i}/32",), (f"100.64.0.{i}/32",), key_expiry=expiry)


def decode(data: bytes) -> dict:
    (frame,) = FrameReader().feed(data)
    return frame


def full(signer: FrameSigner, version: int, peers=(), me=None) -> dict:
    nm = Netmap(version, me or peer(1), {p.id: p for p in peers})
    return decode(signer.frame("full", "n1", version, nm.to_json()))


def test_frames_are_applied_only_when_signed_by_a_pinned_or_endorsed_key():
    k1, k2, stranger = cluster_key(), cluster_key(), cluster_key()
    view = AgentNetmap("n1", {k1.id: k1.public_key})
    assert view.accept(full(FrameSigner(k1), 5)).kind == "full"
    with pytest.raises(FrameError, match="not pinned"):
        view.accept(full(FrameSigner(k2), 6))
    # k1 endorses k2 (rotation with overlap): k2 gets pinned and its frames apply
    v = view.accept(full(FrameSigner(k2, [endorse(k1, k2)]), 6))
    assert v.new_keys == {k2.id: k2.public_key} and view.version == 6
    assert view.accept(full(FrameSigner(k2), 7)).kind == "full"
    # an endorsement by a key the agent never pinned proves nothing
    with pytest.raises(FrameError):
        AgentNetmap("n1", {k1.id: k1.public_key}).accept(
            full(FrameSigner(stranger, [endorse(k2, stranger)]), 8))
    # tampering with any signed field, or a frame for another node, is refused
    frame = full(FrameSigner(k1), 9)
    for change in ({"version": 10}, {"node_id": "n2"}, {"kind": "delta"},
                   {"body": dict(frame["body"], peers=[peer(2).to_json()])}):
        with pytest.raises(FrameError):
            AgentNetmap("n1", {k1.id: k1.public_key}).accept(dict(frame, **change))


def test_a_repeated_keepalive_is_checked_once_and_a_changed_one_again(monkeypatch):
    """A replica repeats the same signed keepalive until its version moves: verified once.
    Anything else, a tampered copy included, and the same frame once its key is no longer
    the pinned one, is checked again."""
    import raftmesh.agent.netmap_state as ns
    k1 = cluster_key()
    signer = FrameSigner(k1)
    view = AgentNetmap("n1", {k1.id: k1.public_key})
    view.accept(full(signer, 5))
    checks = []
    real = ns.verify_frame
    monkeypatch.setattr(ns, "verify_frame", lambda *a: checks.append(a[0]) or real(*a))
    keepalive = decode(signer.frame("keepalive", "n1", 5, {}))
    for _ in range(3):
        v = view.accept(dict(keepalive))
        assert (v.kind, v.version) == ("keepalive", 5)
    assert len(checks) == 1
    for forged in (dict(keepalive, version=6), dict(keepalive, sig=keepalive["sig"][:-4] + "AAA=")):
        with pytest.raises(FrameError):
            view.accept(forged)
    assert len(checks) == 3
    assert view.accept(decode(signer.frame("keepalive", "n1", 6, {}))).version == 6
    assert len(checks) == 4
    view.pinned[k1.id] = cluster_key().public_key  # the key was replaced under its id
    with pytest.raises(FrameError):
        view.accept(decode(signer.frame("keepalive", "n1", 6, {})))


def test_never_applies_an_older_version_and_checks_body_versions():
    k = cluster_key()
    s = FrameSigner(k)
    view = AgentNetmap("n1", {k.id: k.public_key})
    with pytest.raises(FrameError, match="before any full"):
        view.accept(decode(s.frame("delta", "n1", 3, NetmapDelta(3).to_json())))
    view.accept(full(s, 10, [peer(2)]))
    assert view.accept(full(s, 9)).kind == "stale" and set(view.netmap.peers) == {"n2"}
    d = NetmapDelta(11, peers_changed=(peer(3),))
    assert view.accept(decode(s.frame("delta", "n1", 11, d.to_json()))).netmap.version == 11
    assert set(view.netmap.peers) == {"n2", "n3"}
    with pytest.raises(FrameError, match="does not match"):
        view.accept(decode(s.frame("delta", "n1", 12, NetmapDelta(13).to_json())))
    with pytest.raises(FrameError, match="malformed"):
        view.accept(decode(s.frame("full", "n1", 14, {"version": 14})))
    ka = view.accept(decode(s.frame("keepalive", "n1", 11, {})))
    assert ka.kind == "keepalive" and view.version == 11


def test_local_expiry_and_staleness():
    nm = Netmap(1, peer(1, expiry=NOW + 100), {"n2": peer(2, NOW + 10), "n3": peer(3)})
    assert effective(nm, NOW, NOW, 0) is nm
    assert set(effective(nm, NOW + 10, NOW, 0).peers) == {"n3"}
    assert effective(nm, NOW + 100, NOW, 0).peers == {}  # our own key expired
    assert effective(nm, NOW + 5, NOW - 50, 30).peers == {}  # stale beyond max_stale
    assert effective(nm, NOW + 5, NOW - 50, 0).peers.keys() == {"n2", "n3"}  # 0: keep using
    assert next_expiry(nm, NOW) == NOW + 10 and next_expiry(nm, NOW + 10) == NOW + 100


def test_frame_reader_splits_and_bounds_frames():
    k = cluster_key()
    data = b"".join(FrameSigner(k).frame("keepalive", "n1", v, {}) for v in range(3))
    reader = FrameReader()
    got = [f for i in range(0, len(data), 7) for f in reader.feed(data[i:i + 7])]
    assert [f["version"] for f in got] == [0, 1, 2]
    with pytest.raises(FrameError, match="exceeds"):
        FrameReader(max_frame=100).feed((1000).to_bytes(4, "little"))
    with pytest.raises(FrameError, match="not JSON"):
        FrameReader().feed((3).to_bytes(4, "little") + b"{x}")
    assert json.loads(json.dumps(got[0]))["kind"] == "keepalive"


@pytest.mark.parametrize("endorsed", [False, True])
def test_a_frame_is_the_canonical_json_of_its_members_signed_over_all_but_sig(endorsed):
    """The signer splices the signature into the signed text: the bytes must be exactly
    the canonical encoding of the whole frame, whatever the body holds."""
    from raftmesh.api.machine_auth import sign_payload
    from raftmesh.api.wire import frame_bytes, signed_part
    k1, k2 = cluster_key(), cluster_key()
    signer = FrameSigner(k2, [endorse(k1, k2)] if endorsed else [])
    bodies = [{}, {"version": 3, "peers": [peer(2).to_json()]},
              {"text": 'quote " backslash \\ tab \t ünïcode ✓ \ud83d\ude00', "n": [1.5, -2, None, True]},
              {"zz": {"version": 1, "sig": "not the frame's"}, "aa": []}]
    for version in (0, 7, 10**12):
        for kind in ("full", "delta", "keepalive", "bye"):
            for body in bodies:
                frame = {"kind": kind, "node_id": "n1", "version": version, "body": body,
                         "key_id": k2.id}
                if endorsed:
                    frame["endorsements"] = signer.endorsements
                frame["sig"] = sign_payload(SigningKey(base64.b64decode(k2.private_key)),
                                            signed_part(frame))
                assert signer.frame(kind, "n1", version, body) == frame_bytes(frame)
