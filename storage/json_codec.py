"""JSON for stored values, commands and audit entries, with the codecs built once.

json.dumps builds an encoder (and that a C encoder and a circular-reference table) on every
call, and json.loads on bytes sniffs the encoding first: together that cost more than
encoding or decoding a small record, on every write and on every replica.
"""
from __future__ import annotations

import json
from json import encoder as _json_encoder
from typing import Any, Callable

_decode = json.JSONDecoder().decode


def compact_json(sort_keys: bool) -> Callable[[Any], str]:
    """What json.dumps(value, sort_keys=sort_keys, separators=(",", ":")) returns. For
    values decoded from JSON or built from them, which cannot be circular."""
    make = getattr(_json_encoder, "c_make_encoder", None)
    if make is None:  # an interpreter without the C accelerator (PyPy has no such name)
        return json.JSONEncoder(sort_keys=sort_keys, separators=(",", ":")).encode

    def default(o):
        raise TypeError(f"Object of type {o.__class__.__name__} is not JSON serializable")
    encode = make(None, default, _json_encoder.encode_basestring_ascii, None, ":", ",",
                  sort_keys, False, True)
    return lambda value: "".join(encode(value, 0))


def loads_utf8(data: bytes | bytearray | str) -> Any:
    """json.loads for what this project writes (UTF-8, in fact ASCII), without sniffing."""
    return _decode(data.decode("utf-8", "surrogatepass")
                   if isinstance(data, (bytes, bytearray)) else data)
