"""BARE primitives: the encodings @rivetkit/bare-ts writes, and every way a read can fail."""

from __future__ import annotations

import re

import pytest

from protocol.bare import UINT_MAX, BareReader, BareWriter
from protocol.errors import ErrorCode, ProtocolError


@pytest.mark.parametrize(("value", "encoded"), [
    (0, "00"),
    (1, "01"),
    (127, "7f"),
    (128, "8001"),
    (300, "ac02"),
    (2**53 + 1, "8180808080808010"),
    (UINT_MAX, "ffffffffffffffffff01"),
])
def test_uint_is_uleb128(value: int, encoded: str) -> None:
    writer = BareWriter()
    writer.uint(value)
    assert writer.getvalue().hex() == encoded
    reader = BareReader(bytes.fromhex(encoded), "Test")
    assert reader.uint("n") == value
    reader.end()


@pytest.mark.parametrize(("encoded", "problem"), [
    ("", "truncated uint"),
    ("80", "truncated uint"),
    ("ffffffff", "truncated uint"),
    ("8000", "non-canonical"),
    ("ff00", "non-canonical"),
    ("ffffffffffffffffff02", "larger than 2**64-1"),
    ("ffffffffffffffffff7f", "larger than 2**64-1"),
    ("ffffffffffffffffff8001", "longer than 10 bytes"),
])
def test_bad_uint(encoded: str, problem: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(problem)) as info:
        BareReader(bytes.fromhex(encoded), "Test").uint("id")
    assert "bare Test: field 'id' at byte 0" in info.value.message
    assert info.value.code is ErrorCode.INVALID_MESSAGE


def test_writer_refuses_uint_out_of_range() -> None:
    with pytest.raises(ValueError):
        BareWriter().uint(-1)
    with pytest.raises(ValueError):
        BareWriter().uint(UINT_MAX + 1)


def test_strings_data_bool_optional_round_trip() -> None:
    writer = BareWriter()
    writer.version(4)
    writer.string("héllo")
    writer.data(b"\x00\xff")
    writer.boolean(True)
    writer.optional(None, writer.string)
    writer.optional("k", writer.string)
    writer.u8(3)
    data = writer.getvalue()
    assert data.hex() == "0400" "0668c3a96c6c6f" "0200ff" "01" "00" "01016b" "03"
    reader = BareReader(data, "Test")
    reader.version(4)
    assert reader.string("s") == "héllo"
    assert reader.data("d") == b"\x00\xff"
    assert reader.boolean("b") is True
    assert reader.optional("o1", reader.string) is None
    assert reader.optional("o2", reader.string) == "k"
    assert reader.u8("t") == 3
    assert reader.remaining == 0
    reader.end()


def test_version_must_match() -> None:
    with pytest.raises(ProtocolError, match="unsupported protocol version 3 \\(expected 4\\)"):
        BareReader(b"\x03\x00", "Test").version(4)
    with pytest.raises(ProtocolError, match="'version' at byte 0: needs 2 bytes, only 1 left"):
        BareReader(b"\x04", "Test").version(4)


def test_bool_must_be_0_or_1() -> None:
    with pytest.raises(ProtocolError, match="'subscribe' at byte 0: a bool must be 0 or 1, got 2"):
        BareReader(b"\x02", "Test").boolean("subscribe")


def test_huge_length_is_refused_before_reading() -> None:
    data = bytes.fromhex("ffffffffffffffffff01") + b"abc"
    with pytest.raises(ProtocolError, match="'name' at byte 0: length 18446744073709551615 but "
                                            "only 3 bytes left"):
        BareReader(data, "Test").string("name")


def test_invalid_utf8_names_the_field_and_offset() -> None:
    reader = BareReader(b"\x01a\x02\xc3\x28", "Test")
    assert reader.string("a") == "a"
    with pytest.raises(ProtocolError, match="field 'b' at byte 2: invalid UTF-8"):
        reader.string("b")


def test_trailing_bytes_are_refused() -> None:
    reader = BareReader(b"\x01\x00\x00", "Test")
    reader.boolean("b")
    with pytest.raises(ProtocolError, match="2 trailing bytes after the message"):
        reader.end()
