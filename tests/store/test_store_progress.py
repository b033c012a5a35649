"""Progress events (Ollama's /api/pull shape), their throttling, and the rich renderer."""
from __future__ import annotations

import io
import json

from rich.console import Console

from shoal.store.progress import Reporter, RichProgress, short_digest

DIGEST = "sha256:" + "ab12" * 16


def test_short_digest() -> None:
    assert short_digest(DIGEST) == "ab12ab12ab12"
    assert short_digest("sha256-" + "cd" * 32) == "cdcdcdcdcdcd"


def test_byte_events_are_throttled_but_first_and_last_always_go() -> None:
    events: list[dict] = []
    now = [0.0]
    reporter = Reporter(events.append, min_interval=0.1, clock=lambda: now[0])
    report = reporter.bytes("pulling ab12ab12ab12", DIGEST, 1000)
    for done in range(0, 1001, 100):          # 11 updates within the same instant
        report(done, 1000)
    assert [e["completed"] for e in events] == [0, 1000]
    now[0] = 1.0
    report(500, None)                          # the total given up front is used
    assert events[-1] == {"status": "pulling ab12ab12ab12", "digest": DIGEST, "total": 1000,
                          "completed": 500}
    reporter.status("success")
    assert events[-1] == {"status": "success"}
    for event in events:                       # each is one NDJSON line
        assert json.loads(json.dumps(event)) == event
    Reporter(None).bytes("x")(1, 2)            # no callback: nothing happens


def test_rich_renderer_draws_bars_and_status_lines() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=120)
    with RichProgress(console=console) as show:
        show({"status": "pulling manifest"})
        show({"status": "pulling ab12ab12ab12", "digest": DIGEST, "total": 2_000_000,
              "completed": 0})
        show({"status": "pulling ab12ab12ab12", "digest": DIGEST, "total": 2_000_000,
              "completed": 2_000_000})
        show({"status": "verifying sha256 digest"})
        show({"status": "success"})
        task = show._progress.tasks[0]
        assert task.completed == task.total == 2_000_000
    text = out.getvalue()
    for line in ("pulling manifest", "verifying sha256 digest", "success", "pulling ab12ab12ab12"):
        assert line in text
    assert "2.0 MB" in text
