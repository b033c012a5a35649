"""One policy, one place: the TOML config file, and the effective policy the server logs.

SHOAL_CONFIG or `shoal serve --config PATH` names a TOML file with up to two tables, whose
keys are the field names of the settings they fill:

    [server]   # ServerSettings: listening, queue bounds, limits, timeouts, keep-alive, memory
    max_queue = 64
    queue_timeout = "30s"
    [engine]   # EngineConfig: model, compute, max_num_seqs, KV cache, ...
    max_num_seqs = 16

Precedence: defaults < file < SHOAL_* variables < flags. Unknown tables or keys and values
of the wrong type are errors that name them: a misspelt bound must not pass silently.
"""
from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from shoal.core.config import ENV_VARS, EngineConfig
from shoal.core.errors import InvalidParameterError, ShoalError
from shoal.serving.settings import SERVER_ENV_VARS, ServerSettings

CONFIG_ENV_VAR = "SHOAL_CONFIG"
CONFIG_ENV_DOC = ("A TOML file with [server] and [engine] tables of settings (their field names); "
                  "SHOAL_* variables and flags override it.")

# table -> (settings class, its SHOAL_* variables)
_TABLES: dict[str, tuple[type, Mapping[str, tuple[str, str]]]] = {
    "server": (ServerSettings, SERVER_ENV_VARS),
    "engine": (EngineConfig, ENV_VARS),
}
_SECRET = re.compile(r"(^|_)(key|keys|secret|password|token)$")
# NOTE: EngineConfig parses a size string ("2GiB") here, though its type says int.
_SIZE_STRINGS = {("engine", "kv_cache_bytes")}


class ConfigFileError(ShoalError):
    """The config file is unreadable, not TOML, or names unknown keys or wrong types."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"config file {path}: {problem}")


@dataclass(slots=True)
class ServeConfig:
    """What `shoal serve` runs with, and where each value came from."""

    settings: ServerSettings
    engine: EngineConfig
    sources: dict[str, dict[str, str]]   # table -> field -> "default" | "file" | "env" | "flag"
    path: Path | None


def read_config_file(path: Path) -> dict[str, dict[str, Any]]:
    """The file's tables, checked: known tables and keys only, values of the fields' types."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigFileError(path, f"cannot read it: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigFileError(path, f"not valid TOML: {exc}") from None
    unknown: list[str] = []
    for key, value in data.items():
        if key not in _TABLES or not isinstance(value, dict):
            unknown.append(key + _suggestion(key, _TABLES))
            continue
        known = {f.name: str(f.type) for f in fields(_TABLES[key][0])}
        for name, item in value.items():
            if name not in known:
                unknown.append(f"{key}.{name}" + _suggestion(name, known))
            elif not _has_type(item, known[name] + (" | str" if (key, name) in _SIZE_STRINGS else "")):
                raise ConfigFileError(path, f"[{key}] {name} must be {_describe(known[name])}, "
                                            f"got {item!r}")
    if unknown:
        raise ConfigFileError(path, f"unknown keys: {', '.join(unknown)} (tables: "
                                    f"{', '.join(f'[{t}]' for t in _TABLES)}; their keys are the "
                                    "setting names in docs/operations.md)")
    return data


def load_serve_config(config_path: str | None, server_flags: Mapping[str, Any],
                      engine_flags: Mapping[str, Any],
                      environ: Mapping[str, str] | None = None) -> ServeConfig:
    """Defaults < the config file (`config_path`, else SHOAL_CONFIG) < SHOAL_* < flags (None = not given)."""
    env = os.environ if environ is None else environ
    named = config_path or env.get(CONFIG_ENV_VAR) or None
    path = Path(named).expanduser() if named else None
    tables = read_config_file(path) if path else {}
    built: dict[str, Any] = {}
    sources: dict[str, dict[str, str]] = {}
    for table, flags in (("server", server_flags), ("engine", engine_flags)):
        cls, variables = _TABLES[table]
        from_env = {name for var, (name, _doc) in variables.items() if env.get(var, "") != ""}
        from_file = {k: v for k, v in tables.get(table, {}).items() if k not in from_env}
        from_flags = {k: v for k, v in flags.items() if v is not None}
        source = {f.name: "default" for f in fields(cls)}
        source.update({k: "file" for k in from_file})
        source.update({k: "env" for k in from_env})
        source.update({k: "flag" for k in from_flags})
        try:
            built[table] = cls.from_env(dict(env), **{**from_file, **from_flags})
        except InvalidParameterError as exc:
            if path is not None and source.get(exc.field) == "file":
                raise ConfigFileError(path, f"[{table}] {exc.field}: {exc.message}") from None
            raise
        sources[table] = source
    return ServeConfig(built["server"], built["engine"], sources, path)


def policy_lines(config: ServeConfig) -> list[str]:
    """The effective settings, one per line with its source; secrets redacted."""
    origin = f"config file {config.path}" if config.path else "no config file"
    lines = [f"effective policy (defaults < {origin} < SHOAL_* < flags):"]
    for table, values in (("server", config.settings), ("engine", config.engine)):
        for f in fields(values):
            value = getattr(values, f.name)
            shown = "<redacted>" if value and _SECRET.search(f.name) else _show(value)
            lines.append(f"  {table}.{f.name} = {shown} ({config.sources[table][f.name]})")
    settings = config.settings
    if settings.batch_aging >= settings.queue_timeout:
        lines.append("  note: batch_aging >= queue_timeout, so a waiting batch request times out "
                     "before it ages into its share of admissions")
    return lines


def policy_summary(lines: list[str] | tuple[str, ...]) -> str:
    """policy_lines() in one log line: the header, the settings not at their defaults, notes."""
    header, *settings = lines
    changed = [line.strip() for line in settings if not line.endswith("(default)")]
    defaults = len(settings) - len(changed)
    return (f"{header.rstrip(':')}: {'; '.join(changed) or 'all defaults'}"
            f" (+{defaults} at their defaults: `shoal serve --verbose` or SHOAL_LOG_LEVEL=debug lists them)")


def _show(value: Any) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "unlimited"
    return repr(value) if isinstance(value, str) else str(value)


def _has_type(value: Any, type_text: str) -> bool:
    for name in (t.strip() for t in type_text.split("|")):
        if name == "bool" and isinstance(value, bool):
            return True
        if isinstance(value, bool):
            continue
        if (name == "int" and isinstance(value, int)) or \
                (name == "float" and isinstance(value, (int, float))) or \
                (name == "str" and isinstance(value, str)):
            return True
    return False


def _describe(type_text: str) -> str:
    words = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}
    return " or ".join(words[t.strip()] for t in type_text.split("|") if t.strip() in words)


def _suggestion(name: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""
