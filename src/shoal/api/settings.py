"""Server settings and their SHOAL_* environment variables (docs/operations.md mirrors both tables)."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

from shoal.config import parse_bytes
from shoal.errors import InvalidParameterError

# The Ollama port: clients that default to Ollama (the ollama SDK, Open WebUI) find shoal
# without configuration. `shoal serve --port` or SHOAL_PORT when Ollama itself runs here.
DEFAULT_PORT = 11434

# name -> (ServerSettings field, description)
SERVER_ENV_VARS: dict[str, tuple[str, str]] = {
    "SHOAL_HOST": ("host", "Address to listen on, 'host' or 'host:port' (default 127.0.0.1)."),
    "SHOAL_PORT": ("port", f"Port to listen on (default {DEFAULT_PORT}, Ollama's)."),
    "SHOAL_SERVED_MODEL_NAME": ("served_model_name", "Name clients use for the model several comma-separated, the first reported (default: 'smollm2:135m' for the default model, else the file or directory name)."),
    "SHOAL_MAX_QUEUE": ("max_queue", "Requests allowed to wait beyond the running batch before new ones get 503 + Retry-After (default 256)."),
    "SHOAL_MAX_BODY_BYTES": ("max_body_bytes", "Largest request body accepted; larger gets 413 (default 16MiB)."),
    "SHOAL_READ_TIMEOUT": ("read_timeout", "How long a client may take to send a request's headers, and then its body, before the connection is closed (408 for a late body; blob uploads excepted; default 60s)."),
    "SHOAL_LOG_LEVEL": ("log_level", "Logging level: debug, info, warning, error (default info)."),
    "SHOAL_KEEP_ALIVE": ("keep_alive", "How long an idle model stays loaded: '5m', '1h', seconds, 0 (unload when idle) or negative (never); a request's keep_alive overrides it (default 5m)."),
    "SHOAL_MAX_LOADED_MODELS": ("max_loaded_models", "Most models loaded at once; idle ones unload first to make room (default 3)."),
    "SHOAL_MEMORY_BUDGET": ("memory_budget", "Memory for loaded models (weights + reserved KV cache), e.g. '16GiB' (default: 75% of RAM)."),
    "SHOAL_LOAD_TIMEOUT": ("load_timeout", "How long a request waits for room to load its model before 503 (default 5m)."),
}


@dataclass(slots=True)
class ServerSettings:
    """How the HTTP server listens and how much it admits."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    served_model_name: str | None = None
    max_queue: int = 256
    max_body_bytes: int | str = 16 << 20
    read_timeout: float | str = 60.0
    log_level: str = "info"
    keep_alive: float | str = 300.0
    max_loaded_models: int = 3
    memory_budget: int | str | None = None
    load_timeout: float | str = 300.0

    def __post_init__(self) -> None:
        # SHOAL_HOST=0.0.0.0:8000 (as OLLAMA_HOST accepts); a bare IPv6 address has several ':'
        host = self.host.removeprefix("http://")
        if host.count(":") == 1:
            name, _, port = host.partition(":")
            if not port.isdigit():
                raise InvalidParameterError("host", f"bad port in {self.host!r}")
            host, self.port = name or "127.0.0.1", int(port)
        self.host = host
        self.max_body_bytes = parse_bytes(self.max_body_bytes)
        self.keep_alive = _seconds("keep_alive", self.keep_alive)
        self.load_timeout = _seconds("load_timeout", self.load_timeout)
        raw_read_timeout, self.read_timeout = self.read_timeout, _seconds("read_timeout", self.read_timeout)
        if not 0 < self.read_timeout < float("inf"):
            raise InvalidParameterError("read_timeout", f"must be a positive duration, got {raw_read_timeout!r}")
        if self.memory_budget is None:
            self.memory_budget = int(_total_memory() * 0.75)
        self.memory_budget = parse_bytes(self.memory_budget)
        if self.max_loaded_models < 1:
            raise InvalidParameterError("max_loaded_models", "must be at least 1")
        if not 0 < int(self.port) < 65536:
            raise InvalidParameterError("port", f"must be in 1..65535, got {self.port}")
        if self.max_queue < 0:
            raise InvalidParameterError("max_queue", "must be >= 0")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> "ServerSettings":
        """Defaults, then SHOAL_* variables, then explicit overrides (None = not given)."""
        env = os.environ if environ is None else environ
        types = {f.name: str(f.type) for f in fields(cls)}
        values: dict[str, object] = {}
        for var, (name, _doc) in SERVER_ENV_VARS.items():
            raw = env.get(var, "")
            if raw == "":
                continue
            if types[name] == "int":
                try:
                    values[name] = int(raw)
                except ValueError:
                    raise InvalidParameterError(name, f"{var}: expected an integer, got {raw!r}") from None
            else:
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


def _seconds(field: str, value: float | str) -> float:
    """A duration setting: seconds, or Ollama's forms ('5m', '1h30m', negative = forever)."""
    from shoal.api.ollama.protocol import parse_keep_alive

    try:
        seconds = parse_keep_alive(value)
    except InvalidParameterError as exc:
        raise InvalidParameterError(field, exc.message) from None
    return 300.0 if seconds is None else seconds


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 16 << 30
