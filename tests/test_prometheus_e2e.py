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
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from evidence_keeper.settings import Settings
from tests.conftest import AgentThread
from tests.test_health import SINK_HOST, FlakyDNS

RULES = Path(__file__).resolve().parent.parent / "alerts" / "evidence-keeper.rules.yml"


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
    with AgentThread(settings, resolver=dns) as agent:
        host, port = agent.agent.api_address or ("", 0)
        prom_port = _free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules_file)],
            "scrape_configs": [{"job_name": "evidence-keeper",
                                "static_configs": [{"targets": [f"{host}:{port}"],
                                                    "labels": {"node": "node-1"}}]}],
        }))
        with (tmp_path / "prom.log").open("wb") as prom_log:
            proc = subprocess.Popen(
                [prometheus_bin, f"--config.file={cfg}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
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
        finally:
            proc.terminate()
            proc.wait(timeout=20)
