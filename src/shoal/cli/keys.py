"""`shoal keys create | list | revoke`: API keys, managed on the keys DB directly.

Whoever can write $SHOAL_KEYS_DB (default ~/.shoal/keys.db) is the local admin; running
servers see changes at the next request. Remote admins use the /admin/keys HTTP API.
"""
from __future__ import annotations

import argparse
import json
import sys


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _open_db():
    from shoal.access.keydb import KeyDB, keys_db_path

    return KeyDB(keys_db_path())


def _create(args: argparse.Namespace) -> int:
    from shoal.access.keys import parse_expiry
    from shoal.access.principal import KeyLimits

    limits = KeyLimits(requests_per_minute=args.rpm, tokens_per_minute=args.tpm,
                       max_concurrent=args.max_concurrent,
                       max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens)
    models = [m.strip() for m in args.models.split(",")] if args.models is not None else None
    expires_at = parse_expiry(args.expires) if args.expires else None
    with _open_db() as db:
        key, record = db.create(args.name, models=models, limits=limits,
                                priority_class=args.priority_class, expires_at=expires_at,
                                admin=args.admin)
    # NOTE: the key alone on stdout (KEY=$(shoal keys create bot) works); the rest on stderr.
    print(f"created API key '{record.name}' (id {record.id}"
          f"{', admin' if record.admin else ''}). It is shown only now; store it safely:",
          file=sys.stderr)
    print(key)
    return 0


def _limit(value: int | None) -> str:
    return "-" if value is None else str(value)


def _list(args: argparse.Namespace) -> int:
    from shoal.cli.display import human_time, print_table

    with _open_db() as db:
        records = db.list()
    keys = [record.to_json() for record in records]
    if args.json:
        print(json.dumps(keys, indent=2))
        return 0
    rows = [[k["id"], k["name"], k["status"] + (" (admin)" if k["admin"] else ""),
             ",".join(k["models"]) if k["models"] is not None else "all",
             _limit(k["rpm"]), _limit(k["tpm"]), _limit(k["max_concurrent"]), k["priority_class"],
             human_time(k["expires_at"], "never"), human_time(k["last_used_at"], "never")]
            for k in keys]
    print_table(["ID", "NAME", "STATUS", "MODELS", "RPM", "TPM", "CONCURRENT", "CLASS", "EXPIRES",
                 "LAST USED"], rows)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    with _open_db() as db:
        record = db.revoke(args.id)
    print(f"revoked API key '{record.name}' (id {record.id})")
    return 0


def _run(func):
    """Runs a subcommand; shoal's own errors become one line on stderr and exit code 1."""
    def run(args: argparse.Namespace) -> int:
        from shoal.core.errors import ShoalError

        try:
            return func(args)
        except ShoalError as exc:
            print(f"shoal: {exc}", file=sys.stderr)
            return 1
    return run


def add_keys_command(sub) -> None:
    """`shoal keys ...` on the `shoal` parser's subparsers."""
    keys = sub.add_parser("keys", help="manage API keys (create, list, revoke)",
                          description="API keys, stored hashed in $SHOAL_KEYS_DB "
                                      "(default $SHOAL_HOME/keys.db).")
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    create = actions.add_parser("create", help="create a key and print it (shown only once)")
    create.add_argument("name", help="who or what uses the key (unique among active keys)")
    create.add_argument("--models", default=None, metavar="A,B",
                        help="the only models the key may use (default: all)")
    create.add_argument("--rpm", type=_positive, default=None, help="requests per minute")
    create.add_argument("--tpm", type=_positive, default=None,
                        help="tokens per minute (prompt + generated)")
    create.add_argument("--max-concurrent", type=_positive, default=None,
                        help="requests running at once")
    create.add_argument("--class", dest="priority_class", choices=("interactive", "batch"),
                        default="interactive", help="priority class (default interactive)")
    create.add_argument("--expires", default=None, metavar="WHEN",
                        help="a duration (30d, 12h, 90m) or an ISO date/time (default: never)")
    create.add_argument("--max-prompt-tokens", type=_positive, default=None,
                        help="longest prompt accepted, in tokens")
    create.add_argument("--max-tokens", type=_positive, default=None,
                        help="cap on a request's max_tokens (larger asks are lowered to it)")
    create.add_argument("--admin", action="store_true", help="may manage models and keys")
    create.set_defaults(func=_run(_create))

    listing = actions.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=_run(_list))

    revoke = actions.add_parser("revoke", help="revoke a key by its id (it stops working at once)")
    revoke.add_argument("id")
    revoke.set_defaults(func=_run(_revoke))
