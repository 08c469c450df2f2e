"""``python -m llamaherd_operator``: run the operator (kopf underneath).

Settings come from ``LLAMAHERD_OPERATOR_*`` environment variables
(:class:`llamaherd_operator.settings.OperatorSettings`); the Kubernetes connection from
``$KUBECONFIG``, ``~/.kube/config`` or the pod's service account.

One replica, no peering. The operator runs as a single-replica Deployment with the ``Recreate``
strategy, so two instances never run at once, and kopf runs ``standalone`` (no peering
objects, no extra CRD or RBAC for them). Every handler is idempotent and the state that matters
lives in the API server (kopf's progress in annotations, the status on the objects), so a
restarted operator picks up where the last one stopped; kopf's peering would only pause a
second operator, not share work, so it buys nothing over Recreate here.
"""

from __future__ import annotations

import logging
import socket

import kopf

from llamaherd_operator import autoscaler, handlers
from llamaherd_operator.settings import OperatorSettings


def configure_logging(settings: OperatorSettings) -> None:
    kopf.configure(
        debug=settings.log_level == "debug",
        log_format=kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL,
        log_refkey="object" if settings.log_format == "json" else None,
        log_prefix=settings.log_format == "text",  # "[namespace/name]" before object messages
    )
    logging.getLogger().setLevel(settings.log_level.upper())
    if settings.log_level != "debug":
        # One line per HTTP request or liveness probe, or per pod event handled, is noise.
        for name in ("httpx", "httpx2", "httpcore", "aiohttp.access"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("kopf.objects").addFilter(_drop_routine_successes)


def _drop_routine_successes(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (message.startswith("Handler '") and "-changed' succeeded" in message)


def main() -> None:
    settings = OperatorSettings()
    configure_logging(settings)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, settings)
    autoscaler.register(registry, settings)
    logging.getLogger("llamaherd_operator").info(
        "starting: %s, liveness %s",
        "cluster-wide" if settings.clusterwide else f"namespaces {settings.namespace_list}",
        settings.liveness_endpoint or "off",
    )
    kopf.run(
        registry=registry,
        clusterwide=settings.clusterwide,
        namespaces=settings.namespace_list,
        standalone=True,
        liveness_endpoint=settings.liveness_endpoint,
        # kopf would otherwise name itself after the process's user, and an arbitrary uid (the
        # chart's runAsUser, OpenShift's ranges) has no passwd entry: getpwuid() fails at start.
        # (kopf's Identity, a NewType of str, is not exported.)
        identity=f"llamaherd-operator@{socket.gethostname()}",  # type: ignore[arg-type]
    )


if __name__ == "__main__":
    main()
