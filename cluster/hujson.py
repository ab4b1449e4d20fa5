"""HuJSON (JSON with comments and trailing commas) read as JSON, at JSON's cost.

Like Tailscale's hujson `Standardize`: comments become spaces and trailing commas a space,
so the text keeps its length and line breaks and the stdlib's C parser then reads it, with
its errors pointing at the line and column the user wrote. json5, a general parser running
per character in Python, took 12 s for a 920 KB policy.

The scan stays in C but for one Python step per `/` and per comma-before-a-bracket: with
escape sequences masked, every quote opens or closes a string, so counting quotes between
such candidates tells which lie outside strings. Each character is looked at a fixed
number of times: linear time.
"""
from __future__ import annotations

import json
import re
from itertools import accumulate

MAX_DEPTH = 16  # arrays and objects nested in each other; a policy needs 4

_ESCAPE = re.compile(r"\\[\s\S]")  # a backslash and the character it escapes
_SLASH = re.compile("/")
_TRAILING_COMMA = re.compile(r",\s*[\]}]")
_STRINGS = re.compile(r'"[^"\n]*"')  # in text whose escapes are masked
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class HuJSONError(ValueError):
    """Not HuJSON; the message names the line and column."""


def standardize(text: str) -> str:
    """`text` as plain JSON of the same length: comments and trailing commas blanked."""
    plain, _ = _standardize(text)
    return plain


def _standardize(text: str) -> tuple[str, str]:
    """(standardised text, the same with every escape sequence masked as "__")."""
    masked = _ESCAPE.sub("__", text) if "\\" in text else text
    if "/" in masked:
        spans = _comments(masked)
        text, masked = _blank(text, spans), _blank(masked, spans)
    if "," in masked:
        spans = [(i, i + 1) for i in _outside_strings(masked, _TRAILING_COMMA)]
        text, masked = _blank(text, spans), _blank(masked, spans)
    return text, masked


def _outside_strings(masked: str, pattern: re.Pattern, skip=None):
    """Start offsets of `pattern`'s matches outside strings; `skip(start)` may return where
    to resume (a comment's end). A match inside a string resumes after that string, so a
    long string full of candidates costs one step, not one per candidate."""
    pos = 0  # outside any string; quotes before it are accounted for
    while (m := pattern.search(masked, pos)) is not None:
        start = m.start()
        if masked.count('"', pos, start) & 1:  # inside a string: resume after its end
            end = masked.find('"', start)
            if end < 0:
                return
            pos = end + 1
            continue
        yield start
        pos = skip(start) if skip is not None else start + 1


def _comments(masked: str) -> list[tuple[int, int]]:
    spans = []

    def comment_end(start: int) -> int:
        kind = masked[start + 1:start + 2]
        if kind == "/":
            end = masked.find("\n", start)
            end = len(masked) if end < 0 else end
        elif kind == "*":
            end = masked.find("*/", start + 2) + 2
            if end < 2:
                line = masked.count("\n", 0, start) + 1
                column = start - masked.rfind("\n", 0, start)
                raise HuJSONError(f"comment opened at line {line} column {column} never ends")
        else:  # a lone "/": left for the JSON parser to reject in place
            return start + 1
        spans.append((start, end))
        return end

    for _ in _outside_strings(masked, _SLASH, comment_end):
        pass
    return spans


def _blank(text: str, spans: list[tuple[int, int]]) -> str:
    """`text` with each span's characters but line breaks turned into spaces."""
    if not spans:
        return text
    pieces, at = [], 0
    for start, end in spans:
        pieces.append(text[at:start])
        chunk = text[start:end]
        pieces.append(_NOT_NEWLINE.sub(" ", chunk) if "\n" in chunk else " " * len(chunk))
        at = end
    pieces.append(text[at:])
    return "".join(pieces)


_NOT_NEWLINE = re.compile(r"[^\n]")


def loads(text: str):
    """Parse HuJSON; duplicate object keys and nesting deeper than MAX_DEPTH are errors."""
    plain, masked = _standardize(text)
    depth = nesting_depth(masked)
    if depth > MAX_DEPTH:
        raise HuJSONError(f"nested {depth} levels deep; the limit is {MAX_DEPTH}")
    try:
        return json.loads(plain, object_pairs_hook=_object_without_duplicates)
    except HuJSONError:
        raise
    except json.JSONDecodeError as e:
        raise HuJSONError(f"{e.msg.removesuffix(' at')} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise HuJSONError(str(e)) from None


def nesting_depth(masked: str) -> int:
    """How deeply arrays and objects nest in standardised text with escapes masked."""
    brackets = _NOT_BRACKETS.sub("", _STRINGS.sub("", masked))
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise HuJSONError(f"duplicate key {duplicate!r}")
    return obj
