"""Prometheus metrics of the supervisor: counters bumped where things happen, gauges read at scrape.

Counters (events relayed, replays, restarts, slow-consumer disconnects, action outcomes
and latencies) are module-level objects in one process-wide registry, incremented with a
single call at their call site: a process runs one supervisor. Everything that is a
current level (connections, actors by state, queued bytes, subscriptions) is not counted
at all but read from the live objects when Prometheus scrapes: `SupervisorCollector`
calls the supervisor's `levels()` snapshot, so it can never drift from what the
supervisor really holds. This module imports nothing of the supervisor's: everything
else imports it, to bump its counters.

Labels are bounded sets only (action names, error codes, states, reasons); never an actor
key, id or connection id. Rendering happens in the `/metrics` handler, on the event
loop: it is a walk over in-memory objects, no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    import asyncio

# `*_created` series double the output and nothing here needs them.
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

EVENTS_RELAYED = Counter(
    "actorvisor_events_relayed", "Durable events received from workers and fanned out to subscribers",
    registry=REGISTRY)
REPLAYS = Counter(
    "actorvisor_replays", "Subscriptions backfilled from history (ring: in memory; log: read from SQLite)",
    ["source"], registry=REGISTRY)
RESTARTS = Counter(
    "actorvisor_worker_restarts", "Workers that exited unexpectedly (crash) or were killed as hung (hang)",
    ["reason"], registry=REGISTRY)
SLOW_CONSUMER_DISCONNECTS = Counter(
    "actorvisor_slow_consumer_disconnects",
    "Connections closed because their outbound queue exceeded its byte limit", registry=REGISTRY)
ACTIONS = Counter(
    "actorvisor_actions", "Actions completed, by action and outcome (ok or an error code)",
    ["action", "outcome"], registry=REGISTRY)
ACTION_LATENCY = Histogram(
    "actorvisor_action_duration_seconds",
    "Time from an action's submission to its reply, including any wait for the worker to start",
    ["action"], registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))

for _source in ("ring", "log"):
    REPLAYS.labels(_source)
for _reason in ("crash", "hang"):
    RESTARTS.labels(_reason)


def action_observer(action: str) -> Callable[[asyncio.Future[Any]], None]:
    """A done-callback for an action's future that records its latency and outcome."""
    started = time.perf_counter()

    def observe(fut: asyncio.Future[Any]) -> None:
        ACTION_LATENCY.labels(action).observe(time.perf_counter() - started)
        if fut.cancelled():
            outcome = "cancelled"
        elif (exc := fut.exception()) is not None:
            code = getattr(exc, "code", None)
            outcome = str(getattr(code, "value", "error"))
        else:
            outcome = "ok"
        ACTIONS.labels(action, outcome).inc()

    return observe


@dataclass(frozen=True, slots=True)
class Levels:
    """The supervisor's current levels at one instant (`Supervisor.levels()`)."""

    connections: int
    connections_opened: int
    fd_limit: int
    tcp_connections: int
    connections_refused: int
    header_timeouts: int
    accept_errors: int
    # Every actor state, zeros included, in the order the states are declared.
    actors_by_state: Mapping[str, int]
    queue_bytes: int
    queue_bytes_max: int
    subscriptions: int
    pending_actions: int
    inflight_actions: int
    loop_lag: float


class SupervisorCollector(Collector):
    """Current levels, read from one running supervisor at scrape time."""

    def __init__(self, levels: Callable[[], Levels]) -> None:
        self._levels = levels

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        now = self._levels()
        yield _gauge("actorvisor_connections", "Open WebSocket connections", now.connections)
        yield _gauge("actorvisor_fd_limit", "Open-files limit of the supervisor (RLIMIT_NOFILE)",
                     now.fd_limit)
        yield _gauge("actorvisor_tcp_connections", "Open TCP connections", now.tcp_connections)
        yield _gauge("actorvisor_connections_refused", "Connections refused over a cap, total",
                     now.connections_refused)
        yield _gauge("actorvisor_header_timeouts", "Connections closed for a slow request head",
                     now.header_timeouts)
        yield _gauge("actorvisor_accept_errors", "Failed accepts (EMFILE...), total",
                     now.accept_errors)
        opened = CounterMetricFamily("actorvisor_connections_opened", "WebSocket connections accepted")
        opened.add_metric([], now.connections_opened)
        yield opened
        by_state = GaugeMetricFamily("actorvisor_actors", "Known actors, by state", labels=["state"])
        for state, n in now.actors_by_state.items():
            by_state.add_metric([state], n)
        yield by_state
        yield _gauge("actorvisor_queue_bytes", "Outbound bytes queued to clients, all connections",
                     now.queue_bytes)
        yield _gauge("actorvisor_queue_bytes_max", "Largest outbound queue of one connection, bytes",
                     now.queue_bytes_max)
        yield _gauge("actorvisor_subscriptions", "Event subscriptions of all connections",
                     now.subscriptions)
        yield _gauge("actorvisor_pending_actions", "Actions waiting for their worker to start",
                     now.pending_actions)
        yield _gauge("actorvisor_inflight_actions", "Actions sent or queued and not yet answered",
                     now.inflight_actions)
        yield _gauge("actorvisor_event_loop_lag_seconds",
                     "How late the supervisor's periodic tick last woke up", now.loop_lag)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def render() -> tuple[bytes, str]:
    """The exposition body and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
