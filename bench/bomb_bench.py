"""Peak memory of reading a hostile store: decompression bombs against the read commands.

Usage: ``python -m bench.bomb_bench``. Results on stdout (the lead copies them into
``docs/benchmarks.md``).

Plants, in a fresh ``file://`` store, the hostile objects of ``tests/support/bombs.py`` (a 64 KiB
zstd frame of 2 GiB of zeros, 32 gzip members of 64 MiB of zeros, a key claiming 8 GiB) as the
middle segment of a stream and of an archive, then runs ``export``, ``search``, ``verify`` and
``export --archive`` as child processes and reports each one's exit code, wall time and peak
RSS (``ru_maxrss`` of that child, from ``os.wait4``).
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.support.bombs import ARCHIVE, BOMBS, NS, SID, plant, run_cli


def main() -> int:
    print(f"# bomb_bench {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()}"
          f" ({platform.processor() or platform.machine()}), Python {platform.python_version()}")
    print("| hostile object | command | exit | seconds | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for name, (ext, make, claimed) in sorted(BOMBS.items()):
        with tempfile.TemporaryDirectory(prefix="ek-bomb-") as workdir:
            tmp = Path(workdir)
            planted = plant(tmp, ext=ext, body=make(), claimed=claimed)
            cfg = ("--config", str(planted.config))
            for what, args in (
                    ("export", ("export", *cfg, "--namespace", NS, "--pod", SID.pod,
                                "--container", SID.container, "-o", str(tmp / "stream.log"))),
                    ("search", ("search", *cfg, "PAYMENT_FAILED", "--namespace", NS)),
                    ("verify", ("verify", *cfg, ARCHIVE)),
                    ("export --archive", ("export", *cfg, "--archive", ARCHIVE, "-o",
                                          str(tmp / "archive.tar")))):
                started = time.monotonic()
                r = run_cli(tmp, *args)
                print(f"| {name} | {what} | {r.rc} | {time.monotonic() - started:.2f} |"
                      f" {r.rss_mb:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
