"""The client commands, each an HTTP call (or a few) to the server, as Ollama's CLI makes them."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.cli.client import ApiError, CliError, Client, connect
from shoal.cli.display import (AnswerWriter, animated, human_bytes, human_number, human_time, print_table,
                               stdout_console, timing_summary, wordwrap_default)
from shoal.cli.progress import show_progress


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


# ---- errors in the user's terms ----------------------------------------------------------------

def model_error(exc: ApiError, model: str, action: str = "") -> CliError:
    """A 404 for a model, or a missing endpoint, as one helpful line."""
    if exc.missing_endpoint:
        what = f" {action}" if action else ""
        return CliError(f"this server cannot{what} ({exc.message})")
    if exc.not_found:
        return CliError(f"model '{model}' not found; try `shoal pull {model}` (or `shoal list` for the models "
                        "this server has)")
    return CliError(exc.message)


# ---- run ---------------------------------------------------------------------------------------

def ensure_model(client: Client, model: str) -> dict[str, Any]:
    """/api/show; on 404 pull the model (as `ollama run` does), then show it again."""
    try:
        return client.show(model)
    except ApiError as exc:
        if not exc.not_found:
            raise model_error(exc, model) from None
    try:
        pull(client, model)
    except ApiError as exc:
        if exc.missing_endpoint:
            raise CliError(f"model '{model}' not found, and this server cannot pull models ({exc.message}); "
                           f"`shoal pull {model}` needs a server with /api/pull, `shoal list` shows the "
                           "models this one has") from None
        raise CliError(f"model '{model}' not found, and `shoal pull {model}` failed: {exc.message}") from None
    try:
        return client.show(model)
    except ApiError as exc:
        raise model_error(exc, model) from None


def pull(client: Client, model: str, insecure: bool = False) -> None:
    body = {"model": model, "stream": True}
    if insecure:
        body["insecure"] = True
    with client.stream("POST", "/api/pull", body) as events:
        show_progress(events, verb="pulling")


def stream_chat(client: Client, opts: RunOptions, messages: list[dict[str, Any]]) -> tuple[str, dict[str, Any], bool]:
    """Streams one answer to stdout. Returns (text, final event, interrupted).

    Ctrl-C (KeyboardInterrupt) stops the answer: leaving the stream closes the connection,
    which aborts the request on the server, and the text so far is returned.
    """
    from rich.console import Console

    writer = AnswerWriter(wrap=opts.wordwrap)
    final: dict[str, Any] = {}
    err = Console(stderr=True)
    spinner = err.status("", spinner="dots") if animated(err) else None
    interrupted = False
    try:
        if spinner:
            spinner.start()
        with client.stream("POST", "/api/chat", opts.chat_body(messages)) as events:
            for event in events:
                message = event.get("message") or {}
                content = message.get("content") or ""
                if content and spinner:
                    spinner.stop()
                    spinner = None
                writer.write(content)
                if event.get("done"):
                    final = event
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if spinner:
            spinner.stop()
        text = writer.finish()
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
        except ApiError as exc:
            raise model_error(exc, opts.model) from None


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def cmd_run(args: argparse.Namespace) -> int:
    opts = RunOptions(model=args.model, keep_alive=args.keepalive, verbose=args.verbose,
                      wordwrap=not args.nowordwrap and wordwrap_default(), format=args.format or "")
    from shoal.cli.interactive import parse_parameter

    for name, value in args.parameter:
        try:
            parsed = parse_parameter(name, [value])
        except ValueError as exc:
            raise CliError(f"--parameter {name}: {exc}") from None
        if isinstance(parsed, list) and isinstance(opts.options.get(name), list):
            opts.options[name].extend(parsed)
        else:
            opts.options[name] = parsed
    prompts = list(args.prompt)
    interactive = True
    if not sys.stdin.isatty():
        # piped input comes before the arguments (`cat notes.txt | shoal run m "Summarize:"`)
        piped = sys.stdin.read()
        if piped:
            prompts = [piped, *prompts]
        opts.wordwrap = False
        interactive = False
    if prompts:
        interactive = False
    prompt = " ".join(prompts)

    with connect(autostart=True) as client:
        info = ensure_model(client, opts.model)
        opts.parent_model = str((info.get("details") or {}).get("parent_model") or "")
        if interactive:
            from shoal.cli.interactive import Chat

            load_model(client, opts)
            for message in info.get("messages") or []:
                if message.get("role") == "user":
                    print(f">>> {message.get('content', '')}")
                elif message.get("role") == "assistant":
                    print(f"{message.get('content', '')}\n")
                opts.messages.append({"role": message.get("role"), "content": message.get("content", "")})
            return Chat(client, opts).loop()
        if not prompt.strip():
            load_model(client, opts)
            return 0
        text, final, interrupted = stream_chat(client, opts, [{"role": "user", "content": prompt}])
        if text and not text.endswith("\n"):
            print()
        if interrupted:
            return 130
        if opts.verbose and final:
            print_summary(final)
    return 0


# ---- the model store ---------------------------------------------------------------------------

def cmd_pull(args: argparse.Namespace) -> int:
    with connect(autostart=True) as client:
        try:
            pull(client, args.model, args.insecure)
        except ApiError as exc:
            if exc.missing_endpoint:
                raise CliError(f"this server cannot pull models ({exc.message})") from None
            raise CliError(f"pulling '{args.model}': {exc.message}") from None
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    with connect(autostart=True) as client:
        body = {"model": args.model, "stream": True}
        if args.insecure:
            body["insecure"] = True
        try:
            with client.stream("POST", "/api/push", body) as events:
                show_progress(events, verb="pushing")
        except ApiError as exc:
            if exc.missing_endpoint:
                raise CliError(f"this server cannot push models ({exc.message})") from None
            raise model_error(exc, args.model) from None
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    path = Path(args.file or "Modelfile").expanduser().resolve()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CliError(f"no Modelfile at {path} (name one with -f)") from None
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    body: dict[str, Any] = {"model": args.model, "modelfile": text, "path": str(path), "stream": True}
    if args.quantize:
        body["quantize"] = args.quantize
    with connect(autostart=True) as client:
        try:
            with client.stream("POST", "/api/create", body) as events:
                show_progress(events, verb="copying")
        except ApiError as exc:
            if exc.missing_endpoint:
                raise CliError(f"this server cannot create models ({exc.message})") from None
            raise CliError(exc.message) from None
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with connect(autostart=True) as client:
        for name in args.models:
            try:
                client.request("DELETE", "/api/delete", {"model": name})
            except ApiError as exc:
                if exc.missing_endpoint:
                    raise CliError(f"this server cannot delete models ({exc.message})") from None
                if exc.not_found:
                    raise CliError(f"model '{name}' not found") from None
                raise CliError(exc.message) from None
            print(f"deleted '{name}'")
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    with connect(autostart=True) as client:
        try:
            client.request("POST", "/api/copy", {"source": args.source, "destination": args.destination})
        except ApiError as exc:
            if exc.missing_endpoint:
                raise CliError(f"this server cannot copy models ({exc.message})") from None
            if exc.not_found:
                raise CliError(f"model '{args.source}' not found") from None
            raise CliError(exc.message) from None
    print(f"copied '{args.source}' to '{args.destination}'")
    return 0


# ---- what is there -----------------------------------------------------------------------------

def short_id(digest: Any) -> str:
    return str(digest or "").removeprefix("sha256:")[:12]


def cmd_list(args: argparse.Namespace) -> int:
    with connect(autostart=True) as client:
        models = (client.tags() or {}).get("models") or []
    rows = [[m.get("name") or m.get("model", ""), short_id(m.get("digest")), human_bytes(m.get("size") or 0),
             human_time(m.get("modified_at"), "Never")]
            for m in models if not args.prefix or str(m.get("name", "")).startswith(args.prefix)]
    print_table(["NAME", "ID", "SIZE", "MODIFIED"], rows)
    return 0


def processor(size: int, size_vram: int) -> str:
    if size_vram == 0:
        return "100% CPU"
    if size_vram == size:
        return "100% GPU"
    if size_vram > size or size == 0:
        return "Unknown"
    cpu = round((size - size_vram) / size * 100)
    return f"{cpu}%/{100 - cpu}% CPU/GPU"


def until(expires_at: Any) -> str:
    from datetime import datetime, timezone

    from shoal.cli.display import parse_time

    at = parse_time(expires_at)
    if at is not None and at < datetime.now(timezone.utc):
        return "Stopping..."
    return human_time(expires_at, "Never")


def cmd_ps(args: argparse.Namespace) -> int:
    with connect(autostart=False) as client:
        models = (client.ps() or {}).get("models") or []
    rows = []
    for m in models:
        if args.prefix and not str(m.get("name", "")).startswith(args.prefix):
            continue
        size, vram = int(m.get("size") or 0), int(m.get("size_vram") or 0)
        context = m.get("context_length")
        rows.append([m.get("name") or m.get("model", ""), short_id(m.get("digest")), human_bytes(size),
                     processor(size, vram), str(context) if context else "", until(m.get("expires_at"))])
    print_table(["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"], rows)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    with connect(autostart=False) as client:
        try:
            client.request("POST", "/api/generate", {"model": args.model, "keep_alive": 0})
        except ApiError as exc:
            if exc.not_found:
                raise CliError(f"couldn't find model \"{args.model}\" to stop") from None
            raise CliError(exc.message) from None
    return 0


# ---- show --------------------------------------------------------------------------------------

SHOW_FIELDS = ("license", "modelfile", "parameters", "system", "template")


def license_text(info: dict[str, Any]) -> str:
    value = info.get("license")
    if isinstance(value, list):
        value = "\n".join(str(v) for v in value)
    if value:
        return str(value)
    # NOTE: shoal's /api/show has no `license` yet; the GGUF header often names one.
    return str((info.get("model_info") or {}).get("general.license") or "")


def show_field(info: dict[str, Any], name: str) -> str:
    if name == "license":
        return license_text(info)
    return str(info.get(name) or "")


def cmd_show(args: argparse.Namespace) -> int:
    chosen = [name for name in SHOW_FIELDS if getattr(args, name)]
    if len(chosen) > 1:
        raise CliError("only one of '--license', '--modelfile', '--parameters', '--system', or '--template' "
                       "can be specified")
    with connect(autostart=True) as client:
        try:
            info = client.show(args.model, **({"verbose": True} if args.verbose else {}))
        except ApiError as exc:
            raise model_error(exc, args.model) from None
    if chosen:
        print(show_field(info, chosen[0]))
        return 0
    print_info(info, verbose=args.verbose)
    return 0


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def print_info(info: dict[str, Any], verbose: bool = False, console=None) -> None:
    """Ollama's `show` summary: Model, Capabilities, Parameters, System, License."""
    console = console or stdout_console()
    model_info = info.get("model_info") or {}
    details = info.get("details") or {}

    def section(title: str, rows: list[list[str]]) -> None:
        if not rows:
            return
        console.print(f"  {title}", highlight=False)
        print_table(None, rows, indent=4, console=console)
        console.print()

    rows: list[list[str]] = []
    arch = model_info.get("general.architecture")
    if arch:
        rows.append(["architecture", str(arch)])
        if model_info.get("general.parameter_count"):
            rows.append(["parameters", human_number(model_info["general.parameter_count"])])
        if model_info.get(f"{arch}.context_length"):
            rows.append(["context length", _number(model_info[f"{arch}.context_length"])])
        if model_info.get(f"{arch}.embedding_length"):
            rows.append(["embedding length", _number(model_info[f"{arch}.embedding_length"])])
    else:
        rows.append(["architecture", str(details.get("family") or "")])
        rows.append(["parameters", str(details.get("parameter_size") or "")])
    rows.append(["quantization", str(details.get("quantization_level") or "")])
    section("Model", rows)
    section("Capabilities", [[str(c)] for c in info.get("capabilities") or []])
    section("Parameters", [line.split(None, 1) for line in str(info.get("parameters") or "").splitlines()
                           if line.strip()])
    if verbose and model_info:
        section("Metadata", [[key, _metadata_value(model_info[key])] for key in sorted(model_info)])
    section("System", _head(str(info.get("system") or ""), 2))
    section("License", _head(license_text(info), 2))


def _metadata_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        shown = [str(v) for v in value[:3]]
        more = f" ...+{len(value) - 3} more" if len(value) > 3 else ""
        return "[" + " ".join(shown) + more + "]"
    return _number(value)


def _head(text: str, n: int) -> list[list[str]]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    rows = [[line] for line in lines[:n]]
    if len(lines) > n:
        rows.append(["..."])
    return rows


# ---- version -----------------------------------------------------------------------------------

def print_version() -> int:
    import shoal
    from shoal.cli.client import Client

    with Client() as client:
        try:
            server = client.version() if client.heartbeat() else None
        except CliError:
            server = None
    if server:
        print(f"shoal server version is {server.get('shoal_version', '?')} (Ollama API {server.get('version', '?')})")
        if server.get("shoal_version") and server.get("shoal_version") != shoal.__version__:
            print(f"Warning: client version is {shoal.__version__}")
    else:
        print(f"Warning: could not connect to a running shoal server\nWarning: client version is {shoal.__version__}")
    return 0
