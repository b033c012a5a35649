"""Durations in Ollama's forms: request keep_alive values and the server's duration settings."""
from __future__ import annotations

import pytest

from shoal.core.errors import InvalidParameterError
from shoal.serving.durations import FOREVER, parse_keep_alive


@pytest.mark.parametrize("value, seconds", [
    (None, None), (0, 0.0), ("0", 0.0), (300, 300.0), (1.5, 1.5), (-1, FOREVER), ("-1", FOREVER),
    ("5m", 300.0), ("1h30m", 5400.0), ("250ms", 0.25), ("2.5s", 2.5), ("-5m", FOREVER), ("300", 300.0),
])
def test_keep_alive_accepts_ollama_durations(value, seconds) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "m", "1.2.3s", "5x", "", True])
def test_keep_alive_refuses_garbage(value) -> None:
    with pytest.raises(InvalidParameterError) as info:
        parse_keep_alive(value)
    assert info.value.field == "keep_alive"


@pytest.mark.parametrize("value", [1e18, 1e308, 10**400, "1e18", 1e9 + 1, "99999999999999999999h", "-1e308"])
def test_keep_alive_past_a_billion_seconds_is_forever(value) -> None:
    # issue 13: 1e18 s was kept as is, and /api/ps then failed to write the expiry date
    assert parse_keep_alive(value) == FOREVER


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "NaN", "nan", "inf",
                                   "Infinity", "-Infinity", "1e400", [5], {"s": 5}])
def test_keep_alive_must_be_finite(value) -> None:
    with pytest.raises(InvalidParameterError) as info:
        parse_keep_alive(value)
    assert info.value.field == "keep_alive"
