"""The pure identity, finality and continuity rules (no file system)."""

from __future__ import annotations

from typing import Any

from evidence_keeper.tail.identity import (
    FP_MIN,
    consumed_matches,
    fingerprint,
    gz_candidate,
    head_identifies,
    head_is_whole_record,
    is_final,
    lost_sight,
    plain_candidate,
)

LONG = b"2025-11-10T12:27:00.123456789Z stdout F order 42 PAYMENT_FAILED " * 3
SHORT = b"2025-11-10T12:27:00Z stdout F x\n"


def test_a_long_head_identifies_a_file_by_its_prefix() -> None:
    fp_len = FP_MIN + 10
    assert head_identifies(LONG, fp_len=fp_len, fp=fingerprint(LONG[:fp_len]), size=999)
    other = LONG.replace(b"42", b"43")
    assert other[:fp_len] != LONG[:fp_len]
    assert not head_identifies(other, fp_len=fp_len, fp=fingerprint(LONG[:fp_len]), size=999)
    assert not head_identifies(LONG[:fp_len - 1], fp_len=fp_len,
                               fp=fingerprint(LONG[:fp_len]), size=999)


def test_a_short_head_identifies_only_the_whole_file() -> None:
    fp = fingerprint(SHORT)
    assert len(SHORT) < FP_MIN
    assert head_identifies(SHORT, fp_len=len(SHORT), fp=fp, size=len(SHORT))
    # The same first bytes followed by more: another file whose head looks alike.
    assert not head_identifies(SHORT + b"more", fp_len=len(SHORT), fp=fp, size=len(SHORT))
    assert not head_identifies(SHORT, fp_len=len(SHORT), fp=fp, size=len(SHORT) + 1)
    assert not head_identifies(b"", fp_len=0, fp=fingerprint(b""), size=0)


def test_consumed_files_match_by_exact_length_or_long_head() -> None:
    assert consumed_matches(recorded_len=100, fp_len=60, size=100)
    assert not consumed_matches(recorded_len=100, fp_len=60, size=101)
    assert consumed_matches(recorded_len=-1, fp_len=FP_MIN, size=500)
    assert not consumed_matches(recorded_len=-1, fp_len=FP_MIN - 1, size=500)


def test_finality() -> None:
    live = (1, 10)
    assert is_final(gz=True, file_id=live, live_id=live, superseded=False, ended=False)
    assert not is_final(gz=False, file_id=live, live_id=live, superseded=False, ended=False)
    assert is_final(gz=False, file_id=(1, 9), live_id=live, superseded=False, ended=False)
    assert is_final(gz=False, file_id=live, live_id=live, superseded=True, ended=False)
    assert is_final(gz=False, file_id=live, live_id=live, superseded=False, ended=True)
    # No live file right now (between kubelet's rename and the runtime's reopen): not final.
    assert not is_final(gz=False, file_id=live, live_id=None, superseded=False, ended=False)


def test_lost_sight_needs_a_file_neither_live_nor_listed() -> None:
    x = (1, 10)
    args = {"named": False, "has_gz_twin": False}
    assert not lost_sight(file_id=x, live_id=x, listed_ids=[], **args)  # still live
    assert not lost_sight(file_id=x, live_id=(1, 11), listed_ids=[x], **args)  # renamed
    assert lost_sight(file_id=x, live_id=(1, 11), listed_ids=[(1, 12)], **args)
    assert lost_sight(file_id=x, live_id=None, listed_ids=[], **args)
    assert not lost_sight(file_id=x, live_id=(1, 11), listed_ids=[], named=True,
                          has_gz_twin=False)
    assert not lost_sight(file_id=x, live_id=(1, 11), listed_ids=[], named=False,
                          has_gz_twin=True)


def test_a_short_live_head_is_not_taken_from_a_reused_inode_when_files_were_rotated() -> None:
    # The checkpointed live file had only an 18-byte head (a timestamp prefix every line
    # shares). After rotations while the agent was down, the new live file got its inode
    # number back: without proof of which rotation renamed it, it is not the same file.
    same = (1, 10)
    common: dict[str, Any] = {"file_id": same, "ts": None, "fp_len": 18, "cand_id": same}
    assert not plain_candidate(cand_ts=None, newer_exists=True, short_candidate=None,
                               **common)  # main accepted this (None == None): flaky loss
    assert plain_candidate(cand_ts=None, newer_exists=False, short_candidate=None, **common)
    assert plain_candidate(cand_ts="20251110-122701", newer_exists=True,
                           short_candidate="20251110-122701", **common)
    assert not plain_candidate(cand_ts="20251110-122702", newer_exists=True,
                               short_candidate="20251110-122701", **common)
    assert not plain_candidate(cand_ts=None, newer_exists=False, short_candidate=None,
                               **{**common, "cand_id": (1, 11)})
    # Unchanged since the checkpoint (same size and modification time): the same file,
    # whichever rotation renamed it; a changed one still needs the proof above.
    assert plain_candidate(cand_ts="20251110-122702", newer_exists=True, short_candidate=None,
                           unchanged=True, **common)
    assert not plain_candidate(cand_ts="20251110-122702", newer_exists=True,
                               short_candidate=None, unchanged=False, **common)


def test_gz_candidates() -> None:
    assert gz_candidate(ts="a", fp_len=0, cand_ts="a", consumed_ts="", short_candidate=None)
    assert not gz_candidate(ts="a", fp_len=99, cand_ts="b", consumed_ts="",
                            short_candidate=None)
    assert gz_candidate(ts=None, fp_len=FP_MIN, cand_ts="b", consumed_ts="a",
                        short_candidate=None)
    assert not gz_candidate(ts=None, fp_len=FP_MIN, cand_ts="a", consumed_ts="a",
                            short_candidate=None)
    assert not gz_candidate(ts=None, fp_len=0, cand_ts="b", consumed_ts="",
                            short_candidate="b")
    assert gz_candidate(ts=None, fp_len=10, cand_ts="b", consumed_ts="", short_candidate="b")
    assert not gz_candidate(ts=None, fp_len=10, cand_ts="c", consumed_ts="",
                            short_candidate="b")


def test_a_short_head_names_its_file_only_as_whole_cri_records() -> None:
    assert head_is_whole_record(b"2025-11-10T12:27:00.123456789Z stdout F ok\n")
    assert head_is_whole_record(b"2025-11-10T12:27:00.5+01:00 stderr P x\n")
    assert not head_is_whole_record(b"2025-11-10T12:27:00Z stdout F ok\n")  # a second only
    assert not head_is_whole_record(b"2025-11-10T12:27:00.123456789Z stdout F o")  # cut
    assert not head_is_whole_record(b"\x00")
    assert not head_is_whole_record(b'{"log":"ok\\n","stream":"stdout"}\n')
