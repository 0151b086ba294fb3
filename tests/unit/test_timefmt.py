"""One module writes and reads time (evidence_keeper/timefmt.py)."""

from __future__ import annotations

import ast
from datetime import UTC, datetime, timedelta, timezone

import pytest

from evidence_keeper.timefmt import (
    TimeError,
    parse_rfc3339,
    parse_time,
    rfc3339,
    rfc3339_or_none,
)
from tests.support.paths import PACKAGE

NOW = datetime(2025, 11, 10, 12, 27, 0, tzinfo=UTC)


def test_rfc3339_is_fixed_width_utc_and_sorts_in_time_order() -> None:
    cet = timezone(timedelta(hours=1))
    assert rfc3339(datetime(2025, 11, 10, 13, 27, tzinfo=cet)) == "2025-11-10T12:27:00.000000Z"
    stamps = [NOW + timedelta(microseconds=n) for n in (0, 1, 999_999, 10**6, 10**9)]
    assert sorted(rfc3339(t) for t in stamps) == [rfc3339(t) for t in stamps]
    assert rfc3339_or_none(None) is None and rfc3339_or_none(NOW) == rfc3339(NOW)


def test_parse_time_takes_rfc3339_or_a_duration_back_from_now() -> None:
    assert parse_time("30m", "since", NOW) == NOW - timedelta(minutes=30)
    assert parse_time("1h30m", "since", NOW) == NOW - timedelta(minutes=90)
    assert parse_time("2025-11-10T12:00:00Z", "since", NOW) == NOW - timedelta(minutes=27)
    assert parse_time("2025-11-10T13:00:00+01:00", "x", NOW) == NOW - timedelta(minutes=27)
    assert parse_time("2025-11-10t12:00:00z", "x", NOW).tzinfo == UTC


@pytest.mark.parametrize(("value", "message"), [
    ("", "since: empty value"),
    ("30 parsecs", "is neither RFC3339 nor a duration"),
    ("2025-11-10T12:00:00", "needs a time zone"),
    ("2025-13-10T12:00:00Z", "is neither RFC3339 nor a duration"),
    ("999999999h", "is too long"),
    ("yesterday", "is neither RFC3339 nor a duration"),
])
def test_parse_time_errors_are_one_line_naming_the_parameter(value: str, message: str) -> None:
    with pytest.raises(TimeError) as exc:
        parse_time(value, "since", NOW)
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert str(exc.value).startswith("since: ")


def test_parse_rfc3339_is_lenient_for_documents() -> None:
    assert parse_rfc3339("2025-11-10T12:27:00Z") == NOW
    assert parse_rfc3339("2025-11-10T12:27:00.000000z") == NOW
    for bad in (None, "", "2025-11-10T12:27:00", "garbage", 17):
        assert parse_rfc3339(bad) is None


def test_no_other_module_formats_or_parses_rfc3339_inline() -> None:
    """``rfc3339`` was written three times and parsed inline in six places (issue 11)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "timefmt.py" or "sim" in path.parts:
            continue  # the simulator writes kubelet's own formats on purpose
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in ("rfc3339", "parse_rfc3339",
                                                                   "parse_time"):
                body = ast.unparse(node)
                if "timefmt" not in body:
                    offenders.append(f"{path.name}: def {node.name}")
            if isinstance(node, ast.Constant) and node.value == "%Y-%m-%dT%H:%M:%S.%fZ":
                offenders.append(f"{path.name}:{node.lineno}: strftime RFC3339")
    assert offenders == []
