"""Log records of the product's loggers are cleaned when they are created (scep/logs.py)."""

from __future__ import annotations

import io
import logging

import pytest

from scep import config, logs


@pytest.fixture
def written():
    """What a plain handler on the root logger writes, the way the Functions worker's handler formats records."""
    logs.install()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    previous = logging.getLogger("scep").level
    logging.getLogger("scep").setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    logging.getLogger("scep").setLevel(previous)


@pytest.mark.parametrize(
    "hostile,shown",
    [
        ("a\nINFO scep.core.service: forged", "a\\nINFO scep.core.service: forged"),
        ("a\rb", "a\\rb"),
        ("a\tb", "a\\tb"),
        ("\x1b[2J\x07\x00\x7f", "\\x1b[2J\\x07\\x00\\x7f"),
        ("next\x85line", "next\\x85line"),
        ("line\u2028separator\u2029paragraph", "line\\u2028separator\\u2029paragraph"),
    ],
)
def test_control_characters_are_escaped(written, hostile, shown):
    logging.getLogger("scep.core.service").info("transaction %s refused", hostile)
    assert written.getvalue() == f"INFO scep.core.service: transaction {shown} refused\n"


def test_repr_arguments_are_clean_too(written):
    logging.getLogger("scep.http.web").info("unknown operation %r", "x\u2028y")
    assert written.getvalue().count("\n") == 1 and "\u2028" not in written.getvalue()


def test_values_are_bounded_and_numbers_keep_their_formats(written):
    logging.getLogger("scep.core.service").info("transaction %s issued serial %x (%d)", "T" * 256, 255, 7)
    line = written.getvalue()
    assert "T" * logs.MAX_VALUE_CHARS + "...(56 more characters)" in line
    assert "T" * (logs.MAX_VALUE_CHARS + 1) not in line
    assert line.endswith(" issued serial ff (7)\n")


def test_a_message_without_arguments_is_cleaned_and_bounded(written):
    logging.getLogger("scep.core.service").warning("x\ny" + "z" * 5000)
    line = written.getvalue()
    assert line.count("\n") == 1 and "x\\ny" in line and len(line) < logs.MAX_MESSAGE_CHARS + 100


def test_a_traceback_cannot_start_a_line_of_its_own(written):
    try:
        raise ValueError("bad\nINFO scep.core.service: forged")
    except ValueError:
        logging.getLogger("scep.core.service").exception("failed")
    first, *rest = written.getvalue().splitlines()
    assert first == "ERROR scep.core.service: failed"
    assert rest and all(line.startswith("    ") for line in rest)


def test_other_loggers_are_left_alone(written):
    logging.getLogger("azure.core").warning("a\nb")
    assert written.getvalue() == "WARNING azure.core: a\nb\n"


def test_install_is_idempotent():
    logs.install()
    factory = logging.getLogRecordFactory()
    logs.install()
    assert logging.getLogRecordFactory() is factory


@pytest.mark.parametrize("value", ["loud", "trace", "5"])
def test_a_wrong_log_level_stops_the_start(value):
    with pytest.raises(config.ConfigError, match="SCEP_LOG_LEVEL"):
        config.load_settings({"SCEP_CHALLENGE": "x", "SCEP_LOG_LEVEL": value})


@pytest.mark.parametrize("value", ["0", "366", "soon"])
def test_a_wrong_renewal_threshold_stops_the_start(value):
    with pytest.raises(config.ConfigError, match="SCEP_RA_RENEW_DAYS"):
        config.load_settings({"SCEP_CHALLENGE": "x", "SCEP_RA_RENEW_DAYS": value})
