"""The agent's safety rules, pure: signatures, never an older version, local expiry, staleness."""
from __future__ import annotations

import base64
import json
import secrets

import pytest
from nacl.signing import SigningKey

from raftmesh.agent.netmap_state import AgentNetmap, effective, next_expiry
from raftmesh.api.frames import ClusterKey, FrameError, FrameReader, FrameSigner, endorse
from raftmesh.api.machine_auth import b64, sign_payload
from raftmesh.api.wire import Netmap, NetmapDelta, Peer, signed_part

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


class Sender:
    """One replica's frames on one stream: the map request's nonce, numbered from 0."""

    def __init__(self, signer: FrameSigner, node: str = "n1"):
        self.signer, self.node = signer, node
        self.nonce, self.seq = secrets.token_hex(12), 0

    def begin(self, view: AgentNetmap) -> "Sender":
        view.begin_stream(self.nonce)
        return self

    def frame(self, kind: str, version: int, body: dict | None = None) -> dict:
        data = self.signer.frame(kind, self.node, version, {} if body is None else body,
                                 self.nonce, self.seq)
        self.seq += 1
        return decode(data)

    def full(self, version: int, peers=(), me=None) -> dict:
        return self.frame("full", version, Netmap(version, me or peer(1), {p.id: p for p in peers}).to_json())


def test_frames_are_applied_only_when_signed_by_a_pinned_or_endorsed_key():
    k1, k2, stranger = cluster_key(), cluster_key(), cluster_key()
    view = AgentNetmap("n1", {k1.id: k1.public_key})
    assert view.accept(Sender(FrameSigner(k1)).begin(view).full(5)).kind == "full"
    with pytest.raises(FrameError, match="not pinned"):
        view.accept(Sender(FrameSigner(k2)).begin(view).full(6))
    # k1 endorses k2 (rotation with overlap): k2 gets pinned and its frames apply
    rotated = Sender(FrameSigner(k2, [endorse(k1, k2)])).begin(view)
    v = view.accept(rotated.full(6))
    assert v.new_keys == {k2.id: k2.public_key} and view.version == 6
    rotated.signer = FrameSigner(k2)
    assert view.accept(rotated.full(7)).kind == "full"
    # an endorsement by a key the agent never pinned proves nothing
    with pytest.raises(FrameError):
        other = AgentNetmap("n1", {k1.id: k1.public_key})
        other.accept(Sender(FrameSigner(stranger, [endorse(k2, stranger)])).begin(other).full(8))
    # tampering with any signed field, or a frame for another node, is refused
    sender = Sender(FrameSigner(k1))
    frame = sender.full(9)
    for change in ({"version": 10}, {"node_id": "n2"}, {"kind": "delta"},
                   {"body": dict(frame["body"], peers=[peer(2).to_json()])},
                   {"nonce": "another-request"}, {"seq": 1}):
        fresh = AgentNetmap("n1", {k1.id: k1.public_key})
        fresh.begin_stream(change.get("nonce", sender.nonce))
        with pytest.raises(FrameError, match="signature|for node"):
            fresh.accept(dict(frame, **change))


def test_frames_of_another_stream_or_out_of_order_are_refused():
    """A keepalive replayed from an earlier stream would keep an agent cut off from the
    cluster "connected" to a frozen netmap; a frame dropped, repeated or reordered within
    the stream shows as a gap. Refused frames do not move the stream on."""
    k = cluster_key()
    view = AgentNetmap("n1", {k.id: k.public_key})
    earlier = Sender(FrameSigner(k)).begin(view)
    view.accept(earlier.full(5, [peer(2)]))
    captured = earlier.frame("keepalive", 5)
    assert view.accept(dict(captured)).kind == "keepalive"
    now = Sender(FrameSigner(k)).begin(view)  # the agent reconnected
    assert view.accept(now.frame("delta", 6, NetmapDelta(6, peers_removed=("n2",)).to_json())).version == 6
    with pytest.raises(FrameError, match="another map request"):
        view.accept(captured)
    keepalive = now.frame("keepalive", 6)
    assert view.accept(keepalive).kind == "keepalive"
    with pytest.raises(FrameError, match="1 of this stream where 2 was due"):
        view.accept(keepalive)  # repeated
    now.frame("delta", 7, NetmapDelta(7, peers_changed=(peer(3),)).to_json())  # dropped
    with pytest.raises(FrameError, match="3 of this stream where 2 was due"):
        view.accept(now.frame("keepalive", 7))
    assert view.version == 6 and view.netmap.peers == {}
    with pytest.raises(FrameError, match="no stream begun"):
        AgentNetmap("n1", {k.id: k.public_key}).accept(Sender(FrameSigner(k)).full(1))
    # a frame signed without nonce and sequence number (a replica from before them)
    legacy = {"kind": "keepalive", "node_id": "n1", "version": 6, "body": {}, "key_id": k.id}
    legacy["sig"] = sign_payload(SigningKey(base64.b64decode(k.private_key)), signed_part(legacy))
    with pytest.raises(FrameError, match="without its stream's nonce"):
        view.accept(legacy)


def test_never_applies_an_older_version_and_checks_body_versions():
    k = cluster_key()
    view = AgentNetmap("n1", {k.id: k.public_key})
    s = Sender(FrameSigner(k)).begin(view)
    with pytest.raises(FrameError, match="before any full"):
        view.accept(s.frame("delta", 3, NetmapDelta(3).to_json()))
    view.accept(s.full(10, [peer(2)]))
    assert view.accept(s.full(9)).kind == "stale" and set(view.netmap.peers) == {"n2"}
    d = NetmapDelta(11, peers_changed=(peer(3),))
    assert view.accept(s.frame("delta", 11, d.to_json())).netmap.version == 11
    assert set(view.netmap.peers) == {"n2", "n3"}
    with pytest.raises(FrameError, match="does not match"):
        view.accept(s.frame("delta", 12, NetmapDelta(13).to_json()))
    with pytest.raises(FrameError, match="malformed"):
        view.accept(s.frame("full", 14, {"version": 14}))
    ka = view.accept(s.frame("keepalive", 11))
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
    data = b"".join(FrameSigner(k).frame("keepalive", "n1", v, {}, "nonce", v) for v in range(3))
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
    from raftmesh.api.wire import frame_bytes
    k1, k2 = cluster_key(), cluster_key()
    signer = FrameSigner(k2, [endorse(k1, k2)] if endorsed else [])
    bodies = [{}, {"version": 3, "peers": [peer(2).to_json()]},
              {"text": 'quote " backslash \\ tab \t ünïcode ✓ \ud83d\ude00', "n": [1.5, -2, None, True]},
              {"zz": {"version": 1, "sig": "not the frame's"}, "aa": []}]
    for version, nonce, seq in ((0, "0123456789abcdef01234567", 0), (7, 'a "quoted\\ nonce', 1),
                                (10**12, "ünïcode ✓", 10**9)):
        for kind in ("full", "delta", "keepalive", "bye"):
            for body in bodies:
                frame = {"kind": kind, "node_id": "n1", "version": version, "body": body,
                         "key_id": k2.id, "nonce": nonce, "seq": seq}
                if endorsed:
                    frame["endorsements"] = signer.endorsements
                frame["sig"] = sign_payload(SigningKey(base64.b64decode(k2.private_key)),
                                            signed_part(frame))
                assert signer.frame(kind, "n1", version, body, nonce, seq) == frame_bytes(frame)
