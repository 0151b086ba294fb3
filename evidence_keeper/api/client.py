"""A small blocking client of the agent's HTTP API, for the command line.

The CLI talks to the running agent (``--url``, default: the configured ``listen`` address,
with ``0.0.0.0`` read as ``127.0.0.1``) with the standard library only, so ``gaps`` and
``preflight`` work in a minimal image and fail with one clear line when the agent is down.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class ApiError(Exception):
    pass


def default_url(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "", "[::]", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{port}"


def call(url: str, path: str, *, params: dict[str, str] | None = None, method: str = "GET",
         body: dict[str, Any] | None = None, token: str | None = None,
         timeout: float = 10.0, accept_status: tuple[int, ...] = ()) -> tuple[int, Any]:
    full = url.rstrip("/") + path
    if params:
        full += "?" + urllib.parse.urlencode(params)
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(full, data=data, method=method)
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        try:
            doc = json.loads(payload)
        except ValueError:
            doc = {"error": payload.decode("utf-8", "replace")[:200]}
        if exc.code in accept_status:
            return exc.code, doc
        message = doc.get("error") if isinstance(doc, dict) else None
        raise ApiError(f"{full}: HTTP {exc.code}: {message or exc.reason}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ApiError(f"cannot reach the agent at {url}: {reason}") from None
