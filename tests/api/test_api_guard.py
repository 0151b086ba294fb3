"""The HTTP API never endangers capture (CONTRACT.md section 6, v2; issue 12 item 6).

A connection flood under the descriptor limit real nodes have (1024), slowloris and idle
clients, deeply nested JSON, the token on ``GET /archives/<id>``, archive job pruning, and the
guard's eviction rule. The flood runs the real ``evidence-keeper run`` in a child process with
``RLIMIT_NOFILE`` set by ``preexec_fn``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.client
import json
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from evidence_keeper.api.archiving import ArchiveJob
from evidence_keeper.api.contract import json_depth
from evidence_keeper.api.guarding import ConnectionGuard
from evidence_keeper.metrics import Metrics
from evidence_keeper.settings import Settings
from evidence_keeper.sim import KubeletSim
from evidence_keeper.store import FileStore
from tests.conftest import AgentThread, export_bytes, poll_until
from tests.support.archive import NS, TOKEN, archive_settings, raw_http
from tests.support.node import terminate

FLOOD = 1000


def _get(url: str, path: str, *, timeout: float = 3.0) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _answers(url: str, path: str, *, within: float) -> bytes:
    """The body of ``GET path`` once it answers 200 (each try bounded; retried until within)."""
    deadline = time.monotonic() + within
    last: object = None
    while time.monotonic() < deadline:
        try:
            status, body = _get(url, path)
            if status == 200:
                return body
            last = status
        except (OSError, http.client.HTTPException) as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"{path} did not answer within {within}s (last: {last!r})")


def _metric(text: bytes, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels`` (0 when absent)."""
    total = 0.0
    for line in text.decode().splitlines():
        if not line.startswith(name):
            continue
        m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if m is None:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


class ChildAgent:
    """``evidence-keeper run`` in a child process under ``ulimit -n <nofile>``."""

    def __init__(self, config: Path, *, nofile: int) -> None:
        self.config = config
        self.nofile = nofile
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()

    def _limit(self) -> None:  # runs in the child, before exec
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def __enter__(self) -> ChildAgent:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "evidence_keeper.cli", "run", "--config", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            preexec_fn=self._limit,  # noqa: PLW1509 - an rlimit must be set before exec
            env={**os.environ, "NODE_NAME": "node-1"})
        self._reader = threading.Thread(target=self._read, daemon=True, name="child-log")
        self._reader.start()
        if not self._ready.wait(30):
            self.__exit__()
            raise AssertionError("the agent did not start:\n" + "\n".join(self.lines[-20:]))
        return self

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if '"http api listening"' in line:
                self.url = "http://" + json.loads(line)["address"]
                self._ready.set()

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def __exit__(self, *exc: object) -> None:
        terminate(self.proc)
        self._reader.join(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@contextlib.contextmanager
def idle_connections(host: str, port: int, n: int) -> Iterator[list[socket.socket]]:
    """``n`` TCP connections that never send a byte (connects run in the background)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 512:
        if hard != resource.RLIM_INFINITY and hard < n + 512:
            pytest.skip(f"the test process may open only {hard} descriptors")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n + 512, hard))
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex((host, port))
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_flood_of_idle_connections_under_ulimit_1024_leaves_capture_and_health(
        tmp_path: Path) -> None:
    """1000 idle connections to the agent's port, 1024 descriptors: capture goes on (an old
    pod and a new one), /healthz and /metrics answer, descriptors stay bounded, the log quiet."""
    store_dir, log_root = tmp_path / "store", tmp_path / "pods"
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"log_root: {log_root}\nspool_dir: {tmp_path / 'spool'}\nstore_url: file://{store_dir}\n"
        "kubernetes: off\nflush_interval_s: 1\nlisten: 127.0.0.1:0\nlog_level: info\n")
    sim = KubeletSim(log_root, clock=lambda: datetime.now(UTC))
    sim.add_pod(NS, "orders-1", containers=("orders",))
    sim.write(NS, "orders-1", "orders", "before the flood")
    with ChildAgent(config, nofile=1024) as agent:
        assert agent.url is not None
        _answers(agent.url, "/readyz", within=20)
        host, port = agent.url.removeprefix("http://").rsplit(":", 1)
        with idle_connections(host, int(port), FLOOD):
            # Under the flood: a quarter of it already taken in and closed (the rest is still
            # arriving, SYN retries past the listen backlog).
            url = agent.url

            def flooded() -> bool:
                metrics = _answers(url, "/metrics", within=10)
                return _metric(metrics, "evidence_keeper_http_connections_closed_total") + _metric(
                    metrics, "evidence_keeper_http_connections_rejected_total") >= FLOOD // 4

            poll_until(flooded, within=30, what="the flood to arrive", interval=0.2)
            _answers(agent.url, "/healthz", within=10)
            sim.write(NS, "orders-1", "orders", "during the flood")
            sim.add_pod(NS, "payment-1", containers=("payment",))  # a new pod is picked up
            sim.write(NS, "payment-1", "payment", "new pod during the flood")
            store = FileStore(store_dir)
            deadline = time.monotonic() + 30
            for sid in sim.streams():
                while export_bytes(store, sid)[0] != sim.record(sid):
                    assert time.monotonic() < deadline, f"{sid.key} not captured and shipped"
                    time.sleep(0.2)
            assert agent.open_fds() < 300, agent.open_fds()
            metrics = _answers(agent.url, "/metrics", within=10)
            assert _metric(metrics, "evidence_keeper_http_connections") <= 64
            # Connections beyond the listen backlog are still in SYN retries; the rest were
            # taken in and closed (evicted by newer ones or after the idle timeout).
            assert _metric(metrics, "evidence_keeper_http_connections_closed_total") + _metric(
                metrics, "evidence_keeper_http_connections_rejected_total") >= FLOOD // 4
            _answers(agent.url, "/healthz", within=10)
    # Rate-limited: a handful of summary lines, not one per connection.
    closed = [ln for ln in agent.lines if "http connections closed" in ln]
    assert 1 <= len(closed) <= 10, closed


def _closed_within(sock: socket.socket, seconds: float, *,
                   trickle: Callable[[], bytes] | None = None) -> float:
    """Seconds until the server closes ``sock`` (sending ``trickle()`` every 0.5 s meanwhile)."""
    start = time.monotonic()
    sock.settimeout(0.5)
    while time.monotonic() - start < seconds:
        try:
            if trickle is not None:
                sock.sendall(trickle())
            if sock.recv(4096) == b"":
                return time.monotonic() - start
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
    raise AssertionError(f"the connection was still open after {seconds}s")


def test_slowloris_and_idle_clients_are_closed_within_seconds(
        make_settings: Callable[..., Settings]) -> None:
    """Header and idle timeouts (2 s here, 5 s by default): a client trickling headers, one
    that says nothing, and an idle keep-alive are closed within seconds; a prompt client
    meanwhile is served."""
    defaults = make_settings()
    assert (defaults.http_header_timeout_s, defaults.http_idle_timeout_s) == (5.0, 5.0)
    timeout = 2.0
    with AgentThread(make_settings(http_header_timeout_s=timeout,
                                   http_idle_timeout_s=timeout)) as t:
        assert t.agent.api_address is not None
        addr = t.agent.api_address
        slow, silent, keepalive = (socket.create_connection(addr) for _ in range(3))
        with slow, silent, keepalive:
            slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: agent\r\n")
            keepalive.sendall(b"GET /healthz HTTP/1.1\r\nHost: agent\r\n\r\n")
            assert b"200 OK" in keepalive.recv(4096)
            n = iter(range(1000))

            def header() -> bytes:
                return f"X-{next(n)}: y\r\n".encode()

            took = _closed_within(slow, 15, trickle=header)
            assert took <= timeout + 2.5, took
            assert _closed_within(silent, 5) <= 2.5  # already as old as the timeout
            assert _closed_within(keepalive, 5) <= 2.5
            assert _get(t.url, "/healthz")[0] == 200
        reg = t.agent.metrics.registry
        for reason in ("header_timeout", "idle_timeout"):
            assert (reg.get_sample_value("evidence_keeper_http_connections_closed_total",
                                         {"reason": reason}) or 0) >= 1, reason


def test_deep_json_is_a_400_and_get_archive_needs_the_token(
        make_settings: Callable[..., Settings], token_file: Path) -> None:
    settings = archive_settings(make_settings, token_file)
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    with AgentThread(settings) as t:
        for body in (b"[" * 30_000 + b"]" * 30_000,
                     b'{"namespace": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}",
                     b'{"namespace": "a", "reason": ' + b"[" * 17 + b"]" * 17 + b"}"):
            status, doc = raw_http(t.url, "POST", "/archive", body=body, headers=auth)
            assert status == 400 and "nested deeper than 16" in doc["error"], (status, doc)
        # Brackets inside strings are text, not nesting.
        status, doc = raw_http(t.url, "POST", "/archive", headers=auth, body=json.dumps(
            {"namespace": NS, "reason": "[" * 100, "label": "brackets"}).encode())
        assert status == 202, doc
        job = doc["id"]
        # v2: the job's state needs the token too (an id follows from a guessable label).
        status, doc = raw_http(t.url, "GET", f"/archives/{job}")
        assert status == 401 and set(doc) == {"error"}
        status, doc = raw_http(t.url, "GET", f"/archives/{job}",
                               headers={"Authorization": "Bearer wrong"})
        assert status == 401
        status, doc = raw_http(t.url, "GET", f"/archives/{job}",
                               headers={"X-Evidence-Keeper-Token": TOKEN})
        assert status == 200 and doc["id"] == job


def test_json_depth_skips_strings() -> None:
    assert json_depth(b'{"a": [1, {"b": "[[[{{{"}]}') == 3
    assert json_depth(b'"\\"[["') == 0
    assert json_depth(b"[[[]]]") == 3


def _job(job_id: str, status: str, at: datetime) -> ArchiveJob:
    ts = at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return ArchiveJob(id=job_id, request={"namespace": NS, "reason": "old"}, since=None,
                      until=ts, requester={"name": None}, accepted_at=ts, status=status,
                      stage="done", updated_at=ts)


def test_archive_jobs_are_pruned_by_age_and_count(
        make_settings: Callable[..., Settings], token_file: Path) -> None:
    settings = archive_settings(make_settings, token_file)
    state = Path(settings.spool_dir) / "archives"
    state.mkdir(parents=True)
    now = datetime.now(UTC)
    jobs = [_job(f"{i:024x}", "complete", now - timedelta(days=40 + i)) for i in range(4)]
    jobs += [_job(f"{i + 100:024x}", "failed" if i % 2 else "complete",
                  now - timedelta(hours=10 - i)) for i in range(4)]
    for job in jobs:
        (state / f"{job.id}.json").write_text(json.dumps(asdict(job)))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    agent = AgentThread(settings)
    service = agent.agent.archive
    assert service.jobs_keep_days == 30
    service.jobs_max = 3
    with agent as t:
        # Old ones by age, then the oldest recent one by count (the start-up prune runs
        # beside the server: the agent answers before it is done).
        poll_until(lambda: sorted(p.stem for p in state.glob("*.json")) == [
            j.id for j in jobs[5:]], within=10, what="old job files pruned at start-up")
        assert raw_http(t.url, "GET", f"/archives/{jobs[0].id}", headers=auth)[0] == 404
        assert raw_http(t.url, "GET", f"/archives/{jobs[7].id}", headers=auth)[0] == 200
        status, doc = raw_http(t.url, "POST", "/archive", headers=auth, body=json.dumps(
            {"namespace": NS, "reason": "new"}).encode())
        assert status == 202
        poll_until(lambda: raw_http(t.url, "GET", f"/archives/{doc['id']}", headers=auth)[1][
            "status"] == "complete", within=30, what="the new archive", interval=0.1)
        poll_until(lambda: len(list(state.glob("*.json"))) == 3, within=10,
                   what="job files pruned to 3")
        assert {p.stem for p in state.glob("*.json")} == {jobs[6].id, jobs[7].id, doc["id"]}


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def test_the_guard_evicts_the_longest_idle_never_a_busy_one() -> None:
    now = [0.0]
    guard = ConnectionGuard(max_connections=4, idle_timeout_s=5, header_timeout_s=2,
                            metrics=Metrics(), clock=lambda: now[0])
    ts = [_Transport() for _ in range(6)]
    for i, tr in enumerate(ts[:4]):
        now[0] = float(i)
        assert guard.admit(tr)
    guard.conns[ts[0]].busy = 1  # oldest, but in a handler
    now[0] = 4.0
    assert guard.admit(ts[4])
    assert [t.aborted for t in ts[:4]] == [False, True, False, False]
    for c in guard.conns.values():
        c.busy = 1
    assert not guard.admit(ts[5])  # all busy: the new one is refused
    assert guard.metrics.registry.get_sample_value(
        "evidence_keeper_http_connections_rejected_total") == 1
    # Timeouts: a partial request after header_timeout, an idle one after idle_timeout.
    for c in guard.conns.values():
        c.busy = 0
    guard.saw_data(ts[2])
    now[0] = 6.5
    guard.sweep()
    assert ts[2].aborted and not ts[3].aborted
    now[0] = 9.5
    guard.sweep()
    assert ts[3].aborted and not guard.conns


def test_accept_errors_are_counted_and_logged_at_most_every_ten_seconds() -> None:
    now = [100.0]
    metrics = Metrics()
    guard = ConnectionGuard(max_connections=4, idle_timeout_s=5, header_timeout_s=5,
                            metrics=metrics, clock=lambda: now[0])
    loop = asyncio.new_event_loop()
    try:
        error = OSError(errno.EMFILE, "Too many open files")
        for _ in range(1000):  # asyncio reports each failed accept() to the loop's handler
            guard.handle_loop_exception(loop, {"message": "socket.accept() out of system resource",
                                            "exception": error})
        assert metrics.registry.get_sample_value(
            "evidence_keeper_http_accept_errors_total", {"errno": "EMFILE"}) == 1000
        assert guard.accept_errors.counts == {"EMFILE": 999}  # one line so far, the rest held
        now[0] += 10
        guard.sweep()  # the next summary line, with the count
        assert guard.accept_errors.counts == {}
    finally:
        loop.close()
