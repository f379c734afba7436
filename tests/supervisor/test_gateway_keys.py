"""Actor keys: the manager API's serialized form and the gateway query form name one actor.

Expected strings are what RivetKit's `serializeActorKey` (rivetkit@2.3.19,
`src/actor/keys.ts`) produces for the same parts, and the query form is the client's
`key.join(",")` from `buildActorQueryGatewayUrl`.
"""

from __future__ import annotations

import pytest

from supervisor.gateway import key_for_manager_api, key_from_manager_api

CASES = [
    ([], "/", ""),
    (["my-agent"], "my-agent", "my-agent"),
    (["team", "agent"], "team/agent", "team,agent"),
    (["a/b", "c"], "a\\/b/c", "a/b,c"),
    (["back\\slash"], "back\\\\slash", "back\\slash"),
    (["", "x"], "\\0/x", ",x"),
]


@pytest.mark.parametrize(("parts", "serialized", "query"), CASES)
def test_manager_key_to_query_form(parts: list[str], serialized: str, query: str) -> None:
    assert query == ",".join(parts)
    assert key_from_manager_api(serialized) == query


@pytest.mark.parametrize(("parts", "serialized", "query"), CASES)
def test_query_form_to_manager_key(parts: list[str], serialized: str, query: str) -> None:
    assert key_for_manager_api(query) == serialized


def test_a_trailing_escape_is_a_literal_backslash() -> None:
    assert key_from_manager_api("abc\\") == "abc\\"
