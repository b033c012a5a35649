"""The command line's HTTP client of a shoal server: where it is, starting one, and errors.

Every command except `serve`, `chat`, `generate`, `model-path` and `env` talks to the server
at SHOAL_HOST (Ollama's OLLAMA_HOST rules: `host`, `host:port`, `http://host:port`; default
http://127.0.0.1:11434). Commands that need the model catalog start a background server on a
loopback address when none answers, as Ollama's desktop app does (`SHOAL_NO_AUTOSTART=1`
turns that off).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from shoal.core.version import __version__

DEFAULT_PORT = 11434

# `shoal env` lists these after the server's and the engine's variables.
CLIENT_ENV_VARS: dict[str, str] = {
    "SHOAL_HOME": "Where the command line keeps its files: logs/server.log (the auto-started server's log, rotated at SHOAL_LOG_MAX_BYTES into server.log.1 .. .N), history (the chat's input history) (default ~/.shoal).",
    "SHOAL_NO_AUTOSTART": "1: client commands never start a background server when none answers at SHOAL_HOST.",
    "SHOAL_AUTOSTART_TIMEOUT": "Seconds to wait for an auto-started server to answer (default 600; the first start may fetch the default model).",
    "SHOAL_NOHISTORY": "1: the interactive chat keeps no input history file.",
    "SHOAL_API_KEY": "The API key client commands send (Authorization: Bearer), for a server that requires keys.",
}

_LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0", "::", ""}


class CliError(Exception):
    """A failure the command line reports as one line on stderr, exit code 1."""


class ServerUnreachable(CliError):
    pass


class ErrorReply(CliError):
    """The server answered with an error status (Ollama's {"error": "..."} body)."""

    def __init__(self, status: int, message: str, path: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.path = path

    @property
    def missing_endpoint(self) -> bool:
        """The server cannot do this at all (no such endpoint in an older shoal, or 501: e.g. a
        server started with --model alone has no model store), rather than no such model."""
        if self.status in (405, 501):
            return True
        return self.status == 404 and ("no such endpoint" in self.message.lower()
                                       or self.message.strip().lower() in ("not found", "404 page not found"))

    @property
    def not_found(self) -> bool:
        return self.status == 404 and not self.missing_endpoint


def shoal_home() -> Path:
    return Path(os.environ.get("SHOAL_HOME") or Path.home() / ".shoal").expanduser()


def server_log_path() -> Path:
    return shoal_home() / "logs" / "server.log"


@dataclass(frozen=True, slots=True)
class Host:
    scheme: str
    host: str
    port: int

    @property
    def url(self) -> str:
        name = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{name}:{self.port}"

    @property
    def connect_host(self) -> str:
        """Where to connect: a wildcard listen address means this machine."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)

    @property
    def is_local(self) -> bool:
        return self.host.lower() in _LOOPBACK or self.host.startswith("127.")


def parse_host(value: str | None = None, default_port: int | None = None) -> Host:
    """SHOAL_HOST as Ollama reads OLLAMA_HOST: `host`, `host:port`, `:port`, `http://host:port`,
    `[::1]:port`. A missing port is SHOAL_PORT's, else 11434."""
    if value is None:
        value = os.environ.get("SHOAL_HOST", "")
    if default_port is None:
        raw_port = os.environ.get("SHOAL_PORT", "")
        default_port = int(raw_port) if raw_port.isdigit() else DEFAULT_PORT
    text = value.strip()
    if not text:
        return Host("http", "127.0.0.1", default_port)
    scheme = "http"
    if "://" in text:
        scheme, _, text = text.partition("://")
        scheme = scheme.lower() or "http"
    text = text.split("/", 1)[0]
    if text.count(":") > 1 and not text.startswith("["):      # a bare IPv6 address
        host, port = text, None
    else:
        parts = urlsplit(f"//{text}")
        try:
            port = parts.port
        except ValueError:
            raise CliError(f"SHOAL_HOST={value!r}: the port is not a number in 1..65535") from None
        host = parts.hostname or ""
    if port is None:
        port = 443 if scheme == "https" else default_port
    return Host(scheme, host or "127.0.0.1", port)


def _error_message(response: httpx.Response) -> str:
    try:
        body = json.loads(response.read() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError, httpx.HTTPError):
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):                         # OpenAI's shape
            err = err.get("message")
        if err:
            return str(err)
        if body.get("detail"):
            return str(body["detail"])
    text = response.text.strip() if response.is_stream_consumed else ""
    return text or f"{response.status_code} {response.reason_phrase}"


class Client:
    """A thin synchronous client of the Ollama dialect (/api/...)."""

    def __init__(self, host: Host | None = None, *, timeout: float | None = None) -> None:
        self.host = host or parse_host()
        base = f"{self.host.scheme}://" + (f"[{self.host.connect_host}]" if ":" in self.host.connect_host
                                            else self.host.connect_host) + f":{self.host.port}"
        self.base_url = base
        # NOTE: no read timeout: a request may wait for its model to load (tens of seconds).
        headers = {"User-Agent": _user_agent()}
        if os.environ.get("SHOAL_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['SHOAL_API_KEY']}"
        self._http = httpx.Client(base_url=base, timeout=httpx.Timeout(timeout, connect=5.0),
                                  headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transport ----------------------------------------------------------------------

    def _unreachable(self, exc: Exception) -> ServerUnreachable:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            if "refused" in reason.lower() or "errno 111" in reason.lower():
                reason = "connection refused"
            return ServerUnreachable(f"could not connect to a shoal server at {self.host.url} ({reason})")
        return ServerUnreachable(f"lost the connection to the shoal server at {self.host.url} ({reason})")

    def probe(self, timeout: float = 2.0) -> str:
        """'up' when GET / answers, 'down' when nothing listens, 'busy' when something accepts
        the connection but does not answer in time (a loaded server; not one to replace)."""
        try:
            return "up" if self._http.get("/", timeout=timeout).status_code < 500 else "busy"
        except (httpx.ConnectError, httpx.ConnectTimeout):
            return "down"
        except httpx.HTTPError:
            return "busy"

    def heartbeat(self, timeout: float = 2.0) -> bool:
        """True when something answers GET / (the server's liveness line)."""
        return self.probe(timeout) == "up"

    def request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if response.status_code >= 400:
            raise ErrorReply(response.status_code, _error_message(response), path)
        if not response.content:
            return None
        try:
            return response.json()
        except json.JSONDecodeError:
            return response.text

    @contextmanager
    def stream(self, method: str, path: str, body: Any = None) -> Iterator[Iterator[dict[str, Any]]]:
        """NDJSON events; an {"error": ...} line raises ErrorReply. Leaving the block (a break,
        an exception, Ctrl-C) closes the connection, which tells the server to stop."""
        try:
            with self._http.stream(method, path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ErrorReply(response.status_code, _error_message(response), path)
                yield _events(response, path)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    # ---- endpoints ----------------------------------------------------------------------

    def show(self, model: str, **extra: Any) -> dict[str, Any]:
        return self.request("POST", "/api/show", {"model": model, **extra})

    def tags(self) -> dict[str, Any]:
        return self.request("GET", "/api/tags")

    def ps(self) -> dict[str, Any]:
        return self.request("GET", "/api/ps")

    def version(self) -> dict[str, Any]:
        return self.request("GET", "/api/version")

    def has_blob(self, digest: str) -> bool:
        try:
            response = self._http.head(f"/api/blobs/{digest}")
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if response.status_code not in (200, 404):
            raise ErrorReply(response.status_code, _error_message(response), "/api/blobs")
        return response.status_code == 200

    def upload_blob(self, digest: str, chunks: Iterator[bytes], size: int) -> None:
        """POST /api/blobs/<digest> with the bytes `chunks` yields (`size` of them)."""
        try:
            response = self._http.post(f"/api/blobs/{digest}", content=chunks,
                                       headers={"Content-Length": str(size)})
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if response.status_code >= 400:
            raise ErrorReply(response.status_code, _error_message(response), "/api/blobs")


def _events(response: httpx.Response, path: str) -> Iterator[dict[str, Any]]:
    for line in response.iter_lines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            raise ErrorReply(response.status_code, f"the server sent a line that is not JSON: {line[:200]!r}",
                             path) from None
        if isinstance(event, dict) and event.get("error"):
            raise ErrorReply(500, str(event["error"]), path)
        yield event


def _user_agent() -> str:
    return f"shoal-cli/{__version__} ({sys.platform}) Python/{sys.version.split()[0]}"


# ---- auto-start ---------------------------------------------------------------------------

def autostart_disabled() -> bool:
    return os.environ.get("SHOAL_NO_AUTOSTART", "").strip().lower() in ("1", "true", "yes", "on")


def connect(autostart: bool = True) -> Client:
    """A client of the server at SHOAL_HOST; with `autostart`, one is started when none answers."""
    client = Client()
    if client.probe() != "down":
        return client
    if not autostart or autostart_disabled():
        hint = "start one with `shoal serve`" + (" (SHOAL_NO_AUTOSTART is set, so shoal did not start one)"
                                                   if autostart and autostart_disabled() else "")
        client.close()
        raise ServerUnreachable(f"could not connect to a shoal server at {client.host.url}; {hint}")
    if not client.host.is_local:
        client.close()
        raise ServerUnreachable(f"could not connect to a shoal server at {client.host.url} "
                                "(a remote host: shoal starts servers only on this machine)")
    try:
        start_server(client)
    except BaseException:
        client.close()
        raise
    return client


def start_server(client: Client) -> None:
    """Starts `python -m shoal serve` on the client's host and port, detached in its own
    session with its log in SHOAL_HOME/logs/server.log (rotated by size, the last few kept:
    server.log.1, ...), and waits until GET / answers.

    A lock file serialises concurrent starts: a second `shoal run` waits for the first one's
    server instead of starting another.
    """
    host = client.host
    log_path = server_log_path()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = shoal_home() / f"autostart-{host.port}.lock"
    with open(lock_path, "a+") as lock:
        _lock(lock)
        try:
            if client.heartbeat():
                return
            listen = host.host if host.host not in ("", "localhost") else "127.0.0.1"
            # NOTE: the server writes and rotates the log itself (SHOAL_LOG_MAX_BYTES); the
            # redirection below only catches what it prints before its logging starts.
            pid_path = shoal_home() / f"server-{host.port}.pid"
            args = [sys.executable, "-m", "shoal", "serve", "--host", listen, "--port", str(host.port),
                    "--log-file", str(log_path), "--pid-file", str(pid_path)]
            with open(log_path, "ab") as log:
                log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} shoal: starting {' '.join(args)}\n"
                          .encode())
                log.flush()
                process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True, close_fds=True, env=_server_env())
            pid_path.write_text(f"{process.pid}\n")   # the server writes it too, and removes it
            _wait_ready(client, process, log_path)
        finally:
            _unlock(lock)


def _server_env() -> dict[str, str]:
    env = dict(os.environ)
    # NOTE: the server reads SHOAL_HOST too; --host/--port already say where it listens.
    env.pop("SHOAL_HOST", None)
    env.pop("SHOAL_PORT", None)
    return env


def _wait_ready(client: Client, process: subprocess.Popen, log_path: Path) -> None:
    from shoal.cli.waiting import Waiting, server_activity

    try:
        timeout = float(os.environ.get("SHOAL_AUTOSTART_TIMEOUT", "") or 600)
    except ValueError:
        timeout = 600.0
    deadline = time.monotonic() + timeout
    print(f"shoal: starting a shoal server on {client.host.url} (log: {log_path})", file=sys.stderr,
          flush=True)
    # NOTE: until its port opens the server is importing; then /readyz says what it does
    # (downloading the model, building the CPU kernels, loading).
    with Waiting("starting the server", lambda: server_activity(client.host.url)):
        while time.monotonic() < deadline:
            code = process.poll()
            if client.heartbeat(timeout=1.0):
                return
            if code is not None:
                raise ServerUnreachable(
                    f"could not start a shoal server on {client.host.url}: it exited with code {code}"
                    f"{_last_log_line(log_path)}; see the log at {log_path}")
            time.sleep(0.25)
    raise ServerUnreachable(f"the shoal server started on {client.host.url} (pid {process.pid}) did not "
                            f"answer within {timeout:.0f}s; see the log at {log_path}")


def _last_log_line(log_path: Path) -> str:
    try:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for line in reversed(lines[-20:]):
        if line.startswith("shoal:") or "Error" in line:
            return f" ({line.strip()[:300]})"
    return ""


def _lock(handle) -> None:
    try:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    except (ImportError, OSError):
        pass


def _unlock(handle) -> None:
    try:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    except (ImportError, OSError):
        pass
