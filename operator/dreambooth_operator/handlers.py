"""kopf wiring, deliberately thin: watch events only name the job to reconcile.

Only ``on.event`` handlers (plus login/startup/cleanup activities) are registered: change-detecting handlers
would write kopf's progress and diff-base into every object, and daemons/timers/``on.delete`` make kopf add a
finalizer that blocks deletion once the operator is gone. Cleanup is the garbage collector's job
(ownerReferences); periodic reconciles come from the controller's own timers.
"""

from __future__ import annotations

from typing import Any

import kopf

from dreambooth_api.manifest import API_GROUP, API_VERSION, PLURAL

from .controller import Controller
from .resources import LABEL_JOB_UID, LABEL_MANAGED_BY, MANAGER


def configure(settings: kopf.OperatorSettings, workers: int = 8) -> None:
    # Our Events come from the reconciler; kopf's would post one per log line of every handler call.
    settings.posting.enabled = False
    settings.peering.standalone = True
    # Re-open watches every few minutes so a silently dead stream heals without a restart.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    # Never used by on.event handlers; annotations keep kopf away from the status schema should that change.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=f"kopf.{API_GROUP}")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=f"kopf.{API_GROUP}")
    settings.execution.max_workers = max(1, workers)


def register(registry: kopf.OperatorRegistry, controller: Controller, workers: int = 8) -> None:
    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings, workers)
        await controller.start()

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await controller.stop()

    @kopf.on.event(API_GROUP, API_VERSION, PLURAL, registry=registry)
    async def job_event(event: kopf.RawEvent, meta: kopf.Meta, **_: Any) -> None:
        controller.job_event(str(meta.namespace), str(meta.name), str(meta.uid), deleted=event.get("type") == "DELETED",
                             resource_version=meta.get("resourceVersion"), body=event.get("object"))  # fmt: skip

    @kopf.on.event("", "v1", "pods", labels={LABEL_MANAGED_BY: MANAGER, LABEL_JOB_UID: kopf.PRESENT}, registry=registry)
    async def pod_event(event: kopf.RawEvent, meta: kopf.Meta, **_: Any) -> None:
        controller.pod_event(str(meta.namespace), list(meta.get("ownerReferences") or []), body=event.get("object"),
                             deleted=event.get("type") == "DELETED")  # fmt: skip
