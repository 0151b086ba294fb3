"""Where the repository is, for tests that read its files (charts, rules, the package)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "evidence_keeper"
