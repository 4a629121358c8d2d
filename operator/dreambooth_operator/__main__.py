"""`python -m dreambooth_operator` (and `dreambooth operator`): run the operator with settings from env/flags."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace

from dreambooth_api.contract import BadInputError
from dreambooth_api.logformat import LogFormat, json_handler, log_format

from .powers import ENV as POWERS_ENV
from .powers import parse_allow

log = logging.getLogger("dreambooth_operator")


@dataclass(frozen=True)
class Settings:
    namespaces: tuple[str, ...] = ()  # empty = every namespace
    log_level: str = "INFO"
    metrics_port: int = 8080
    workers: int = 32
    resync_seconds: float = 10.0
    backoff_base_seconds: int = 10
    cluster_domain: str = "cluster.local"
    max_nodes: int = 256
    image_pull_timeout_seconds: int = 300
    allowed_powers: frozenset[str] = frozenset()
    log_format: LogFormat = "text"
    # The admission webhook is served when a certificate directory is given (the chart mounts one).
    webhook_cert_dir: str = ""
    webhook_port: int = 9443
    # The built-in default trainer image (chart operator.defaultTrainerImage); "" = the release's.
    default_image: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        namespaces = tuple(n.strip() for n in env.get("DREAMBOOTH_OPERATOR_NAMESPACES", "").split(",") if n.strip())
        return cls(
            namespaces=namespaces,
            log_level=env.get("LOG_LEVEL", "INFO").upper(),
            metrics_port=int(env.get("METRICS_PORT", "8080")),
            workers=int(env.get("DREAMBOOTH_OPERATOR_WORKERS", "32")),
            resync_seconds=float(env.get("DREAMBOOTH_OPERATOR_RESYNC_SECONDS", "10")),
            backoff_base_seconds=int(env.get("DREAMBOOTH_BACKOFF_BASE_SECONDS", "10")),
            cluster_domain=env.get("DREAMBOOTH_CLUSTER_DOMAIN", "cluster.local"),
            max_nodes=int(env.get("DREAMBOOTH_MAX_NODES", "256")),
            image_pull_timeout_seconds=int(env.get("DREAMBOOTH_IMAGE_PULL_TIMEOUT_SECONDS", "300")),
            allowed_powers=parse_allow(env.get(POWERS_ENV, "")),
            log_format=log_format(env),
            webhook_cert_dir=env.get("DREAMBOOTH_WEBHOOK_CERT_DIR", ""),
            webhook_port=int(env.get("DREAMBOOTH_WEBHOOK_PORT", "9443")),
            default_image=env.get("DREAMBOOTH_DEFAULT_TRAINER_IMAGE", "").strip(),
        )


def parse_args(argv: list[str] | None, env: Mapping[str, str] = os.environ) -> Settings:
    base = Settings.from_env(env)
    parser = argparse.ArgumentParser(
        prog="dreambooth operator",
        description="Run the DreamBoothJob operator. Flags override the environment (DREAMBOOTH_OPERATOR_NAMESPACES, "
        "LOG_LEVEL, METRICS_PORT, DREAMBOOTH_OPERATOR_WORKERS, DREAMBOOTH_OPERATOR_RESYNC_SECONDS, "
        "DREAMBOOTH_BACKOFF_BASE_SECONDS, DREAMBOOTH_CLUSTER_DOMAIN, DREAMBOOTH_MAX_NODES, "
        "DREAMBOOTH_IMAGE_PULL_TIMEOUT_SECONDS, DREAMBOOTH_POD_POWERS, LOG_FORMAT, "
        "DREAMBOOTH_WEBHOOK_CERT_DIR, DREAMBOOTH_WEBHOOK_PORT, DREAMBOOTH_DEFAULT_TRAINER_IMAGE).",
    )
    parser.add_argument("-n", "--namespace", action="append", dest="namespaces",
                        help="watch this namespace (repeatable); default: all namespaces")  # fmt: skip
    parser.add_argument("--metrics-port", type=int, default=base.metrics_port, help="port of /healthz and /metrics")
    parser.add_argument("--log-level", default=base.log_level)
    parser.add_argument("--workers", type=int, default=base.workers, help="concurrent reconciles")
    parser.add_argument("--resync-seconds", type=float, default=base.resync_seconds)
    args = parser.parse_args(argv)
    # replace(): a setting with no flag keeps the environment's value (naming each field here once dropped the
    # chart's operator.defaultTrainerImage on the floor).
    return replace(
        base,
        namespaces=tuple(args.namespaces) if args.namespaces else base.namespaces,
        log_level=str(args.log_level).upper(),
        metrics_port=args.metrics_port,
        workers=args.workers,
        resync_seconds=args.resync_seconds,
    )


async def serve(settings: Settings) -> None:
    import kopf

    from . import handlers
    from .cache import Informer
    from .controller import Controller
    from .kube import Kube
    from .metrics import Metrics, make_app
    from .metrics import serve as serve_metrics
    from .plan import PlanOptions
    from .reconciler import Reconciler
    from .resources import BuildOptions

    metrics = Metrics()
    # Each worker may fan a plan's creates out to the shared pool: enough threads (and pooled connections, or
    # urllib3 drops the extras and every burst pays new TLS handshakes) for most workers to do so at once.
    io_threads = 2 * settings.workers
    kube = Kube.from_environment(on_request=metrics.api_request, connections=settings.workers + io_threads + 4)
    opts = PlanOptions(
        BuildOptions(cluster_domain=settings.cluster_domain, log_format=settings.log_format),
        settings.backoff_base_seconds,
        settings.max_nodes,
        image_pull_timeout_seconds=settings.image_pull_timeout_seconds,
        allowed_powers=settings.allowed_powers,
        default_image=settings.default_image,
    )
    cache = Informer()
    reconciler = Reconciler(kube, opts, metrics=metrics, background_events=True, cache=cache, io_threads=io_threads)
    controller = Controller(reconciler, metrics, workers=settings.workers, resync_seconds=settings.resync_seconds,
                            cache=cache)  # fmt: skip
    registry = kopf.OperatorRegistry()
    handlers.register(registry, controller, settings.workers)
    runner = await serve_metrics(make_app(metrics, controller.heartbeat.check), settings.metrics_port)
    log.info("watching %s; /healthz and /metrics on :%d",
             ", ".join(settings.namespaces) or "all namespaces", settings.metrics_port)  # fmt: skip
    hook = None
    if settings.webhook_cert_dir:
        from pathlib import Path

        from . import webhook

        limits = webhook.Limits(settings.max_nodes, settings.allowed_powers)
        hook = await webhook.serve(limits, Path(settings.webhook_cert_dir), settings.webhook_port)
    try:
        await kopf.operator(
            registry=registry,
            standalone=True,
            clusterwide=not settings.namespaces,
            namespaces=list(settings.namespaces),
        )
    finally:
        if hook is not None:
            await hook.cleanup()
        await runner.cleanup()


def run_operator(argv: list[str] | None = None) -> int:
    """Entry point of `dreambooth operator` and `python -m dreambooth_operator`."""
    try:
        settings = parse_args(argv)
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if settings.log_format == "json":
        logging.basicConfig(level=settings.log_level, handlers=[json_handler({"component": "operator"})])
        logging.captureWarnings(True)  # every line JSON, Python warnings included
    else:
        logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kopf logs every event at DEBUG/INFO; keep its chatter a level below ours.
    logging.getLogger("kopf").setLevel(max(logging.getLevelName(settings.log_level), logging.INFO))
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(settings))
    except BadInputError as exc:  # a setting only found wrong at start-up (the webhook's certificate)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_operator(argv)


if __name__ == "__main__":
    raise SystemExit(run_operator())
