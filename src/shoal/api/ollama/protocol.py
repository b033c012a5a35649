"""Ollama's wire format: request bodies (checked by pydantic) and the helpers that write replies.

Field names and meanings follow Ollama's api/types.go. Unknown fields are ignored, as
Go's JSON decoder ignores them. Types are strict where Go's are (a string for `stream`
is a 400 naming the field, not a silent coercion).
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from shoal.errors import InvalidParameterError

# What /api/version reports. Clients (Open WebUI, LangChain) compare it against the Ollama
# release that introduced a feature; this is the API surface shoal's Ollama dialect follows.
OLLAMA_COMPAT_VERSION = "0.12.0"

ROLES = ("system", "user", "assistant", "tool")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Message(_Body):
    role: StrictStr
    content: StrictStr | None = None
    images: list[Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: StrictStr | None = None
    thinking: StrictStr | None = None


class _GenerationBody(_Body):
    model: StrictStr | None = None
    stream: StrictBool | None = None
    format: Any = None                     # "", "json" or a JSON schema object
    options: dict[str, Any] | None = None
    keep_alive: Union[StrictStr, StrictInt, StrictFloat, None] = None
    think: Union[StrictBool, StrictStr, None] = None
    truncate: StrictBool | None = None
    shift: StrictBool | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None


class GenerateBody(_GenerationBody):
    prompt: StrictStr | None = None
    suffix: StrictStr | None = None
    system: StrictStr | None = None
    template: StrictStr | None = None
    context: list[StrictInt] | None = None
    raw: StrictBool | None = None
    images: list[Any] | None = None


class ChatBody(_GenerationBody):
    messages: list[Message] | None = None
    tools: list[dict[str, Any]] | None = None


class PullBody(_Body):
    model: StrictStr | None = None
    name: StrictStr | None = None          # the older spelling of `model`
    insecure: StrictBool | None = None
    stream: StrictBool | None = None


class PushBody(PullBody):
    pass


class CreateBody(_Body):
    model: StrictStr | None = None
    name: StrictStr | None = None
    modelfile: StrictStr | None = None     # the older form: the Modelfile's text (+ its `path`)
    path: StrictStr | None = None
    from_: StrictStr | None = Field(default=None, alias="from")
    files: dict[str, StrictStr] | None = None          # file name -> uploaded blob digest
    adapters: dict[str, StrictStr] | None = None
    template: StrictStr | None = None
    license: Union[StrictStr, list[StrictStr], None] = None
    system: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None
    quantize: StrictStr | None = None
    stream: StrictBool | None = None


class CopyBody(_Body):
    source: StrictStr | None = None
    destination: StrictStr | None = None


class DeleteBody(_Body):
    model: StrictStr | None = None
    name: StrictStr | None = None


class ShowBody(_Body):
    model: StrictStr | None = None
    name: StrictStr | None = None          # the older spelling of `model`
    verbose: StrictBool | None = None


# ---- keep_alive ------------------------------------------------------------------------

_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
             "h": 3600.0}
_GO_DURATION = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")
FOREVER = float("inf")


def parse_keep_alive(value: Any) -> float | None:
    """keep_alive in seconds (inf = keep loaded forever; None = not given).

    Ollama takes a number of seconds (negative = forever) or a Go duration string
    ("5m", "1h30m", "300ms", "0"; negative = forever). A plain number in a string
    ("300", "-1") is taken as seconds too, as OLLAMA_KEEP_ALIVE is.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidParameterError("keep_alive", "must be a duration string or a number of seconds")
    if isinstance(value, (int, float)):
        return FOREVER if value < 0 else float(value)
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if seconds != seconds or seconds in (float("inf"), float("-inf")):
            raise InvalidParameterError("keep_alive", f"{value!r} is not a duration")
        return FOREVER if seconds < 0 else seconds
    sign = 1.0
    body = text
    if body[:1] in "+-" and body:
        sign = -1.0 if body[0] == "-" else 1.0
        body = body[1:]
    if body == "0":
        return 0.0
    total, pos = 0.0, 0
    for match in _GO_DURATION.finditer(body):
        number = match.group(1)
        if match.start() != pos or number in ("", "."):
            break
        total += float(number) * _GO_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(body) or not body:
        raise InvalidParameterError(
            "keep_alive", f"{value!r} is not a duration (use e.g. \"5m\", \"1h\", \"30s\", 0 or -1)")
    return FOREVER if sign < 0 and total > 0 else total


# ---- replies -----------------------------------------------------------------------------

def printable(text: str) -> str:
    """`text` safe to echo in a reply: JSON may carry lone surrogates ("\\ud800") that
    UTF-8 cannot encode; they are shown escaped instead of failing the whole reply."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def timestamp(at: datetime | None = None) -> str:
    """RFC 3339 in UTC with fractional seconds, as Ollama writes created_at."""
    at = at or datetime.now(timezone.utc)
    return at.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def timestamp_at(epoch_seconds: float) -> str:
    """timestamp() of a wall-clock time given in epoch seconds."""
    return timestamp(datetime.fromtimestamp(epoch_seconds, tz=timezone.utc))


def far_future() -> str:
    """expires_at of a model that never unloads: now + Go's largest duration (~292 years)."""
    return timestamp(datetime.now(timezone.utc) + timedelta(seconds=(2**63 - 1) / 1e9))


def nanoseconds(seconds: float) -> int:
    """A duration in Ollama's unit; at least 1 so clients dividing by it never divide by 0."""
    return max(1, int(round(seconds * 1e9)))
