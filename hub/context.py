"""The long-lived parts of one running hub, built by ``create_app`` and kept on ``app.state``."""

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine

from agent.protocol.topics import Topics
from hub.blobs import BlobStore
from hub.broker.supervisor import EmbeddedBroker
from hub.deployments.engine import default_owner
from hub.messaging.publisher import Publisher, RecordingPublisher
from hub.security.ca import DeviceCA
from hub.settings import HubSettings
from hub.signing.keystore import KeyStore

if TYPE_CHECKING:
    from hub.deployments.desired import Director
    from hub.messaging.handlers import MessageStats


@dataclass
class HubContext:
    settings: HubSettings
    engine: Engine
    keys: KeyStore
    blobs: BlobStore
    topics: Topics
    publisher: Publisher = field(default_factory=RecordingPublisher)
    broker: EmbeddedBroker | None = None  # when the hub runs its own mosquitto
    # Issues devices' client certificates and the broker's (hub.security); files in data_dir/ca.
    device_ca: DeviceCA | None = None
    admin_token: str = ""
    # (host, port) enrolment hands to devices; set once the broker address is known.
    broker_public: tuple[str, int] = ("127.0.0.1", 1883)
    # Called after the set of device credentials changed (enrolment), so the broker accepts them.
    on_credentials_changed: Callable[[], None] = lambda: None
    # Serialises sign-and-publish of desired states: a lower counter published after a higher
    # one would stay retained and be rejected by the device as a replay.
    desired_lock: threading.Lock = field(default_factory=threading.Lock)
    # The message worker's counters, once messaging runs (None in API-only tests).
    message_stats: "MessageStats | None" = None
    # Names this hub as the holder of rollout leases; stable across restarts of the same hub.
    instance_id: str = "hub"

    def director(self) -> "Director":
        """The desired-state signer and publisher over the current publisher."""
        from hub.deployments.desired import Director

        return Director(
            keys=self.keys,
            publisher=self.publisher,
            topics=self.topics,
            desired_ttl_s=self.settings.deploy.desired_ttl_s,
            lock=self.desired_lock,
        )

    @classmethod
    def build(cls, settings: HubSettings, engine: Engine) -> "HubContext":
        return cls(
            settings=settings,
            engine=engine,
            keys=KeyStore(settings.keys_dir),
            blobs=BlobStore(settings.models_dir),
            device_ca=DeviceCA(settings.ca_dir),
            topics=Topics(settings.broker.topic_root),
            instance_id=settings.instance_id or default_owner(str(settings.data_dir)),
            broker_public=(
                settings.broker.public_host or "127.0.0.1",
                settings.broker.public_port or 1883,
            ),
        )
