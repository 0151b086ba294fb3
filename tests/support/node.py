"""The test node: the settings every test agent starts from, and stopping a child agent."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any


def node_settings(root: Path, **overrides: Any) -> dict[str, Any]:
    """Settings of an agent on the test node ``node-1`` whose log tree, spool and ``file://``
    store are under ``root`` (``pods``, ``spool``, ``store``): no Kubernetes, an API on a port
    from the OS, and intervals short enough for tests (``overrides`` win)."""
    base: dict[str, Any] = {
        "node_name": "node-1",
        "log_root": str(root / "pods"),
        "spool_dir": str(root / "spool"),
        "store_url": f"file://{root / 'store'}",
        "kubernetes": "off",
        "flush_interval_s": 1.0,
        "discover_interval_s": 0.2,
        "tail_interval_s": 0.05,
        "commit_interval_s": 0.1,
        "shutdown_timeout_s": 20,
        "log_level": "warning",
        "listen": "127.0.0.1:0",
    }
    base.update(overrides)
    return base


def terminate(proc: subprocess.Popen[Any], *, timeout: float = 60.0) -> int:
    """SIGTERM (the ordered shutdown), then SIGKILL if it has not exited within ``timeout``;
    the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return int(proc.returncode)
