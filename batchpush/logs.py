"""Log lines, as text (``--debug``) or one JSON object each (``--log-format json``),
both with the one redaction: no URL query string (upload state, token scopes), no
Authorization value.

A record may carry ``event`` (its JSON ``event`` field, default ``log``) and
``fields`` (a dict merged into its JSON object) through ``extra=``; the progress
events of ``progress.JsonProgress`` and the retries of ``registry/retry.py`` do.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from .patterns import LazyPattern

#: a URL or request path followed by a query string (upload state, token scopes)
_URL_QUERY = LazyPattern(r"((?:https?://|/)[^\s?\"']*)\?[^\s\"']*")
#: an Authorization header value
_CREDENTIAL = LazyPattern(r"\b(Bearer|Basic)\s+[^\s\"']+", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` without URL query strings and Authorization values."""
    return _CREDENTIAL.sub(r"\1 <redacted>", _URL_QUERY.sub(r"\1?<redacted>", text))


class RedactingFormatter(logging.Formatter):
    """Drops URL query strings (upload state, tokens) from every log line."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC), level, event, logger, message and the
    record's ``fields``; every string in it redacted."""

    def format(self, record: logging.LogRecord) -> str:
        import datetime  # only a JSON log writes times

        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "log"),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        # each string redacted on its own: a pattern run over the JSON text could eat an escape
        return json.dumps({key: redact(value) if isinstance(value, str) else value for key, value in line.items()}, default=lambda value: redact(str(value)))


def json_line(level: int, event: str, message: str, **fields: object) -> str:
    """One line as ``JsonFormatter`` writes a record of logger ``batchpush``: for
    what is written before logging is set up (a usage error) or outside it (a
    signal handler, the notice of dropped lines)."""
    record = logging.LogRecord("batchpush", level, __file__, 0, message, None, None)
    record.event = event
    record.fields = fields
    return JsonFormatter().format(record)
