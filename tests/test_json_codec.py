"""The prebuilt JSON codecs give json.dumps's bytes, with or without the C accelerator."""
from __future__ import annotations

import json
import types

import pytest

from raftmesh.storage import json_codec
from raftmesh.storage.json_codec import compact_json, loads_utf8

VALUES = [{"b": 1, "a": [1, "x", None, True, 1.5]}, {"ü": "✓ 😀", "q": 'a"b\\c'}, [], "s", 7]


@pytest.mark.parametrize("accelerated", [True, False])
def test_compact_json_matches_json_dumps(monkeypatch, accelerated):
    if not accelerated:
        monkeypatch.setattr(json_codec, "_json_encoder", types.SimpleNamespace())  # as on PyPy
    for sort_keys in (True, False):
        dumps = compact_json(sort_keys)
        for value in VALUES:
            assert dumps(value) == json.dumps(value, sort_keys=sort_keys, separators=(",", ":"))
            assert loads_utf8(dumps(value).encode("utf-8", "surrogatepass")) == value
        with pytest.raises(TypeError, match="not JSON serializable"):
            dumps({"x": object()})
