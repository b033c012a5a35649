"""The command line's pure parts: SHOAL_HOST parsing, Ollama's human formats, the timing
block, /set parameter typing, word wrapping and progress lines (no server)."""
from __future__ import annotations

import io
import time
from datetime import datetime, timedelta, timezone

import pytest

from shoal.cli.chat import parse_parameter
from shoal.cli.client import CliError, ErrorReply, parse_host
from shoal.cli.display import (AnswerWriter, go_duration, human_bytes, human_number, human_time,
                               timing_summary)
from shoal.cli.model_info import processor
from shoal.cli.progress import show_progress


@pytest.mark.parametrize("value,url", [
    ("", "http://127.0.0.1:11434"),
    ("localhost", "http://localhost:11434"),
    ("127.0.0.1:8000", "http://127.0.0.1:8000"),
    ("http://10.1.2.3:99", "http://10.1.2.3:99"),
    (":5555", "http://127.0.0.1:5555"),
    ("[::1]:81", "http://[::1]:81"),
    ("https://example.com", "https://example.com:443"),
])
def test_parse_host(value, url, monkeypatch):
    monkeypatch.delenv("SHOAL_PORT", raising=False)
    assert parse_host(value).url == url


def test_parse_host_port_from_shoal_port(monkeypatch):
    monkeypatch.setenv("SHOAL_PORT", "9000")
    assert parse_host("localhost").port == 9000
    assert parse_host("localhost:7").port == 7
    with pytest.raises(CliError):
        parse_host("localhost:notaport")


def test_wildcard_hosts_connect_locally():
    host = parse_host("0.0.0.0:1234")
    assert host.connect_host == "127.0.0.1" and host.is_local
    assert not parse_host("example.com").is_local


def test_human_formats():
    assert human_bytes(98_362_432) == "98 MB"
    assert human_bytes(1_234_000_000) == "1.2 GB"
    assert human_bytes(512) == "512 B"
    assert human_number(134_515_008) == "134.52M"
    assert human_number(7_000_000_000) == "7B"
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    stamp = lambda delta: (now + delta).isoformat().replace("+00:00", "Z")  # noqa: E731
    assert human_time(stamp(timedelta(minutes=-2, seconds=-5)), now=now) == "2 minutes ago"
    assert human_time(stamp(timedelta(minutes=4, seconds=30)), now=now) == "4 minutes from now"
    assert human_time(stamp(timedelta(days=300 * 365)), now=now) == "Forever"
    assert human_time("2025-12-31T23:59:59.123456789Z", now=now) == "Less than a second ago"  # Go nanoseconds
    assert human_time(None) == "Never"


def test_go_durations():
    assert go_duration(1_234_567_891) == "1.234567891s"
    assert go_duration(12_500_000) == "12.5ms"
    assert go_duration(63_454) == "63.454µs"
    assert go_duration(123_500_000_000) == "2m3.5s"
    assert go_duration(0) == "0s"


def test_timing_summary_is_ollamas_block():
    block = timing_summary({"total_duration": 2_000_000_000, "load_duration": 1_000_000,
                            "prompt_eval_count": 10, "prompt_eval_duration": 500_000_000,
                            "eval_count": 20, "eval_duration": 1_000_000_000})
    assert block.splitlines() == [
        "total duration:       2s",
        "load duration:        1ms",
        "prompt eval count:    10 token(s)",
        "prompt eval duration: 500ms",
        "prompt eval rate:     20.00 tokens/s",
        "eval count:           20 token(s)",
        "eval duration:        1s",
        "eval rate:            20.00 tokens/s",
    ]


def test_set_parameter_types():
    assert parse_parameter("num_predict", ["5"]) == 5
    assert parse_parameter("temperature", ["0.2"]) == 0.2
    assert parse_parameter("stop", ["<a>", "<b>"]) == ["<a>", "<b>"]
    assert parse_parameter("use_mmap", ["true"]) is True
    for name, value, message in (("num_predict", "x", "invalid int value [x]"),
                                 ("top_p", "y", "invalid float value [y]"),
                                 ("nope", "1", "unknown parameter 'nope'")):
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_parameter(name, [value])


def test_processor_column():
    assert processor(100, 0) == "100% CPU"
    assert processor(100, 100) == "100% GPU"
    assert processor(100, 25) == "75%/25% CPU/GPU"


def test_answer_writer_wraps_at_words():
    out = io.StringIO()
    writer = AnswerWriter(out, width=25)                # 20 columns of text
    for chunk in ["The quick brown", " fox jumps over", " the lazy dog.\nNext line"]:
        writer.write(chunk)
    assert writer.finish() == "The quick brown fox jumps over the lazy dog.\nNext line"
    lines = out.getvalue().split("\n")
    assert all(len(line) <= 20 for line in lines)
    assert " ".join(w for line in lines for w in line.split()) == "The quick brown fox jumps over the lazy dog. Next line"


def test_answer_writer_passes_through_without_wrap():
    out = io.StringIO()
    writer = AnswerWriter(out, wrap=False, width=25)
    writer.write("a" * 60)
    assert writer.finish() == out.getvalue() == "a" * 60


def test_progress_lines_off_a_terminal(capsys):
    digest = "sha256:" + "ab" * 32
    last = show_progress(iter([
        {"status": "pulling manifest"},
        {"status": "pulling abab", "digest": digest, "total": 100, "completed": 0},
        {"status": "pulling abab", "digest": digest, "total": 100, "completed": 100},
        {"status": "verifying sha256 digest"},
        {"status": "success"},
    ]))
    assert last == {"status": "success"}
    assert capsys.readouterr().err.splitlines() == [
        "pulling manifest", "pulling abababababab: 100% 100 bytes", "verifying sha256 digest", "success"]


def test_a_pull_that_goes_quiet_still_says_where_it_stands(capsys):
    """A built-in pull sends no byte counts while pip downloads (seconds); off a terminal a
    line a second still says where it stands (issue 17)."""
    digest = "sha256:" + "cd" * 32

    def events():
        yield {"status": "pulling manifest"}
        yield {"status": "pulling cdcd", "digest": digest, "total": 100, "completed": 0}
        time.sleep(2.6)        # the server is downloading from PyPI: nothing arrives
        yield {"status": "pulling cdcd", "digest": digest, "total": 100, "completed": 100}
        yield {"status": "success"}

    show_progress(events())
    lines = capsys.readouterr().err.splitlines()
    waits = [line for line in lines if line.startswith("shoal: pulling cdcdcdcdcdcd: 0% of 100 bytes [")]
    assert len(waits) >= 2, lines
    assert lines[-1] == "success"


def test_the_held_back_word_is_dropped_after_ctrl_c():
    """Ctrl-C mid-answer: nothing more prints, and the answer kept is what was shown."""
    out = io.StringIO()
    writer = AnswerWriter(out, wrap=True, width=40)
    writer.write("Hello there, gene")
    assert writer.finish(interrupted=True) == "Hello there, " == out.getvalue()


def test_serve_help_explains_every_flag():
    import subprocess
    import sys

    shown = subprocess.run([sys.executable, "-m", "shoal", "serve", "--help"], capture_output=True,
                           text=True, timeout=120, check=True).stdout
    assert "fast: int8 kernels (default); exact: float weights" in " ".join(shown.split())
    assert "--pid-file" in shown and "--verbose" in shown


def test_api_error_kinds():
    assert ErrorReply(404, "POST /api/pull: no such endpoint").missing_endpoint
    assert ErrorReply(501, "this server has no model store").missing_endpoint
    missing_model = ErrorReply(404, "model 'x' not found")
    assert missing_model.not_found and not missing_model.missing_endpoint


def test_the_auto_started_server_logs_to_a_rotated_file(tmp_path, monkeypatch):
    """`shoal run` starts `shoal serve --log-file ~/.shoal/logs/server.log`: the server rotates it."""
    import subprocess

    from shoal.cli import client as cli_client

    started = {}

    class FakeProcess:
        pid = 4242

    def fake_popen(args, **kwargs):
        started["args"] = args
        return FakeProcess()

    monkeypatch.setenv("SHOAL_HOME", str(tmp_path))
    monkeypatch.setattr(subprocess, "Popen", fake_popen)
    monkeypatch.setattr(cli_client, "_wait_ready", lambda *args: None)

    class FakeClient:
        host = parse_host("127.0.0.1:1")

        def heartbeat(self, timeout: float = 1.0) -> bool:
            return False

    cli_client.start_server(FakeClient())
    args = started["args"]
    assert args[args.index("--log-file") + 1] == str(tmp_path / "logs" / "server.log")
