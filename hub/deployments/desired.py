"""Signing and publishing a device's desired state (the director role)."""

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import update
from sqlmodel import Session, col, select

from agent.protocol.documents import DesiredState, PackageRef, Signed, document_dict
from agent.protocol.messages import DesiredBody, encode
from agent.protocol.topics import Channel, Topics
from hub.database import utcnow
from hub.deployments.models import DeviceDesired
from hub.devices.models import Device
from hub.errors import NotFound
from hub.messaging.publisher import Publisher
from hub.packages.models import Package
from hub.signing.keystore import KeyStore

logger = logging.getLogger(__name__)


@dataclass
class Director:
    """Everything needed to sign and publish desired states."""

    keys: KeyStore
    publisher: Publisher
    topics: Topics
    desired_ttl_s: int
    # Serialises counter-take, sign and publish: a lower counter published after a higher one
    # would stay retained on the broker and be rejected by the device as a replay.
    lock: threading.Lock

    def publish(self, *, session: Session, device_id: str) -> DesiredState:
        """Sign this device's desired state with a fresh counter and publish it, retained."""
        with self.lock:
            taken = session.execute(
                update(Device)
                .where(col(Device.id) == device_id)
                .values(desired_counter=Device.desired_counter + 1)
            )
            if taken.rowcount != 1:  # type: ignore[attr-defined]
                session.rollback()
                raise NotFound(f"device {device_id} not found")
            session.commit()
            device = session.get(Device, device_id, populate_existing=True)
            assert device is not None
            rows = session.exec(
                select(DeviceDesired, Package)
                .join(Package, col(Package.digest) == col(DeviceDesired.package_digest))
                .where(DeviceDesired.device_id == device_id)
                .order_by(col(DeviceDesired.model))
            ).all()
            now = utcnow()
            desired = DesiredState(
                device_id=device_id,
                counter=device.desired_counter,
                issued_at=now,
                expires_at=now + timedelta(seconds=self.desired_ttl_s),
                packages=[
                    PackageRef(
                        model=pkg.model,
                        version=pkg.version,
                        digest=pkg.digest,
                        size=pkg.size,
                        chunk_bytes=pkg.chunk_bytes,
                        chunks=list(pkg.chunks),
                        deployment_id=want.deployment_id,
                    )
                    for want, pkg in rows
                ],
            )
            signed_part = document_dict(desired)
            signed = Signed(signed=signed_part, signatures=[self.keys.sign_director(signed_part)])
            payload = encode(DesiredBody(keyring=self.keys.keyring(), desired=signed))
            self.publisher.publish(
                self.topics.device(device_id, Channel.DESIRED), payload, qos=1, retain=True
            )
        logger.info(
            "published desired state",
            extra={
                "device_id": device_id,
                "counter": desired.counter,
                "packages": len(desired.packages),
            },
        )
        return desired
