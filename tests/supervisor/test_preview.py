"""Preview tokens: bound to actor, port and expiry; forged, expired and revoked ones refused."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.preview import PreviewDenied, check_preview_token, load_secret, mint


def test_secret_is_created_0600_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "preview.key"
    secret = load_secret(path)
    assert len(secret) == 32 and load_secret(path) == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_token_grants_its_actor_and_port_until_expiry() -> None:
    token, p = mint(b"k" * 32, "actorA", 8000, 60, now=1000)
    got = check_preview_token(b"k" * 32, token, now=1059)
    assert (got.actor_id, got.port, got.expires_at) == ("actorA", 8000, 1060)
    with pytest.raises(PreviewDenied, match="expired"):
        check_preview_token(b"k" * 32, token, now=1060)
    with pytest.raises(PreviewDenied, match="owner"):
        check_preview_token(b"k" * 32, token, revoked={p.nonce}, now=1001)
    with pytest.raises(PreviewDenied, match="signature"):
        check_preview_token(b"x" * 32, token, now=1001)


def test_rebinding_a_token_to_another_actor_or_port_breaks_it() -> None:
    token, _ = mint(b"k" * 32, "actorA", 8000, 60, now=1000)
    for forged in (token.replace("actorA", "actorB"), token.replace(".8000.", ".8001."),
                   token.replace(".1060.", ".9999999999.")):
        with pytest.raises(PreviewDenied, match="signature"):
            check_preview_token(b"k" * 32, forged, now=1001)


@pytest.mark.parametrize("port,ttl", [(0, 60), (65536, 60), (80, 0), (80, 10**9)])
def test_bad_port_or_ttl(port: int, ttl: int) -> None:
    with pytest.raises(ValueError, match="port|ttlSeconds"):
        mint(b"k" * 32, "a", port, ttl)


@given(st.text(max_size=200))
def test_arbitrary_strings_are_denied(token: str) -> None:
    with pytest.raises(PreviewDenied):
        check_preview_token(b"k" * 32, token, now=0)


async def test_revocations_persist_until_their_tokens_expire(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from supervisor import preview

    path = tmp_path / preview.REVOKED_FILE
    store = preview.RevokedTokens(path)
    now = time.time()
    _, soon = mint(b"k" * 32, "a", 80, 1, now=now - 10)       # already past its TTL
    _, later = mint(b"k" * 32, "a", 80, 600, now=now)
    await store.add(soon)
    await store.add(later)
    await store.add(later)
    assert later.nonce in store and path.read_text().count(later.nonce) == 1
    reloaded = preview.RevokedTokens(path)          # a restart: expired ones are dropped
    assert later.nonce in reloaded and soon.nonce not in reloaded
    assert path.read_text() == f"{later.nonce} {later.expires_at}\n"
    monkeypatch.setattr(preview, "MAX_REVOKED", 1)
    with pytest.raises(OverflowError, match="1 preview tokens"):
        reloaded.add(mint(b"k" * 32, "a", 80, 600, now=now)[1])


def test_the_secret_stays_out_of_the_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from supervisor.preview import check_secret_place, default_secret_path

    state = tmp_path / "state"
    with pytest.raises(ValueError, match="inside the state dir"):
        check_secret_place(state / "keys" / "secret", state)
    check_secret_place(tmp_path / "keys" / "secret", state)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    assert default_secret_path(state) == tmp_path / "creds" / "preview-secret"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    assert default_secret_path(state).name == "preview-secret"
    assert state not in default_secret_path(state).parents
