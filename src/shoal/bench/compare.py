"""Changes between two runs per (target, level): output tok/s, P99 TTFT, P99 ITL; regressions flagged."""
from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table


@dataclass(frozen=True, slots=True)
class Change:
    target: str
    level: float
    throughput: float | None        # relative change, e.g. -0.12 = 12% lower
    ttft_p99: float | None
    itl_p99: float | None
    regressions: tuple[str, ...]    # which of the three got worse beyond the threshold


def _relative(old: float | None, new: float | None) -> float | None:
    if old is None or new is None or old == 0:
        return None
    return new / old - 1


def compare_runs(old: dict, new: dict, threshold: float) -> list[Change]:
    """Per (target, level) present in both runs, in the new run's order."""
    before = {(r["target"], r["level"]): r for r in old["levels"]}
    changes = []
    for row in new["levels"]:
        prev = before.get((row["target"], row["level"]))
        if prev is None:
            continue
        tput = _relative(prev["output_throughput"], row["output_throughput"])
        ttft = _relative(prev["ttft"]["p99"], row["ttft"]["p99"])
        itl = _relative(prev["itl"]["p99"], row["itl"]["p99"])
        worse = []
        if tput is not None and tput < -threshold:
            worse.append("output tok/s")
        if ttft is not None and ttft > threshold:
            worse.append("P99 TTFT")
        if itl is not None and itl > threshold:
            worse.append("P99 ITL")
        changes.append(Change(row["target"], row["level"], tput, ttft, itl, tuple(worse)))
    return changes


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:+.1%}"


def print_changes(changes: list[Change], threshold: float, console: Console | None = None) -> None:
    console = console or Console()
    table = Table("target", "level", "output tok/s", "P99 TTFT", "P99 ITL", "verdict",
                  title=f"against the earlier run (regression: worse by more than {threshold:.0%})",
                  header_style="bold")
    for c in changes:
        verdict = f"[red]REGRESSION: {', '.join(c.regressions)}[/red]" if c.regressions else "ok"
        table.add_row(c.target, f"{c.level:g}", _pct(c.throughput), _pct(c.ttft_p99), _pct(c.itl_p99), verdict)
    console.print(table)
    if not changes:
        console.print("[yellow]no (target, level) pair is in both runs[/yellow]")
