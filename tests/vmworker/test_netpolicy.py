"""The egress policy: rule parsing, deny-wins decisions, the post-resolution address check."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmworker.netpolicy import Policy, PolicyError, parse_rule

ip = ipaddress.ip_address


def test_default_denies_everything() -> None:
    decision = Policy().decide("example.com", 443)
    assert not decision.allowed and decision.rule is None


def test_exact_wildcard_and_port_rules() -> None:
    p = Policy.parse(allow=["pypi.example.org", "*.cdn.example.com", "api.example.net:443"])
    assert p.decide("PyPI.Example.org.", 80).allowed
    assert p.decide("a.b.cdn.example.com", 443).allowed
    assert not p.decide("cdn.example.com", 443).allowed          # wildcard is subdomains only
    assert not p.decide("evilcdn.example.com", 443).allowed
    assert p.decide("api.example.net", 443).allowed
    assert not p.decide("api.example.net", 80).allowed
    assert not p.decide("pypi.example.org.evil.com", 80).allowed


def test_deny_wins_over_allow() -> None:
    p = Policy.parse(allow=["*.example.com"], deny=["secret.example.com"])
    assert p.decide("www.example.com", 80).allowed
    d = p.decide("secret.example.com", 80)
    assert not d.allowed and d.rule == "deny secret.example.com"


def test_rebinding_allowed_name_to_internal_address_is_refused() -> None:
    p = Policy.parse(allow=["upstream.test"])
    assert p.decide("upstream.test", 80).allowed
    for addr in ("127.0.0.1", "169.254.169.254", "10.1.2.3", "192.168.0.1", "::1",
                 "::ffff:127.0.0.1", "fd00::1", "0.0.0.0"):
        assert not p.address_allowed(ip(addr), 80), addr
    assert p.address_allowed(ip("93.184.216.34"), 80)
    assert not p.address_allowed(ip("93.184.216.34"), 80, host_addresses=[ip("93.184.216.34")])


def test_internal_address_reachable_only_when_named_as_ip_literal() -> None:
    p = Policy.parse(allow=["127.0.0.1:8080"])
    assert p.decide("127.0.0.1", 8080).allowed
    assert p.address_allowed(ip("127.0.0.1"), 8080)
    assert not p.address_allowed(ip("127.0.0.1"), 8081)
    assert not p.address_allowed(ip("169.254.169.254"), 8080)
    assert Policy.parse(allow=["[::1]:80"]).address_allowed(ip("::1"), 80)


@pytest.mark.parametrize("bad", ["", "a..b", "-a.com", "a.com:0", "a.com:65536", "a.com:x",
                                 "*.com", "a b.com", "[::1", "[::1]x", 5, None, "x" * 400])
def test_malformed_rules_are_refused_with_the_rule_named(bad: object) -> None:
    with pytest.raises(PolicyError, match="rule"):
        parse_rule(bad)


def test_wire_round_trip_and_shape_errors() -> None:
    p = Policy.from_wire({"allow": ["a.example.com:443", "[::1]:80"], "deny": ["b.example.com"]})
    assert Policy.from_wire(p.to_wire()) == p
    with pytest.raises(PolicyError):
        Policy.from_wire({"allow": "a.com"})
    with pytest.raises(PolicyError):
        Policy.from_wire({"widen": []})


@given(st.text(max_size=40), st.integers(min_value=1, max_value=65535))
def test_empty_policy_never_allows(host: str, port: int) -> None:
    assert not Policy().decide(host, port).allowed


@given(st.lists(st.sampled_from(["a.example.com", "*.example.com", "b.example.com:80"]), max_size=3),
       st.sampled_from(["a.example.com", "x.example.com", "b.example.com"]),
       st.integers(min_value=1, max_value=65535))
def test_a_denied_host_is_never_allowed(allow: list[str], host: str, port: int) -> None:
    assert not Policy.parse(allow=allow, deny=[host]).decide(host, port).allowed


async def test_an_actors_own_policy_is_read_live_and_fails_closed(tmp_path: Path) -> None:
    from vmworker.netpolicy import ACTOR_POLICY_FILE, save_actor_policy
    from vmworker.vm import Vm, VmSettings

    def vm() -> Vm:
        return Vm(tmp_path, "t", tmp_path, 0.0, VmSettings(network_allow=("default.example",)),
                  lambda *_: None)
    machine = vm()
    assert machine.policy.to_wire() == {"allow": ["default.example"], "deny": []}
    save_actor_policy(tmp_path, Policy.parse(allow=["own.example:443"]))
    assert machine.policy.to_wire() == {"allow": ["own.example:443"], "deny": []}
    (tmp_path / ACTOR_POLICY_FILE).write_text('{"allow": ["a..b"]}')
    assert machine.policy.to_wire() == {"allow": ["own.example:443"], "deny": []}
    assert vm().policy == Policy()           # unreadable from the start: nothing allowed
    save_actor_policy(tmp_path, None)
    assert machine.policy.to_wire() == {"allow": ["default.example"], "deny": []}
