"""The API keys database: one SQLite file shared by servers and the `shoal keys` command.

WAL mode lets servers read while a command writes; every change is one transaction
(`BEGIN IMMEDIATE` where a read decides the write), so concurrent writers serialise and
a process killed mid-write leaves the last committed state. The schema version lives in
SQLite's `user_version`; a file from a newer shoal is refused rather than misread.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from shoal.access.keys import (ACTIVE, KeyRecord, check_name, check_priority_class, hash_secret,
                              new_key, normalize_models)
from shoal.access.principal import KeyLimits
from shoal.core.errors import InvalidParameterError, ShoalError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

# Schema by version: MIGRATIONS[v] takes a file at version v to v + 1.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    0: ("""CREATE TABLE keys (
              id                TEXT PRIMARY KEY,
              name              TEXT NOT NULL,
              secret_hash       TEXT NOT NULL,
              models            TEXT,              -- JSON list of normalised names; NULL = all
              rpm               INTEGER,
              tpm               INTEGER,
              max_concurrent    INTEGER,
              max_prompt_tokens INTEGER,
              max_tokens        INTEGER,
              priority_class    TEXT NOT NULL,
              admin             INTEGER NOT NULL DEFAULT 0,
              created_at        REAL NOT NULL,
              expires_at        REAL,
              revoked_at        REAL,
              last_used_at      REAL
           )""",
        "CREATE INDEX keys_by_name ON keys (name)"),
}

# last_used_at is written at most this often per key (a write per request would serialise them).
LAST_USED_RESOLUTION = 60.0

_COLUMNS = ("id, name, secret_hash, models, rpm, tpm, max_concurrent, max_prompt_tokens, "
            "max_tokens, priority_class, admin, created_at, expires_at, revoked_at, last_used_at")


class KeyDBError(ShoalError):
    """The keys database cannot be opened or is damaged."""


class UnknownKeyError(ShoalError):
    def __init__(self, key_id: str) -> None:
        super().__init__(f"no API key with id {key_id!r} (`shoal keys list` shows them)")
        self.key_id = key_id


def keys_db_path(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """`explicit`, else $SHOAL_KEYS_DB, else $SHOAL_HOME/keys.db (SHOAL_HOME defaults to ~/.shoal)."""
    env = os.environ if environ is None else environ
    if explicit or env.get("SHOAL_KEYS_DB"):
        return Path(explicit or env["SHOAL_KEYS_DB"]).expanduser()
    return Path(env.get("SHOAL_HOME") or Path.home() / ".shoal").expanduser() / "keys.db"


class KeyDB:
    """The keys of one database file. Safe to share between threads (one connection, a lock)."""

    def __init__(self, path: Path | str, busy_timeout: float = 10.0) -> None:
        """busy_timeout: how long a write waits for another process's write to commit."""
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # NOTE: created 0600 before SQLite opens it; SQLite gives -wal/-shm the same mode.
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                         timeout=busy_timeout)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise KeyDBError(f"{self.path}: cannot open the keys database: {exc}") from exc

    @classmethod
    def open_if_exists(cls, path: Path | str) -> "KeyDB | None":
        return cls(path) if Path(path).expanduser().exists() else None

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "KeyDB":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _migrate(self) -> None:
        # NOTE: the usual case (up to date) takes no write lock, so a server can open the
        # file while `shoal keys` is writing to it.
        if self._conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return
        with self._transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise KeyDBError(f"{self.path}: the keys database has schema version {version}; "
                                 f"this shoal knows up to {SCHEMA_VERSION} (a newer shoal made it)")
            for step in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[step]:
                    conn.execute(statement)
            if version != SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # ---- changes --------------------------------------------------------------------------

    def create(self, name: str, *, models: list[str] | None = None, limits: KeyLimits = KeyLimits(),
               priority_class: str = "interactive", expires_at: float | None = None,
               admin: bool = False, now: float | None = None) -> tuple[str, KeyRecord]:
        """A new key: (the full key, shown this once; its record). Names of active keys are unique."""
        name = check_name(name)
        check_priority_class(priority_class)
        normalized = normalize_models(models)
        now = time.time() if now is None else now
        key_id, secret, full_key = new_key()
        record = KeyRecord(id=key_id, name=name, secret_hash=hash_secret(secret), models=normalized,
                           limits=limits, priority_class=priority_class, admin=admin,
                           created_at=now, expires_at=expires_at)
        with self._transaction() as conn:
            for other in self._select(conn, "WHERE name = ?", (name,)):
                if other.status(now) == ACTIVE:
                    raise InvalidParameterError(
                        "name", f"an active key named {name!r} exists (id {other.id}); "
                        "revoke it first or choose another name")
            conn.execute(f"INSERT INTO keys ({_COLUMNS}) VALUES ({', '.join('?' * 15)})", (
                record.id, record.name, record.secret_hash,
                None if normalized is None else json.dumps(list(normalized)),
                limits.requests_per_minute, limits.tokens_per_minute, limits.max_concurrent,
                limits.max_prompt_tokens, limits.max_tokens, priority_class, int(admin),
                now, expires_at, None, None))
        return full_key, record

    def revoke(self, key_id: str, now: float | None = None) -> KeyRecord:
        """Marks a key revoked (kept for the record); revoking twice keeps the first time."""
        now = time.time() if now is None else now
        with self._transaction() as conn:
            found = self._select(conn, "WHERE id = ?", (key_id,))
            if not found:
                raise UnknownKeyError(key_id)
            if found[0].revoked_at is not None:
                return found[0]
            conn.execute("UPDATE keys SET revoked_at = ? WHERE id = ?", (now, key_id))
        return replace(found[0], revoked_at=now)

    def touch(self, record: KeyRecord, now: float | None = None) -> None:
        """Records a use of the key, at most once per LAST_USED_RESOLUTION seconds; best
        effort (a busy or read-only file must not fail the request that used the key)."""
        now = time.time() if now is None else now
        if record.last_used_at is not None and now - record.last_used_at < LAST_USED_RESOLUTION:
            return
        try:
            with self._lock:
                self._conn.execute("UPDATE keys SET last_used_at = ? WHERE id = ?", (now, record.id))
        except sqlite3.Error as exc:
            log.warning("%s: could not record the last use of key %s: %s", self.path, record.id, exc)

    # ---- queries --------------------------------------------------------------------------

    def get(self, key_id: str) -> KeyRecord | None:
        with self._lock:
            found = self._select(self._conn, "WHERE id = ?", (key_id,))
        return found[0] if found else None

    def list(self) -> list[KeyRecord]:
        with self._lock:
            return self._select(self._conn, "ORDER BY created_at, id", ())

    def has_usable_key(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        with self._lock:
            row = self._conn.execute("SELECT 1 FROM keys WHERE revoked_at IS NULL AND "
                                     "(expires_at IS NULL OR expires_at > ?) LIMIT 1", (now,)).fetchone()
        return row is not None

    @staticmethod
    def _select(conn: sqlite3.Connection, where: str, args: tuple) -> list[KeyRecord]:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM keys {where}", args).fetchall()
        return [KeyRecord(
            id=r[0], name=r[1], secret_hash=r[2],
            models=None if r[3] is None else tuple(json.loads(r[3])),
            limits=KeyLimits(requests_per_minute=r[4], tokens_per_minute=r[5], max_concurrent=r[6],
                             max_prompt_tokens=r[7], max_tokens=r[8]),
            priority_class=r[9], admin=bool(r[10]), created_at=r[11], expires_at=r[12],
            revoked_at=r[13], last_used_at=r[14]) for r in rows]
