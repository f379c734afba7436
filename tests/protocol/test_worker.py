"""The worker channel's `events` batch: round trip, expansion, and precise refusals."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import ProtocolError
from protocol.worker import (
    Reply,
    Sleep,
    WorkerEvent,
    WorkerEvents,
    decode,
    decode_all,
    encode,
    expand,
)

payloads = st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=20) | st.binary(max_size=20),
                           max_size=4)


@given(st.integers(1, 2**40), st.lists(st.tuples(st.text(min_size=1, max_size=10), payloads),
                                       min_size=1, max_size=30))
def test_events_batch_round_trips_to_consecutive_events(first: int, items: list[tuple[str, dict[str, Any]]]) -> None:
    batch = WorkerEvents(first, "ep", [n for n, _ in items], [cbor2.dumps(p) for _, p in items])
    assert decode(encode(batch)) == batch
    assert decode_all(encode(batch)) == [WorkerEvent(first + i, "ep", n, p) for i, (n, p) in enumerate(items)]


def test_other_messages_expand_to_themselves() -> None:
    # A message of the other direction: expand() passes anything but a batch through.
    assert expand(Sleep()) == [Sleep()]  # type: ignore[arg-type, comparison-overlap]
    assert decode_all(encode(Reply(3, True, "x"))) == [Reply(3, True, "x")]


@pytest.mark.parametrize("body, says", [
    ({"t": "events", "first": 1, "epoch": "e", "names": ["a", "b"], "payloads": [cbor2.dumps({})]},
     "as many names as payloads"),
    ({"t": "events", "first": 0, "epoch": "e", "names": ["a"], "payloads": [cbor2.dumps({})]},
     "first >= 1"),
    ({"t": "events", "first": 1, "epoch": "e", "names": [], "payloads": []}, "at least one"),
    ({"t": "events", "first": 1, "epoch": "e", "names": ["a"], "payloads": [{"x": 1}]}, "payloads bytes"),
    ({"t": "events", "first": 1, "epoch": "e", "names": [7], "payloads": [cbor2.dumps({})]}, "names must be"),
    ({"t": "events", "first": 1, "names": ["a"], "payloads": [cbor2.dumps({})]}, "'epoch'"),
    ({"t": "events", "first": True, "epoch": "e", "names": ["a"], "payloads": [cbor2.dumps({})]}, "'first'"),
    ({"t": "events", "first": 1, "epoch": "e", "names": ["a", "b"],
      "payloads": [cbor2.dumps({}), cbor2.dumps([1])]}, "payload 1 is not a CBOR map"),
    ({"t": "events", "first": 1, "epoch": "e", "names": ["a"], "payloads": [b"\xff\xff"]},
     "payload 0 is not valid CBOR"),
])
def test_malformed_batches_are_refused_whole_with_a_precise_error(body: dict[str, Any], says: str) -> None:
    with pytest.raises(ProtocolError, match=says):
        decode_all(cbor2.dumps(body))


def test_a_supervisor_message_from_a_worker_is_refused() -> None:
    with pytest.raises(ProtocolError, match="Sleep"):
        decode_all(encode(Sleep()))


@given(st.dictionaries(st.sampled_from(["t", "first", "epoch", "names", "payloads"]),
                       st.none() | st.integers() | st.text(max_size=4) | st.binary(max_size=8)
                       | st.lists(st.binary(max_size=8) | st.text(max_size=4), max_size=3)))
def test_any_events_shaped_frame_decodes_or_raises_protocol_error(body: dict[str, Any]) -> None:
    body["t"] = "events"
    try:
        decode_all(cbor2.dumps(body))
    except ProtocolError:
        pass
