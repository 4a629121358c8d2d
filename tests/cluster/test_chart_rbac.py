"""The Helm chart's RBAC is enough for the operator and no more, on a real apiserver.

The chart's ServiceAccount and RBAC (rendered by helm, applied as they are) get a token minted through the
TokenRequest API; the operator runs with only that token through a whole job — a crashed first attempt (gang torn
down, pods deleted, Events), a second attempt that succeeds, then deletion by ttlSecondsAfterFinished — once with
the cluster-wide ClusterRole (default values) and once with a Role in the job's namespace (watchNamespaces).
Any RBAC denial in the operator's log fails the test. Reading a Secret with the same token is denied.

Lives in the cluster tier (it shares that tier's cluster); it is a packaging test too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_harness import ApiError, Cluster, wait_until
from operator_support import Jobs, OperatorProcess, fake_job

pytestmark = [pytest.mark.cluster, pytest.mark.packaging]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "dreambooth-operator"
RELEASE = "dbo"
SA_NAME = "dbo-dreambooth-operator"  # <release>-<chart>, the chart's default full name


def render_rbac(cluster: Cluster, namespace: str, *values: str) -> list[dict[str, Any]]:
    proc = cluster.helm("template", RELEASE, str(CHART), "--namespace", namespace,
                        "--show-only", "templates/serviceaccount.yaml", "--show-only", "templates/rbac.yaml",
                        *values)  # fmt: skip
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _can_i(cluster: Cluster, kubeconfig: Path, *args: str) -> str:
    return cluster.kubectl("auth", "can-i", *args, kubeconfig=kubeconfig, check=False).stdout.strip()


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_chart_rbac_runs_a_whole_job_and_denies_secrets(
    mode: str, cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    op_ns = cluster.ensure_namespace()
    # The operator's own RBAC only: the users' aggregated roles have a test of their own below.
    values = ["--set", "rbac.aggregateToDefaultRoles=false"]
    if mode == "namespaced":
        values += ["--set", f"watchNamespaces={{{namespace}}}"]
    docs = render_rbac(cluster, op_ns, *values)
    kinds = sorted(d["kind"] for d in docs)
    if mode == "cluster-wide":
        assert kinds == ["ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding", "ServiceAccount"]
    else:
        assert kinds == ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"]
    cluster.apply(docs)
    try:
        kubeconfig = cluster.as_service_account(op_ns, SA_NAME, create=False)

        # Outside the grant: Secrets, in the job's namespace and the operator's own.
        cluster.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3", "namespace": namespace},
                       "stringData": {"AWS_SECRET_ACCESS_KEY": "hunter2"}})  # fmt: skip
        sa_api = cluster.client_for(kubeconfig)
        for path in (f"/api/v1/namespaces/{namespace}/secrets/s3", f"/api/v1/namespaces/{namespace}/secrets",
                     f"/api/v1/namespaces/{op_ns}/secrets"):  # fmt: skip
            with pytest.raises(ApiError) as denied:
                sa_api.get(path)
            assert denied.value.status == 403, path
        assert _can_i(cluster, kubeconfig, "get", "secrets", "-n", namespace) == "no"
        assert _can_i(cluster, kubeconfig, "create", "pods", "-n", namespace) == "yes"
        # Used only for pods on a lost node (not provoked here): granted cluster-wide, read-only.
        assert _can_i(cluster, kubeconfig, "get", "nodes") == "yes"
        assert _can_i(cluster, kubeconfig, "delete", "nodes") == "no"
        other = "kube-system"
        assert _can_i(cluster, kubeconfig, "create", "pods", "-n", other) == ("yes" if mode == "cluster-wide" else "no")

        # The operator with nothing but that token, watching every namespace or only the job's.
        env = {
            "KUBECONFIG": str(kubeconfig),
            "DREAMBOOTH_OPERATOR_NAMESPACES": "" if mode == "cluster-wide" else namespace,
        }
        op = OperatorProcess(cluster, namespace, tmp_path, **env).start()
        try:
            jobs = Jobs(cluster, namespace, op)
            job = fake_job("rbac", nodes=2, seconds=4, env={"FAKE_CODE_A1": "70"},
                           run_policy={"backoffLimit": 2, "ttlSecondsAfterFinished": 3})  # fmt: skip
            jobs.create(job)
            st = jobs.wait_phase("rbac", "Succeeded", 150)
            assert st["attempt"] == 2 and st["restarts"] == 1, jobs.explain("rbac", "expected one crash, then success")
            reasons = [e["reason"] for e in jobs.events("rbac")]
            assert "TrainerCrashed" in reasons and "Completed" in reasons, reasons
            # ttlSecondsAfterFinished — the operator deletes the job itself (delete on dreamboothjobs).
            try:
                wait_until(lambda: jobs.get("rbac") is None, 60, 0.5, "job deleted by its TTL")
            except TimeoutError:
                raise AssertionError(
                    jobs.explain("rbac", "the job was not deleted after ttlSecondsAfterFinished")
                ) from None
            assert cluster.kube_api.get(f"/api/v1/namespaces/{namespace}/secrets/s3")["metadata"]["name"] == "s3"
        finally:
            op.stop()
        log = op.log_path.read_text(errors="replace")
        # What the RBAC authorizer says ('User "system:serviceaccount:..." cannot create resource "pods"'), not
        # any 403: another test's namespace being deleted also answers 403 to a cluster-wide operator.
        denial = re.compile(r'cannot [a-z]+ resource "')
        forbidden = [line for line in log.splitlines() if denial.search(line)]
        assert not forbidden, "the operator hit RBAC denials:\n" + "\n".join(forbidden[:20])
    finally:
        for d in docs:
            if d["kind"] in ("ClusterRole", "ClusterRoleBinding"):
                cluster.kubectl("delete", d["kind"].lower(), d["metadata"]["name"], "--ignore-not-found", check=False)
        cluster.kubectl("delete", "namespace", op_ns, "--wait=false", check=False)


def test_helm_install_dry_run_against_the_apiserver_prints_the_notes(cluster: Cluster) -> None:
    """`helm install --dry-run=server` renders NOTES.txt (which `helm template` never does) against this cluster."""
    ns = cluster.ensure_namespace()
    try:
        proc = cluster.helm("install", RELEASE, str(CHART), "--namespace", ns, "--dry-run=server", check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        notes = proc.stdout.split("NOTES:", 1)[1]
        assert f"kubectl -n {ns} rollout status deployment/{SA_NAME}" in notes
        assert "kubectl apply -f dog-lora.yaml" in notes and "kubectl apply -f crds/" in notes
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_namespace_editors_run_jobs_and_viewers_read_them(cluster: Cluster, namespace: str) -> None:
    """The chart's aggregated ClusterRoles reach the built-in edit and view roles (the controller-manager's
    aggregation): a RoleBinding to `edit` in a namespace is all a user needs to run DreamBoothJobs there."""
    op_ns = cluster.ensure_namespace()
    docs = [d for d in render_rbac(cluster, op_ns) if d["metadata"]["name"].endswith(("-edit", "-view"))]
    assert sorted(d["metadata"]["name"] for d in docs) == [f"{SA_NAME}-edit", f"{SA_NAME}-view"]
    users = {"editor": "edit", "viewer": "view"}
    bindings = [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": f"{user}-{role}", "namespace": namespace},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
         "subjects": [{"kind": "ServiceAccount", "name": user, "namespace": namespace}]}
        for user, role in users.items()
    ]  # fmt: skip
    cluster.apply(docs)
    try:
        cluster.apply(bindings)
        editor = cluster.as_service_account(namespace, "editor")
        viewer = cluster.as_service_account(namespace, "viewer")
        dbj = "dreamboothjobs.dreambooth.dev"
        # Aggregation is asynchronous: the controller-manager copies the rules into edit/view.
        wait_until(lambda: _can_i(cluster, editor, "create", dbj, "-n", namespace) == "yes", 60, 0.5,
                   "edit aggregates the chart's rules")  # fmt: skip
        wait_until(lambda: _can_i(cluster, viewer, "list", dbj, "-n", namespace) == "yes", 60, 0.5,
                   "view aggregates the chart's rules")  # fmt: skip
        for verb in ("get", "list", "watch", "update", "patch", "delete"):
            assert _can_i(cluster, editor, verb, dbj, "-n", namespace) == "yes", verb
        assert _can_i(cluster, editor, "patch", dbj, "--subresource=status", "-n", namespace) == "no"
        for verb in ("create", "delete", "patch"):
            assert _can_i(cluster, viewer, verb, dbj, "-n", namespace) == "no", verb
        assert _can_i(cluster, viewer, "get", dbj, "--subresource=status", "-n", namespace) == "yes"
        # Only where the binding is.
        assert _can_i(cluster, editor, "create", dbj, "-n", op_ns) == "no"
    finally:
        for d in docs:
            cluster.kubectl("delete", "clusterrole", d["metadata"]["name"], "--ignore-not-found", check=False)
        cluster.kubectl("delete", "namespace", op_ns, "--wait=false", check=False)
