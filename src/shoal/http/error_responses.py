"""How a failure is answered: an HttpError as the body of the path's dialect (Ollama's
{"error": "..."} under /api/, OpenAI's error object elsewhere), and the app's exception
handlers that route every failure there."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from shoal.core.echo import ECHO_LIMIT, clip
from shoal.core.errors import AccessDeniedError, ShoalError
from shoal.http import observability
from shoal.http.errors import HttpError, classify
from shoal.http.requestid import request_id_headers
from shoal.serving.disconnect import ClientDisconnected
from shoal.serving.records import dialect_of

# An error message quotes at most a few clipped values; longer means an echo clip() missed.
MAX_MESSAGE_CHARS = 4 * ECHO_LIMIT


def error_response(path: str, error: HttpError) -> JSONResponse:
    # NOTE: messages may echo user text: clipped, and with any lone surrogate escaped, so
    # that it can neither make the reply huge nor turn a 400 into a 500.
    message = clip(error.message, MAX_MESSAGE_CHARS)
    if dialect_of(path) == "ollama":
        body: dict = {"error": clip(error.ollama_message or message, MAX_MESSAGE_CHARS)}
    else:
        param = None if error.param is None else clip(error.param)
        body = {"error": {"message": message, "type": error.type, "param": param,
                          "code": error.code}}
    observability.note_refusal(message)
    # NOTE: a 500 is rendered outside the request-id middleware; the header is added here.
    return JSONResponse(body, status_code=error.status, headers={**error.headers, **request_id_headers()})


def origin_refused(path: str, origin: str) -> JSONResponse:
    return error_response(path, HttpError(403, f"requests from origin {origin} are not allowed "
                                               "(SHOAL_ORIGINS lists more)", type="permission_error",
                                          code="origin_not_allowed"))


# pydantic names the member of a union that failed (`stop.str`, `stop.list[str]`); the field
# is what the client wrote.
_UNION_MEMBERS = frozenset({"str", "int", "float", "bool"})


def _field_path(loc: Iterable) -> str:
    return ".".join(str(p) for p in loc if p != "body" and not (
        isinstance(p, str) and (p in _UNION_MEMBERS or "[" in p)))
def host_refused(path: str, host: str) -> JSONResponse:
    shown = host if len(host) <= 100 else host[:100] + "..."
    return error_response(path, HttpError(
        403, f"this server does not answer to the host name {shown!r}: a server on loopback answers "
             "only to localhost names and IP addresses, against DNS rebinding (SHOAL_ALLOWED_HOSTS "
             "adds names)", type="permission_error", code="host_not_allowed"))


def describe_validation(errors: Iterable[dict]) -> HttpError:
    """FastAPI's validation errors as one 400 that names the first bad field."""
    errors = list(errors)
    first = errors[0] if errors else {}
    param = _field_path(first.get("loc", ())) or None
    # NOTE: a union's members each add an error for the same field: one problem to the client
    errors = [e for i, e in enumerate(errors)
              if i == 0 or _field_path(e.get("loc", ())) != _field_path(errors[i - 1].get("loc", ()))]
    if first.get("type") == "json_invalid":
        return HttpError(400, "the request body is not valid JSON: "
                         + str(first.get("ctx", {}).get("error", first.get("msg", ""))))
    message = first.get("msg", "invalid request")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return HttpError(400, message, param=param, code="invalid_value")


def add_error_handlers(app: FastAPI, count_rejection: Callable[[AccessDeniedError], None]) -> None:
    """Every failure a route raises, answered by error_response; refusals of access (401, 403,
    429) are also counted by `count_rejection`."""

    @app.exception_handler(HttpError)
    async def _http_error(request: Request, exc: HttpError) -> JSONResponse:
        return error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request.url.path, describe_validation(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"{request.method} {request.url.path}: no such endpoint"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(request.url.path, HttpError(exc.status_code, message,
                                                           headers=dict(exc.headers or {})))

    @app.exception_handler(ShoalError)
    async def _shoal_error(request: Request, exc: ShoalError) -> JSONResponse:
        if isinstance(exc, AccessDeniedError):
            count_rejection(exc)
        return error_response(request.url.path, classify(exc))

    @app.exception_handler(ClientDisconnected)
    async def _client_left(request: Request, exc: ClientDisconnected) -> Response:
        # NOTE: nobody reads this answer; its status is what the access log records.
        observability.note_refusal(str(exc))
        return Response(status_code=observability.CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _any_error(request: Request, exc: Exception) -> JSONResponse:
        # NOTE: Starlette logs the traceback of what reaches this handler itself.
        return error_response(request.url.path, classify(exc, log_unexpected=False))
