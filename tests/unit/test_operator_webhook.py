"""The admission webhook's decisions (webhook.review): the operator's validation, on CREATE and on spec edits."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from test_operator_resources import job_body

from dreambooth_api.contract import BadInputError
from dreambooth_operator import webhook
from dreambooth_operator.spec import training_hash

pytestmark = pytest.mark.unit
LIMITS = webhook.Limits()


def request(obj: dict[str, Any], operation: str = "CREATE", old: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"uid": "u-1", "operation": operation, "namespace": "team", "object": obj, "oldObject": old}


def test_a_valid_job_is_admitted_and_a_bad_one_refused_naming_the_field() -> None:
    assert webhook.review(request(job_body()), LIMITS) is None
    bad = job_body({"podTemplate": {"nodeSelektor": {"gpu": "a100"}}})
    assert webhook.review(request(bad), LIMITS) == (
        "spec.podTemplate.nodeSelektor: is not a field here; did you mean spec.podTemplate.nodeSelector?"
    )
    out = webhook.response({"apiVersion": "admission.k8s.io/v1", "request": request(bad)}, LIMITS)
    assert out["response"]["uid"] == "u-1" and out["response"]["allowed"] is False
    assert out["response"]["status"]["message"].startswith("spec.podTemplate.nodeSelektor")


def test_the_charts_limits_apply() -> None:
    host = job_body({"podTemplate": {"volumes": [{"name": "h", "hostPath": {"path": "/data"}}]}})
    assert "operator.podPowers.allow" in (webhook.review(request(host), LIMITS) or "")
    assert webhook.review(request(host), webhook.Limits(allowed_powers=frozenset({"hostPath"}))) is None
    big = job_body({"resources": {"nodes": 9}})
    assert (webhook.review(request(big), webhook.Limits(max_nodes=8)) or "").startswith("spec.resources.nodes")


def accepted(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "status": {"trainingHash": training_hash(body["spec"])}}


def test_training_edits_after_acceptance_are_refused_other_edits_pass() -> None:
    old = accepted(job_body())
    edited = copy.deepcopy(old)
    edited["spec"]["training"]["maxTrainSteps"] = 80
    assert (webhook.review(request(edited, "UPDATE", old), LIMITS) or "").startswith("spec.training: cannot change")
    # Reverting an earlier edit (made before the webhook existed) is what the message asks for: admitted.
    assert webhook.review(request(old, "UPDATE", {**edited, "status": old["status"]}), LIMITS) is None
    suspended = copy.deepcopy(old)
    suspended["spec"]["runPolicy"] = {"suspend": True}
    assert webhook.review(request(suspended, "UPDATE", old), LIMITS) is None
    # Not yet accepted: a training edit is judged like a new job.
    assert webhook.review(request(edited, "UPDATE", job_body()), LIMITS) is None


def test_metadata_edits_of_a_job_that_is_already_invalid_are_not_blocked() -> None:
    invalid = job_body({"podTemplate": {"env": [{"name": "AWS_REGION", "value": "x"}]}})
    relabelled = copy.deepcopy(invalid)
    relabelled["metadata"]["labels"] = {"team": "ml"}
    assert webhook.review(request(relabelled, "UPDATE", invalid), LIMITS) is None
    assert webhook.review(request(invalid), LIMITS) is not None


def test_a_missing_certificate_names_the_variable_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="DREAMBOOTH_WEBHOOK_CERT_DIR=.*mount the webhook's TLS Secret"):
        webhook.tls_context(tmp_path)
