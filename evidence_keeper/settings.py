"""The whole configuration, validated at the edge.

Sources, lowest precedence first (CONTRACT.md section 5):

1. field defaults (``node_name`` defaults to ``$NODE_NAME``, else the host name; ``store_url``
   to ``file://<spool_dir>/store``);
2. the YAML file (``--config PATH``, else ``$EK_CONFIG``); an unknown key is an error that names
   it and suggests the closest known key, because a misspelt key silently falling back to its
   default is how evidence gets lost;
3. ``EK_<KEY>`` environment variables (``flush_interval_s`` -> ``EK_FLUSH_INTERVAL_S``); an
   empty value counts as unset, so a Helm chart rendering ``value: ""`` does not break start-up;
   other ``EK_*`` names are ignored;
4. explicit overrides from the command line (``None`` values are ignored so argparse defaults can
   be passed through as they are).

A YAML ``null`` also means "use the default". Every invalid value is reported as a
:class:`ConfigError` whose ``str()`` is one line naming the key, the bad value and what is
expected, e.g. ``config error: flush_interval_s: '5x' is not a duration (examples: 5, 500ms,
2m)``; the CLI prints it and exits non-zero, never a pydantic dump.

Value forms accepted from YAML and from the (string-only) environment alike:

- sizes: ``100`` (bytes), ``512KiB``, ``8MiB``, ``10GiB``, ``1TiB`` (1024^n; ``K``/``M``/``G``/``T``
  are binary too), ``1.5GB``, ``500MB``, ``64KB`` (1000^n);
- durations: numbers of seconds (``5``, ``0.25``) or ``500ms``, ``5s``, ``2m``, ``1h``, ``1d``, and
  sums such as ``1m30s``;
- ``sink_probes``: a comma list (or YAML list, or YAML mapping name -> target) of
  ``name=host:port`` (TCP connect), ``name=https://url`` or ``name=http://url`` (HTTP GET) and
  ``name=dns:host`` (resolve). Names are unique; ``store`` is reserved for the store's own probe.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Final, Literal, cast
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

__all__ = [
    "SETTINGS_KEYS",
    "ConfigError",
    "ReplayTarget",
    "Settings",
    "SinkProbe",
    "load_settings",
    "parse_duration",
    "parse_size",
]

ENV_PREFIX: Final = "EK_"
CONFIG_ENV: Final = "EK_CONFIG"
RESERVED_SINK: Final = "store"
_ERROR_TYPE: Final = "ek_config"


class ConfigError(Exception):
    """An invalid configuration: ``str()`` is one line, ``config error: <key>: <detail>``.

    ``key`` is the setting (or, for a file that cannot be read, the file's path).
    """

    def __init__(self, key: str | None, detail: str) -> None:
        self.key = key
        self.detail = " ".join(detail.split())
        where = f"{key}: " if key else ""
        super().__init__(f"config error: {where}{self.detail}")

    @classmethod
    def from_validation_error(cls, exc: ValidationError) -> ConfigError:
        """The first error of a pydantic ``ValidationError``, as one line (+N more)."""
        errors = exc.errors(include_url=False)
        if not errors:  # pragma: no cover - pydantic never raises an empty error
            return cls(None, str(exc))
        first = errors[0]
        ctx = first.get("ctx") or {}
        key = ".".join(str(part) for part in first["loc"]) or str(ctx.get("key", "")) or None
        if first["type"] == _ERROR_TYPE:
            detail = first["msg"]
        elif first["type"] == "extra_forbidden":
            detail = "unknown key" + _suggestion(key or "")
        else:
            msg = first["msg"]
            detail = f"{_show(first.get('input'))} is invalid: {msg[:1].lower()}{msg[1:]}"
        if len(errors) > 1:
            detail += f" (+{len(errors) - 1} more)"
        return cls(key, detail)


# --------------------------------------------------------------------------------------------
# Value parsers. Each raises a PydanticCustomError whose message already names the bad value,
# so the one-line ConfigError is "<key>: <message>".


def _show(value: object) -> str:
    text = repr(str(value) if isinstance(value, Path) else value)
    return text if len(text) <= 80 else text[:77] + "..."


def _invalid(value: object, expected: str, *, key: str | None = None) -> PydanticCustomError:
    # The message goes through the context, not the template, so braces in values are harmless.
    context: dict[str, Any] = {"message": f"{_show(value)} {expected}"}
    if key is not None:
        context["key"] = key
    return PydanticCustomError(_ERROR_TYPE, "{message}", context)


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


_SIZE_RE: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")
_SIZE_UNITS: Final = {
    "": 1,
    "b": 1,
    **{f"{p}{s}": 1024**n for n, p in enumerate("kmgt", 1) for s in ("", "i", "ib")},
    **{f"{p}b": 1000**n for n, p in enumerate("kmgt", 1)},
}
_SIZE_EXAMPLES: Final = "(examples: 100, 512KiB, 8MiB, 10GiB, 1.5GB)"


def parse_size(value: object) -> int:
    """Bytes from ``100``, ``512KiB``, ``8MiB``, ``1.5GB``...; ``ValueError`` if not a size."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(value)
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value.strip().lower())
        if m is not None and m[2] in _SIZE_UNITS:
            try:
                number = Decimal(m[1])
            except InvalidOperation:  # pragma: no cover - the regex only admits decimals
                raise ValueError(value) from None
            return int((number * _SIZE_UNITS[m[2]]).to_integral_value())
    raise ValueError(value)


def _size(*, minimum: int = 1) -> Callable[[object], int]:
    def check(value: object) -> int:
        try:
            size = parse_size(value)
        except ValueError:
            raise _invalid(value, f"is not a size {_SIZE_EXAMPLES}") from None
        if size < minimum:
            raise _invalid(value, f"is too small: must be at least {minimum} bytes")
        return size

    return check


_NUMBER_RE: Final = re.compile(r"[+-]?(\d+(?:\.\d*)?|\.\d+)(e[+-]?\d+)?")
_DURATION_RE: Final = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ms|s|m|h|d))+")
_DURATION_PART_RE: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_EXAMPLES: Final = "(examples: 5, 500ms, 2m)"


def parse_duration(value: object) -> float:
    """Seconds from ``5``, ``0.5``, ``500ms``, ``5s``, ``2m``, ``1h``, ``1m30s``...

    Raises ``ValueError`` if the value is not a duration (signs are allowed on plain numbers so
    that range errors can say "must be > 0" instead of "not a duration").
    """
    seconds: float
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = "".join(value.split()).lower()
        if _NUMBER_RE.fullmatch(text):
            seconds = float(text)
        elif _DURATION_RE.fullmatch(text):
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART_RE.findall(text))
        else:
            raise ValueError(value)
    else:
        raise ValueError(value)
    if not math.isfinite(seconds):
        raise ValueError(value)
    return seconds


def _duration(
    *, le: float | None = None, lt: float | None = None, why: str = ""
) -> Callable[[object], float]:
    def check(value: object) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError:
            raise _invalid(value, f"is not a duration {_DURATION_EXAMPLES}") from None
        if seconds <= 0:
            raise _invalid(value, "is out of range: must be greater than 0")
        if le is not None and seconds > le:
            raise _invalid(value, f"is out of range: must be at most {le:g}s{why}")
        if lt is not None and seconds >= lt:
            raise _invalid(value, f"is out of range: must be less than {lt:g}s{why}")
        return seconds

    return check


def _integer(*, minimum: int | None = None, maximum: int | None = None) -> Callable[[object], int]:
    def check(value: object) -> int:
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        elif isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            number = int(value.strip())
        if number is None:
            raise _invalid(value, "is not an integer")
        if minimum is not None and maximum is not None and not minimum <= number <= maximum:
            raise _invalid(value, f"is out of range ({minimum}..{maximum})")
        if minimum is not None and number < minimum:
            raise _invalid(value, f"is out of range: must be at least {minimum}")
        if maximum is not None and number > maximum:
            raise _invalid(value, f"is out of range: must be at most {maximum}")
        return number

    return check


def _choice(
    options: tuple[str, ...], aliases: Mapping[object, str] | None = None
) -> Callable[[object], str]:
    def check(value: object) -> str:
        # YAML 1.1 reads on/off/yes/no as booleans: map them back before comparing.
        if aliases is not None and isinstance(value, bool | str):
            key = value.strip().lower() if isinstance(value, str) else value
            if key in aliases:
                return aliases[key]
        if isinstance(value, str):
            text = value.strip().lower()
            for option in options:
                if option.lower() == text:
                    return option
        raise _invalid(value, f"is not one of {', '.join(options)}")

    return check


def _optional(check: Callable[[object], Any]) -> Callable[[object], Any]:
    def optional(value: object) -> Any:
        return None if _blank(value) else check(value)

    return optional


def _abs_path(value: object) -> Path:
    if not isinstance(value, str | Path) or not str(value).strip() or "\0" in str(value):
        raise _invalid(value, "is not a path")
    # abspath (not resolve): no file-system access, and a relative path means the working
    # directory, as an operator running the agent by hand expects.
    return Path(os.path.abspath(os.path.expanduser(str(value).strip())))


_NAME_RE: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")


def _cluster(value: object) -> str:
    # The first component of every store key: no '/', no dot-segments, no surprises.
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value.strip()):
        raise _invalid(value, "is not a valid name (letters, digits, '.', '_', '-')")
    return value.strip()


def _node_name(value: object) -> str:
    if (
        not isinstance(value, str)
        or not value.strip()
        or re.search(r"[\s/\x00-\x1f]", value.strip())
    ):
        raise _invalid(value, "is not a valid node name (non-empty, no spaces or '/')")
    return value.strip()


def _default_node_name() -> str:
    return os.environ.get("NODE_NAME", "").strip() or socket.gethostname()


# --------------------------------------------------------------------------------------------
# Store URL


_BUCKET_RE: Final = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_STORE_EXPECTED: Final = (
    "is not a store URL (expected s3://bucket[/prefix] or file:///absolute/dir)"
)


@dataclass(frozen=True, slots=True)
class _Store:
    scheme: Literal["s3", "file"]
    bucket: str | None
    prefix: str
    directory: Path | None

    @property
    def url(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        return f"file://{self.directory}"


def _parse_store(url: str) -> _Store:
    """Raises ``ValueError`` with the expectation text when ``url`` is not a store URL."""
    text = url.strip()
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("s3", "file") or "?" in rest or "#" in rest:
        raise ValueError(_STORE_EXPECTED)
    if scheme == "file":
        if not rest.startswith("/"):
            raise ValueError("is not a file store URL (expected file:///absolute/dir)")
        directory = Path(os.path.normpath(rest))
        if directory == Path("/"):
            raise ValueError("is not a usable store directory (the file-system root)")
        return _Store("file", None, "", directory)
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise ValueError("has an invalid bucket name (3-63 lowercase letters, digits, '.', '-')")
    parts = prefix.strip("/").split("/") if prefix.strip("/") else []
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError("has an invalid prefix (empty, '.' or '..' path components)")
    return _Store("s3", bucket, "/".join(parts), None)


def _store_url(value: object) -> str:
    if not isinstance(value, str):
        raise _invalid(value, _STORE_EXPECTED)
    try:
        return _parse_store(value).url
    except ValueError as exc:
        raise _invalid(value, str(exc)) from None


def _http_url(value: object) -> str:
    if isinstance(value, str):
        try:
            parts = urlsplit(value.strip())
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            parts = None
        if parts is not None and parts.scheme in ("http", "https") and parts.hostname:
            return value.strip()
    raise _invalid(value, "is not an http(s) URL (example: https://minio.example:9000)")


# --------------------------------------------------------------------------------------------
# Addresses and sink probes


def _split_host_port(text: str, *, allow_empty_host: bool) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; raises ``ValueError`` with a reason."""
    text = text.strip()
    if text.startswith("["):
        host, bracket, port_text = text[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise ValueError("expected [ipv6]:port")
        port_text = port_text[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError("expected host:port")
        if ":" in host:
            raise ValueError("IPv6 addresses need brackets: [addr]:port")
    if not host and not allow_empty_host:
        raise ValueError("the host is empty")
    if host and re.search(r"[\s/\\@]", host):
        raise ValueError("the host is not a host name or address")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError("the port is not a number in 0..65535")
    return host, int(port_text)


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listen(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = f":{value}"
    if isinstance(value, str):
        try:
            host, port = _split_host_port(value, allow_empty_host=True)
        except ValueError as exc:
            raise _invalid(
                value, f"is not a listen address ({exc}; example: 0.0.0.0:9095)"
            ) from None
        return _join_host_port(host or "0.0.0.0", port)
    raise _invalid(value, "is not a listen address (example: 0.0.0.0:9095)")


@dataclass(frozen=True, slots=True)
class SinkProbe:
    """One external log sink to probe: its health becomes ``evidence_keeper_sink_up``.

    ``target`` is what the probe uses: ``host:port`` (tcp), the URL (http) or the host name
    (dns). ``port`` is ``None`` for dns probes.
    """

    name: str
    kind: Literal["tcp", "http", "dns"]
    target: str
    host: str
    port: int | None


_PROBE_NAME_RE: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
_PROBE_EXPECTED: Final = "(expected name=host:port, name=https://url or name=dns:host)"


def _parse_probe(name: str, target: str) -> SinkProbe:
    """Raises ``ValueError`` with a reason."""
    name, target = name.strip(), target.strip()
    if not _PROBE_NAME_RE.fullmatch(name):
        raise ValueError(f"the name {name!r} is invalid (letters, digits, '.', '_', '-')")
    if name == RESERVED_SINK:
        raise ValueError(f"the name {RESERVED_SINK!r} is reserved for the store's own probe")
    lowered = target.lower()
    if lowered.startswith(("http://", "https://")):
        try:
            parts = urlsplit(target)
            port = parts.port
        except ValueError:
            raise ValueError("the URL has an invalid port") from None
        if not parts.hostname:
            raise ValueError("the URL has no host")
        default_port = 443 if parts.scheme.lower() == "https" else 80
        return SinkProbe(name, "http", target, parts.hostname, port or default_port)
    if lowered.startswith("dns:"):
        host = target[4:].strip()
        if not host or re.search(r"[\s/:@]", host):
            raise ValueError("expected dns:<host name>")
        return SinkProbe(name, "dns", host, host, None)
    try:
        host, port = _split_host_port(target, allow_empty_host=False)
    except ValueError as exc:
        raise ValueError(f"{exc} {_PROBE_EXPECTED}") from None
    if port == 0:
        raise ValueError("the port is not a number in 1..65535")
    return SinkProbe(name, "tcp", _join_host_port(host, port), host, port)


def _probe_entry(item: object) -> tuple[object, str, str] | None:
    """One element of a list of probes as (shown entry, name, target); None to skip it."""
    parsed: Mapping[Any, Any] | None = None
    if isinstance(item, SinkProbe):  # re-validating a Settings or its model_dump()
        parsed = {"name": item.name, "kind": item.kind, "target": item.target}
    elif isinstance(item, Mapping) and {"name", "kind", "target"} <= item.keys():
        parsed = item
    if parsed is not None:
        name, target = str(parsed["name"]), str(parsed["target"])
        return name, name, f"dns:{target}" if parsed["kind"] == "dns" else target
    if not isinstance(item, str) or "=" not in item:
        if isinstance(item, str) and not item.strip():
            return None  # "a=x:1," tolerates the trailing comma
        raise _invalid(item, f"is not a probe {_PROBE_EXPECTED}")
    name, _, target = item.partition("=")
    return item.strip(), name, target


def _probe_entries(value: object) -> list[tuple[object, str, str]]:
    """``sink_probes`` as written (a mapping, a comma list or a list) as entries."""
    if isinstance(value, Mapping):
        entries: list[tuple[object, str, str]] = []
        for name, target in value.items():
            if not isinstance(name, str) or not isinstance(target, str):
                raise _invalid({name: target}, f"is not a probe {_PROBE_EXPECTED}")
            entries.append((f"{name}={target}", name, target))
        return entries
    if isinstance(value, str | list | tuple):
        items = value.split(",") if isinstance(value, str) else list(value)
        return [e for e in map(_probe_entry, items) if e is not None]
    raise _invalid(value, f"is not a list of probes {_PROBE_EXPECTED}")


def _sink_probes(value: object) -> tuple[SinkProbe, ...]:
    if _blank(value):
        return ()
    probes: list[SinkProbe] = []
    for shown, name, target in _probe_entries(value):
        try:
            probe = _parse_probe(name, target)
        except ValueError as exc:
            raise _invalid(shown, f"is not a valid probe: {exc}") from None
        if any(p.name == probe.name for p in probes):
            raise _invalid(shown, f"repeats the probe name {probe.name!r}: names must be unique")
        probes.append(probe)
    return tuple(probes)


def _path_list(value: object) -> tuple[Path, ...]:
    """A comma list (or YAML list) of absolute directories; empty means none."""
    if isinstance(value, str):
        items: list[object] = [v for v in value.split(",") if v.strip()]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise _invalid(value, "is not a comma list of directories")
    out: list[Path] = []
    for item in items:
        if not isinstance(item, str | Path) or not str(item).strip().startswith("/"):
            raise _invalid(item, "is not an absolute directory")
        out.append(_abs_path(item))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Replay targets (issue 15): where ``evidence-keeper replay`` and the automatic backfill send
# preserved lines. A YAML mapping ``name -> {kind, url, credentials_file, ...}``; from the
# environment (``EK_REPLAY_TARGETS``) the same mapping as JSON or YAML text.

REPLAY_KINDS: Final = ("datadog", "loki", "otlp")
DATADOG_DEFAULT_SITE: Final = "datadoghq.com"
_REPLAY_KEYS: Final = frozenset({"kind", "url", "credentials_file", "site", "archive_url",
                                 "tenant", "tags", "max_age"})


@dataclass(frozen=True, slots=True)
class ReplayTarget:
    """One sink replay can write to.

    ``url``: the endpoint (Datadog: derived from ``site`` when unset, e.g.
    ``https://http-intake.logs.datadoghq.eu/api/v2/logs``; Loki: its base URL or the full
    ``/loki/api/v1/push`` URL; OTLP: the base URL or the full ``/v1/logs`` URL).
    ``credentials_file``: Datadog API key; Loki ``user:password`` (basic) or a bearer token;
    OTLP a bearer token. Read when a replay starts, never logged. ``archive_url``
    (Datadog only): ``file:///dir`` or ``s3://bucket/prefix`` of a Datadog log archive, where
    lines older than ``max_age_s`` (18 h: the oldest the intake accepts) are written in
    Datadog's archive format for Log Rehydration. ``tenant``: Loki's ``X-Scope-OrgID``.
    ``tags``: extra ``key:value`` tags (Datadog) or labels (Loki) or resource attributes (OTLP).
    """

    name: str
    kind: Literal["datadog", "loki", "otlp"]
    url: str
    credentials_file: Path | None = None
    site: str = DATADOG_DEFAULT_SITE
    archive_url: str | None = None
    tenant: str | None = None
    tags: tuple[tuple[str, str], ...] = ()
    max_age_s: float = 18 * 3600.0


def _replay_url(kind: str, url: object, site: str) -> str:
    if _blank(url):
        if kind != "datadog":
            raise ValueError(f"a {kind} target needs a url")
        return f"https://http-intake.logs.{site}/api/v2/logs"
    text = str(url).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url {text!r} is not an http(s) URL")
    path = parts.path.rstrip("/")
    suffix = {"datadog": "/api/v2/logs", "loki": "/loki/api/v1/push", "otlp": "/v1/logs"}[kind]
    if not path.endswith(suffix):
        text = text.rstrip("/") + suffix
    return text


def _replay_tags(value: object) -> tuple[tuple[str, str], ...]:
    if _blank(value):
        return ()
    items: list[tuple[str, str]] = []
    if isinstance(value, Mapping):
        items = [(str(k), str(v)) for k, v in value.items()]
    elif isinstance(value, str | list | tuple):
        for t in value.split(",") if isinstance(value, str) else value:
            k, sep, v = str(t).strip().partition(":")
            if not sep or not k:
                raise ValueError(f"tag {t!r} is not key:value")
            items.append((k, v))
    else:
        raise ValueError("tags must be a mapping or a list of key:value")
    return tuple(items)


def _parse_replay_target(name: str, doc: object) -> ReplayTarget:
    """Raises ``ValueError`` with a reason."""
    if not isinstance(doc, Mapping):
        raise ValueError("must be a mapping with at least kind and url")
    unknown = sorted(str(k) for k in doc if k not in _REPLAY_KEYS)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(_REPLAY_KEYS))})")
    kind = str(doc.get("kind", "")).strip().lower()
    if kind not in REPLAY_KINDS:
        raise ValueError(f"kind {doc.get('kind')!r} is not one of {', '.join(REPLAY_KINDS)}")
    site = str(doc.get("site") or DATADOG_DEFAULT_SITE).strip()
    if not re.fullmatch(r"[a-z0-9.-]+\.[a-z]{2,}", site):
        raise ValueError(f"site {site!r} is not a Datadog site such as datadoghq.eu")
    creds = doc.get("credentials_file")
    cred_path = None if _blank(creds) else Path(str(creds))
    if cred_path is not None and not cred_path.is_absolute():
        raise ValueError(f"credentials_file {str(creds)!r} must be an absolute path")
    if kind == "datadog" and cred_path is None:
        raise ValueError("a datadog target needs credentials_file (the API key)")
    archive = doc.get("archive_url")
    archive_url = None if _blank(archive) else str(archive).strip()
    if archive_url is not None:
        if kind != "datadog":
            raise ValueError("archive_url is for datadog targets only")
        if not archive_url.startswith(("file:///", "s3://")):
            raise ValueError(f"archive_url {archive_url!r} is not file:///dir or s3://bucket/prefix")
    max_age = parse_duration(doc.get("max_age", 18 * 3600))
    if not 60 <= max_age <= 18 * 3600:
        raise ValueError("max_age must be between 1m and 18h (the Datadog intake limit)")
    tenant = doc.get("tenant")
    return ReplayTarget(
        name=name, kind=kind,  # type: ignore[arg-type]
        url=_replay_url(kind, doc.get("url"), site), credentials_file=cred_path, site=site,
        archive_url=archive_url, tenant=None if _blank(tenant) else str(tenant),
        tags=_replay_tags(doc.get("tags")), max_age_s=max_age)


def _replay_targets(value: object) -> tuple[ReplayTarget, ...]:
    if _blank(value):
        return ()
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise _invalid(value, "is not a YAML/JSON mapping of replay targets") from None
    if isinstance(value, tuple | list) and all(isinstance(t, ReplayTarget) for t in value):
        return tuple(value)  # re-validating a Settings
    if isinstance(value, tuple | list) and all(isinstance(t, Mapping) and "name" in t
                                               for t in value):
        value = {str(t["name"]): {k: v for k, v in t.items() if k != "name"} for t in value}
    if not isinstance(value, Mapping):
        raise _invalid(value, "is not a mapping of replay targets (name -> {kind, url, ...})")
    out: list[ReplayTarget] = []
    for name, doc in value.items():
        if not isinstance(name, str) or not _PROBE_NAME_RE.fullmatch(name):
            raise _invalid(name, "is not a valid target name (letters, digits, '.', '_', '-')")
        spec = doc
        if isinstance(doc, Mapping) and "max_age_s" in doc:
            spec = {**{k: v for k, v in doc.items() if k != "max_age_s"},
                    "max_age": doc["max_age_s"]}
        try:
            out.append(_parse_replay_target(name, spec))
        except (ValueError, PydanticCustomError) as exc:
            raise _invalid(name, f"is not a valid replay target: {exc}") from None
    return tuple(out)


def _replay_on_recovery(value: object) -> tuple[str, ...]:
    if _blank(value):
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise _invalid(value, "is not a list of replay target names")
    names = tuple(str(i).strip() for i in items if str(i).strip())
    if len(set(names)) != len(names):
        raise _invalid(value, "repeats a target name")
    return names


# --------------------------------------------------------------------------------------------
# Field types. Every parser runs before pydantic's own type check, so the check never fails
# with pydantic's wording except for values no parser anticipated.

Size = Annotated[int, BeforeValidator(_size())]
Duration = Annotated[float, BeforeValidator(_duration())]
SubsecondDuration = Annotated[float, BeforeValidator(_duration(le=1.0))]
CommitDuration = Annotated[
    float,
    BeforeValidator(_duration(lt=1.0, why=" (every byte must be durable within one second)")),
]
AbsPath = Annotated[Path, BeforeValidator(_abs_path)]
_ON_OFF: Final[Mapping[object, str]] = {True: "on", False: "off", "true": "on", "false": "off"}


class Settings(BaseModel):
    """Every setting of the agent and the CLI (CONTRACT.md section 5 plus tuning knobs).

    Immutable: build one with :func:`load_settings` and pass it down.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    # -- identity --------------------------------------------------------------------------
    node_name: Annotated[str, BeforeValidator(_node_name)] = Field(
        default_factory=_default_node_name,
        description="Node this agent serves (ek-node metadata, /gaps). Default: $NODE_NAME, "
        "else the host name.",
    )
    cluster: Annotated[str, BeforeValidator(_cluster)] = Field(
        default="default",
        description="Cluster name: the first store key component below the prefix.",
    )

    # -- input: the node's log tree ----------------------------------------------------------
    log_root: AbsPath = Field(default=Path("/var/log/pods"), description="Kubelet pod log root.")
    kubernetes: Annotated[
        Literal["on", "off", "auto"], BeforeValidator(_choice(("on", "off", "auto"), _ON_OFF))
    ] = Field(
        default="auto",
        description="Watch the Kubernetes API for pod lifecycle: on, off, or auto (on when "
        "running in a cluster).",
    )
    discover_interval_s: SubsecondDuration = Field(
        default=0.5,
        description="Period of the log-tree scan for new pods, containers and rotations.",
    )
    tail_interval_s: SubsecondDuration = Field(
        default=0.2, description="Poll period of open log files for new bytes."
    )
    log_symlink_roots: Annotated[tuple[Path, ...], BeforeValidator(_path_list)] = Field(
        default=(Path("/var/lib/docker/containers"),),
        description="Directories a symlinked log file may point into (cri-dockerd); links "
        "elsewhere and symlinked directories are skipped.",
    )
    watch_mode: Annotated[
        Literal["auto", "inotify", "poll"],
        BeforeValidator(_choice(("auto", "inotify", "poll"))),
    ] = Field(
        default="auto",
        description="How changes are noticed: inotify (change-driven), poll (every file each "
        "tail_interval_s), or auto (inotify, polling where it is unavailable or exhausted).",
    )
    rescan_interval_s: Duration = Field(
        default=10.0,
        description="With inotify: period of the full safety-net scan and read pass.",
    )
    fd_reserve: Annotated[int, BeforeValidator(_integer(minimum=16))] = Field(
        default=128,
        description="File descriptors kept for the spool, checkpoint, ledger, store and HTTP; "
        "the tail path never takes them.",
    )

    # -- spool: local durability -----------------------------------------------------------
    spool_dir: AbsPath = Field(
        default=Path("/var/lib/evidence-keeper"),
        description="Spool, read checkpoints and the gap ledger.",
    )
    spool_max_bytes: Size = Field(
        default=10 * 1024**3,
        description="Spool budget; at it, reading pauses for bytes still in their source files, "
        "and only endangered bytes (deleted files, ended streams) evict the largest stream's "
        "oldest unshipped segment (recorded as loss).",
    )
    commit_interval_s: CommitDuration = Field(
        default=0.25,
        description="Period of spool fsync and checkpoint commits; below 1s because every byte "
        "must be durable within one second.",
    )

    # -- store and shipping ----------------------------------------------------------------
    store_url: Annotated[str, BeforeValidator(_store_url)] = Field(
        default="",
        description="Where segments go: s3://bucket[/prefix] or file:///absolute/dir. "
        "Default: file://<spool_dir>/store.",
    )
    s3_endpoint_url: Annotated[str | None, BeforeValidator(_optional(_http_url))] = Field(
        default=None,
        description="Endpoint of an S3-compatible server (MinIO, Ceph); unset for AWS.",
    )
    sse: Annotated[
        Literal["AES256", "aws:kms"] | None,
        BeforeValidator(_optional(_choice(("AES256", "aws:kms")))),
    ] = Field(default=None, description="S3 server-side encryption of segments: AES256 or aws:kms.")
    sse_kms_key_id: Annotated[str | None, BeforeValidator(lambda v: None if _blank(v) else v)] = (
        Field(
            default=None,
            description="KMS key for sse=aws:kms; unset uses the bucket's default key.",
        )
    )
    object_lock_days: Annotated[int, BeforeValidator(_integer(minimum=0))] = Field(
        default=0,
        description="COMPLIANCE retention (days) set on segments and manifests; 0 = none.",
    )
    compression: Annotated[
        Literal["zstd", "gzip"],
        BeforeValidator(_choice(("zstd", "gzip"), {"zst": "zstd", "gz": "gzip"})),
    ] = Field(default="zstd", description="Segment compression: zstd (.zst) or gzip (.gz).")
    compression_level: Annotated[int, BeforeValidator(_integer())] = Field(
        default=3, description="Compression level: 1..19 for zstd, 1..9 for gzip."
    )
    flush_interval_s: Duration = Field(
        default=5.0, description="Max age of captured data before it is sealed and shipped."
    )
    segment_max_bytes: Size = Field(
        default=8 * 1024**2, description="Seal a segment when it reaches this size."
    )
    ship_concurrency: Annotated[int, BeforeValidator(_integer(minimum=1, maximum=64))] = Field(
        default=4, description="Uploads in flight at once."
    )
    backlog_threshold_s: Duration = Field(
        default=60.0,
        description="Unshipped data older than this opens a backlog gap (sink=store).",
    )
    shutdown_timeout_s: Duration = Field(
        default=20.0,
        description="Deadline for draining uploads on SIGTERM; keep it below the pod's "
        "terminationGracePeriodSeconds.",
    )

    # -- health: sink probes and the gap ledger ---------------------------------------------
    sink_probes: Annotated[tuple[SinkProbe, ...], BeforeValidator(_sink_probes)] = Field(
        default=(),
        description="External log sinks to probe: comma list of name=host:port, "
        "name=https://url or name=dns:host.",
    )
    probe_interval_s: Duration = Field(default=10.0, description="Sink probe period.")
    probe_timeout_s: Duration = Field(default=5.0, description="Timeout of one probe attempt.")
    probe_failures_before_down: Annotated[int, BeforeValidator(_integer(minimum=1))] = Field(
        default=2,
        description="Consecutive failed probes that mark a sink down (opens a sink_outage).",
    )
    probe_successes_before_up: Annotated[int, BeforeValidator(_integer(minimum=1))] = Field(
        default=1, description="Consecutive successful probes that mark a down sink up again."
    )
    gap_retention_days: Annotated[int, BeforeValidator(_integer(minimum=1))] = Field(
        default=90, description="Closed gaps older than this are dropped from the ledger."
    )

    # -- api and logging -------------------------------------------------------------------
    listen: Annotated[str, BeforeValidator(_listen)] = Field(
        default="0.0.0.0:9095", description="HTTP address host:port for /gaps, /metrics, /archive."
    )
    archive_token_file: Annotated[Path | None, BeforeValidator(_optional(_abs_path))] = Field(
        default=None,
        description="File holding the bearer token for POST /archive; unset disables the "
        "archive endpoint (403).",
    )
    # v2: the API never endangers capture (CONTRACT.md section 6).
    http_max_connections: Annotated[int, BeforeValidator(_integer(minimum=4, maximum=4096))] = (
        Field(
            default=64,
            description="Concurrent HTTP connections; beyond it the longest-idle connection is "
            "closed, or the new one when all are busy. The API holds at most twice this many "
            "descriptors.",
        )
    )
    http_idle_timeout_s: Duration = Field(
        default=5.0,
        description="An HTTP connection without a request in progress (before its first "
        "request, or keep-alive between requests) is closed after this long.",
    )
    http_header_timeout_s: Duration = Field(
        default=5.0,
        description="A request's headers (and an archive request's body) must arrive within "
        "this long of its first byte (slowloris).",
    )
    log_level: Annotated[
        Literal["debug", "info", "warning", "error"],
        BeforeValidator(_choice(("debug", "info", "warning", "error"), {"warn": "warning"})),
    ] = Field(default="info", description="Lowest level of the agent's own JSON log lines.")

    # -- replay (issue 15) -------------------------------------------------------------------
    replay_targets: Annotated[tuple[ReplayTarget, ...], BeforeValidator(_replay_targets)] = Field(
        default=(),
        description="Sinks `replay` and the backfill write to: name -> {kind: datadog|loki|otlp,"
        " url, credentials_file, site, archive_url, tenant, tags, max_age}.",
    )
    replay_on_recovery: Annotated[tuple[str, ...], BeforeValidator(_replay_on_recovery)] = Field(
        default=(),
        description="Replay targets backfilled automatically when a sink_outage of the sink"
        " probe of the same name closes (opt-in).",
    )

    @model_validator(mode="before")
    @classmethod
    def _derive_defaults(cls, data: Any) -> Any:
        # store_url defaults to a directory inside the spool, so derive it from spool_dir.
        if isinstance(data, Mapping) and _blank(data.get("store_url")):
            spool = data.get("spool_dir", "/var/lib/evidence-keeper")
            try:
                data = {**data, "store_url": f"file://{_abs_path(spool)}/store"}
            except PydanticCustomError:
                pass  # spool_dir itself is invalid and will be reported under its own key
        return data

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        top = 19 if self.compression == "zstd" else 9
        if not 1 <= self.compression_level <= top:
            raise _invalid(
                self.compression_level,
                f"is out of range for {self.compression} (1..{top})",
                key="compression_level",
            )
        if self.sse_kms_key_id is not None and self.sse != "aws:kms":
            raise _invalid(self.sse_kms_key_id, "requires sse: aws:kms", key="sse_kms_key_id")
        known = {t.name for t in self.replay_targets}
        for name in self.replay_on_recovery:
            if name not in known:
                raise _invalid(name, "is not a configured replay target (replay_targets)",
                               key="replay_on_recovery")
        if self.segment_max_bytes > self.spool_max_bytes:
            raise _invalid(
                self.segment_max_bytes,
                f"is larger than spool_max_bytes ({self.spool_max_bytes})",
                key="segment_max_bytes",
            )
        return self

    # -- derived views -----------------------------------------------------------------------
    def _parsed_store(self) -> _Store:
        return _parse_store(self.store_url)

    @property
    def store_scheme(self) -> Literal["s3", "file"]:
        return self._parsed_store().scheme

    @property
    def store_bucket(self) -> str | None:
        """The S3 bucket; ``None`` for a file store."""
        return self._parsed_store().bucket

    @property
    def store_prefix(self) -> str:
        """The S3 key prefix without surrounding slashes; ``""`` when none (always for file)."""
        return self._parsed_store().prefix

    @property
    def store_dir(self) -> Path | None:
        """The directory of a file store; ``None`` for S3."""
        return self._parsed_store().directory

    @property
    def listen_host(self) -> str:
        """Host part of ``listen`` (IPv6 without brackets)."""
        return _split_host_port(self.listen, allow_empty_host=True)[0]

    @property
    def listen_port(self) -> int:
        return _split_host_port(self.listen, allow_empty_host=True)[1]

    # -- groups (see GROUPS below) ---------------------------------------------------------
    @property
    def identity(self) -> IdentitySettings:
        return cast(IdentitySettings, group_of(self, "identity"))

    @property
    def watching(self) -> WatchingSettings:
        return cast(WatchingSettings, group_of(self, "watching"))

    @property
    def spooling(self) -> SpoolSettings:
        return cast(SpoolSettings, group_of(self, "spooling"))

    @property
    def shipping(self) -> ShippingSettings:
        return cast(ShippingSettings, group_of(self, "shipping"))

    @property
    def probing(self) -> ProbingSettings:
        return cast(ProbingSettings, group_of(self, "probing"))

    @property
    def serving(self) -> ServingSettings:
        return cast(ServingSettings, group_of(self, "serving"))

    @property
    def replaying(self) -> ReplaySettings:
        return cast(ReplaySettings, group_of(self, "replaying"))


SETTINGS_KEYS: Final = tuple(Settings.model_fields)


# --------------------------------------------------------------------------------------------
# Groups (kopf's ``settings.watching`` style): the same values, organised by the part of the
# agent that reads them. The flat keys stay the contract (YAML, ``EK_*``, one-line errors);
# each field is documented once, on :class:`Settings`. A component is handed its group, not
# the whole configuration. ``GROUPS`` names every key exactly once (a test checks it).


@dataclass(frozen=True, slots=True)
class IdentitySettings:
    """Who this agent is: the node it serves and the cluster (the first key component)."""

    node_name: str
    cluster: str


@dataclass(frozen=True, slots=True)
class WatchingSettings:
    """Input: the node's log tree, how changes are noticed, the Kubernetes watch."""

    log_root: Path
    log_symlink_roots: tuple[Path, ...]
    kubernetes: str
    watch_mode: str
    discover_interval_s: float
    tail_interval_s: float
    rescan_interval_s: float
    fd_reserve: int


@dataclass(frozen=True, slots=True)
class SpoolSettings:
    """Local durability: where the spool lives, its budget, how often it commits."""

    spool_dir: Path
    spool_max_bytes: int
    commit_interval_s: float


@dataclass(frozen=True, slots=True)
class ShippingSettings:
    """The store and the shipper: where segments go, how they are sealed and uploaded."""

    store_url: str
    s3_endpoint_url: str | None
    sse: str | None
    sse_kms_key_id: str | None
    object_lock_days: int
    compression: str
    compression_level: int
    flush_interval_s: float
    segment_max_bytes: int
    ship_concurrency: int
    backlog_threshold_s: float
    shutdown_timeout_s: float


@dataclass(frozen=True, slots=True)
class ProbingSettings:
    """Health: the sinks probed, the debounce, how long closed gaps are kept."""

    sink_probes: tuple[SinkProbe, ...]
    probe_interval_s: float
    probe_timeout_s: float
    probe_failures_before_down: int
    probe_successes_before_up: int
    gap_retention_days: int


@dataclass(frozen=True, slots=True)
class ServingSettings:
    """The HTTP API and the agent's own log."""

    listen: str
    archive_token_file: Path | None
    http_max_connections: int
    http_idle_timeout_s: float
    http_header_timeout_s: float
    log_level: str


@dataclass(frozen=True, slots=True)
class ReplaySettings:
    """Replay: the sinks evidence can be put back into, and which are backfilled."""

    replay_targets: tuple[ReplayTarget, ...]
    replay_on_recovery: tuple[str, ...]


GROUPS: Final[dict[str, type[Any]]] = {
    "identity": IdentitySettings, "watching": WatchingSettings, "spooling": SpoolSettings,
    "shipping": ShippingSettings, "probing": ProbingSettings, "serving": ServingSettings,
    "replaying": ReplaySettings,
}


def group_of(settings: Settings, name: str) -> Any:
    """One group of ``settings`` (``name`` a key of :data:`GROUPS`)."""
    cls = GROUPS[name]
    return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


def _suggestion(key: str) -> str:
    close = difflib.get_close_matches(key.lower().replace("-", "_"), SETTINGS_KEYS, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# --------------------------------------------------------------------------------------------
# Loading


def _read_yaml(path: Path) -> dict[str, object]:
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(where, "no such file") from None
    except IsADirectoryError:
        raise ConfigError(where, "is a directory, not a YAML file") from None
    except PermissionError:
        raise ConfigError(where, "permission denied") from None
    except UnicodeDecodeError:
        raise ConfigError(where, "is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(where, exc.strerror or str(exc)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(where, f"invalid YAML{at}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(where, f"invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(where, f"expected a mapping of settings, got a {type(data).__name__}")
    values: dict[str, object] = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in SETTINGS_KEYS:
            raise ConfigError(str(key), f"unknown key in {where}{_suggestion(str(key))}")
        if value is not None:  # YAML null: keep the default
            values[key] = value
    return values


def load_settings(
    config_path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Defaults < YAML file (``config_path``, else ``$EK_CONFIG``) < ``EK_<KEY>`` < overrides.

    ``environ`` defaults to ``os.environ`` and is also where ``NODE_NAME`` and ``EK_CONFIG``
    are read. Raises :class:`ConfigError` (one line) for anything invalid.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    if config_path is None or not str(config_path).strip():
        config_path = env.get(CONFIG_ENV, "").strip() or None
    values: dict[str, object] = {}
    if config_path is not None:
        values.update(_read_yaml(Path(config_path)))
    for key in SETTINGS_KEYS:
        raw = env.get(ENV_PREFIX + key.upper())
        if raw is not None and raw.strip():
            values[key] = raw
    for key, value in (overrides or {}).items():
        if key not in SETTINGS_KEYS:
            raise ConfigError(key, f"unknown key{_suggestion(key)}")
        if value is not None:
            values[key] = value
    if "node_name" not in values:
        values["node_name"] = env.get("NODE_NAME", "").strip() or socket.gethostname()
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError.from_validation_error(exc) from None
