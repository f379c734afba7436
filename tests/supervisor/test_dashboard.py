"""The dashboard's pure parts: which rows stand out, sorting, formatting, rendering."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from supervisor.dashboard import (
    FAILED,
    HUNG,
    SLOW,
    flags_of,
    human_bytes,
    human_duration_ms,
    render,
    sort_actors,
)

SUP = {"heartbeatIntervalMs": 1000, "hangTimeoutMs": 6000, "connQueueBytes": 1000}


def actor(key: str, state: str = "ready", **fields: Any) -> dict[str, Any]:
    return {"actorId": key, "key": key, "state": state, "pid": 100, "lastHeartbeatAgeMs": 0,
            "maxQueuedBytes": 0, "process": {"status": "sleeping", "cpuPercent": 1.0}, **fields}


def test_flags() -> None:
    assert flags_of(actor("ok"), SUP) == []
    assert flags_of(actor("dead", "failed", pid=None, lastHeartbeatAgeMs=None, process=None), SUP) == [FAILED]
    assert flags_of(actor("crashed", "crashed"), SUP) == [FAILED]
    assert flags_of(actor("no-vm", "boot_failed"), SUP) == [FAILED]
    assert flags_of(actor("dropped", lastHeartbeatAgeMs=1), SUP) == [HUNG]
    assert flags_of(actor("stopped", process={"status": "stopped"}), SUP) == [HUNG]
    assert flags_of(actor("backlog", maxQueuedBytes=300), SUP) == [SLOW]


def test_sort_numbers_descending_names_ascending_missing_last() -> None:
    rows = [actor("b", process={"cpuPercent": 5.0}), actor("a", process={"cpuPercent": 50.0}),
            actor("c", "stopped", process=None)]
    assert [a["key"] for a in sort_actors(rows, "cpu", False)] == ["a", "b", "c"]
    assert [a["key"] for a in sort_actors(rows, "cpu", True)] == ["b", "a", "c"]
    assert [a["key"] for a in sort_actors(rows, "key", False)] == ["a", "b", "c"]
    rows.append(actor("d", "failed"))
    assert [a["key"] for a in sort_actors(rows, "state", False)][0] == "d"


def test_formatting() -> None:
    assert human_bytes(None) == "-"
    assert human_bytes(512) == "512B"
    assert human_bytes(1536) == "1.5K"
    assert human_bytes(300 * 1024 * 1024) == "300M"
    assert human_duration_ms(None) == "-"
    assert human_duration_ms(250) == "250ms"
    assert human_duration_ms(42_000) == "42s"
    assert human_duration_ms(3_725_000) == "1h02m"


def test_render_without_process_figures_says_why() -> None:
    snap = {"url": "http://x", "processFigures": False,
            "supervisor": {"version": "0", "pid": 1, "actorsByState": {"ready": 1}, **SUP},
            "actors": [actor("remote", process=None, flags=[])]}
    console = Console(width=200, record=True)
    console.print(render(snap))
    text = console.export_text()
    assert "remote" in text and "process figures unavailable" in text
