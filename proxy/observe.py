"""Structured logs with secrets redacted, and request ids.

Every log record passes through ``redact`` on its way out, whatever module wrote it and whatever
it carries (messages, extras, tracebacks): api keys in queries and bodies, bearer tokens and
passwords in database URLs never reach a log line. Key names are found in every spelling a
request can carry them in: ``api_key=`` in a query or form, ``"api_key":"..."`` in JSON, that
JSON escaped inside a string (as a JSON log line carries a path or header holding it), and
percent-encoded (``api%5Fkey%3D``, ``%22api_key%22%3A%22...``).
"""

from __future__ import annotations

import json
import logging
import random
import re
import sys
import time
from typing import Any

# Names whose values are secrets, also with the separator percent-encoded (api%5Fkey).
_NAME = r"(?:api(?:[_-]|%5f|%2d)?key|token|passw(?:or)?d|secret)"
# A quote around a JSON key or value: plain, escaped once or more (a JSON line's string values
# escape the JSON they carry: \"api_key\":\"...\"), or percent-encoded in a URL.
_QUOTE = r'(?:\\*"|%22)'
_COLON = r"\s*(?::|%3a)\s*"

_NAMED = (
    # "api_key": "..." in JSON, at any depth of escaping or percent-encoded; the value runs to
    # the closing quote, and whole escapes only, so a JSON line stays valid JSON
    (
        re.compile(
            rf"(?i)({_QUOTE}[\w.-]*{_NAME}{_QUOTE}{_COLON}{_QUOTE})"
            r'(?:[^"\\%]++|\\++(?!")|%(?!22))*+'
        ),
        r"\1***",
    ),
    # "token": 12345, a value that is not a string
    (
        re.compile(rf"(?i)({_QUOTE}[\w.-]*{_NAME}{_QUOTE}{_COLON})[^\s,}}\]\"\\%]+"),
        r"\1***",
    ),
    # api_key=... in a query string or form body, the = perhaps percent-encoded (api_key%3D...)
    (re.compile(rf"(?i)({_NAME}(?:=|%3d))[^&\s\"'\\]+"), r"\1***"),
)
# Authorization: Bearer ...
_CREDENTIALS = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
# scheme://user:password@host
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s]+:)[^@\s]+@")

# Attributes every LogRecord has; anything else was passed in ``extra`` and goes into the line.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def redact(text: str) -> str:
    # Most lines carry no secret: a few substring tests on the lowered text (microseconds)
    # decide which patterns need to run at all.
    lowered = text.lower()
    if "key" in lowered or "token" in lowered or "passw" in lowered or "secret" in lowered:
        for pattern, replacement in _NAMED:
            text = pattern.sub(replacement, text)
    if "bearer" in lowered or "basic" in lowered:
        text = _CREDENTIALS.sub(r"\1 ***", text)
    if "@" in text and "://" in text:
        text = _URL_PASSWORD.sub(r"\1***@", text)
    return text


def new_request_id() -> str:
    """32 hex digits, as ``uuid4().hex`` gave, at an eighth of its cost: ids need to be unique,
    not unguessable, and the module's generator (seeded from the OS, reseeded in a forked
    worker) makes 128 bits without the system call ``uuid4`` pays for each."""
    return f"{_random_bits(128):032x}"


_random_bits = random.getrandbits


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            line[key] = value if isinstance(value, int | float | bool | None) else str(value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(line, default=str, separators=(",", ":")))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        text = f"{stamp} {record.levelname:<7} {record.getMessage()} {extras}".rstrip()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return redact(text)


def configure_logging(log_format: str, level: str, stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger("session_proxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = [handler]
        logging.getLogger(name).propagate = False
