"""Limits uvicorn lacks while a request's headers arrive: a deadline, and a size cap.

uvicorn has no timeout while a request arrives: its keep-alive timer runs only between
requests and restarts on every byte received, so a client that opens a connection and sends
nothing, or trickles a header one byte a second, holds the connection (and its socket) for
ever. Nor does it bound the request line and headers: one connection could send gigabytes of
header, all kept in memory. The ASGI app cannot help: it is called only once the headers are
complete. This protocol closes a connection whose headers are not complete within the
deadline, and answers 431 to headers over MAX_HEADER_BYTES; the body's deadline and size are
BodyLimitMiddleware's (body_limits.py).
"""
from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shoal.http.error_responses import error_response
from shoal.http.errors import HttpError

log = logging.getLogger(__name__)

# NOTE: the request line plus every header; real requests (a bearer token, some cookies)
# use a few KiB. nginx allows 4 x 8 KiB by default.
MAX_HEADER_BYTES = 64 << 10


def limited_http_protocol(timeout: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, closing connections whose headers take over `timeout` s
    and answering 431 to headers over MAX_HEADER_BYTES."""

    class LimitedHttpProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None      # set while headers are arriving
        _header_bytes = 0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()     # a connection that never starts a request is closed too

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()     # each request on a kept-alive connection gets its own deadline

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._deadline is None or self.transport.is_closing():
                return
            # NOTE: counted after parsing: a chunk that completes the headers may carry a
            # large body after them, which is not header bytes.
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._reject_large_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_bytes = 0
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

        def _reject_large_headers(self) -> None:
            self._disarm()
            path = (getattr(self, "url", b"") or b"/").decode("latin-1").split("?", 1)[0]
            response = error_response(path, HttpError(
                431, f"the request line and headers are larger than {MAX_HEADER_BYTES} bytes",
                code="request_header_fields_too_large"))
            self.transport.write(b"".join([
                b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(response.body),
                b"connection: close\r\n\r\n", response.body]))
            self.transport.close()

    return LimitedHttpProtocol
