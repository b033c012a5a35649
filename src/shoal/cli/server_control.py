"""`shoal server status` and `shoal server stop`: the background server that `shoal run`
started (its pid file is $SHOAL_HOME/server-PORT.pid, removed by the server when it exits)."""
from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

from shoal.cli.client import CliError, Client, parse_host, shoal_home
from shoal.cli.waiting import server_activity


def pid_file(port: int) -> Path:
    return shoal_home() / f"server-{port}.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recorded_pid(path: Path) -> int | None:
    """The pid in the file if that process still runs; a stale file is removed."""
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    if _alive(pid):
        return pid
    path.unlink(missing_ok=True)
    return None


def cmd_server_status(args: argparse.Namespace) -> int:
    host = parse_host()
    pid = _recorded_pid(pid_file(host.port))
    with Client(host) as client:
        state = client.probe()
    started = f" (pid {pid}, started by shoal run; `shoal server stop` stops it)" if pid else ""
    if state == "down":
        print(f"no shoal server answers at {host.url}")
        return 1
    activity = server_activity(host.url, timeout=2.0)
    print(f"a shoal server runs at {host.url}{started}: "
          f"{'ready' if state == 'up' else 'busy'}{f'; {activity}' if activity else ''}")
    return 0


def cmd_server_stop(args: argparse.Namespace) -> int:
    host = parse_host()
    path = pid_file(host.port)
    pid = _recorded_pid(path)
    if pid is None:
        with Client(host) as client:
            running = client.probe() != "down"
        if running:
            raise CliError(f"the server at {host.url} was not started by `shoal run` (no {path}); "
                           "stop it where it runs (Ctrl-C, or SIGTERM to its process)")
        print(f"no shoal server runs at {host.url}")
        return 0
    os.kill(pid, signal.SIGTERM)   # the server drains running requests, then exits
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        raise CliError(f"the server (pid {pid}) is still draining after {args.timeout:.0f}s; "
                       f"`kill {pid}` again to stop it at once")
    path.unlink(missing_ok=True)
    print(f"stopped the shoal server at {host.url} (pid {pid})")
    return 0


def add_server_command(sub) -> None:
    server = sub.add_parser("server", help="status or stop of the background server `shoal run` started")
    actions = server.add_subparsers(dest="action", metavar="ACTION", required=True)
    status = actions.add_parser("status", help="whether a server answers at SHOAL_HOST, and what it does")
    status.set_defaults(func=cmd_server_status)
    stop = actions.add_parser("stop", help="stop it (SIGTERM: running requests finish first)")
    stop.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for it to exit")
    stop.set_defaults(func=cmd_server_stop)
