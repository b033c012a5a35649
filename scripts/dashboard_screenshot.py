"""Regenerates docs/dashboard.png (and docs/dashboard-phone.png): the live dashboard of a real
server under a short load, captured in headless Chromium.

    python scripts/dashboard_screenshot.py                    # starts `shoal serve` (smollm2:135m)
    python scripts/dashboard_screenshot.py --url http://127.0.0.1:11434   # an existing server

Needs the `playwright` package and a Chromium (Debian's /usr/bin/chromium by default; no
browser is downloaded). The load: a few chat streams of short answers, one request for a
model that does not exist (so the refusals table has a row), for about --seconds.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from local_server import start_local_server

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Write a haiku about the sea.", "List three uses of copper.", "Explain rain to a child.",
           "Name a fast animal and say why.", "Give a tip for learning Python."]


def run_load(url: str, model: str, stop: threading.Event, streams: int, max_tokens: int) -> None:
    def one(i: int) -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                try:
                    client.post(url + "/v1/chat/completions", json={
                        "model": model, "max_tokens": max_tokens, "stream": True,
                        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]})
                except httpx.HTTPError:
                    time.sleep(0.5)

    for i in range(streams):
        threading.Thread(target=one, args=(i,), daemon=True).start()
    httpx.post(url + "/v1/chat/completions", json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an existing server (default: start one)")
    parser.add_argument("--model-file", default=str(Path.home() / ".cache/shoal/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--model", default="smollm2:135m", help="the model name the load asks for")
    parser.add_argument("--seconds", type=float, default=40.0, help="how long the load runs before the capture")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--out", default=str(ROOT / "docs" / "dashboard.png"))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    process = None
    url = args.url
    if url is None:
        process, url = start_local_server(args.model_file, "--served-model-name", "smollm2:135m",
                                          "--max-model-len", "2048", "--kv-cache-bytes", "128MiB",
                                          timeout=180)
    stop = threading.Event()
    try:
        run_load(url, args.model, stop, args.streams, 48)
        time.sleep(args.seconds)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium)
            for name, size in ((args.out, (1280, 900)), (args.out.replace(".png", "-phone.png"), (390, 1500))):
                page = browser.new_page(viewport={"width": size[0], "height": size[1]})
                page.goto(url + "/dashboard")
                # (a Python poll: page.wait_for_function's in-page eval is barred by the page's CSP)
                deadline = time.monotonic() + 30
                while page.evaluate("document.getElementById('c-output').textContent") == "–":
                    if time.monotonic() > deadline:
                        raise SystemExit("the dashboard showed no figures within 30 s")
                    time.sleep(0.1)
                page.wait_for_timeout(1500)
                page.screenshot(path=name, full_page=True)
                print(f"wrote {name}")
                page.close()
            browser.close()
    finally:
        stop.set()
        if process is not None:
            process.terminate()         # drains: running answers may take a while on a busy machine
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
