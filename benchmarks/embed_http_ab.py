#!/usr/bin/env python3
"""Embeddings over HTTP, two checkouts side by side: sentences/s and the server's event-loop
CPU per request, the servers started in turn (A, B, A, B, ...) so that drift on this host
falls on both alike.

    python benchmarks/embed_http_ab.py --model-dir DIR --checkouts OLD_SRC,NEW_SRC [--rounds 3]

Each checkout is a `src` directory put first on the server's PYTHONPATH (for instance a
`git worktree add /tmp/base <commit>` and its /tmp/base/src). The word `bare` instead names
an upper bound, not something to ship: the installed shoal with its /v1/embeddings answered
by a bare ASGI function in front of the whole app (no middleware, no validation, no
records, no error shapes): what any request path could reach at best. The word `offline`
names the reference: embed_bench.py's offline run of the installed shoal (same sentences,
threads and mode), timed in its turn like the servers, so HTTP/offline ratios come from
neighbouring rounds.

Each round starts a `shoal serve` of DIR (fast mode by default, 2 threads) and floods it as
embed_bench.py's HTTP run does: 16 clients (lean_http) sending 1-8 inputs each, 4 passes over
the sentences; the median pass counts. The event loop's CPU is its thread's (the main
thread's) user + system time over the passes.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from embed_bench import http_flood, make_sentences
from local_server import start_local_server
from process_cpu import cpu_seconds

BARE = "bare"
OFFLINE = "offline"


def serve_bare() -> None:
    """`shoal serve` (the arguments after --bare-server) with POST /v1/embeddings answered by
    a bare ASGI function in front of the app."""
    from shoal.core.openmp import set_openmp_defaults

    set_openmp_defaults()   # as the `shoal` command does, before torch loads
    import orjson

    import shoal.http.server as server
    from shoal.cli import main as shoal_main
    from shoal.http.openai import serving
    from shoal.http.openai.embeddings import parse_input
    from shoal.serving.embedding import embed, finish_vector, tokenize_inputs

    create_app = server.create_app

    def bare_app(*app_args, **app_kwargs):
        app = create_app(*app_args, **app_kwargs)

        async def bare(scope, receive, send) -> None:
            if scope["type"] != "http" or scope["path"] != "/v1/embeddings":
                return await app(scope, receive, send)
            raw = b""
            while True:
                message = await receive()
                raw += message.get("body", b"")
                if not message.get("more_body"):
                    break
            body = orjson.loads(raw)
            residency, service = app.state.residency, app.state.service
            model = await serving.acquire_model(residency, body.get("model"))
            try:
                inputs = tokenize_inputs(model, parse_input(body["input"]), truncate=False)
                result = await embed(service, model, inputs, dialect="openai")
            finally:
                residency.release(model)
            data = [{"object": "embedding", "index": i,
                     "embedding": finish_vector(v, normalize=True, dimensions=None)}
                    for i, v in enumerate(result.vectors)]
            answer = orjson.dumps({"object": "list", "data": data, "model": model.name},
                                  option=orjson.OPT_SERIALIZE_NUMPY)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": answer})

        bare.state = app.state      # serve() reads the app's state (lifecycle, service)
        return bare

    server.create_app = bare_app
    sys.argv = ["shoal", *sys.argv[sys.argv.index("--bare-server") + 1:]]
    shoal_main()


def offline_round(args: argparse.Namespace) -> tuple[float, float]:
    """The installed shoal's encoder fed directly (embed_bench.py's offline child): the
    reference the HTTP rounds are a fraction of, timed between them."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("embed_bench.py")), "--model-dir",
         args.model_dir, "--threads", str(args.threads), "--sentences", str(args.sentences),
         "--repeats", str(args.passes), "--child", f"shoal:{args.compute}"],
        capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["sentences_per_s"], float("nan")


def one_round(src: str, args: argparse.Namespace, sentences: list[str]) -> tuple[float, float]:
    if src == OFFLINE:
        return offline_round(args)
    bare = src == BARE
    pythonpath = [] if bare else [src]
    process, url = start_local_server(args.model_dir, env={
        "SHOAL_NUM_THREADS": str(args.threads), "SHOAL_COMPUTE": args.compute,
        "SHOAL_MODELS": tempfile.mkdtemp(prefix="shoal-ab-"),
        "PYTHONPATH": os.pathsep.join(filter(None, [*pythonpath, os.environ.get("PYTHONPATH")]))},
        launcher=[sys.executable, __file__, "--bare-server"] if bare else None)
    try:
        asyncio.run(http_flood(url, None, sentences[:64]))
        before = cpu_seconds(process.pid)[0]
        rates = []
        for _ in range(args.passes):
            rates.append(asyncio.run(http_flood(url, None, sentences)))
        # NOTE: the clients send 1-8 inputs per request, 4.5 on average
        requests = args.passes * len(sentences) / 4.5
        loop_ms = (cpu_seconds(process.pid)[0] - before) / requests * 1e3
        return statistics.median(rates), loop_ms
    finally:
        process.terminate()
        process.wait(30)


def main() -> None:
    if "--bare-server" in sys.argv:
        serve_bare()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--checkouts", required=True, help="comma-separated src directories")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compute", default="fast", choices=["fast", "exact"])
    parser.add_argument("--sentences", type=int, default=2000)
    args = parser.parse_args()
    print(f"# python {' '.join(sys.argv)}")
    sentences = make_sentences(args.sentences)
    checkouts = args.checkouts.split(",")
    results: dict[str, list[tuple[float, float]]] = {src: [] for src in checkouts}
    for _ in range(args.rounds):
        for src in checkouts:
            results[src].append(one_round(src, args, sentences))
    print("| checkout | sentences/s per round | median | event loop ms/request per round |")
    print("|---|---|---|---|")
    for src, rows in results.items():
        rates = " / ".join(f"{rate:,.0f}" for rate, _ in rows)
        loops = " / ".join(f"{ms:.2f}" for _, ms in rows)
        print(f"| {src} | {rates} | {statistics.median(r for r, _ in rows):,.0f} | {loops} |")


if __name__ == "__main__":
    main()
