"""Online/offline from missed heartbeats, besides the broker's last will.

The will covers a connection the broker sees drop. It does not cover an agent whose connection
stays up while it stops working (a hung process behind a live socket, a NAT that keeps the
broker's side open past its keep-alive), nor a will lost while the hub was away. A device
online in the database that has not been heard from in ``offline_after_s`` is marked offline
here; its next heartbeat brings it back.
"""

import logging
from datetime import datetime

from sqlalchemy import or_, update
from sqlmodel import Session, col, select

from hub.devices.models import Device

logger = logging.getLogger(__name__)


def mark_silent_offline(session: Session, *, silent_since: datetime) -> list[str]:
    """Mark offline every online device last heard from before ``silent_since``; returns
    their ids. Commits."""
    silent = or_(col(Device.last_seen).is_(None), col(Device.last_seen) < silent_since)
    ids = list(session.exec(select(Device.id).where(col(Device.online), silent)).all())
    if not ids:
        return []
    # The same conditions again in the UPDATE: a heartbeat another replica wrote in between
    # keeps its device online.
    session.execute(
        update(Device)
        .where(col(Device.id).in_(ids), col(Device.online), silent)
        .values(online=False)
    )
    session.commit()
    logger.info(
        "devices marked offline after missed heartbeats",
        extra={"devices": len(ids), "silent_since": silent_since.isoformat()},
    )
    return ids
