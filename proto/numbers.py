"""The one parser for numbers that arrive as text: headers, query strings, path segments.

Python's int() and float() accept far more than a client should send: `nan`, `inf`,
`1e999`, `1_000`, ` 7 `, `+7` and non-ASCII digits (`٣`). `nan` compares false with every
bound, so a range check written as "refuse if out of range" lets it through: a signature
timestamp of `nan` passed the freshness window, and `?since=nan` switched a filter off.
Here a number is ASCII digits with an optional minus sign (and, where allowed, a decimal
fraction), no exponent, so it is always finite, and it must lie in a declared range.
"""
from __future__ import annotations

import re

MAX_SAFE_INTEGER = 2**53 - 1  # I-JSON (RFC 7493): larger integers lose precision in clients
_INTEGER = re.compile(r"-?[0-9]{1,16}")  # [0-9], not \d: \d matches every script's digits
_DECIMAL = re.compile(r"-?[0-9]{1,16}(?:\.[0-9]{1,9})?")


class NumberError(ValueError):
    """The text is not a number of the expected form and range; the message names it."""


def parse_number(text: str, name: str, *, integer: bool = True, minimum: float = -MAX_SAFE_INTEGER,
                 maximum: float = MAX_SAFE_INTEGER) -> int | float:
    """`text` as an int (or, with integer=False, a float that may have a fraction), checked
    to lie in [minimum, maximum]; NumberError naming `name` otherwise."""
    form = "an integer" if integer else "a decimal number"
    if not (_INTEGER if integer else _DECIMAL).fullmatch(text):
        raise NumberError(f"{name} must be {form} (ASCII digits) in [{minimum}, {maximum}]")
    value = int(text) if integer else float(text)
    if not minimum <= value <= maximum:
        raise NumberError(f"{name} must be {form} in [{minimum}, {maximum}], got {text}")
    return value
