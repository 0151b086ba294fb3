"""The alert rules' generator (``alerts/build.py``), loaded as a module for tests."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from tests.support.paths import REPO


def load_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("alerts_build", REPO / "alerts" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("alerts_build", module)
    spec.loader.exec_module(module)
    return module
