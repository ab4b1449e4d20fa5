"""HuJSON standardised to JSON: comments and trailing commas blanked in place (so errors
point where the user wrote), never inside strings, in linear time."""
from __future__ import annotations

import json

import pytest

from raftmesh.cluster import hujson


@pytest.mark.parametrize("text, value", [
    ('{"a": [1, 2,],}', {"a": [1, 2]}),
    ('// top\n{"a": 1, /* mid */ "b": [ {"c": [3,],}, // end\n ],\n}', {"a": 1, "b": [{"c": [3]}]}),
    ('{"a": [1, /* a comment before the bracket */ ], "b": {"c": 1, // x\n}}',
     {"a": [1], "b": {"c": 1}}),
    ('/* "a quote in a comment */ {"a": "x"}', {"a": "x"}),
    # a backslash in a comment escapes nothing: the comment still ends where it seems to
    ('{ // C:\\dir\\\n "a": 1, /* ends here \\*/ "b": [2,]}', {"a": 1, "b": [2]}),
])
def test_comments_and_trailing_commas(text, value):
    plain = hujson.standardize(text)
    assert len(plain) == len(text) and plain.count("\n") == text.count("\n")
    assert json.loads(plain) == hujson.loads(text) == value


@pytest.mark.parametrize("text", [
    '{"url": "http://x/*y*/", "cidr": "10.0.0.0/8", "c": "a,]", "d": "b, }"}',
    r'{"q": "say \"//not a comment\", ok", "bs": "\\", "after": "/* still a string */"}',
    r'{"bs": "ends in a backslash \\", "x": [1, 2]}',
    r'{"u": "\u002f\u002f", "n": "line\nbreak,]"}',
])
def test_strings_are_left_alone(text):
    assert hujson.standardize(text) == text
    assert hujson.loads(text) == json.loads(text)


@pytest.mark.parametrize("text, message", [
    ('{\n  "a": 1 /* never closed', "comment opened at line 2 column 10 never ends"),
    ('{"a": 1 /*/', "comment opened at line 1 column 9 never ends"),
    ('{\n  "a": 1,\n  "b": x\n}', "Expecting value at line 3 column 8"),
    ('{"a": 1} /', "Extra data at line 1 column 10"),
    ('{\n // c\n "a": [1,\n\n  ,]}', "Expecting value at line 5 column 4"),
    ('{"a": "no end\n}', "Invalid control character at line 1 column 14"),
    ('{"a": 1, "b": {"a": 2, "a": 3}}', "duplicate key 'a'"),
    ("[" * 17 + "]" * 17, "nested 17 levels deep; the limit is 16"),
    ("[" + "1" * 5000 + "]", "Exceeds the limit (4300 digits) for integer string conversion: "
                            "value has 5000 digits; use sys.set_int_max_str_digits() to increase the limit"),
])
def test_errors_name_the_line_and_column(text, message):
    with pytest.raises(hujson.HuJSONError) as e:
        hujson.loads(text)
    assert str(e.value) == message


def test_brackets_in_strings_do_not_count_as_nesting():
    assert hujson.loads('{"a": "' + "[" * 50 + '"}') == {"a": "[" * 50}


def test_a_long_string_of_comment_and_comma_lookalikes_is_left_alone():
    text = '{"a": "' + "//,]" * 200_000 + '", "b": [1,],}'
    assert hujson.loads(text) == {"a": "//,]" * 200_000, "b": [1]}


