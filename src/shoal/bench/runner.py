"""A whole run: validate every target, prepare prompts, warm up, sweep the levels interleaved.

Levels are interleaved across targets (level 1 on A, level 1 on B, level 2 on A, ...) so
that drift of the machine (thermal, other load) touches every target alike, and each level
starts once the machine has gone quiet (settle.py), so no target pays for another's tail.
Each level on each target is bracketed by /metrics scrapes of that target when it has them.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from shoal.bench.analysis import analyse_target, level_words
from shoal.bench.client import Endpoint, StreamingClient
from shoal.bench.load import LevelPlan, run_level
from shoal.bench.probe import TargetInfo, check_generation, probe_target
from shoal.bench.progress import LiveProgress
from shoal.bench.results import SCHEMA, host_info, level_value, request_entry, utc_now
from shoal.bench.server_metrics import MetricsScraper
from shoal.bench.settle import settle
from shoal.bench.stats import Slo, level_figures
from shoal.bench.targets import BenchSetupError, TargetSpec
from shoal.bench.tokens import TokenCounter, close_counter, make_counter
from shoal.bench.workloads import PromptBuilder, Workload, calibration_lengths, make_workload


@dataclass(frozen=True, slots=True)
class BenchConfig:
    targets: list[TargetSpec]
    workload: str = "short-short"
    mode: str = "closed"                  # "closed" (concurrency) | "open" (arrival rate)
    levels: tuple[float, ...] = (1, 2, 4, 8, 16, 32)
    arrival: str | None = None            # open loop: "poisson" | "fixed"
    duration_s: float | None = 30.0
    requests: int | None = None
    warmup: int = 2
    seed: int = 0
    temperature: float = 0.0
    max_tokens: int | None = None         # None: the preset's answer length
    ignore_eos: bool = True
    chat_endpoint: bool = False
    slo: Slo = Slo()
    stall_threshold_s: float = 0.25
    settle_s: float = 5.0                  # most to wait for a quiet machine before each level
    timeout_s: float = 300.0
    tokenizer: str | None = None
    command: str = "shoal bench"


@dataclass(slots=True)
class _Target:
    info: TargetInfo
    counter: TokenCounter
    builder: PromptBuilder
    client: StreamingClient
    scraper: MetricsScraper | None

    async def aclose(self) -> None:
        await self.client.aclose()
        await close_counter(self.counter)
        if self.scraper:
            await self.scraper.aclose()


async def _prepare(config: BenchConfig, workload: Workload, info: TargetInfo) -> _Target:
    spec = info.spec
    counter = await make_counter(tokenizer_path=spec.tokenizer or config.tokenizer, url=spec.url,
                                 headers=spec.headers(), model=info.model, kind=info.kind)
    builder = PromptBuilder(counter)
    await builder.calibrate(calibration_lengths(workload))
    endpoint = Endpoint(url=spec.url, dialect=spec.dialect, model=info.model, headers=spec.headers(),
                        chat=config.chat_endpoint, temperature=config.temperature, seed=config.seed,
                        send_ignore_eos=config.ignore_eos and info.ignore_eos_supported)
    try:
        await check_generation(info, endpoint, workload.session(builder, f"{config.seed}/check", 0)[0],
                               config.timeout_s)
    except BenchSetupError:
        await close_counter(counter)
        raise
    scraper = MetricsScraper(spec.url, spec.headers(), info.metrics) if info.metrics else None
    return _Target(info, counter, builder, StreamingClient(endpoint, config.timeout_s), scraper)


async def _count_missing_tokens(target: _Target, records) -> None:
    """Output tokens of answers whose server sent no usage: tokenized after the level, not during."""
    for record in records:
        if record.ok and record.output_tokens is None:
            record.output_tokens = max(0, await target.counter.count(record.text) - target.builder.special)


def _target_entry(target: _Target, workload: Workload) -> dict:
    info = target.info
    return {"name": info.name, "url": info.spec.url, "dialect": info.spec.dialect, "model": info.model,
            "ignore_eos_supported": info.ignore_eos_supported, "server_metrics": info.metrics,
            "server_kind": info.kind,
            "prompt_lengths": target.builder.accuracy if workload.token_accurate else "as given"}


def _settings(config: BenchConfig, workload: Workload) -> dict:
    return {"workload": workload.name, "mode": config.mode, "arrival": config.arrival,
            "levels": [level_value(v) for v in config.levels], "duration_s": config.duration_s,
            "requests_per_level": config.requests, "warmup_requests": config.warmup, "seed": config.seed,
            "temperature": config.temperature, "max_tokens": workload.max_tokens,
            "ignore_eos": config.ignore_eos, "endpoint": "chat" if config.chat_endpoint else "completions",
            "slo": config.slo.as_dict(), "stall_threshold_s": config.stall_threshold_s,
            "request_timeout_s": config.timeout_s, "settle_s": config.settle_s}


async def run_bench(config: BenchConfig, progress: LiveProgress) -> dict:
    """Runs the benchmark and returns the results dict (schema "shoal-bench/1")."""
    started_at = utc_now()
    workload = make_workload(config.workload, config.max_tokens)
    infos = await asyncio.gather(*(probe_target(spec) for spec in config.targets))
    targets: list[_Target] = []
    try:
        for info in infos:
            targets.append(await _prepare(config, workload, info))
        for target in targets:
            info = target.info
            progress.note(f"{info.name}: {info.kind or 'unknown'} server at {info.spec.url}, model {info.model}, "
                          f"prompt lengths {target.builder.accuracy}")
            if config.ignore_eos and not target.info.ignore_eos_supported:
                progress.note(f"{target.info.name}: ignore_eos is not supported there; answers may end early")
            if not target.builder.exact and workload.token_accurate:
                progress.note(f"{target.info.name}: prompt lengths are estimates "
                              "(no usable tokenizer; give --tokenizer)")
        for target in targets:
            for i in range(config.warmup):
                for request in workload.session(target.builder, f"{config.seed}/warmup/{i}", i)[:1]:
                    await target.client.send(request)
        levels, requests, warnings = await _sweep(config, workload, targets, progress)
    finally:
        for target in targets:
            await target.aclose()
    analysis = {t.info.name: analyse_target([row for row in levels if row["target"] == t.info.name],
                                            mode=config.mode, long_answers=workload.long_answers)
                for t in targets}
    return {"schema": SCHEMA, "started_at": started_at, "finished_at": utc_now(), "command": config.command,
            "host": host_info(), "settings": _settings(config, workload),
            "targets": [_target_entry(t, workload) for t in targets],
            "levels": levels, "analysis": analysis, "warnings": warnings, "requests": requests}


async def _sweep(config: BenchConfig, workload: Workload, targets: list[_Target],
                 progress: LiveProgress) -> tuple[list[dict], list[dict], list[str]]:
    rows: list[dict] = []
    entries: list[dict] = []
    warnings: list[str] = []
    sweep_start = time.perf_counter()
    for level_index, level in enumerate(config.levels):
        plan = LevelPlan(mode=config.mode, level=level, requests=config.requests, duration_s=config.duration_s,
                         arrival=config.arrival or "poisson", seed=config.seed)
        for target in targets:
            name = target.info.name
            settled = await settle(config.settle_s)
            if not settled.quiet and config.settle_s > 0:
                progress.note(f"{name} @ {level_words(level, config.mode)}: the machine was still busy "
                              f"after {settled.waited_s:.1f} s; starting anyway")
            before = await target.scraper.scrape() if target.scraper else None
            total = config.requests
            if total is not None and config.mode == "open":
                total *= workload.requests_per_session      # open-loop budgets count sessions
            progress.level_started(f"{name} @ {level_words(level, config.mode)}", total)

            def sessions(index: int, target: _Target = target) -> list:
                # NOTE: the key names the level, not the target: every target gets the same prompts.
                return workload.session(target.builder, f"{config.seed}/{level_index}/{index}", index)

            run = await run_level(target.client, plan, sessions, progress.request_done)
            progress.level_finished()
            completed = sum(r.ok for r in run.records)
            after = await target.scraper.scrape_settled(before, completed) if target.scraper else None
            await _count_missing_tokens(target, run.records)
            row = {"target": name, "level": level_value(level),
                   **level_figures(run.records, run.duration_s, stall_threshold_s=config.stall_threshold_s,
                                   slo=config.slo),
                   "server": target.scraper.deltas(before, after) if target.scraper else None}
            rows.append(row)
            warning = cache_reuse_warning(name, level, config.mode, workload, row)
            if warning:
                warnings.append(warning)
                progress.note(warning)
            entries += [request_entry(name, level, i, r.start - sweep_start, r) for i, r in enumerate(run.records)]
    return rows, entries, warnings


# a cache-free workload whose prompts the server mostly did not compute was answered from a cache
CACHE_REUSE_LIMIT = 0.2


def cache_reuse_warning(name: str, level: float, mode: str, workload: Workload, row: dict) -> str | None:
    """A sentence when the server says it reused prompts the workload meant to be fresh: the
    same seed run twice against a running server, or two names for one server."""
    server = row.get("server") or {}
    if not workload.cache_free or not row.get("prompt_tokens"):
        return None
    reused = server.get("prefix_cache_hit_rate")
    if server.get("prompt_tokens") is not None and server.get("source") == "llamacpp":
        # NOTE: llama.cpp counts only the prompt tokens it computed
        reused = 1 - server["prompt_tokens"] / row["prompt_tokens"]
    if reused is None or reused <= CACHE_REUSE_LIMIT:
        return None
    return (f"{name} @ {level_words(level, mode)}: the server answered {reused:.0%} of the prompt tokens "
            "from its cache, though no two prompts of this workload share a prefix: it has seen these "
            "prompts before. Restart it or use another --seed, or its figures flatter it.")
