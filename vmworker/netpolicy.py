"""The VM's egress policy: allow/deny rules on host names and ports, and the address check.

Owns the rule format (parsing with precise errors), the decision for one `(host, port)`
and the refusal, after name resolution, of addresses a VM must never reach by name alone
(loopback, link-local such as cloud metadata 169.254.169.254, private and unique-local
ranges, the host's own addresses). Pure: no sockets, no event loop; the proxy calls
`decide` before connecting and `address_allowed` on every address it resolved.

Rule syntax (one string per rule): `HOST` or `HOST:PORT`, where HOST is an exact name,
`*.example.com` (any subdomain, not example.com itself) or an IP literal (`[::1]:80` for
IPv6). Deny wins over allow; no matching allow means deny. A resolved address in a
refused range is only reachable if a matching allow rule names that IP literal itself, so
an allowed *name* that resolves to 127.0.0.1 or 169.254.169.254 (DNS rebinding) is refused.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

MAX_RULES: Final = 1000
ACTOR_POLICY_FILE: Final = "network.json"   # in the actor's dir: its own policy, if any
_LABEL: Final = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class PolicyError(ValueError):
    """A malformed rule or policy; the message names the rule and what is wrong."""


@dataclass(frozen=True, slots=True)
class Rule:
    host: str                    # lower-case name, "*.suffix", or an IP literal
    port: int | None = None

    @property
    def ip(self) -> IpAddress | None:
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        if self.ip is not None:
            try:
                return ipaddress.ip_address(host) == self.ip
            except ValueError:
                return False
        return host == self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


def normalize_host(host: str) -> str:
    """A host name or IP literal as rules compare it (lower case, no trailing dot)."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def parse_rule(text: object) -> Rule:
    if not isinstance(text, str) or not text or len(text) > 300:
        raise PolicyError(f"rule {text!r:.80}: must be a non-empty string of at most 300 characters")
    host, port = text.strip().lower(), None
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise PolicyError(f"rule {text!r:.80}: unclosed '[' in an IPv6 literal")
        rest, host = host[end + 1:], host[1:end]
        if rest:
            if not rest.startswith(":"):
                raise PolicyError(f"rule {text!r:.80}: expected ':PORT' after ']'")
            port = _port(text, rest[1:])
    elif host.count(":") == 1:
        host, raw = host.split(":")
        port = _port(text, raw)
    host = host.rstrip(".")
    try:
        return Rule(str(ipaddress.ip_address(host)), port)
    except ValueError:
        pass
    name = host[2:] if host.startswith("*.") else host
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise PolicyError(f"rule {text!r:.80}: {host!r:.80} is not a host name, '*.name' or IP "
                          "literal (letters, digits and '-' in dot-separated labels)")
    if host.startswith("*.") and len(labels) < 2:
        raise PolicyError(f"rule {text!r:.80}: a wildcard needs a domain of at least two labels")
    return Rule(host, port)


def _port(text: str, raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise PolicyError(f"rule {text!r:.80}: port must be an integer from 1 to 65535, got {raw!r:.20}")
    return int(raw)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: str | None             # the rule that decided, None for the default deny
    reason: str


@dataclass(frozen=True, slots=True)
class Policy:
    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = field(default=())

    @classmethod
    def parse(cls, allow: Iterable[object] = (), deny: Iterable[object] = ()) -> Policy:
        allow_l, deny_l = list(allow), list(deny)
        if len(allow_l) + len(deny_l) > MAX_RULES:
            raise PolicyError(f"a policy holds at most {MAX_RULES} rules")
        return cls(tuple(map(parse_rule, allow_l)), tuple(map(parse_rule, deny_l)))

    @classmethod
    def from_wire(cls, value: object) -> Policy:
        if not isinstance(value, dict) or set(value) - {"allow", "deny"}:
            raise PolicyError("a network policy is an object {allow?: [rule], deny?: [rule]}")
        for key in ("allow", "deny"):
            if not isinstance(value.get(key, []), list):
                raise PolicyError(f"policy.{key} must be a list of rule strings")
        return cls.parse(value.get("allow", []), value.get("deny", []))

    def to_wire(self) -> dict[str, list[str]]:
        return {"allow": [str(r) for r in self.allow], "deny": [str(r) for r in self.deny]}

    def decide(self, host: str, port: int) -> Decision:
        """Whether a VM may open a connection to `host:port` (before resolution)."""
        host = normalize_host(host)
        for rule in self.deny:
            if rule.matches(host, port):
                return Decision(False, f"deny {rule}", "denied by a rule")
        for rule in self.allow:
            if rule.matches(host, port):
                return Decision(True, f"allow {rule}", "allowed by a rule")
        return Decision(False, None, "no rule allows this host (deny by default)")

    def address_allowed(self, addr: IpAddress, port: int, host_addresses: Sequence[IpAddress] = ()) -> bool:
        """Whether a resolved address may be connected to: public ones always (the name was
        already allowed); internal ones only when an allow rule names that IP literal."""
        if not is_internal(addr, host_addresses):
            return not any(r.ip == addr and (r.port in (None, port)) for r in self.deny)
        return any(r.ip == addr and r.port in (None, port) for r in self.allow) and not any(
            r.ip == addr and r.port in (None, port) for r in self.deny)


def is_internal(addr: IpAddress, host_addresses: Sequence[IpAddress] = ()) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return is_internal(addr.ipv4_mapped, host_addresses)
    return (addr.is_loopback or addr.is_link_local or addr.is_private or addr.is_multicast
            or addr.is_unspecified or addr.is_reserved or addr in host_addresses)


def load_actor_policy(actor_dir: os.PathLike[str] | str) -> Policy | None:
    """The policy an admin set for this actor (`network.json` in its dir), or None: the
    service default applies. Raises PolicyError for a file that does not parse."""
    path = os.path.join(actor_dir, ACTOR_POLICY_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise PolicyError(f"{path}: {exc}") from None
    return Policy.from_wire(raw)


def save_actor_policy(actor_dir: os.PathLike[str] | str, policy: Policy | None) -> None:
    """Set (or, with None, clear) an actor's own policy; replaced whole, never half-written,
    so a worker reading it at any moment sees the old policy or the new one."""
    path = os.path.join(actor_dir, ACTOR_POLICY_FILE)
    if policy is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    partial = f"{path}.tmp"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(policy.to_wire(), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
