"""The client commands, each an HTTP call (or a few) to the server, as Ollama's CLI makes them."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shoal.cli.chat import (RunOptions, ensure_model, load_model, model_error, parse_parameter, print_summary, pull,
                            stream_chat)
from shoal.cli.client import CliError, Client, ErrorReply, connect
from shoal.cli.create import create_events
from shoal.cli.display import human_bytes, print_table, wordwrap_default
from shoal.cli.interactive import Chat
from shoal.cli.model_info import SHOW_FIELDS, print_info, print_model_list, processor, short_id, show_field, until
from shoal.cli.progress import show_progress
from shoal.core.version import __version__


# ---- run ---------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    opts = RunOptions(model=args.model, keep_alive=args.keepalive, verbose=args.verbose,
                      wordwrap=not args.nowordwrap and wordwrap_default(), format=args.format or "")
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
        if "embedding" in (info.get("capabilities") or []):
            return print_embedding(client, opts, prompt)
        if interactive:
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
        except ErrorReply as exc:
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
        except ErrorReply as exc:
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
    extra = {"quantize": args.quantize} if args.quantize else {}
    with connect(autostart=True) as client:
        try:
            # NOTE: local files are uploaded, not named by path (shoal.cli.create says why).
            show_progress(create_events(client, args.model, text, path.parent, extra),
                          verb="copying")
        except ErrorReply as exc:
            if exc.missing_endpoint:
                raise CliError(f"this server cannot create models ({exc.message})") from None
            raise CliError(exc.message) from None
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with connect(autostart=True) as client:
        for name in args.models:
            try:
                client.request("DELETE", "/api/delete", {"model": name})
            except ErrorReply as exc:
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
        except ErrorReply as exc:
            if exc.missing_endpoint:
                raise CliError(f"this server cannot copy models ({exc.message})") from None
            if exc.not_found:
                raise CliError(f"model '{args.source}' not found") from None
            raise CliError(exc.message) from None
    print(f"copied '{args.source}' to '{args.destination}'")
    return 0


# ---- what is there -----------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    with connect(autostart=True) as client:
        print_model_list(client, args.prefix)
    return 0


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
        except ErrorReply as exc:
            if exc.not_found:
                raise CliError(f"couldn't find model \"{args.model}\" to stop") from None
            raise CliError(exc.message) from None
    return 0


# ---- show --------------------------------------------------------------------------------------


def cmd_show(args: argparse.Namespace) -> int:
    chosen = [name for name in SHOW_FIELDS if getattr(args, name)]
    if len(chosen) > 1:
        raise CliError("only one of '--license', '--modelfile', '--parameters', '--system', or '--template' "
                       "can be specified")
    with connect(autostart=True) as client:
        try:
            info = client.show(args.model, **({"verbose": True} if args.verbose else {}))
        except ErrorReply as exc:
            raise model_error(exc, args.model) from None
    if chosen:
        print(show_field(info, chosen[0]))
        return 0
    print_info(info, verbose=args.verbose)
    return 0


# ---- version -----------------------------------------------------------------------------------

def print_version() -> int:

    with Client() as client:
        try:
            server = client.version() if client.heartbeat() else None
        except CliError:
            server = None
    if server:
        print(f"shoal server version is {server.get('shoal_version', '?')} (Ollama API {server.get('version', '?')})")
        if server.get("shoal_version") and server.get("shoal_version") != __version__:
            print(f"Warning: client version is {__version__}")
    else:
        print(f"Warning: could not connect to a running shoal server\nWarning: client version is {__version__}")
    return 0


def print_embedding(client: Client, opts: RunOptions, prompt: str) -> int:
    """An embedding model has nothing to chat: as `ollama run`, it embeds the text and prints
    the vector as one JSON array."""
    if not prompt.strip():
        raise CliError(f"{opts.model} is an embedding model: it needs input text "
                       f"(shoal run {opts.model} \"some text\")")
    body: dict = {"model": opts.model, "input": prompt}
    if opts.keep_alive is not None:
        body["keep_alive"] = opts.keep_alive
    try:
        reply = client.request("POST", "/api/embed", body)
    except ErrorReply as exc:
        raise model_error(exc, opts.model) from None
    for vector in reply.get("embeddings") or []:
        print(json.dumps(vector, separators=(",", ":")))
    return 0
