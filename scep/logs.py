"""Log lines nobody can forge: every record of the product's loggers is cleaned when it is created.

Values a client controls (transactionID, subject, SANs, reason texts, Intune error descriptions) reach log
messages as arguments. A newline in one of them would start a line of its own that reads like a genuine record,
and other control characters can rewrite a terminal. `install()` replaces the logging module's record factory
(`logging.setLogRecordFactory`) so that every record of a `scep` or `scep.*` logger is cleaned before any handler
sees it: the console handler of `scep serve` as much as the Azure Functions Python worker's own handler, which
formats each record and ships the text to the host over gRPC (azure-functions-python-worker, dispatcher.py,
`AsyncLoggingHandler.emit`). Cleaning at creation means no call site and no handler can forget it.

What cleaning does:
- control characters (C0, DEL, C1 including U+0085) and the Unicode line and paragraph separators U+2028/U+2029
  in the message and in every argument are written as escapes (`\\n`, `\\r`, `\\t`, `\\x1b`, `\\u2028`);
- every argument is bounded to MAX_VALUE_CHARS characters (the rest is replaced by a count), a message logged
  without arguments to MAX_MESSAGE_CHARS;
- a traceback keeps its line breaks, but every line of it is indented, so no line of it starts at the left
  margin where records start;
- numbers stay numbers (`%d`, `%x` keep working); everything else is formatted through a wrapper whose str() and
  repr() are cleaned, so `%s` and `%r` both give clean text.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

PRODUCT_LOGGER = "scep"
MAX_VALUE_CHARS = 200
MAX_MESSAGE_CHARS = 4000
LEVELS = ("debug", "info", "warning", "error")
LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_TRACEBACK_INDENT = "    "
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """`text` with every control character and Unicode line break written as a visible escape."""
    return _UNSAFE.sub(_escape_one, text)


def _escape_one(found: re.Match[str]) -> str:
    character = found.group()
    named = _NAMED_ESCAPES.get(character)
    if named is not None:
        return named
    code = ord(character)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def bound(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text) - limit} more characters)"


def clean(value: object) -> str:
    """One value as it may appear in a log line: bounded, then escaped."""
    return escape(bound(str(value)))


class _Clean:
    """A log argument that formats as clean text with %s and %r."""

    __slots__ = ("_value",)

    def __init__(self, value: object) -> None:
        self._value = value

    def __str__(self) -> str:
        return escape(bound(str(self._value)))

    def __repr__(self) -> str:
        return escape(bound(repr(self._value)))


def _clean_argument(value: Any) -> Any:
    if isinstance(value, (int, float)) or value is None:  # bool is an int
        return value
    return _Clean(value)


def clean_record(record: logging.LogRecord) -> None:
    """Make one record safe to write, in place."""
    if isinstance(record.args, Mapping):
        record.args = {key: _clean_argument(value) for key, value in record.args.items()}
    elif record.args:
        record.args = tuple(_clean_argument(value) for value in record.args)
    message = str(record.msg)
    record.msg = escape(message if record.args else bound(message, MAX_MESSAGE_CHARS))
    if record.exc_info and not record.exc_text:
        record.exc_text = _indented(logging.Formatter().formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = _indented(record.stack_info)


def _indented(text: str) -> str:
    return "\n".join(_TRACEBACK_INDENT + escape(line) for line in text.splitlines())


# gunicorn's error log (`scep serve`) writes client-sent request lines and headers into its debug records.
CLEANED_LOGGERS = (PRODUCT_LOGGER, "gunicorn")


def _is_product(name: str) -> bool:
    return any(name == root or name.startswith(root + ".") for root in CLEANED_LOGGERS)


def install(level: str | None = None) -> None:
    """Clean every record of the product's loggers from now on (once per process; idempotent).

    level ("debug", "info", "warning", "error"), when given, is set on the product's logger: SCEP_LOG_LEVEL.
    """
    if level is not None:
        logging.getLogger(PRODUCT_LOGGER).setLevel(level.upper())
    previous = logging.getLogRecordFactory()
    if getattr(previous, "cleans_product_records", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if _is_product(record.name):
            clean_record(record)
        return record

    factory.cleans_product_records = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def configure_console(level: str) -> None:
    """Logging for the `scep` command: one line per record on stderr, at `level`, records cleaned."""
    logging.basicConfig(level=level.upper(), format=LINE_FORMAT)
    install()
