"""How the command line shows things: Ollama's human sizes and times, tables, the timing
block, and streamed answers wrapped at word boundaries."""
from __future__ import annotations

import math
import os
import shutil
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import IO, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text


def animated(console: Console) -> bool:
    """Spinners and live bars only on a real terminal (not TERM=dumb, not a pipe)."""
    return console.is_terminal and not console.is_dumb_terminal


def stdout_console() -> Console:
    # NOTE: off a terminal rich assumes 80 columns and would fold long names; tables there
    # take the width they need.
    console = Console()
    if not console.is_terminal:
        console = Console(width=1000, no_color=True, highlight=False)
    return console


def print_table(headers: Sequence[str] | None, rows: Sequence[Sequence[str]], *, indent: int = 0,
                gap: int = 4, console: Console | None = None) -> None:
    """Left-aligned columns without borders, as Ollama's tablewriter prints them."""
    console = console or stdout_console()
    table = Table(box=None, show_header=headers is not None, pad_edge=False, show_edge=False,
                  padding=(0, gap, 0, 0), header_style="bold", highlight=False)
    if indent:
        table.add_column("", width=max(0, indent - gap) or None, no_wrap=True)
    for header in headers or [""] * (max((len(r) for r in rows), default=0)):
        table.add_column(header, no_wrap=True, overflow="ignore")
    for row in rows:
        cells = [Text(str(cell)) for cell in row]
        cells += [Text("")] * (len(table.columns) - (1 if indent else 0) - len(cells))
        table.add_row(*(([Text("")] if indent else []) + cells))
    with console.capture() as captured:
        console.print(table)
    # NOTE: rich pads every cell to its column; the last column's padding is noise.
    lines = [line.rstrip() for line in captured.get().splitlines()]
    console.file.write("\n".join(lines) + "\n")
    console.file.flush()


# ---- Ollama's format package ----------------------------------------------------------------

def human_bytes(size: int | float) -> str:
    """Decimal units as Ollama's format.HumanBytes: 98 MB, 1.2 GB, 512 B."""
    size = int(size or 0)
    for unit, scale in (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
        if size >= scale:
            value = size / scale
            if value >= 10 or value == math.trunc(value):
                return f"{int(value)} {unit}"
            return f"{value:.1f} {unit}"
    return f"{size} B"


def human_number(count: int | float) -> str:
    """Parameter counts as Ollama's format.HumanNumber: 134.52M, 7B, 270K."""
    count = int(count or 0)
    if count >= 1_000_000_000:
        value = count / 1e9
        return f"{value:.0f}B" if value == math.floor(value) else f"{value:.1f}B"
    if count >= 1_000_000:
        value = count / 1e6
        return f"{value:.0f}M" if value == math.floor(value) else f"{value:.2f}M"
    if count >= 1_000:
        return f"{count / 1e3:.0f}K"
    return str(count)


def human_duration(seconds: float) -> str:
    whole = int(seconds)
    if whole < 1:
        return "Less than a second"
    if whole == 1:
        return "1 second"
    if whole < 60:
        return f"{whole} seconds"
    minutes = int(seconds // 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(seconds / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // (24 * 7)} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // (24 * 30)} months"
    return f"{int(seconds // (3600 * 24 * 365))} years"


def parse_time(value: Any) -> datetime | None:
    """An RFC 3339 timestamp (Go writes up to nanoseconds; Python reads microseconds)."""
    if not isinstance(value, str) or not value or value.startswith("0001-01-01"):
        return None
    text = value.strip().replace("Z", "+00:00")
    if "." in text:
        head, _, rest = text.partition(".")
        digits = "".join(ch for ch in rest if ch.isdigit())
        zone = rest[len(digits):]
        text = f"{head}.{digits[:6].ljust(6, '0')}{zone}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def human_time(value: Any, zero: str = "Never", now: datetime | None = None) -> str:
    """'2 minutes ago', '4 minutes from now', 'Forever' (over 20 years ahead), as Ollama."""
    at = parse_time(value)
    if at is None:
        return zero
    now = now or datetime.now(timezone.utc)
    delta = (now - at).total_seconds()
    if delta < -20 * 365 * 24 * 3600:
        return "Forever"
    if delta < 0:
        return human_duration(-delta) + " from now"
    return human_duration(delta) + " ago"


def go_duration(nanoseconds: int | float) -> str:
    """A duration as Go's time.Duration prints it: 1.234567891s, 12.5ms, 850µs, 2m3.5s."""
    ns = int(nanoseconds)
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_trim(ns / 1e3)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{_trim(ns / 1e6)}ms"
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    seconds = _trim(rest / 1e9) if rest else "0"
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{sign}{minutes}m{seconds}s"
    return f"{sign}{seconds}s"


def _trim(value: float) -> str:
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return text or "0"


def timing_summary(event: dict[str, Any]) -> str:
    """Ollama's `--verbose` block (api.Metrics.Summary), from a final chat/generate event."""
    lines = []

    def num(key: str) -> int:
        try:
            return int(event.get(key) or 0)
        except (TypeError, ValueError):
            return 0

    if num("total_duration") > 0:
        lines.append(f"total duration:       {go_duration(num('total_duration'))}")
    if num("load_duration") > 0:
        lines.append(f"load duration:        {go_duration(num('load_duration'))}")
    if num("prompt_eval_count") > 0:
        lines.append(f"prompt eval count:    {num('prompt_eval_count')} token(s)")
    if num("prompt_eval_duration") > 0:
        lines.append(f"prompt eval duration: {go_duration(num('prompt_eval_duration'))}")
        lines.append(f"prompt eval rate:     {num('prompt_eval_count') / (num('prompt_eval_duration') / 1e9):.2f} tokens/s")
    if num("eval_count") > 0:
        lines.append(f"eval count:           {num('eval_count')} token(s)")
    if num("eval_duration") > 0:
        lines.append(f"eval duration:        {go_duration(num('eval_duration'))}")
        lines.append(f"eval rate:            {num('eval_count') / (num('eval_duration') / 1e9):.2f} tokens/s")
    return "\n".join(lines)


# ---- streamed text ------------------------------------------------------------------------------

class AnswerWriter:
    """Writes streamed text, wrapping at word boundaries to the terminal's width (when `wrap`).

    A word is held back until it ends, so a line never breaks inside one; words wider than
    the line are written as they come.
    """

    def __init__(self, out: IO[str] | None = None, wrap: bool = True, width: int | None = None) -> None:
        self.out = out or sys.stdout
        if width is None:
            width = shutil.get_terminal_size((0, 0)).columns if _isatty(self.out) else 0
        self.width = width - 5 if wrap and width >= 10 else 0
        self.column = 0
        self.word = ""
        self.text: list[str] = []
        self.wrote_any = False

    def write(self, chunk: str) -> None:
        if not chunk:
            return
        self.text.append(chunk)
        self.wrote_any = True
        if not self.width:
            self.out.write(chunk)
            self.out.flush()
            return
        for ch in chunk:
            if ch in " \t\n\r":
                self._flush_word()
                if ch in "\n\r":
                    self.out.write(ch)
                    self.column = 0
                elif self.column + 1 > self.width:
                    self.out.write("\n")
                    self.column = 0
                else:
                    self.out.write(ch)
                    self.column += 1
            else:
                self.word += ch
                if len(self.word) >= self.width:
                    self._flush_word()
        self.out.flush()

    def _flush_word(self) -> None:
        if not self.word:
            return
        if self.column + len(self.word) > self.width and self.column > 0:
            self.out.write("\n")
            self.column = 0
        self.out.write(self.word)
        self.column += len(self.word)
        self.word = ""

    def finish(self, interrupted: bool = False) -> str:
        """Writes what is held back; returns the answer as written. After Ctrl-C
        (`interrupted`) the held-back word is dropped instead: nothing prints after the ^C."""
        text = "".join(self.text)
        if interrupted and self.word:
            text = text[: len(text) - len(self.word)]
            self.word = ""
        if self.width:
            self._flush_word()
        self.out.flush()
        return text


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def wordwrap_default() -> bool:
    return os.environ.get("TERM", "") != "dumb"
