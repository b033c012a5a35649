"""The `shoal` command line.

`serve` runs the server; `chat`, `generate`, `model-path`, `env` and `keys` (API keys, on the
keys DB) work in this process.
Every other command is an HTTP client of the server at SHOAL_HOST, as Ollama's CLI is of
OLLAMA_HOST: `run` (one answer, or the interactive chat), `pull`, `push`, `list`/`ls`,
`ps`, `show`, `rm`, `cp`, `create`, `stop`, `top` (the live dashboard in the terminal). `bench` benchmarks servers side by side (shoal.bench).
"""
from __future__ import annotations

import argparse
import sys

from shoal.cli.client import CliError
from shoal.core.openmp import set_openmp_defaults


def _add_client_commands(sub) -> None:
    from shoal.cli import commands as c

    run = sub.add_parser("run", help="chat with a model (pulls it when missing; starts a server when none runs)",
                         description="With a prompt (arguments or piped stdin): stream one answer and exit. "
                                     "On a terminal without one: the interactive chat (/? for help).")
    run.add_argument("model")
    run.add_argument("prompt", nargs="*")
    run.add_argument("--verbose", action="store_true", help="show timings for the answer")
    run.add_argument("--keepalive", default=None, metavar="DURATION",
                     help="how long the model stays loaded after the answer (e.g. 5m, 1h, 0)")
    run.add_argument("--nowordwrap", action="store_true", help="don't wrap words to the next line")
    run.add_argument("--format", default=None, help="response format (e.g. json)")
    run.add_argument("--parameter", "-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="a model option, as `/set parameter` sets it in the chat (e.g. -p num_predict 64, "
                          "-p temperature 0); repeat for more (shoal's addition to Ollama's flags)")
    run.add_argument("--insecure", action="store_true", help=argparse.SUPPRESS)
    run.set_defaults(func=c.cmd_run)

    pull = sub.add_parser("pull", help="pull a model into the server's store")
    pull.add_argument("model")
    pull.add_argument("--insecure", action="store_true", help="use an insecure registry")
    pull.set_defaults(func=c.cmd_pull)

    push = sub.add_parser("push", help="push a model to a registry")
    push.add_argument("model")
    push.add_argument("--insecure", action="store_true", help="use an insecure registry")
    push.set_defaults(func=c.cmd_push)

    for name in ("list", "ls"):
        ls = sub.add_parser(name, help="list the models the server has" if name == "list" else "alias of list")
        ls.add_argument("prefix", nargs="?", default=None, help="only names that start with this")
        ls.set_defaults(func=c.cmd_list)

    ps = sub.add_parser("ps", help="list the models loaded now")
    ps.add_argument("prefix", nargs="?", default=None)
    ps.set_defaults(func=c.cmd_ps)

    show = sub.add_parser("show", help="show information about a model")
    show.add_argument("model")
    for flag in c.SHOW_FIELDS:
        show.add_argument(f"--{flag}", action="store_true", help=f"show the model's {flag}")
    show.add_argument("--verbose", "-v", action="store_true", help="also show the model's metadata")
    show.set_defaults(func=c.cmd_show)

    rm = sub.add_parser("rm", help="remove models from the server's store")
    rm.add_argument("models", nargs="+", metavar="model")
    rm.set_defaults(func=c.cmd_rm)

    cp = sub.add_parser("cp", help="copy a model under a new name")
    cp.add_argument("source")
    cp.add_argument("destination")
    cp.set_defaults(func=c.cmd_cp)

    create = sub.add_parser("create", help="create a model from a Modelfile")
    create.add_argument("model")
    create.add_argument("--file", "-f", default=None, help="the Modelfile (default: ./Modelfile)")
    create.add_argument("--quantize", "-q", default=None, help="quantize the weights to this type")
    create.set_defaults(func=c.cmd_create)

    stop = sub.add_parser("stop", help="unload a running model")
    stop.add_argument("model")
    stop.set_defaults(func=c.cmd_stop)


def build_parser() -> argparse.ArgumentParser:
    from shoal.bench.cli import add_bench_command
    from shoal.cli.keys import add_keys_command
    from shoal.cli.local import add_local_commands
    from shoal.cli.server_control import add_server_command
    from shoal.cli.top import add_top_command

    parser = argparse.ArgumentParser(
        prog="shoal", description="Self-hosted LLM serving.",
        epilog="Client commands talk to the server at SHOAL_HOST (default 127.0.0.1:11434); "
               "`shoal env` lists every setting.")
    parser.add_argument("--version", "-v", action="store_true", help="show the client and server versions")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_client_commands(sub)
    add_local_commands(sub)
    add_server_command(sub)
    add_keys_command(sub)
    add_top_command(sub)
    add_bench_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    set_openmp_defaults()   # before torch loads libgomp, which reads them once
    parser = build_parser()
    # NOTE: as with Ollama's CLI, flags may come after the prompt: `shoal run m "hi" --verbose`.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command == "run" and not any(e.startswith("-") and e != "-" for e in extra):
            args.prompt = [*args.prompt, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.version:
        from shoal.cli.commands import print_version

        return print_version()
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        _fail(str(exc))
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `shoal list | head`: the reader left; say nothing.
        try:
            sys.stdout = open("/dev/null", "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
        except OSError:
            pass
        return 0


def _fail(message: str) -> None:
    print(f"shoal: {message}", file=sys.stderr, flush=True)


__all__ = ["build_parser", "main"]
