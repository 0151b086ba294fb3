"""End to end with a real Prometheus server: it scrapes the agent, evaluates the shipped alert
rules (with ``for:`` shortened), and EvidenceKeeperSinkDNSFailing fires when the sink's DNS
breaks and resolves when it is fixed."""

from __future__ import annotations

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
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from evidence_keeper.settings import load_settings
from tests.conftest import AgentThread
from tests.support.dns import SINK_HOST, FlakyDNS
from tests.support.paths import REPO

RULES = REPO / "alerts" / "evidence-keeper.rules.yml"
SCRAPE_INTERVAL = "500ms"
EVAL_INTERVAL = "250ms"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
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


def _alerts(base: str, name: str) -> list[dict[str, Any]]:
    doc = _get(f"{base}/api/v1/alerts")
    return [a for a in doc["data"]["alerts"] if a["labels"]["alertname"] == name]


def _wait(cond: Callable[[], bool], *, within: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {within}s waiting for {what}"
        time.sleep(interval)


@dataclass
class Scraped:
    """A real Prometheus scraping a real agent whose sink DNS the test can break."""

    base: str
    dns: FlakyDNS


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory, prometheus_bin: str) -> Iterator[Scraped]:
    """One Prometheus and one agent for the module: Prometheus applies a new scrape target
    only after its discovery manager's 5 s throttle (not configurable), so each test starting
    its own would wait those 5 s again. Intervals are shortened (the rules' ``for:`` too):
    seconds of patience instead of minutes, the same rules."""
    tmp = tmp_path_factory.mktemp("prometheus")
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = EVAL_INTERVAL
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"  # the test override: minutes of patience become a second
    rules_file = tmp / "rules.yml"
    rules_file.write_text(yaml.safe_dump(rules))
    (tmp / "pods").mkdir()
    settings = load_settings(None, environ={}, overrides={
        "node_name": "node-1", "log_root": str(tmp / "pods"), "spool_dir": str(tmp / "spool"),
        "store_url": f"file://{tmp / 'store'}", "kubernetes": "off", "flush_interval_s": 1.0,
        "discover_interval_s": 0.2, "tail_interval_s": 0.05, "commit_interval_s": 0.1,
        "log_level": "warning", "listen": "127.0.0.1:0",
        "sink_probes": f"datadog=dns:{SINK_HOST}", "probe_interval_s": 0.2,
        "probe_failures_before_down": 2})
    dns = FlakyDNS()
    with AgentThread(settings, resolver=dns) as agent:
        host, port = agent.agent.api_address or ("", 0)
        prom_port = _free_port()
        cfg = tmp / "prometheus.yml"
        cfg.write_text(yaml.safe_dump({
            "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL,
                       "evaluation_interval": EVAL_INTERVAL},
            "rule_files": [str(rules_file)],
            "scrape_configs": [{"job_name": "evidence-keeper",
                                "static_configs": [{"targets": [f"{host}:{port}"],
                                                    "labels": {"node": "node-1"}}]}],
        }))
        with (tmp / "prom.log").open("wb") as prom_log:
            proc = subprocess.Popen(
                [prometheus_bin, f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                stdout=subprocess.DEVNULL, stderr=prom_log)
        base = f"http://127.0.0.1:{prom_port}"
        try:
            def scraped_once() -> bool:
                try:
                    return bool(_get(f"{base}/api/v1/query?query=up")["data"]["result"])
                except OSError:
                    return False

            _wait(scraped_once, within=60,
                  what=f"the first scrape; prometheus log: {tmp / 'prom.log'}", interval=0.2)
            yield Scraped(base, dns)
        finally:
            proc.terminate()
            proc.wait(timeout=20)
            dns.release.set()


def test_dns_alert_fires_and_resolves(scraped: Scraped) -> None:
    base, dns = scraped.base, scraped.dns
    _wait(lambda: bool(_get(f"{base}/api/v1/query?query=evidence_keeper_sink_up")["data"][
        "result"]), within=20, what="the agent's sink_up scraped")
    assert _alerts(base, "EvidenceKeeperSinkDNSFailing") == []

    dns.broken.add(SINK_HOST)
    try:
        _wait(lambda: any(a["state"] == "firing"
                          for a in _alerts(base, "EvidenceKeeperSinkDNSFailing")),
              within=30, what="EvidenceKeeperSinkDNSFailing firing")
        firing = [a for a in _alerts(base, "EvidenceKeeperSinkDNSFailing")
                  if a["state"] == "firing"]
        alert = firing[0]
        assert alert["labels"]["sink"] == "datadog"
        assert alert["labels"]["severity"]
        assert "runbook_url" in alert["annotations"]
    finally:
        dns.broken.discard(SINK_HOST)
    _wait(lambda: not _alerts(base, "EvidenceKeeperSinkDNSFailing"), within=30,
          what="EvidenceKeeperSinkDNSFailing resolved")


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


def test_dashboard_queries_are_valid_and_key_panels_have_data(scraped: Scraped) -> None:
    model = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = [
        (panel["title"], target["expr"])
        for panel in model["panels"] if panel["type"] != "row"
        for target in panel["targets"]
    ]
    assert {title for title, _ in queries} >= KEY_PANELS
    base = scraped.base
    # Every query parses and evaluates, from the first scrape on.
    for title, expr in queries:
        answer = _query(base, _grafana_variables(expr))
        assert answer["status"] == "success", f"{title}: {expr}: {answer}"
    # Key panels show data once a few scrapes are in (rates need two samples).
    empty: list[str] = []

    def all_have_data() -> bool:
        empty[:] = sorted(t for t in KEY_PANELS if not _panel_has_data(base, t, queries))
        return not empty

    _wait(all_have_data, within=60, what=f"data in every key panel (still empty: {empty})",
          interval=0.5)
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
