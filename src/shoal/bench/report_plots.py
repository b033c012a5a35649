"""The HTML bench report's plots: figures drawn from a `shoal bench` results dict, as inline SVG.

Also the reading helpers the report's tables share with the plots (target order and colours,
rows per target, tolerant number parsing), so both agree on what a results dict says.
matplotlib is optional (the `bench` extra) and imported only when a figure is drawn.
"""
from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

BENCH_EXTRA_HINT = "pip install 'shoal[bench]'"

# matplotlib's "tab10", written out so the HTML tables can use the same colours without matplotlib
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
# an axis goes logarithmic when its largest value is this many times its smallest
WIDE_RANGE = 20.0
# a CDF line keeps at most about this many points (a run can hold 100k+ inter-token latencies)
MAX_CDF_POINTS = 400
# legend labels longer than this are cut (the tables show the whole name)
MAX_LEGEND_NAME = 32
FIGURE_SIZE_IN = (6.4, 3.6)


@dataclass(frozen=True)
class Plot:
    key: str      # unique within the page: the figure's HTML id and its SVG ids' prefix
    title: str
    caption: str
    svg: str


# ---- reading a results dict (tolerant: every value may be missing, None, NaN or mistyped) ----

def number(value: Any) -> float:
    """A float, or NaN for anything that is not a finite-or-infinite number."""
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def level_label(level: Any) -> str:
    value = number(level)
    if not math.isfinite(value):
        return str(level) if level is not None else "?"
    return str(int(value)) if value.is_integer() else f"{value:g}"


def same_level(a: Any, b: Any) -> bool:
    x, y = number(a), number(b)
    return math.isfinite(x) and math.isfinite(y) and math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)


def stat(row: Mapping[str, Any], metric: str, key: str) -> float:
    """`row[metric][key]` (e.g. ttft p99) as a float, NaN when any part is missing."""
    block = row.get(metric)
    return number(block.get(key)) if isinstance(block, Mapping) else math.nan


def error_counts(row: Mapping[str, Any]) -> dict[str, int]:
    """The row's failed requests by kind ("503", "timeout", …), kinds with none left out."""
    errors = row.get("errors")
    if not isinstance(errors, Mapping):
        return {}
    counts = {str(kind): number(n) for kind, n in errors.items()}
    return {kind: int(n) for kind, n in counts.items() if math.isfinite(n) and n > 0}


def error_count(row: Mapping[str, Any]) -> int:
    return sum(error_counts(row).values())


def _dicts(value: Any) -> list[Mapping[str, Any]]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def target_names(results: Mapping[str, Any]) -> list[str]:
    """Targets in the order the run lists them, then any that only appear in rows or requests."""
    names: list[str] = []
    for source in ("targets", "levels", "requests"):
        for item in _dicts(results.get(source)):
            name = str(item.get("name" if source == "targets" else "target"))
            if name not in names:
                names.append(name)
    return names


def target_colours(names: list[str]) -> dict[str, str]:
    # NOTE: past ten targets the colours repeat; the legends and tables still name every target.
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def rows_by_target(results: Mapping[str, Any], names: list[str]) -> dict[str, list[Mapping[str, Any]]]:
    rows: dict[str, list[Mapping[str, Any]]] = {name: [] for name in names}
    for row in _dicts(results.get("levels")):
        rows[str(row.get("target"))].append(row)
    for target_rows in rows.values():
        target_rows.sort(key=lambda r: (math.inf if math.isnan(number(r.get("level"))) else number(r.get("level"))))
    return rows


def analysis_of(results: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    analysis = results.get("analysis")
    entry = analysis.get(name) if isinstance(analysis, Mapping) else None
    return entry if isinstance(entry, Mapping) else {}


def settings_of(results: Mapping[str, Any]) -> Mapping[str, Any]:
    settings = results.get("settings")
    return settings if isinstance(settings, Mapping) else {}


def slo_of(results: Mapping[str, Any]) -> dict[str, float]:
    """The SLOs the run was given (unset ones left out)."""
    slo = settings_of(results).get("slo")
    if not isinstance(slo, Mapping):
        return {}
    return {key: number(value) for key, value in slo.items() if math.isfinite(number(value))}


def slo_text(results: Mapping[str, Any]) -> str:
    """The SLOs in words, e.g. "TTFT ≤ 1 s, ITL ≤ 0.2 s"."""
    names = {"ttft_s": "TTFT", "itl_s": "ITL", "e2e_s": "end-to-end"}
    return ", ".join(f"{names.get(k, k)} ≤ {v:g} s" for k, v in slo_of(results).items())


def level_axis_label(results: Mapping[str, Any]) -> str:
    mode = settings_of(results).get("mode")
    return {"closed": "concurrent streams", "open": "arrival rate (requests/s)"}.get(mode, "level")


# ---- drawing ----

def _matplotlib() -> tuple[Any, Any]:
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            f"the HTML report draws its plots with matplotlib, which is not installed: {BENCH_EXTRA_HINT}"
        ) from exc
    return matplotlib, Figure


@dataclass
class _Run:
    """What every figure needs: targets, their colours and rows, the level axis."""
    results: Mapping[str, Any]
    names: list[str]
    colours: dict[str, str]
    rows: dict[str, list[Mapping[str, Any]]]
    levels: list[float]
    x_label: str
    figure_class: Any


def build_plots(results: Mapping[str, Any]) -> list[Plot]:
    """Every figure of the report, in page order. Raises ImportError without matplotlib."""
    matplotlib, figure_class = _matplotlib()
    names = target_names(results)
    rows = rows_by_target(results, names)
    all_levels = (number(r.get("level")) for target_rows in rows.values() for r in target_rows)
    levels = sorted({lv for lv in all_levels if math.isfinite(lv)})
    run = _Run(results, names, target_colours(names), rows, levels, level_axis_label(results), figure_class)
    makers: list[Callable[[_Run], Plot]] = [_throughput_plot, _ttft_plot, _itl_plot, _itl_cdf_plot]
    if slo_of(results):
        makers.append(_goodput_plot)
    # NOTE: rc_context instead of rcParams: a report must not change a caller's matplotlib state.
    # svg.fonttype none: text stays text (small, selectable, found by the browser's search).
    # svg.hashsalt: fixed, so the same results always render to the same page.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "shoal-bench",
                                "font.size": 9, "axes.grid": True, "grid.alpha": 0.3}):
        return [make(run) for make in makers]


def _new_axes(run: _Run) -> tuple[Any, Any]:
    figure = run.figure_class(figsize=FIGURE_SIZE_IN, layout="constrained")
    return figure, figure.add_subplot()


def _legend_name(name: str) -> str:
    short = name if len(name) <= MAX_LEGEND_NAME else name[: MAX_LEGEND_NAME - 1] + "…"
    # NOTE: "$" escaped, or matplotlib reads a name like "a$b$" as TeX (and fails on bad TeX)
    return short.replace("$", r"\$")


def _is_wide(values: list[float]) -> bool:
    positive = [v for v in finite(values) if v > 0]
    return len(positive) >= 2 and max(positive) / min(positive) >= WIDE_RANGE


def _set_level_axis(ax: Any, run: _Run) -> None:
    ax.set_xlabel(run.x_label)
    levels = run.levels
    if not levels:
        return
    low, high = levels[0], levels[-1]
    if len(levels) >= 3 and low > 0 and high / low >= 8:
        ax.set_xscale("log", base=2)   # sweeps are usually doubling: 1, 2, 4, … evenly spaced
        ax.set_xlim(low / 1.25, high * 1.25)
    else:
        # NOTE: set, not left to autoscaling: a plot whose values are all unknown has no data to fit
        pad = (high - low) * 0.05 or max(abs(low) * 0.5, 0.5)
        ax.set_xlim(low - pad, high + pad)
    if len(levels) <= 12:
        from matplotlib.ticker import NullLocator
        ax.set_xticks(levels, labels=[level_label(lv) for lv in levels])
        ax.xaxis.set_minor_locator(NullLocator())


def _set_value_axis(ax: Any, label: str, values: list[float]) -> None:
    ax.set_ylabel(label)
    if _is_wide(values):
        _log_scale(ax.yaxis, ax.set_yscale)
    elif finite(values):
        ax.set_ylim(bottom=0)


def _log_scale(axis: Any, set_scale: Callable[[str], None]) -> None:
    """A log axis labelled 0.1, 1, 10 (plain numbers read faster than 10⁻¹, 10⁰, 10¹)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter
    set_scale("log")
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _no_data(ax: Any, values: list[float], what: str = "no data") -> None:
    if not finite(values):
        ax.set_yticks([])
        ax.text(0.5, 0.5, what, transform=ax.transAxes, ha="center", va="center", color="#666")


def _lines_per_target(ax: Any, run: _Run, value: Callable[[Mapping[str, Any]], float],
                      linestyle: str = "-", labelled: bool = True) -> tuple[list[Any], list[str], list[float]]:
    """One line per target over its levels; returns legend handles, labels and the values drawn."""
    handles, labels, drawn = [], [], []
    for name in run.names:
        rows = run.rows[name]
        xs = [number(r.get("level")) for r in rows]
        ys = [value(r) for r in rows]
        (line,) = ax.plot(xs, ys, linestyle=linestyle, marker="o", markersize=4,
                          linewidth=1.8 if labelled else 1.0, color=run.colours[name])
        if labelled:
            handles.append(line)
            labels.append(_legend_name(name))
        drawn.extend(ys)
    return handles, labels, drawn


def _mark_level(ax: Any, run: _Run, kind: str, marker: str,
                value: Callable[[Mapping[str, Any]], float]) -> bool:
    """Circle each target's knee (or saturation point) on its line; True when any was drawn."""
    drawn = False
    for name in run.names:
        at = analysis_of(run.results, name).get(kind)
        row = next((r for r in run.rows[name] if same_level(r.get("level"), at)), None)
        y = value(row) if row is not None else math.nan
        if not math.isfinite(y) or (ax.get_yscale() == "log" and y <= 0):
            continue
        ax.plot([number(at)], [y], linestyle="none", marker=marker, markersize=12,
                markerfacecolor="none", markeredgecolor=run.colours[name], markeredgewidth=1.8, clip_on=False)
        drawn = True
    return drawn


def _mark_errors(ax: Any, run: _Run, value: Callable[[Mapping[str, Any]], float]) -> bool:
    """A cross on each level where a target had failed requests; True when any was drawn."""
    drawn = False
    for name in run.names:
        for row in run.rows[name]:
            y = value(row)
            if error_count(row) and math.isfinite(y):
                ax.plot([number(row.get("level"))], [y], linestyle="none", marker="x", markersize=9,
                        markeredgewidth=2, color=run.colours[name], clip_on=False)
                drawn = True
    return drawn


def _legend(ax: Any, handles: list[Any], labels: list[str], run: _Run, marks: dict[str, str]) -> None:
    from matplotlib.lines import Line2D
    for label, marker in marks.items():
        handles.append(Line2D([], [], linestyle="none", marker=marker, markersize=9,
                              markerfacecolor="none", markeredgecolor="#333", markeredgewidth=1.5))
        labels.append(label)
    if handles:
        # NOTE: handles and labels are passed explicitly: the automatic legend would drop a
        # target whose name starts with "_" (matplotlib's convention for unlabelled artists).
        ax.legend(handles, labels, fontsize=8, loc="best", framealpha=0.85)


def _throughput_plot(run: _Run) -> Plot:
    figure, ax = _new_axes(run)
    value = lambda r: number(r.get("output_throughput"))  # noqa: E731
    handles, labels, drawn = _lines_per_target(ax, run, value)
    _set_level_axis(ax, run)
    ax.set_ylabel("output tokens/s")
    if finite(drawn):
        ax.set_ylim(bottom=0)
    marks = {}
    if _mark_level(ax, run, "knee", "o", value):
        marks["knee"] = "o"
    if _mark_level(ax, run, "saturation", "s", value):
        marks["saturation"] = "s"
    if _mark_errors(ax, run, value):
        marks["errors"] = "x"
    _legend(ax, handles, labels, run, marks)
    _no_data(ax, drawn)
    return _plot(figure, "plot-throughput", "Output throughput",
                 "Aggregate output tokens per second at each level; circles mark the knee, squares "
                 "the first level where throughput grew less than 10%, crosses levels with failed requests.")


def _ttft_plot(run: _Run) -> Plot:
    figure, ax = _new_axes(run)
    value = lambda r: stat(r, "ttft", "p99")  # noqa: E731
    handles, labels, drawn = _lines_per_target(ax, run, value)
    _set_level_axis(ax, run)
    _set_value_axis(ax, "P99 time to first token (s)", drawn)
    marks = {"knee": "o"} if _mark_level(ax, run, "knee", "o", value) else {}
    _legend(ax, handles, labels, run, marks)
    _no_data(ax, drawn)
    scale = "log scale: " if ax.get_yscale() == "log" else ""
    return _plot(figure, "plot-ttft", "P99 time to first token",
                 f"The slowest 1% of first tokens at each level ({scale}seconds); circles mark the knee.")


def _itl_plot(run: _Run) -> Plot:
    figure, ax = _new_axes(run)
    handles, labels, drawn = _lines_per_target(ax, run, lambda r: stat(r, "itl", "p99") * 1000)
    _set_level_axis(ax, run)
    _set_value_axis(ax, "P99 inter-token latency (ms)", drawn)
    _legend(ax, handles, labels, run, {})
    _no_data(ax, drawn)
    return _plot(figure, "plot-itl", "P99 inter-token latency",
                 "The slowest 1% of gaps between tokens of a stream at each level (milliseconds).")


def _goodput_plot(run: _Run) -> Plot:
    figure, ax = _new_axes(run)
    handles, labels, drawn = _lines_per_target(ax, run, lambda r: number(r.get("goodput")))
    _, _, all_completed = _lines_per_target(ax, run, lambda r: number(r.get("request_throughput")),
                                            linestyle=":", labelled=False)
    _set_level_axis(ax, run)
    ax.set_ylabel("requests/s")
    if finite(drawn + all_completed):
        ax.set_ylim(bottom=0)
    from matplotlib.lines import Line2D
    handles.append(Line2D([], [], linestyle=":", color="#333"))
    labels.append("all completed (dotted)")
    _legend(ax, handles, labels, run, {})
    _no_data(ax, drawn)
    return _plot(figure, "plot-goodput", "Goodput",
                 f"Requests per second that met every SLO ({slo_text(run.results)}); "
                 "dotted: every completed request.")


def _itls_ms(run: _Run, name: str, level: float) -> list[float]:
    samples: list[float] = []
    for request in _dicts(run.results.get("requests")):
        if str(request.get("target")) == name and same_level(request.get("level"), level):
            itls = request.get("itls")
            if isinstance(itls, list):
                samples.extend(v * 1000 for v in map(number, itls) if math.isfinite(v) and v >= 0)
    return samples


def _cdf_points(samples: list[float]) -> tuple[np.ndarray, np.ndarray]:
    xs = np.sort(np.asarray(samples, dtype=float))
    n = len(xs)
    ys = np.arange(1, n + 1) / n
    if n > MAX_CDF_POINTS:
        # even steps through the ranks, and denser ones near the top: the tail is what matters
        even = np.linspace(0, n - 1, MAX_CDF_POINTS // 2)
        tail = n - np.geomspace(1, n, MAX_CDF_POINTS // 2)
        keep = np.unique(np.concatenate([even, tail, [n - 1]]).round().astype(int).clip(0, n - 1))
        xs, ys = xs[keep], ys[keep]
    return xs, ys


def _itl_cdf_plot(run: _Run) -> Plot:
    figure, ax = _new_axes(run)
    handles, labels, drawn = [], [], []
    for name in run.names:
        levels = [number(r.get("level")) for r in run.rows[name]] or sorted(
            {number(q.get("level")) for q in _dicts(run.results.get("requests"))
             if str(q.get("target")) == name})
        sampled = [lv for lv in levels if math.isfinite(lv) and _itls_ms(run, name, lv)]
        if not sampled:
            continue
        knee = number(analysis_of(run.results, name).get("knee"))
        shown = [(max(sampled), "-")]
        if any(same_level(knee, lv) for lv in sampled) and not same_level(knee, max(sampled)):
            shown.append((knee, "--"))
        for level, style in shown:
            samples = _itls_ms(run, name, level)
            xs, ys = _cdf_points(samples)
            (line,) = ax.step(xs, ys, where="post", linestyle=style, linewidth=1.6, color=run.colours[name])
            handles.append(line)
            suffix = " (knee)" if same_level(level, knee) else ""
            labels.append(f"{_legend_name(name)} @ {level_label(level)}{suffix}")
            drawn.extend(samples)
    ax.set_xlabel("inter-token latency (ms)")
    ax.set_ylabel("fraction of gaps ≤ x")
    if _is_wide(drawn) and min(drawn) > 0:
        _log_scale(ax.xaxis, ax.set_xscale)
    ax.set_ylim(0, 1.02)
    ax.axhline(0.99, color="#999", linewidth=0.8, linestyle=":")
    _legend(ax, handles, labels, run, {})
    _no_data(ax, drawn, "no inter-token latencies recorded")
    return _plot(figure, "plot-itl-cdf", "Inter-token latency distribution",
                 "Cumulative distribution of gaps between tokens, per target at its highest level "
                 "(solid) and at its knee (dashed); the dotted line is P99.")


_TAG = re.compile(r"<[^<>]+>")
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)


def _plot(figure: Any, key: str, title: str, caption: str) -> Plot:
    buffer = io.StringIO()
    # NOTE: no metadata: matplotlib's default RDF block names a purl.org URL, and the date
    # would make two renders of the same results differ.
    figure.savefig(buffer, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]          # inline SVG takes neither the XML prolog nor the DOCTYPE
    svg = _COMMENT.sub("", svg)            # matplotlib repeats every text in a comment
    svg = _TAG.sub(lambda m: _prefix_ids(m.group(0), key), svg)
    svg = svg.replace("<svg ", f'<svg role="img" aria-label="{title}" ', 1)
    return Plot(key, title, caption, svg)


def _prefix_ids(tag: str, prefix: str) -> str:
    # NOTE: every matplotlib SVG uses the same ids ("figure_1", "axes_1", clip paths); in one
    # HTML page they must be unique, or a reference could resolve into another figure.
    tag = re.sub(r'\bid="([^"]*)"', rf'id="{prefix}-\1"', tag)
    tag = re.sub(r'href="#([^"]*)"', rf'href="#{prefix}-\1"', tag)
    return re.sub(r"url\(#([^)]*)\)", rf"url(#{prefix}-\1)", tag)
