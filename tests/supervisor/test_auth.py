"""Tokens: hashing, roles, prefixes, and that the comparison is constant-time."""

from __future__ import annotations

import hmac
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.auth import Auth, Role, hash_token, new_token
from supervisor.limits import CreationRate
from supervisor.perimeter import host_name, is_loopback


def test_hash_and_plain_tokens_are_both_accepted() -> None:
    token, digest = new_token()
    auth = Auth.from_config("", [{"hash": digest, "role": "admin"},
                                 {"token": "plain-secret", "prefixes": ["team-a/"]}])
    assert auth.check(token) is not None and auth.check(token).role is Role.ADMIN  # type: ignore[union-attr]
    grant = auth.check("plain-secret")
    assert grant is not None and grant.role is Role.CLIENT
    assert grant.reaches("team-a/x") and not grant.reaches("team-b/x")
    assert auth.check(digest) is None          # the hash itself is not a token
    assert auth.check("") is None and auth.check(None) is None


def test_env_token_is_admin() -> None:
    auth = Auth.from_config("s3cret", [])
    assert auth.enabled and auth.check("s3cret").role is Role.ADMIN  # type: ignore[union-attr]
    assert not Auth.from_config("", []).enabled


def test_comparison_is_hmac_compare_digest_over_hashes_of_every_grant() -> None:
    auth = Auth.from_config("", [{"token": "a"}, {"token": "b"}, {"token": "c"}])
    with mock.patch("supervisor.auth.hmac.compare_digest", wraps=hmac.compare_digest) as cd:
        assert auth.check("a") is not None
    assert cd.call_count == 3                  # no early exit on the first match
    for call in cd.call_args_list:
        presented, stored = call.args
        assert presented == hash_token("a").encode()   # hashes, never the token text
        assert stored.startswith(b"sha256:")


@given(st.text(min_size=1))
def test_only_the_exact_token_matches(other: str) -> None:
    auth = Auth.from_config("the-token", [])
    assert (auth.check(other) is not None) == (other == "the-token")


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError):
        Auth.from_config("", [{"role": "client"}])
    with pytest.raises(ValueError):
        Auth.from_config("", [{"token": "x", "role": "root"}])


def test_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("")


def test_creation_rate_is_a_sliding_minute_per_address_with_bounded_memory() -> None:
    rate = CreationRate(per_minute=3, max_addresses=2)
    assert [rate.take("a", now=t) for t in (0.0, 1.0, 2.0)] == [0.0, 0.0, 0.0]
    assert rate.take("a", now=30.0) == 30.0        # the oldest is 30 s old: 30 s to go
    assert rate.take("b", now=30.0) == 0.0          # another address has its own minute
    assert rate.take("a", now=60.0) == 0.0          # the first creation left the window
    rate.take("c", now=61.0)
    assert len(rate._seen) == 2 and "b" not in rate._seen  # least recently seen forgotten


def test_host_names_are_compared_without_their_port() -> None:
    assert host_name("127.0.0.1:6420") == "127.0.0.1"
    assert host_name("LOCALHOST:1") == "localhost"
    assert host_name("[::1]:6420") == "[::1]" and host_name("[::1]") == "[::1]"
    assert host_name("attacker.example:6420") == "attacker.example"  # a rebinding name stays foreign
    assert host_name("::1") == "::1"  # not a name:port pair; compared whole
