"""Progress of /api/pull, /api/push and /api/create: NDJSON events `{"status", "digest",
"total", "completed"}` as rich progress bars (bytes, speed, ETA) and status lines."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, ProgressColumn, Task, TaskID, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)
from rich.text import Text

from shoal.cli.display import animated
from shoal.cli.waiting import Waiting


class _LayerOnly(ProgressColumn):
    """A column drawn for layer bars only; status lines show their text alone."""

    def __init__(self, inner: ProgressColumn) -> None:
        super().__init__()
        self.inner = inner

    def render(self, task: Task):
        if task.fields.get("status_line"):
            return Text("")
        return self.inner.render(task)


def show_progress(events: Iterable[dict[str, Any]], verb: str = "pulling") -> dict[str, Any]:
    """Renders the events on stderr until the stream ends; returns the last event.

    One bar per layer digest (labelled like Ollama's `pulling 3f8b2c1d4e5a:`), and each
    other status ("pulling manifest", "verifying sha256 digest", "success") once, on its
    own line. Off a terminal, bars are not drawn: each layer gets one line when it ends, and
    a line a second says where the pull stands (a download from PyPI sends no byte counts
    while it runs: the line still comes, so a log never goes 2 s without a word).
    """
    console = Console(stderr=True, highlight=False)
    live = animated(console)
    progress = Progress(TextColumn("{task.description}"),
                        *(_LayerOnly(c) for c in (BarColumn(bar_width=None), TextColumn("{task.percentage:>3.0f}%"),
                                                  DownloadColumn(binary_units=False), TransferSpeedColumn(),
                                                  TimeRemainingColumn())),
                        console=console, transient=False, disable=not live, expand=True)
    bars: dict[str, TaskID] = {}
    finished: set[str] = set()
    status: str | None = None
    last: dict[str, Any] = {}
    where = [verb]
    ticker = Waiting(None, lambda: where[0]) if not live else contextlib.nullcontext()
    with progress, ticker:
        for event in events:
            last = event
            digest = str(event.get("digest") or "")
            total = int(event.get("total") or 0)
            completed = int(event.get("completed") or 0)
            if digest and total:
                where[0] = f"{verb} {_short(digest)}: {100 * completed // total}% of {total} bytes"
            elif event.get("status"):
                where[0] = str(event["status"])
            if digest:
                if digest not in bars:
                    bars[digest] = progress.add_task(f"{verb} {_short(digest)}:", total=total or None,
                                                     completed=completed)
                else:
                    progress.update(bars[digest], total=total or None, completed=completed)
                if not live and total and completed >= total and digest not in finished:
                    finished.add(digest)
                    print(f"{verb} {_short(digest)}: 100% {total} bytes", file=sys.stderr, flush=True)
                continue
            text = str(event.get("status") or "")
            if text and text != status:
                status = text
                if live:
                    progress.add_task(text, total=1, completed=1, status_line=True)
                else:
                    print(text, file=sys.stderr, flush=True)
    return last


def _short(digest: str) -> str:
    name = digest.removeprefix("sha256:").strip()
    return name[:12] if digest.startswith("sha256:") or len(name) == 64 else name
