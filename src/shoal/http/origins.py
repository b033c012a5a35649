"""Which browser origins may call the server (CORS), as Ollama decides it.

Allowed: localhost, 127.0.0.1 and 0.0.0.0 over http or https on any port, the app://,
file://, tauri://, vscode-webview:// and vscode-file:// schemes (Ollama's defaults), and
whatever SHOAL_ORIGINS adds (comma-separated, `*` matches any characters, `*` alone
allows every origin), as OLLAMA_ORIGINS does.

Starlette's CORSMiddleware answers preflights and adds the headers. As Ollama does, a
request that carries a disallowed Origin is also refused (403), not only left without CORS
headers: a web page's simple request (a form POST, which needs no preflight) would
otherwise still run, e.g. delete a model, even though the page cannot read the answer.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

DEFAULT_ORIGINS: tuple[str, ...] = (
    *(f"{scheme}://{host}{port}" for host in ("localhost", "127.0.0.1", "0.0.0.0")
      for scheme in ("http", "https") for port in ("", ":*")),
    "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*",
)
# Ollama's default methods; headers: any, since no cookies or credentials are involved.
ALLOWED_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


def allowed_origins(extra: str | None) -> list[str]:
    """SHOAL_ORIGINS' entries (quotes and spaces trimmed, as Ollama does), then the defaults."""
    added = [o.strip().strip("\"'").strip() for o in (extra or "").split(",")]
    return [o for o in added if o] + list(DEFAULT_ORIGINS)


def _pattern(origin: str) -> str:
    return ".*".join(re.escape(part) for part in origin.split("*"))


class OriginPolicy(CORSMiddleware):
    """CORS for the allowed origins; requests from any other origin get `refuse(path, origin)`."""

    def __init__(self, app: ASGIApp, origins: Iterable[str],
                 refuse: Callable[[str, str], Response]) -> None:
        origins = list(origins)
        wildcards = [o for o in origins if "*" in o and o != "*"]
        super().__init__(
            app,
            allow_origins=["*"] if "*" in origins else [o for o in origins if "*" not in o],
            allow_origin_regex="|".join(_pattern(o) for o in wildcards) or None,
            allow_methods=ALLOWED_METHODS,
            allow_headers=["*"],
            expose_headers=["X-Request-Id"],
        )
        self.refuse = refuse

    async def simple_response(self, scope: Scope, receive: Receive, send: Send,
                              request_headers: Headers) -> None:
        origin = request_headers.get("origin")
        if origin is not None and not self.is_allowed_origin(origin):
            await self.refuse(scope.get("path", ""), origin)(scope, receive, send)
            return
        await super().simple_response(scope, receive, send, request_headers)
