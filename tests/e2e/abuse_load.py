"""Load for tests/e2e/test_abuse.py, in its own process so it does not share the test's
event loop: open N raw TCP connections to HOST:PORT (optionally sending a partial request
head), then report on stdout how many were refused with 503 and how many the server closed.

    python abuse_load.py PORT COUNT MODE HOLD_SECONDS     (MODE: idle | partial)
"""

from __future__ import annotations

import json
import resource
import selectors
import socket
import sys
import time


def main() -> None:
    port, count, mode, hold = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sel = selectors.DefaultSelector()
    socks = []
    started = time.monotonic()
    for _ in range(count):
        s = socket.socket()
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        if mode == "partial":
            s.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    print(json.dumps({"opened": len(socks), "open_s": round(time.monotonic() - started, 2)}),
          flush=True)
    refused = closed = 0
    closed_at: list[float] = []
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline and closed < count:
        for key, _ in sel.select(timeout=0.2):
            s = key.fileobj  # type: ignore[assignment]
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if data.startswith(b"HTTP/1.1 503"):
                refused += 1
            sel.unregister(s)
            s.close()
            closed += 1
            closed_at.append(time.monotonic() - started)
    print(json.dumps({"refused": refused, "closed": closed, "still_open": count - closed,
                      "last_close_s": round(max(closed_at), 2) if closed_at else None}), flush=True)
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
