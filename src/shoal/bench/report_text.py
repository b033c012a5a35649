"""The terminal summary (rich) and the Markdown report, both from a results dict."""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1000:,.1f}"


def _count(value: int | None) -> str:
    return "–" if value is None else str(value)


def _errors(errors: dict) -> str:
    shown = [f"{code}×{n}" for code, n in errors.items() if n]
    return ", ".join(shown) or "0"


LEVEL_HEADERS = ("target", "level", "done", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
                 "ITL p99 ms", "ITL max ms", "e2e p99 s", "stalls", "errors", "goodput req/s")
SERVER_HEADERS = ("target", "level", "source", "prompt tok (client/server)", "output tok (client/server)",
                  "mean TTFT ms (client/server)", "preemptions", "prefix-cache hits")


def level_rows(results: dict) -> list[list[str]]:
    rows = []
    for row in results["levels"]:
        rows.append([row["target"], f"{row['level']:g}", str(row["completed"]), _num(row["request_throughput"], 2),
                     _num(row["output_throughput"]), _ms(row["ttft"]["p50"]), _ms(row["ttft"]["p99"]),
                     _ms(row["itl"]["p50"]), _ms(row["itl"]["p99"]), _ms(row["itl"]["max"]),
                     _num(row["e2e"]["p99"], 2), str(row["stalls"]), _errors(row["errors"]),
                     _num(row["goodput"], 2)])
    return rows


def server_rows(results: dict) -> list[list[str]]:
    rows = []
    for row in results["levels"]:
        server = row.get("server")
        if not server:
            continue
        hit_rate = server.get("prefix_cache_hit_rate")
        rows.append([row["target"], f"{row['level']:g}", server["source"],
                     f"{row['prompt_tokens']} / {_count(server['prompt_tokens'])}",
                     f"{row['output_tokens']} / {_count(server['generation_tokens'])}",
                     f"{_ms(row['ttft']['mean'])} / {_ms(server['ttft_mean'])}",
                     _count(server["preemptions"]),
                     "–" if hit_rate is None else f"{hit_rate:.0%}"])
    return rows


def _settings_line(results: dict) -> str:
    s = results["settings"]
    unit = "concurrency" if s["mode"] == "closed" else f"rate ({s['arrival']} arrivals, req/s)"
    per_level = f"{s['duration_s']:g} s" if s["duration_s"] else f"{s['requests_per_level']} requests"
    return (f"workload {s['workload']}, {unit} {', '.join(f'{v:g}' for v in s['levels'])}, {per_level} per level, "
            f"max_tokens {s['max_tokens']}, temperature {s['temperature']:g}, ignore_eos {s['ignore_eos']}")


def verdicts(results: dict) -> list[tuple[str, str]]:
    out = []
    for target in results["targets"]:
        analysis = results["analysis"].get(target["name"])
        if analysis:
            out.append((target["name"], analysis["summary"]))
    return out


def print_summary(results: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]shoal bench[/bold] — {_settings_line(results)}")
    table = Table(*LEVEL_HEADERS, title="per target and level", header_style="bold")
    for row in level_rows(results):
        table.add_row(*row)
    console.print(table)
    server = server_rows(results)
    if server:
        side = Table(*SERVER_HEADERS, title="server-side (/metrics deltas)", header_style="bold")
        for row in server:
            side.add_row(*row)
        console.print(side)
    for target in results["targets"]:
        if not target["ignore_eos_supported"] and results["settings"]["ignore_eos"]:
            console.print(f"[yellow]{target['name']}: ignore_eos not supported; answers may end early[/yellow]")
    for warning in results.get("warnings") or ():
        console.print(f"[yellow]{escape(warning)}[/yellow]")
    for name, summary in verdicts(results):
        console.print(f"[bold]{name}[/bold]: {summary}")


def _md_table(headers: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"# shoal bench — {s['workload']}", "",
             f"{results['started_at']} on {results['host']['hostname']} ({results['host']['cpu']}, "
             f"{results['host']['cores']} cores). {_settings_line(results)}.", "",
             f"`{results['command']}`", "", "## Verdicts", ""]
    lines += [f"- **{name}**: {summary}" for name, summary in verdicts(results)]
    if results.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {warning}" for warning in results["warnings"]]
    lines += ["", "## Targets", ""]
    lines += [f"- **{t['name']}**: {t['url']} ({t['dialect']}, model `{t['model']}`; ignore_eos "
              f"{'honoured' if t['ignore_eos_supported'] else 'not supported'}; server metrics: "
              f"{t['server_metrics'] or 'none'})" for t in results["targets"]]
    lines += ["", "## Per target and level", ""] + _md_table(LEVEL_HEADERS, level_rows(results))
    server = server_rows(results)
    if server:
        lines += ["", "## Server-side figures (/metrics deltas)", ""] + _md_table(SERVER_HEADERS, server)
    levels = "concurrent streams" if s["mode"] == "closed" else "arrival rates (requests/s)"
    lines += ["", f"Levels are {levels}; latencies are the client's, from sending each request."]
    return "\n".join(lines) + "\n"
