"""Model-based test of tail + spool (Vector's file_watcher model tests, with hypothesis).

A ``RuleBasedStateMachine`` drives the kubelet simulator through random writes, partial lines,
rotations (with lines split across the rename), gzip, restarts, pod deletions, copy-free
rotation storms and agent crashes at arbitrary points of a read pass. The model is the
simulator's byte-exact record of every stream. The agent's pipeline runs synchronously here
(scan → sync → pump → commit, no event loop), and a crash drops every in-memory object
without a commit, then recovers a new spool and tailer from disk, exactly as after kill -9.

Kubelet deletes files as it rotates, so the machine lets the agent catch up before each
operation that can delete (as a running agent does, since it polls far faster than kubelet
rotates); crashes may still come between any two rules. At the end every stream's spool
segments, in order, must equal its record: nothing lost, nothing duplicated.

Two loss records are legitimate, both ``bytes`` null, only for such streams:

* a crash after kubelet deleted a stream's files but before the agent committed that it had
  read them to the end: on restart the agent cannot know whether bytes were written after its
  last observation, so it must say so;
* a crash after a rotation of a live file whose head was shorter than a fingerprint
  (``FP_MIN``) and which grew meanwhile: a reused inode number could start with the same
  bytes, so the agent continues the file but says that files between may be unknown.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from evidence_keeper.discover.logtree import LogTree
from evidence_keeper.health.ledger import Ledger
from evidence_keeper.metrics import Metrics
from evidence_keeper.model import Loss
from evidence_keeper.sim import KubeletSim
from evidence_keeper.spool.spool import Spool
from evidence_keeper.tail.identity import FP_MIN
from evidence_keeper.tail.tailer import Tailer

PODS = ("api-0", "api-1", "db-0")
messages = st.one_of(
    st.binary(min_size=1, max_size=300).map(lambda b: b.replace(b"\n", b" ")),
    st.text(max_size=80).map(lambda s: s.replace("\n", " ") or "x"),
    st.sampled_from([b"\x00\x00nul", b"\xff\xfe invalid utf-8", "PAYMENT_FAILED order 42"]),
)


class TailMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="ek-model-"))
        self.sim = KubeletSim(self.dir / "pods", max_files=3, cri_max_line=512)
        self.live: list[str] = []
        self.losses: list[Loss] = []
        self.crashes = 0
        self.deleted_uncommitted: set[str] = set()  # pods deleted since the last commit
        self.short_rotated: set[str] = set()  # short live files rotated since the last commit
        self.may_be_unknown: set[str] = set()  # pods whose deletion a crash cut short
        self._boot()

    # -- the agent, synchronously ---------------------------------------------------------
    def _boot(self) -> None:
        self.ledger = Ledger(self.dir / "spool" / "ledger.sqlite")
        self.spool = Spool(self.dir / "spool", segment_max_bytes=700, flush_interval_s=5,
                           max_bytes=1 << 30, record_loss=self.losses.append, metrics=Metrics())
        self.spool.recover()
        self.tree = LogTree(str(self.dir / "pods"))
        self.tailer = Tailer(self.spool, metrics=Metrics(), retry_s=0)

    def _pass(self, *, commit: bool = True) -> None:
        self.tailer.sync(self.tree.scan())
        while self.tailer.pump():
            pass
        if commit:
            self.spool.commit()
            self.deleted_uncommitted.clear()
            self.short_rotated.clear()

    def _catch_up(self) -> None:
        # Two passes: the first may only learn that a file became final.
        self._pass()
        self._pass()

    # -- kubelet and containers -----------------------------------------------------------
    @rule(pod=st.sampled_from(PODS), fmt=st.sampled_from(["cri", "docker"]))
    def add_pod(self, pod: str, fmt: str) -> None:
        if pod in self.live:
            return
        self.sim.add_pod("shop", pod, containers=("app",), fmt=fmt)  # type: ignore[arg-type]
        self.live.append(pod)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), msg=messages, n=st.integers(1, 5))
    def write(self, data: st.DataObject, msg: bytes | str, n: int) -> None:
        pod = data.draw(st.sampled_from(self.live))
        for _ in range(n):
            self.sim.write("shop", pod, "app", msg)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), raw=st.binary(min_size=1, max_size=50))
    def write_partial_line(self, data: st.DataObject, raw: bytes) -> None:
        self.sim.write_raw("shop", data.draw(st.sampled_from(self.live)), "app", raw)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), split=st.booleans(), look=st.booleans())
    def rotate(self, data: st.DataObject, split: bool, look: bool) -> None:
        """``look``: the agent reads the tree between the rename and the runtime's reopen."""
        pod = data.draw(st.sampled_from(self.live))
        self._catch_up()
        if self.sim.path_of("shop", pod, "app").stat().st_size < FP_MIN:
            self.short_rotated.add(pod)
        peek = self._pass if look else None
        if split:
            rec = self.sim.render("shop", pod, "app", b"split across the rotation")
            cut = data.draw(st.integers(1, len(rec) - 1))
            self.sim.rotate("shop", pod, "app", late_write=rec[:cut], then_write=rec[cut:],
                            on_renamed=peek)
        else:
            self.sim.rotate("shop", pod, "app", on_renamed=peek)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        self._catch_up()
        pod = data.draw(st.sampled_from(self.live))
        self.sim.restart("shop", pod, "app")
        self.deleted_uncommitted.add(pod)  # kubelet removed instance N-1

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def delete_pod(self, data: st.DataObject) -> None:
        pod = data.draw(st.sampled_from(self.live))
        self._catch_up()
        self.sim.delete_pod("shop", pod)
        self.live.remove(pod)
        self.deleted_uncommitted.add(pod)

    # -- the agent ------------------------------------------------------------------------
    @rule()
    def agent_pass(self) -> None:
        self._pass()

    @rule(commit_first=st.booleans())
    def crash(self, commit_first: bool) -> None:
        """kill -9 in the middle of a pass: read state not committed is simply gone."""
        self._pass(commit=commit_first)
        self.may_be_unknown |= self.deleted_uncommitted | self.short_rotated
        self.tailer.close()
        self.spool.close()
        self.ledger.close()
        self.crashes += 1
        self._boot()

    @invariant()
    def checkpoint_never_ahead(self) -> None:
        for s in self.spool.streams.values():
            total = sum(seg.length for seg in s.sealed if not seg.shipped)
            total += s.open.size if s.open else 0
            start = s.sealed[0].start if s.sealed else (s.open.start if s.open else 0)
            assert start + total <= s.next_offset

    def teardown(self) -> None:
        try:
            self._catch_up()
            self.spool.seal_all()
            self.spool.commit()
            for loss in self.losses:
                assert loss.bytes is None and loss.stream.pod in self.may_be_unknown, loss
            for sid in self.sim.streams():
                s = self.spool.streams.get(sid)
                got = b""
                if s is not None:
                    for seg in s.sealed:
                        with open(seg.path, "rb") as f:
                            got += f.read()
                assert got == self.sim.record(sid), (sid, self.crashes)
        finally:
            self.tailer.close()
            self.spool.close()
            self.ledger.close()
            shutil.rmtree(self.dir, ignore_errors=True)


TailMachine.TestCase.settings = hsettings(
    max_examples=int(os.environ.get("EK_MODEL_EXAMPLES", "60")), stateful_step_count=40,
    deadline=None)
test_tail_model = TailMachine.TestCase
