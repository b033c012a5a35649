"""A load generator's HTTP/1.1 client that costs its machine as little CPU as it can:
request/answer (LeanClient) and streamed server-sent events (post_events).

On a 2-core host the benchmark's clients share the server's cores, so every millisecond a
client spends building and parsing requests is a millisecond the server under test lacks.
This client sends prebuilt request bytes over keep-alive connections and reads each answer
only as far as HTTP needs: the status line, Content-Length (or a chunked body's sizes) and
the body's bytes. Callers check what they need of the body themselves (cheaply: a count of
a byte string, not a JSON parse). Under half of aiohttp's CPU per request here (docs/
benchmarks.md, "Embeddings (issue 15)").

Only what a benchmark against a known server needs: no redirects, no TLS, no proxies.
"""
from __future__ import annotations

import asyncio
import time
from typing import Self
from urllib.parse import urlsplit


class HttpError(RuntimeError):
    """A non-2xx answer, or a connection that closed before its answer ended."""


class _Answer(asyncio.Protocol):
    """One connection's answers, one at a time: `ask` sends a request, its future resolves to
    (status, body) once the whole body has arrived."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.pending: asyncio.Future | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = exc or HttpError("the server closed the connection")
        if self.pending is not None and not self.pending.done():
            self.pending.set_exception(self.lost)

    def ask(self, request: bytes) -> asyncio.Future:
        if self.lost is not None:
            raise self.lost
        self.pending = asyncio.get_running_loop().create_future()
        self.transport.write(request)  # type: ignore[union-attr]
        return self.pending

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            answer = _parse(self.buffer)
        except (HttpError, ValueError) as exc:      # the caller hears of it, not the loop's log
            if self.pending is not None and not self.pending.done():
                self.pending.set_exception(HttpError(f"unreadable answer: {exc}"))
            return
        if answer is not None and self.pending is not None and not self.pending.done():
            status, body, used = answer
            del self.buffer[:used]
            self.pending.set_result((status, body))


def _head(buffer: bytearray) -> tuple[int, int, bool, int] | None:
    """(status, where the body starts, chunked, Content-Length or -1) of the answer whose head
    opens `buffer`, or None while the head is incomplete."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = bytes(buffer[:head_end]).lower()
    length = -1
    if (at := head.find(b"\r\ncontent-length:")) >= 0:
        line_end = head.find(b"\r\n", at + 2)
        length = int(head[at + 17:line_end if line_end > 0 else len(head)])
    return int(head[9:12]), head_end + 4, b"\r\ntransfer-encoding: chunked" in head, length


def _parse(buffer: bytearray) -> tuple[int, bytes, int] | None:
    """(status, body, bytes used) of the first complete answer in `buffer`, or None."""
    head = _head(buffer)
    if head is None:
        return None
    status, start, chunked, length = head
    if chunked:
        body = bytearray()
        at = start
        while True:
            line_end = buffer.find(b"\r\n", at)
            if line_end < 0:
                return None
            size = int(bytes(buffer[at:line_end]).split(b";")[0], 16)
            if len(buffer) < line_end + 2 + size + 2:
                return None
            body += buffer[line_end + 2:line_end + 2 + size]
            at = line_end + 2 + size + 2
            if size == 0:
                return status, bytes(body), at
    if length >= 0:
        if len(buffer) < start + length:
            return None
        return status, bytes(buffer[start:start + length]), start + length
    raise HttpError("an answer with neither Content-Length nor chunked encoding")


class LeanClient:
    """`connections` keep-alive connections to `url`; `send` uses whichever is free."""

    def __init__(self, url: str, connections: int) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.netloc = parts.netloc
        self.connections = connections
        self._free: asyncio.Queue[_Answer] = asyncio.Queue()

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        for _ in range(self.connections):
            _, protocol = await loop.create_connection(_Answer, self.host, self.port)
            self._free.put_nowait(protocol)
        return self

    async def __aexit__(self, *_: object) -> None:
        while not self._free.empty():
            protocol = self._free.get_nowait()
            if protocol.transport is not None:
                protocol.transport.close()

    def request(self, path: str, body: bytes, content_type: str = "application/json") -> bytes:
        """A POST's bytes, to build once and send many times."""
        return (f"POST {path} HTTP/1.1\r\nHost: {self.netloc}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def send(self, request: bytes) -> bytes:
        """The body of the answer to `request` (from `request()`); HttpError unless 2xx."""
        protocol = await self._free.get()
        try:
            status, body = await protocol.ask(request)
        finally:
            if protocol.lost is None:
                self._free.put_nowait(protocol)
        if not 200 <= status < 300:
            raise HttpError(f"HTTP {status}: {body[:200]!r}")
        return body


class _EventStream(asyncio.Protocol):
    """One request's streamed answer (server-sent events): each event's bytes go to `on_event`
    with the time its last byte arrived; `done` resolves when the answer ends."""

    def __init__(self, request: bytes, on_event, done: asyncio.Future) -> None:
        self.request, self.on_event, self.done = request, on_event, done
        self.head = bytearray()
        self.status = 0
        self.chunked: bool | None = None    # None: the body ends when the connection does
        self.left = -1                      # Content-Length bytes still to come
        self.raw = bytearray()              # chunked framing not yet decoded
        self.text = bytearray()             # decoded body not yet split into events
        self.ended = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        try:
            self._receive(data, time.perf_counter())
        except ValueError as exc:       # a malformed head or chunk size: the caller hears of it
            if not self.done.done():
                self.done.set_exception(HttpError(f"unreadable answer: {exc}"))
            self.transport.close()

    def _receive(self, data: bytes, now: float) -> None:
        if not self.status:
            self.head += data
            head = _head(self.head)
            if head is None:
                return
            self.status, start, chunked, length = head
            data = bytes(self.head[start:])
            if chunked:
                self.chunked = True
            else:
                self.left = length
        if self.chunked:
            self.raw += data
            self._dechunk()
        else:
            self.text += data
            if self.left >= 0:
                self.left -= len(data)
                self.ended = self.left <= 0
        self._events(now)
        if self.ended:
            self._finish()

    def _dechunk(self) -> None:
        while not self.ended:
            line_end = self.raw.find(b"\r\n")
            if line_end < 0:
                return
            size = int(bytes(self.raw[:line_end]).split(b";")[0], 16)
            if len(self.raw) < line_end + 2 + size + 2:
                return
            self.text += self.raw[line_end + 2:line_end + 2 + size]
            del self.raw[:line_end + 2 + size + 2]
            self.ended = size == 0

    def _events(self, now: float) -> None:
        if self.status != 200:
            return
        while True:
            end = self.text.find(b"\n\n")
            if end < 0:
                return
            event = bytes(self.text[:end]).strip(b"\r")
            del self.text[:end + 2]
            self.on_event(event, now)

    def _finish(self) -> None:
        if self.done.done():
            return
        if self.status != 200:
            self.done.set_exception(HttpError(f"HTTP {self.status}: {bytes(self.text[:200])!r}"))
        else:
            self.done.set_result(None)
        self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.chunked is None and self.left < 0 and exc is None:
            self._events(time.perf_counter())     # a body that ends with the connection
            self.ended = True
        if self.ended:
            self._finish()
        elif not self.done.done():
            self.done.set_exception(exc or HttpError("the server closed the connection mid-answer"))


async def post_events(url: str, path: str, body: bytes, on_event) -> None:
    """POSTs `body` (JSON) to url+path on a connection of its own and calls on_event(event,
    arrived) for each server-sent event of the answer; HttpError unless it is a 200. One
    connection per request: some servers (llama.cpp's) close idle keep-alive connections, and
    a reused one that closed fails through no fault of the server."""
    parts = urlsplit(url)
    request = (f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
               f"Accept: text/event-stream\r\nConnection: close\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    await loop.create_connection(lambda: _EventStream(request, on_event, done),
                                 parts.hostname or "127.0.0.1", parts.port or 80)
    await done
