"""A deadline for receiving each request's headers (slow-loris defence at the HTTP layer).

uvicorn has no timeout while a request arrives: its keep-alive timer runs only between
requests and restarts on every byte received, so a client that opens a connection and sends
nothing, or trickles a header one byte a second, holds the connection (and its socket) for
ever. The ASGI app cannot help: it is called only once the headers are complete. This
protocol closes a connection whose request headers are not complete within the deadline;
the body's deadline is BodyLimitMiddleware's (api/app.py), which can still answer 408.
"""
from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


def header_deadline_protocol(timeout: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, closing connections whose headers take over `timeout` s."""

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()     # a connection that never starts a request is closed too

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()     # each request on a kept-alive connection gets its own deadline

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                log.warning("closing a connection from %s: its request headers did not arrive "
                            "within %gs (SHOAL_READ_TIMEOUT)", self.client, timeout)
                self.transport.close()

    return HeaderDeadlineProtocol
