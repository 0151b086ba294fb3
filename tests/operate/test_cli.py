"""The command line as an SRE meets it: --version, -o text|json, -n/-A, --timestamps,
completion, export progress, exit codes in --help, and "no evidence" told apart from "no match".

Real parts: agents in threads (the CLI's HTTP calls are real), a file:// store the agents
shipped to, bash to check the completion script.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from evidence_keeper.cli import COMMANDS, build_parser
from evidence_keeper.cli import main as cli_main
from evidence_keeper.formats import parse_ts
from evidence_keeper.settings import Settings
from evidence_keeper.sim import KubeletSim
from evidence_keeper.store import FileStore
from evidence_keeper.timefmt import rfc3339
from evidence_keeper.version import BuildInfo, build_info, source_revision
from tests.conftest import AgentThread, export_bytes
from tests.support.paths import PACKAGE

NS = "sock-shop"
TOKEN = "ek-cli-token-0123456789abcdef"


def write_config(path: Path, settings: Settings) -> str:
    path.write_text(f"store_url: file://{settings.store_dir}\ncluster: {settings.cluster}\n"
                    f"spool_dir: {path.parent / 'cli-spool'}\n")
    return str(path)


@pytest.fixture
def shipped(tmp_path: Path, make_settings: Callable[..., Settings]) -> tuple[Settings, KubeletSim]:
    """A store holding two namespaces' streams, shipped by a real agent (then stopped)."""
    settings = make_settings(flush_interval_s=0.3)
    sim = KubeletSim(Path(settings.log_root))
    sim.add_pod(NS, "orders-1", containers=("orders",))
    sim.add_pod("kube-system", "coredns-1", containers=("coredns",))
    for i in range(40):
        sim.write(NS, "orders-1", "orders", f"order {i} status updated to PAYMENT_FAILED")
        sim.write("kube-system", "coredns-1", "coredns", f"query {i} NXDOMAIN PAYMENT_FAILED")
    store = FileStore(settings.store_dir)  # type: ignore[arg-type]
    with AgentThread(settings):
        deadline = time.monotonic() + 30
        for sid in sim.streams():
            while export_bytes(store, sid)[0] != sim.record(sid):
                assert time.monotonic() < deadline, f"{sid} not shipped"
                time.sleep(0.1)
    return settings, sim


# ----------------------------------------------------------------------------- the parser
def test_version_prints_version_and_revision(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["--version"])
    assert exc.value.code == 0
    info = build_info()
    out = capsys.readouterr().out.strip()
    assert out == f"evidence-keeper {info.version} (revision {info.revision})"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", info.version)


def test_revision_comes_from_the_build_file_then_git(tmp_path: Path) -> None:
    (tmp_path / "REVISION").write_text("0123456789ab\n")
    assert source_revision(revision_file=tmp_path / "REVISION", checkout=tmp_path) == (
        "0123456789ab")
    # No file, no .git above the package: unknown (an installed wheel without the file).
    assert source_revision(revision_file=tmp_path / "none", checkout=tmp_path / "pkg") == (
        "unknown")
    if shutil.which("git") is None:
        return
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "pkg" / "x.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    assert source_revision(revision_file=tmp_path / "none", checkout=repo / "pkg") == head
    (repo / "pkg" / "x.py").write_text("x = 2\n")
    assert source_revision(revision_file=tmp_path / "none", checkout=repo / "pkg") == (
        f"{head}-dirty")


def test_every_command_lists_its_exit_codes_and_read_commands_take_o() -> None:
    parser = build_parser()
    assert "exit codes:" in parser.format_help()
    sub = next(a for a in parser._actions if a.dest == "command")
    choices: dict[str, object] = sub.choices  # type: ignore[assignment]
    assert set(choices) == {m.NAME for m in COMMANDS}
    for name, p in choices.items():
        text = p.format_help()  # type: ignore[attr-defined]
        assert "exit codes:" in text, name
        if name in ("gaps", "preflight", "archive", "verify", "search"):
            assert "-o {text,json}" in text and "--json" in text, name
        if name in ("gaps", "archive", "search"):
            assert "-n NAMESPACE" in text, name


def test_the_cli_does_not_import_the_http_server() -> None:
    for path in [PACKAGE / "cli.py", *(PACKAGE / "commands").rglob("*.py")]:
        assert "api.app" not in path.read_text(), path


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_scripts(shell: str, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["completion", shell]) == 0
    script = capsys.readouterr().out
    for word in ("search", "preflight", "--all-namespaces", "--timestamps"):
        assert word in script
    if shutil.which(shell) is not None:
        path = tmp_path / f"completion.{shell}"
        path.write_text(script)
        check = subprocess.run([shell, "-n", str(path)], check=False, capture_output=True,
                               text=True)
        assert check.returncode == 0, check.stderr
    if shell == "bash" and shutil.which("bash"):
        # Load it and complete "evidence-keeper sea<TAB>".
        probe = (f"source {path}\nCOMP_WORDS=(evidence-keeper sea); COMP_CWORD=1;"
                 " COMP_LINE='evidence-keeper sea'; COMP_POINT=${#COMP_LINE};"
                 " _shtab_evidence_keeper evidence-keeper sea evidence-keeper;"
                 " printf '%s\\n' \"${COMPREPLY[@]}\"")
        done = subprocess.run(["bash", "-c", probe], check=False, capture_output=True,
                              text=True)
        assert "search" in done.stdout.split(), done.stdout + done.stderr


# ----------------------------------------------------------------------- agent commands
def test_gaps_preflight_and_archive_speak_json(tmp_path: Path,
                                               make_settings: Callable[..., Settings],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    settings = make_settings(archive_token_file=str(token), flush_interval_s=0.3)
    sim = KubeletSim(Path(settings.log_root))
    sim.add_pod(NS, "orders-1", containers=("orders",))
    sim.write(NS, "orders-1", "orders", "order 1 status updated to PAYMENT_FAILED")
    with AgentThread(settings) as agent:
        url = agent.url
        for argv in (["gaps", "--url", url, "-o", "json"], ["gaps", "--url", url, "--json"],
                     ["gaps", "--url", url, "-n", NS, "-o", "json"]):
            assert cli_main(argv) == 0
            doc = json.loads(capsys.readouterr().out)
            assert doc["node"] == settings.node_name and isinstance(doc["gaps"], list)
        assert cli_main(["gaps", "--url", url]) == 0
        assert "gaps on node node-1" in capsys.readouterr().out

        # preflight -o json: the verdict and each check, once the store probe has answered.
        deadline = time.monotonic() + 30
        while not agent.agent.sinks.all_up():
            assert time.monotonic() < deadline, "the agent's store probe never passed"
            time.sleep(0.05)
        rc = cli_main(["preflight", "--url", url, "-o", "json"])
        captured = capsys.readouterr()
        doc = json.loads(captured.out)
        assert rc == 0 and doc["ok"] is True and doc["url"] == url, captured
        assert all(c["ok"] for c in doc["checks"]) and len(doc["checks"]) >= 3
        assert any(c["check"].startswith("sink store") for c in doc["checks"])
        # A failing gate in JSON: exit 1, ok false, the failed check named.
        assert cli_main(["preflight", "--url", url, "-o", "json", "--max-backlog-s", "-1"]) == 1
        doc = json.loads(capsys.readouterr().out)
        assert doc["ok"] is False
        assert next(c["check"] for c in doc["checks"] if not c["ok"]).startswith("shipping")

        assert cli_main(["archive", "--url", url, "--token-file", str(token), "-n", NS,
                         "--reason", "cli json", "--wait", "-o", "json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["status"] == "complete" and doc["manifest_key"].endswith("manifest.json")
    config = write_config(tmp_path / "cli.yaml", settings)
    assert cli_main(["verify", "--config", config, doc["id"], "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_agent_unreachable_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["preflight", "--url", "http://127.0.0.1:9", "-o", "json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evidence-keeper: cannot reach the agent") and "\n" not in err


# ------------------------------------------------------------------------- store commands
def test_search_text_timestamps_namespaces_and_json(
        tmp_path: Path, shipped: tuple[Settings, KubeletSim],
        capsys: pytest.CaptureFixture[str]) -> None:
    settings, sim = shipped
    config = write_config(tmp_path / "cli.yaml", settings)
    assert cli_main(["search", "--config", config, "-F", "order 7 ", "-n", NS]) == 0
    assert capsys.readouterr().out == "orders-1 orders │ order 7 status updated to PAYMENT_FAILED\n"
    assert cli_main(["search", "--config", config, "-F", "order 7 ", "-n", NS,
                     "--timestamps"]) == 0
    line = capsys.readouterr().out
    record = next(ln for ln in sim.record(sim.stream_of(NS, "orders-1", "orders")).splitlines()
                  if b"order 7 " in ln)
    ts = parse_ts(record.split(b" ", 1)[0])  # the CRI line's own RFC3339Nano timestamp
    assert ts is not None
    stamp = rfc3339(ts)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z orders-1 orders │ order 7 "
                        r"status updated to PAYMENT_FAILED\n", line), line
    assert line.startswith(stamp + " ")
    # -A: every namespace, with the namespace in front.
    assert cli_main(["search", "--config", config, "-F", "PAYMENT_FAILED", "-A"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 80
    assert {ln.split(" ", 1)[0] for ln in lines} == {NS, "kube-system"}
    # -o json and --json are the same.
    assert cli_main(["search", "--config", config, "-F", "order 7 ", "-n", NS, "-o", "json"]) == 0
    first = capsys.readouterr().out
    assert cli_main(["search", "--config", config, "-F", "order 7 ", "-n", NS, "--json"]) == 0
    assert capsys.readouterr().out == first
    hit = json.loads(first)
    assert hit["namespace"] == NS and hit["ts"] == stamp
    # -n and -A together, or neither: a usage error.
    assert cli_main(["search", "--config", config, "x", "-n", NS, "-A"]) == 2
    assert cli_main(["search", "--config", config, "x"]) == 2
    assert "exactly one of -n NAMESPACE and -A" in capsys.readouterr().err


def test_no_evidence_is_told_apart_from_no_match(
        tmp_path: Path, shipped: tuple[Settings, KubeletSim],
        capsys: pytest.CaptureFixture[str]) -> None:
    settings, _sim = shipped
    config = write_config(tmp_path / "cli.yaml", settings)
    # No match: exit 1, nothing on stderr (grep's contract).
    assert cli_main(["search", "--config", config, "-F", "NEVER-LOGGED", "-n", NS]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    # A namespace with no evidence: exit 1 and one line saying so.
    assert cli_main(["search", "--config", config, "-F", "x", "-n", "payments"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no evidence for namespace payments" in err
    assert "nothing was shipped" in err
    # Evidence, but none in the window.
    assert cli_main(["search", "--config", config, "-F", "order", "-n", NS,
                     "--until", "2001-01-01T00:00:00Z"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "outside the window" in err
    # A store that does not exist: exit 1, one line, and nothing created.
    missing = tmp_path / "no-such-store"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"store_url: file://{missing}\n")
    for argv in (["search", "--config", str(bad), "x", "-n", NS],
                 ["search", "--config", str(bad), "x", "-A"],
                 ["export", "--config", str(bad), "-n", NS, "--pod", "p", "--container", "c"]):
        assert cli_main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "does not exist" in err, err
    assert not missing.exists()
    # export of a scope with no evidence: exit 1 and one line.
    assert cli_main(["export", "--config", config, "-n", NS, "--pod", "orders-9",
                     "--container", "orders"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no evidence in" in err


def test_export_progress_on_request(tmp_path: Path, shipped: tuple[Settings, KubeletSim],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    settings, sim = shipped
    config = write_config(tmp_path / "cli.yaml", settings)
    out = tmp_path / "orders.log"
    sid = sim.stream_of(NS, "orders-1", "orders")
    # stderr is not a terminal here: no progress unless asked for.
    assert cli_main(["export", "--config", config, "-n", NS, "--pod", "orders-1",
                     "--container", "orders", "-o", str(out)]) == 0
    assert "exported" not in capsys.readouterr().err
    assert out.read_bytes() == sim.record(sid)
    assert cli_main(["export", "--config", config, "-n", NS, "--pod", "orders-1",
                     "--container", "orders", "-o", str(out), "--progress"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^exported \d+/\d+ MiB$", err, re.M), err
    assert out.read_bytes() == sim.record(sid)
    tar = tmp_path / "pod.tar"
    assert cli_main(["export", "--config", config, "-n", NS, "--pod", "orders-1",
                     "-o", str(tar), "--progress"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^exported \d+ MiB, \d+ segments$", err, re.M), err


# ------------------------------------------------------------------------------ metrics
def test_metrics_build_info_process_and_no_created(
        make_settings: Callable[..., Settings]) -> None:
    from urllib.request import urlopen

    with AgentThread(make_settings()) as agent, urlopen(f"{agent.url}/metrics") as resp:
        text = resp.read().decode()
    info: BuildInfo = build_info()
    assert (f'evidence_keeper_build_info{{revision="{info.revision}",'
            f'version="{info.version}"}} 1.0') in text
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds", "process_max_fds", "process_start_time_seconds"):
        assert re.search(rf"^{name} \S+$", text, re.M), name
    assert "_created" not in text
    assert "evidence_keeper_captured_bytes_total" in text


def test_module_runs_as_a_script() -> None:
    done = subprocess.run([sys.executable, "-m", "evidence_keeper.cli", "--version"],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("evidence-keeper ")
