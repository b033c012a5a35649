"""API keys: their format, what is stored about each one, and how a secret is checked.

A key reads `sk-shoal-<id>_<secret>`. The id is public (it names the key in listings,
logs and `shoal keys revoke`); the secret is 32 random bytes, urlsafe-base64, shown once
at creation. Only sha256(secret) is stored: a secret with 256 bits of entropy cannot be
guessed from its hash, so the slow, salted hashes made for passwords (which people pick
from a small space) would only add latency to every request.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from shoal.access.principal import INTERACTIVE, PRIORITY_CLASSES, KeyLimits, Principal
from shoal.core.errors import InvalidParameterError
from shoal.store.names import normalize_name

KEY_PREFIX = "sk-shoal-"
SECRET_BYTES = 32
_ID_HEX_CHARS = 12
_KEY_RE = re.compile(r"sk-shoal-([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_DURATION_RE = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_NAME_LENGTH = 64

ACTIVE, REVOKED, EXPIRED = "active", "revoked", "expired"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What the keys DB holds about one key (the secret itself is never stored)."""

    id: str
    name: str
    secret_hash: str = field(repr=False)
    models: tuple[str, ...] | None = None        # normalised names; None = every model
    limits: KeyLimits = KeyLimits()
    priority_class: str = INTERACTIVE
    admin: bool = False
    created_at: float = 0.0                      # Unix times
    expires_at: float | None = None
    revoked_at: float | None = None
    last_used_at: float | None = None

    def status(self, now: float | None = None) -> str:
        if self.revoked_at is not None:
            return REVOKED
        if self.expires_at is not None and (time.time() if now is None else now) >= self.expires_at:
            return EXPIRED
        return ACTIVE

    def principal(self) -> Principal:
        return Principal(key_id=self.id, name=self.name, priority_class=self.priority_class,
                         allowed_models=None if self.models is None else frozenset(self.models),
                         admin=self.admin, limits=self.limits)

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        """The key as the admin API and `shoal keys list --json` show it (no secret, no hash)."""
        limits = self.limits
        return {"id": self.id, "name": self.name, "status": self.status(now),
                "models": list(self.models) if self.models is not None else None,
                "rpm": limits.requests_per_minute, "tpm": limits.tokens_per_minute,
                "max_concurrent": limits.max_concurrent,
                "max_prompt_tokens": limits.max_prompt_tokens, "max_tokens": limits.max_tokens,
                "priority_class": self.priority_class, "admin": self.admin,
                "created_at": iso_time(self.created_at), "expires_at": iso_time(self.expires_at),
                "revoked_at": iso_time(self.revoked_at), "last_used_at": iso_time(self.last_used_at)}


def new_key() -> tuple[str, str, str]:
    """A fresh (id, secret, the full key to hand out)."""
    key_id = secrets.token_hex(_ID_HEX_CHARS // 2)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    return key_id, secret, f"{KEY_PREFIX}{key_id}_{secret}"


def split_key(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    match = _KEY_RE.fullmatch(token.strip())
    return (match.group(1), match.group(2)) if match else None


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, secret_hash: str) -> bool:
    """Constant-time comparison of a presented secret with a stored hash."""
    return hmac.compare_digest(hash_secret(secret), secret_hash)


def check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise InvalidParameterError("name", f"give a printable name of 1..{MAX_NAME_LENGTH} characters")
    return name


def check_priority_class(value: str) -> str:
    if value not in PRIORITY_CLASSES:
        raise InvalidParameterError("priority_class", f"must be one of {', '.join(PRIORITY_CLASSES)}, "
                                    f"got {value!r}")
    return value


def normalize_models(models: list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    """Model names as the residency compares them (`smollm2` means `smollm2:latest`)."""
    if models is None:
        return None
    names = tuple(dict.fromkeys(normalize_name(m) for m in models if m.strip()))
    if not names:
        raise InvalidParameterError("models", "name at least one model (or leave the list out for all)")
    return names


def parse_expiry(text: str, now: float | None = None) -> float:
    """When a key expires: a duration from now ('30d', '12h', '1w', '90m', '45s') or an ISO
    8601 date or time ('2026-01-31', '2026-01-31T12:00:00Z'; UTC unless an offset is given)."""
    now = time.time() if now is None else now
    text = text.strip()
    match = _DURATION_RE.fullmatch(text)
    if match:
        seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        if seconds <= 0:
            raise InvalidParameterError("expires", f"{text!r} is not a positive duration")
        return now + seconds
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidParameterError("expires", f"{text!r} is neither a duration (30d, 12h, 90m) "
                                    "nor an ISO date (2026-01-31 or 2026-01-31T12:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    expires = moment.timestamp()
    if expires <= now:
        raise InvalidParameterError("expires", f"{text} is already past")
    return expires


def iso_time(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
