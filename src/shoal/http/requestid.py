"""Request ids: one per HTTP request, taken from the caller's X-Request-Id or made here.

The id is returned in the X-Request-Id response header of every response, and set in
`current_request_id` so log lines, the access and audit logs and traces carry it.
"""
from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-Id"
_HEADER_KEY = HEADER.lower().encode()
MAX_LENGTH = 128
# Printable ASCII without spaces: an id must not break a log line or forge a header.
_VALID = re.compile(rb"[\x21-\x7e]{1,%d}" % MAX_LENGTH)

current_request_id: ContextVar[str | None] = ContextVar("shoal_request_id", default=None)


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's X-Request-Id when it is a sane token, else a new uuid4 (hex)."""
    for key, value in headers:
        if key.lower() == _HEADER_KEY:
            if _VALID.fullmatch(value):
                return value.decode("ascii")
            break
    return uuid.uuid4().hex


def request_id_headers() -> dict[str, str]:
    """The X-Request-Id header of the request being served ({} outside a request)."""
    request_id = current_request_id.get()
    return {HEADER: request_id} if request_id else {}


class RequestIdMiddleware:
    """Gives each HTTP request its id and stamps it on the response (errors and streams too)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope.get("headers", []))
        # NOTE: set for the rest of this request's task and deliberately not reset: a 500 is
        # rendered by Starlette's outermost error middleware, after this one has returned,
        # and its handler reads the id from here to stamp that response too.
        current_request_id.set(request_id)
        stamp = (_HEADER_KEY, request_id.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(key.lower() == _HEADER_KEY for key, _ in headers):
                    message = {**message, "headers": [*headers, stamp]}
            await send(message)

        await self.app(scope, receive, send_with_id)
