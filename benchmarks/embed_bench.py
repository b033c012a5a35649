#!/usr/bin/env python3
"""Embedding throughput: shoal against sentence-transformers on all-MiniLM-L6-v2, one run.

(a) offline: N short sentences embedded in batches: sentence-transformers `encode`
    (batch 32, its default) against shoal's SentenceEncoder fed as EncoderCore feeds it
    (batches up to 1024 tokens), in both compute modes;
(b) over HTTP: a `shoal serve` of the same directory, 16 concurrent clients each sending
    1-8 inputs per /v1/embeddings request until the N sentences are done.
Each measurement runs in its own process (same thread count) so its peak RSS is its own,
and is repeated (--repeats, default 3): the median counts. One pass over 2,000 sentences
lasts about a second, and this host's speed drifts over seconds and minutes (a single pass
of shoal's offline encoder measured anywhere from 1.25k to 2.2k sentences/s in consecutive
runs, and 2.1k then 2.8k in runs five minutes apart), so per compute mode the offline and
HTTP timings alternate round by round, and the HTTP/offline ratio is each round's, medianed.
(c) with --mixed: 8 chat streams on SmolLM2 alone, then with an embedding flood (16 clients
    on all-minilm in the same server): the chat's inter-token latency P99 both ways.

    python benchmarks/embed_bench.py --model-dir DIR --threads 2 [--sentences 2000] [--mixed]

DIR is a sentence-transformers directory (tests' minilm_dir fixture unpacks the built-in
all-minilm archive; `python -c "from shoal.model.builtin import ensure_builtin_model as e;
print(e('all-minilm'))"` prints the cached zip).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from local_server import start_local_server

SUBJECTS = ["The cat", "A new study", "My brother", "The government", "This recipe", "Our team",
            "The old bridge", "A small startup", "The weather", "Every student"]
VERBS = ["explains", "changes", "improves", "ignores", "questions", "celebrates", "reveals",
         "delays", "supports", "describes"]
OBJECTS = ["the results of the experiment", "a simple way to cook rice", "the new tax rules",
           "how birds find their way home", "the history of the city", "an unexpected problem",
           "the final match of the season", "the price of electricity", "a quiet walk in the park",
           "the future of public transport"]


def make_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
            f"{rng.choice(['.', '!', ' today.', ' again.', ', they say.'])}" for _ in range(n)]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_st(model_dir: str, sentences: list[str], repeats: int) -> dict:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device="cpu")
    model.encode(sentences[:64], batch_size=32)
    return median_rate(lambda: model.encode(sentences, batch_size=32), len(sentences), repeats)


def median_rate(run, count: int, repeats: int) -> dict:
    """Items/s of `run()` (which handles `count` items): the median of `repeats` timings."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    middle = statistics.median(seconds)
    return {"sentences_per_s": count / middle, "seconds": middle,
            "all_per_s": [round(count / s) for s in seconds]}


def run_shoal_offline(model_dir: str, sentences: list[str], compute: str, repeats: int) -> dict:
    from shoal.model.encoder_loader import load_encoder

    encoder = load_encoder(model_dir, compute)
    budget = 1024

    def embed_all() -> None:
        batch: list[list[int]] = []
        tokens = 0
        for text in sentences:
            ids = encoder.tokenizer.encode(text)
            if batch and tokens + len(ids) > budget:
                encoder.model(batch)
                batch, tokens = [], 0
            batch.append(ids)
            tokens += len(ids)
        if batch:
            encoder.model(batch)

    encoder.model([encoder.tokenizer.encode(t) for t in sentences[:64]])
    return median_rate(embed_all, len(sentences), repeats)


def child(args: argparse.Namespace) -> None:
    if args.child.startswith("shoal"):
        # NOTE: as the server runs (the `shoal` command sets it); sentence-transformers keeps
        # libgomp's own default. Before torch loads libgomp.
        from shoal.core.openmp import set_openmp_defaults

        set_openmp_defaults()
    import torch

    torch.set_num_threads(args.threads)
    sentences = make_sentences(args.sentences)
    if args.child == "st":
        result = run_st(args.model_dir, sentences, args.repeats)
    else:
        result = run_shoal_offline(args.model_dir, sentences, args.child.split(":")[1], args.repeats)
    result["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(result))


def in_child(args: argparse.Namespace, what: str, repeats: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--model-dir", args.model_dir, "--threads", str(args.threads),
           "--sentences", str(args.sentences), "--repeats", str(repeats or args.repeats),
           "--child", what]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def start_server(model: str, port: int, threads: int, compute: str, store: str) -> subprocess.Popen:
    process, _url = start_local_server(model, port=port, env={
        "SHOAL_NUM_THREADS": str(threads), "SHOAL_COMPUTE": compute, "SHOAL_MODELS": store})
    return process


def server_peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def http_flood(url: str, model: str | None, sentences: list[str], clients: int = 16,
                     stop: asyncio.Event | None = None, encoding_format: str = "float") -> float:
    """Sentences/s of `clients` closed-loop clients sending 1-8 inputs each; with `stop`,
    they go on (cycling the sentences) until it is set.

    NOTE: lean_http's client, not aiohttp or httpx: on this 2-core machine the clients share
    the server's cores, and every millisecond they spend on a request is one the server lacks.
    Per request: httpx ~2.1 ms of CPU, aiohttp ~0.35 ms (plus ~0.2 ms for the json module on
    an answer), lean_http ~0.1 ms. It checks each answer's status and counts its vectors (a
    byte count of the "embedding" key, which float and base64 answers both hold once per
    input) instead of parsing it. The timing starts once the connections are open."""
    import orjson
    from lean_http import LeanClient

    queue = list(reversed(sentences))
    rng = random.Random(1)
    done = [0]

    async def client(http: LeanClient) -> None:
        while True:
            if stop is None and not queue:
                return
            if stop is not None and stop.is_set():
                return
            if not queue:
                queue.extend(reversed(sentences))
            batch = [queue.pop() for _ in range(min(rng.randint(1, 8), len(queue)))]
            body = {"model": model, "input": batch, "encoding_format": encoding_format}
            answer = await http.send(http.request("/v1/embeddings", orjson.dumps(body)))
            vectors = answer.count(b'"embedding":')
            if vectors != len(batch):
                raise RuntimeError(f"{len(batch)} inputs, {vectors} vectors: {answer[:200]!r}")
            done[0] += vectors

    async with LeanClient(url, clients) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return done[0] / (time.perf_counter() - started)


async def chat_itls(url: str, streams: int, max_tokens: int) -> list[float]:
    import httpx

    gaps: list[float] = []

    async def one(i: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            body = {"model": "smollm2", "prompt": f"Story {i}: once upon a time",
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
            last = None
            async with http.stream("POST", "/v1/completions", json=body) as reply:
                async for line in reply.aiter_lines():
                    if line.startswith("data: {"):
                        now = time.perf_counter()
                        if last is not None:
                            gaps.append(now - last)
                        last = now

    await asyncio.gather(*(one(i) for i in range(streams)))
    return gaps


async def mixed(url: str, sentences: list[str]) -> tuple[list[float], list[float], float]:
    alone = await chat_itls(url, 8, 64)
    stop = asyncio.Event()
    flood = asyncio.create_task(http_flood(url, "all-minilm", sentences, 16, stop))
    await asyncio.sleep(2.0)
    loaded = await chat_itls(url, 8, 64)
    stop.set()
    rate = await flood
    return alone, loaded, rate


def p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(0.99 * (len(values) - 1)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--port", type=int, default=18611)
    parser.add_argument("--repeats", type=int, default=3, help="timings per measurement (median)")
    parser.add_argument("--mixed", action="store_true", help="also the chat + embedding flood run")
    parser.add_argument("--only-mixed", action="store_true", help="only the mixed-load run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    print(f"# {args.sentences} sentences, {args.threads} threads; "
          f"python {' '.join(sys.argv)}")
    if not args.only_mixed:
        throughput(args)
    if args.mixed or args.only_mixed:
        mixed_load(args)


def throughput(args: argparse.Namespace) -> None:
    """Per compute mode, rounds of (offline, HTTP float, HTTP base64) one after the other
    with the server up (idle while the offline child runs): the machine's speed drifts by a
    quarter over minutes here, and a ratio of runs minutes apart measured the drift."""
    rows = {"sentence-transformers encode(batch 32)": in_child(args, "st")}
    sentences = make_sentences(args.sentences)
    ratios: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as store:
        for compute in ("exact", "fast"):
            server = start_server(args.model_dir, args.port, args.threads, compute, store)
            offline_rows: list[dict] = []
            rates: dict[str, list[float]] = {"": [], ", base64": []}
            try:
                url = f"http://127.0.0.1:{args.port}"
                asyncio.run(http_flood(url, None, sentences[:64]))       # warm-up
                for _ in range(args.repeats):
                    offline_rows.append(in_child(args, f"shoal:{compute}", repeats=1))
                    offline = offline_rows[-1]["sentences_per_s"]
                    # the openai SDK asks for base64 unless told otherwise
                    for fmt, suffix in (("float", ""), ("base64", ", base64")):
                        rate = asyncio.run(http_flood(url, None, sentences, encoding_format=fmt))
                        rates[suffix].append(rate)
                        ratios.setdefault(f"HTTP{suffix} / offline ({compute})", []).append(
                            rate / offline)
                peak = server_peak_rss_mib(server.pid)
            finally:
                server.terminate()
                server.wait(30)
            offline_rates = [row["sentences_per_s"] for row in offline_rows]
            rows[f"shoal offline, {compute}"] = {
                "sentences_per_s": statistics.median(offline_rates),
                "all_per_s": [round(r) for r in offline_rates],
                "peak_rss_mib": max(row["peak_rss_mib"] for row in offline_rows)}
            for suffix, values in rates.items():
                rows[f"shoal HTTP, 16 clients x 1-8 inputs, {compute}{suffix}"] = {
                    "sentences_per_s": statistics.median(values),
                    "all_per_s": [round(r) for r in values], "peak_rss_mib": peak}
    base = rows["sentence-transformers encode(batch 32)"]["sentences_per_s"]
    print(f"| run | sentences/s (median of {args.repeats}) | each run | vs sentence-transformers "
          "| peak RSS MiB |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        runs = " / ".join(str(r) for r in row.get("all_per_s", []))
        print(f"| {name} | {row['sentences_per_s']:.0f} | {runs} | "
              f"{row['sentences_per_s'] / base:.2f}x | {row['peak_rss_mib']:.0f} |")
    for name, values in ratios.items():
        each = " / ".join(f"{v:.2f}" for v in values)
        print(f"{name}: {statistics.median(values):.2f} (median of the rounds' ratios: {each})")


def mixed_load(args: argparse.Namespace) -> None:
    from shoal.store.store import ModelStore

    sentences = make_sentences(args.sentences)
    with tempfile.TemporaryDirectory() as store:
        ModelStore(store).pull("all-minilm")
        server = start_server("smollm2", args.port, args.threads, "fast", store)
        try:
            url = f"http://127.0.0.1:{args.port}"
            asyncio.run(chat_itls(url, 2, 4))                      # warm-up
            asyncio.run(http_flood(url, "all-minilm", sentences[:32]))
            alone, loaded, rate = asyncio.run(mixed(url, sentences))
        finally:
            server.terminate()
            server.wait(30)
    print(f"mixed: 8 chat streams ITL P99 {p99(alone):.1f} ms alone, {p99(loaded):.1f} ms "
          f"with the embedding flood ({rate:.0f} sentences/s meanwhile): "
          f"{p99(loaded) / p99(alone):.2f}x; median {statistics.median(alone) * 1000:.1f} -> "
          f"{statistics.median(loaded) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
