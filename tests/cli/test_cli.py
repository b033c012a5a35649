"""The `shoal` command line against a real server: `python -m shoal ...` subprocesses, the
interactive chat through a pseudo-terminal (pexpect), and one auto-started server."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from live_server import free_port

pexpect = pytest.importorskip("pexpect")

# Answers are bounded (shoal's `run -p NAME VALUE`) so the file stays quick on two cores.
SHORT = ["-p", "num_predict", "12", "-p", "temperature", "0"]


def shoal(*args: str, url: str, home: Path, stdin: str | None = None, timeout: float = 240,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "SHOAL_HOST": url, "SHOAL_HOME": str(home), "SHOAL_NO_AUTOSTART": "1",
                "TERM": "dumb", **(env or {})}
    return subprocess.run([sys.executable, "-m", "shoal", *args], input=stdin,
                          stdin=None if stdin is not None else subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def assert_clean_failure(result: subprocess.CompletedProcess, *needles: str,
                         progress: tuple[str, ...] = ()) -> None:
    """Exit 1, one line on stderr (after the `progress` status lines, if any), no traceback.
    The lines a second saying what the command waits on (`shoal: ... [3 s]`) are left out."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and not re.match(r"^shoal: .* \[\d+ s\]$", line)]
    assert tuple(lines[:-1]) == progress, result.stderr
    assert lines[-1].startswith("shoal: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    return tmp_path / "shoal-home"


def timing(stderr: str) -> dict[str, float]:
    """Ollama's --verbose block as numbers (durations in seconds)."""
    units = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

    def seconds(text: str) -> float:
        return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ns|µs|us|ms|s|m|h)", text))

    out: dict[str, float] = {}
    for line in stderr.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        value = value.strip()
        if key.endswith("duration"):
            out[key] = seconds(value)
        elif key.endswith("count"):
            out[key] = float(value.split()[0])
        elif key.endswith("rate"):
            out[key] = float(value.split()[0])
    return out


# ---- one-shot run --------------------------------------------------------------------------------

def test_run_prompt_argument_verbose(shoal_server, home):
    result = shoal("run", "smollm2", "Name", "a", "colour.", *SHORT, "--verbose", url=shoal_server.url, home=home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    stats = timing(result.stderr)
    for key in ("total duration", "load duration", "prompt eval count", "prompt eval duration",
                "prompt eval rate", "eval count", "eval duration", "eval rate"):
        assert key in stats, result.stderr
    assert 5 < stats["prompt eval count"] < 200
    assert 1 <= stats["eval count"] <= 12
    assert 0 < stats["eval duration"] < stats["total duration"] < 120
    assert stats["prompt eval rate"] > 0 and stats["eval rate"] > 0
    assert abs(stats["eval rate"] - stats["eval count"] / stats["eval duration"]) < 0.02 * stats["eval rate"] + 0.01


def test_run_piped_stdin(shoal_server, home):
    result = shoal("run", "smollm2", *SHORT, url=shoal_server.url, home=home,
                   stdin="What is the capital of France?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "total duration" not in result.stderr          # no --verbose, no timings


# ---- what is there ------------------------------------------------------------------------------

def test_list(shoal_server, home):
    result = shoal("list", url=shoal_server.url, home=home)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    row = next(r for r in rows if r.startswith("smollm2:135m "))
    name, digest, size, unit, *modified = row.split()
    assert re.fullmatch(r"[0-9a-f]{12}", digest)
    assert unit == "MB" and 50 < int(size) < 200
    assert " ".join(modified).endswith("ago")
    assert shoal("ls", "nothing-like-this", url=shoal_server.url, home=home).stdout.splitlines()[1:] == []


def test_ps_pinned_model(shoal_server, home):
    result = shoal("ps", url=shoal_server.url, home=home)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    row = next(r for r in rows if r.startswith("smollm2:135m "))
    assert "100% CPU" in row
    assert "2048" in row.split()
    assert row.rstrip().endswith("Forever")


def test_show_summary_and_flags(shoal_server, home):
    url = shoal_server.url
    summary = shoal("show", "smollm2", url=url, home=home)
    assert summary.returncode == 0, summary.stderr
    for needle in ("Model", "architecture", "llama", "parameters", "134.52M", "context length", "8192",
                   "quantization", "Q4_1", "Capabilities", "completion", "License", "apache-2.0"):
        assert needle in summary.stdout, summary.stdout
    assert shoal("show", "smollm2", "--modelfile", url=url, home=home).stdout.count("FROM ") == 1
    assert "<|im_start|>" in shoal("show", "smollm2", "--template", url=url, home=home).stdout
    assert shoal("show", "smollm2", "--license", url=url, home=home).stdout.strip() == "apache-2.0"
    for flag in ("--parameters", "--system"):
        assert shoal("show", "smollm2", flag, url=url, home=home).returncode == 0
    verbose = shoal("show", "smollm2", "-v", url=url, home=home)
    assert "Metadata" in verbose.stdout and "llama.block_count" in verbose.stdout
    assert_clean_failure(shoal("show", "smollm2", "--license", "--template", url=url, home=home), "only one of")


# ---- failures ----------------------------------------------------------------------------------------

def test_unknown_model_hints_pull(shoal_server, home):
    # The server may or may not have /api/pull yet; either way the answer is one clear line.
    result = shoal("run", "no-such-model", "hi", url=shoal_server.url, home=home)
    # NOTE: as Ollama's, the pull says "pulling manifest" before the registry says no.
    assert_clean_failure(result, "no-such-model", "shoal pull no-such-model", progress=("pulling manifest",))
    assert_clean_failure(shoal("show", "no-such-model", url=shoal_server.url, home=home),
                         "model 'no-such-model' not found", "shoal pull no-such-model")
    assert_clean_failure(shoal("stop", "no-such-model", url=shoal_server.url, home=home),
                         "couldn't find model \"no-such-model\" to stop")


def test_unreachable_server(home):
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["run", "smollm2", "hi"], ["list"], ["ps"], ["show", "smollm2"]):
        result = shoal(*args, url=url, home=home)
        assert_clean_failure(result, "could not connect to a shoal server at " + url, "shoal serve")
    assert "SHOAL_NO_AUTOSTART" in shoal("run", "smollm2", "hi", url=url, home=home).stderr


def test_create_list_show_cp_rm(shoal_server, home, tmp_path, smollm2_path):
    """The store through the command line: a Modelfile with a relative FROM (resolved beside
    the Modelfile, whose absolute path is sent), then list, show, cp and rm."""
    url = shoal_server.url
    folder = tmp_path / "modelfile-dir"
    folder.mkdir()
    (folder / "weights.gguf").symlink_to(smollm2_path)
    (folder / "Modelfile").write_text('FROM ./weights.gguf\nPARAMETER num_predict 3\nSYSTEM """Be terse."""\n')
    created = subprocess.run([sys.executable, "-m", "shoal", "create", "cli-made"], cwd=folder, capture_output=True,
                             text=True, timeout=120, stdin=subprocess.DEVNULL,
                             env={**os.environ, "SHOAL_HOST": url, "SHOAL_HOME": str(home),
                                  "SHOAL_NO_AUTOSTART": "1"})
    assert created.returncode == 0, created.stderr
    assert created.stderr.splitlines()[-1] == "success"
    try:
        assert "cli-made:latest" in shoal("list", url=url, home=home).stdout
        assert shoal("show", "cli-made", "--parameters", url=url, home=home).stdout.split() == ["num_predict", "3"]
        assert shoal("show", "cli-made", "--system", url=url, home=home).stdout.strip() == "Be terse."
        copied = shoal("cp", "cli-made", "cli-copy", url=url, home=home)
        assert copied.returncode == 0 and "copied 'cli-made' to 'cli-copy'" in copied.stdout
        assert "cli-copy:latest" in shoal("list", url=url, home=home).stdout
    finally:
        removed = shoal("rm", "cli-made", "cli-copy", url=url, home=home)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.splitlines() == ["deleted 'cli-made'", "deleted 'cli-copy'"]
    listed = shoal("list", url=url, home=home).stdout
    assert "cli-made" not in listed and "cli-copy" not in listed

    assert_clean_failure(shoal("rm", "cli-made", url=url, home=home), "cli-made")
    assert_clean_failure(shoal("cp", "no-such-model", "x", url=url, home=home), "no-such-model")
    assert_clean_failure(shoal("create", "cli-x", "-f", str(tmp_path / "missing"), url=url, home=home),
                         "no Modelfile at")
    assert_clean_failure(shoal("pull", "no-such-model-anywhere", url=url, home=home), "no-such-model-anywhere",
                         progress=("pulling manifest",))


# ---- stop ----------------------------------------------------------------------------------------

def test_stop_leaves_the_pinned_model_loaded(shoal_server, home):
    # NOTE: the server's --model is pinned: nobody's keep_alive 0 unloads it (issue 13); an
    # unpinned model's stop is test_api_lifecycle's keep_alive 0.
    url = shoal_server.url
    result = shoal("stop", "smollm2", url=url, home=home)
    assert result.returncode == 0, result.stderr
    time.sleep(1.0)
    assert "smollm2:135m" in shoal("ps", url=url, home=home).stdout
    again = shoal("run", "smollm2", "Say hi.", *SHORT, "--verbose", url=url, home=home)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip()


# ---- the interactive chat -----------------------------------------------------------------------------

def _running(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(float(m) for m in re.findall(r"^shoal:num_requests_running\{[^}]*\} ([\d.]+)$", text, re.M))


def _names(listing: str) -> set[str]:
    return {line.split()[0] for line in listing.splitlines()[1:] if line.strip()}


def test_interactive_chat(shoal_server, home):
    env = {**os.environ, "SHOAL_HOST": shoal_server.url, "SHOAL_HOME": str(home), "SHOAL_NO_AUTOSTART": "1",
           "TERM": "dumb"}
    # NOTE: Ctrl-C must reach the chat as at a terminal. A test run started in the background
    # of a non-interactive shell inherits SIGINT ignored (POSIX), and Python keeps an
    # ignored SIGINT ignored; the child gets the default back.
    chat = pexpect.spawn(sys.executable, ["-m", "shoal", "run", "smollm2"], env=env, encoding="utf-8",
                         timeout=60, dimensions=(40, 200),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = open(home.parent / "chat.log", "w")  # noqa: SIM115 - closed below
    chat.logfile_read = log
    try:
        def say(line: str) -> None:
            chat.sendline(line)
            chat.expect_exact(line)                           # the terminal's echo

        def turn(line: str) -> tuple[int, int]:
            """A chat turn with /set verbose on: (prompt eval count, eval count)."""
            say(line)
            chat.expect(r"prompt eval count:\s+(\d+)")
            prompt_count = int(chat.match.group(1))
            chat.expect(r"[\r\n]eval count:\s+(\d+)")
            eval_count = int(chat.match.group(1))
            chat.expect_exact(">>> ")
            return prompt_count, eval_count

        chat.expect_exact(">>> ")
        say("/set parameter num_predict 5")
        chat.expect_exact("Set parameter 'num_predict' to '5'")
        say("/set parameter temperature 0")
        chat.expect_exact(">>> ")
        say("/set verbose")
        chat.expect_exact("Set 'verbose' mode.")

        # two turns: the second request carries the first exchange
        p1, e1 = turn("My name is Zorblax.")
        assert 1 <= e1 <= 5                                   # num_predict bounds the answer
        p2, e2 = turn("What is my name?")
        assert p2 > p1 + e1 and e2 <= 5

        # /clear forgets it: the same question alone is a short prompt again
        say("/clear")
        chat.expect_exact("Cleared session context")
        p3, _ = turn("What is my name?")
        assert p3 < p2

        # """ multi-line input is one message
        say('"""First line,')
        chat.expect_exact("... ")
        assert "eval count" not in chat.before                # nothing sent yet
        p4, _ = turn('second line."""')
        assert p4 > p3                                        # one message, after the previous exchange

        # /set system replaces the model's default system prompt
        say("/set system You are a pirate.")
        chat.expect_exact("Set system message.")
        say("/show system")
        chat.expect_exact("You are a pirate.")
        say("/show parameters")
        chat.expect_exact("User defined parameters:")
        chat.expect(r"num_predict\s+5")
        chat.expect_exact(">>> ")
        say("/show info")
        chat.expect_exact("architecture")
        chat.expect_exact(">>> ")

        # /save: the session (system, parameters, messages) as a new model, via /api/create
        stored_before = _names(shoal("list", url=shoal_server.url, home=home).stdout)
        say("/save cli-saved")
        chat.expect_exact("Created new model 'cli-saved'", timeout=120)
        chat.expect_exact(">>> ")
        saved = shoal("show", "cli-saved", "--system", url=shoal_server.url, home=home)
        assert saved.stdout.strip() == "You are a pirate.", saved.stderr
        assert "num_predict" in shoal("show", "cli-saved", "--parameters", url=shoal_server.url, home=home).stdout
        assert shoal("rm", "cli-saved", url=shoal_server.url, home=home).returncode == 0
        # the store pulled the base model (smollm2) to create it: leave the shared server as it was
        for name in _names(shoal("list", url=shoal_server.url, home=home).stdout) - stored_before:
            shoal("rm", name, url=shoal_server.url, home=home)
        assert _names(shoal("list", url=shoal_server.url, home=home).stdout) == stored_before

        # Ctrl-C while an answer streams stops it and returns to the prompt
        say("/set quiet")
        chat.expect_exact(">>> ")
        say("/set parameter num_predict 1500")
        chat.expect_exact(">>> ")
        say("Tell me a very long story about a dragon and a knight.")
        chat.expect(r"[A-Za-z]{2}")                           # the answer has begun
        started = time.monotonic()
        chat.sendcontrol("c")
        chat.expect_exact(">>> ", timeout=5)
        assert time.monotonic() - started < 5
        deadline = time.monotonic() + 5
        while _running(shoal_server.url) > 0:             # the server stopped generating
            assert time.monotonic() < deadline, "the interrupted request still runs on the server"
            time.sleep(0.1)

        # Ctrl-C at an empty prompt: a hint; Ctrl-P recalls the last line (readline history)
        chat.sendcontrol("c")
        chat.expect_exact("Use Ctrl + d or /bye to exit.")
        chat.expect_exact(">>> ")
        say("/show system")
        chat.expect_exact(">>> ")
        chat.sendcontrol("p")
        chat.sendline("")
        chat.expect_exact("You are a pirate.")
        chat.expect_exact(">>> ")
        say("/bye")
        chat.expect(pexpect.EOF, timeout=10)
    finally:
        chat.close(force=True)
        log.close()
    assert chat.exitstatus == 0
    assert "My name is Zorblax." in (home / "history").read_text()


# ---- auto-start ------------------------------------------------------------------------------------

def _listening_pid(port: int) -> int | None:
    """The process listening on a loopback TCP port (from /proc, Linux)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return int(proc.name)
        except OSError:
            continue
    return None


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the server through /proc")
def test_run_autostarts_a_server_and_reuses_it(smollm2_path, home):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"SHOAL_NO_AUTOSTART": "", "SHOAL_MODEL": str(smollm2_path), "SHOAL_MAX_MODEL_LEN": "2048",
           "SHOAL_SERVED_MODEL_NAME": "smollm2:135m,smollm2",
           "SHOAL_KV_CACHE_BYTES": "128MiB", "SHOAL_LOG_LEVEL": "warning"}
    pid = None
    try:
        first = shoal("run", "smollm2", "hi", *SHORT, url=url, home=home, env=env, timeout=400)
        pid = _listening_pid(port)
        assert first.returncode == 0, (first.stderr, (home / "logs" / "server.log").read_text()[-3000:])
        assert first.stdout.strip()
        assert "starting a shoal server on " + url in first.stderr
        assert pid is not None
        assert int((home / f"server-{port}.pid").read_text()) == pid
        assert (home / "logs" / "server.log").exists()
        # detached: the server is in its own session, not the CLI's
        assert os.getsid(pid) == pid

        # issue 17: a line at least every 2 s while the server starts and loads (their
        # counters say when), each saying what it waits on
        waits = [line for line in first.stderr.splitlines() if re.match(r"shoal: .* \[\d+ s\]$", line)]
        assert waits, first.stderr
        counters = [0] + [int(re.search(r"\[(\d+) s\]$", line)[1]) for line in waits]
        assert max(b - a for a, b in zip(counters, counters[1:])) <= 2, first.stderr
        # NOTE: the model's own load (packed GGUF blocks: well under a second) may be over
        # before it earns a line of its own, so only the first wait is certain.
        assert "starting the server" in waits[0], first.stderr

        second = shoal("run", "smollm2", "hello", *SHORT, url=url, home=home, env=env, timeout=200)
        assert second.returncode == 0, second.stderr
        assert "starting" not in second.stderr
        assert _listening_pid(port) == pid

        # issue 17: `shoal server status|stop` for the server `shoal run` started
        status = shoal("server", "status", url=url, home=home, env=env)
        assert status.returncode == 0 and f"pid {pid}" in status.stdout and "ready" in status.stdout
        stop = shoal("server", "stop", url=url, home=home, env=env, timeout=120)
        assert stop.returncode == 0, stop.stderr
        assert _listening_pid(port) is None
        assert not (home / f"server-{port}.pid").exists()   # the server removed it on exit
        assert shoal("server", "status", url=url, home=home, env=env).returncode == 1
        pid = None
    finally:
        pid = pid or _listening_pid(port)
        if pid is None and (home / f"server-{port}.pid").exists():
            pid = int((home / f"server-{port}.pid").read_text())
        if pid is not None:
            _kill(pid)
