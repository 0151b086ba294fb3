"""Deployment manifests, validated offline: the Helm chart and the kustomize base.

- the chart renders (helm-python-sdk, no helm binary, no cluster) with its defaults and with a
  values file that moves every knob (``helm/evidence-keeper/ci/full-values.yaml``), and its lint
  reports no error and no warning;
- every rendered object and every object of the kustomize base validates strictly against the
  Kubernetes OpenAPI schemas of pinned versions (``kubernetes-validate``); ServiceMonitor and
  PrometheusRule, custom resources without a schema there, are allow-listed and checked by hand
  (and by promtool in tests/health/test_alerts.py);
- the invariants the operations guide promises hold in each: kubelet's log tree mounted
  read-only, non-root, no capabilities, read-only root file system, seccomp RuntimeDefault, the
  downward-API NODE_NAME, a grace period longer than the drain deadline, a ClusterRole with
  get/list/watch pods and get pods/log and nothing else;
- chart (defaults) and kustomize base agree on all of that, field for field, and so do the
  optional objects (chart toggles and kustomize components);
- objects that need the Prometheus Operator's CRDs are off by default and guarded by the API
  version: rendered with and without ``monitoring.coreos.com/v1`` advertised (helm's
  ``--api-versions``), and with ``force`` for ``helm template`` without a cluster;
- the NetworkPolicy's egress is derived from the agent's own parse of ``sink_probes`` and the S3
  endpoint, and its ingress admits namespaces, never a pod label anyone can set;
- every EK_* variable is a real setting, and the agent's own settings parser accepts the
  configuration each manifest gives it;
- generated files (chart README, dashboard, lock coverage) are current.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from helm_python import _native
from kubernetes_validate.utils import ValidationError as SchemaValidationError

from evidence_keeper.settings import SETTINGS_KEYS, Settings, load_settings, parse_duration
from tests.conftest import AgentThread
from tests.support.alerts import load_build
from tests.support.paths import REPO

ROOT = REPO
CHART = ROOT / "helm" / "evidence-keeper"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
KUSTOMIZE = ROOT / "deploy"

# The Kubernetes versions the manifests are validated against: the chart's kubeVersion floor
# and a current release. Pinned: a new kubernetes-validate must not change what passes.
KUBERNETES_VERSIONS = ("1.25.0", "1.32.0")
# Custom resources kubernetes-validate has no schema for (Prometheus Operator CRDs).
CRD_ALLOWLIST = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
RELEASE = "evidence-keeper"
NAMESPACE = "evidence-keeper"
MONITORING_API = "monitoring.coreos.com/v1"
COMPONENTS = ("prometheus-operator", "network-policy", "grafana-dashboard", "priority-quota")
# Objects a chart toggle or a kustomize component adds (none in a default install).
OPTIONAL_KINDS = {"ServiceMonitor", "PrometheusRule", "NetworkPolicy", "ConfigMap",
                  "ResourceQuota"}
# The chart's values that turn every optional object on (kustomize: every component).
ALL_ON = {
    "serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
    "networkPolicy": {"enabled": True}, "grafanaDashboard": {"enabled": True},
    "resourceQuota": {"enabled": True},
}

# Settings the manifests derive from mounts, ports and secrets rather than from `config`.
MANAGED_SETTINGS = {"node_name", "log_root", "spool_dir", "listen", "archive_token_file"}
ALLOWED_RULES = {
    ("", "pods", "get"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("", "pods/log", "get"),
}

Objects = list[dict[str, Any]]


# --------------------------------------------------------------------------------------------
# Loading


def _render(values: dict[str, Any] | None = None, *, api_versions: tuple[str, ...] = (),
            hooks: bool = False) -> Objects:
    """The chart rendered offline; ``api_versions`` is what ``helm --api-versions`` adds to the
    capabilities (helm-python-sdk's ``Chart.render`` does not expose it; its native call does).
    Test hooks (``templates/tests/``) only with ``hooks``."""
    options = {"name": RELEASE, "namespace": NAMESPACE, "api_versions": list(api_versions)}
    with helm.Chart.load(CHART) as chart:
        rendered: dict[str, str] = json.loads(_native.call_string(
            "helm_render", chart._raw(), json.dumps(values or {}), json.dumps(options)))
    return [
        doc
        for path, text in sorted(rendered.items())
        if path.endswith((".yaml", ".yml")) and (hooks or "/templates/tests/" not in path)
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def _full_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(FULL_VALUES.read_text(encoding="utf-8"))
    return values


def _kustomize_base(*components: str) -> Objects:
    """The base's objects plus those of the given components (each a plain resource list)."""
    objects: Objects = []
    for directory in (KUSTOMIZE, *(KUSTOMIZE / "components" / c for c in components)):
        kustomization = yaml.safe_load(
            (directory / "kustomization.yaml").read_text(encoding="utf-8"))
        # Resources only, so that the files are exactly what gets applied.
        assert set(kustomization) == {"apiVersion", "kind", "resources"}, kustomization.keys()
        for name in kustomization["resources"]:
            text = (directory / name).read_text(encoding="utf-8")
            objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


@pytest.fixture(scope="module")
def chart_default() -> Objects:
    return _render()


@pytest.fixture(scope="module")
def chart_full() -> Objects:
    return _render(_full_values(), api_versions=(MONITORING_API,))


@pytest.fixture(scope="module")
def kustomize_base() -> Objects:
    return _kustomize_base()


def _manifest_sets() -> Iterator[tuple[str, Objects]]:
    yield "kustomize", _kustomize_base()
    yield "kustomize-components", _kustomize_base(*COMPONENTS)
    yield "chart-default", _render()
    yield "chart-all-on", _render(ALL_ON, api_versions=(MONITORING_API,))
    yield "chart-full", _render(_full_values(), api_versions=(MONITORING_API,))
    yield "chart-root-dac", _render({"security": {"rootWithDacReadSearch": True}})


MANIFEST_SETS = dict(_manifest_sets())


def _one(objects: Objects, kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _kinds(objects: Objects) -> set[str]:
    return {o["kind"] for o in objects}


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod.get("initContainers", [])) + list(pod["containers"])


def _agent(ds: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = ds["spec"]["template"]["spec"]["containers"]
    (agent,) = [c for c in containers if c["name"] == "agent"]
    return agent


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# --------------------------------------------------------------------------------------------
# Helm: render and lint


@pytest.mark.parametrize("values_name", ["default", "full"])
def test_chart_lints_clean(values_name: str) -> None:
    values = _full_values() if values_name == "full" else None
    for version in KUBERNETES_VERSIONS:
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{version}")
        assert report["total_charts_linted"] == 1
        assert report["errors"] == []
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert problems == [], problems


def test_chart_renders_every_resource(chart_default: Objects, chart_full: Objects) -> None:
    base = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet", "Service"}
    # A default install applies on any cluster: nothing optional, nothing needing a CRD.
    assert _kinds(chart_default) == base
    assert _kinds(chart_full) == base | OPTIONAL_KINDS
    for obj in chart_default + chart_full:
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            expected = "monitoring" if obj["kind"] == "ConfigMap" else NAMESPACE
            assert obj["metadata"]["namespace"] == expected, obj["kind"]


def test_kustomize_base_has_the_same_resources(kustomize_base: Objects) -> None:
    assert _kinds(kustomize_base) == _kinds(_render()) | {"Namespace"}
    assert _kinds(_kustomize_base(*COMPONENTS)) == _kinds(kustomize_base) | OPTIONAL_KINDS
    for obj in _kustomize_base(*COMPONENTS):
        assert obj["metadata"]["name"].startswith("evidence-keeper")
        if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["kind"]


@pytest.mark.parametrize(
    ("values", "api_versions", "expected"),
    [
        # Off by default, whatever the cluster serves.
        ({}, (), set()),
        ({}, (MONITORING_API,), set()),
        # Turned on, on a cluster without the operator's CRDs: nothing that would fail to apply.
        ({"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}, (), set()),
        # Turned on where the API is served (helm install asks the cluster; helm template
        # --api-versions monitoring.coreos.com/v1 tells it).
        ({"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
         (MONITORING_API,), {"ServiceMonitor", "PrometheusRule"}),
        ({"serviceMonitor": {"enabled": True}}, (MONITORING_API,), {"ServiceMonitor"}),
        # helm template without a cluster: force.
        ({"serviceMonitor": {"enabled": True, "force": True},
          "prometheusRule": {"enabled": True, "force": True}}, (),
         {"ServiceMonitor", "PrometheusRule"}),
        # force alone does not turn anything on.
        ({"serviceMonitor": {"force": True}, "prometheusRule": {"force": True}}, (), set()),
    ],
)
def test_monitoring_objects_need_the_api_or_force(
    values: dict[str, Any], api_versions: tuple[str, ...], expected: set[str]
) -> None:
    kinds = _kinds(_render(values, api_versions=api_versions))
    assert kinds & {"ServiceMonitor", "PrometheusRule"} == expected
    assert "DaemonSet" in kinds


def _notes(values: dict[str, Any], api_versions: tuple[str, ...] = ()) -> str:
    options = {"name": RELEASE, "namespace": NAMESPACE, "api_versions": list(api_versions)}
    with helm.Chart.load(CHART) as chart:
        rendered: dict[str, str] = json.loads(_native.call_string(
            "helm_render", chart._raw(), json.dumps(values), json.dumps(options)))
    return rendered["evidence-keeper/templates/NOTES.txt"]


def test_notes_say_when_monitoring_was_asked_for_but_not_created() -> None:
    """Never silent: an enabled ServiceMonitor/PrometheusRule the cluster cannot take is a
    warning in the install's output, and no alerts at all is said too."""
    on = {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}
    without = _notes(on)
    assert "WARNING: serviceMonitor.enabled" in without
    assert "WARNING: prometheusRule.enabled" in without
    with_api = _notes(on, (MONITORING_API,))
    assert "WARNING: serviceMonitor" not in with_api and "WARNING: prometheusRule" not in with_api
    assert "PrometheusRule evidence-keeper holds" in with_api
    assert "No alerts are installed" in _notes({})


@pytest.mark.parametrize(
    ("toggle", "kind"),
    [
        ("serviceMonitor", "ServiceMonitor"),
        ("prometheusRule", "PrometheusRule"),
        ("networkPolicy", "NetworkPolicy"),
        ("grafanaDashboard", "ConfigMap"),
        ("resourceQuota", "ResourceQuota"),
    ],
)
def test_optional_resources_are_toggled_by_values(toggle: str, kind: str) -> None:
    on = _render({toggle: {"enabled": True}}, api_versions=(MONITORING_API,))
    assert kind in _kinds(on)
    off = _render({**ALL_ON, toggle: {"enabled": False}}, api_versions=(MONITORING_API,))
    assert kind not in _kinds(off)
    assert "DaemonSet" in _kinds(off)


def test_rbac_and_service_account_can_be_brought_by_the_operator() -> None:
    objects = _render({"rbac": {"create": False}, "serviceAccount": {"create": False,
                                                                     "name": "existing"}})
    assert not _kinds(objects) & {"ClusterRole", "ClusterRoleBinding", "ServiceAccount"}
    assert _one(objects, "DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == (
        "existing"
    )


def test_chart_refuses_a_grace_period_not_above_the_drain_deadline() -> None:
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        _render({"terminationGracePeriodSeconds": 20, "config": {"shutdown_timeout_s": 20}})
    _render({"terminationGracePeriodSeconds": 21, "config": {"shutdown_timeout_s": 20}})


@pytest.mark.parametrize(
    "values",
    [
        {"config": {"flush_intervl_s": 5}},  # a misspelt key must not silently fall back
        {"config": {"node_name": "x"}},  # set by the chart (downward API)
        {"config": {"compression": "lz4"}},
        {"config": {"spool_max_bytes": "10 gigs"}},
        {"config": {"store_url": "http://bucket"}},
        {"security": {"runAsUser": 0}},
        {"image": {"pullPolicy": "Sometimes"}},
        {"unknownTopLevel": True},
    ],
)
def test_values_schema_rejects_bad_values(values: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)


def test_values_schema_covers_every_setting() -> None:
    with helm.Chart.load(CHART) as chart:
        schema = chart.schema
        defaults = chart.values
    assert schema is not None
    config_keys = set(schema["properties"]["config"]["properties"])
    assert config_keys == set(SETTINGS_KEYS) - MANAGED_SETTINGS, (
        "values.schema.json config must list every setting of evidence_keeper/settings.py "
        "except those the chart derives"
    )
    assert set(defaults["config"]) == config_keys, "values.yaml must document every setting"


def test_values_defaults_are_the_agents_defaults() -> None:
    """values.yaml spells the agent's defaults out; they must not drift from settings.py."""
    with helm.Chart.load(CHART) as chart:
        config = chart.values["config"]
    explicit = load_settings(
        None, environ={"NODE_NAME": "node-a"},
        overrides={k: v for k, v in config.items() if v != ""},
    )
    implicit = load_settings(None, environ={"NODE_NAME": "node-a"})
    for key in config:
        assert getattr(explicit, key) == getattr(implicit, key), key


# --------------------------------------------------------------------------------------------
# Strict schema validation of every object


def _validate_custom_resource(obj: dict[str, Any]) -> None:
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}, obj["kind"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
    if obj["kind"] == "ServiceMonitor":
        spec = obj["spec"]
        assert spec["selector"]["matchLabels"]
        for endpoint in spec["endpoints"]:
            assert endpoint["port"] == "http"
            assert endpoint["path"] == "/metrics"
    else:
        assert obj["spec"]["groups"], "PrometheusRule without groups"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifests", MANIFEST_SETS)
def test_every_object_validates_strictly(manifests: str, version: str) -> None:
    errors = []
    for obj in MANIFEST_SETS[manifests]:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if (obj["apiVersion"], obj["kind"]) in CRD_ALLOWLIST:
            _validate_custom_resource(obj)
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except SchemaValidationError as exc:
            errors.append(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_strict_validation_catches_a_misspelt_field(kustomize_base: Objects) -> None:
    ds = yaml.safe_load(yaml.safe_dump(_one(kustomize_base, "DaemonSet")))
    ds["spec"]["template"]["spec"]["securityContext"]["runAsNonroot"] = True
    with pytest.raises(SchemaValidationError):
        kubernetes_validate.validate(ds, KUBERNETES_VERSIONS[-1], strict=True)


# --------------------------------------------------------------------------------------------
# Invariants, in every manifest set


def _drain_deadline(agent: dict[str, Any]) -> float:
    value = _env(agent).get("EK_SHUTDOWN_TIMEOUT_S") or ""
    if not str(value).strip():
        return float(Settings.model_fields["shutdown_timeout_s"].default)
    return parse_duration(value)


@pytest.mark.parametrize("manifests", MANIFEST_SETS)
def test_daemonset_invariants(manifests: str) -> None:
    objects = MANIFEST_SETS[manifests]
    ds = _one(objects, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    agent = _agent(ds)
    env = _env(agent)
    root_mode = manifests == "chart-root-dac"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}

    # kubelet's log tree: hostPath, mounted read-only where log_root says.
    log_root = env["EK_LOG_ROOT"]
    assert log_root == "/var/log/pods"
    assert mounts[log_root]["readOnly"] is True
    assert volumes[mounts[log_root]["name"]]["hostPath"]["path"] == log_root
    # Every host path but the spool is read-only.
    spool = env["EK_SPOOL_DIR"]
    assert volumes[mounts[spool]["name"]]["hostPath"]["type"] == "DirectoryOrCreate"
    for mount in agent["volumeMounts"]:
        if "hostPath" in volumes[mount["name"]] and mount["mountPath"] != spool:
            assert mount.get("readOnly") is True, mount

    # Identity and privileges.
    pod_sc = pod["securityContext"]
    sc = agent["securityContext"]
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc.get("privileged", False) is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    if root_mode:  # the documented alternative for 0600 log files
        assert pod_sc["runAsUser"] == 0
        assert sc["capabilities"]["add"] == ["DAC_READ_SEARCH"]
    else:
        assert pod_sc["runAsNonRoot"] is True
        assert sc["runAsNonRoot"] is True
        assert pod_sc["runAsUser"] > 0
        assert "runAsUser" not in sc
        assert "add" not in sc["capabilities"]
        assert pod_sc["supplementalGroups"] == [0]
    for container in pod.get("initContainers", []):
        init_sc = container["securityContext"]
        assert init_sc["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
        assert init_sc["readOnlyRootFilesystem"] is True
        assert init_sc["allowPrivilegeEscalation"] is False
        assert [m["mountPath"] for m in container["volumeMounts"]] == [spool]
        assert container["command"][-2:] == (
            ["0", "0"] if root_mode else [str(pod_sc["runAsUser"]), str(pod_sc["runAsGroup"])]
        )

    # Identity of the node, from the downward API.
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}

    # Shutdown: the kubelet's SIGKILL comes after the drain deadline.
    assert pod["terminationGracePeriodSeconds"] > _drain_deadline(agent)

    # Every node, and the last to be evicted; never two agents on one spool.
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["priorityClassName"]
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == 0

    # The HTTP API and its probes.
    port = int(env["EK_LISTEN"].rsplit(":", 1)[1])
    assert agent["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert agent["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert agent["args"] == ["run"]
    assert agent["resources"]["requests"] and agent["resources"]["limits"]["memory"]

    # The archive token file lies in a mounted Secret.
    token = Path(env["EK_ARCHIVE_TOKEN_FILE"])
    (token_mount,) = [m for m in agent["volumeMounts"] if Path(m["mountPath"]) == token.parent]
    assert token_mount["readOnly"] is True
    assert volumes[token_mount["name"]]["secret"]["secretName"]

    # The Service and the ServiceMonitor reach that port.
    service = _one(objects, "Service")
    assert service["spec"]["ports"][0]["port"] == port
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    selector = service["spec"]["selector"]
    assert selector.items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert ds["spec"]["selector"]["matchLabels"] == selector


@pytest.mark.parametrize("manifests", MANIFEST_SETS)
def test_cluster_role_grants_only_pod_reads(manifests: str) -> None:
    objects = MANIFEST_SETS[manifests]
    role = _one(objects, "ClusterRole")
    granted = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no resourceNames/URLs
        granted |= {
            (group, resource, verb)
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }
    assert granted == ALLOWED_RULES
    binding = _one(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    service_account = _one(objects, "ServiceAccount")
    assert binding["subjects"] == [{
        "kind": "ServiceAccount",
        "name": service_account["metadata"]["name"],
        "namespace": service_account["metadata"]["namespace"],
    }]
    ds = _one(objects, "DaemonSet")
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == (
        service_account["metadata"]["name"]
    )


WITH_POLICY = [name for name, objs in MANIFEST_SETS.items() if "NetworkPolicy" in _kinds(objs)]


@pytest.mark.parametrize("manifests", WITH_POLICY)
def test_network_policy_opens_only_the_api_port(manifests: str) -> None:
    objects = MANIFEST_SETS[manifests]
    policy = _one(objects, "NetworkPolicy")["spec"]
    port = int(_env(_agent(_one(objects, "DaemonSet")))["EK_LISTEN"].rsplit(":", 1)[1])
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"], "no ingress rule: Prometheus could not scrape"
    for rule in policy["ingress"]:
        assert rule["ports"] == [{"port": port, "protocol": "TCP"}]
        assert rule["from"], "an ingress rule without peers would admit everyone"
        for peer in rule["from"]:
            # Issue 12: a pod label is set by whoever creates the pod; a namespace's labels by
            # cluster admins. Peers are namespaces (every pod in them) or CIDRs, never pods.
            assert "podSelector" not in peer, peer
            assert set(peer) in ({"namespaceSelector"}, {"ipBlock"}), peer
            if "namespaceSelector" in peer:
                assert peer["namespaceSelector"], "an empty selector admits every namespace"
    egress_ports = {(p["port"], p["protocol"]) for rule in policy["egress"]
                    for p in rule.get("ports", [])}
    assert {(53, "UDP"), (53, "TCP"), (443, "TCP")} <= egress_ports


def _policy_tcp_ports(objects: Objects) -> set[int]:
    """TCP ports the policy lets the agent reach on any destination."""
    return {
        int(p["port"])
        for rule in _one(objects, "NetworkPolicy")["spec"]["egress"] if "to" not in rule
        for p in rule["ports"] if p["protocol"] == "TCP"
    }


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"sink_probes": "otel=collector:4317", "s3_endpoint_url": "http://minio.minio:9000"},
        {"sink_probes": "a=http://web.example,b=https://x.example:8443/health,c=dns:dd.example,"
                        "d=[2001:db8::1]:6514,e=HTTPS://Y.example/"},
        {"s3_endpoint_url": "https://storage.example"},
    ],
)
def test_network_policy_egress_is_derived_from_the_configuration(config: dict[str, Any]) -> None:
    """Every port the agent will connect to (by its own parse of the settings) is open."""
    objects = _render({"networkPolicy": {"enabled": True}, "config": config})
    agent_env = {k: v for k, v in _env(_agent(_one(objects, "DaemonSet"))).items()
                 if isinstance(v, str)}
    settings = load_settings(None, environ={**agent_env, "NODE_NAME": "node-a"})
    needed = {443, 6443} | {p.port for p in settings.sink_probes if p.port is not None}
    if settings.s3_endpoint_url:
        url = urlsplit(settings.s3_endpoint_url)
        needed.add(url.port or (80 if url.scheme == "http" else 443))
    assert _policy_tcp_ports(objects) == needed | {53}  # and DNS over TCP
    # The credential endpoints: EKS Pod Identity and IMDS, port 80, nowhere else.
    (creds,) = [r for r in _one(objects, "NetworkPolicy")["spec"]["egress"] if "to" in r]
    assert {peer["ipBlock"]["cidr"] for peer in creds["to"]} == {
        "169.254.170.23/32", "fd00:ec2::23/128", "169.254.169.254/32"}
    assert creds["ports"] == [{"port": 80, "protocol": "TCP"}]


def test_network_policy_ingress_is_configurable() -> None:
    values = {"networkPolicy": {"enabled": True, "ingress": {
        "namespaceSelectors": [{"matchLabels": {"team": "sre"}}],
        "fromReleaseNamespace": False, "ipBlocks": ["10.0.0.0/28"]}}}
    (rule,) = _one(_render(values), "NetworkPolicy")["spec"]["ingress"]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"team": "sre"}}},
                            {"ipBlock": {"cidr": "10.0.0.0/28"}}]
    # The defaults: Prometheus's namespace and the release's own (the helm test pod).
    (rule,) = _one(_render({"networkPolicy": {"enabled": True}}), "NetworkPolicy")["spec"][
        "ingress"]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}},
    ]
    # The schema refuses a pod selector among the namespace selectors.
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema({"networkPolicy": {"enabled": True, "ingress": {
            "namespaceSelectors": [{"podSelector": {"matchLabels": {"x": "y"}}}]}}})


def test_security_contexts_merge_over_the_computed_ones() -> None:
    values = {
        "podSecurityContext": {"seLinuxOptions": {"type": "spc_t"}, "runAsUser": 10001},
        "securityContext": {"appArmorProfile": {"type": "RuntimeDefault"},
                            "capabilities": {"drop": ["ALL"], "add": ["DAC_READ_SEARCH"]},
                            # An explicit false wins too.
                            "readOnlyRootFilesystem": False},
    }
    pod = _one(_render(values), "DaemonSet")["spec"]["template"]["spec"]
    computed = _one(_render(), "DaemonSet")["spec"]["template"]["spec"]
    assert pod["securityContext"] == {**computed["securityContext"], **values[
        "podSecurityContext"]}
    agent_sc = _agent({"spec": {"template": {"spec": pod}}})["securityContext"]
    computed_sc = _agent({"spec": {"template": {"spec": computed}}})["securityContext"]
    assert agent_sc == {**computed_sc, **values["securityContext"]}


def test_resource_quota_admits_the_priority_class() -> None:
    objects = _render({"resourceQuota": {"enabled": True}, "priorityClassName": "x-critical"})
    quota = _one(objects, "ResourceQuota")["spec"]
    assert quota["scopeSelector"]["matchExpressions"] == [
        {"scopeName": "PriorityClass", "operator": "In", "values": ["x-critical"]}]
    assert int(quota["hard"]["pods"]) > 0
    # Without a priority class there is nothing to admit.
    assert "ResourceQuota" not in _kinds(_render({"resourceQuota": {"enabled": True},
                                                  "priorityClassName": ""}))


def test_prometheus_rule_disable_labels_and_job_selector() -> None:
    base = _one(_render({"prometheusRule": {"enabled": True, "force": True}}), "PrometheusRule")
    values = {"prometheusRule": {
        "enabled": True, "force": True, "disabled": {"EvidenceKeeperSinkFlapping": True,
                                                     "EvidenceKeeperSinkDown": False},
        "additionalRuleLabels": {"team": "sre", "severity": "ignored"},
        "jobSelector": 'job="ek"'}}
    rule = _one(_render(values), "PrometheusRule")

    def alerts(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {r["alert"]: r for g in obj["spec"]["groups"] for r in g["rules"]}

    before, after = alerts(base), alerts(rule)
    assert set(before) - set(after) == {"EvidenceKeeperSinkFlapping"}
    for name, r in after.items():
        assert r["labels"] == {**before[name]["labels"], "team": "sre"}, name  # own labels win
        assert 'job=~".*evidence-keeper.*"' not in r["expr"], name
    assert 'up{job="ek"}' in after["EvidenceKeeperAgentDown"]["expr"]


def test_irsa_hook(kustomize_base: Objects, chart_full: Objects) -> None:
    assert "annotations" not in _one(kustomize_base, "ServiceAccount")["metadata"]
    assert "annotations" not in _one(_render(), "ServiceAccount")["metadata"]
    annotations = _one(chart_full, "ServiceAccount")["metadata"]["annotations"]
    assert annotations["eks.amazonaws.com/role-arn"] == (
        "arn:aws:iam::111122223333:role/evidence-keeper"
    )
    assert _env(_agent(_one(chart_full, "DaemonSet")))["AWS_REGION"] == "eu-west-1"


# --------------------------------------------------------------------------------------------
# Configuration the manifests hand to the agent


@pytest.mark.parametrize("manifests", MANIFEST_SETS)
def test_every_ek_variable_is_a_setting(manifests: str) -> None:
    for obj in MANIFEST_SETS[manifests]:
        if obj["kind"] != "DaemonSet":
            continue
        for container in _containers(obj["spec"]["template"]["spec"]):
            for name in _env(container):
                if name.startswith("EK_"):
                    key = name.removeprefix("EK_").lower()
                    assert key in SETTINGS_KEYS, f"{manifests}: {name} is not a setting"
                    assert name == "EK_" + key.upper()


@pytest.mark.parametrize("manifests", MANIFEST_SETS)
def test_agent_accepts_the_configuration(manifests: str) -> None:
    """The agent's own parser loads the environment each DaemonSet gives it."""
    agent = _agent(_one(MANIFEST_SETS[manifests], "DaemonSet"))
    environ = {k: v for k, v in _env(agent).items() if isinstance(v, str)}
    environ["NODE_NAME"] = "node-a"
    settings = load_settings(None, environ=environ)
    assert settings.node_name == "node-a"
    assert str(settings.log_root) == environ["EK_LOG_ROOT"]
    assert str(settings.spool_dir) == environ["EK_SPOOL_DIR"]
    assert settings.archive_token_file is not None


# --------------------------------------------------------------------------------------------
# Chart and kustomize base agree


def _comparable_pod_spec(ds: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = ds["spec"]["template"]["spec"]
    return spec


def test_chart_and_kustomize_agree(chart_default: Objects, kustomize_base: Objects) -> None:
    chart_ds = _one(chart_default, "DaemonSet")
    base_ds = _one(kustomize_base, "DaemonSet")
    # The whole pod spec: security contexts, mounts, volumes, env, probes, resources...
    assert _comparable_pod_spec(chart_ds) == _comparable_pod_spec(base_ds)
    assert chart_ds["spec"]["selector"] == base_ds["spec"]["selector"]
    assert chart_ds["spec"]["updateStrategy"] == base_ds["spec"]["updateStrategy"]
    for kind in ("ClusterRole",):
        assert _one(chart_default, kind)["rules"] == _one(kustomize_base, kind)["rules"]
    for kind in ("ClusterRoleBinding",):
        chart_obj, base_obj = _one(chart_default, kind), _one(kustomize_base, kind)
        assert chart_obj["roleRef"] == base_obj["roleRef"]
        assert chart_obj["subjects"] == base_obj["subjects"]
    assert _one(chart_default, "Service")["spec"] == _one(kustomize_base, "Service")["spec"]
    chart_sa = _one(chart_default, "ServiceAccount")
    base_sa = _one(kustomize_base, "ServiceAccount")
    assert chart_sa["automountServiceAccountToken"] == base_sa["automountServiceAccountToken"]


def test_chart_toggles_and_kustomize_components_agree() -> None:
    chart = MANIFEST_SETS["chart-all-on"]
    components = MANIFEST_SETS["kustomize-components"]
    for kind in ("ServiceMonitor", "NetworkPolicy", "PrometheusRule", "ResourceQuota"):
        assert _one(chart, kind)["spec"] == _one(components, kind)["spec"], kind
    chart_cm, base_cm = _one(chart, "ConfigMap"), _one(components, "ConfigMap")
    assert chart_cm["data"] == base_cm["data"]
    for cm in (chart_cm, base_cm):
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        json.loads(cm["data"]["evidence-keeper.json"])


def test_namespace_admits_host_paths(kustomize_base: Objects) -> None:
    labels = _one(kustomize_base, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (for `kubectl kustomize`) is not installed"
)
@pytest.mark.parametrize("components", [(), COMPONENTS])
def test_kubectl_kustomize_builds_the_same_objects(
    tmp_path: Path, components: tuple[str, ...]
) -> None:
    # An overlay as an operator writes one: the base plus components (relative paths: kustomize
    # refuses absolute ones).
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    rel = os.path.relpath(KUSTOMIZE, overlay)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [rel], "components": [f"{rel}/components/{c}" for c in components],
    }), encoding="utf-8")
    proc = subprocess.run(
        ["kubectl", "kustomize", str(overlay)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr

    def key(obj: dict[str, Any]) -> tuple[str, str]:
        return obj["kind"], obj["metadata"]["name"]

    built = sorted((d for d in yaml.safe_load_all(proc.stdout) if d), key=key)
    assert built == sorted(_kustomize_base(*components), key=key)


# --------------------------------------------------------------------------------------------
# helm test


def test_helm_test_pod_runs_preflight_against_the_agents() -> None:
    objects = _render(hooks=True)
    (pod,) = [o for o in objects if o["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    command = container["command"]
    assert command[:2] == ["python3", "-c"] and "preflight" in command[2]
    service = _one(objects, "Service")
    assert command[3] == f"{service['metadata']['name']}.{NAMESPACE}.svc"
    assert int(command[4]) == service["spec"]["ports"][0]["port"]
    assert container["image"] == _agent(_one(objects, "DaemonSet"))["image"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    kubernetes_validate.validate(pod, KUBERNETES_VERSIONS[-1], strict=True)
    assert "Pod" not in _kinds(_render({"helmTest": {"enabled": False}}, hooks=True))


def _preflight_script() -> list[str]:
    (pod,) = [o for o in _render(hooks=True) if o["kind"] == "Pod"]
    command: list[str] = pod["spec"]["containers"][0]["command"]
    return command


def test_helm_test_script_against_a_real_agent(
    make_settings: Any, tmp_path: Path
) -> None:
    """The pod's own script, run here: it finds the agent by name and runs preflight on it."""
    command = _preflight_script()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with AgentThread(make_settings()) as agent:
        host, port = agent.agent.api_address or ("", 0)
        proc = subprocess.run([sys.executable, "-c", command[2], "localhost", str(port)],
                              capture_output=True, text=True, timeout=120, env=env, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"preflight http://{host}:{port}: ok" in proc.stdout
    # No agent behind the name: one clear line, exit 1.
    proc = subprocess.run([sys.executable, "-c", command[2], "no-such-service.invalid", "9095"],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("preflight: no ready agent behind no-such-service")


# --------------------------------------------------------------------------------------------
# Generated files are current


def test_chart_readme_is_current() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "helm" / "readme.py"), "--check"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_files_are_current() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "dashboards" / "build.py"), "--check"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_model() -> None:
    """Grafana's JSON model: unique ids, a 24-column grid, every query on the datasource
    variable, every panel of the metrics the issue lists (main's and the new ones)."""
    model = json.loads((ROOT / "dashboards" / "evidence-keeper.json").read_text(encoding="utf-8"))
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    for panel in model["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat", "state-timeline"}, panel["type"]
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
    exprs = " ".join(t["expr"] for p in model["panels"] for t in p.get("targets", []))
    for metric in ("captured_bytes_total", "shipped_bytes_total", "oldest_unshipped_age_seconds",
                   "spool_bytes", "sink_up", "open_gaps", "lost_bytes_total",
                   "previous_logs_total", "container_restarts_total", "task_restarts_total",
                   "open_files", "build_info", "skipped_files_total"):
        assert f"evidence_keeper_{metric}" in exprs, metric
    assert {v["name"] for v in model["templating"]["list"]} == {"datasource", "node"}


def test_alert_manifests_are_current() -> None:
    assert load_build().stale() == []


# --------------------------------------------------------------------------------------------
# The image recipe and the dependency lock


def test_image_recipe() -> None:
    """What `make image` promises, in the recipe itself (`make image-test` runs the image)."""
    text = (ROOT / "image" / "build.sh").read_text(encoding="utf-8")
    assert "--require-hashes" in text and "pipdl -r requirements.lock" in text
    assert "--require-hashes -r /tmp/wheels/requirements.lock" in text
    assert "--storage-driver vfs" in text and "--isolation chroot" in text
    assert "mmdebstrap" in text and "bookworm" in text
    assert re.search(r"--user 65532:65532", text)
    assert "oci-archive:" in text
    for label in ("title", "description", "version", "revision", "created", "source",
                  "licenses"):
        assert f"org.opencontainers.image.{label}=" in text, label
    assert not (ROOT / "Dockerfile").exists(), "one recipe: image/build.sh"


def test_locks_cover_pyproject() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "lockcheck.py")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    runtime = (ROOT / "requirements.lock").read_text(encoding="utf-8")
    boto3 = re.search(r"^boto3==(\d+)\.(\d+)\.(\d+)", runtime, re.M)
    assert boto3 and tuple(map(int, boto3.groups())) >= (1, 34, 41), "EKS Pod Identity"


def test_lockcheck_names_a_dependency_the_lock_lacks(tmp_path: Path) -> None:
    for name in ("pyproject.toml", "requirements.lock", "requirements-dev.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    pyproject = (tmp_path / "pyproject.toml").read_text(encoding="utf-8")
    (tmp_path / "pyproject.toml").write_text(
        pyproject.replace('"zstandard>=0.22",', '"zstandard>=0.22",\n  "lockcheck-canary>=1.7",'),
        encoding="utf-8")
    lockcheck = _load_module(ROOT / "tools" / "lockcheck.py")
    problems = lockcheck.check(tmp_path)
    assert problems == [
        "requirements.lock: lockcheck-canary is not pinned"
        " (pyproject.toml asks 'lockcheck-canary>=1.7')",
        "requirements-dev.lock: lockcheck-canary is not pinned"
        " (pyproject.toml asks 'lockcheck-canary>=1.7')"]


def _load_module(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_operations_guide_has_every_section_the_manifests_point_to() -> None:
    guide = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', guide))
    sources = [
        ROOT / "image" / "build.sh", *sorted(KUSTOMIZE.rglob("*.yaml")),
        *sorted(CHART.rglob("*.yaml")), CHART / "README.md",
        CHART / "templates" / "NOTES.txt", ROOT / "alerts" / "evidence-keeper.rules.yml",
    ]
    for path in sources:
        for anchor in re.findall(r"operations\.md#([a-z0-9-]+)", path.read_text(encoding="utf-8")):
            assert anchor in anchors, f"{path.relative_to(ROOT)} points to a missing #{anchor}"
    # Links inside the guide land too.
    for anchor in re.findall(r"\]\(#([a-z0-9-]+)\)", guide):
        assert anchor in anchors, f"docs/operations.md links to a missing #{anchor}"
