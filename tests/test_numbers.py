"""Numbers that arrive as text are parsed by one strict parser (proto/numbers.py), so `nan`,
`inf` and friends cannot slip past a range check (`nan` compares false with every bound)."""
from __future__ import annotations

import secrets

import pytest
from nacl.signing import SigningKey

from raftmesh.proto.machine_auth import (FRESHNESS_SECONDS, HEADER_TIME, NonceCache, SignatureError,
                                         b64, sign_headers, signed_message, verify_headers)
from raftmesh.proto.numbers import MAX_SAFE_INTEGER, NumberError, parse_number

NOT_NUMBERS = ["", "nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e999", "1e3", "1E3", "0x10",
               "1_000", " 1", "1 ", "1\n", "+1", "--1", "1-", "\u0663", "\uff11", "1.", ".5", "1.2.3",
               "1,5", "9" * 17, "9" * 5000, "true"]


@pytest.mark.parametrize("text", ["0", "7", "-7", "0042", str(MAX_SAFE_INTEGER), str(-MAX_SAFE_INTEGER)])
def test_integers(text):
    value = parse_number(text, "n")
    assert type(value) is int and value == int(text)


@pytest.mark.parametrize("text", ["0", "1.5", "-2.25", "1765000000.123", "1765000000"])
def test_decimals(text):
    value = parse_number(text, "t", integer=False)
    assert type(value) is float and value == float(text)


@pytest.mark.parametrize("text", NOT_NUMBERS + ["1.5"])
def test_what_is_not_an_integer_is_refused_by_name(text):
    with pytest.raises(NumberError, match="^limit must be an integer"):
        parse_number(text, "limit")


@pytest.mark.parametrize("text", NOT_NUMBERS)
def test_what_is_not_a_decimal_is_refused_by_name(text):
    with pytest.raises(NumberError, match="^since must be a decimal number"):
        parse_number(text, "since", integer=False)


def test_range_is_inclusive_and_named():
    assert parse_number("1", "limit", minimum=1, maximum=1000) == 1
    assert parse_number("1000", "limit", minimum=1, maximum=1000) == 1000
    for text in ("0", "1001", "-5", str(MAX_SAFE_INTEGER + 1)):
        with pytest.raises(NumberError, match=r"limit must be an integer in \[1, 1000\], got"):
            parse_number(text, "limit", minimum=1, maximum=1000)
    with pytest.raises(NumberError, match="got 9007199254740992"):
        parse_number(str(MAX_SAFE_INTEGER + 1), "n")  # the default range is I-JSON's


# -- the signature timestamp -----------------------------------------------------------------
def signed_at(key: SigningKey, timestamp: str, nonce: str) -> dict:
    """Headers signed over an arbitrary timestamp text (sign_headers formats a float)."""
    headers = sign_headers(key, "POST", "/machine/report", b"{}", 0.0, nonce)
    message = signed_message("POST", "/machine/report", timestamp, nonce, b"{}")
    return {**headers, HEADER_TIME: timestamp, "X-Raftmesh-Signature": b64(key.sign(message).signature)}


@pytest.mark.parametrize("timestamp", ["nan", "NaN", "inf", "-inf", "1e999", "1.765e9", " 1765000000",
                                       "1765000000.5\n", "\u0661\u0667\u0666\u0665000000"])
def test_a_signature_timestamp_that_is_not_a_plain_number_is_refused(timestamp):
    key, now = SigningKey.generate(), 1765000000.0
    with pytest.raises(SignatureError, match="timestamp must be a decimal number"):
        verify_headers(signed_at(key, timestamp, secrets.token_hex(8)), "POST", "/machine/report", b"{}",
                       now, NonceCache())


def test_a_nan_timestamp_cannot_be_replayed_once_its_nonce_is_forgotten():
    """Before: `nan` passed the freshness check, so once the nonce cache forgot the nonce
    (after the window) the same captured request was accepted again, forever."""
    key, nonces, now = SigningKey.generate(), NonceCache(), 1765000000.0
    captured = signed_at(key, "nan", "n" * 16)
    for later in (now, now + 2 * FRESHNESS_SECONDS, now + 86400):
        with pytest.raises(SignatureError, match="timestamp"):
            verify_headers(captured, "POST", "/machine/report", b"{}", later, nonces)


def test_agents_timestamps_are_accepted():
    key, now = SigningKey.generate(), 1765000000.25
    headers = sign_headers(key, "POST", "/machine/report", b"{}", now, secrets.token_hex(8))
    assert verify_headers(headers, "POST", "/machine/report", b"{}", now + 1, NonceCache()) == \
        b64(bytes(key.verify_key))
