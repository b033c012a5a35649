"""`shoal top`: the live dashboard in the terminal, redrawn every second; `q` quits.

It reads the server's GET /dashboard/snapshot (the snapshot the browser dashboard's feed
carries) at SHOAL_HOST, sending SHOAL_API_KEY as other client commands do; with keys
required that must be an admin key. Keys are read from the terminal in cbreak mode (one
key at a time, no echo, Ctrl-C still interrupts), so `q` acts at once without Enter.
"""
from __future__ import annotations

import argparse
import os
import select
import sys
import time
from datetime import datetime
from typing import Any, Self

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from shoal.cli.client import Client, CliError, ErrorReply, ServerUnreachable

REFRESH_S = 1.0
HISTORY_S = 60          # the sparklines' span
SPARK = "▁▂▃▄▅▆▇█"
MAX_REFUSALS = 6


def add_top_command(sub) -> None:
    top = sub.add_parser("top", help="live view of the server: load, latency, models, callers (q quits)",
                         description="What GET /dashboard shows, in the terminal, refreshed every second. "
                                     "With keys required, SHOAL_API_KEY must be an admin key.")
    top.add_argument("--once", action="store_true", help="print the view once and exit (as when stdout is not "
                                                         "a terminal)")
    top.set_defaults(func=cmd_top)


def cmd_top(args: argparse.Namespace) -> int:
    with Client(timeout=10.0) as client:
        snap = fetch(client)        # a server that is not there, or a refused key: fail at once
        console = Console()
        if args.once or not console.is_terminal:     # a pipe gets one view, not a redraw loop
            console.print(render(snap, client.host.url))
            return 0
        with KeyReader() as keys, Live(render(snap, client.host.url), console=console, auto_refresh=False,
                                       screen=console.is_terminal, redirect_stdout=False) as live:
            next_at = time.monotonic()
            while True:
                next_at += REFRESH_S
                while (left := next_at - time.monotonic()) > 0:
                    if keys.wait(left) in ("q", "Q"):
                        return 0
                next_at = max(next_at, time.monotonic() - REFRESH_S)    # no burst after a stall
                error = None
                try:
                    snap = fetch(client)
                except (ServerUnreachable, ErrorReply) as exc:
                    error = str(exc)     # keep showing the last view, and why it is old
                live.update(render(snap, client.host.url, error), refresh=True)


def fetch(client: Client) -> dict[str, Any]:
    try:
        return client.request("GET", f"/dashboard/snapshot?history={HISTORY_S}")
    except ErrorReply as exc:
        if exc.status in (401, 403):
            raise CliError(f"{exc.message} (`shoal top` needs an admin key when the server requires keys: "
                           "set SHOAL_API_KEY)") from None
        if exc.missing_endpoint:
            raise CliError(f"the server at {client.host.url} has no live dashboard (an older shoal?)") from None
        raise


class KeyReader:
    """Single key presses from a terminal stdin; elsewhere (a pipe, no termios) it only waits."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._saved = None

    def __enter__(self) -> Self:
        try:
            import termios
            import tty

            if sys.stdin.isatty():
                self._fd = sys.stdin.fileno()
                self._saved = termios.tcgetattr(self._fd)
                tty.setcbreak(self._fd)
        except (ImportError, OSError, ValueError):
            self._fd = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None and self._saved is not None:
            import termios

            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)

    def wait(self, timeout: float) -> str | None:
        """The key pressed within `timeout` seconds, else None."""
        if self._fd is None:
            time.sleep(timeout)
            return None
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return None
        data = os.read(self._fd, 32)
        if not data:                # the terminal went away: just keep redrawing
            self._fd = None
            return None
        return data.decode(errors="replace")[:1]


# ---- the view ------------------------------------------------------------------------------


def render(snap: dict[str, Any], url: str, error: str | None = None) -> RenderableType:
    now, series = snap["now"], snap["series"]
    head = Text.assemble(("shoal ", "bold"), f"v{snap['version']} · ",
                         (snap["state"], "green" if snap["state"] == "ready" else "yellow bold"),
                         f" · up {_duration(snap['uptime_s'])} · {url} · ",
                         datetime.fromtimestamp(snap["time"]).strftime("%H:%M:%S"))
    parts: list[RenderableType] = [head]
    if error:
        parts.append(Text(f"not updating: {error}", style="red"))

    figures = Table.grid(padding=(0, 2))
    for _ in range(3):
        figures.add_column()
    figures.add_row("output tok/s", Text(_num(now["output_tps"]), style="bold"), _spark(series["output_tps"]))
    figures.add_row("prompt tok/s", Text(_num(now["prompt_tps"]), style="bold"), _spark(series["prompt_tps"]))
    figures.add_row(f"TTFT p50 / p99 ({snap['windows']['latency_s']}s)",
                    Text(f"{_secs(now['ttft_p50'])} / {_secs(now['ttft_p99'])}", style="bold"),
                    _spark(series["ttft_p99"]))
    figures.add_row(f"ITL p50 / p99 ({snap['windows']['latency_s']}s)",
                    Text(f"{_secs(now['itl_p50'])} / {_secs(now['itl_p99'])}", style="bold"),
                    _spark(series["itl_p99"]))
    figures.add_row("running / queued", Text(f"{now['running']} / {now['queued']}", style="bold"), "")
    parts += [Text(), figures]

    # NOTE: short headers, no borders (_table): the tables fit an 80-column terminal.
    models = _table("loaded models (run, queued, bound: interactive/batch; prefix hits and "
                    "preemptions: last minute/all)")
    for name in ("model", "mode", "KV", "prefix", "run", "queued", "bound", "preempt", "tok/s"):
        models.add_column(name, justify="left" if name in ("model", "mode") else "right",
                          no_wrap=name == "model")
    for m in snap["models"]:
        models.add_row(m["name"], f"{m['compute']}/{m['device']}", _pct(m["kv_usage"]),
                       f"{_pct(m['prefix_hit_rate'])}/{_pct(m['prefix_hit_rate_total'])}",
                       f"{m['running_by_class']['interactive']}/{m['running_by_class']['batch']}",
                       f"{m['queued']['interactive']}/{m['queued']['batch']}",
                       f"{m['queue_bounds']['interactive']}/{m['queue_bounds']['batch']}",
                       f"{'–' if m['preemptions_recent'] is None else m['preemptions_recent']}/{m['preemptions']}",
                       _num(m["output_tps"]))
    if not snap["models"]:
        models.add_row("(no model loaded)", *[""] * 8)
    parts += [Text(), models]

    if snap["keys"]:
        keys = _table("callers")
        for name in ("key", "requests", "prompt tok", "output tok", "429s", "other 4xx", "5xx", "now"):
            keys.add_column(name, justify="left" if name == "key" else "right")
        for k in snap["keys"]:
            keys.add_row(_caller(k["key_id"], k["name"]), str(k["requests"]), str(k["prompt_tokens"]),
                         str(k["output_tokens"]), str(k["rate_limited"]), str(k["refused"]), str(k["errors"]),
                         str(k["concurrent"]))
        parts += [Text(), keys]

    if snap["refusals"]:
        refusals = _table("last refusals and errors")
        for name in ("time", "status", "key", "model", "reason"):
            refusals.add_column(name, justify="right" if name == "status" else "left",
                                overflow="fold" if name == "reason" else "ellipsis")
        for r in snap["refusals"][:MAX_REFUSALS]:
            refusals.add_row(datetime.fromtimestamp(r["time"]).strftime("%H:%M:%S"),
                             Text(str(r["status"]), style="red" if r["status"] >= 500 else "yellow"),
                             _caller(r["key_id"], r["key_name"]), r["model"] or "–", r["reason"] or "")
        parts += [Text(), refusals]
    parts += [Text(), Text("q quits · refreshed every second", style="dim")]
    return Group(*parts)


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1),
                 collapse_padding=True, pad_edge=False, show_edge=False)


def _spark(values: list[float | None]) -> Text:
    present = [v for v in values if v is not None]
    top = max(present, default=0) or 1
    chars = [" " if v is None else SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1) + 0.5))]
             for v in values[-HISTORY_S:]]
    return Text("".join(chars), style="cyan")


def _caller(key_id: str | None, name: str | None) -> str:
    if key_id is None:
        return "anonymous"
    return f"{name} ({key_id})" if name else key_id


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.0f}%"


def _secs(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _duration(seconds: float) -> str:
    minutes, _ = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes}m" if hours else f"{minutes}m"
