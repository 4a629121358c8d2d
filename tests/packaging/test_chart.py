"""The Helm chart: lint, render with default and non-default values, validate what it renders against the
Kubernetes 1.29 and 1.34 schemas, refuse wrong values, and keep the CRD and RBAC honest."""

from __future__ import annotations

import base64
import filecmp
import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pkg_support import CHART, KUBE_VERSIONS, REPO, Helm, by_kind, one

from dreambooth_operator import webhook
from dreambooth_operator.__main__ import Settings

pytestmark = pytest.mark.packaging

# Every value set to something other than its default.
CUSTOM_VALUES: dict[str, Any] = {
    "image": {"repository": "registry.example.com/ml/dreambooth-operator", "tag": "9.9.9",
              "digest": "sha256:" + "ab" * 32, "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "fullnameOverride": "dbo",
    "watchNamespaces": ["team-a", "team-b"],
    "serviceAccount": {"create": True, "name": "dbo-sa",
                       "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}},
    "operator": {"logLevel": "DEBUG", "workers": 3, "resyncSeconds": 5, "backoffBaseSeconds": 20,
                 "clusterDomain": "corp.internal", "metricsPort": 9090,
                 "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}]},
    "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"cpu": 1, "memory": "1Gi"}},
    "livenessProbe": {"initialDelaySeconds": 5, "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 6},
    "podAnnotations": {"example.com/team": "ml"},
    "podLabels": {"team": "ml"},
    "nodeSelector": {"kubernetes.io/os": "linux", "node-role.example.com/system": "true"},
    "tolerations": [{"key": "CriticalAddonsOnly", "operator": "Exists"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
    "priorityClassName": "system-cluster-critical",
    "rbac": {"create": True, "aggregateToDefaultRoles": False},
    "crds": {"asTemplates": True, "keep": False},
    "metrics": {"service": {"enabled": True, "type": "NodePort", "port": 9090},
                "serviceMonitor": {"enabled": True, "interval": "15s", "scrapeTimeout": "5s",
                                   "labels": {"release": "kube-prometheus-stack"}}},
    "webhook": {"enabled": True, "failurePolicy": "Fail", "timeoutSeconds": 10, "port": 8443,
                "namespaceSelector": {"matchLabels": {"dreambooth.dev/validate": "true"}}, "certValidityDays": 365,
                "certManager": {"enabled": False, "issuerRef": {}}},
}  # fmt: skip
WEBHOOK_CERT_DIR = "/etc/dreambooth-operator/webhook-tls"


@pytest.fixture(scope="module")
def custom_values(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("values") / "custom.yaml"
    path.write_text(yaml.safe_dump(CUSTOM_VALUES))
    return path


@pytest.fixture(scope="module")
def default_docs(chart: Helm) -> list[dict[str, Any]]:
    return chart.template()


@pytest.fixture(scope="module")
def custom_docs(chart: Helm, custom_values: Path) -> list[dict[str, Any]]:
    return chart.template("-f", str(custom_values), namespace="ml-platform")


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def metrics_service(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (svc,) = [d for d in by_kind(docs, "Service") if d["metadata"]["name"].endswith("-metrics")]
    return svc


def env_of(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(docs)["env"] if "value" in e}


def test_helm_lint_strict(chart: Helm, custom_values: Path) -> None:
    chart.run("lint", "--strict", str(CHART))
    chart.run("lint", "--strict", str(CHART), "-f", str(custom_values))


def test_values_yaml_satisfies_its_own_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)
    jsonschema.validate(CUSTOM_VALUES, schema)


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("which", ["default", "custom"])
def test_rendered_objects_pass_kubernetes_validate_strict(
    which: str, version: str, request: pytest.FixtureRequest
) -> None:
    docs = request.getfixturevalue(f"{which}_docs")
    kinds = sorted({d["kind"] for d in docs})
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            continue  # a Prometheus Operator CRD: no schema in kubernetes-validate; checked below
        kubernetes_validate.validate(doc, version, strict=True)
    expected = {"ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"}
    assert expected <= set(kinds)


def test_crd_passes_kubernetes_validate_strict() -> None:
    for path in (CHART / "crds").glob("*.yaml"):
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(yaml.safe_load(path.read_text()), version, strict=True)


def test_helm_show_crds_pipes_every_crd_to_kubectl_apply(chart: Helm) -> None:
    """The upgrade step `helm show crds ... | kubectl apply -f -` (install.md): helm concatenates the files as
    they are, so each must open its own YAML document or two CRDs read as one (the last one's keys win)."""
    docs = [d for d in yaml.safe_load_all(chart.run("show", "crds", str(CHART)).stdout) if d]
    names = sorted(d["metadata"]["name"] for d in docs)
    assert names == sorted(yaml.safe_load(p.read_text())["metadata"]["name"] for p in (CHART / "crds").glob("*.yaml"))
    assert len(names) == 2


def test_chart_crds_equal_the_generated_crds() -> None:
    """The chart ships a copy of crds/ (Helm reads only the chart folder); the root crds/ is generated by
    `dreambooth crd`. Fix a failure with: cp crds/*.yaml charts/dreambooth-operator/crds/"""
    root = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    ours = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert ours == root
    _, mismatch, errors = filecmp.cmpfiles(REPO / "crds", CHART / "crds", root, shallow=False)
    assert not mismatch and not errors, f"chart CRD differs from crds/: {mismatch or errors}"


def test_default_deployment(default_docs: list[dict[str, Any]]) -> None:
    dep = one(default_docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = container(default_docs)
    chart_meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    assert c["image"] == f"ghcr.io/dreambooth-operator/operator:{chart_meta['appVersion']}"
    # Liveness hits /healthz on the port the operator listens on (METRICS_PORT).
    port = next(p for p in c["ports"] if p["name"] == c["livenessProbe"]["httpGet"]["port"])
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert port["containerPort"] == int(env_of(default_docs)["METRICS_PORT"]) == Settings().metrics_port
    # Pod Security "restricted", read-only root with a writable /tmp.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    (tmp,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert pod["serviceAccountName"] == one(default_docs, "ServiceAccount")["metadata"]["name"]
    assert not by_kind(default_docs, "ServiceMonitor") and not by_kind(default_docs, "Role")


def test_environment_reaches_the_operator_settings(
    default_docs: list[dict[str, Any]], custom_docs: list[dict[str, Any]]
) -> None:
    """The env the chart sets is read by the operator's own Settings.from_env as the values say."""
    assert Settings.from_env(env_of(default_docs)) == Settings(webhook_cert_dir=WEBHOOK_CERT_DIR)
    got = Settings.from_env(env_of(custom_docs))
    assert got == Settings(namespaces=("team-a", "team-b"), log_level="DEBUG", metrics_port=9090, workers=3,
                           resync_seconds=5.0, backoff_base_seconds=20, cluster_domain="corp.internal",
                           webhook_cert_dir=WEBHOOK_CERT_DIR, webhook_port=8443)  # fmt: skip
    assert env_of(custom_docs)["HTTPS_PROXY"] == "http://proxy:3128"


def test_custom_values_are_applied(custom_docs: list[dict[str, Any]]) -> None:
    dep = one(custom_docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = container(custom_docs)
    assert dep["metadata"] == {**dep["metadata"], "name": "dbo", "namespace": "ml-platform"}
    assert c["image"] == "registry.example.com/ml/dreambooth-operator@sha256:" + "ab" * 32  # digest wins over tag
    assert c["imagePullPolicy"] == "Always" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert pod[key] == CUSTOM_VALUES[key]
    assert c["resources"] == CUSTOM_VALUES["resources"]
    assert c["livenessProbe"]["periodSeconds"] == 10 and c["livenessProbe"]["failureThreshold"] == 6
    assert dep["spec"]["template"]["metadata"]["annotations"] == CUSTOM_VALUES["podAnnotations"]
    assert dep["spec"]["template"]["metadata"]["labels"]["team"] == "ml"
    sa = one(custom_docs, "ServiceAccount")
    assert sa["metadata"]["name"] == pod["serviceAccountName"] == "dbo-sa"
    assert sa["metadata"]["annotations"] == CUSTOM_VALUES["serviceAccount"]["annotations"]
    svc = metrics_service(custom_docs)
    assert svc["spec"]["type"] == "NodePort" and svc["spec"]["ports"][0]["port"] == 9090


def test_metrics_service_and_servicemonitor_select_the_operator(custom_docs: list[dict[str, Any]]) -> None:
    dep = one(custom_docs, "Deployment")
    svc = metrics_service(custom_docs)
    sm = one(custom_docs, "ServiceMonitor")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] in [p["name"] for p in container(custom_docs)["ports"]]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["ml-platform"]}
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


# ------------------------------------------------------------------------------------------------------ RBAC


def rules(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{d['kind']}/{d['metadata'].get('namespace', '')}/{d['metadata']['name']}", r)
            for d in docs if d["kind"] in ("ClusterRole", "Role") for r in d["rules"]]  # fmt: skip


@pytest.mark.parametrize("which", ["default", "custom"])
def test_rbac_has_nothing_on_secrets_and_no_wildcards(which: str, request: pytest.FixtureRequest) -> None:
    docs = request.getfixturevalue(f"{which}_docs")
    for where, rule in rules(docs):
        assert "secrets" not in rule["resources"], where
        assert "*" not in rule["resources"] + rule["verbs"] + rule["apiGroups"], where
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), where


def _grants(docs: list[dict[str, Any]], kind: str) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for d in by_kind(docs, kind):
        for r in d["rules"]:
            for group in r["apiGroups"]:
                for res in r["resources"]:
                    out.setdefault((group, res), set()).update(r["verbs"])
    return out


JOB_RULES = {
    ("dreambooth.dev", "dreamboothjobs"): {"get", "list", "watch", "delete"},
    ("dreambooth.dev", "dreamboothjobs/status"): {"get", "patch"},
    ("dreambooth.dev", "dreamboothjobs/finalizers"): {"update"},
    ("", "pods"): {"list", "watch", "create", "patch", "delete"},
    ("", "services"): {"create"},
    ("", "configmaps"): {"get", "create"},
    ("", "events"): {"create"},
}
CLUSTER_RULES = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    ("", "nodes"): {"get"},
    # Cluster-scoped: a job's DreamBoothRuntime, read when the job is accepted (list: the default one).
    ("dreambooth.dev", "dreamboothruntimes"): {"get", "list"},
}


def operator_roles(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The (Cluster)Roles bound to the operator's ServiceAccount."""
    bound = {b["roleRef"]["name"] for b in docs if b["kind"] in ("ClusterRoleBinding", "RoleBinding")}
    return [d for d in docs if d["kind"] in ("ClusterRole", "Role") and d["metadata"]["name"] in bound]


def test_cluster_wide_rbac(default_docs: list[dict[str, Any]]) -> None:
    assert _grants(operator_roles(default_docs), "ClusterRole") == {**JOB_RULES, **CLUSTER_RULES}
    assert not by_kind(default_docs, "Role") and not by_kind(default_docs, "RoleBinding")
    sa = one(default_docs, "ServiceAccount")["metadata"]
    roles = {d["metadata"]["name"] for d in operator_roles(default_docs)}
    for b in by_kind(default_docs, "ClusterRoleBinding"):
        assert b["roleRef"]["name"] in roles
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]


def test_per_namespace_rbac(custom_docs: list[dict[str, Any]]) -> None:
    # Namespaced mode: kopf also lists/watches namespaces; job rules only inside the listed namespaces.
    assert _grants(custom_docs, "ClusterRole") == {**CLUSTER_RULES, ("", "namespaces"): {"list", "watch"}}
    roles = by_kind(custom_docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert _grants([role], "Role") == JOB_RULES
    bindings = by_kind(custom_docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "dbo-sa", "namespace": "ml-platform"}]


AGGREGATED = {
    "edit": {("dreambooth.dev", "dreamboothjobs"): {"get", "list", "watch", "create", "update", "patch", "delete",
                                                    "deletecollection"},
             ("dreambooth.dev", "dreamboothjobs/status"): {"get", "list", "watch"}},
    # view (and so edit and admin, which aggregate it) may read the platform's runtimes; writing them is the
    # platform team's, through a ClusterRole of its own.
    "view": {("dreambooth.dev", "dreamboothjobs"): {"get", "list", "watch"},
             ("dreambooth.dev", "dreamboothjobs/status"): {"get", "list", "watch"},
             ("dreambooth.dev", "dreamboothruntimes"): {"get", "list", "watch"}},
}  # fmt: skip


def test_namespace_users_get_dreamboothjobs_through_aggregated_roles(
    default_docs: list[dict[str, Any]], custom_docs: list[dict[str, Any]]
) -> None:
    """edit (and admin) may run jobs, view may read them; nothing bound to anyone, nothing for the operator."""
    ours = {d["metadata"]["name"] for d in operator_roles(default_docs)}
    users = {d["metadata"]["name"].rsplit("-", 1)[1]: d for d in by_kind(default_docs, "ClusterRole")
             if d["metadata"]["name"] not in ours}  # fmt: skip
    assert set(users) == {"edit", "view"}
    labels = {k: v for k, v in users["edit"]["metadata"]["labels"].items() if k.startswith("rbac.")}
    assert labels == {"rbac.authorization.k8s.io/aggregate-to-admin": "true",
                      "rbac.authorization.k8s.io/aggregate-to-edit": "true"}  # fmt: skip
    assert users["view"]["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    for name, grants in AGGREGATED.items():
        assert _grants([users[name]], "ClusterRole") == grants
    assert by_kind(custom_docs, "ClusterRole") == by_kind(operator_roles(custom_docs), "ClusterRole")  # switched off


def test_crds_as_templates(chart: Helm, default_docs: list[dict[str, Any]], custom_docs: list[dict[str, Any]]) -> None:
    """Off by default (Helm's crds/); on, the same CRD as a release object, kept on uninstall unless keep=false."""
    assert not by_kind(default_docs, "CustomResourceDefinition")
    rendered = chart.template("--set", "crds.asTemplates=true")
    for plural in ("dreamboothjobs", "dreamboothruntimes"):
        generated = yaml.safe_load((REPO / "crds" / f"dreambooth.dev_{plural}.yaml").read_text())
        name = f"{plural}.dreambooth.dev"
        (kept,) = [d for d in by_kind(rendered, "CustomResourceDefinition") if d["metadata"]["name"] == name]
        assert kept["spec"] == generated["spec"], "the template must not change the CRD (numbers stay numbers)"
        assert kept["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert kept["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        (unkept,) = [d for d in by_kind(custom_docs, "CustomResourceDefinition") if d["metadata"]["name"] == name]
        assert (
            unkept["spec"] == generated["spec"] and "helm.sh/resource-policy" not in unkept["metadata"]["annotations"]
        )


def test_a_default_runtime_from_values(chart: Helm, default_docs: list[dict[str, Any]]) -> None:
    """defaultRuntime ships one cluster-scoped DreamBoothRuntime, marked default, that the operator accepts."""
    from dreambooth_operator.spec import validate_runtime

    assert not by_kind(default_docs, "DreamBoothRuntime")
    docs = chart.template("--set", "defaultRuntime.create=true",
                          "--set", "defaultRuntime.spec.runPolicy.queueName=team-a",
                          "--set", "defaultRuntime.spec.resources.image=registry.example/trainer:0.2.0",
                          "--set", "operator.defaultTrainerImage=registry.example/trainer:0.2.0")  # fmt: skip
    runtime = one(docs, "DreamBoothRuntime")
    assert runtime["metadata"]["name"] == "default" and "namespace" not in runtime["metadata"]
    assert runtime["metadata"]["annotations"] == {"dreambooth.dev/default-runtime": "true"}
    assert runtime["spec"] == {"runPolicy": {"queueName": "team-a"},
                               "resources": {"image": "registry.example/trainer:0.2.0"}}  # fmt: skip
    assert validate_runtime(runtime) == "default"
    env = {
        e["name"]: e.get("value") for e in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["DREAMBOOTH_DEFAULT_TRAINER_IMAGE"] == "registry.example/trainer:0.2.0"
    webhook = one(docs, "ValidatingWebhookConfiguration")["webhooks"][0]
    assert {"resources": ["dreamboothruntimes"], "scope": "Cluster"}.items() <= webhook["rules"][1].items()


def test_rbac_and_service_account_can_be_left_out(chart: Helm) -> None:
    docs = chart.template("--set", "rbac.create=false", "--set", "rbac.aggregateToDefaultRoles=false",
                          "--set", "serviceAccount.create=false",
                          "--set", "serviceAccount.name=existing", "--set", "metrics.service.enabled=false",
                          "--set", "webhook.enabled=false")  # fmt: skip
    assert {d["kind"] for d in docs} == {"Deployment"}
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "existing"


# -------------------------------------------------------------------------------------------- wrong values


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "replicas=2"], "additional properties 'replicas' not allowed"),
        (["--set", "operator.metricsPort=80"], "/operator/metricsPort"),
        (["--set", "operator.workers=0"], "/operator/workers"),
        (["--set", "operator.logLevel=LOUD"], "/operator/logLevel"),
        (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
        (["--set", "image.digest=latest"], "/image/digest"),
        (["--set", "watchNamespaces={Team_A}"], "/watchNamespaces/0"),
        (["--set", "watchNamespaces=team-a"], "/watchNamespaces"),
        (["--set", "resources.requests.memory=lots"], "/resources/requests/memory"),
        (["--set", "metrics.serviceMonitor.interval=often"], "/metrics/serviceMonitor/interval"),
        (["--set-string", "rbac.create=yes"], "/rbac/create"),
        (["--set", "nodeSelector.disk=1"], "/nodeSelector/disk"),
        (["--set", "webhook.failurePolicy=Retry"], "/webhook/failurePolicy"),
        (["--set", "webhook.timeoutSeconds=60"], "/webhook/timeoutSeconds"),
    ],
    ids=lambda v: v if isinstance(v, str) else v[-1],
)
def test_wrong_values_are_refused_with_a_message(chart: Helm, args: list[str], message: str) -> None:
    proc = chart.run("template", "x", str(CHART), *args, check=False)
    assert proc.returncode != 0, f"helm accepted {args}"
    assert message in proc.stderr, proc.stderr


def test_servicemonitor_without_service_is_refused(chart: Helm) -> None:
    proc = chart.run("template", "x", str(CHART), "--set", "metrics.serviceMonitor.enabled=true",
                     "--set", "metrics.service.enabled=false", check=False)  # fmt: skip
    assert proc.returncode != 0 and "needs metrics.service.enabled" in proc.stderr


def test_notes_say_how_to_run_the_first_job() -> None:
    # `helm template` does not render NOTES.txt; the cluster tier renders it for real (helm install --dry-run).
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    for needle in ("apply -f dog-lora.yaml", "examples/dog-lora.yaml", "get dbj -w", "kubectl apply -f crds/"):
        assert needle in notes
    for example in ("examples/s3-secret-minio.yaml", "examples/irsa-service-account.yaml", "examples/dog-lora.yaml"):
        assert (REPO / example).exists(), example


# ---------------------------------------------------------------------------------------------- webhook


def _sans(pem: bytes, tmp_path: Path) -> str:
    path = tmp_path / "cert.pem"
    path.write_bytes(pem)
    out = subprocess.run(["openssl", "x509", "-in", str(path), "-noout", "-ext", "subjectAltName"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return out


@pytest.mark.parametrize("which", ["default", "custom"])
def test_webhook_certificate_service_and_configuration_fit_together(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The apiserver calls <service>.<namespace>.svc:443/validate-dreamboothjob, trusts the caBundle, and lands on
    the container port the operator serves the webhook on, with the certificate the Secret mounts."""
    docs = request.getfixturevalue(f"{which}_docs")
    namespace = one(docs, "Deployment")["metadata"]["namespace"]
    (vwc,) = one(docs, "ValidatingWebhookConfiguration")["webhooks"]
    secret = one(docs, "Secret")
    (svc,) = [d for d in by_kind(docs, "Service") if d["metadata"]["name"].endswith("-webhook")]
    ref = vwc["clientConfig"]["service"]
    assert (ref["name"], ref["namespace"], ref["path"], ref["port"]) == (
        svc["metadata"]["name"],
        namespace,
        webhook.PATH,
        svc["spec"]["ports"][0]["port"],
    )
    c = container(docs)
    (port,) = [p for p in c["ports"] if p["name"] == svc["spec"]["ports"][0]["targetPort"]]
    assert port["containerPort"] == int(env_of(docs)["DREAMBOOTH_WEBHOOK_PORT"])
    assert vwc["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    sans = _sans(base64.b64decode(secret["data"]["tls.crt"]), tmp_path)
    assert f"DNS:{ref['name']}.{namespace}.svc" in sans
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == env_of(docs)["DREAMBOOTH_WEBHOOK_CERT_DIR"]]
    (vol,) = [v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert vol["secret"]["secretName"] == secret["metadata"]["name"]
    assert {i["path"] for i in vol["secret"]["items"]} == {webhook.CERT_FILE, webhook.KEY_FILE}
    assert vwc["sideEffects"] == "None" and vwc["admissionReviewVersions"] == ["v1"]
    assert (
        vwc["rules"][0]["resources"] == ["dreamboothjobs"]
        and "dreamboothjobs/status" not in vwc["rules"][0]["resources"]
    )
    if which == "default":
        assert vwc["failurePolicy"] == "Ignore" and "namespaceSelector" not in vwc
    else:
        assert vwc["failurePolicy"] == "Fail" and vwc["timeoutSeconds"] == 10
        assert vwc["namespaceSelector"] == {"matchLabels": {"dreambooth.dev/validate": "true"}}


def test_webhook_with_cert_manager_and_without_webhook(chart: Helm) -> None:
    docs = chart.template("--set", "webhook.certManager.enabled=true")
    assert not by_kind(docs, "Secret")
    cert, issuer = one(docs, "Certificate"), one(docs, "Issuer")
    vwc = one(docs, "ValidatingWebhookConfiguration")
    assert "caBundle" not in vwc["webhooks"][0]["clientConfig"]
    ns = cert["metadata"]["namespace"]
    assert vwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{ns}/{cert['metadata']['name']}"
    svc = vwc["webhooks"][0]["clientConfig"]["service"]["name"]
    assert f"{svc}.{ns}.svc" in cert["spec"]["dnsNames"]
    assert cert["spec"]["issuerRef"]["name"] == issuer["metadata"]["name"]
    mounted = one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert cert["spec"]["secretName"] in [v.get("secret", {}).get("secretName") for v in mounted]
    own = chart.template("--set", "webhook.certManager.enabled=true",
                         "--set", "webhook.certManager.issuerRef.name=corp-ca",
                         "--set", "webhook.certManager.issuerRef.kind=ClusterIssuer")  # fmt: skip
    assert not by_kind(own, "Issuer") and one(own, "Certificate")["spec"]["issuerRef"]["kind"] == "ClusterIssuer"
    # With watchNamespaces, only those namespaces go through this release's webhook.
    (scoped,) = one(chart.template("--set", "watchNamespaces={team-a,team-b}"), "ValidatingWebhookConfiguration")[
        "webhooks"
    ]
    assert scoped["namespaceSelector"] == {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}]}  # fmt: skip
    off = chart.template("--set", "webhook.enabled=false")
    assert not by_kind(off, "ValidatingWebhookConfiguration") and not by_kind(off, "Secret")
    assert "DREAMBOOTH_WEBHOOK_CERT_DIR" not in env_of(off)
