"""Ingest's memory of enrolled devices: a known device is not asked about again for its TTL;
an unknown one is asked about every time (it may enrol next)."""

from sqlmodel import Session

from hub.devices.known import KnownDevices
from hub.devices.models import Device


def test_known_devices_are_remembered_for_the_ttl_and_unknown_ones_never(
    session: Session,
) -> None:
    now = [0.0]
    known = KnownDevices(ttl_s=10.0, clock=lambda: now[0])
    session.add(Device(id="dev-a", password_hash="x"))
    session.commit()

    assert known.enrolled(session, {"dev-a", "dev-b"}) == {"dev-a"}
    session.add(Device(id="dev-b", password_hash="x"))
    session.commit()
    assert known.enrolled(session, {"dev-b"}) == {"dev-b"}, "an unknown one is asked again"

    session.delete(session.get(Device, "dev-a"))
    session.commit()
    now[0] = 9.0
    assert known.enrolled(session, {"dev-a"}) == {"dev-a"}, "within the TTL: remembered"
    now[0] = 10.5
    assert known.enrolled(session, {"dev-a"}) == set(), "past it: asked, and gone"
