"""The validating admission webhook: today's spec validation, run by the apiserver before a job is stored.

``kubectl apply`` and ``--dry-run=server`` get the same refusal, with the same field and fix, that the
operator would otherwise write into the job's status as ``Failed/InvalidSpec`` after creating it: one function
(``spec.validate``, also ``dreambooth run`` and ``dreambooth validate``), now called earlier. An UPDATE is judged
only when the spec changes, so an existing job (created before the webhook, or under other chart limits) can
still be relabelled, suspended back or deleted; an edit of ``spec.training`` after acceptance is refused here too.

Served over TLS by the operator process from a certificate the kubelet mounts (the chart's Secret or
cert-manager's); the operator never reads Secrets through the API. The files are re-read when they change, so a
rotated certificate needs no restart.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from dreambooth_api.contract import BadInputError
from dreambooth_api.runtime import RUNTIME_KIND

from .spec import DEFAULT_MAX_NODES, SpecError, training_hash, validate, validate_runtime

log = logging.getLogger(__name__)

PATH = "/validate-dreamboothjob"
DEFAULT_PORT = 9443
CERT_FILE, KEY_FILE = "tls.crt", "tls.key"
_RELOAD_SECONDS = 60.0


@dataclass(frozen=True)
class Limits:
    max_nodes: int = DEFAULT_MAX_NODES
    allowed_powers: frozenset[str] = frozenset()


def review(request: dict[str, Any], limits: Limits) -> str | None:
    """The refusal of one AdmissionRequest ("field: message"), or None to admit it."""
    obj = request.get("object") or {}
    old = request.get("oldObject") or {}
    if (request.get("kind") or {}).get("kind") == RUNTIME_KIND:
        # A runtime's errors would otherwise surface in every job that uses it, at acceptance.
        if request.get("operation") == "UPDATE" and obj.get("spec") == old.get("spec"):
            return None
        try:
            validate_runtime(obj, limits.allowed_powers)
        except SpecError as exc:
            return str(exc)
        return None
    if request.get("operation") == "UPDATE":
        if obj.get("spec") == old.get("spec"):
            return None  # metadata, finalizers, deletion: never blocked by a spec the operator already judged
        accepted = (old.get("status") or {}).get("trainingHash")
        if accepted and accepted != training_hash(obj.get("spec") or {}):
            return (
                "spec.training: cannot change after the job was accepted (it would mix two trainings in one output); "
                "revert the edit, or create a new job for the new settings."
            )
    body = dict(obj)
    if request.get("namespace") and isinstance(body.get("metadata"), dict):
        body["metadata"] = {"namespace": request["namespace"], **body["metadata"]}
    try:
        validate(body, limits.max_nodes, limits.allowed_powers)
    except SpecError as exc:
        return str(exc)
    return None


def response(review_body: dict[str, Any], limits: Limits) -> dict[str, Any]:
    request = review_body.get("request") or {}
    denial = review(request, limits)
    result: dict[str, Any] = {"uid": request.get("uid", ""), "allowed": denial is None}
    if denial is not None:
        result["status"] = {"code": 422, "message": denial}
    return {"apiVersion": review_body.get("apiVersion", "admission.k8s.io/v1"), "kind": "AdmissionReview",
            "response": result}  # fmt: skip


def make_app(limits: Limits) -> web.Application:
    async def handle(req: web.Request) -> web.Response:
        try:
            body = await req.json()
        except ValueError:
            return web.json_response({"error": "expected an AdmissionReview JSON body"}, status=400)
        out = response(body, limits)
        if not out["response"]["allowed"]:
            log.info("refused %s %s/%s: %s", (body.get("request") or {}).get("operation"),
                     (body.get("request") or {}).get("namespace"), (body.get("request") or {}).get("name"),
                     out["response"]["status"]["message"])  # fmt: skip
        return web.json_response(out)

    app = web.Application(client_max_size=4 << 20)
    app.router.add_post(PATH, handle)
    return app


def tls_context(cert_dir: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert_dir / CERT_FILE, cert_dir / KEY_FILE)
    except (OSError, ssl.SSLError) as exc:
        raise BadInputError(
            f"DREAMBOOTH_WEBHOOK_CERT_DIR={cert_dir}: cannot load {CERT_FILE} and {KEY_FILE} ({exc}); mount the "
            "webhook's TLS Secret there (the chart does), or unset the variable to run without the webhook."
        ) from None
    return ctx


async def _reload(ctx: ssl.SSLContext, cert_dir: Path) -> None:
    def stamp() -> tuple[float, float]:
        return ((cert_dir / CERT_FILE).stat().st_mtime, (cert_dir / KEY_FILE).stat().st_mtime)

    seen = stamp()
    while True:
        await asyncio.sleep(_RELOAD_SECONDS)
        try:
            now = stamp()
            if now != seen:
                ctx.load_cert_chain(cert_dir / CERT_FILE, cert_dir / KEY_FILE)
                seen = now
                log.info("webhook certificate reloaded from %s", cert_dir)
        except (OSError, ssl.SSLError) as exc:  # mid-rotation: keep the old one, try again next round
            log.warning("webhook certificate not reloaded: %s", exc)


async def serve(limits: Limits, cert_dir: Path, port: int = DEFAULT_PORT, host: str = "0.0.0.0") -> web.AppRunner:
    """Start the HTTPS server; stop it with ``runner.cleanup()``."""
    ctx = tls_context(cert_dir)
    app = make_app(limits)

    async def reloader(_: web.Application) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(_reload(ctx, cert_dir))
        yield
        task.cancel()

    app.cleanup_ctx.append(reloader)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=ctx).start()
    log.info("admission webhook on :%d%s (certificate from %s)", port, PATH, cert_dir)
    return runner
