"""The claude agent in a real worker process: the conversation outlives the process."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from protocol.worker import Sleep
from tests.fakes.anthropic_api import FakeAnthropic, Reply, Text

from .harness import WorkerHarness
from .test_sessions import ours


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    server = await FakeAnthropic("sk-test-worker-env-93a1c").start()
    try:
        yield server
    finally:
        await server.close()


async def test_conversation_survives_sleep_with_the_key_from_the_worker_environment(
        harness: WorkerHarness, fake: FakeAnthropic, monkeypatch: pytest.MonkeyPatch) -> None:
    # The harness hands the test's environment to the worker, as the supervisor hands its own.
    monkeypatch.setenv("ANTHROPIC_API_KEY", fake.api_key)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
    await harness.start()
    await harness.wait_event("vmBooted")
    sid = (await harness.call("createSession", "claude"))["sessionId"]
    fake.script(Reply(Text("Noted: 42.")))
    assert ours(await harness.call("sendPrompt", sid, "Remember 42.")) == {"text": "Noted: 42.",
                                                                      "stopReason": "end_turn"}
    await harness.send(Sleep())
    assert await harness.wait_exit() == 0

    await harness.start()
    await harness.wait_event("vmBooted")
    fake.script(Reply(Text("42.")))
    assert (await harness.call("sendPrompt", sid, "Which number?"))["text"] == "42."
    assert fake.requests[1].messages == [
        {"role": "user", "content": [{"type": "text", "text": "Remember 42."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Noted: 42."}]},
        {"role": "user", "content": [{"type": "text", "text": "Which number?"}]},
    ]
    assert fake.api_key not in harness.worker_log()
