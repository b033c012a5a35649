"""The request body's limits: its size (SHOAL_MAX_BODY_BYTES, 413) and how long it may take to
arrive (SHOAL_READ_TIMEOUT, 408); the headers' are header_limits.py's."""
from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal.http.error_responses import error_response
from shoal.http.errors import HttpError


class BodyLimitMiddleware:
    """Refuses bodies over the limit with 413, before any JSON parsing; every body is JSON.

    The body is read here (at most `limit` bytes, within `read_timeout` seconds, else 408
    and the connection is closed) and replayed to the app; later receive() calls go to the
    server, so a disconnect is still seen by the app. Bodies are read as JSON whatever their
    Content-Type, as Ollama's server does: `curl -d '{...}'` sends form encoding, and
    Ollama's own docs use exactly that.
    """

    def __init__(self, app: ASGIApp, limit: int, read_timeout: float) -> None:
        self.app = app
        self.limit = limit
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS") or \
                scope.get("path", "").startswith("/api/blobs/"):
            # NOTE: blob uploads are model files, streamed to disk by their route.
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        declared = dict(scope.get("headers", ())).get(b"content-length")
        too_large = HttpError(413, f"the request body is larger than the limit of {self.limit} bytes "
                                   "(SHOAL_MAX_BODY_BYTES)", code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await error_response(path, too_large)(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        try:
            # NOTE: a total deadline, not an idle one: a client trickling one byte a second
            # (or declaring more bytes than it sends) must not hold the connection for ever.
            async with asyncio.timeout(self.read_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.limit:
                        await error_response(path, too_large)(scope, receive, send)
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            too_slow = HttpError(408, f"the request body did not arrive within {self.read_timeout:g}s "
                                      "(SHOAL_READ_TIMEOUT)", code="request_timeout",
                                 headers={"Connection": "close"})
            await error_response(path, too_slow)(scope, receive, send)
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, replay, send)
