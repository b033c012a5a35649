"""Saying what the server is doing while the command line waits on it.

A first `shoal run` waits on a server start, a model download, the CPU kernels' build and
a model load; none of that may leave the user without a word for more than 2 s (issue 17).
`Waiting` asks the server's /readyz for its `activity` on a thread and prints one line on
stderr at least every second, on a terminal or not (a terminal gets the same lines: they
are the record of a first start, not an animation).
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

import httpx

# NOTE: 1 s leaves room under the 2 s bound for a slow print or a late /readyz answer.
INTERVAL = 1.0


def server_activity(url: str, timeout: float = 0.8) -> str | None:
    """What the server at `url` says it is doing (/readyz's `activity`), or None."""
    try:
        body = httpx.get(url + "/readyz", timeout=timeout).json()
    except (httpx.HTTPError, ValueError):
        return None
    if not isinstance(body, dict):
        return None
    activity = body.get("activity")
    return str(activity) if activity else None


class Waiting:
    """A context: while inside, a line `shoal: <what> (<n> s)` goes to stderr every INTERVAL.

    `what` is asked of `describe` (polled on its own thread, so a slow server cannot delay
    the lines), falling back to `default`.
    """

    def __init__(self, default: str | None, describe: Callable[[], str | None] | None = None,
                 sink: Callable[[str], None] | None = None) -> None:
        """`default` None: silent while `describe` has nothing to say (a wait that is only
        the model thinking). `sink` replaces printing (a terminal's spinner shows the text)."""
        self.default = default
        self.describe = describe
        self.sink = sink or _print_line
        self._latest: str | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started = time.monotonic()

    def __enter__(self) -> "Waiting":
        self.started = time.monotonic()
        self._threads = [threading.Thread(target=self._print_forever, daemon=True)]
        if self.describe is not None:
            self._threads.append(threading.Thread(target=self._poll_forever, daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2)

    def _poll_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self._latest = self.describe()   # type: ignore[misc]
            except Exception:  # noqa: BLE001 - a failing probe only loses the detail
                self._latest = None
            self._stop.wait(INTERVAL / 2)

    def _print_forever(self) -> None:
        # NOTE: one waiting often follows another (the server start, then the model's
        # details, then the answer); the cadence carries over, so a handover is no gap.
        last = _last_line[0] if self.started - _last_line[0] < INTERVAL else self.started
        while not self._stop.wait(0.1):
            now = time.monotonic()
            what = self._latest or self.default
            if now - last < INTERVAL or what is None:
                continue
            try:
                self.sink(f"shoal: {what} [{now - self.started:.0f} s]")
            except (OSError, ValueError):   # stderr closed: nobody to tell
                return
            last = _last_line[0] = now


_last_line = [0.0]   # when any Waiting last said something (monotonic)


def _print_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
