"""`shoal bench`: flags, then run (or load a saved run), report, compare.

Exit status: 0; 1 when `--compare` finds a regression; 2 when the run cannot start
(bad flags, an unreachable target, a wrong model or dialect) — said in one line.
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys

from shoal.bench.targets import BenchSetupError, redact
from shoal.bench.workloads import WORKLOAD_NAMES

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """'250ms', '30s', '2m', '1.5' (seconds) -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise BenchSetupError(f"{text!r} is not a duration (e.g. 250ms, 30s, 2m)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_levels(text: str, *, integers: bool) -> tuple[float, ...]:
    try:
        values = tuple(int(v) if integers else float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise BenchSetupError(f"{text!r}: expected comma-separated {'integers' if integers else 'numbers'}") from None
    if not values or any(v <= 0 for v in values):
        raise BenchSetupError(f"{text!r}: levels must be positive")
    return values


def parse_slo(text: str | None):
    from shoal.bench.stats import Slo

    if not text:
        return Slo()
    limits: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = {"tpot": "itl"}.get(key.strip(), key.strip())
        if not sep or key not in ("ttft", "itl", "e2e"):
            raise BenchSetupError(f"--slo {text!r}: expected ttft=..,itl=..,e2e=.. (e.g. ttft=1s,itl=200ms)")
        limits[f"{key}_s"] = parse_duration(value)
    return Slo(**limits)


def parse_fraction(text: str) -> float:
    """'10%' or '0.1' -> 0.1."""
    try:
        return float(text[:-1]) / 100 if text.strip().endswith("%") else float(text)
    except ValueError:
        raise BenchSetupError(f"{text!r} is not a fraction (e.g. 10% or 0.1)") from None


def add_bench_command(sub) -> None:
    bench = sub.add_parser(
        "bench", help="benchmark servers side by side over a concurrency sweep (shoal, llama.cpp, vLLM, Ollama)",
        description="Identical, token-accurate prompts and fixed generation settings against one or more "
                    "servers, levels interleaved across them; reports throughput, TTFT, inter-token latency, "
                    "stalls, errors and goodput per level, and where each server's knee is.")
    bench.add_argument("--target", action="append", default=[], metavar="SPEC",
                       help="name=..,url=..,dialect=openai|ollama,model=..[,api_key=..][,tokenizer=PATH], "
                            "or a bare URL; repeat for more targets")
    bench.add_argument("--model", default=None,
                       help="model for targets that name none (default: the server's only model)")
    bench.add_argument("--dialect", choices=("openai", "ollama"), default="openai",
                       help="dialect for targets that name none (default openai)")
    bench.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                       help="OpenAI /v1/completions or /v1/chat/completions (Ollama: /api/generate or /api/chat)")
    bench.add_argument("--workload", default="short-short", metavar="NAME",
                       help=f"one of {', '.join(WORKLOAD_NAMES)} (default short-short)")
    bench.add_argument("--tokenizer", default=None, metavar="PATH",
                       help="tokenizer.json, GGUF or HF directory for exact prompt lengths (default: each "
                            "target's /tokenize, else an estimate)")
    load = bench.add_mutually_exclusive_group()
    load.add_argument("--concurrency", default=None, metavar="LEVELS",
                      help="closed loop: concurrent streams per level (default 1,2,4,8,16,32)")
    load.add_argument("--rate", default=None, metavar="LEVELS", help="open loop: requests per second per level")
    bench.add_argument("--arrival", choices=("poisson", "fixed"), default="poisson",
                       help="open loop: arrival process (default poisson)")
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--duration", default=None, help="time per level, e.g. 30s (the default)")
    size.add_argument("--requests", type=int, default=None, help="requests per level instead of a duration")
    bench.add_argument("--warmup", type=int, default=2, help="unmeasured requests per target first (default 2)")
    bench.add_argument("--timeout", default="300s", help="per-request limit (default 300s)")
    bench.add_argument("--max-tokens", type=int, default=None, help="answer length (default: the preset's)")
    bench.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0)")
    bench.add_argument("--seed", type=int, default=0, help="seeds the prompts and the sampling (default 0)")
    bench.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                       help="ask for exactly max_tokens tokens where the server supports it (default on)")
    bench.add_argument("--slo", default=None, help="goodput objectives, e.g. ttft=1s,itl=200ms[,e2e=10s]")
    bench.add_argument("--settle", default="5s",
                       help="before each level, wait up to this long for the machine's CPUs to go quiet "
                            "(0: no wait; default 5s)")
    bench.add_argument("--stall-threshold", default="250ms", help="a gap between tokens above this is a stall")
    bench.add_argument("--json", default=None, metavar="PATH", help="write the results (with every request)")
    bench.add_argument("--markdown", default=None, metavar="PATH", help="write a Markdown report")
    bench.add_argument("--html", default=None, metavar="PATH", help="write a self-contained HTML report")
    bench.add_argument("--plots", default=None, metavar="DIR",
                       help="write the HTML report's plots as SVG files into DIR (for docs)")
    bench.add_argument("--compare", default=None, metavar="OLD.json",
                       help="show changes against an earlier run; exit 1 on a regression")
    bench.add_argument("--regression-threshold", default="10%", help="worse than this is a regression (default 10%%)")
    bench.add_argument("--from-json", default=None, metavar="PATH",
                       help="use saved results instead of running (to re-render or compare them)")
    bench.set_defaults(func=cmd_bench)


def _config(args: argparse.Namespace, argv: list[str]):
    from shoal.bench.runner import BenchConfig
    from shoal.bench.targets import parse_targets

    if args.rate:
        mode, levels, arrival = "open", parse_levels(args.rate, integers=False), args.arrival
    else:
        mode, levels, arrival = "closed", parse_levels(args.concurrency or "1,2,4,8,16,32", integers=True), None
    if args.requests is not None and args.requests < 1:
        raise BenchSetupError("--requests must be at least 1")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise BenchSetupError("--max-tokens must be at least 1")
    if args.warmup < 0:
        raise BenchSetupError("--warmup must be >= 0")
    duration = None if args.requests is not None else parse_duration(args.duration or "30s")
    return BenchConfig(
        targets=parse_targets(args.target, default_model=args.model, default_dialect=args.dialect),
        workload=args.workload, mode=mode, levels=levels, arrival=arrival, duration_s=duration,
        requests=args.requests, warmup=args.warmup, seed=args.seed, temperature=args.temperature,
        max_tokens=args.max_tokens, ignore_eos=args.ignore_eos, chat_endpoint=args.endpoint == "chat",
        slo=parse_slo(args.slo), stall_threshold_s=parse_duration(args.stall_threshold),
        settle_s=parse_duration(args.settle),
        timeout_s=parse_duration(args.timeout), tokenizer=args.tokenizer,
        command=redact(shlex.join(["shoal", *argv])))


def _write_reports(args: argparse.Namespace, results: dict) -> None:
    from pathlib import Path

    from shoal.bench.report_text import markdown
    from shoal.bench.results import write_json

    if args.json:
        write_json(results, args.json)
    if args.markdown:
        Path(args.markdown).write_text(markdown(results), encoding="utf-8")
    if args.html:
        Path(args.html).write_text(_html_renderer()(results), encoding="utf-8")
    if args.plots:
        from shoal.bench.report_html import write_plot_files
        write_plot_files(results, args.plots)


def _html_renderer():
    """The HTML report's renderer; BenchSetupError when this install lacks it."""
    try:
        # NOTE: a module of its own, with its plotting dependency in an optional extra.
        from shoal.bench.report_html import render_html
    except ImportError as exc:
        raise BenchSetupError(f"--html: the HTML report is not available ({exc})") from None
    return render_html


def cmd_bench(args: argparse.Namespace) -> int:
    import asyncio

    from rich.console import Console

    from shoal.bench.compare import compare_runs, print_changes
    from shoal.bench.progress import LiveProgress
    from shoal.bench.report_text import print_summary
    from shoal.bench.results import load_results
    from shoal.bench.runner import run_bench

    argv = sys.argv[1:] if sys.argv[1:2] == ["bench"] else ["bench"]
    try:
        threshold = parse_fraction(args.regression_threshold)
        if args.html or args.plots:
            _html_renderer()             # fail before the run, not after it
        old = load_results(args.compare) if args.compare else None
        if args.from_json:
            results = load_results(args.from_json)
        else:
            config = _config(args, argv)
            with LiveProgress() as progress:
                results = asyncio.run(run_bench(config, progress))
    except BenchSetupError as exc:
        print(f"shoal bench: {exc}", file=sys.stderr, flush=True)
        return 2
    # NOTE: rich assumes 80 columns when stdout is not a terminal; the table needs more.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    print_summary(results, console)
    _write_reports(args, results)
    if old is not None:
        changes = compare_runs(old, results, threshold)
        print_changes(changes, threshold, console)
        if any(c.regressions for c in changes):
            return 1
    return 0
