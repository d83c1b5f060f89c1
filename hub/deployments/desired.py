"""Signing and publishing a device's desired state (the director role)."""

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import update
from sqlmodel import Session, col, select

from agent.protocol.documents import (
    CollectPolicy,
    DesiredState,
    PackageRef,
    Signed,
    document_dict,
)
from agent.protocol.messages import DesiredBody, encode
from agent.protocol.topics import Channel, Topics
from hub.database import utcnow
from hub.deployments.models import Deployment, DeviceDesired
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
        (desired,) = self.publish_many(session=session, device_ids=[device_id])
        return desired

    def publish_many(
        self, *, session: Session, device_ids: Sequence[str], batch: int = 500
    ) -> list[DesiredState]:
        """``publish`` for many devices: one counter update, one commit and one query per
        ``batch`` devices instead of per device (a rollout to 1,000 devices took seconds)."""
        published: list[DesiredState] = []
        for start in range(0, len(device_ids), batch):
            published += self._publish_batch(session, list(device_ids[start : start + batch]))
        return published

    def _publish_batch(self, session: Session, device_ids: list[str]) -> list[DesiredState]:
        with self.lock:
            taken = session.execute(
                update(Device)
                .where(col(Device.id).in_(device_ids))
                .values(desired_counter=Device.desired_counter + 1)
            )
            if taken.rowcount != len(set(device_ids)):  # type: ignore[attr-defined]
                session.rollback()
                known = set(session.exec(select(Device.id).where(col(Device.id).in_(device_ids))))
                missing = sorted(set(device_ids) - known)
                raise NotFound(f"device {', '.join(missing)} not found")
            session.commit()
            counters = dict(
                session.exec(
                    select(Device.id, Device.desired_counter).where(col(Device.id).in_(device_ids))
                ).all()
            )
            wanted: dict[str, list[PackageRef]] = {d: [] for d in device_ids}
            rows = session.exec(
                select(
                    DeviceDesired, Package, Deployment.package_digest, Deployment.data_collection
                )
                .join(Package, col(Package.digest) == col(DeviceDesired.package_digest))
                .join(Deployment, col(Deployment.id) == col(DeviceDesired.deployment_id))
                .where(col(DeviceDesired.device_id).in_(device_ids))
                .order_by(col(DeviceDesired.device_id), col(DeviceDesired.model))
            ).all()
            for want, pkg, deployed_digest, data_collection in rows:
                # The policy goes with the deployment's own package only. A device sent back
                # to its previous package keeps this deployment's id (that is how the hub sees
                # the rollback take) but not its sampling: that was decided for the new version.
                collect = (
                    CollectPolicy.model_validate(data_collection)
                    if data_collection is not None and deployed_digest == pkg.digest
                    else None
                )
                wanted[want.device_id].append(
                    PackageRef(
                        model=pkg.model,
                        version=pkg.version,
                        digest=pkg.digest,
                        size=pkg.size,
                        chunk_bytes=pkg.chunk_bytes,
                        chunks=list(pkg.chunks),
                        deployment_id=want.deployment_id,
                        collect=collect,
                    )
                )
            keyring = self.keys.keyring()
            earlier = self.keys.keyring_chain()
            now = utcnow()
            published = []
            for device_id in dict.fromkeys(device_ids):
                desired = DesiredState(
                    device_id=device_id,
                    counter=counters[device_id],
                    issued_at=now,
                    expires_at=now + timedelta(seconds=self.desired_ttl_s),
                    packages=wanted[device_id],
                )
                signed_part = document_dict(desired)
                signed = Signed(
                    signed=signed_part, signatures=[self.keys.sign_director(signed_part)]
                )
                payload = encode(DesiredBody(keyring=keyring, keyrings=earlier, desired=signed))
                self.publisher.publish(
                    self.topics.device(device_id, Channel.DESIRED), payload, qos=1, retain=True
                )
                published.append(desired)
        logger.info("published desired states", extra={"devices": len(published)})
        return published
