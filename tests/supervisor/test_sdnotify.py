"""sd_notify: what reaches a real datagram socket, from the environment systemd sets."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.sdnotify import Notifier
from tests.notify import NotifySocket


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify")
    try:
        yield sock
    finally:
        sock.close()


def test_path_socket_gets_each_message(notify: NotifySocket) -> None:
    address = str(notify.path)
    notifier = Notifier(address, watchdog_usec=2_000_000)
    assert notifier.enabled and notifier.watchdog_interval == 1.0
    assert notifier.ready("actors: none")
    assert notifier.watchdog()
    assert notifier.status("two\nlines")
    assert notifier.stopping("draining")
    notifier.close()
    assert notify.drain() == [
        {"READY": "1", "STATUS": "actors: none"},
        {"WATCHDOG": "1"},
        {"STATUS": "two lines"},
        {"STOPPING": "1", "STATUS": "draining"},
    ]


def test_abstract_namespace_socket() -> None:
    name = f"actorvisor-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        notifier = Notifier("@" + name)
        assert notifier.ready("up")
        notifier.close()
        assert sock.recv(4096, socket.MSG_DONTWAIT) == b"READY=1\nSTATUS=up"
    finally:
        sock.close()


def test_from_env_takes_the_variables_out_of_the_environment(notify: NotifySocket) -> None:
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid()),
           "OTHER": "kept"}
    notifier = Notifier.from_env(env)
    assert notifier.enabled and notifier.watchdog_interval == 1.5
    # Workers and the VMs they run inherit the environment: they must not speak for us.
    assert env == {"OTHER": "kept"}
    notifier.close()


def test_watchdog_of_another_process_is_not_ours(notify: NotifySocket) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "3000000",
                                  "WATCHDOG_PID": str(os.getpid() + 1)})
    assert notifier.enabled and notifier.watchdog_interval is None
    notifier.close()


def test_without_systemd_everything_is_a_no_op() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled and notifier.watchdog_interval is None
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False


def test_a_missing_manager_socket_is_reported_not_raised(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    assert notifier.ready("x") is False
    notifier.close()
