"""shoal's exception hierarchy.

Every error a user can cause is one of these types; the HTTP layers map them to
status codes (400/404/413/429/503) in each dialect's own error shape. Input is
never checked with `assert`.
"""
from __future__ import annotations

from shoal.core.echo import clip


class ShoalError(Exception):
    """Base class of every error shoal raises on purpose."""


class InvalidParameterError(ShoalError, ValueError):
    """A request parameter has an invalid value; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ContextLengthExceededError(InvalidParameterError):
    """prompt tokens + max_tokens do not fit the model's context window."""

    def __init__(self, num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
        super().__init__(
            "max_tokens" if num_prompt_tokens < max_model_len else "prompt",
            f"this model's maximum context length is {max_model_len} tokens, but the request "
            f"asks for {num_prompt_tokens + max_tokens} ({num_prompt_tokens} in the prompt + "
            f"{max_tokens} to generate)",
        )
        self.num_prompt_tokens = num_prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len


class ModelLoadError(ShoalError):
    """A model file or directory could not be loaded; names the path and the problem."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


class ModelNotFoundError(ModelLoadError):
    """The model path or name does not exist."""


class CorruptModelError(ModelLoadError):
    """The file exists but is truncated, malformed or inconsistent."""


class UnsupportedModelError(ModelLoadError):
    """The file is well formed but uses an architecture or tensor type shoal lacks."""


class EngineDeadError(ShoalError):
    """The engine loop died; no further requests can be served."""


class UnknownModelError(ShoalError):
    """A request names a model this server does not serve."""

    def __init__(self, name: str, available: list[str] | None = None) -> None:
        super().__init__(f"model '{clip(name)}' not found")
        self.name = name
        self.available = list(available or [])


class ServerBusyError(ShoalError):
    """The server cannot take more requests now; retry after `retry_after` seconds.

    `reason` says which bound refused it (the rejected-requests metric's label)."""

    code = "server_busy"

    def __init__(self, message: str, retry_after: int = 1, reason: str = "queue_full") -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))
        self.reason = reason


class ServerShuttingDownError(ServerBusyError):
    """The server is draining before it exits and takes no new requests."""

    code = "server_shutting_down"

    def __init__(self, retry_after: int = 5) -> None:
        super().__init__("server shutting down: it finishes the requests it has and takes no "
                         "new ones; retry on another instance", retry_after, "shutting_down")


class TokenLimitError(InvalidParameterError):
    """A prompt or max_tokens over a limit the server's operator set (not the model's)."""


class PayloadTooLargeError(ShoalError):
    """The request body is larger than the server accepts."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than the limit of {limit} bytes")
        self.limit = limit


class UnsupportedFeatureError(InvalidParameterError):
    """A well-formed request asks for something shoal does not do (yet)."""


class AccessDeniedError(ShoalError):
    """A request refused because of who asks (access/, serving/quotas.py): `reason` is the rejected-metric label.

    `model` names the model asked for, when known, for the rejected-requests counter.
    """

    reason = "forbidden"

    def __init__(self, message: str, model: str | None = None) -> None:
        super().__init__(message)
        self.model = model


class AuthenticationError(AccessDeniedError):
    """No API key, or one that is wrong, revoked or expired (401)."""

    reason = "unauthorized"


class PermissionDeniedError(AccessDeniedError):
    """A valid key that may not do this: a model outside its list, an admin-only endpoint (403).

    `code` says which ("model_not_allowed", "admin_required").
    """

    reason = "forbidden"

    def __init__(self, message: str, code: str, model: str | None = None) -> None:
        super().__init__(message, model)
        self.code = code


class RateLimitedError(AccessDeniedError):
    """A key over one of its limits (requests or tokens per minute, concurrency); retry later (429)."""

    reason = "rate_limited"

    def __init__(self, message: str, retry_after: int, model: str | None = None) -> None:
        super().__init__(message, model)
        self.retry_after = max(1, int(retry_after))
