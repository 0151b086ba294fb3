"""The agent's own logs: one JSON object per line on stderr.

Every line has ``ts`` (ISO 8601, UTC), ``level``, ``event`` and ``logger``, then the bound
fields. An exception is rendered into one ``exc`` string field (JSON-escaped, so still one
line): a raw multi-line traceback would be split into separate records by any log collector,
including this agent reading its own pod's log.

Design:

- Level filtering uses ``structlog.make_filtering_bound_logger``: a call below the level is a
  method that returns ``None``, before any processor runs.
- :func:`get_logger` returns a small proxy that builds its bound logger once per configuration
  (a generation counter) instead of on every call like structlog's uncached lazy proxy, and
  unlike structlog's cached proxy it follows a later :func:`configure_logging`. So
  ``log = get_logger(__name__)`` at import time is both cheap and correct, and tests may
  reconfigure freely. Loggers made with ``.bind()`` are snapshots of the configuration of the
  moment (their output stream still follows reconfiguration).
- The output stream is looked up at write time; ``stream=None`` means whatever ``sys.stderr``
  is then (pytest's capture swaps it).
- Records of the standard ``logging`` module (aiohttp, boto3, kubernetes) go through the same
  renderer, so the whole process speaks one format.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import traceback
from datetime import UTC, datetime
from typing import Any, Final, TextIO, cast

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from evidence_keeper.model import StreamId

__all__ = ["LEVELS", "configure_logging", "get_logger", "stream_fields"]

LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
# Libraries that are chatty below WARNING (a line per HTTP request or retry).
_NOISY_LIBRARIES: Final = ("botocore", "boto3", "s3transfer", "urllib3", "kubernetes")


class _Writer:
    """The structlog "wrapped logger": writes finished lines to the current stream."""

    def __init__(self) -> None:
        self.stream: TextIO | None = None
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        with self._lock:
            try:
                stream.write(message + "\n")
                stream.flush()
            except (OSError, ValueError):
                # A closed or broken stderr must not take the agent down with it.
                pass

    log = debug = info = warning = error = critical = exception = fatal = failure = err = msg


def _exc_field(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    exc_info = event_dict.pop("exc_info", None)
    error: BaseException | None = None
    if isinstance(exc_info, BaseException):
        error = exc_info
    elif isinstance(exc_info, tuple):
        error = exc_info[1]
    elif exc_info:
        error = sys.exc_info()[1]
    if error is not None:
        event_dict["exc"] = "".join(traceback.format_exception(error)).rstrip()
    return event_dict


def _timestamp(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    event_dict["ts"] = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return event_dict


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    if isinstance(value, BaseException):
        return repr(value)
    return str(value)


def _render(_: WrappedLogger, __: str, event_dict: EventDict) -> str:
    line: dict[str, Any] = {
        "ts": event_dict.pop("ts", None),
        "level": event_dict.pop("level", None),
        "event": event_dict.pop("event", None),
        "logger": event_dict.pop("logger", None),
    }
    line.update(event_dict)
    # ensure_ascii: file names from os.fsdecode() may hold lone surrogates, which a UTF-8
    # stderr refuses to encode; escaped, they always write.
    return json.dumps(line, default=_json_default, ensure_ascii=True, separators=(",", ":"))


_PROCESSORS: Final[list[Processor]] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    _timestamp,
    _exc_field,
    _render,
]


class _State:
    def __init__(self) -> None:
        self.generation = 0
        self.wrapper_class: type[FilteringBoundLogger] = structlog.make_filtering_bound_logger(
            logging.INFO
        )
        self.writer = _Writer()


_state: Final = _State()


class _StdlibBridge(logging.Handler):
    """Renders standard-library log records with the same JSON processors."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event_dict: EventDict = {
                "event": record.getMessage(),
                "logger": record.name,
            }
            if record.exc_info and record.exc_info[1] is not None:
                event_dict["exc_info"] = record.exc_info[1]
            method = record.levelname.lower()
            event_dict["level"] = method
            # No contextvars here: the record may come from a thread or a library's task.
            event_dict = _exc_field(None, method, _timestamp(None, method, event_dict))
            _state.writer.msg(_render(None, method, event_dict))
        except Exception:  # pragma: no cover - logging must never raise into the caller
            self.handleError(record)


def configure_logging(level: str = "info", *, stream: TextIO | None = None) -> None:
    """JSON lines at ``level`` and above to ``stream`` (default: the current ``sys.stderr``).

    Safe to call again: existing :func:`get_logger` loggers follow the new configuration.
    """
    try:
        levelno = LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r} (expected debug, info, warning or error)"
        ) from None
    _state.wrapper_class = structlog.make_filtering_bound_logger(levelno)
    _state.writer.stream = stream
    _state.generation += 1
    # Code calling structlog.get_logger() directly gets the same output.
    structlog.configure(
        processors=_PROCESSORS,
        wrapper_class=_state.wrapper_class,
        logger_factory=lambda *_: _state.writer,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StdlibBridge)]:
        root.removeHandler(handler)
    root.addHandler(_StdlibBridge())
    root.setLevel(levelno)
    for name in _NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(max(levelno, logging.WARNING))


class _LoggerProxy:
    """Builds its bound logger once per configuration generation; see the module docstring."""

    __slots__ = ("_bound", "_context", "_generation")

    def __init__(self, context: dict[str, Any]) -> None:
        self._context = context
        self._generation = -1
        self._bound: FilteringBoundLogger | None = None

    def _current(self) -> FilteringBoundLogger:
        bound = self._bound
        if bound is None or self._generation != _state.generation:
            bound = _state.wrapper_class(
                _state.writer,
                processors=_PROCESSORS,
                context=dict(self._context),  # type: ignore[call-arg]
            )
            self._bound, self._generation = bound, _state.generation
        return bound

    def __getattr__(self, name: str) -> Any:
        return getattr(self._current(), name)

    def __repr__(self) -> str:
        return f"<logger {self._context.get('logger')!r}>"


def get_logger(name: str, **bound: object) -> FilteringBoundLogger:
    """A logger named ``name`` (the ``logger`` field) with ``bound`` fields on every line."""
    return cast(FilteringBoundLogger, _LoggerProxy({"logger": name, **bound}))


def stream_fields(stream: StreamId) -> dict[str, object]:
    """The fields bound to log lines about one stream (container instance)."""
    return {
        "namespace": stream.namespace,
        "pod": stream.pod,
        "pod_uid": stream.pod_uid,
        "container": stream.container,
        "restart": stream.restart,
    }
