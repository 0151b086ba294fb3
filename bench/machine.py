"""What the numbers were measured on: CPU, cores, RAM, kernel, Python, file system, revision."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Machine:
    cpu_model: str
    cores: int
    usable_cores: int
    ram_gib: float
    kernel: str
    python: str
    filesystem: str  # type, device and mount point of the work directory
    revision: str
    date_utc: str


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return 0.0


def _filesystem(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True,
                             check=True, timeout=10).stdout.splitlines()
        fields = out[-1].split()
        # Filesystem Type 1K-blocks Used Available Use% Mounted-on
        return f"{fields[1]} ({fields[0]}, mounted on {fields[-1]})"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def _revision(repo: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                "--", "evidence_keeper"], capture_output=True, text=True,
                               check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head} (+ uncommitted changes in evidence_keeper/)" if dirty else head


def describe(workdir: Path, repo: Path) -> Machine:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    return Machine(
        cpu_model=_cpu_model(),
        cores=os.cpu_count() or 1,
        usable_cores=usable,
        ram_gib=_ram_gib(),
        kernel=platform.release(),
        python=f"{platform.python_implementation()} {sys.version.split()[0]}",
        filesystem=_filesystem(workdir),
        revision=_revision(repo),
        date_utc=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )


def loadavg() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages (other work on a shared machine skews the numbers)."""
    try:
        one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
        return float(one), float(five), float(fifteen)
    except (OSError, ValueError):
        return (0.0, 0.0, 0.0)
