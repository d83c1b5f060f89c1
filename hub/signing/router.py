"""Key routes under /api/v1/keys: what the keyring is, and sending it to the fleet.

Keyrings reach devices inside every desired state and command (``DesiredBody.keyring``); after
``outpost-hub keys rotate`` the hub re-signs and republishes every device's desired state, so
connected devices move to the new keyring at once and the others on their next (re)connect,
when they ask for their desired state again.
"""

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel
from sqlmodel import select

from hub.dependencies import AdminDep, ContextDep, SessionDep
from hub.devices.models import Device

router = APIRouter(prefix="/api/v1/keys", tags=["keys"], dependencies=[AdminDep])


class KeyringPublic(BaseModel):
    version: int
    expires_at: datetime
    root_keyid: str
    release_keyid: str
    director_keyid: str
    pending: str | None


class KeyringPublished(BaseModel):
    version: int
    devices: int


@router.get("")
def keyring_status(ctx: ContextDep) -> KeyringPublic:
    status = ctx.keys.status()
    return KeyringPublic(
        version=status.keyring_version,
        expires_at=status.expires_at,
        root_keyid=status.root_keyid,
        release_keyid=status.release_keyid,
        director_keyid=status.director_keyid,
        pending=status.pending,
    )


@router.post("/publish")
def publish_keyring(ctx: ContextDep, session: SessionDep) -> KeyringPublished:
    """Re-sign and publish every device's desired state with the current keyring (a plain
    ``def``: FastAPI runs it in a worker thread, so the signing does not block the loop)."""
    device_ids = list(session.exec(select(Device.id)))
    ctx.director().publish_many(session=session, device_ids=device_ids)
    return KeyringPublished(version=ctx.keys.keyring_document().version, devices=len(device_ids))
