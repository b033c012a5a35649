"""Live progress while a run goes: per target and level, requests done and current output tok/s."""
from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from shoal.bench.client import TimedRequest


class LiveProgress:
    """A rich progress display on stderr (stdout stays for the summary table)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description:<28}"), BarColumn(),
                                  MofNCompleteColumn(), TextColumn("{task.fields[rate]:>14}"),
                                  TextColumn("{task.fields[errors]}"), TimeElapsedColumn(),
                                  console=self.console)
        self._task = None
        self._started = 0.0
        self._tokens = 0
        self._errors = 0

    def __enter__(self) -> "LiveProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def note(self, message: str) -> None:
        self._progress.console.print(message)

    def level_started(self, description: str, total: int | None) -> None:
        self._started, self._tokens, self._errors = time.perf_counter(), 0, 0
        self._task = self._progress.add_task(description, total=total, rate="", errors="")

    def request_done(self, record: TimedRequest) -> None:
        if record.ok:
            self._tokens += record.output_tokens or 0
        else:
            self._errors += 1
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        self._progress.update(self._task, advance=1, rate=f"{self._tokens / elapsed:.1f} tok/s",
                              errors=f"[red]{self._errors} errors[/red]" if self._errors else "")

    def level_finished(self) -> None:
        task = self._progress.tasks[-1]
        self._progress.update(self._task, total=task.completed)
