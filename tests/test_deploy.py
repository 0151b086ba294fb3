"""Deployment manifests, validated offline: the Helm chart and the kustomize base.

- the chart renders (helm-python-sdk, no helm binary, no cluster) with its defaults and with a
  values file that moves every knob (``helm/evidence-keeper/ci/full-values.yaml``), and its lint
  reports no error and no warning;
- every rendered object and every object of the kustomize base validates strictly against the
  Kubernetes OpenAPI schemas of pinned versions (``kubernetes-validate``); ServiceMonitor and
  PrometheusRule, custom resources without a schema there, are allow-listed and checked by hand
  (and by promtool in tests/test_alerts.py);
- the invariants the operations guide promises hold in each: kubelet's log tree mounted
  read-only, non-root, no capabilities, read-only root file system, seccomp RuntimeDefault, the
  downward-API NODE_NAME, a grace period longer than the drain deadline, a ClusterRole with
  get/list/watch pods and get pods/log and nothing else;
- chart (defaults) and kustomize base agree on all of that, field for field;
- every EK_* variable is a real setting, and the agent's own settings parser accepts the
  configuration each manifest gives it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import ValidationError as SchemaValidationError

from evidence_keeper.settings import SETTINGS_KEYS, Settings, load_settings, parse_duration

ROOT = Path(__file__).resolve().parent.parent
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


def _render(values: dict[str, Any] | None = None) -> Objects:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    return [
        doc
        for path, text in sorted(rendered.items())
        if path.endswith((".yaml", ".yml"))
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def _full_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(FULL_VALUES.read_text(encoding="utf-8"))
    return values


def _kustomize_base() -> Objects:
    kustomization = yaml.safe_load((KUSTOMIZE / "kustomization.yaml").read_text(encoding="utf-8"))
    # A plain base: resources only, so that the files are exactly what gets applied.
    assert set(kustomization) == {"apiVersion", "kind", "resources"}, kustomization.keys()
    objects: Objects = []
    for name in kustomization["resources"]:
        text = (KUSTOMIZE / name).read_text(encoding="utf-8")
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


@pytest.fixture(scope="module")
def chart_default() -> Objects:
    return _render()


@pytest.fixture(scope="module")
def chart_full() -> Objects:
    return _render(_full_values())


@pytest.fixture(scope="module")
def kustomize_base() -> Objects:
    return _kustomize_base()


def _manifest_sets() -> Iterator[tuple[str, Objects]]:
    yield "kustomize", _kustomize_base()
    yield "chart-default", _render()
    yield "chart-full", _render(_full_values())
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
    expected = {
        "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet", "Service",
        "ServiceMonitor", "PrometheusRule", "NetworkPolicy",
    }
    assert _kinds(chart_default) == expected
    assert _kinds(chart_full) == expected
    for obj in chart_default + chart_full:
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["kind"]


def test_kustomize_base_has_the_same_resources(kustomize_base: Objects) -> None:
    assert _kinds(kustomize_base) == _kinds(_render()) | {"Namespace"}
    names = {o["metadata"]["name"] for o in kustomize_base}
    assert names == {"evidence-keeper"}
    for obj in kustomize_base:
        if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["kind"]


@pytest.mark.parametrize(
    ("toggle", "kind"),
    [
        ("serviceMonitor", "ServiceMonitor"),
        ("prometheusRule", "PrometheusRule"),
        ("networkPolicy", "NetworkPolicy"),
    ],
)
def test_optional_resources_are_toggled_by_values(toggle: str, kind: str) -> None:
    objects = _render({toggle: {"enabled": False}})
    assert kind not in _kinds(objects)
    assert "DaemonSet" in _kinds(objects)


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


@pytest.mark.parametrize("manifests", MANIFEST_SETS)
def test_network_policy_opens_only_the_api_port(manifests: str) -> None:
    objects = MANIFEST_SETS[manifests]
    policy = _one(objects, "NetworkPolicy")["spec"]
    port = int(_env(_agent(_one(objects, "DaemonSet")))["EK_LISTEN"].rsplit(":", 1)[1])
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    for rule in policy["ingress"]:
        assert rule["ports"] == [{"port": port, "protocol": "TCP"}]
        assert rule["from"], "an ingress rule without peers would admit everyone"
    egress_ports = {(p["port"], p["protocol"]) for p in policy["egress"][0]["ports"]}
    assert {(53, "UDP"), (53, "TCP"), (443, "TCP")} <= egress_ports


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
    for kind in ("Service", "ServiceMonitor", "NetworkPolicy", "PrometheusRule"):
        assert _one(chart_default, kind)["spec"] == _one(kustomize_base, kind)["spec"], kind
    chart_sa = _one(chart_default, "ServiceAccount")
    base_sa = _one(kustomize_base, "ServiceAccount")
    assert chart_sa["automountServiceAccountToken"] == base_sa["automountServiceAccountToken"]


def test_namespace_admits_host_paths(kustomize_base: Objects) -> None:
    labels = _one(kustomize_base, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (for `kubectl kustomize`) is not installed"
)
def test_kubectl_kustomize_builds_the_same_objects(kustomize_base: Objects) -> None:
    proc = subprocess.run(
        ["kubectl", "kustomize", str(KUSTOMIZE)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr

    def key(obj: dict[str, Any]) -> tuple[str, str]:
        return obj["kind"], obj["metadata"]["name"]

    built = sorted((d for d in yaml.safe_load_all(proc.stdout) if d), key=key)
    assert built == sorted(kustomize_base, key=key)


# --------------------------------------------------------------------------------------------
# The image


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base, "the base image is an ARG with a pinned default"
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base[1]), base[1]
    stages = re.findall(r"^FROM (\S+) AS (\w+)$", text, re.M)
    assert stages == [("${PYTHON_IMAGE}", "build"), ("${PYTHON_IMAGE}", "runtime")]
    build_stage, runtime_stage = text.split("AS runtime", 1)
    assert "pip wheel" in build_stage and "--no-index" in build_stage
    assert "COPY --from=build" in runtime_stage
    user = re.findall(r"^USER (\d+)(?::(\d+))?$", runtime_stage, re.M)
    assert user and int(user[-1][0]) > 0, "the runtime stage must end as a non-root uid"
    assert re.search(r'^ENTRYPOINT \["evidence-keeper"\]$', text, re.M)
    assert re.search(r'^CMD \["run"\]$', text, re.M)
    for label in ("title", "description", "version", "revision", "created", "source",
                  "licenses"):
        assert f"org.opencontainers.image.{label}=" in text, label
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # An allow-list: nothing but the wheel's sources enters the build context.
    assert ignore[:4] == ["*", "!pyproject.toml", "!README.md", "!evidence_keeper/"]


def test_operations_guide_has_every_section_the_manifests_point_to() -> None:
    guide = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', guide))
    sources = [
        ROOT / "Dockerfile", *sorted(KUSTOMIZE.glob("*.yaml")), *sorted(CHART.rglob("*.yaml")),
        CHART / "templates" / "NOTES.txt", ROOT / "alerts" / "evidence-keeper.rules.yml",
    ]
    for path in sources:
        for anchor in re.findall(r"operations\.md#([a-z0-9-]+)", path.read_text(encoding="utf-8")):
            assert anchor in anchors, f"{path.relative_to(ROOT)} points to a missing #{anchor}"
    # Links inside the guide land too.
    for anchor in re.findall(r"\]\(#([a-z0-9-]+)\)", guide):
        assert anchor in anchors, f"docs/operations.md links to a missing #{anchor}"
