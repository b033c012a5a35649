"""The `shoal bench` HTML report: structure, escaping, no network, edge cases, and a real browser.

The results dicts are synthesised by `synthetic_results` (seeded random latencies, stats
computed from them): input data in the shape of schema shoal-bench/1, not expected outputs.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from shoal.bench.report_html import render_html

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
HOSTILE_NAME = '<script>alert("x")</script>'
HOSTILE_ERROR = '<img src=x onerror="alert(1)"> & <b>bold</b>'
PLOTS_WITH_SLO = 5      # throughput, P99 TTFT, P99 ITL, ITL distribution, goodput
PLOTS_WITHOUT_SLO = 4


# ---- input data ----

def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {"mean": sum(ordered) / len(ordered), "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)}


def synthetic_results(targets: tuple[str, ...] = ("shoal", "llamacpp"), levels: tuple[int, ...] = (1, 2, 4, 8),
                      *, seed: int = 0, requests_per_level: int = 6, tokens: int = 24,
                      slo: bool = True, server: bool = True,
                      failing: dict[tuple[str, int], str] | None = None) -> dict:
    """A plausible results dict: per target a base speed; latencies grow with the level.
    `failing` maps (target, level) to an error message every request there fails with."""
    rng = random.Random(seed)
    failing = failing or {}
    rows, requests, analysis = [], [], {}
    for t, target in enumerate(targets):
        step_s = 0.010 * (1 + t)
        for level in levels:
            measured = []
            for i in range(requests_per_level):
                message = failing.get((target, level))
                if message:
                    requests.append({"target": target, "level": level, "index": i, "start": rng.uniform(0, 30),
                                     "status": 503, "error": message, "prompt_tokens": 40, "output_tokens": 0,
                                     "ttft": None, "e2e": None, "itls": []})
                    continue
                ttft = rng.lognormvariate(math.log(0.05 * level * (1 + t)), 0.3)
                itls = [rng.lognormvariate(math.log(step_s * (1 + level / 8)), 0.4) for _ in range(tokens - 1)]
                request = {"target": target, "level": level, "index": i, "start": rng.uniform(0, 30),
                           "status": 200, "error": None, "prompt_tokens": 40, "output_tokens": tokens,
                           "ttft": ttft, "e2e": ttft + sum(itls), "itls": itls}
                requests.append(request)
                measured.append(request)
            duration = 30.0
            if measured:
                itls = [x for q in measured for x in q["itls"]]
                out = sum(q["output_tokens"] for q in measured)
                # a closed loop: `level` requests in flight, each taking the mean e2e (Little's law)
                rate = level / (sum(q["e2e"] for q in measured) / len(measured))
                duration = len(measured) / rate
                row = {"completed": len(measured), "errors": {"503": 0, "timeout": 0, "connection": 0},
                       "request_throughput": rate, "output_throughput": rate * tokens,
                       "total_token_throughput": rate * (tokens + 40),
                       "prompt_tokens": 40 * len(measured), "output_tokens": out,
                       "ttft": _summary([q["ttft"] for q in measured]),
                       "itl": {**_summary(itls), "max": max(itls), "stdev": 0.002},
                       "tpot": _summary([sum(q["itls"]) / len(q["itls"]) for q in measured]),
                       "e2e": _summary([q["e2e"] for q in measured]),
                       "stalls": sum(x > 0.25 for x in itls),
                       "goodput": rate * 0.9 if slo else None,
                       "slo_attainment": 0.9 if slo else None}
            else:
                row = {"completed": 0, "errors": {"503": requests_per_level, "timeout": 0, "connection": 0},
                       "request_throughput": 0.0, "output_throughput": 0.0, "total_token_throughput": 0.0,
                       "prompt_tokens": 0, "output_tokens": 0, "ttft": None, "itl": None, "tpot": None,
                       "e2e": None, "stalls": 0, "goodput": 0.0 if slo else None, "slo_attainment": None}
            row.update({"target": target, "level": level, "duration_s": duration,
                        "server": {"source": "shoal", "prompt_tokens": row["prompt_tokens"],
                                   "generation_tokens": row["output_tokens"], "ttft_mean": 0.05, "e2e_mean": 0.4,
                                   "preemptions": 0, "prefix_cache_hit_rate": 0.1} if server else None})
            rows.append(row)
        knee = levels[-2] if len(levels) > 1 else None
        analysis[target] = {"knee": knee, "saturation": levels[-1] if len(levels) > 2 else None,
                            "oversaturation": None, "peak_output_throughput": 100.0, "peak_level": levels[-1],
                            "summary": f"{target} scales to {knee} streams; past {knee}, P99 TTFT grows faster "
                                       f"than throughput (the knee)."}
    return {
        "schema": "shoal-bench/1", "started_at": "2026-11-28T10:00:00Z", "finished_at": "2026-11-28T10:05:00Z",
        "command": "shoal bench --levels " + ",".join(map(str, levels)),
        "host": {"hostname": "bench-host", "cpu": "AMD EPYC", "cores": 2, "python": "3.11.7", "shoal": "0.1.0"},
        "settings": {"workload": "short-short", "mode": "closed", "arrival": None, "levels": list(levels),
                     "duration_s": 30.0, "requests_per_level": None, "warmup_requests": 2, "seed": seed,
                     "temperature": 0.0, "max_tokens": tokens, "ignore_eos": True,
                     "slo": {"ttft_s": 1.0, "itl_s": 0.2, "e2e_s": None} if slo else
                            {"ttft_s": None, "itl_s": None, "e2e_s": None},
                     "stall_threshold_s": 0.25, "request_timeout_s": 300.0},
        "targets": [{"name": name, "url": f"http://127.0.0.1:{8000 + i}", "dialect": "openai",
                     "model": "smollm2:135m", "ignore_eos_supported": True,
                     "server_metrics": "shoal" if server else None} for i, name in enumerate(targets)],
        "levels": rows, "analysis": analysis, "requests": requests,
    }


# ---- reading the page ----

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class PageReader(HTMLParser):
    """Checks tag nesting and collects what the assertions need."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.problems: list[str] = []
        self.tags: list[str] = []
        self.links: list[tuple[str, str, str]] = []    # (tag, attribute, value) of src/href-like attributes
        self.svg_texts: list[list[str]] = []            # text inside each <svg>
        self.table_text: list[str] = []
        self.styles: list[str] = []

    def handle_starttag(self, tag, attrs):
        self._record(tag, attrs)
        if tag == "svg":
            self.svg_texts.append([])
        if tag not in VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag, attrs):
        self._record(tag, attrs)

    def _record(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "xlink:href", "action", "srcset", "poster", "data"):
                self.links.append((tag, name, value or ""))
            if name == "style":
                self.styles.append(value or "")

    def handle_endtag(self, tag):
        if not self.open or self.open[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.open[-1:] or 'nothing'}")
            return
        self.open.pop()

    def handle_data(self, data):
        if "svg" in self.open:
            self.svg_texts[-1].append(data)
        elif "style" in self.open:
            self.styles.append(data)
        elif "table" in self.open:
            self.table_text.append(data)


def read_page(page: str) -> PageReader:
    reader = PageReader()
    reader.feed(page)
    reader.close()
    assert not reader.problems, reader.problems[:5]
    assert reader.open == [], f"unclosed tags: {reader.open}"
    return reader


# ---- the page ----

def test_report_parses_with_one_svg_per_plot_and_every_target_named():
    results = synthetic_results(("shoal", "llamacpp", "vllm"))
    page = render_html(results)
    reader = read_page(page)

    assert page.startswith("<!DOCTYPE html>")
    assert reader.tags.count("svg") == PLOTS_WITH_SLO
    for plot in ("plot-throughput", "plot-ttft", "plot-itl", "plot-itl-cdf", "plot-goodput"):
        assert f'<figure id="{plot}">' in page
    for name in ("shoal", "llamacpp", "vllm"):
        for svg_text in reader.svg_texts:                  # every plot's legend names every target
            assert any(name in text for text in svg_text)
        assert any(name == text.strip() for text in reader.table_text)
    # the analysis sentences are on the page, and the knee is tagged in the tables
    assert "shoal scales to 4 streams" in page
    assert '<span class="tag">knee</span>' in page
    # matplotlib gives every figure the same ids; the page must hold each once
    ids = re.findall(r'\bid="([^"]*)"', page)
    assert len(ids) == len(set(ids)) and any(i.startswith("plot-ttft-") for i in ids)


def test_report_references_nothing_on_the_network():
    page = render_html(synthetic_results())
    reader = read_page(page)
    assert "script" not in reader.tags and "link" not in reader.tags and "iframe" not in reader.tags
    for tag, attribute, value in reader.links:
        assert value.startswith("#"), f"<{tag} {attribute}={value!r}> points outside the page"
    for style in reader.styles:
        assert "@import" not in style
        assert "url(" not in style or all(part.startswith("#") for part in style.split("url(")[1:])
    # and the browser is told to fetch nothing, whatever the page holds
    assert "default-src 'none'" in page


def test_hostile_strings_are_escaped_and_inert():
    results = synthetic_results((HOSTILE_NAME, "_under $x$ & co"), failing={(HOSTILE_NAME, 4): HOSTILE_ERROR})
    results["settings"]["workload"] = "jsonl:</title><script>alert(2)</script>"
    results["targets"][0]["url"] = 'http://h/"><script>alert(3)</script>'
    page = render_html(results)
    reader = read_page(page)

    assert "script" not in reader.tags and "img" not in reader.tags and "b" not in reader.tags
    assert "<script" not in page.replace("&lt;script", "")
    text = "".join(reader.table_text)
    assert HOSTILE_NAME in text and HOSTILE_ERROR in text     # shown to the reader, as text
    # matplotlib neither drops a name starting with "_" from a legend nor reads "$x$" as TeX
    assert any("_under $x$ & co" in "".join(svg) for svg in reader.svg_texts)
    assert any(HOSTILE_NAME in "".join(svg) for svg in reader.svg_texts)


@pytest.mark.parametrize("case", ["single level", "single target", "errors at one level", "no server metrics",
                                  "nan and none values", "no requests or analysis", "no slo"])
def test_awkward_results_render(case):
    expected_plots = PLOTS_WITH_SLO
    if case == "single level":
        results = synthetic_results(levels=(4,))
    elif case == "single target":
        results = synthetic_results(("shoal",))
    elif case == "errors at one level":
        results = synthetic_results(failing={("llamacpp", 8): "503 Service Unavailable"})
    elif case == "no server metrics":
        results = synthetic_results(server=False)
    elif case == "nan and none values":
        results = synthetic_results()
        first, second = results["levels"][0], results["levels"][1]
        first.update(output_throughput=math.nan, ttft={"p99": None, "mean": math.inf}, errors=None, stalls=None)
        second.update(itl="not a dict", level=None, server={"source": None})
        results["analysis"]["shoal"]["knee"] = math.nan
        results["requests"][0]["itls"] = [None, math.nan, "x", -1.0, 0.01]
    elif case == "no requests or analysis":
        results = synthetic_results()
        del results["requests"], results["analysis"], results["host"]
    else:
        results = synthetic_results(slo=False)
        expected_plots = PLOTS_WITHOUT_SLO
    # through JSON, as a saved run comes back (NaN survives as Python's json writes it)
    page = render_html(json.loads(json.dumps(results)))
    reader = read_page(page)
    assert reader.tags.count("svg") == expected_plots
    for name in {row["target"] for row in results["levels"]}:
        assert any(name == text.strip() for text in reader.table_text)
    if case == "errors at one level":
        assert '<tr class="has-errors">' in page and "503 Service Unavailable" in page


def test_another_schema_is_refused():
    results = synthetic_results()
    results["schema"] = "shoal-bench/2"
    with pytest.raises(ValueError, match="shoal-bench/1"):
        render_html(results)


def test_missing_matplotlib_names_the_bench_extra(monkeypatch):
    # None in sys.modules makes an import fail, as if the package were not installed
    for module in {"matplotlib", "matplotlib.figure", *(m for m in sys.modules if m.startswith("matplotlib."))}:
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r"shoal\[bench\]"):
        render_html(synthetic_results())


# ---- the command line ----

def _run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shoal.bench.report_html", *args],
                          capture_output=True, text=True, timeout=120)


def test_module_rerenders_a_saved_run(tmp_path):
    results = synthetic_results()
    saved = tmp_path / "results.json"
    saved.write_text(json.dumps(results))
    done = _run_module(str(saved), "-o", str(tmp_path / "report.html"))
    assert done.returncode == 0, done.stderr
    # deterministic: the same page as rendering in this process
    assert (tmp_path / "report.html").read_text(encoding="utf-8") == render_html(results)


def test_plots_are_written_as_standalone_svg_files(tmp_path):
    import xml.etree.ElementTree as ET

    results = synthetic_results(("shoal", "llamacpp", "vllm"))
    saved = tmp_path / "results.json"
    saved.write_text(json.dumps(results))
    done = _run_module(str(saved), "-o", str(tmp_path / "report.html"), "--plots", str(tmp_path / "img"))
    assert done.returncode == 0, done.stderr
    files = sorted((tmp_path / "img").glob("*.svg"))
    assert {f.stem for f in files} == {"plot-throughput", "plot-ttft", "plot-itl", "plot-itl-cdf", "plot-goodput"}
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    for file in files:
        root = ET.parse(file).getroot()                 # a well-formed XML document on its own
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        text = " ".join(t for t in root.itertext())
        assert all(name in text for name in ("shoal", "llamacpp", "vllm")), file.name
        # the same drawing as the report's inline figure
        inline = page[page.index(f'<figure id="{file.stem}">'):]
        assert file.read_text(encoding="utf-8").split("\n", 1)[1] in inline


def test_module_explains_bad_input(tmp_path):
    missing = _run_module(str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    (tmp_path / "bad.json").write_text("{not json")
    bad = _run_module(str(tmp_path / "bad.json"))
    assert bad.returncode == 2 and "not a JSON file" in bad.stderr
    (tmp_path / "other.json").write_text(json.dumps({"schema": "something-else"}))
    other = _run_module(str(tmp_path / "other.json"))
    assert other.returncode == 2 and "shoal-bench/1" in other.stderr
    assert not (tmp_path / "other.html").exists()


# ---- a real browser ----

def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def _near(pixel: tuple[int, int, int], colour: str, tolerance: int = 40) -> bool:
    target = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return sum(abs(a - b) for a, b in zip(pixel, target)) <= tolerance


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI: apt-get install -y chromium)")
def test_report_renders_in_a_real_browser(tmp_path):
    from PIL import Image  # a dependency of matplotlib, so present wherever the report can be drawn

    from shoal.bench.report_plots import PALETTE

    results = synthetic_results(("shoal", "llamacpp", "vllm"))
    report = tmp_path / "report.html"
    report.write_text(render_html(results), encoding="utf-8")
    screenshot = tmp_path / "report.png"

    shot = _chromium(tmp_path, f"--screenshot={screenshot}", "--window-size=1280,2400", report.as_uri())
    assert screenshot.exists(), shot.stderr[-2000:]
    image = Image.open(screenshot).convert("RGB")
    assert image.size == (1280, 2400)
    colours = image.getcolors(maxcolors=1280 * 2400)     # [(pixel count, (r, g, b)), …]
    not_white = sum(count for count, rgb in colours if sum(rgb) < 740)
    assert not_white > 0.02 * 1280 * 2400, "the screenshot is (almost) blank"
    for colour in PALETTE[:3]:             # each target's line colour is drawn somewhere
        assert sum(count for count, rgb in colours if _near(rgb, colour)) > 200, colour

    dom = _chromium(tmp_path, "--dump-dom", report.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<svg") == PLOTS_WITH_SLO
    assert "shoal scales to 4 streams" in dom.stdout
