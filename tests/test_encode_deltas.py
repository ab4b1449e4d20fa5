"""A replica encodes each delta the index made once, however many streams it goes to."""
import json

from raftmesh.api.map_stream import encode_deltas
from raftmesh.proto.wire import FilterDest, FilterRule, NetmapDelta, canonical_json


def test_a_delta_shared_by_many_nodes_is_encoded_once_and_each_other_delta_on_its_own():
    shared = NetmapDelta(7, peers_removed=("n9",))
    own = {k: NetmapDelta(7, packet_filter=(FilterRule(("192.0.2.0/24",), (FilterDest(f"100.64.0.{i}/32"),)),))
           for i, k in enumerate(("a", "b"), start=1)}
    bodies = encode_deltas({"x": shared, "y": shared, "z": shared, **own})
    assert bodies["x"] is bodies["y"] is bodies["z"]
    assert bodies["x"] == canonical_json(shared.to_json())
    assert json.loads(bodies["a"]) == own["a"].to_json() and json.loads(bodies["b"]) == own["b"].to_json()
    assert bodies["a"] != bodies["b"]
