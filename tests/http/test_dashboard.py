"""The live dashboard against real servers: the page in a real headless Chromium (Debian's
chromium through Playwright), its feed and snapshot over HTTP, and the key rules with keys on."""
from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

import httpx
import pytest

CHROMIUM = "/usr/bin/chromium"
MODEL = "smollm2:135m"
ENV_ADMIN_KEY = "env-admin-key-for-dashboard-tests"

sync_api = pytest.importorskip("playwright.sync_api")
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}")


def wait_for_js(page, expression: str, timeout: float) -> None:
    """Polls `expression` until it is truthy. NOTE: not page.wait_for_function: that compiles
    its predicate inside the page, which the dashboard's CSP (no 'unsafe-eval') forbids;
    page.evaluate runs it through the DevTools protocol, which the CSP does not govern."""
    deadline = time.monotonic() + timeout / 1000
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout / 1000:.0f} s: {expression}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


def _chat(url: str, content: str = "Count to five.", max_tokens: int = 16, headers=None, model: str = MODEL):
    return httpx.post(url + "/v1/chat/completions", headers=headers, timeout=180, json={
        "model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]})


class Load:
    """A few chat streams, one after another in each thread, until stopped."""

    def __init__(self, url: str, streams: int = 3, headers=None) -> None:
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(url, headers, i), daemon=True)
                        for i in range(streams)]

    def _run(self, url: str, headers, i: int) -> None:
        while not self.stop.is_set():
            _chat(url, f"Say something about the number {i}.", 24, headers)

    def __enter__(self) -> Self:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(200)


def _frames(response: httpx.Response):
    """SSE frames as (event, data) from a streamed response."""
    buffer = ""
    for chunk in response.iter_text():
        buffer += chunk
        while "\n\n" in buffer:
            frame, buffer = buffer.split("\n\n", 1)
            event, data = "message", ""
            for line in frame.splitlines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data += line[5:].strip()
            yield event, json.loads(data)


def _snapshot(url: str, headers=None, history: int = 60) -> dict:
    response = httpx.get(url + f"/dashboard/snapshot?history={history}", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _anonymous(snap: dict) -> dict:
    return next((k for k in snap["keys"] if k["key_id"] is None),
                {"requests": 0, "output_tokens": 0, "refused": 0})


# ---- no keys (a loopback server) ---------------------------------------------------------------


def test_the_page_is_one_self_contained_file(shoal_server) -> None:
    response = httpx.get(shoal_server.url + "/dashboard")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+'", policy)
    assert "frame-ancestors 'none'" in policy and response.headers["x-frame-options"] == "DENY"
    # nothing is loaded from anywhere: no external scripts, styles, fonts or images
    urls = set(re.findall(r"https?://[^\s\"')]+", response.text))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=\"(?!data:)", response.text)


def test_the_feed_sends_the_history_then_a_point_a_second(shoal_server) -> None:
    with httpx.stream("GET", shoal_server.url + "/dashboard/feed", timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = _frames(response)
        _, first = next(frames)
        arrived = [time.monotonic()]
        points = []
        for _ in range(3):
            event, snap = next(frames)
            arrived.append(time.monotonic())
            assert event == "message" and len(snap["series"]["t"]) == 1
            points.append(snap["series"]["t"][0])
    assert first["state"] == "ready" and first["models"][0]["name"] == MODEL
    assert first["models"][0]["compute"] in ("fast", "exact")
    assert len(first["series"]["t"]) <= 300
    assert points == sorted(points) and len(set(points)) == 3
    gaps = [b - a for a, b in itertools.pairwise(arrived[1:])]
    assert all(0.3 < gap < 5 for gap in gaps), gaps       # about one a second (a busy machine jitters)


def test_the_snapshot_counts_requests_tokens_and_refusals(shoal_server) -> None:
    url = shoal_server.url
    before = _anonymous(_snapshot(url))
    assert _chat(url, max_tokens=8).status_code == 200
    missing = _chat(url, model="no-such-model-for-the-dashboard")
    assert missing.status_code == 404
    deadline = time.monotonic() + 30
    while True:
        snap = _snapshot(url, history=300)
        mine = _anonymous(snap)
        # NOTE: the series gains a point a second: the tokens show there on the next tick
        ticked = max(snap["series"]["output_tps"], default=0) > 0
        if (mine["requests"] >= before["requests"] + 2 and ticked) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert mine["requests"] >= before["requests"] + 2
    assert mine["output_tokens"] >= before["output_tokens"] + 1
    assert mine["refused"] >= before["refused"] + 1
    refusal = next(r for r in snap["refusals"] if r["model"] == "no-such-model-for-the-dashboard")
    assert refusal["status"] == 404 and "does not exist" in refusal["reason"] and refusal["key_id"] is None
    assert snap["now"]["ttft_p50"] is not None and snap["now"]["ttft_p50"] <= snap["now"]["ttft_p99"]
    model = snap["models"][0]
    assert model["queue_bounds"]["interactive"] >= 1 and 0 <= model["kv_usage"] <= 1
    assert max(snap["series"]["output_tps"]) > 0


def test_a_bad_history_is_a_400_in_openai_shape(shoal_server) -> None:
    response = httpx.get(shoal_server.url + "/dashboard/snapshot?history=-1")
    assert response.status_code == 400 and response.json()["error"]["param"] == "query.history"
    assert len(_snapshot(shoal_server.url, history=2)["series"]["t"]) <= 2


def _texts(page) -> dict:
    return page.evaluate("""() => ({
        cards: [...document.querySelectorAll('.card .v')].map(e => e.textContent),
        tables: [...document.querySelectorAll('tbody')].map(e => e.textContent),
        plots: [...document.querySelectorAll('svg path')].map(e => e.getAttribute('d')).join('|'),
    })""")


@needs_chromium
def test_the_page_moves_with_the_load_without_console_errors(shoal_server, browser, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(shoal_server.url + "/dashboard")
    wait_for_js(page, "document.getElementById('c-output').textContent !== '–'", timeout=30000)
    assert page.is_hidden("#login") and page.is_visible("#main")
    with Load(shoal_server.url):
        wait_for_js(page, "parseFloat(document.getElementById('c-output').textContent) > 0", timeout=120000)
        first, shot1 = _texts(page), page.screenshot(path=str(tmp_path / "1.png"))
        page.wait_for_timeout(3000)
        second, shot2 = _texts(page), page.screenshot(path=str(tmp_path / "2.png"))
    assert shot1 != shot2
    assert first["plots"] != second["plots"]                      # the plots moved
    assert first["cards"] != second["cards"] or first["tables"] != second["tables"]   # and the numbers
    assert MODEL in second["tables"][0]
    # a phone-width screen: the page itself never scrolls sideways (wide tables scroll in place)
    page.set_viewport_size({"width": 390, "height": 800})
    page.wait_for_timeout(300)
    assert page.evaluate("document.documentElement.scrollWidth") <= 391
    page.close()
    assert problems == []


# ---- keys on -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """(server, keys): a server that requires keys, an admin key and a plain one."""
    from live_server import keyed_server, shoal_keys

    home = tmp_path_factory.mktemp("dashboard-home")
    keys = {"plain": shoal_keys(home, "create", "plain"), "admin": shoal_keys(home, "create", "ops", "--admin")}
    with keyed_server(smollm2_path, home, ENV_ADMIN_KEY, "--max-model-len", "1024",
                      "--kv-cache-bytes", "64MiB") as server:
        yield server, keys


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_with_keys_the_data_needs_an_admin_key(keyed) -> None:
    server, keys = keyed
    assert httpx.get(server.url + "/dashboard").status_code == 200       # the page holds no data
    for path in ("/dashboard/feed", "/dashboard/snapshot"):
        refused = httpx.get(server.url + path)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key", path
        assert "models" not in refused.text
        plain = httpx.get(server.url + path, headers=_bearer(keys["plain"]))
        assert plain.status_code == 403 and plain.json()["error"]["code"] == "admin_required", path
        assert "dashboard" in plain.json()["error"]["message"]
    assert _chat(server.url, max_tokens=4, headers=_bearer(keys["plain"])).status_code == 200
    assert _chat(server.url, max_tokens=4, headers=_bearer("sk-shoal-0123456789ab_" + "x" * 43)).status_code == 401
    with httpx.stream("GET", server.url + "/dashboard/feed", headers=_bearer(keys["admin"]), timeout=30) as feed:
        assert feed.status_code == 200
        _, snap = next(_frames(feed))
    assert snap["keys_required"] is True
    deadline = time.monotonic() + 20
    while not any(k["name"] == "plain" for k in snap["keys"]) and time.monotonic() < deadline:
        time.sleep(0.5)
        snap = _snapshot(server.url, _bearer(ENV_ADMIN_KEY))
    plain_usage = next(k for k in snap["keys"] if k["name"] == "plain")
    assert plain_usage["requests"] >= 1 and plain_usage["output_tokens"] >= 1
    assert any(r["status"] == 401 and r["reason"] == "invalid API key" for r in snap["refusals"])


@needs_chromium
def test_with_keys_the_page_asks_for_one_and_keeps_it_out_of_urls(keyed, browser) -> None:
    server, keys = keyed
    page = browser.new_page(viewport={"width": 390, "height": 800})
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    page.goto(server.url + "/dashboard")
    page.wait_for_selector("#login", state="visible", timeout=15000)
    assert page.is_hidden("#main")
    page.fill("#key", keys["plain"])                  # not an admin key: refused, asked again
    page.click("#login button")
    wait_for_js(page, "document.getElementById('login-error').textContent.includes('admin key')",
                           timeout=15000)
    assert page.is_visible("#login") and page.is_hidden("#main")
    page.fill("#key", keys["admin"])
    page.click("#login button")
    page.wait_for_selector("#main", state="visible", timeout=15000)
    wait_for_js(page, "document.getElementById('t-models').textContent.includes('smollm2:135m')",
                           timeout=15000)
    assert page.evaluate("sessionStorage.getItem('shoal.dashboard.key')") == keys["admin"]
    assert not any(keys["admin"] in u or keys["plain"] in u for u in urls), urls
    page.close()


def test_shoal_top_with_keys_needs_an_admin_key(keyed, tmp_path: Path) -> None:
    server, keys = keyed

    def top(key: str | None) -> subprocess.CompletedProcess:
        env = {**os.environ, "SHOAL_HOST": server.url, "SHOAL_HOME": str(tmp_path), "SHOAL_NO_AUTOSTART": "1"}
        env.pop("SHOAL_API_KEY", None)
        if key:
            env["SHOAL_API_KEY"] = key
        return subprocess.run([sys.executable, "-m", "shoal", "top", "--once"], env=env, capture_output=True,
                               text=True, timeout=60, check=False)

    admin = top(keys["admin"])
    assert admin.returncode == 0 and "smollm2:135m" in admin.stdout, admin.stderr
    for key, words in ((None, "missing API key"), (keys["plain"], "needs an admin key")):
        refused = top(key)
        assert refused.returncode == 1 and words in refused.stderr and "SHOAL_API_KEY" in refused.stderr
        assert "Traceback" not in refused.stderr
