"""The audit log: one JSON line per model request, served or refused, in an append-only file.

Lines are queued on the event loop and written by a writer thread (the stdlib's
QueueListener), so a slow disk never stalls serving; the file rotates by size
(RotatingFileHandler: PATH, PATH.1 … PATH.N). `close()` writes every queued line before
returning; the app calls it when it shuts down. Prompt and completion text are written only
when content auditing is on, and then whole; every other value a caller chose (a model name,
a refusal's message) is cut as core/echo.py cuts every echo.
"""
from __future__ import annotations

import logging
import os
import queue
from datetime import datetime, timezone
from logging.handlers import QueueListener, RotatingFileHandler
from pathlib import Path
from typing import Any

from shoal.core.errors import InvalidParameterError
from shoal.http.json_lines import json_line
from shoal.http.logs import clip
from shoal.serving.records import RequestRecord


class _PrivateRotatingFileHandler(RotatingFileHandler):
    """Creates the audit files readable by their owner only: they name callers and may hold
    prompts."""

    def _open(self):  # type: ignore[override]
        return open(self.baseFilename, self.mode, encoding=self.encoding,
                    opener=lambda path, flags: os.open(path, flags, 0o600))


class _JsonLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json_line(record.msg, compact=False)


class AuditLog:
    """A request-record sink writing the audit lines of model requests."""

    def __init__(self, path: str | Path, max_bytes: int, backups: int, content: bool) -> None:
        self.path = Path(path).expanduser()
        self.content = content
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handler = _PrivateRotatingFileHandler(self.path, maxBytes=max_bytes,
                                                  backupCount=backups, encoding="utf-8")
        except OSError as exc:
            raise InvalidParameterError("audit_log", f"cannot open {self.path}: {exc.strerror or exc}") from None
        handler.setFormatter(_JsonLine())
        self._handler = handler
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._listener = QueueListener(self._queue, handler)
        self._listener.start()
        self._closed = False

    def __call__(self, record: RequestRecord) -> None:
        if not record.is_model_request or self._closed:
            return
        self._queue.put(logging.makeLogRecord({"msg": self.entry(record)}))

    def entry(self, record: RequestRecord) -> dict[str, Any]:
        """The audit line of one request (key ids only: a key itself is never known here)."""
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.started_at, timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": record.request_id,
            "key_id": record.key_id,
            "key_name": record.principal.name,
            "class": record.priority_class,
            "client": record.client,
            "method": record.method,
            "endpoint": record.path,
            "dialect": record.dialect,
            "model": record.model,
        }
        if record.requested_model is not None and record.requested_model != record.model:
            entry["requested_model"] = record.requested_model
        entry.update(status=record.status, reason=record.reason,
                     prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens,
                     cached_tokens=record.cached_tokens, finish_reason=record.finish_reason,
                     latency_s=round(record.duration_seconds() or 0.0, 6))
        entry = {name: clip(value) for name, value in entry.items()}
        if self.content:
            entry.update(prompts=record.prompts or [], completions=record.completions or [])
        return entry

    def close(self) -> None:
        """Writes everything queued, then closes the file; later records are dropped."""
        if self._closed:
            return
        self._closed = True
        self._listener.stop()       # NOTE: stop() drains the queue before the thread exits
        self._handler.close()
