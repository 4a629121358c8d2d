"""Host and privilege powers a DreamBoothJob may give its pods: one allow-list, set by the cluster admin.

Creating a DreamBoothJob must not be a way around what creating a Pod would need: whoever may create jobs in a
namespace gets pods run by the operator's ServiceAccount, so a job that asks for host access is refused unless
the chart's ``operator.podPowers.allow`` lists that power (the operator reads it from ``DREAMBOOTH_POD_POWERS``).
The namespace's Pod Security Admission still judges every pod the operator creates, as for any workload
controller; this list is the operator's own, earlier and clearer, refusal.

``find_powers`` reads pod-spec-shaped fields (``volumes``, ``hostNetwork``, ``containers[].securityContext`` ...)
under the names a PodSpec gives them, and the pod ``annotations`` a podTemplate carries (confinement profiles), so a podTemplate field passed through to the pod later (the platform-fit
issue's passthrough fields) is judged by the same list just by carrying its PodSpec name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

ENV = "DREAMBOOTH_POD_POWERS"
CHART_VALUE = "operator.podPowers.allow"

# power -> what it grants, for the refusal message and docs/install.md.
POWERS: dict[str, str] = {
    "hostPath": "a node's filesystem",
    "hostNetwork": "the node's network namespace",
    "hostPID": "the node's process namespace",
    "hostIPC": "the node's IPC namespace",
    "privileged": "a privileged container (every device, no confinement)",
    "capabilities": "added Linux capabilities",
    "unconfined": "no AppArmor or seccomp confinement (an 'unconfined' profile annotation)",
}

# Pod annotations that choose a confinement profile (kubelets of 1.20-1.29 still honour them): the value
# "unconfined" switches AppArmor or seccomp off for a container or the whole pod.
_PROFILE_ANNOTATIONS = (
    "container.apparmor.security.beta.kubernetes.io/",
    "seccomp.security.alpha.kubernetes.io/pod",
    "container.seccomp.security.alpha.kubernetes.io/",
)


def parse_allow(text: str) -> frozenset[str]:
    """The allow-list from its env form ("hostPath,hostNetwork"); an unknown name is an error naming the rest."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in POWERS]
    if unknown:
        raise ValueError(f"{ENV} ({CHART_VALUE}): unknown power {unknown[0]!r}; known: {', '.join(POWERS)}.")
    return frozenset(names)


def _containers(spec: Mapping[str, Any], prefix: str) -> Iterable[tuple[str, Mapping[str, Any]]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for i, c in enumerate(spec.get(key) or []):
            if isinstance(c, Mapping):
                yield f"{prefix}{key}[{i}]", c
    # A podTemplate-level container securityContext (applied to the trainer container) reads the same.
    yield prefix.rstrip("."), spec


def find_powers(spec: Mapping[str, Any], prefix: str) -> list[tuple[str, str]]:
    """Every power the pod-spec-shaped ``spec`` asks for, as (power, field path under ``prefix``), in field order."""
    found: list[tuple[str, str]] = []
    for i, vol in enumerate(spec.get("volumes") or []):
        if isinstance(vol, Mapping) and "hostPath" in vol:
            found.append(("hostPath", f"{prefix}volumes[{i}].hostPath"))
    for key, value in (spec.get("annotations") or {}).items():
        if str(key).startswith(_PROFILE_ANNOTATIONS) and str(value).strip().lower() == "unconfined":
            found.append(("unconfined", f'{prefix}annotations["{key}"]'))
    for power in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(power):
            found.append((power, f"{prefix}{power}"))
    for path, container in _containers(spec, prefix):
        sc = container.get("securityContext")
        if not isinstance(sc, Mapping):
            continue
        if sc.get("privileged"):
            found.append(("privileged", f"{path}.securityContext.privileged"))
        caps = sc.get("capabilities")
        if isinstance(caps, Mapping) and caps.get("add"):
            found.append(("capabilities", f"{path}.securityContext.capabilities.add"))
    return found


def refusal(power: str) -> str:
    """The message of a refused power: what it grants and the two ways out."""
    instead = " (read data from s3:// or a persistentVolumeClaim instead)" if power == "hostPath" else ""
    return (
        f"gives the pods {POWERS[power]}, which this operator does not allow; remove it{instead}, or ask the "
        f"cluster admin to add {power} to the chart value {CHART_VALUE} (the namespace's Pod Security Admission "
        "still applies)."
    )
