"""The cap on open client connections (SHOAL_MAX_CONNECTIONS), and the open-file limit it needs.

Every connection holds a socket, and an idle one costs its client nothing: without a cap, tens
of thousands of idle connections exhaust the process's file descriptors, and then every normal
request fails at accept() with nothing in the log. uvicorn's limit_concurrency counts the
right things but answers a bare 503 with no Retry-After, and warns once per refused request.
Here a connection opened beyond the cap is answered, as soon as its request's headers are in,
with a 503 + Retry-After in the path's dialect, then closed; it gets only a short while to send
them. One warning line per WARN_INTERVAL_S says how many were refused.

The process's soft limit on open files is often 1024, which the cap alone would reach; at start
it is raised to the hard limit, and the cap lowered (with a warning) if it still does not fit.
"""
from __future__ import annotations

import asyncio
import logging
import time

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shoal.http.error_responses import error_response
from shoal.http.errors import HttpError

log = logging.getLogger(__name__)

# Descriptors kept for everything that is not a client connection: the listening socket, model
# files, the audit and server logs, the keys DB, pulls in progress, worker threads' pipes.
RESERVED_FDS = 128
# A refused connection's time to send its request line and headers before it is just closed.
REFUSED_HEADER_TIMEOUT_S = 2.0
RETRY_AFTER_S = 1
WARN_INTERVAL_S = 10.0


def raise_open_file_limit() -> int | None:
    """Raises the soft limit on open files to the hard limit; returns the new soft limit
    (None where the platform has no such limit)."""
    try:
        import resource
    except ImportError:          # not a Unix
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return None if soft == resource.RLIM_INFINITY else soft


def fitting_cap(requested: int, open_file_limit: int | None) -> int:
    """The connection cap that fits the open-file limit, with RESERVED_FDS to spare."""
    if open_file_limit is None or requested + RESERVED_FDS <= open_file_limit:
        return requested
    fitted = max(1, open_file_limit - RESERVED_FDS)
    log.warning("SHOAL_MAX_CONNECTIONS=%d does not fit this process's open-file limit (%d); "
                "allowing %d connections (raise `ulimit -n` for more)", requested, open_file_limit,
                fitted)
    return fitted


class _RefusalLog:
    """One warning per WARN_INTERVAL_S, counting the connections refused meanwhile."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.refused = 0
        self.last_warned = -float("inf")

    def refused_one(self, open_connections: int) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self.last_warned >= WARN_INTERVAL_S:
            log.warning("refused %d connection(s) with 503: %d are open, the most allowed is %d "
                        "(SHOAL_MAX_CONNECTIONS)", self.refused, open_connections, self.cap)
            self.refused, self.last_warned = 0, now


def capped_http_protocol(base: type[HttpToolsProtocol], cap: int) -> type[HttpToolsProtocol]:
    """`base` (uvicorn's httptools protocol or a subclass) refusing connections beyond `cap`."""
    refusals = _RefusalLog(cap)

    async def refuse(scope, receive, send) -> None:
        path = scope.get("path", "")
        response = error_response(path, HttpError(
            503, f"server busy: {cap} connections are open, the most it accepts "
                 "(SHOAL_MAX_CONNECTIONS); try again shortly", type="server_error",
            code="too_many_connections", headers={"Retry-After": str(RETRY_AFTER_S),
                                                  "Connection": "close"}))
        await response(scope, receive, send)

    class CappedHttpProtocol(base):  # type: ignore[valid-type, misc]
        _over_cap = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > cap:
                self._over_cap = True
                # NOTE: not closed at once: a client that has sent its request and then finds
                # the connection reset may never read the 503; it is answered when its headers
                # are in, and closed if they do not come soon.
                self._refusal_deadline = self.loop.call_later(REFUSED_HEADER_TIMEOUT_S,
                                                              self._close_refused)
                # NOTE: the app this connection's request runs (uvicorn reads it per request)
                self.app = refuse

        def on_headers_complete(self) -> None:
            if self._over_cap:
                self._refusal_deadline.cancel()
                refusals.refused_one(len(self.connections))
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._over_cap:
                self._refusal_deadline.cancel()
            super().connection_lost(exc)

        def _close_refused(self) -> None:
            if not self.transport.is_closing():
                refusals.refused_one(len(self.connections))
                self.transport.close()

    return CappedHttpProtocol
