"""One streaming generation request to a target, timed chunk by chunk.

OpenAI dialect: `/v1/completions` (or `/v1/chat/completions`) as server-sent events with
`stream_options.include_usage`; Ollama dialect: `/api/generate` (raw) or `/api/chat` as
NDJSON. A chunk that carries text is one token event: its gap from the previous event is
one inter-token latency, however many tokens it holds (the token count comes from usage /
eval_count). Failures become a status on the record, never an exception.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """What one request sends: a prompt or a chat, and its answer length."""

    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    max_tokens: int = 128
    prompt_tokens: int | None = None    # the builder's own count of the prompt, when it has one


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how requests for one target go."""

    url: str
    dialect: str                        # "openai" | "ollama"
    model: str
    headers: dict[str, str]
    chat: bool                          # chat endpoint for plain prompts too (--endpoint chat)
    temperature: float
    seed: int | None
    send_ignore_eos: bool


@dataclass(slots=True)
class TimedRequest:
    """One request's outcome; times are seconds, `start` on the perf_counter clock."""

    start: float
    status: int | str = 200             # HTTP status, or "timeout" / "connection" / "stream"
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    text: str = ""                      # kept only to count tokens when the server sends no usage

    @property
    def ok(self) -> bool:
        return self.status == 200


def _path_and_body(endpoint: Endpoint, request: BenchRequest) -> tuple[str, dict]:
    use_chat = request.messages is not None or endpoint.chat
    messages = list(request.messages) if request.messages is not None else [
        {"role": "user", "content": request.prompt or ""}]
    if endpoint.dialect == "ollama":
        options: dict = {"num_predict": request.max_tokens, "temperature": endpoint.temperature}
        if endpoint.seed is not None:
            options["seed"] = endpoint.seed
        if use_chat:
            return "/api/chat", {"model": endpoint.model, "messages": messages, "stream": True, "options": options}
        # NOTE: raw, so every target sees the same prompt tokens (no chat template added).
        return "/api/generate", {"model": endpoint.model, "prompt": request.prompt or "", "raw": True,
                                 "stream": True, "options": options}
    body: dict = {"model": endpoint.model, "max_tokens": request.max_tokens, "temperature": endpoint.temperature,
                  "stream": True, "stream_options": {"include_usage": True}}
    if endpoint.seed is not None:
        body["seed"] = endpoint.seed
    if endpoint.send_ignore_eos:
        body["ignore_eos"] = True
    if use_chat:
        return "/v1/chat/completions", {**body, "messages": messages}
    return "/v1/completions", {**body, "prompt": request.prompt or ""}


def error_message(body: bytes) -> str:
    """The server's own error message from an error body, in either dialect's shape."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:200] or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error", data.get("detail"))
        if isinstance(err, dict):
            err = err.get("message")
        if err is not None:
            return str(err)[:200]
    return text[:200]


class _StreamError(Exception):
    pass


class _Parser:
    """Token events and usage from one response stream."""

    def __init__(self, dialect: str) -> None:
        self.ollama = dialect == "ollama"
        self.done = False
        self.prompt_tokens: int | None = None
        self.output_tokens: int | None = None

    def text_of(self, line: str) -> str:
        """The text a line carries ("" for none); raises _StreamError on an error event."""
        if self.ollama:
            if not line.strip():
                return ""
            event = json.loads(line)
            if event.get("error"):
                raise _StreamError(str(event["error"])[:200])
            if event.get("done"):
                self.done = True
                self.prompt_tokens = event.get("prompt_eval_count", self.prompt_tokens)
                self.output_tokens = event.get("eval_count", self.output_tokens)
            message = event.get("message") or {}
            return event.get("response") or message.get("content") or ""
        if not line.startswith("data:"):
            return ""
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return ""
        event = json.loads(data)
        if event.get("error"):
            err = event["error"]
            raise _StreamError(str(err.get("message") if isinstance(err, dict) else err)[:200])
        usage = event.get("usage")
        if usage:
            self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
            self.output_tokens = usage.get("completion_tokens", self.output_tokens)
        choices = event.get("choices") or []
        if not choices:
            return ""
        choice = choices[0]
        delta = choice.get("delta") or {}
        return choice.get("text") or delta.get("content") or ""


class StreamingClient:
    """Sends BenchRequests to one target and times them."""

    def __init__(self, endpoint: Endpoint, timeout_s: float) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        # NOTE: no kept-alive connections: llama.cpp's server closes idle ones, and reusing a
        # closed one fails the next request through no fault of the server under test.
        self._http = httpx.AsyncClient(base_url=endpoint.url, headers=endpoint.headers,
                                       timeout=httpx.Timeout(timeout_s),
                                       limits=httpx.Limits(max_connections=None, max_keepalive_connections=0))

    async def send(self, request: BenchRequest) -> TimedRequest:
        record = TimedRequest(start=time.perf_counter())
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._stream(request, record)
        except TimeoutError:
            record.status, record.error = "timeout", f"no complete answer within {self.timeout_s:g}s"
        except httpx.TimeoutException as exc:
            record.status, record.error = "timeout", type(exc).__name__
        except (httpx.TransportError, httpx.StreamError) as exc:
            record.status, record.error = "connection", f"{type(exc).__name__}: {exc}"[:200]
        except _StreamError as exc:
            record.status, record.error = "stream", str(exc)
        except (ValueError, TypeError, AttributeError) as exc:    # not JSON, or not the dialect's shape
            record.status, record.error = "stream", f"unreadable event: {exc!r}"[:200]
        return record

    async def _stream(self, request: BenchRequest, record: TimedRequest) -> None:
        path, body = _path_and_body(self.endpoint, request)
        parser = _Parser(self.endpoint.dialect)
        last_event: float | None = None
        texts: list[str] = []
        async with self._http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                record.status = response.status_code
                record.error = error_message(await response.aread())
                return
            async for line in response.aiter_lines():
                text = parser.text_of(line)
                if not text:
                    continue
                now = time.perf_counter()
                if last_event is None:
                    record.ttft = now - record.start
                else:
                    record.itls.append(now - last_event)
                last_event = now
                texts.append(text)
        record.e2e = time.perf_counter() - record.start
        if not parser.done:
            # the body ended without the dialect's end marker: the server dropped the stream
            record.status, record.error = "connection", "stream ended before its final event"
            return
        record.text = "".join(texts)
        record.prompt_tokens = parser.prompt_tokens if parser.prompt_tokens is not None else request.prompt_tokens
        record.output_tokens = parser.output_tokens

    async def aclose(self) -> None:
        await self._http.aclose()
