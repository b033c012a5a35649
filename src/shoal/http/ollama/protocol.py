"""Ollama's wire format: request bodies (checked by pydantic) and the helpers that write replies.

Field names and meanings follow Ollama's api/types.go. Unknown fields are ignored, as
Go's JSON decoder ignores them. Types are strict where Go's are (a string for `stream`
is a 400 naming the field, not a silent coercion).
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

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
    # shoal's: a FROM / ADAPTER value of `modelfile` -> the uploaded files (name -> digest)
    # that stand for it (`shoal create` uploads a local model and keeps the Modelfile's text)
    uploads: dict[StrictStr, dict[str, StrictStr]] | None = None
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


# ---- replies -----------------------------------------------------------------------------

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
