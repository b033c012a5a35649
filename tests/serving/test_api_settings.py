"""Server settings: environment parsing, and the docs table covering every variable."""
from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from shoal.core.config import ENV_VARS, EngineConfig
from shoal.core.errors import InvalidParameterError
from shoal.serving.model_loading import DEFAULT_MODEL_NAME, served_name
from shoal.serving.settings import DEFAULT_PORT, SERVER_ENV_VARS, ServerSettings

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def test_every_variable_is_documented() -> None:
    text = DOCS.read_text()
    missing = [name for name in {**SERVER_ENV_VARS, **ENV_VARS} if f"`{name}`" not in text]
    assert not missing, f"docs/operations.md lacks {missing}"


def test_the_engine_rows_match_the_engine_config() -> None:
    """Each engine variable sets an EngineConfig field, its docs row says what ENV_VARS says,
    and a default the row states is the field's (EngineConfig holds the engine's only defaults)."""
    text = DOCS.read_text()
    defaults = {f.name: f.default for f in fields(EngineConfig)}
    for var, (name, doc) in ENV_VARS.items():
        assert name in defaults, f"{var} sets no EngineConfig field ({name!r})"
        assert f"| `{var}` |" in text and f"| {doc} |" in text, f"docs/operations.md: {var}'s row"
        stated = re.search(r"\(default (\d+)", doc)
        if stated:
            assert int(stated.group(1)) == int(defaults[name]), f"{var}: default {defaults[name]!r}"


def test_defaults_env_and_overrides() -> None:
    assert ServerSettings.from_env({}).port == DEFAULT_PORT
    settings = ServerSettings.from_env({"SHOAL_HOST": "0.0.0.0:8000", "SHOAL_MAX_QUEUE": "3",
                                        "SHOAL_MAX_BODY_BYTES": "1MiB"})
    assert (settings.host, settings.port, settings.max_queue, settings.max_body_bytes) == \
        ("0.0.0.0", 8000, 3, 1 << 20)
    # an explicit flag wins over the variable
    assert ServerSettings.from_env({"SHOAL_PORT": "9000"}, port=9001).port == 9001
    assert ServerSettings.from_env({}, host="::1").host == "::1"     # IPv6 is not host:port


@pytest.mark.parametrize("env", [{"SHOAL_PORT": "eighty"}, {"SHOAL_PORT": "70000"},
                                 {"SHOAL_MAX_QUEUE": "-1"}, {"SHOAL_HOST": "localhost:http"},
                                 {"SHOAL_MAX_BODY_BYTES": "lots"}, {"SHOAL_READ_TIMEOUT": "0"}])
def test_bad_values_are_named(env: dict[str, str]) -> None:
    with pytest.raises(InvalidParameterError):
        ServerSettings.from_env(env)


def test_registry_allow_reaches_the_store_as_a_policy() -> None:
    settings = ServerSettings.from_env({"SHOAL_REGISTRY_ALLOW": "127.0.0.1:5000, registry.lan"})
    assert settings.registry_egress.allowed == frozenset({("127.0.0.1", 5000), ("registry.lan", None)})
    assert ServerSettings.from_env({}).registry_egress.allowed == frozenset()
    with pytest.raises(InvalidParameterError, match="SHOAL_REGISTRY_ALLOW: bad port"):
        ServerSettings.from_env({"SHOAL_REGISTRY_ALLOW": "127.0.0.1:http"})


def test_served_names(tmp_path: Path) -> None:
    assert served_name(None, None)[0] == DEFAULT_MODEL_NAME
    assert "smollm2" in served_name("default", None)[1]
    name, aliases = served_name(str(tmp_path / "Qwen2-0.5B.Q8_0.gguf"), None)
    assert name == "Qwen2-0.5B.Q8_0" and aliases
    assert served_name("x.gguf", "a, b") == ("a", ("b", "x.gguf"))
