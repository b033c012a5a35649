"""One classification of failures into HTTP terms; each dialect renders it in its own shape."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from shoal.core.echo import clip
from shoal.core.errors import (AuthenticationError, ContextLengthExceededError, CorruptModelError,
                          EngineDeadError, InvalidParameterError, ModelLoadError,
                          ModelNotFoundError, PayloadTooLargeError, PermissionDeniedError,
                          RateLimitedError, ServerBusyError, ShoalError, UnknownModelError,
                          UnsupportedFeatureError)
from shoal.store.errors import DigestMismatchError, PullError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class HttpError(Exception):
    """An HTTP-level failure: status, a message for people, and the OpenAI-style details."""

    status: int
    message: str
    type: str = "invalid_request_error"       # OpenAI's error type
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    ollama_message: str | None = None          # where Ollama words the same failure differently

    def __str__(self) -> str:
        return self.message


def classify(exc: BaseException, log_unexpected: bool = True) -> HttpError:
    """Maps any exception to an HttpError; unexpected ones become a (logged) 500."""
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, UnknownModelError):
        return HttpError(404, f"The model `{clip(exc.name)}` does not exist.", param="model",
                         code="model_not_found", ollama_message=f"model '{clip(exc.name)}' not found")
    if isinstance(exc, ContextLengthExceededError):
        return HttpError(400, exc.message, param=exc.field, code="context_length_exceeded")
    if isinstance(exc, UnsupportedFeatureError):
        return HttpError(400, exc.message, param=exc.field, code="unsupported_parameter")
    if isinstance(exc, InvalidParameterError):
        return HttpError(400, f"{exc.field}: {exc.message}", param=exc.field, code="invalid_value")
    if isinstance(exc, PayloadTooLargeError):
        return HttpError(413, str(exc), code="request_too_large")
    if isinstance(exc, ServerBusyError):
        return HttpError(503, str(exc), type="server_error", code=exc.code,
                         headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, EngineDeadError):
        return HttpError(503, str(exc), type="server_error", code="engine_dead",
                         headers={"Retry-After": "30"})
    # NOTE: the types name the class as openai-python's exceptions do; the codes are OpenAI's.
    if isinstance(exc, AuthenticationError):
        return HttpError(401, str(exc), type="authentication_error", code="invalid_api_key",
                         headers={"WWW-Authenticate": "Bearer"})
    if isinstance(exc, PermissionDeniedError):
        return HttpError(403, str(exc), type="permission_error", code=exc.code,
                         param="model" if exc.code == "model_not_allowed" else None)
    if isinstance(exc, RateLimitedError):
        return HttpError(429, str(exc), type="rate_limit_error", code="rate_limit_exceeded",
                         headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, DigestMismatchError):
        # NOTE: bytes a caller sent (or a source served) that are not what their digest says;
        # the message names no file (the scratch file's path is the server's business).
        return HttpError(400, "digest mismatch", param="digest", code="digest_mismatch")
    if isinstance(exc, (CorruptModelError, ModelNotFoundError)):
        # NOTE: a stored model whose files were removed or damaged on disk: it is not listed
        # any more and retrying cannot help (so not a 5xx); pulling or creating it again does.
        return HttpError(404, f"the model's files are missing or damaged: {exc}", param="model",
                         code="model_not_found")
    if isinstance(exc, ModelLoadError):
        return HttpError(500, f"the model could not be loaded: {exc}", type="server_error",
                         code="model_load_failed")
    if isinstance(exc, PullError):
        # NOTE: Ollama answers a failed pull with a 5xx; shoal keeps it a 4xx (the name
        # cannot be pulled from here) so clients and checks treat it as "not available".
        return HttpError(400, str(exc), code="pull_failed")
    if isinstance(exc, ShoalError):
        return HttpError(400, str(exc))
    if log_unexpected:
        log.error("unexpected error while serving a request", exc_info=exc)
    return HttpError(500, "internal server error (the server log has the details)", type="server_error")
