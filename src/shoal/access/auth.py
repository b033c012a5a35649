"""Who is calling: the auth policy and the Bearer-key check (http/auth.py applies them to
each HTTP request).

Policy (SHOAL_AUTH): `auto` requires keys unless the server listens on loopback only,
`on` always, `off` never. Whatever the policy, the key-management API (/admin/) needs an
admin key. With keys required, model management (pull, push, create, copy, delete, blob
uploads) needs an admin key too, and a few endpoints stay open: liveness and version probes,
and /metrics only with SHOAL_METRICS_AUTH=0 (it names models and the key ids of callers).
The dashboard page (/dashboard) is always open, since it holds no data and a browser cannot
send a key when it navigates to it; its data (/dashboard/feed, /dashboard/snapshot) needs an
admin key whenever keys are required.
"""
from __future__ import annotations

import enum
import hmac
import ipaddress
import time
from pathlib import Path

from shoal.access.keydb import KeyDB, keys_db_path
from shoal.access.keys import EXPIRED, REVOKED, iso_time, secret_matches, split_key
from shoal.access.principal import Principal
from shoal.core.errors import AuthenticationError, PermissionDeniedError

AUTH_MODES = ("auto", "on", "off")
ADMIN_KEY_MIN_LENGTH = 16

# The caller of SHOAL_ADMIN_KEY: an admin without quotas, named after its setting.
ENV_ADMIN = Principal(key_id="env-admin", name="SHOAL_ADMIN_KEY", admin=True)

OPEN_PATHS = frozenset({"/", "/health", "/version", "/api/version", "/livez", "/readyz", "/dashboard"})
DASHBOARD_DATA_PATHS = frozenset({"/dashboard/feed", "/dashboard/snapshot"})
MODEL_ADMIN_PATHS = frozenset({"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"})


class Access(enum.Enum):
    OPEN = "open"                  # no key, ever
    CALLER = "caller"              # any valid key (when keys are required)
    MODEL_ADMIN = "model_admin"    # an admin key (when keys are required)
    ADMIN_VIEW = "admin_view"      # an admin key (when keys are required): the dashboard's data
    KEY_ADMIN = "key_admin"        # an admin key, always


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False        # a host name: it may resolve to anything


def keys_required(mode: str, host: str) -> bool:
    return mode == "on" or (mode == "auto" and not is_loopback(host))


def required_access(method: str, path: str, protect_metrics: bool) -> Access:
    path = path.rstrip("/") or "/"      # NOTE: /api/pull/ must not slip past as another path
    if path.startswith("/admin/") or path == "/admin":
        return Access.KEY_ADMIN
    if method == "OPTIONS" or path in OPEN_PATHS or (path == "/metrics" and not protect_metrics):
        return Access.OPEN      # NOTE: CORS preflights never carry credentials
    if path in DASHBOARD_DATA_PATHS:
        return Access.ADMIN_VIEW
    if path in MODEL_ADMIN_PATHS or path.startswith("/api/blobs/"):
        return Access.MODEL_ADMIN
    return Access.CALLER


def startup_problem(mode: str, host: str, keys_db: Path, admin_key: str | None) -> str | None:
    """Why `shoal serve` must not start (None: it may): keys required and none usable."""
    if not keys_required(mode, host) or admin_key:
        return None
    db = KeyDB.open_if_exists(keys_db)
    if db is not None:
        with db:
            if db.has_usable_key():
                return None
    why = "SHOAL_AUTH=on" if mode == "on" else f"{host} is not a loopback address"
    return (f"refusing to serve on {host} without API keys: keys are required ({why}) and "
            f"{keys_db} has no active key. Create one with `shoal keys create NAME` (add --admin "
            "for a key that may manage models and keys), or set SHOAL_AUTH=off to serve without "
            "keys deliberately.")


class Authenticator:
    """Turns an Authorization header into a Principal (or a 401)."""

    def __init__(self, keys_db: Path, *, required: bool, admin_key: str | None = None,
                 protect_metrics: bool = False) -> None:
        self.keys_db_path = keys_db
        self.required = required
        self.protect_metrics = protect_metrics
        self._admin_key = admin_key
        self._db: KeyDB | None = None

    @classmethod
    def from_settings(cls, settings) -> "Authenticator":
        required = keys_required(settings.auth, settings.host)
        # SHOAL_METRICS_AUTH=auto: /metrics needs a key whenever keys are required at all
        protect_metrics = required if settings.metrics_auth == "auto" else bool(settings.metrics_auth)
        return cls(keys_db_path(settings.keys_db), required=required,
                   admin_key=settings.admin_key, protect_metrics=protect_metrics)

    @property
    def db(self) -> KeyDB:
        """The keys DB, opened on first use (a server without keys never creates the file)."""
        if self._db is None:
            # NOTE: lookups run on the event loop; a write another process holds must not
            # stall it for long (reads never wait in WAL mode; only last-use writes do).
            self._db = KeyDB(self.keys_db_path, busy_timeout=0.5)
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def needs_key(self, access: Access) -> bool:
        """Whether a request of this access level must present a key at all."""
        return access is Access.KEY_ADMIN or (access is not Access.OPEN and self.required)

    def admit(self, access: Access, authorization: str | None) -> Principal:
        """The caller of a request that needs a key: 401 without a valid key, 403 when the
        access level needs an admin key and this key is not one."""
        principal = self.authenticate(authorization)
        if access is not Access.CALLER and not principal.admin:
            what = {Access.KEY_ADMIN: "managing keys", Access.ADMIN_VIEW: "the dashboard's live data"
                    }.get(access, "managing models")
            raise PermissionDeniedError(f"{what} needs an admin key; the API key "
                                        f"'{principal.name}' is not one", code="admin_required")
        return principal

    def authenticate(self, authorization: str | None) -> Principal:
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("missing API key: send it as 'Authorization: Bearer <key>' "
                                      "(the OpenAI clients' api_key)")
        if self._admin_key and hmac.compare_digest(token.encode(), self._admin_key.encode()):
            return ENV_ADMIN
        parts = split_key(token)
        record = self.db.get(parts[0]) if parts else None
        if record is None or not secret_matches(parts[1], record.secret_hash):
            raise AuthenticationError("invalid API key")
        now = time.time()
        status = record.status(now)
        if status == REVOKED:
            raise AuthenticationError(f"the API key '{record.name}' has been revoked")
        if status == EXPIRED:
            raise AuthenticationError(f"the API key '{record.name}' expired at "
                                      f"{iso_time(record.expires_at)}")
        self.db.touch(record, now)
        return record.principal()
