"""`shoal bench`: a real sweep against a real `shoal serve`, checked against the server's own
/metrics; validation, overload, compare, the CLI; and the analysis on hand-made series."""
from __future__ import annotations

import asyncio
import copy
import json
import os
import random
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from shoal.bench.analysis import analyse_target, find_knee, find_oversaturation, find_saturation
from shoal.bench.cli import parse_duration, parse_slo
from shoal.bench.client import TimedRequest
from shoal.bench.compare import compare_runs
from shoal.bench.load import LevelPlan, arrival_offsets
from shoal.bench.probe import probe_target
from shoal.bench.progress import LiveProgress
from shoal.bench.results import SCHEMA, write_json
from shoal.bench.runner import BenchConfig, run_bench
from shoal.bench.stats import Slo, level_figures
from shoal.bench.targets import BenchSetupError, parse_target, parse_targets, redact
from shoal.bench.tokens import EstimateTokenizer, FileTokenizer
from shoal.bench.workloads import CHAT_RAG_TURNS, SHARED_PREFIXES, PromptBuilder, make_workload
from shoal.cli import main

MAX_TOKENS = 6
PROMPT_TOKENS = 64          # the short-short preset


def _targets(url: str) -> list:
    return parse_targets([f"name=oai,url={url},dialect=openai,model=smollm2",
                          f"name=oll,url={url},dialect=ollama,model=smollm2"],
                         default_model=None, default_dialect="openai")


def _run(config: BenchConfig) -> dict:
    with LiveProgress() as progress:
        return asyncio.run(run_bench(config, progress))


@pytest.fixture(scope="module")
def sweep(shoal_server) -> dict:
    """Levels 1 and 2, two requests each, on the same server under both dialects."""
    return _run(BenchConfig(targets=_targets(shoal_server.url), levels=(1, 2), duration_s=None, requests=2,
                            warmup=1, max_tokens=MAX_TOKENS, slo=Slo(ttft_s=30.0, itl_s=30.0)))


# ---- a real sweep -----------------------------------------------------------------------------

def test_sweep_token_counts_equal_the_servers_metrics(sweep):
    for row in sweep["levels"]:
        server = row["server"]
        assert server["source"] == "shoal"
        assert row["completed"] == 2 and sum(row["errors"].values()) == 0
        assert server["generation_tokens"] == row["output_tokens"]
        assert server["prompt_tokens"] == row["prompt_tokens"]
        # token-accurate prompts, identical in both dialects (Ollama's raw mode adds no template)
        assert row["prompt_tokens"] == 2 * PROMPT_TOKENS
        if row["target"] == "oai":             # ignore_eos: exactly max_tokens each
            assert row["output_tokens"] == 2 * MAX_TOKENS
    oai, oll = sweep["targets"]
    assert (oai["ignore_eos_supported"], oll["ignore_eos_supported"]) == (True, False)
    assert oai["prompt_lengths"] == oll["prompt_lengths"] == "exact (the server's /tokenize)"


def test_sweep_client_ttft_is_the_servers_plus_http(sweep):
    for row in sweep["levels"]:
        client, server = row["ttft"]["mean"], row["server"]["ttft_mean"]
        # the server's clock starts after the request is read, the client's before it is sent
        assert server <= client < server + 3.0, row


def test_sweep_interleaves_targets_level_by_level(sweep):
    order = [(r["level"], r["target"]) for r in sorted(sweep["requests"], key=lambda r: r["start"])]
    blocks = [key for i, key in enumerate(order) if i == 0 or order[i - 1] != key]
    assert blocks == [(1, "oai"), (1, "oll"), (2, "oai"), (2, "oll")]
    assert [(r["target"], r["level"]) for r in sweep["levels"]] == [("oai", 1), ("oll", 1), ("oai", 2), ("oll", 2)]


def test_sweep_requests_carry_their_gaps(sweep):
    for request in sweep["requests"]:
        assert request["status"] == 200 and request["error"] is None
        assert request["ttft"] <= request["e2e"]
        # one gap per token event after the first; a chunk may carry several tokens
        assert 1 <= len(request["itls"]) + 1 <= request["output_tokens"]
        assert request["ttft"] + sum(request["itls"]) <= request["e2e"] + 1e-6


def test_a_server_that_has_seen_the_prompts_is_called_out(sweep):
    # both targets are one server: the second name gets the first's prompts from the prefix cache
    by_level = {(r["target"], r["level"]): r["server"]["prefix_cache_hit_rate"] for r in sweep["levels"]}
    assert by_level[("oai", 1)] == 0 and by_level[("oll", 1)] > 0.5
    assert sweep["warnings"] and all(w.startswith("oll @ ") for w in sweep["warnings"])
    assert "has seen these prompts before" in sweep["warnings"][0]
    from shoal.bench.report_text import markdown
    assert "## Warnings" in markdown(sweep)


SCHEMA_KEYS = {
    "top": {"schema", "started_at", "finished_at", "command", "host", "settings", "targets", "levels", "analysis",
            "warnings", "requests"},
    "host": {"hostname", "cpu", "cores", "python", "shoal"},
    "settings": {"workload", "mode", "arrival", "levels", "duration_s", "requests_per_level", "warmup_requests",
                 "seed", "temperature", "max_tokens", "ignore_eos", "slo", "stall_threshold_s", "request_timeout_s",
                 "settle_s"},
    "target": {"name", "url", "dialect", "model", "ignore_eos_supported", "server_metrics"},
    "level": {"target", "level", "duration_s", "completed", "errors", "request_throughput", "output_throughput",
              "total_token_throughput", "prompt_tokens", "output_tokens", "ttft", "itl", "tpot", "e2e", "stalls",
              "goodput", "slo_attainment", "server"},
    "server": {"source", "prompt_tokens", "generation_tokens", "ttft_mean", "e2e_mean", "preemptions",
               "prefix_cache_hit_rate"},
    "analysis": {"knee", "saturation", "oversaturation", "peak_output_throughput", "peak_level", "summary"},
    "request": {"target", "level", "index", "start", "status", "error", "prompt_tokens", "output_tokens", "ttft",
                "e2e", "itls"},
}


def test_results_have_the_schemas_keys(sweep, tmp_path):
    path = tmp_path / "r.json"
    write_json(sweep, path)
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA
    assert SCHEMA_KEYS["top"] <= data.keys()
    assert SCHEMA_KEYS["host"] <= data["host"].keys()
    assert SCHEMA_KEYS["settings"] <= data["settings"].keys()
    assert data["settings"]["slo"].keys() == {"ttft_s", "itl_s", "e2e_s"}
    assert data["settings"]["levels"] == [1, 2] and data["settings"]["mode"] == "closed"
    for target in data["targets"]:
        assert SCHEMA_KEYS["target"] <= target.keys()
    for row in data["levels"]:
        assert SCHEMA_KEYS["level"] <= row.keys()
        assert SCHEMA_KEYS["server"] <= row["server"].keys()
        assert row["ttft"].keys() == row["tpot"].keys() == row["e2e"].keys() == {"mean", "p50", "p90", "p99"}
        assert row["itl"].keys() == {"mean", "p50", "p90", "p99", "max", "stdev"}
        assert row["slo_attainment"] == 1.0 and row["goodput"] == row["request_throughput"]
    assert data["analysis"].keys() == {"oai", "oll"}
    for analysis in data["analysis"].values():
        assert SCHEMA_KEYS["analysis"] <= analysis.keys() and analysis["summary"].endswith(".")
    assert len(data["requests"]) == 8
    for request in data["requests"]:
        assert request.keys() == SCHEMA_KEYS["request"]


# ---- validation ---------------------------------------------------------------------------------

class _OllamaOnly(BaseHTTPRequestHandler):
    """A server with Ollama's model list and nothing of OpenAI's."""

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path == "/api/tags":
            body = json.dumps({"models": [{"name": "tiny:latest", "model": "tiny:latest"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
        else:
            body = b'{"error": "not found"}'
            self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def ollama_only():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OllamaOnly)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _probe(spec: str) -> None:
    asyncio.run(probe_target(parse_target(spec, default_model=None, default_dialect="openai")))


def test_validation_wrong_model(shoal_server):
    with pytest.raises(BenchSetupError, match=r"target 's'.*does not serve model 'nope'.*smollm2:135m"):
        _probe(f"name=s,url={shoal_server.url},model=nope")


def test_validation_unreachable():
    from live_server import free_port

    with pytest.raises(BenchSetupError, match=r"target 'gone'.*cannot connect"):
        _probe(f"name=gone,url=http://127.0.0.1:{free_port()},model=m")


def test_validation_wrong_dialect(ollama_only):
    with pytest.raises(BenchSetupError, match=r"speaks the ollama dialect, not openai.*use dialect=ollama"):
        _probe(f"name=o,url={ollama_only},dialect=openai,model=tiny")
    # the same server in its own dialect passes; Ollama's ':latest' rule applies to the name
    info = asyncio.run(probe_target(parse_target(f"url={ollama_only},dialect=ollama,model=tiny",
                                                 default_model=None, default_dialect="openai")))
    assert (info.model, info.ignore_eos_supported) == ("tiny", False)
    # no model named: the server's only one (listed under both "name" and "model")
    info = asyncio.run(probe_target(parse_target(f"url={ollama_only},dialect=ollama", default_model=None,
                                                 default_dialect="openai")))
    assert info.model == "tiny:latest"


def test_validation_accepts_an_alias_the_list_leaves_out(shoal_server):
    # /v1/models lists 'smollm2:135m' only; 'smollm2' is served as an alias
    info = asyncio.run(probe_target(parse_target(f"url={shoal_server.url},model=smollm2",
                                                 default_model=None, default_dialect="openai")))
    assert (info.kind, info.metrics, info.ignore_eos_supported) == ("shoal", "shoal", True)


def test_cli_validation_error_is_one_line_and_exit_2(shoal_server, capsys):
    code = main(["bench", "--target", f"name=s,url={shoal_server.url},model=nope", "--requests", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("shoal bench: target 's'") and "\n" not in err


# ---- overload -----------------------------------------------------------------------------------

def test_503s_are_counted_not_fatal(smollm2_path, tmp_path):
    from live_server import LiveServer

    # one running request and no queue: the other streams get 503 + Retry-After at once
    # (exact compute: no int8 calibration at start-up, the slowest part of a fast-mode load)
    server = LiveServer(smollm2_path, "--served-model-name", "smollm2", "--max-num-seqs", "1", "--max-queue", "0",
                        "--max-model-len", "512", "--kv-cache-bytes", "32MiB", "--compute", "exact",
                        log_path=tmp_path / "serve.log")
    try:
        server.wait_ready()
        spec = parse_target(f"name=busy,url={server.url}", default_model=None, default_dialect="openai")
        results = _run(BenchConfig(targets=[spec], levels=(3,), duration_s=None, requests=6, warmup=0,
                                   max_tokens=8))
    finally:
        server.stop()
    row = results["levels"][0]
    assert row["errors"].get("503", 0) >= 1
    assert row["completed"] >= 1 and row["completed"] + row["errors"]["503"] == 6
    rejected = [r for r in results["requests"] if r["status"] == 503]
    assert all(r["error"] and r["ttft"] is None for r in rejected)
    assert results["analysis"]["busy"]["oversaturation"] == 3
    assert "errors from 3" in results["analysis"]["busy"]["summary"]


# ---- compare ------------------------------------------------------------------------------------

def _scaled(results: dict, throughput: float, latency: float) -> dict:
    new = copy.deepcopy(results)
    for row in new["levels"]:
        row["output_throughput"] *= throughput
        row["ttft"]["p99"] *= latency
        row["itl"]["p99"] *= latency
    return new


def test_compare_flags_regressions(sweep, tmp_path):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    write_json(sweep, old)
    write_json(_scaled(sweep, throughput=0.8, latency=1.05), new)
    changes = compare_runs(sweep, json.loads(new.read_text()), threshold=0.10)
    assert len(changes) == 4
    assert all(c.regressions == ("output tok/s",) for c in changes)
    assert all(abs(c.throughput + 0.2) < 1e-9 for c in changes)
    assert main(["bench", "--from-json", str(new), "--compare", str(old)]) == 1
    # within the threshold: no regression, exit 0
    write_json(_scaled(sweep, throughput=0.95, latency=1.08), new)
    assert main(["bench", "--from-json", str(new), "--compare", str(old), "--regression-threshold", "10%",
                 "--plots", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "plot-throughput.svg").read_text().lstrip().startswith("<?xml")
    # latency alone can regress
    assert compare_runs(sweep, _scaled(sweep, 1.0, 1.5), 0.10)[0].regressions == ("P99 TTFT", "P99 ITL")


# ---- the command line, end to end ---------------------------------------------------------------

def test_cli_end_to_end_open_loop(shoal_server, tmp_path):
    out, md = tmp_path / "out.json", tmp_path / "out.md"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-m", "shoal", "bench", "--target", f"name=local,url={shoal_server.url},api_key=sekrit",
         "--rate", "4", "--arrival", "fixed", "--requests", "2", "--warmup", "0", "--max-tokens", "4",
         "--slo", "ttft=20s", "--json", str(out), "--markdown", str(md)],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert results["schema"] == SCHEMA
    assert "sekrit" not in out.read_text() and "api_key=***" in results["command"]
    assert results["settings"]["mode"] == "open" and results["settings"]["arrival"] == "fixed"
    assert results["targets"][0]["model"] == "smollm2:135m"    # the server's only model
    (row,) = results["levels"]
    assert row["level"] == 4 and row["completed"] == 2 and row["output_tokens"] == 8
    starts = sorted(r["start"] for r in results["requests"])
    assert starts[1] - starts[0] >= 0.2                         # fixed arrivals, 0.25 s apart
    assert "local" in proc.stdout and "out tok/s" in proc.stdout
    report = md.read_text()
    assert "| local | 4 |" in report and results["analysis"]["local"]["summary"] in report


# ---- token-accurate prompts ---------------------------------------------------------------------

def test_prompts_from_a_gguf_tokenizer_have_exact_lengths_on_the_server(smollm2_path, shoal_server):
    builder = PromptBuilder(FileTokenizer(smollm2_path))
    asyncio.run(builder.calibrate((64, 1024)))
    assert builder.exact and builder.accuracy == "exact (--tokenizer file)"
    for n in (17, 64, 300, 1024):
        text = builder.text(random.Random(n), n)
        count = httpx.post(f"{shoal_server.url}/tokenize", json={"model": "smollm2", "prompt": text}).json()["count"]
        assert count == n


def test_prompts_without_a_tokenizer_are_estimates():
    builder = PromptBuilder(EstimateTokenizer())
    asyncio.run(builder.calibrate((64,)))
    assert (builder.exact, builder.accuracy) == (False, "estimate")
    request = make_workload("short-short", None).session(builder, "0/0/0", 0)[0]
    assert len(request.prompt.split()) == 64 and request.prompt_tokens is None   # usage will tell


def test_prompts_are_seeded_and_distinct(smollm2_path):
    builder = PromptBuilder(FileTokenizer(smollm2_path))
    asyncio.run(builder.calibrate((64,)))
    workload = make_workload("long-short", None)
    a = workload.session(builder, "0/0/1", 1)[0]
    assert a == workload.session(builder, "0/0/1", 1)[0]          # the same key: the same prompt
    b = workload.session(builder, "0/0/2", 2)[0]
    assert a.prompt.split()[1:17] != b.prompt.split()[1:17]       # no shared first block
    assert (a.prompt_tokens, a.max_tokens) == (1024, 64)


def test_chat_rag_turns_grow_a_shared_prefix(smollm2_path):
    builder = PromptBuilder(FileTokenizer(smollm2_path))
    session = make_workload("chat-rag", 32).session(builder, "0/0/0", 0)
    assert len(session) == CHAT_RAG_TURNS
    for earlier, later in zip(session, session[1:]):
        assert later.messages[:len(earlier.messages)] == earlier.messages
        assert len(later.messages) == len(earlier.messages) + 2          # an answer and the next passage
    assert session[0].max_tokens == 32
    other = make_workload("chat-rag", 32).session(builder, "0/0/1", 1)
    assert other[0].messages[0] == session[0].messages[0]                 # the system prompt is shared
    assert other[0].messages[1] != session[0].messages[1]


def test_shared_prefix_users_share_one_of_sixteen_system_prompts(smollm2_path):
    builder = PromptBuilder(FileTokenizer(smollm2_path))
    workload = make_workload("shared-prefix", None)
    users = [workload.session(builder, f"0/0/{i}", i)[0] for i in range(2 * SHARED_PREFIXES + 1)]
    systems = [u.messages[0]["content"] for u in users]
    assert len(set(systems)) == SHARED_PREFIXES                      # 16 distinct system prompts
    assert systems[0] == systems[SHARED_PREFIXES] == systems[2 * SHARED_PREFIXES] != systems[1]
    assert len(systems[0].split()) == 1000 and users[0].max_tokens == 64
    assert len({u.messages[1]["content"] for u in users}) == len(users)   # each user asks their own
    # the same system prompt on another level (another key) and another seed
    assert make_workload("shared-prefix", 8).session(builder, "7/3/5", 5)[0].messages[0]["content"] == systems[5]


def test_jsonl_workload(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi", "max_tokens": 5}\n\n{"messages": [{"role": "user", "content": "yo"}]}\n')
    workload = make_workload(f"jsonl:{path}", 7)
    first, second, third = (workload.session(None, "k", i)[0] for i in range(3))
    assert (first.prompt, first.max_tokens) == ("hi", 5)
    assert (second.messages[0]["content"], second.max_tokens) == ("yo", 7)
    assert third == first
    path.write_text('{"prompt": "a", "messages": []}\n')
    with pytest.raises(BenchSetupError, match=r"p.jsonl:1: give exactly one"):
        make_workload(f"jsonl:{path}", None)
    with pytest.raises(BenchSetupError, match="choose one of"):
        make_workload("medium", None)


# ---- units --------------------------------------------------------------------------------------

def test_knee_is_the_level_before_latency_outgrows_throughput():
    levels = [1, 2, 4, 8, 16]
    throughput = [100, 190, 360, 500, 520]
    ttft = [0.10, 0.11, 0.13, 0.40, 1.20]      # 4 -> 8: TTFT x3.1 for throughput x1.39
    knee = find_knee(levels, throughput, ttft)
    assert knee.level == 4
    assert round(knee.latency_growth, 2) == 3.08 and round(knee.throughput_growth, 2) == 1.39
    assert find_knee(levels, throughput, [0.1, 0.1, 0.1, 0.12, 0.124]) is None
    # nothing completes at the next level: the knee is before it
    assert find_knee([1, 2], [100, None], [0.1, None]).level == 1


def test_saturation_and_oversaturation():
    levels = [1, 2, 4, 8, 16, 32]
    throughput = [100, 190, 360, 380, 390, 300]
    assert find_saturation(levels, throughput) == 8          # +5.6% over the previous level
    assert find_oversaturation(levels, throughput, [0.0] * 6) == (32, "drop")   # 23% below the peak
    assert find_oversaturation(levels, throughput, [0, 0, 0, 0, 0.02, 0]) == (16, "errors")
    assert find_oversaturation(levels, [100, 190, 360, 380, 390, 385], [0.0] * 6) is None
    assert find_saturation([1, 2], [100, 200]) is None


def _row(level: int, tput: float, ttft_p99: float, errors: int = 0) -> dict:
    return {"level": level, "output_throughput": tput, "completed": 100, "errors": {"503": errors},
            "ttft": {"p99": ttft_p99}, "e2e": {"p99": None if ttft_p99 is None else ttft_p99 * 10}}


def test_summary_sentence():
    rows = [_row(1, 100, 0.1), _row(2, 190, 0.11), _row(4, 360, 0.13), _row(8, 500, 0.4), _row(16, 520, 1.2),
            _row(32, 515, 2.5, errors=5)]
    analysis = analyse_target(rows, mode="closed", long_answers=False)
    assert (analysis["knee"], analysis["saturation"], analysis["oversaturation"]) == (4, 16, 32)
    assert (analysis["peak_output_throughput"], analysis["peak_level"]) == (520, 16)
    assert analysis["summary"] == ("scales to 4 streams; past 4, P99 TTFT grows 3.1x for 1.4x throughput "
                                   "(the knee); throughput flat from 16 (saturated); errors from 32 (5% of "
                                   "requests); peak 520.0 output tok/s at 16 streams.")
    graceful = analyse_target(rows[:5], mode="open", long_answers=True)
    assert graceful["knee_metric"] == "e2e_p99"
    assert "degrades gracefully" in graceful["summary"] and "req/s" in graceful["summary"]
    nothing = analyse_target([_row(1, 0, None)], mode="closed", long_answers=False)
    assert nothing["summary"] == "no request completed at any level."


def test_level_figures():
    def record(status, ttft, gaps, tokens):
        return TimedRequest(start=0.0, status=status, ttft=ttft, e2e=None if ttft is None else ttft + sum(gaps),
                             itls=gaps, prompt_tokens=10, output_tokens=tokens)

    records = [record(200, 0.5, [0.1, 0.3], 4),       # a chunk of two tokens counts one gap
               record(200, 2.0, [0.1, 0.1, 0.1], 4),
               record(503, None, [], None), record("timeout", None, [], None)]
    row = level_figures(records, 2.0, stall_threshold_s=0.25, slo=Slo(ttft_s=1.0))
    assert row["completed"] == 2 and row["errors"] == {"timeout": 1, "connection": 0, "503": 1}
    assert (row["output_tokens"], row["prompt_tokens"]) == (8, 20)
    assert (row["output_throughput"], row["total_token_throughput"], row["request_throughput"]) == (4.0, 14.0, 1.0)
    assert row["stalls"] == 1
    assert row["itl"]["max"] == 0.3 and row["itl"]["p50"] == 0.1
    assert row["tpot"]["mean"] == pytest.approx((0.4 / 3 + 0.3 / 3) / 2)
    assert (row["goodput"], row["slo_attainment"]) == (0.5, 0.25)
    assert level_figures([], 1.0, stall_threshold_s=0.25, slo=Slo())["ttft"]["p99"] is None


def test_arrival_offsets():
    fixed = arrival_offsets(LevelPlan(mode="open", level=4, requests=5, duration_s=None, arrival="fixed"))
    assert fixed == [0.0, 0.25, 0.5, 0.75, 1.0]
    poisson = arrival_offsets(LevelPlan(mode="open", level=10, requests=None, duration_s=50.0, seed=3))
    assert 400 < len(poisson) < 600 and poisson == sorted(poisson) and poisson[-1] < 50.0


def test_flag_parsing():
    assert parse_duration("250ms") == 0.25 and parse_duration("2m") == 120 and parse_duration("1.5") == 1.5
    assert parse_slo("ttft=1s,itl=200ms") == Slo(ttft_s=1.0, itl_s=0.2)
    with pytest.raises(BenchSetupError):
        parse_slo("latency=1s")
    spec = parse_target("http://127.0.0.1:8081/", default_model="m", default_dialect="ollama")
    assert (spec.name, spec.url, spec.model, spec.dialect) == ("127.0.0.1:8081", "http://127.0.0.1:8081", "m", "ollama")
    with pytest.raises(BenchSetupError, match="two targets are named"):
        parse_targets(["name=a,url=h:1", "name=a,url=h:2"], default_model=None, default_dialect="openai")
    with pytest.raises(BenchSetupError, match="dialect must be"):
        parse_target("url=h:1,dialect=grpc", default_model=None, default_dialect="openai")
    assert redact("--target url=x,api_key=abc,model=m") == "--target url=x,api_key=***,model=m"
