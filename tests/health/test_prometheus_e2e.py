"""End to end with a real Prometheus server: it scrapes the agent, evaluates the shipped alert
rules (with ``for:`` shortened), and EvidenceKeeperSinkDNSFailing fires when the sink's DNS
breaks and resolves when it is fixed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from evidence_keeper.settings import Settings
from tests.conftest import AgentThread
from tests.support.dns import SINK_HOST, FlakyDNS
from tests.support.paths import REPO

RULES = REPO / "alerts" / "evidence-keeper.rules.yml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def prometheus_bin() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed (make test installs Debian's package)")
        pytest.skip("prometheus binary not installed (apt-get install prometheus)")
    return path


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture
def dns() -> Iterator[FlakyDNS]:
    d = FlakyDNS()
    yield d
    d.release.set()


@contextlib.contextmanager
def _prometheus(tmp_path: Path, prometheus_bin: str, target: tuple[str, int], *,
                rule_files: list[str] | None = None) -> Iterator[str]:
    """A real Prometheus scraping ``target`` every second (``node="node-1"``), evaluating
    ``rule_files``; its base URL once ready, terminated on exit."""
    host, port = target
    prom_port = _free_port()
    cfg = tmp_path / "prometheus.yml"
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "evidence-keeper",
                            "static_configs": [{"targets": [f"{host}:{port}"],
                                                "labels": {"node": "node-1"}}]}]}
    if rule_files:
        config["rule_files"] = rule_files
    cfg.write_text(yaml.safe_dump(config))
    with (tmp_path / "prom.log").open("wb") as prom_log:
        proc = subprocess.Popen(
            [prometheus_bin, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=prom_log)
    base = f"http://127.0.0.1:{prom_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "prom.log").read_text()
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _alerts(base: str, name: str) -> list[dict[str, Any]]:
    doc = _get(f"{base}/api/v1/alerts")
    return [a for a in doc["data"]["alerts"] if a["labels"]["alertname"] == name]


def test_dns_alert_fires_and_resolves(tmp_path: Path, make_settings: Callable[..., Settings],
                                      prometheus_bin: str, dns: FlakyDNS) -> None:
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "2s"  # the test override: minutes of patience become seconds
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump(rules))
    settings = make_settings(sink_probes=f"datadog=dns:{SINK_HOST}", probe_interval_s=0.5,
                             probe_failures_before_down=2)
    with AgentThread(settings, resolver=dns) as agent, _prometheus(
            tmp_path, prometheus_bin, agent.agent.api_address or ("", 0),
            rule_files=[str(rules_file)]) as base:
        # Healthy: the target is scraped and the alert is not there.
        deadline = time.monotonic() + 20
        while True:
            up = _get(f"{base}/api/v1/query?query=evidence_keeper_sink_up")
            if up["data"]["result"]:
                break
            assert time.monotonic() < deadline, "prometheus never scraped the agent"
            time.sleep(0.5)
        assert _alerts(base, "EvidenceKeeperSinkDNSFailing") == []

        dns.broken.add(SINK_HOST)
        deadline = time.monotonic() + 30
        while True:
            firing = [a for a in _alerts(base, "EvidenceKeeperSinkDNSFailing")
                      if a["state"] == "firing"]
            if firing:
                break
            assert time.monotonic() < deadline, "EvidenceKeeperSinkDNSFailing never fired"
            time.sleep(0.5)
        alert = firing[0]
        assert alert["labels"]["sink"] == "datadog"
        assert alert["labels"]["severity"]
        assert "runbook_url" in alert["annotations"]

        dns.broken.discard(SINK_HOST)
        deadline = time.monotonic() + 30
        while _alerts(base, "EvidenceKeeperSinkDNSFailing"):
            assert time.monotonic() < deadline, "EvidenceKeeperSinkDNSFailing never resolved"
            time.sleep(0.5)


# --------------------------------------------------------------------------------------------
# The Grafana dashboard's queries, in the same real Prometheus scraping a real agent.

DASHBOARD = REPO / "dashboards" / "evidence-keeper.json"
# Panels whose metrics every agent on main exports: they must show data at once. Panels of
# metrics other helpers add (build info, open files, task restarts...) must only be valid PromQL.
KEY_PANELS = {
    "Agents up", "Captured bytes/s", "Shipped bytes/s", "Backlog age", "Spool fill",
    "Sink up per check", "Streams and tailed files", "Unshipped bytes",
}


def _grafana_variables(expr: str) -> str:
    """What Grafana sends for the dashboard's variables: All nodes, a 1m rate window."""
    return expr.replace("$node", ".*").replace("$__rate_interval", "1m")


def _query(base: str, expr: str) -> Any:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        return _get(url)
    except urllib.error.HTTPError as exc:  # 400 bad_data: the query does not parse
        return json.loads(exc.read())


def test_dashboard_queries_are_valid_and_key_panels_have_data(
    tmp_path: Path, make_settings: Callable[..., Settings], prometheus_bin: str, dns: FlakyDNS
) -> None:
    model = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = [
        (panel["title"], target["expr"])
        for panel in model["panels"] if panel["type"] != "row"
        for target in panel["targets"]
    ]
    assert {title for title, _ in queries} >= KEY_PANELS
    settings = make_settings(sink_probes=f"datadog=dns:{SINK_HOST}", probe_interval_s=0.5)
    (tmp_path / "pods").mkdir(exist_ok=True)
    with AgentThread(settings, resolver=dns) as agent, _prometheus(
            tmp_path, prometheus_bin, agent.agent.api_address or ("", 0)) as base:
        # Every query parses and evaluates, from the first scrape on.
        deadline = time.monotonic() + 60
        while True:
            try:
                if _get(f"{base}/api/v1/query?query=up")["data"]["result"]:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "prom.log").read_text()
            time.sleep(0.5)
        for title, expr in queries:
            answer = _query(base, _grafana_variables(expr))
            assert answer["status"] == "success", f"{title}: {expr}: {answer}"
        # Key panels show data once a few scrapes are in (rates need two samples).
        deadline = time.monotonic() + 60
        while True:
            empty = sorted(t for t in KEY_PANELS if not _panel_has_data(base, t, queries))
            if not empty:
                break
            assert time.monotonic() < deadline, f"panels without data: {empty}"
            time.sleep(1)
        # The template variable's own query finds the node.
        nodes = _get(f"{base}/api/v1/label/node/values?"
                     + urllib.parse.urlencode({"match[]": "evidence_keeper_spool_max_bytes"}))
        assert nodes["data"] == ["node-1"]


def _panel_has_data(base: str, title: str, queries: list[tuple[str, str]]) -> bool:
    """A panel shows data when any of its queries returns a series."""
    return any(
        _query(base, _grafana_variables(expr))["data"]["result"]
        for t, expr in queries if t == title
    )
