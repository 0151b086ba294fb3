"""What build this is: the version and the source revision, for ``--version`` and
``evidence_keeper_build_info``.

The version is the installed distribution's (``pyproject.toml``). The revision is, in order:

1. the file ``evidence_keeper/REVISION``, written by the build that makes a wheel or an image
   from a git checkout (``make revision``): an installed image has no ``.git``;
2. ``git rev-parse`` when the package runs from a git work tree (an editable install);
3. ``unknown``.

Read once per process (cached); never on a hot path.
"""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Final

DISTRIBUTION: Final = "evidence-keeper"
PACKAGE_DIR: Final = Path(__file__).resolve().parent
REVISION_FILE: Final = PACKAGE_DIR / "REVISION"
UNKNOWN: Final = "unknown"


@dataclass(frozen=True, slots=True)
class BuildInfo:
    version: str
    revision: str

    def line(self, prog: str = "evidence-keeper") -> str:
        return f"{prog} {self.version} (revision {self.revision})"


def package_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def _git_revision(where: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip()
    if out.returncode != 0 or not rev:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, timeout=5, check=False)
    return rev + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def source_revision(*, revision_file: Path = REVISION_FILE,
                    checkout: Path = PACKAGE_DIR) -> str:
    try:
        text = revision_file.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    if text:
        return text.splitlines()[0][:64]
    if (checkout.parent / ".git").exists():
        return _git_revision(checkout) or UNKNOWN
    return UNKNOWN


@functools.cache  # an immutable fact of the process: the git calls run once
def build_info() -> BuildInfo:
    return BuildInfo(version=package_version(), revision=source_revision())
