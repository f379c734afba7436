"""JSON-compat rules (RivetKit `common/encoding.ts`) and the limits on incoming values."""

from __future__ import annotations

import math
from typing import Any

import cbor2
import pytest

from protocol.compat import MAX_DEPTH, Form, escape, from_wire
from protocol.errors import ActorvisorError, ErrorCode, ProtocolError


def out(value: Any, form: Form = Form.JSON) -> Any:
    return escape(value, form=form, where="output", code=ErrorCode.INTERNAL)


def back(tree: Any, compat: bool = True) -> Any:
    return from_wire(tree, where="args", compat=compat)


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(("value", "wire"), [
    (["$x", 1], ["$$x", 1]),
    (["$$x", 1], ["$$$x", 1]),
    (["$", 1], ["$$", 1]),
    (["$x", ["$y", 2]], ["$$x", ["$$y", 2]]),
    (["$BigInt", "5"], ["$$BigInt", "5"]),
    (["$x"], ["$x"]),  # only pairs are special
    (["$x", 1, 2], ["$x", 1, 2]),
    (["x", 1], ["x", 1]),
    ([1, "$x"], [1, "$x"]),
    ({"$x": ["$y", None]}, {"$x": ["$$y", None]}),
    (b"\x00\xff", ["$Uint8Array", "AP8="]),
    ([b"\x01", 1], [["$Uint8Array", "AQ=="], 1]),
    (2**53 - 1, 2**53 - 1),
    (2**53, ["$BigInt", "9007199254740992"]),
    (-(2**80), ["$BigInt", "-1208925819614629174706176"]),
    (1.5, 1.5),
    (True, True),
    (None, None),
    ((1, 2), [1, 2]),
])
def test_json_escaping_round_trips(value: Any, wire: Any) -> None:
    assert out(value) == wire
    expected = list(value) if isinstance(value, tuple) else value
    assert back(wire) == expected


def test_cbor_form_keeps_bytes_and_escapes_pairs() -> None:
    assert out([b"\x01", ["$x", 1]], Form.CBOR) == [b"\x01", ["$$x", 1]]


def test_cbor_plain_form_is_what_cbor_x_writes_for_npm_args() -> None:
    plain = out([b"\x01", ["$x", 1]], Form.CBOR_PLAIN)
    assert plain == [cbor2.CBORTag(64, b"\x01"), ["$x", 1]]


def test_cbor_compat_form_is_what_encode_cbor_compat_writes() -> None:
    assert out([b"\x01", ["$x", 1], 2**60], Form.CBOR_COMPAT) == [
        ["$Uint8Array", "AQ=="], ["$$x", 1], ["$BigInt", str(2**60)]]


@pytest.mark.parametrize(("value", "shaped"), [
    (2**32 - 1, 2**32 - 1),
    (2**32, float(2**32)),  # a JS number: cbor-x would write float64 too
    (-(2**32), -(2**32)),
    (-(2**32) - 1, float(-(2**32) - 1)),
    (2**53 - 1, float(2**53 - 1)),
    (2**53, 2**53),  # beyond: a CBOR integer, which cbor-x reads as BigInt
    (2**70, 2**70),
])
def test_cbor_integers_are_shaped_for_cbor_x(value: int, shaped: Any) -> None:
    result = out(value, Form.CBOR)
    assert result == shaped and type(result) is type(shaped)
    assert back(result) == value and type(back(result)) is int


def test_integral_floats_arrive_as_int() -> None:
    # JS has one number type; cbor-x sends 2**40 as float64.
    assert back(float(2**40)) == 2**40 and type(back(float(2**40))) is int
    assert type(back(2.0)) is int
    assert type(back(2.5)) is float
    assert type(back(1e300)) is float


@pytest.mark.parametrize(("wire", "value"), [
    (["$BigInt", "-12"], -12),
    (["$BigInt", "0"], 0),
    (["$Uint8Array", ""], b""),
    (["$ArrayBuffer", "AQI="], b"\x01\x02"),
    (["$Undefined", 0], None),
    (cbor2.undefined, None),
    ({"a": cbor2.undefined}, {"a": None}),
    (["$$x", ["$$y", ["$BigInt", "1"]]], ["$x", ["$y", 1]]),
])
def test_revive(wire: Any, value: Any) -> None:
    assert back(wire) == value


def test_plain_values_are_taken_literally() -> None:
    assert back(["$x", 1], compat=False) == ["$x", 1]
    assert back(["$BigInt", "5"], compat=False) == ["$BigInt", "5"]
    assert back(["$$x", 1], compat=False) == ["$$x", 1]


@pytest.mark.parametrize(("wire", "problem"), [
    (["$x", 1], "args: unknown JSON-compat type '$x'"),
    (["$Set", [1]], "args: unknown JSON-compat type '$Set'"),
    ([1, {"a": ["$BigInt", 5]}], "args[1].a: $BigInt needs a decimal integer string, got 5"),
    (["$BigInt", "1e3"], "$BigInt needs a decimal integer string"),
    (["$BigInt", " 1"], "$BigInt needs a decimal integer string"),
    (["$BigInt", "9" * 1301], "$BigInt needs a decimal integer string"),
    (["$BigInt", "9" * 1300], "integer of 4319 bits is larger than 4096 bits"),
    ([1 << 4096], "args[0]: integer of 4097 bits is larger than 4096 bits"),
    (["$Uint8Array", "AQ"], "$Uint8Array needs valid padded base64"),
    (["$Uint8Array", "A*=="], "$Uint8Array needs valid padded base64"),
    (["$ArrayBuffer", 1], "$ArrayBuffer needs a base64 string"),
    (["$$x", [float("nan")]], "args[1][0]: nan is not a finite number"),
    ({"k": [math.inf]}, "args.k[0]: inf is not a finite number"),
    ({"a b": {1: 2}}, "args['a b']: map key 1 is not a string"),
    ({"s": "\ud800"}, "args.s: string contains a lone UTF-16 surrogate"),
    ({"\udc00": 1}, "lone UTF-16 surrogate"),
    ([cbor2.CBORSimpleValue(99)], "args[0]: unsupported value of type CBORSimpleValue"),
    ([{1, 2}], "args[0]: unsupported value of type set"),
    (nested(MAX_DEPTH + 1), f"nested deeper than {MAX_DEPTH} levels"),
])
def test_bad_values_name_their_path(wire: Any, problem: str) -> None:
    with pytest.raises(ProtocolError) as info:
        back(wire)
    assert problem in info.value.message
    assert info.value.code is ErrorCode.INVALID_MESSAGE


def test_depth_limit_is_inclusive() -> None:
    assert back(nested(MAX_DEPTH)) == nested(MAX_DEPTH)
    assert out(nested(MAX_DEPTH)) == nested(MAX_DEPTH)


@pytest.mark.parametrize(("value", "problem"), [
    ({"a": [1, {2, 3}]}, "cannot encode output.a[1]: unsupported type set"),
    ({"a": float("nan")}, "cannot encode output.a: nan is not a finite number"),
    ({1: "x"}, "cannot encode output: dict key 1 is not a str"),
    (["\ud800"], "cannot encode output[0]: string contains a lone UTF-16 surrogate"),
    (nested(MAX_DEPTH + 1), f"nested deeper than {MAX_DEPTH} levels"),
    ({"n": -(1 << 5000)}, "cannot encode output.n: integer of 5001 bits is larger than 4096"),
])
def test_encoding_a_value_outside_the_model_raises_with_the_given_code(
        value: Any, problem: str) -> None:
    with pytest.raises(ActorvisorError) as info:
        out(value)
    assert not isinstance(info.value, ProtocolError)
    assert info.value.code is ErrorCode.INTERNAL
    assert problem in info.value.message
    with pytest.raises(ActorvisorError) as info:
        escape(value, form=Form.CBOR_PLAIN, where="args", code=ErrorCode.INVALID_ARGS)
    assert info.value.code is ErrorCode.INVALID_ARGS


def test_str_and_int_subclasses_are_written_as_plain_values() -> None:
    from enum import IntEnum, StrEnum

    class Color(StrEnum):
        RED = "red"

    class Level(IntEnum):
        HIGH = 3

    result = out({"c": Color.RED, "l": Level.HIGH}, Form.CBOR)
    assert result == {"c": "red", "l": 3}
    assert type(result["c"]) is str and type(result["l"]) is int
