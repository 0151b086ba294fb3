"""Check that the hash-locked requirement files still cover ``pyproject.toml``.

``make venv`` and ``make image`` install exactly what ``requirements.lock`` and
``requirements-dev.lock`` pin (``pip install --require-hashes``) and then the project itself
with ``--no-deps``. A dependency added to ``pyproject.toml`` without re-running ``make lock``
would therefore be missing from the environment and fail far away, at import time. This check
fails first, with one line per problem and the fix (``make lock``).

It reads the files only (no network, no resolver): each dependency of the project (and of the
``dev`` extra for the dev lock) must be pinned in the lock with a version its specifier
admits, and every pin must carry at least one ``--hash``.

Usage: ``python tools/lockcheck.py`` (exit 1 and one line per problem when stale).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from typing import Final

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT: Final = Path(__file__).resolve().parent.parent
PYPROJECT: Final = ROOT / "pyproject.toml"
RUNTIME_LOCK: Final = ROOT / "requirements.lock"
DEV_LOCK: Final = ROOT / "requirements-dev.lock"

# `name==version [; marker] \` followed by `--hash=...` continuation lines.
_PIN: Final = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")


def read_lock(text: str) -> dict[str, tuple[Version, int]]:
    """Each pinned package of a lock file: its version and how many hashes it carries."""
    pins: dict[str, tuple[Version, int]] = {}
    current: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        match = _PIN.match(line)
        if match:
            current = canonicalize_name(match[1])
            pins[current] = (Version(match[2]), 0)
            continue
        if current and line.startswith("--hash="):
            version, hashes = pins[current]
            pins[current] = (version, hashes + 1)
        elif line and not line.startswith("#"):
            current = None
    return pins


def project_requirements(pyproject_text: str, *, extras: tuple[str, ...] = ()) -> list[str]:
    """The project's dependencies, plus those of the given extras, as PEP 508 strings."""
    project = tomllib.loads(pyproject_text)["project"]
    found: list[str] = list(project.get("dependencies", []))
    for extra in extras:
        found += project.get("optional-dependencies", {}).get(extra, [])
    return found


def problems(lock_name: str, lock_text: str, requirements: list[str]) -> list[str]:
    """Why the lock does not cover the requirements (empty when it does)."""
    pins = read_lock(lock_text)
    environment = default_environment()
    out: list[str] = []
    for spec in requirements:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate(dict(environment)):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            out.append(f"{lock_name}: {req.name} is not pinned (pyproject.toml asks {spec!r})")
            continue
        version, _ = pins[name]
        if not req.specifier.contains(version, prereleases=True):
            out.append(f"{lock_name}: {req.name}=={version} does not satisfy {spec!r}")
    out += [
        f"{lock_name}: {name}=={version} has no --hash"
        for name, (version, hashes) in sorted(pins.items())
        if hashes == 0
    ]
    return out


def _pins(path: Path) -> dict[str, tuple[Version, int]]:
    return read_lock(path.read_text(encoding="utf-8")) if path.is_file() else {}


def check(root: Path = ROOT) -> list[str]:
    """Every problem of both locks against ``pyproject.toml``."""
    pyproject = (root / PYPROJECT.name).read_text(encoding="utf-8")
    found: list[str] = []
    for lock, extras in ((RUNTIME_LOCK.name, ()), (DEV_LOCK.name, ("dev",))):
        path = root / lock
        if not path.is_file():
            found.append(f"{lock}: missing")
            continue
        found += problems(
            lock, path.read_text(encoding="utf-8"),
            project_requirements(pyproject, extras=extras),
        )
    runtime = _pins(root / RUNTIME_LOCK.name)
    dev = _pins(root / DEV_LOCK.name)
    # The dev lock is compiled with the runtime lock as constraints: tests run the versions the
    # image ships.
    found += [
        f"{DEV_LOCK.name}: {name}=={dev[name][0]} differs from {RUNTIME_LOCK.name} ({pin[0]})"
        for name, pin in sorted(runtime.items())
        if name in dev and dev[name][0] != pin[0]
    ]
    return found


def main() -> int:
    found = check()
    for line in found:
        print(f"{line} -- run `make lock`", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
