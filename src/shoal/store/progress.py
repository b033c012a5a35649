"""Progress events shaped like Ollama's /api/pull and /api/create NDJSON lines, and a renderer.

An event is a plain dict, ready for `json.dumps`:

    {"status": "pulling manifest"}
    {"status": "pulling b179c9523d0e", "digest": "sha256:b179...", "total": 98362432, "completed": 1048576}
    {"status": "verifying sha256 digest"}
    {"status": "writing manifest"}
    {"status": "success"}

Store operations take `progress: Callable[[dict], None] | None`; the server writes each
event as one NDJSON line, the CLI hands them to `RichProgress`.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

ProgressEvent = dict[str, Any]
ProgressCallback = Callable[[ProgressEvent], None]


def short_digest(digest: str) -> str:
    """`sha256:<hex>` -> its first 12 hex digits (what Ollama prints after "pulling")."""
    return digest.split(":", 1)[-1].split("-", 1)[-1][:12]


class Reporter:
    """Sends events to an optional callback; throttles byte counts (first and last always go)."""

    def __init__(self, callback: ProgressCallback | None, min_interval: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.callback = callback
        self.min_interval = min_interval
        self.clock = clock

    def emit(self, event: ProgressEvent) -> None:
        if self.callback is not None:
            self.callback(event)

    def status(self, status: str, **fields: Any) -> None:
        self.emit({"status": status, **fields})

    def bytes(self, status: str, digest: str | None = None,
              total: int | None = None) -> Callable[[int, int | None], None]:
        """A ByteProgress callable that emits `{"status", "digest", "total", "completed"}`."""
        last_time: list[float] = [float("-inf")]
        last_done: list[int | None] = [None]

        def report(completed: int, reported_total: int | None) -> None:
            if self.callback is None:
                return
            size = reported_total if reported_total is not None else total
            now = self.clock()
            final = size is not None and completed >= size
            if not final and last_done[0] is not None and now - last_time[0] < self.min_interval:
                return
            if completed == last_done[0] and not final:
                return
            last_time[0], last_done[0] = now, completed
            event: ProgressEvent = {"status": status}
            if digest is not None:
                event["digest"] = digest
            if size is not None:
                event["total"] = size
            event["completed"] = completed
            self.emit(event)
        return report


class RichProgress:
    """Renders progress events as `rich` bars (bytes, speed, ETA) and status lines.

        with RichProgress() as show:
            store.pull("smollm2", progress=show)
    """

    def __init__(self, console: Any = None, transient: bool = False) -> None:
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=transient)
        self._tasks: dict[str, Any] = {}
        self._last_status: str | None = None

    @property
    def console(self) -> Any:
        return self._progress.console

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()

    def __call__(self, event: ProgressEvent) -> None:
        status = str(event.get("status", ""))
        if "completed" in event or "total" in event:
            key = str(event.get("digest") or status)
            total = event.get("total")
            task = self._tasks.get(key)
            if task is None:
                task = self._progress.add_task(status, total=total)
                self._tasks[key] = task
            self._progress.update(task, completed=event.get("completed", 0), total=total,
                                  description=status)
            return
        if status and status != self._last_status:
            self._progress.console.print(status)
            self._last_status = status
