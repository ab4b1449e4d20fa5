"""The agent's safety rules, pure: signatures and stream tags, never an older version, local
expiry, staleness."""
from __future__ import annotations

import base64
import json
import secrets

import pytest
from nacl.signing import SigningKey

from raftmesh.agent.netmap_state import AgentNetmap, effective, next_expiry
from raftmesh.proto.frames import (ClusterKey, FrameError, FrameReader, FrameSigner, encode_body,
                                 endorse, key_exchange_offer, next_frame, replica_tag_key, stream_keypair,
                                 tagged_frame)
from raftmesh.proto.machine_auth import b64, keyed_tag, sign_payload
from raftmesh.proto.wire import Netmap, NetmapDelta, Peer, signed_part

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
    """One replica's frames on one stream, by the replicas' own rule (next_frame): the map
    request's nonce, numbered from 0; with `keyed`, the agent sent a stream key, so frames
    after the first signed one are tagged."""

    def __init__(self, signer: FrameSigner, node: str = "n1", keyed: bool = False):
        self.signer, self.node_id = signer, node
        self.nonce, self.seq = secrets.token_hex(12), 0
        self.agent_keys = stream_keypair() if keyed else None
        replica_keys = stream_keypair()
        self.tag_key = replica_tag_key(replica_keys, self.agent_keys[0]) if keyed else None
        self.key_exchange = key_exchange_offer(self.agent_keys[0], replica_keys[0]) if keyed else None
        self.signed_by = None

    def begin(self, view: AgentNetmap) -> "Sender":
        view.begin_stream(self.nonce, self.agent_keys)
        return self

    def frame(self, kind: str, version: int, body: dict | None = None) -> dict:
        return decode(next_frame(self.signer, self, kind, version, encode_body(body or {})))

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
    data = b"".join(FrameSigner(k).frame("keepalive", "n1", v, b"{}", "nonce", v) for v in range(3))
    data += tagged_frame(bytes(32), "keepalive", "n1", 3, b"{}", "nonce", 3)
    reader = FrameReader()
    got = [f for i in range(0, len(data), 7) for f in reader.feed(data[i:i + 7])]
    assert [f["version"] for f in got] == [0, 1, 2, 3]
    with pytest.raises(FrameError, match="exceeds"):
        FrameReader(max_frame=100).feed((1000).to_bytes(4, "little"))
    with pytest.raises(FrameError, match="not JSON"):
        FrameReader().feed((3).to_bytes(4, "little") + b"{x}")
    assert json.loads(json.dumps(got[0]))["kind"] == "keepalive"


@pytest.mark.parametrize("endorsed", [False, True])
def test_a_frame_is_the_canonical_json_of_its_members_signed_over_all_but_sig(endorsed):
    """The signer splices the signature (or tag) into the signed text: the bytes must be
    exactly the canonical encoding of the whole frame, whatever the body holds."""
    from raftmesh.proto.wire import frame_bytes
    k1, k2 = cluster_key(), cluster_key()
    signer = FrameSigner(k2, [endorse(k1, k2)] if endorsed else [])
    tag_key = bytes(range(32, 64))
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
                offer = key_exchange_offer(bytes(range(32)), bytes(32)) if seq == 0 else None
                if offer:
                    frame["key_exchange"] = offer
                frame["sig"] = sign_payload(SigningKey(base64.b64decode(k2.private_key)),
                                            signed_part(frame))
                assert signer.frame(kind, "n1", version, encode_body(body), nonce, seq,
                                    offer) == frame_bytes(frame)
                tagged = {"kind": kind, "node_id": "n1", "version": version, "body": body,
                          "nonce": nonce, "seq": seq}
                tagged["tag"] = keyed_tag(tag_key, signed_part(tagged))
                assert tagged_frame(tag_key, kind, "n1", version, encode_body(body), nonce,
                                    seq) == frame_bytes(tagged)


def test_frames_after_a_signed_key_exchange_are_tagged_and_checked_against_its_key():
    """An agent that sent a stream key gets it back in the signed first frame; later frames
    carry a tag under a key only that replica and agent hold, which covers every member."""
    k = cluster_key()
    view = AgentNetmap("n1", {k.id: k.public_key})
    s = Sender(FrameSigner(k), keyed=True).begin(view)
    offer = s.key_exchange
    first = s.full(5, [peer(2)])
    assert "sig" in first and "tag" not in first and first["key_exchange"] == offer
    assert view.accept(first).kind == "full"
    delta = s.frame("delta", 6, NetmapDelta(6, peers_changed=(peer(3),)).to_json())
    assert "tag" in delta and not {"sig", "key_id", "key_exchange"} & delta.keys()
    assert view.accept(delta).version == 6 and set(view.netmap.peers) == {"n2", "n3"}
    keepalive = s.frame("keepalive", 6)
    for change in ({"version": 7}, {"node_id": "n2"}, {"kind": "bye"}, {"body": {"x": 1}},
                   {"nonce": s.nonce + "0"}, {"seq": 3}, {"tag": delta["tag"]}, {"tag": "ü"},
                   {"tag": 1}):
        with pytest.raises(FrameError, match="bad stream tag|for node"):
            view.accept(dict(keepalive, **change))
    assert view.accept(keepalive).kind == "keepalive"
    with pytest.raises(FrameError, match="both tagged and signed"):
        view.accept(dict(s.frame("keepalive", 6), sig=first["sig"], key_id=k.id))
    # the same frames on the agent's next stream: another tag key, so nothing replays
    again = Sender(FrameSigner(k), keyed=True).begin(view)
    view.accept(again.full(6, [peer(2), peer(3)]))
    with pytest.raises(FrameError, match="bad stream tag"):
        view.accept(dict(keepalive, nonce=again.nonce, seq=1))
    assert view.accept(again.frame("keepalive", 6)).kind == "keepalive"


def test_a_key_exchange_is_accepted_only_in_a_first_frame_for_this_agents_key():
    k = cluster_key()
    pinned = {k.id: k.public_key}
    # a tagged frame on a stream without a key exchange (an agent that sent no stream key)
    plain_view, keyed = AgentNetmap("n1", pinned), Sender(FrameSigner(k), keyed=True)
    keyed.nonce = Sender(FrameSigner(k)).begin(plain_view).nonce
    with pytest.raises(FrameError, match="did not ask"):
        plain_view.accept(keyed.full(1))
    with pytest.raises(FrameError, match="without a stream key"):
        plain_view.accept(dict(keyed.frame("keepalive", 1), seq=0))
    # the offer answers another agent's key (a relay swapped the header)
    view = AgentNetmap("n1", pinned)
    s = Sender(FrameSigner(k), keyed=True).begin(view)
    s.key_exchange = dict(s.key_exchange, agent=stream_keypair()[0].hex())
    with pytest.raises(FrameError, match="another agent key"):
        view.accept(s.full(1))
    # a key exchange later in the stream
    view = AgentNetmap("n1", pinned)
    s = Sender(FrameSigner(k)).begin(view)
    view.accept(s.full(1))
    late = Sender(FrameSigner(k), keyed=True)
    s.key_exchange = late.key_exchange
    with pytest.raises(FrameError, match="after a stream's first frame"):
        view.accept(s.frame("keepalive", 1))
    # malformed offers, signed as they are
    for offer in ("x", {"agent": 1, "replica": "r"}, {"replica": "r"}, {"replica": bytes(32).hex()}):
        view = AgentNetmap("n1", pinned)
        s = Sender(FrameSigner(k), keyed=True).begin(view)
        s.key_exchange = offer if isinstance(offer, str) or "agent" in offer else dict(
            offer, agent=s.agent_keys[0].hex())
        with pytest.raises(FrameError, match="malformed key_exchange|64 hex digits|unusable stream key"):
            view.accept(s.full(1))


def test_after_a_key_rotation_one_signed_frame_carries_the_endorsement_then_tags_resume():
    """Tagged frames alone would never show an agent the new cluster key, and it would be
    refused at its next stream once the old key retired."""
    k1, k2 = cluster_key(), cluster_key()
    view = AgentNetmap("n1", {k1.id: k1.public_key})
    s = Sender(FrameSigner(k1), keyed=True).begin(view)
    view.accept(s.full(1))
    assert view.accept(s.frame("keepalive", 1)).kind == "keepalive"
    s.signer = FrameSigner(k2, [endorse(k1, k2)])  # the replica's signer after the rotation
    rotated = s.frame("keepalive", 1)
    assert rotated["key_id"] == k2.id and "key_exchange" not in rotated
    assert view.accept(rotated).new_keys == {k2.id: k2.public_key}
    assert k2.id in view.pinned
    after = s.frame("delta", 2, NetmapDelta(2, peers_changed=(peer(2),)).to_json())
    assert "tag" in after and view.accept(after).version == 2
