"""The worker keeps secrets out of its environment, so nothing it starts inherits one."""

from __future__ import annotations

import subprocess

import pytest

from vmworker import credentials


@pytest.mark.parametrize("name", ["ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ACTORVISOR_AUTH_TOKEN",
                                  "GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "api_key"])
def test_secret_names(name: str) -> None:
    assert credentials.is_secret(name)


@pytest.mark.parametrize("name", ["PATH", "HOME", "ANTHROPIC_BASE_URL", "KEYBOARD", "MONKEY",
                                  "ACTORVISOR_LOG_LEVEL", "TOKENIZERS_PARALLELISM"])
def test_ordinary_names(name: str) -> None:
    assert not credentials.is_secret(name)


def test_taken_secrets_reach_the_agent_and_no_child(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(credentials, "_held", {})  # restored after the test
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-secret")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://127.0.0.1:1")
    taken = credentials.take_from_environment()
    assert "ANTHROPIC_API_KEY" in taken
    child = subprocess.run(["env"], capture_output=True, text=True, check=True).stdout
    assert "sk-test-secret" not in child and "ANTHROPIC_BASE_URL=" in child
    env = credentials.environment()
    assert env["ANTHROPIC_API_KEY"] == "sk-test-secret"
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:1"
