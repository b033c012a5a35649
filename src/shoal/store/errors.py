"""The store's own error types, each a subclass of one of shoal's (so the HTTP layers map them)."""
from __future__ import annotations

from shoal.core.echo import clip
from shoal.core.errors import CorruptModelError, InvalidParameterError, ShoalError


class InvalidModelNameError(InvalidParameterError):
    """A model name that does not parse; the message says which part is wrong and why."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__("model", f"invalid model name '{clip(name)}': {problem}")
        self.name = name
        self.problem = problem


class ModelfileError(InvalidParameterError):
    """A Modelfile that does not parse or names something invalid; `line`/`column` are 1-based."""

    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__("modelfile", f"line {line}, column {column}: {message}")
        self.line = line
        self.column = column
        self.problem = message


class DigestMismatchError(CorruptModelError):
    """Bytes written for a blob did not hash to the digest they were promised to have."""

    def __init__(self, expected: str, actual: str, source: str = "") -> None:
        super().__init__(source or expected,
                         f"content has digest {actual}, expected {expected}")
        self.expected = expected
        self.actual = actual


class PullError(ShoalError):
    """A model source could not be reached or did not give what it should (nothing was stored)."""


class RegistryError(PullError):
    """An OCI registry could not be reached, refused a request or sent something wrong, during
    a pull (nothing was stored) or a push (the registry may hold some blobs, never the tag)."""


class EgressRefusedError(RegistryError):
    """The server may not connect to this host for a caller (link-local, cloud metadata, or a
    private address not in the allow list); no connection was opened."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        # NOTE: a redirect's host is the remote's text: shown no longer than a DNS name can be
        super().__init__(f"refusing to connect to {host[:253]}:{port}: it is {reason}")
        self.host = host
        self.port = port
        self.reason = reason
