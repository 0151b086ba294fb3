from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from evidence_keeper.logs import configure_logging, get_logger, stream_fields
from evidence_keeper.model import StreamId

STREAM = StreamId("shop", "checkout-7d9f", "0b6c1f9e-uid", "app", 3)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    configure_logging("info")  # back to the current sys.stderr for other tests


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    text = buf.getvalue()
    assert text.endswith("\n") or not text
    return [json.loads(line) for line in text.splitlines()]


def test_one_json_object_per_line_with_bound_stream_fields() -> None:
    buf = io.StringIO()
    configure_logging("info", stream=buf)
    log = get_logger("evidence_keeper.tail", **stream_fields(STREAM))
    log.info("file opened", path="/var/log/pods/x/app/3.log", offset=0)
    log.bind(segment=7).warning("sealed\nwith a newline")
    first, second = lines(buf)
    assert list(first)[:4] == ["ts", "level", "event", "logger"]
    assert first["level"] == "info"
    assert first["event"] == "file opened"
    assert first["logger"] == "evidence_keeper.tail"
    assert first["namespace"] == "shop"
    assert first["pod"] == "checkout-7d9f"
    assert first["pod_uid"] == "0b6c1f9e-uid"
    assert first["container"] == "app"
    assert first["restart"] == 3
    assert first["offset"] == 0
    assert first["ts"].endswith("Z")
    assert second["level"] == "warning"
    assert second["segment"] == 7
    assert second["event"] == "sealed\nwith a newline"


def test_stream_fields() -> None:
    assert stream_fields(STREAM) == {
        "namespace": "shop",
        "pod": "checkout-7d9f",
        "pod_uid": "0b6c1f9e-uid",
        "container": "app",
        "restart": 3,
    }


def test_level_filtering() -> None:
    buf = io.StringIO()
    configure_logging("warning", stream=buf)
    log = get_logger("t")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [line["event"] for line in lines(buf)] == ["w", "e"]


def test_debug_level_shows_everything() -> None:
    buf = io.StringIO()
    configure_logging("DEBUG", stream=buf)
    get_logger("t").debug("d", n=1)
    assert lines(buf) == [
        {"ts": lines(buf)[0]["ts"], "level": "debug", "event": "d", "logger": "t", "n": 1}
    ]


def test_unknown_level() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        configure_logging("loud")


def test_reconfiguring_updates_existing_loggers() -> None:
    log = get_logger("module.level")  # as created at import time, before configuration
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", stream=first)
    log.info("one")
    log.debug("hidden")
    configure_logging("debug", stream=second)
    log.debug("two")
    assert [line["event"] for line in lines(first)] == ["one"]
    assert [line["event"] for line in lines(second)] == ["two"]


def test_exceptions_become_one_exc_field() -> None:
    buf = io.StringIO()
    configure_logging("info", stream=buf)
    log = get_logger("t")
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError as exc:
        log.exception("spool write failed")
        log.error("again", exc_info=exc)
    text = buf.getvalue()
    assert text.count("\n") == 2
    first, second = lines(buf)
    assert first["level"] == "error"
    assert "Traceback (most recent call last)" in first["exc"]
    assert first["exc"].endswith("RuntimeError: disk on fire")
    assert second["exc"].endswith("RuntimeError: disk on fire")
    assert "exc_info" not in first


def test_awkward_values_still_render() -> None:
    buf = io.StringIO()
    configure_logging("info", stream=buf)
    name = b"bad\xff".decode("utf-8", "surrogateescape")
    get_logger("t").info("odd", name=name, raw=b"\xffab", err=ValueError("v"), s={2, 1})
    (line,) = lines(buf)
    assert line["raw"] == "\\xffab"
    assert line["err"] == "ValueError('v')"
    assert line["s"] == [1, 2]
    assert line["name"].startswith("bad")


def test_default_stream_is_the_current_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info")
    get_logger("t").info("to stderr")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert json.loads(captured.err)["event"] == "to stderr"
    assert sys.stderr is not None


def test_stdlib_logging_uses_the_same_format() -> None:
    buf = io.StringIO()
    configure_logging("info", stream=buf)
    configure_logging("info", stream=buf)  # twice: still one handler, one line per record
    logging.getLogger("aiohttp.access").info("GET %s %d", "/gaps", 200)
    logging.getLogger("botocore.retries").info("retrying")  # quiet library below WARNING
    logging.getLogger("some.lib").debug("filtered")
    (line,) = lines(buf)
    assert line["event"] == "GET /gaps 200"
    assert line["logger"] == "aiohttp.access"
    assert line["level"] == "info"


def test_stdlib_exceptions() -> None:
    buf = io.StringIO()
    configure_logging("info", stream=buf)
    try:
        raise KeyError("k")
    except KeyError:
        logging.getLogger("lib").exception("failed")
    (line,) = lines(buf)
    assert line["level"] == "error"
    assert line["exc"].endswith("KeyError: 'k'")


def test_structlog_get_logger_is_configured_too() -> None:
    buf = io.StringIO()
    configure_logging("warning", stream=buf)
    log = structlog.get_logger()
    log.info("filtered")
    log.warning("kept", k=1)
    (line,) = lines(buf)
    assert (line["event"], line["level"], line["k"]) == ("kept", "warning", 1)


def test_closed_stream_does_not_raise() -> None:
    buf = io.StringIO()
    configure_logging("info", stream=buf)
    buf.close()
    get_logger("t").info("into the void")
