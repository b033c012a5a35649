"""One chat exchange over /api/chat, as `shoal run` and the interactive chat both make it.

The options a chat sends (model, messages, Ollama's model options, keep_alive, format),
pulling a missing model first as `ollama run` does, streaming an answer to the terminal,
and Ollama's typing of `/set parameter` / `-p` values.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from shoal.cli.client import CliError, Client, ErrorReply
from shoal.cli.display import AnswerWriter, animated, timing_summary
from shoal.cli.progress import show_progress
from shoal.cli.waiting import Waiting, server_activity

INT_PARAMS = {"num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "mirostat", "num_ctx", "num_batch",
              "num_gpu", "main_gpu", "num_thread", "num_gqa"}


FLOAT_PARAMS = {"typical_p", "top_p", "min_p", "temperature", "repeat_penalty", "presence_penalty",
                "frequency_penalty", "mirostat_tau", "mirostat_eta", "tfs_z"}


BOOL_PARAMS = {"penalize_newline", "numa", "low_vram", "f16_kv", "vocab_only", "use_mmap", "use_mlock",
               "logits_all"}


LIST_PARAMS = {"stop"}


def parse_parameter(name: str, values: list[str]) -> Any:
    """A `/set parameter` value typed as Ollama's api.FormatParams types it."""
    if name in LIST_PARAMS:
        return list(values)
    value = values[0]
    if name in INT_PARAMS:
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"invalid int value [{value}]") from None
    if name in FLOAT_PARAMS:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"invalid float value [{value}]") from None
    if name in BOOL_PARAMS:
        lowered = value.lower()
        if lowered in ("1", "t", "true"):
            return True
        if lowered in ("0", "f", "false"):
            return False
        raise ValueError(f"invalid bool value [{value}]")
    raise ValueError(f"unknown parameter '{name}'")


@dataclass
class RunOptions:
    """What `shoal run` and its chat send with each /api/chat request."""

    model: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    system: str = ""
    keep_alive: str | None = None
    format: str = ""
    verbose: bool = False
    wordwrap: bool = True
    parent_model: str = ""

    def chat_body(self, messages: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": self.messages if messages is None else messages,
                                "stream": True}
        if self.options:
            body["options"] = dict(self.options)
        if self.keep_alive is not None:
            body["keep_alive"] = self.keep_alive
        if self.format:
            body["format"] = self.format
        return body


def model_error(exc: ErrorReply, model: str, action: str = "") -> CliError:
    """A 404 for a model, or a missing endpoint, as one helpful line."""
    if exc.missing_endpoint:
        what = f" {action}" if action else ""
        return CliError(f"this server cannot{what} ({exc.message})")
    if exc.not_found:
        return CliError(f"model '{model}' not found; try `shoal pull {model}` (or `shoal list` for the models "
                        "this server has)")
    return CliError(exc.message)


def ensure_model(client: Client, model: str) -> dict[str, Any]:
    """/api/show; on 404 pull the model (as `ollama run` does), then show it again."""
    try:
        with Waiting(f"reading {model}'s details", lambda: server_activity(client.host.url)):
            return client.show(model)
    except ErrorReply as exc:
        if not exc.not_found:
            raise model_error(exc, model) from None
    try:
        pull(client, model)
    except ErrorReply as exc:
        if exc.missing_endpoint:
            raise CliError(f"model '{model}' not found, and this server cannot pull models ({exc.message}); "
                           f"`shoal pull {model}` needs a server with /api/pull, `shoal list` shows the "
                           "models this one has") from None
        raise CliError(f"model '{model}' not found, and `shoal pull {model}` failed: {exc.message}") from None
    try:
        return client.show(model)
    except ErrorReply as exc:
        raise model_error(exc, model) from None


def pull(client: Client, model: str, insecure: bool = False) -> None:
    body = {"model": model, "stream": True}
    if insecure:
        body["insecure"] = True
    with client.stream("POST", "/api/pull", body) as events:
        show_progress(events, verb="pulling")


def stream_chat(client: Client, opts: RunOptions, messages: list[dict[str, Any]],
                say_waiting: bool = True) -> tuple[str, dict[str, Any], bool]:
    """Streams one answer to stdout. Returns (text, final event, interrupted).

    While the first words are awaited, a line a second says so on stderr (`say_waiting`;
    the interactive chat passes False: its spinner or its prompt says it), with what the
    server is doing when it is doing more than answering (loading the model).

    Ctrl-C (KeyboardInterrupt) stops the answer: leaving the stream closes the connection,
    which aborts the request on the server, and the text so far is returned.
    """
    from rich.console import Console

    writer = AnswerWriter(wrap=opts.wordwrap)
    final: dict[str, Any] = {}
    err = Console(stderr=True)
    spinner = err.status("", spinner="dots") if animated(err) else None
    # NOTE: a model that must load first (download, kernels, weights) is said, not silent.
    waiting: Waiting | None = Waiting("waiting for the first words of the answer" if say_waiting else None,
                                      lambda: server_activity(client.host.url),
                                      sink=spinner.update if spinner else None)
    interrupted = False
    try:
        if spinner:
            spinner.start()
        waiting.__enter__()
        with client.stream("POST", "/api/chat", opts.chat_body(messages)) as events:
            for event in events:
                message = event.get("message") or {}
                content = message.get("content") or ""
                if content and waiting:
                    waiting.__exit__()
                    waiting = None
                if content and spinner:
                    spinner.stop()
                    spinner = None
                writer.write(content)
                if event.get("done"):
                    final = event
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if waiting:
            waiting.__exit__()
        if spinner:
            spinner.stop()
        text = writer.finish(interrupted)
    return text, final, interrupted


def print_summary(final: dict[str, Any]) -> None:
    summary = timing_summary(final)
    if summary:
        print(summary, file=sys.stderr, flush=True)


def load_model(client: Client, opts: RunOptions) -> None:
    """Ollama's empty chat request: load the model before the first prompt."""
    body = {"model": opts.model, "messages": []}
    if opts.keep_alive is not None:
        body["keep_alive"] = opts.keep_alive
    from rich.console import Console

    err = Console(stderr=True)
    with (err.status("") if animated(err) else _null()):
        try:
            client.request("POST", "/api/chat", body)
        except ErrorReply as exc:
            raise model_error(exc, opts.model) from None


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
