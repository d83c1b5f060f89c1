"""``GET /metrics``: the Prometheus text exposition, behind the admin token (a scrape config
passes it with ``authorization: {credentials_file: ...}``)."""

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from hub.dependencies import AdminDep, ContextDep
from hub.metrics.collector import FleetCollector

router = APIRouter(tags=["metrics"], dependencies=[AdminDep])


@router.get("/metrics", response_class=Response)
def metrics(ctx: ContextDep) -> Response:
    # A registry per scrape: the collector reads everything fresh, and nothing is global to
    # the process (tests run several hubs side by side).
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        FleetCollector(
            ctx.engine,
            lambda: ctx.message_stats,
            window_s=ctx.settings.telemetry.metrics_window_s,
        )
    )
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
