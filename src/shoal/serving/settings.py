"""Server settings and their SHOAL_* environment variables (docs/operations.md mirrors both tables)."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields

from shoal.access.auth import ADMIN_KEY_MIN_LENGTH, AUTH_MODES
from shoal.core.config import parse_bytes
from shoal.core.errors import InvalidParameterError
from shoal.serving.durations import parse_keep_alive
from shoal.store.egress import EgressPolicy

# The Ollama port: clients that default to Ollama (the ollama SDK, Open WebUI) find shoal
# without configuration. `shoal serve --port` or SHOAL_PORT when Ollama itself runs here.
DEFAULT_PORT = 11434

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")     # RFC 9110's token
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

# name -> (ServerSettings field, description)
SERVER_ENV_VARS: dict[str, tuple[str, str]] = {
    "SHOAL_HOST": ("host", "Address to listen on, 'host' or 'host:port' (default 127.0.0.1)."),
    "SHOAL_PORT": ("port", f"Port to listen on (default {DEFAULT_PORT}, Ollama's)."),
    "SHOAL_SERVED_MODEL_NAME": ("served_model_name", "Name clients use for the model several comma-separated, the first reported (default: 'smollm2:135m' for the default model, else the file or directory name)."),
    "SHOAL_MAX_QUEUE": ("max_queue", "Interactive requests (anonymous ones included) allowed to wait per model beyond the running batch before new ones get 503 + Retry-After (default 256)."),
    "SHOAL_MAX_QUEUE_BATCH": ("max_queue_batch", "Batch-class requests allowed to wait per model beyond the running batch before new ones get 503 + Retry-After (default 256)."),
    "SHOAL_MAX_QUEUED_TOKENS": ("max_queued_tokens", "Prompt tokens allowed to wait per model, both classes together, before new requests get 503 + Retry-After; a request that finds a free slot is never refused by it (default 1000000)."),
    "SHOAL_QUEUE_TIMEOUT": ("queue_timeout", "How long a request may wait to be scheduled before it is dropped with 503 + Retry-After: seconds or '2m'; 0 or negative = no limit (default 60s)."),
    "SHOAL_BATCH_AGING": ("batch_aging", "After waiting this long a batch request is owed a share of admissions (one in four while interactive requests wait), so it cannot starve: seconds or '1m'; negative = never (default 30s)."),
    "SHOAL_MAX_PROMPT_TOKENS": ("max_prompt_tokens", "Largest prompt accepted, in tokens; larger gets 400 (default 0: only the context length limits it)."),
    "SHOAL_MAX_TOKENS": ("max_tokens", "Largest max_tokens / num_predict accepted; larger gets 400, and a request that sets none gets at most this many (default 0: no cap)."),
    "SHOAL_DRAIN_TIMEOUT": ("drain_timeout", "On SIGTERM or SIGINT, how long running requests may finish before they are aborted and the server exits: seconds or '1m'; negative = wait for all (default 30s)."),
    "SHOAL_MAX_BODY_BYTES": ("max_body_bytes", "Largest request body accepted; larger gets 413 (default 16MiB)."),
    "SHOAL_READ_TIMEOUT": ("read_timeout", "How long a client may take to send a request's headers, and then its body, before the connection is closed (408 for a late body; blob uploads excepted; default 60s)."),
    "SHOAL_LOG_LEVEL": ("log_level", "Logging level: debug, info, warning, error (default info)."),
    "SHOAL_KEEP_ALIVE": ("keep_alive", "How long an idle model stays loaded: '5m', '1h', seconds, 0 (unload when idle) or negative (never); a request's keep_alive overrides it (default 5m)."),
    "SHOAL_MAX_LOADED_MODELS": ("max_loaded_models", "Most models loaded at once; idle ones unload first to make room (default 3)."),
    "SHOAL_MEMORY_BUDGET": ("memory_budget", "Memory for loaded models (weights + reserved KV cache), e.g. '16GiB' (default: 75% of RAM)."),
    "SHOAL_LOAD_TIMEOUT": ("load_timeout", "How long a request waits for room to load its model before 503 (default 5m)."),
    "SHOAL_AUTH": ("auth", "API keys: 'auto' (required unless listening on loopback only; default), 'on' or 'off'."),
    "SHOAL_KEYS_DB": ("keys_db", "The API keys database `shoal keys` manages (default $SHOAL_HOME/keys.db, SHOAL_HOME being ~/.shoal)."),
    "SHOAL_ADMIN_KEY": ("admin_key", "An admin key kept outside the keys DB (at least 16 characters), e.g. for automation that creates the keys."),
    "SHOAL_METRICS_AUTH": ("metrics_auth", "Whether GET /metrics needs an API key when keys are required (it names models and key ids): 'auto' (default) or 1: yes; 0: open, like /health."),
    "SHOAL_LOG_FORMAT": ("log_format", "Log lines as 'text' (default) or 'json' (one object per line); either way each request gets an access line with its request id."),
    "SHOAL_AUDIT_LOG": ("audit_log", "File the audit log is appended to: a JSON line per model request, refused ones included (default: no audit log)."),
    "SHOAL_AUDIT_CONTENT": ("audit_content", "Also write prompt and completion text to the audit log (default 0: token counts only)."),
    "SHOAL_AUDIT_MAX_BYTES": ("audit_max_bytes", "Size at which the audit log rotates to PATH.1 (default 100MiB; 0 = never)."),
    "SHOAL_AUDIT_BACKUPS": ("audit_backups", "Rotated audit files kept, PATH.1 .. PATH.N (default 5)."),
    "SHOAL_OTEL": ("otel", "OpenTelemetry traces of model requests, 1 or 0 (default: on when OTEL_EXPORTER_OTLP_ENDPOINT is set; needs the 'otel' extra)."),
    "SHOAL_ORIGINS": ("origins", "Browser origins allowed besides localhost's (comma-separated, '*' wildcards, as OLLAMA_ORIGINS)."),
    "SHOAL_REGISTRY_ALLOW": ("registry_allow", "Registries a pull or push may reach on a private, loopback or CGNAT address: comma-separated host or host:port (IPv6 as [addr]:port), e.g. 127.0.0.1:5000,registry.lan (default: none; link-local and cloud metadata addresses are refused always)."),
    "SHOAL_ALLOW_LOCAL_PATHS": ("allow_local_paths", "1: /api/create may read FROM / ADAPTER paths on the server's disk (with keys required, admin keys only); 0: only uploaded blobs, as `shoal create` sends them (default 1)."),
    "SHOAL_MAX_BLOB_BYTES": ("max_blob_bytes", "Largest blob upload (POST /api/blobs) accepted; larger gets 413 (default 64GiB: above Hugging Face's 50 GB per-file cap, so any single GGUF or safetensors file fits)."),
    "SHOAL_ALLOWED_HOSTS": ("allowed_hosts", "Host names the server answers to besides localhost, *.localhost, *.internal, *.local, this machine's name and IP addresses (comma-separated, '*.example.com' wildcards; '*' = any). Checked when listening on loopback (against DNS rebinding), or whenever set."),
    "SHOAL_MAX_CONNECTIONS": ("max_connections", "Open client connections allowed at once; a request on a connection beyond it gets 503 + Retry-After (default 1024; lowered to fit the process's open-file limit)."),
    "SHOAL_LOG_FILE": ("log_file", "Write the server's log to this file instead of stderr, rotated by size (`shoal serve --log-file`; the auto-started server logs to $SHOAL_HOME/logs/server.log)."),
    "SHOAL_LOG_MAX_BYTES": ("log_max_bytes", "Size at which SHOAL_LOG_FILE rotates to FILE.1 (default 10MiB; 0 = never)."),
    "SHOAL_LOG_BACKUPS": ("log_backups", "Rotated log files kept, FILE.1 .. FILE.N (default 3)."),
    "SHOAL_MAX_EMBEDDING_INPUTS": ("max_embedding_inputs", "Most inputs one embedding request may carry (/v1/embeddings, /api/embed); more gets 400 naming the limit (default 2048, OpenAI's)."),
    "SHOAL_REPLICAS": ("replicas", "Engine replicas on Ray behind this one front (`serve --replicas`; docs/scale-out.md); 0 = the in-process engine, no Ray (default 0)."),
    "SHOAL_RAY": ("use_ray", "1: serve through Ray replicas even with SHOAL_REPLICAS unset (one replica), e.g. to measure the hop (default 0)."),
    "SHOAL_RAY_ADDRESS": ("ray_address", "Ray cluster to join ('auto', 'host:6379', 'ray://...'); implies replicas (default: RAY_ADDRESS, else a local cluster of this machine)."),
    "SHOAL_REPLICA_CPUS": ("replica_cpus", "Ray CPUs per replica, also its torch threads (at least 1) (default 1)."),
    "SHOAL_REPLICA_GPUS": ("replica_gpus", "Ray GPUs per replica; > 0 runs the replica on CUDA (default 'auto': 1 when the Ray cluster has GPUs, and then one replica per GPU unless SHOAL_REPLICAS is set; else 0)."),
    "SHOAL_ROUTING": ("routing", "How the front picks a replica: cache_aware (the replica holding the prompt's prefix blocks, unless load is imbalanced), least_loaded or round_robin (default cache_aware)."),
    "SHOAL_SESSION_HEADER": ("session_header", "Request header whose value keeps a session on one replica while it is up and not overloaded (session affinity; 'off' = none) (default X-Session-ID)."),
    "SHOAL_REPLICA_HANG_TIMEOUT": ("replica_hang_timeout", "A replica whose engine loop makes no progress this long (or whose process stays silent this long while requests wait on it) is treated as dead: killed and restarted, its waiting requests retried elsewhere; longer than the slowest engine step; 0 or negative = never (default 60s)."),
}


@dataclass(slots=True)
class ServerSettings:
    """How the HTTP server listens and how much it admits."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    served_model_name: str | None = None
    max_queue: int = 256
    max_queue_batch: int = 256
    max_queued_tokens: int = 1_000_000
    queue_timeout: float | str = 60.0
    batch_aging: float | str = 30.0
    max_prompt_tokens: int = 0
    max_tokens: int = 0
    drain_timeout: float | str = 30.0
    max_body_bytes: int | str = 16 << 20
    read_timeout: float | str = 60.0
    log_level: str = "info"
    keep_alive: float | str = 300.0
    max_loaded_models: int = 3
    memory_budget: int | str | None = None
    load_timeout: float | str = 300.0
    auth: str = "auto"
    keys_db: str | None = None
    admin_key: str | None = field(default=None, repr=False)
    metrics_auth: bool | str = "auto"   # "auto", True or False once checked
    log_format: str = "text"
    audit_log: str | None = None
    audit_content: bool = False
    audit_max_bytes: int | str = 100 << 20
    audit_backups: int = 5
    otel: bool | None = None            # None: on when OTEL_EXPORTER_OTLP_ENDPOINT is set
    origins: str | None = None
    registry_allow: str | None = None   # parsed by registry_egress
    allow_local_paths: bool | str = True
    max_blob_bytes: int | str = 64 << 30
    allowed_hosts: str | None = None
    max_connections: int = 1024
    log_file: str | None = None
    log_max_bytes: int | str = 10 << 20
    log_backups: int = 3
    max_embedding_inputs: int = 2048
    replicas: int = 0
    use_ray: bool = False
    ray_address: str | None = None
    replica_cpus: float | str = 1.0
    replica_gpus: float | str | None = None     # None: 1 per replica when Ray reports GPUs, else 0
    routing: str = "cache_aware"
    session_header: str = "X-Session-ID"
    replica_hang_timeout: float | str = 60.0

    @property
    def replicated(self) -> bool:
        """Whether the engine runs as replicas on Ray (else in this process, without Ray)."""
        return self.replicas > 0 or self.use_ray or bool(self.ray_address)

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
        self.queue_timeout = _seconds("queue_timeout", self.queue_timeout) or math.inf
        self.batch_aging = _seconds("batch_aging", self.batch_aging)
        self.drain_timeout = _seconds("drain_timeout", self.drain_timeout)
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
        for name in ("max_queue", "max_queue_batch", "max_queued_tokens", "max_prompt_tokens",
                     "max_tokens"):
            if getattr(self, name) < 0:
                raise InvalidParameterError(name, "must be >= 0")
        self.log_format = self.log_format.strip().lower()
        if self.log_format not in ("text", "json"):
            raise InvalidParameterError("log_format", f"must be 'text' or 'json', got {self.log_format!r}")
        try:
            self.audit_max_bytes = parse_bytes(self.audit_max_bytes)
        except InvalidParameterError as exc:
            raise InvalidParameterError("audit_max_bytes", exc.message) from None
        if self.audit_backups < 0:
            raise InvalidParameterError("audit_backups", "must be >= 0")
        if isinstance(self.allow_local_paths, str):
            self.allow_local_paths = self.allow_local_paths.strip().lower() in ("1", "true", "yes", "on")
        try:
            self.max_blob_bytes = parse_bytes(self.max_blob_bytes)
        except InvalidParameterError as exc:
            raise InvalidParameterError("max_blob_bytes", exc.message) from None
        if self.max_connections < 1:
            raise InvalidParameterError("max_connections", "must be at least 1")
        try:
            self.log_max_bytes = parse_bytes(self.log_max_bytes)
        except InvalidParameterError as exc:
            raise InvalidParameterError("log_max_bytes", exc.message) from None
        if self.log_backups < 0:
            raise InvalidParameterError("log_backups", "must be >= 0")
        if self.max_embedding_inputs < 1:
            raise InvalidParameterError("max_embedding_inputs", "must be at least 1")
        self._check_auth()
        self._check_replicas()
        try:        # a bad SHOAL_REGISTRY_ALLOW fails at start, not at the first pull
            EgressPolicy.parse(self.registry_allow)
        except ValueError as exc:
            raise InvalidParameterError("registry_allow", f"SHOAL_REGISTRY_ALLOW: {exc}") from None

    @property
    def registry_egress(self) -> EgressPolicy:
        """Where pulls and pushes may connect (store/egress.py); SHOAL_REGISTRY_ALLOW widens it."""
        return EgressPolicy.parse(self.registry_allow)

    def _check_replicas(self) -> None:
        if self.replicas < 0:
            raise InvalidParameterError("replicas", "must be >= 0")
        if isinstance(self.replica_gpus, str) and self.replica_gpus.strip().lower() == "auto":
            self.replica_gpus = None
        for name in ("replica_cpus", "replica_gpus"):
            if getattr(self, name) is None:
                continue
            try:
                value = float(getattr(self, name))
            except ValueError:
                raise InvalidParameterError(name, f"expected a number, got {getattr(self, name)!r}") from None
            if not 0 <= value < math.inf or (name == "replica_cpus" and value == 0):
                raise InvalidParameterError(name, f"must be a positive number, got {value}")
            setattr(self, name, value)
        self.replica_hang_timeout = _seconds("replica_hang_timeout", self.replica_hang_timeout)
        header = self.session_header.strip()
        self.session_header = "" if header.lower() in ("", "off", "none", "0") else header
        if self.session_header and not _HEADER_NAME.fullmatch(self.session_header):
            raise InvalidParameterError("session_header", f"SHOAL_SESSION_HEADER must be a header name or "
                                        f"'off', got {header!r}")
        from shoal.serving.replicas.routing import POLICIES

        self.routing = self.routing.strip().lower()
        if self.routing not in POLICIES:
            raise InvalidParameterError("routing", f"SHOAL_ROUTING must be one of {', '.join(POLICIES)}, "
                                        f"got {self.routing!r}")

    def _check_auth(self) -> None:
        self.auth = self.auth.strip().lower()
        if self.auth not in AUTH_MODES:
            raise InvalidParameterError("auth", f"SHOAL_AUTH must be one of {', '.join(AUTH_MODES)}, "
                                        f"got {self.auth!r}")
        if self.admin_key is not None and len(self.admin_key) < ADMIN_KEY_MIN_LENGTH:
            raise InvalidParameterError("admin_key", f"SHOAL_ADMIN_KEY must be at least "
                                        f"{ADMIN_KEY_MIN_LENGTH} characters")
        if isinstance(self.metrics_auth, str):
            word = self.metrics_auth.strip().lower()
            if word not in _TRUE | _FALSE | {"auto"}:
                raise InvalidParameterError("metrics_auth", f"SHOAL_METRICS_AUTH must be auto, 1 or 0, "
                                            f"got {self.metrics_auth!r}")
            self.metrics_auth = "auto" if word == "auto" else word in _TRUE

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
            if types[name] in ("bool", "bool | None"):
                values[name] = raw.strip().lower() in _TRUE
            elif types[name] == "int":
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
