"""The server's log lines: text or JSON, each tagged with the request it was written for.

`configure_logging` installs one stderr handler on the root logger (uvicorn's loggers
propagate to it, so its lines share the format). A filter adds the request id and the
caller's key id to every record written while a request is served; `log_access` writes one
line per finished request, replacing uvicorn's access log.

Anything a caller sent can end up in a line (a model name, a path, a refusal's message that
quotes them): each such value is cut by core/echo.py clip(), so a 15 MB model name costs a log
line of a few hundred bytes, not 15 MB. JSON lines escape U+2028, U+2029 and U+0085, at
which line-splitting readers would cut them (json_lines.py).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any

from shoal.access.principal import current_principal
from shoal.core.echo import clip as clip_text
from shoal.core.errors import InvalidParameterError
from shoal.http.json_lines import json_line
from shoal.http.requestid import current_request_id
from shoal.serving.records import RequestRecord

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# NOTE: not "shoal.access": that is the access-control package, whose module loggers would
# become children of this one.
access_log = logging.getLogger("shoal.http.access")
# Access-record fields the access line's message already says (text lines skip them).
_IN_ACCESS_MESSAGE = frozenset({"method", "endpoint", "status", "duration_s"})
def clip(value: Any) -> Any:
    """A string cut as every echo of client input is (core/echo.py); anything else as it is."""
    return clip_text(value) if isinstance(value, str) else value


class RequestContextFilter(logging.Filter):
    """Sets `request_id` and `key_id` on each record from the request being served (None
    outside one), unless the record already names them; cuts long string arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "request_id" not in record.__dict__:
            record.request_id = current_request_id.get()
        if "key_id" not in record.__dict__:
            record.key_id = current_principal.get().key_id
        # NOTE: the arguments, not the format: what a caller sent arrives as an argument
        # ("ignoring unknown Ollama option %r"), and a message's own text is the code's.
        if isinstance(record.args, tuple):
            record.args = tuple(clip(arg) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: clip(arg) for key, arg in record.args.items()}
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, key_id, and the
    record's `fields` (the access record's figures) at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "key_id": getattr(record, "key_id", None),
        }
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json_line(entry, compact=False, default=str)


class TextFormatter(logging.Formatter):
    """The classic line, with the record's `fields` as key=value pairs and the request id."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        pairs = [f"{k}={_text_value(v)}" for k, v in (getattr(record, "fields", None) or {}).items()
                 if v is not None and k not in _IN_ACCESS_MESSAGE]
        request_id = getattr(record, "request_id", None)
        if request_id:
            pairs.append(f"request_id={request_id}")
        return " ".join([text, *pairs])


class _LogFileHandler(RotatingFileHandler):
    """A size-rotated log file that also receives the process's own stdout and stderr.

    NOTE: a server started in the background (`shoal run`) writes more than log records:
    a crash's traceback, a library's warning. With its fds 1 and 2 on the current file they
    land there and count towards its size; after each rotation they follow to the new file.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self._adopt_std_streams()

    def doRollover(self) -> None:
        super().doRollover()
        self._adopt_std_streams()

    def _adopt_std_streams(self) -> None:
        if self.stream is None:
            return
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd in (1, 2):
            os.dup2(self.stream.fileno(), fd)


def configure_logging(level: str, log_format: str, log_file: str | Path | None = None,
                      max_bytes: int = 0, backups: int = 0) -> None:
    """Routes every logger (shoal's, uvicorn's, warnings in JSON mode) in one format to stderr,
    or to `log_file`, rotated at `max_bytes` with `backups` old files kept."""
    handler: logging.Handler
    if log_file:
        path = Path(log_file).expanduser()
        try:
            handler = _LogFileHandler(path, max_bytes, backups)
        except OSError as exc:
            raise InvalidParameterError("log_file", f"cannot open {path}: {exc.strerror or exc}") from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if log_format == "json" or log_file:
        logging.captureWarnings(True)   # a bare warning line would break one-object-per-line


def log_access(record: RequestRecord) -> None:
    """The access log line of a finished request (a sink of the request recorder)."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    # NOTE: the request's own ids are passed explicitly: this can run after the request's
    # context is gone (a generation that ends once its client has left).
    duration = record.duration_seconds() or 0.0
    fields = {name: clip(value) for name, value in record.access_fields().items()}
    access_log.info("%s %s %s %.3fs", record.method, record.path, record.status, duration,
                    extra={"fields": fields, "request_id": record.request_id,
                           "key_id": record.key_id})


def _text_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if not text or any(c.isspace() or c in '"=' for c in text) else text
