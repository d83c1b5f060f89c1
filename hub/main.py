"""Wiring: ``create_app(settings)`` builds the FastAPI app; its lifespan starts and stops the
database migrations, keys, embedded broker and MQTT side."""

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from urllib.parse import unquote, urlsplit

from fastapi import FastAPI
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from hub.auth.audit import AuditMiddleware
from hub.auth.router import router as auth_router
from hub.broker.passwords import BrokerUser, hash_password
from hub.broker.supervisor import EmbeddedBroker
from hub.commands.router import router as commands_router
from hub.context import HubContext
from hub.database import make_engine
from hub.deployments.router import router as deployments_router
from hub.devices import service as devices_service
from hub.devices.broker_auth import router as broker_auth_router
from hub.devices.router import enroll_router
from hub.devices.router import router as devices_router
from hub.errors import install_error_handler
from hub.messaging.client import BrokerAddress, MqttClient
from hub.messaging.publisher import Publisher
from hub.messaging.router import router as messaging_router
from hub.messaging.worker import MessageWorker
from hub.metrics.router import router as metrics_router
from hub.migrations.runner import upgrade
from hub.registry.router import router as registry_router
from hub.secretfiles import read_or_create_token
from hub.security.certs_router import router as certificates_router
from hub.security.listener import prepare_tls_listener
from hub.settings import HubSettings
from hub.signing.router import router as keys_router
from hub.telemetry.router import router as telemetry_router

logger = logging.getLogger(__name__)

SUBSCRIBE_WAIT_S = 10.0


def _embedded_broker_users(
    ctx: HubContext, broker: EmbeddedBroker, hub_hash: str
) -> list[BrokerUser]:
    with Session(ctx.engine) as session:
        devices = devices_service.broker_users(session=session)
    return [BrokerUser(broker.hub_username, hub_hash), *devices]


@contextlib.contextmanager
def _run_messaging(ctx: HubContext) -> Iterator[None]:
    """Start the embedded broker (unless a broker URL is set) and the hub's MQTT client."""
    settings = ctx.settings
    with contextlib.ExitStack() as stack:
        if settings.broker.url is None:
            broker = EmbeddedBroker(
                data_dir=settings.broker_dir,
                topic_root=settings.broker.topic_root,
                port=settings.broker.port,
            )
            if settings.broker.tls.enabled and ctx.device_ca is not None:
                broker.tls = prepare_tls_listener(settings, ctx.device_ca, bind=broker.host)
            password = read_or_create_token(settings.hub_broker_password_path, nbytes=24)
            hub_hash = hash_password(password)
            broker.start(_embedded_broker_users(ctx, broker, hub_hash))
            broker.hub_password = password  # for dropping a disabled device's connection
            stack.callback(broker.stop)
            ctx.broker = broker
            # The hub's own listener: client ids there stay the hub's (the device listener
            # replaces them with the user name, which would make replicas kick each other).
            address = BrokerAddress(
                host=broker.hub_host,
                port=broker.hub_port,
                username=broker.hub_username,
                password=password,
            )
            ctx.broker_public = (
                settings.broker.public_host or broker.host,
                settings.broker.public_port or broker.port,
            )

            def sync_users() -> None:
                broker.update_users(_embedded_broker_users(ctx, broker, hub_hash))

            ctx.on_credentials_changed = sync_users
        else:
            parts = urlsplit(settings.broker.url)
            address = BrokerAddress(
                host=parts.hostname or "127.0.0.1",
                port=parts.port or 1883,
                username=unquote(parts.username) if parts.username else None,
                password=unquote(parts.password) if parts.password else None,
            )
            ctx.broker_public = (
                settings.broker.public_host or address.host,
                settings.broker.public_port or address.port,
            )
        worker = MessageWorker(ctx)
        ctx.message_stats = worker.handlers.stats
        worker.start()
        stack.callback(worker.stop)
        client = MqttClient(address, topics=ctx.topics, on_message=worker.submit)
        client.start()
        stack.callback(client.stop)
        # Serving before the hub listens would drop the first devices' requests; a broker that
        # stays away is not fatal (the client keeps retrying) but worth a warning.
        if not client.wait_subscribed(SUBSCRIBE_WAIT_S):
            logger.warning("not yet subscribed to the broker", extra={"host": address.host})
        ctx.publisher = client
        worker.bind_publisher()
        yield


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    ctx: HubContext = app.state.hub
    settings = ctx.settings
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    await run_in_threadpool(upgrade, settings.resolved_database_url)
    ctx.keys.ensure(keyring_ttl_days=settings.signing.keyring_ttl_days)
    ctx.admin_token = read_or_create_token(settings.admin_token_path)
    with contextlib.ExitStack() as stack:
        if app.state.start_messaging:
            stack.enter_context(_run_messaging(ctx))
        logger.info("hub started", extra={"data_dir": str(settings.data_dir)})
        yield
    ctx.engine.dispose()
    logger.info("hub stopped")


def create_app(settings: HubSettings, *, publisher: Publisher | None = None) -> FastAPI:
    """The hub's app. With ``publisher`` given, no broker or MQTT client is started (tests)."""
    engine = make_engine(settings.resolved_database_url)
    ctx = HubContext.build(settings, engine)
    if publisher is not None:
        ctx.publisher = publisher
    app = FastAPI(title="Outpost hub", version="0.1.0", lifespan=_lifespan)
    app.state.hub = ctx
    app.state.start_messaging = publisher is None
    install_error_handler(app)
    # Every POST/PUT/PATCH/DELETE is recorded here, so no route can forget it.
    app.add_middleware(AuditMiddleware)
    app.include_router(registry_router)
    app.include_router(enroll_router)
    app.include_router(broker_auth_router)
    app.include_router(certificates_router)
    app.include_router(devices_router)
    app.include_router(commands_router)
    app.include_router(deployments_router)
    app.include_router(messaging_router)
    app.include_router(telemetry_router)
    app.include_router(metrics_router)
    app.include_router(auth_router)
    app.include_router(keys_router)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
