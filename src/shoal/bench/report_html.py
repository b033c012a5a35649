"""`shoal bench --html`: one self-contained HTML page for a run's results (schema shoal-bench/1).

Everything is inline (CSS, SVG plots from report_plots), so the file opens offline and can be
mailed or archived as is. Every string taken from the results is HTML-escaped.

    python -m shoal.bench.report_html results.json -o report.html   # re-render a saved run
    python -m shoal.bench.report_html results.json --plots docs/img  # the plots as SVG files
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from shoal.bench.report_plots import (
    Plot, analysis_of, build_plots, error_count, error_counts, level_axis_label, level_label, number, rows_by_target,
    same_level, settings_of, slo_text, stat, target_colours, target_names,
)

SCHEMA = "shoal-bench/1"
# an error message longer than this is cut in the table (a server can answer with a whole page)
MAX_MESSAGE_CHARS = 300

Row = Mapping[str, Any]


def render_html(results: Mapping[str, Any]) -> str:
    """The report page for a results dict. Raises ValueError for another schema, ImportError
    (naming the `bench` extra) without matplotlib."""
    _require_schema(results)
    page = _Page(results)
    plots = build_plots(results)
    body = "\n".join([
        page.header(), page.verdicts(), _plots_section(plots), page.settings(),
        page.throughput_table(), page.latency_table(), page.errors_and_server_table(),
        page.error_messages(),
    ])
    title = f"shoal bench: {settings_of(results).get('workload', 'run')}"
    return _DOCUMENT.format(title=escape(str(title)), css=_CSS, body=body)


# ---- formatting: every helper returns escaped HTML text; "—" for unknown values ----

MISSING = "—"


def _fixed(value: Any, digits: int, scale: float = 1.0) -> str:
    x = number(value) * scale
    return f"{x:,.{digits}f}" if math.isfinite(x) else MISSING


def _count(value: Any) -> str:
    x = number(value)
    return f"{x:,.0f}" if math.isfinite(x) else MISSING


def _percent(value: Any) -> str:
    x = number(value)
    return f"{x * 100:.1f}%" if math.isfinite(x) else MISSING


def _seconds(value: Any) -> str:
    return _fixed(value, 3)


def _millis(value: Any) -> str:
    return _fixed(value, 1, 1000)


def _text(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and not math.isfinite(value):
        return MISSING
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value) or MISSING
    if isinstance(value, Mapping):
        return ", ".join(f"{escape(str(k))}: {_text(v)}" for k, v in value.items()) or MISSING
    return escape(str(value))


def _swatch(colour: str) -> str:
    return f'<span class="swatch" style="background:{colour}"></span>'


# ---- tables ----

@dataclass(frozen=True)
class Column:
    header: str                    # HTML (ours, not from the results)
    cell: Callable[[Row], str]     # escaped HTML for one row
    numeric: bool = True


def _table(columns: list[Column], rows: list[Row], groups: list[tuple[str, int]] | None = None,
           row_class: Callable[[Row], str] = lambda row: "") -> str:
    head, group_starts = "", set()
    if groups:
        head = "<tr>" + "".join(f'<th colspan="{span}" class="group">{label}</th>' for label, span in groups) + "</tr>"
        ends = [sum(span for _, span in groups[: i + 1]) for i in range(len(groups))]
        group_starts = set(ends[:-1])
    # a rule to the left of each group's first column
    classes = [" ".join(filter(None, ["num" if c.numeric else "", "group-start" if i in group_starts else ""]))
               for i, c in enumerate(columns)]
    attrs = [f' class="{css}"' if css else "" for css in classes]
    head += "<tr>" + "".join(f"<th{a}>{c.header}</th>" for a, c in zip(attrs, columns)) + "</tr>"
    lines = []
    for row in rows:
        css = row_class(row)
        cells = "".join(f"<td{a}>{c.cell(row)}</td>" for a, c in zip(attrs, columns))
        lines.append(f'<tr class="{css}">{cells}</tr>' if css else f"<tr>{cells}</tr>")
    body = "\n".join(lines) or f'<tr><td colspan="{len(columns)}">no rows</td></tr>'
    return f'<div class="table-wrap"><table>\n<thead>{head}</thead>\n<tbody>\n{body}\n</tbody></table></div>'


def _plots_section(plots: list[Plot]) -> str:
    figures = "\n".join(f'<figure id="{p.key}"><h3>{escape(p.title)}</h3>\n{p.svg}\n'
                         f"<figcaption>{escape(p.caption)}</figcaption></figure>" for p in plots)
    return f'<section><h2>Plots</h2>\n<div class="plots">\n{figures}\n</div></section>'


class _Page:
    """The sections of one report, each an HTML string."""

    def __init__(self, results: Mapping[str, Any]) -> None:
        self.results = results
        self.settings_map = settings_of(results)
        self.names = target_names(results)
        self.colours = target_colours(self.names)
        self.rows_of = rows_by_target(results, self.names)
        # rows in table order: by target as listed, then by level
        self.rows = [row for name in self.names for row in self.rows_of[name]]

    def _target_cell(self, row: Row) -> str:
        name = str(row.get("target"))
        return f"{_swatch(self.colours[name])}{escape(name)}"

    def _level_cell(self, row: Row) -> str:
        analysis = analysis_of(self.results, str(row.get("target")))
        tags = [label for key, label in (("knee", "knee"), ("saturation", "saturated"), ("oversaturation", "over"))
                if same_level(analysis.get(key), row.get("level"))]
        # tags before the number, so the numbers stay right-aligned
        return "".join(f'<span class="tag">{t}</span> ' for t in tags) + escape(level_label(row.get("level")))

    def _key_columns(self) -> list[Column]:
        return [Column("target", self._target_cell, numeric=False), Column("level", self._level_cell)]

    def _row_class(self, row: Row) -> str:
        return "has-errors" if error_counts(row) else ""

    def header(self) -> str:
        s, host = self.settings_map, self.results.get("host")
        host = host if isinstance(host, Mapping) else {}
        when = f"{_text(self.results.get('started_at'))} – {_text(self.results.get('finished_at'))}"
        machine = ", ".join(_text(host.get(k)) for k in ("hostname", "cpu") if host.get(k)) or MISSING
        return (f"<header><h1>shoal bench: {_text(s.get('workload'))}</h1>\n"
                f'<p class="subtitle">{_text(s.get("mode"))} loop · levels {_text(s.get("levels"))} · '
                f"{len(self.names)} target{'s' if len(self.names) != 1 else ''} · {when} · {machine}</p></header>")

    def verdicts(self) -> str:
        cards = []
        for name in self.names:
            a = analysis_of(self.results, name)
            facts = " · ".join(f"{label} {escape(level_label(a.get(key)))}" if a.get(key) is not None
                               else f"{label} {MISSING}"
                               for key, label in (("knee", "knee"), ("saturation", "saturation"),
                                                  ("oversaturation", "oversaturation")))
            peak = (f" · peak {_fixed(a.get('peak_output_throughput'), 1)} output tok/s at "
                    f"{escape(level_label(a.get('peak_level')))}")
            summary = _text(a.get("summary")) if a.get("summary") else "no analysis recorded"
            cards.append(f'<div class="verdict" style="border-left-color:{self.colours[name]}">'
                         f'<div class="verdict-target">{_swatch(self.colours[name])}{escape(name)}</div>'
                         f'<p class="summary">{summary}</p><p class="facts">{facts}{peak}</p></div>')
        warnings = self.results.get("warnings")
        notes = ("".join(f'<p class="warning">{_text(w)}</p>' for w in warnings)
                 if isinstance(warnings, list) else "")
        return ("<section><h2>Verdict</h2>\n" + notes + ("\n".join(cards) or "<p>no targets</p>")
                + "</section>")

    def settings(self) -> str:
        s = self.settings_map
        shown = {
            "workload": _text(s.get("workload")),
            "mode": _text(s.get("mode")) + (f" ({_text(s.get('arrival'))} arrivals)" if s.get("arrival") else ""),
            f"levels ({escape(level_axis_label(self.results))})": _text(s.get("levels")),
            "per level": " · ".join(filter(None, [
                f"{_text(s.get('duration_s'))} s" if s.get("duration_s") is not None else "",
                f"{_text(s.get('requests_per_level'))} requests" if s.get("requests_per_level") is not None else "",
            ])) or MISSING,
            "warm-up requests": _text(s.get("warmup_requests")),
            "generation": (f"max_tokens {_text(s.get('max_tokens'))} · temperature {_text(s.get('temperature'))} · "
                           f"ignore_eos {_text(s.get('ignore_eos'))} · seed {_text(s.get('seed'))}"),
            "SLOs": escape(slo_text(self.results)) or "none given",
            "stall threshold": f"{_text(s.get('stall_threshold_s'))} s",
            "request timeout": f"{_text(s.get('request_timeout_s'))} s",
            "settle before each level": (f"up to {_text(s.get('settle_s'))} s for quiet CPUs"
                                         if s.get("settle_s") is not None else MISSING),
        }
        known = {"workload", "mode", "arrival", "levels", "duration_s", "requests_per_level", "warmup_requests",
                 "max_tokens", "temperature", "ignore_eos", "seed", "slo", "stall_threshold_s", "request_timeout_s",
                 "settle_s"}
        shown.update({escape(str(k)): _text(v) for k, v in s.items() if k not in known})
        host = self.results.get("host")
        if isinstance(host, Mapping):
            shown["host"] = _text(host)
        shown["command"] = f"<code>{_text(self.results.get('command'))}</code>"
        settings_rows = "\n".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in shown.items())
        targets = [t for t in self.results.get("targets") or [] if isinstance(t, Mapping)]
        target_table = _table([
            Column("target", lambda t: f"{_swatch(self.colours[str(t.get('name'))])}{escape(str(t.get('name')))}",
                   numeric=False),
            Column("URL", lambda t: f"<code>{_text(t.get('url'))}</code>", numeric=False),
            Column("dialect", lambda t: _text(t.get("dialect")), numeric=False),
            Column("model", lambda t: _text(t.get("model")), numeric=False),
            Column("ignore_eos honoured", lambda t: _text(t.get("ignore_eos_supported")), numeric=False),
            Column("server metrics", lambda t: _text(t.get("server_metrics")), numeric=False),
        ], targets)
        return (f'<section><h2>Run settings</h2>\n<table class="settings">{settings_rows}</table>\n'
                f"<h3>Targets</h3>\n{target_table}</section>")

    def throughput_table(self) -> str:
        columns = self._key_columns() + [
            Column("duration (s)", lambda r: _fixed(r.get("duration_s"), 1)),
            Column("completed", lambda r: _count(r.get("completed"))),
            Column("errors", lambda r: _count(error_count(r)) if isinstance(r.get("errors"), Mapping)
                   else MISSING),
            Column("requests/s", lambda r: _fixed(r.get("request_throughput"), 2)),
            Column("output tok/s", lambda r: _fixed(r.get("output_throughput"), 1)),
            Column("total tok/s", lambda r: _fixed(r.get("total_token_throughput"), 1)),
            Column("prompt tokens", lambda r: _count(r.get("prompt_tokens"))),
            Column("output tokens", lambda r: _count(r.get("output_tokens"))),
            Column("goodput (req/s)", lambda r: _fixed(r.get("goodput"), 2)),
            Column("SLO met", lambda r: _percent(r.get("slo_attainment"))),
        ]
        return ("<section><h2>Every target and level</h2>\n<h3>Throughput</h3>\n"
                + _table(columns, self.rows, row_class=self._row_class) + "</section>")

    def latency_table(self) -> str:
        def stats(metric: str, keys: tuple[str, ...], fmt: Callable[[Any], str]) -> list[Column]:
            return [Column(key, lambda r, k=key: fmt(stat(r, metric, k))) for key in keys]

        quartet = ("mean", "p50", "p90", "p99")
        columns = (self._key_columns() + stats("ttft", quartet, _seconds)
                   + stats("itl", quartet + ("max", "stdev"), _millis)
                   + stats("tpot", quartet, _millis) + stats("e2e", quartet, _seconds))
        groups = [("", 2), ("time to first token (s)", 4), ("inter-token latency (ms)", 6),
                  ("time per output token (ms)", 4), ("end-to-end (s)", 4)]
        return ("<section><h3>Latency</h3>\n"
                + _table(columns, self.rows, groups=groups, row_class=self._row_class) + "</section>")

    def errors_and_server_table(self) -> str:
        def server(key: str, fmt: Callable[[Any], str]) -> Callable[[Row], str]:
            return lambda r: fmt(r["server"].get(key)) if isinstance(r.get("server"), Mapping) else MISSING

        def errors(row: Row) -> str:
            counts = error_counts(row)
            return ", ".join(f"{escape(kind)} ×{n:,}" for kind, n in counts.items()) or "none"

        columns = self._key_columns() + [
            Column("errors by kind", errors, numeric=False),
            Column("stalls", lambda r: _count(r.get("stalls"))),
            Column("source", server("source", _text), numeric=False),
            Column("prompt tokens", server("prompt_tokens", _count)),
            Column("generation tokens", server("generation_tokens", _count)),
            Column("TTFT mean (s)", server("ttft_mean", _seconds)),
            Column("e2e mean (s)", server("e2e_mean", _seconds)),
            Column("preemptions", server("preemptions", _count)),
            Column("prefix cache hits", server("prefix_cache_hit_rate", _percent)),
        ]
        groups = [("", 4), ("as the server counted (its /metrics)", 7)]
        stall = self.settings_map.get("stall_threshold_s")
        note = (f'<p class="note">A stall is a gap between two tokens of a stream longer than '
                f"{_text(stall)} s.</p>" if stall is not None else "")
        return ("<section><h3>Errors, stalls and server-side figures</h3>\n"
                + _table(columns, self.rows, groups=groups, row_class=self._row_class) + note + "</section>")

    def error_messages(self) -> str:
        requests = self.results.get("requests")
        failed = Counter()
        for q in requests if isinstance(requests, list) else []:
            if isinstance(q, Mapping) and (q.get("error") is not None or q.get("status") not in (200, None)):
                message = str(q.get("error") or "")
                if len(message) > MAX_MESSAGE_CHARS:
                    message = message[:MAX_MESSAGE_CHARS] + "…"
                failed[(str(q.get("target")), level_label(q.get("level")), str(q.get("status")), message)] += 1
        if not failed:
            return ""
        rows = [{"target": t, "level": lv, "status": st, "message": m, "n": n}
                for (t, lv, st, m), n in sorted(failed.items(), key=lambda item: -item[1])]
        columns = [
            Column("target", lambda r: f"{_swatch(self.colours.get(r['target'], '#999'))}{escape(r['target'])}",
                   numeric=False),
            Column("level", lambda r: escape(r["level"])),
            Column("status", lambda r: escape(r["status"]), numeric=False),
            Column("requests", lambda r: f"{r['n']:,}"),
            Column("message", lambda r: escape(r["message"]) or MISSING, numeric=False),
        ]
        return "<section><h3>Failed requests</h3>\n" + _table(columns, rows) + "</section>"


# NOTE: the Content-Security-Policy forbids every fetch and script: the page needs none, and a
# string that escaped escaping still could not run or reach the network.
_DOCUMENT = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<main>
{body}
<footer>Written by <code>shoal bench</code> (results schema shoal-bench/1).</footer>
</main>
</body>
</html>
"""

_CSS = """
:root { color-scheme: light; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #1b1b1b; background: #fff; }
main { max-width: 1240px; margin: 0 auto; padding: 16px 20px 40px; }
h1 { font-size: 24px; margin: 8px 0 2px; }
h2 { font-size: 18px; margin: 28px 0 10px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.subtitle { color: #555; margin: 0; }
code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; word-break: break-all; }
.verdict { border-left: 6px solid #999; background: #f6f7f9; padding: 8px 14px; margin: 8px 0; }
.verdict-target { font-weight: 600; }
.warning { border-left: 6px solid #d62728; background: #fdf0f0; padding: 8px 14px; margin: 8px 0; }
.verdict .summary { font-size: 16px; margin: 4px 0; }
.verdict .facts { color: #555; margin: 0; font-size: 13px; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 16px; }
figure { margin: 0; border: 1px solid #e3e3e3; border-radius: 4px; padding: 8px 10px; }
figure h3 { margin: 0 0 4px; }
figure svg { width: 100%; height: auto; display: block; }
figcaption { color: #555; font-size: 12px; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: 12px; margin: 4px 0 8px; }
th, td { padding: 3px 7px; border-bottom: 1px solid #e6e6e6; text-align: left; vertical-align: top; }
th { background: #f3f4f6; font-weight: 600; }
th.group { text-align: center; border-left: 1px solid #d0d0d0; }
.group-start { border-left: 1px solid #d0d0d0; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.has-errors td { background: #fff1f0; }
table.settings th { width: 180px; background: none; }
.tag { font-size: 10px; background: #eef; border: 1px solid #ccd; border-radius: 3px; padding: 0 3px; }
.note { color: #555; font-size: 12px; }
footer { margin-top: 32px; color: #777; font-size: 12px; }
@media print {
  @page { size: A4 landscape; margin: 12mm; }
  body { font-size: 10pt; }
  main { max-width: none; padding: 0; }
  .plots { grid-template-columns: 1fr 1fr; gap: 4mm; }
  figure { break-inside: avoid; page-break-inside: avoid; border: none; padding: 0; }
  h2 { break-after: avoid; }
  .verdict { background: none; }
  .table-wrap { overflow: visible; }
  table { font-size: 7.5pt; }
  tr { break-inside: avoid; }
  th { background: none; }
}
"""


def _require_schema(results: Any) -> None:
    if not isinstance(results, Mapping) or results.get("schema") != SCHEMA:
        found = results.get("schema") if isinstance(results, Mapping) else type(results).__name__
        raise ValueError(f"not a shoal bench results file: expected schema {SCHEMA!r}, found {found!r}")


def write_plot_files(results: Mapping[str, Any], directory: str | Path) -> list[Path]:
    """Each of the report's plots as a standalone SVG file (`<key>.svg`), for docs and slides.
    Same errors as render_html."""
    _require_schema(results)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for plot in build_plots(results):
        path = directory / f"{plot.key}.svg"
        # NOTE: the prolog makes the file a valid XML document; inline SVG in the page omits it
        path.write_text('<?xml version="1.0" encoding="utf-8" standalone="no"?>\n' + plot.svg, encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shoal.bench.report_html",
        description="Render a saved `shoal bench` results JSON as one self-contained HTML report.")
    parser.add_argument("results", type=Path, help="the results JSON a `shoal bench` run wrote")
    parser.add_argument("-o", "--output", type=Path, help="the HTML file to write (default: RESULTS with .html)")
    parser.add_argument("--plots", type=Path, metavar="DIR", help="also write each plot as DIR/<plot>.svg")
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.results.read_text(encoding="utf-8"))
    except OSError as exc:
        parser.error(f"cannot read {args.results}: {exc.strerror or exc}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        parser.error(f"{args.results} is not a JSON file: {exc}")
    try:
        page = render_html(results)
    except (ValueError, ImportError) as exc:
        parser.error(str(exc))
    output = args.output or args.results.with_suffix(".html")
    output.write_text(page, encoding="utf-8")
    print(f"wrote {output}")
    if args.plots:
        for path in write_plot_files(results, args.plots):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
