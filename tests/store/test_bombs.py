"""Hostile objects in the store (CONTRACT.md section 4; issue 12 item 7).

A 64 KiB zstd frame that expands to 2 GiB, a gzip bomb of concatenated members, a key whose
range claims 8 GiB: ``export``, ``search``, ``verify`` and ``export --archive`` each fail
cleanly (one line naming the object, or a verify failure) with their peak RSS, measured per
child process with ``os.wait4``, under 600 MB. The children also run under a 4 GiB address
space limit, so a regression fails the test instead of swapping the machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from evidence_keeper.store.codec import compress, decompress
from tests.support.bombs import ARCHIVE, BOMBS, GIB, NS, RSS_LIMIT_MB, SID, line, plant, run_cli


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_a_bomb_in_the_store_fails_cleanly_in_bounded_memory(tmp_path: Path, name: str) -> None:
    ext, make, claimed = BOMBS[name]
    planted = plant(tmp_path, ext=ext, body=make(), claimed=claimed)
    cfg = ("--config", str(planted.config))
    bomb = planted.bomb_key

    export = run_cli(tmp_path, "export", *cfg, "--namespace", NS, "--pod", SID.pod,
                     "--container", SID.container, "-o", str(tmp_path / "stream.log"))
    search = run_cli(tmp_path, "search", *cfg, "PAYMENT_FAILED", "--namespace", NS)
    verify = run_cli(tmp_path, "verify", *cfg, ARCHIVE)
    bundle = run_cli(tmp_path, "export", *cfg, "--archive", ARCHIVE, "-o",
                     str(tmp_path / "archive.tar"))
    for what, r in (("export", export), ("search", search), ("verify", verify),
                    ("export --archive", bundle)):
        assert r.rss_mb < RSS_LIMIT_MB, f"{what}: peak RSS {r.rss_mb:.0f} MB"
        assert "Traceback" not in r.err, f"{what}: {r.err[-2000:]}"
    reason = "more than the 8589934592 bytes a segment can hold" if claimed > GIB else (
        f"decompresses to more than the {claimed} bytes it claims")
    # export and the archive tar: exit 2, one line naming the object and why.
    for r in (export, bundle):
        assert r.rc == 2, r
        (line,) = [ln for ln in r.err.splitlines() if ln.startswith("evidence-keeper:")]
        assert bomb in line and (reason in line or "more than" in line), line
    assert not (tmp_path / "archive.tar").exists()
    # search: the error names the object, the good segments are still searched, exit 2.
    assert search.rc == 2, search
    errors = [ln for ln in search.err.splitlines() if ln.startswith("evidence-keeper:")]
    assert len(errors) == 1 and bomb in errors[0], search.err
    assert search.out.count("PAYMENT_FAILED") == 80
    # verify: a failure naming the object; the others verify.
    assert verify.rc == 1, verify
    fails = [ln for ln in verify.out.splitlines() if "FAIL" in ln and bomb in ln]
    assert fails and any("more than" in ln for ln in fails), verify.out
    assert "VERIFICATION FAILED" in verify.out


def test_bounded_decompression_refuses_lies_both_ways() -> None:
    data = b"".join(line(i) for i in range(100))
    for compression, ext in (("zstd", "zst"), ("gzip", "gz")):
        body = compress(data, compression, 3)
        assert decompress(body, ext, expected=len(data)) == data
        for wrong in (len(data) - 1, len(data) + 1):
            with pytest.raises(ValueError, match="decompresses to"):
                decompress(body, ext, expected=wrong)
        with pytest.raises(ValueError, match=r"corrupt|decompresses to"):
            decompress(body[: len(body) // 2], ext, expected=len(data))
        # Data after the body (a second frame or member, or junk) is never ignored.
        with pytest.raises(ValueError):
            decompress(body + body, ext, expected=len(data))
