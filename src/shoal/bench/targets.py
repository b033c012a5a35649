"""The servers a run measures, parsed from `--target` specs."""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

DIALECTS = ("openai", "ollama")
_KEYS = ("name", "url", "dialect", "model", "api_key", "tokenizer")


class BenchSetupError(Exception):
    """Something that stops a run before it starts (bad flags, a target that cannot be measured)."""


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """One server as the user named it."""

    name: str
    url: str                      # base URL, no trailing slash
    dialect: str                  # "openai" | "ollama"
    model: str | None             # None: the server's only model
    api_key: str | None = None
    tokenizer: str | None = None  # a tokenizer.json, GGUF or HF directory for this target only

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def parse_target(spec: str, *, default_model: str | None, default_dialect: str) -> TargetSpec:
    """`name=...,url=...,dialect=openai|ollama,model=...[,api_key=...]`, or a bare URL."""
    spec = spec.strip()
    if "=" not in spec:
        fields = {"url": spec}
    else:
        fields = {}
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in _KEYS:
                raise BenchSetupError(f"--target {redact(spec)!r}: expected key=value pairs with keys "
                                      f"{', '.join(_KEYS)}; got {part.strip()!r}")
            fields[key] = value.strip()
    url = fields.get("url", "")
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BenchSetupError(f"--target {redact(spec)!r}: url must be http(s)://host:port, got {url!r}")
    base = f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")
    dialect = fields.get("dialect") or default_dialect
    if dialect not in DIALECTS:
        raise BenchSetupError(f"--target {redact(spec)!r}: dialect must be openai or ollama, got {dialect!r}")
    return TargetSpec(name=fields.get("name") or parts.netloc, url=base, dialect=dialect,
                      model=fields.get("model") or default_model, api_key=fields.get("api_key") or None,
                      tokenizer=fields.get("tokenizer") or None)


def parse_targets(specs: list[str], *, default_model: str | None, default_dialect: str) -> list[TargetSpec]:
    targets = [parse_target(s, default_model=default_model, default_dialect=default_dialect) for s in specs]
    if not targets:
        raise BenchSetupError("give at least one --target")
    names = [t.name for t in targets]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise BenchSetupError(f"two targets are named {duplicate!r}; give each a distinct name=")
    return targets


_SECRET = re.compile(r"(api_key=)[^,\s]+")


def redact(text: str) -> str:
    """The text with every `api_key=...` value replaced (for the results' `command` and errors)."""
    return _SECRET.sub(r"\1***", text)
