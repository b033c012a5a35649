"""The commands that run in this process: `serve`, and engine-level `chat` / `generate` / `model-path` / `env`."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None,
                        help="GGUF file, Hugging Face directory, or 'default' (SmolLM2-135M-Instruct)")
    parser.add_argument("--compute", choices=("fast", "exact"), default=None,
                        help="fast: int8 kernels (default); exact: float weights")
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--verbose", "-v", action="store_true", help="print timings and tokens/s")


def _stream(args: argparse.Namespace, chat: bool) -> int:
    from shoal.core.config import EngineConfig
    from shoal.engine.builder import build_engine_core
    from shoal.core.errors import ShoalError
    from shoal.core.sampling_params import SamplingParams

    prompt = " ".join(args.prompt) if args.prompt else ""
    if not prompt and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if not prompt.strip():
        print("shoal: give a prompt (as arguments or on stdin)", file=sys.stderr)
        return 2
    try:
        config = EngineConfig.from_env(model=args.model, compute=args.compute, device=args.device)
        core, info = build_engine_core(config)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        tokenizer = core.tokenizer
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            ids = tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = tokenizer.encode(prompt)
        started = time.monotonic()
        core.add_request("cli", ids, params)
        first = None
        count = 0
        while core.has_unfinished_requests():
            for out in core.step():
                if first is None:
                    first = time.monotonic()
                count += len(out.token_ids)
                sys.stdout.write(out.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        ended = time.monotonic()
    except ShoalError as exc:
        print(f"shoal: {exc}", file=sys.stderr)
        return 1
    if args.verbose:
        decode = ended - (first or ended)
        print(f"model:          {info.model_path} ({info.compute}, {info.device})\n"
              f"load duration:  {info.load_seconds:.2f}s\n"
              f"prompt tokens:  {len(ids)}\n"
              f"time to first:  {(first or ended) - started:.3f}s\n"
              f"output tokens:  {count}\n"
              f"decode rate:    {(count - 1) / decode if decode > 0 and count > 1 else 0:.1f} tokens/s",
              file=sys.stderr)
    return 0


def _model_path(args: argparse.Namespace) -> int:
    from shoal.core.errors import ShoalError
    from shoal.model.loader import resolve_model

    try:
        print(resolve_model(args.model))
    except ShoalError as exc:
        print(f"shoal: {exc}", file=sys.stderr)
        return 1
    return 0


def _env(_args: argparse.Namespace) -> int:
    from shoal.serving.settings import SERVER_ENV_VARS
    from shoal.cli.client import CLIENT_ENV_VARS
    from shoal.core.config import ENV_VARS
    from shoal.serving.policy import CONFIG_ENV_DOC, CONFIG_ENV_VAR

    print(f"{CONFIG_ENV_VAR:34s} {CONFIG_ENV_DOC}")
    for name, (_field, doc) in {**SERVER_ENV_VARS, **ENV_VARS}.items():
        if name == "SHOAL_HOST":
            doc += " Client commands (run, list, ...) connect to it; 'http://host:port' works too."
        print(f"{name:34s} {doc}")
    for name, doc in CLIENT_ENV_VARS.items():
        print(f"{name:34s} {doc}")
    return 0


def _port_in_use(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _auth_problem(settings) -> str | None:
    """Why the server must not start with this key policy (e.g. public and no keys)."""
    from shoal.core.errors import ShoalError
    from shoal.access.auth import startup_problem
    from shoal.access.keydb import keys_db_path

    try:
        return startup_problem(settings.auth, settings.host, keys_db_path(settings.keys_db),
                               settings.admin_key)
    except ShoalError as exc:
        return str(exc)


def _serve(args: argparse.Namespace) -> int:
    from shoal.core.errors import ShoalError
    from shoal.serving.policy import load_serve_config, policy_lines

    try:
        resolved = load_serve_config(
            args.config,
            server_flags=dict(host=args.host, port=args.port, served_model_name=args.served_model_name,
                              max_queue=args.max_queue, max_queue_batch=args.max_queue_batch,
                              max_queued_tokens=args.max_queued_tokens,
                              queue_timeout=args.queue_timeout, drain_timeout=args.drain_timeout,
                              auth=args.auth, log_file=args.log_file, replicas=args.replicas,
                              use_ray=args.ray or None, ray_address=args.ray_address,
                              replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus,
                              routing=args.routing),
            engine_flags=dict(model=args.model, compute=args.compute, device=args.device,
                              max_model_len=args.max_model_len, kv_cache_bytes=args.kv_cache_bytes,
                              max_num_seqs=args.max_num_seqs))
    except ShoalError as exc:
        print(f"shoal: {exc}", file=sys.stderr)
        return 2
    settings, config = resolved.settings, resolved.engine
    # Fail before the model loads, with the likely reason.
    if (problem := _auth_problem(settings)) is not None:
        print(f"shoal: {problem}", file=sys.stderr)
        return 1
    from shoal.access.auth import is_loopback

    if settings.auth == "off" and not is_loopback(settings.host):
        print(f"shoal: warning: serving {settings.host} without API keys (SHOAL_AUTH=off): anyone "
              "who can reach this port may use and manage its models", file=sys.stderr)
    if _port_in_use(settings.host, settings.port):
        print(f"shoal: cannot listen on {settings.host}:{settings.port}: the port is in use "
              "(another shoal, or Ollama on its default port?). Choose one with --port or SHOAL_PORT.",
              file=sys.stderr)
        return 1
    from shoal.http.server import serve

    pid_file = Path(args.pid_file) if args.pid_file else None
    if pid_file:
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{os.getpid()}\n")
    try:
        serve(config, settings, policy_lines(resolved), verbose=args.verbose)
    except ShoalError as exc:
        print(f"shoal: {exc}", file=sys.stderr)
        return 1
    finally:
        # NOTE: only our own pid: a newer server on the same port may have replaced the file.
        if pid_file and _reads_pid(pid_file) == os.getpid():
            pid_file.unlink(missing_ok=True)
    return 0


def _reads_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def add_local_commands(sub) -> None:
    """`chat`, `generate`, `model-path`, `serve` and `env` on the `shoal` parser's subparsers."""
    chat = sub.add_parser("chat", help="answer one chat message in this process, no server (streams the answer)")
    _add_engine_args(chat)
    chat.add_argument("prompt", nargs="*")
    chat.set_defaults(func=lambda a: _stream(a, chat=True))
    gen = sub.add_parser("generate", help="continue a raw text prompt in this process, no server")
    _add_engine_args(gen)
    gen.add_argument("prompt", nargs="*")
    gen.set_defaults(func=lambda a: _stream(a, chat=False))
    path = sub.add_parser("model-path", help="print a model's file path (fetches the default)")
    path.add_argument("model", nargs="?", default=None)
    path.set_defaults(func=_model_path)
    serve = sub.add_parser("serve", help="serve the OpenAI and Ollama HTTP APIs")
    serve.add_argument("--model", "-m", default=None,
                       help="GGUF file, Hugging Face directory, or 'default' (SmolLM2-135M-Instruct)")
    serve.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; SHOAL_HOST)")
    serve.add_argument("--port", "-p", type=int, default=None, help="port (default 11434; SHOAL_PORT)")
    serve.add_argument("--served-model-name", default=None, help="the name clients use for the model (several: comma-separated, first reported)")
    serve.add_argument("--compute", choices=("fast", "exact"), default=None,
                       help="fast: int8 kernels (default); exact: float weights (SHOAL_COMPUTE)")
    serve.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    serve.add_argument("--verbose", action="store_true",
                       help="log every effective setting at start, not just those changed")
    serve.add_argument("--max-model-len", type=int, default=None, help="context length cap")
    serve.add_argument("--kv-cache-bytes", default=None, help="KV cache budget, e.g. 2GiB")
    serve.add_argument("--max-num-seqs", type=int, default=None, help="largest running batch")
    serve.add_argument("--config", default=None,
                       help="TOML file of [server] and [engine] settings (SHOAL_CONFIG); "
                            "variables and flags override it")
    serve.add_argument("--max-queue", type=int, default=None,
                       help="interactive requests that may wait beyond the running batch before 503s")
    serve.add_argument("--max-queue-batch", type=int, default=None,
                       help="batch requests that may wait beyond the running batch before 503s")
    serve.add_argument("--max-queued-tokens", type=int, default=None,
                       help="prompt tokens that may wait per model before 503s")
    serve.add_argument("--queue-timeout", default=None,
                       help="longest wait to be scheduled before 503, e.g. 60s (0: none)")
    serve.add_argument("--drain-timeout", default=None,
                       help="on SIGTERM/SIGINT, how long running requests may finish, e.g. 30s")
    serve.add_argument("--auth", choices=("auto", "on", "off"), default=None,
                       help="API keys: auto (required unless on loopback; default), on, off (SHOAL_AUTH)")
    serve.add_argument("--pid-file", default=None,
                       help="write the server's pid here, removed when it exits (`shoal run` passes "
                            "$SHOAL_HOME/server-PORT.pid; `shoal server stop` reads it)")
    serve.add_argument("--log-file", default=None,
                       help="log to this file instead of stderr, rotated by size (SHOAL_LOG_FILE)")
    serve.add_argument("--replicas", type=int, default=None,
                       help="run N engine replicas on Ray behind this front (docs/scale-out.md; SHOAL_REPLICAS)")
    serve.add_argument("--ray", action="store_true", help="serve through Ray even for one replica (SHOAL_RAY)")
    serve.add_argument("--ray-address", default=None,
                       help="join this Ray cluster ('auto', host:port; RAY_ADDRESS; SHOAL_RAY_ADDRESS)")
    serve.add_argument("--replica-cpus", default=None, help="Ray CPUs (and threads) per replica (default 1)")
    serve.add_argument("--replica-gpus", default=None, help="Ray GPUs per replica (default 0)")
    serve.add_argument("--routing", choices=("cache_aware", "least_loaded", "round_robin"), default=None,
                       help="how the front picks a replica (default cache_aware; SHOAL_ROUTING)")
    serve.set_defaults(func=_serve)
    env = sub.add_parser("env", help="list the SHOAL_* environment variables")
    env.set_defaults(func=_env)
