"""Model names: parsing, defaults, validation errors, display, case-insensitive equality."""
from __future__ import annotations

import pytest

from shoal.core.errors import InvalidParameterError
from shoal.store.errors import InvalidModelNameError
from shoal.store.names import DEFAULT_REGISTRY, ModelName, is_valid_name, normalize_name, parse_name


@pytest.mark.parametrize("text, parts, display", [
    ("smollm2", (DEFAULT_REGISTRY, "library", "smollm2", "latest"), "smollm2:latest"),
    ("smollm2:135m", (DEFAULT_REGISTRY, "library", "smollm2", "135m"), "smollm2:135m"),
    ("alice/mario", (DEFAULT_REGISTRY, "alice", "mario", "latest"), "alice/mario:latest"),
    ("alice/mario:v1.2", (DEFAULT_REGISTRY, "alice", "mario", "v1.2"), "alice/mario:v1.2"),
    ("registry.shoal.local/library/x:y", (DEFAULT_REGISTRY, "library", "x", "y"), "x:y"),
    ("example.com:5000/team/llama3.2:8b-q4_K_M",
     ("example.com:5000", "team", "llama3.2", "8b-q4_K_M"),
     "example.com:5000/team/llama3.2:8b-q4_K_M"),
    ("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
     ("hf.co", "bartowski", "Llama-3.2-1B-Instruct-GGUF", "Q4_K_M"),
     "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"),
    ("huggingface.co/owner/repo", ("hf.co", "owner", "repo", "latest"), "hf.co/owner/repo:latest"),
    ("https://hf.co/owner/repo:q8_0", ("hf.co", "owner", "repo", "q8_0"), "hf.co/owner/repo:q8_0"),
    # Docker's rule: a first part with '.' or ':', or `localhost`, is a registry host
    ("localhost:5000/mymodel:v1", ("localhost:5000", "library", "mymodel", "v1"),
     "localhost:5000/library/mymodel:v1"),
    ("localhost/m", ("localhost", "library", "m", "latest"), "localhost/library/m:latest"),
    ("a.b/name", ("a.b", "library", "name", "latest"), "a.b/library/name:latest"),
    ("  padded  ", (DEFAULT_REGISTRY, "library", "padded", "latest"), "padded:latest"),
    ("_under:_score", (DEFAULT_REGISTRY, "library", "_under", "_score"), "_under:_score"),
])
def test_parse_table(text, parts, display) -> None:
    name = parse_name(text)
    assert name.parts == parts
    assert name.display == display
    assert str(name) == display
    # display and full both parse back to the same name
    assert parse_name(name.display) == name
    assert parse_name(name.full) == name


@pytest.mark.parametrize("text, fragment", [
    ("", "empty"),
    ("   ", "empty"),
    ("model:", "tag after ':' is empty"),
    ("a/b/c/d", "too many"),
    ("has space", "found ' ' at position 4"),
    ("emoji\u00e9", "may contain only"),
    ("-leading", "must start with"),
    (".hidden", "must start with"),
    ("a..b", "'..'"),
    ("x:tag:more", "found ':'"),
    ("x:-tag", "must start with"),
    ("bad_host:x/name", "not a host name"),
    ("hf.co/repo", "need an owner"),
    ("bad_host!/ns/name", "not a host name"),
    ("host/ns/", "name is empty"),
    ("ns//name", "namespace is empty"),
    ("m@sha256:abc", "found '@'"),
    ("a" * 129, "at most 128"),
    ("x:" + "t" * 129, "at most 128"),
])
def test_invalid_names(text, fragment) -> None:
    with pytest.raises(InvalidModelNameError) as info:
        parse_name(text)
    assert fragment in str(info.value)
    assert isinstance(info.value, InvalidParameterError)  # a 400 for the HTTP layers
    assert info.value.field == "model"
    assert not is_valid_name(text)


def test_non_string_is_rejected() -> None:
    with pytest.raises(InvalidModelNameError):
        parse_name(None)  # type: ignore[arg-type]


def test_case_insensitive_equality_keeps_spelling() -> None:
    a, b = parse_name("Alice/Mario:V1"), parse_name("alice/mario:v1")
    assert a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a.display == "Alice/Mario:V1"
    assert parse_name("mario") != parse_name("mario:v1")
    assert parse_name("mario") != "mario:latest"


def test_helpers() -> None:
    name = parse_name("hf.co/Owner/Repo:q4_k_m")
    assert name.is_huggingface and not parse_name("smollm2").is_huggingface
    assert name.with_tag("Q8_0").display == "hf.co/Owner/Repo:Q8_0"
    assert parse_name("smollm2").short == "smollm2"
    assert parse_name("smollm2:135m").short == "smollm2:135m"
    assert ModelName.parse("x") == parse_name("x:latest")
    assert repr(parse_name("x")) == "ModelName('registry.shoal.local/library/x:latest')"


@pytest.mark.parametrize("text, normalized", [
    ("smollm2", "smollm2:latest"), (" SmolLM2:135M ", "smollm2:135m"), ("alice/mario", "alice/mario:latest"),
    ("localhost:5000/mario", "localhost:5000/mario:latest"), ("default", "default:latest"),
    ("my model.gguf", "my model.gguf:latest"),     # an alias need not be a valid store name
])
def test_normalize_name_is_ollamas_comparison_rule(text: str, normalized: str) -> None:
    assert normalize_name(text) == normalized
