"""The missed-heartbeat rule on a real SQLite database: which devices are marked offline."""

from datetime import timedelta

from sqlmodel import Session

from hub.database import utcnow
from hub.devices.liveness import mark_silent_offline
from hub.devices.models import Device


def test_only_online_devices_silent_past_the_bound_are_marked_offline(session: Session) -> None:
    now = utcnow()
    seen = {
        "quiet": (True, now - timedelta(seconds=120)),
        "never-heard": (True, None),
        "chatty": (True, now - timedelta(seconds=5)),
        "gone": (False, now - timedelta(days=3)),
    }
    for device_id, (online, last_seen) in seen.items():
        session.add(Device(id=device_id, password_hash="x", online=online, last_seen=last_seen))
    session.commit()

    marked = mark_silent_offline(session, silent_since=now - timedelta(seconds=90))

    assert sorted(marked) == ["never-heard", "quiet"]
    online = {d: session.get(Device, d).online for d in seen}  # type: ignore[union-attr]
    assert online == {"quiet": False, "never-heard": False, "chatty": True, "gone": False}
    assert mark_silent_offline(session, silent_since=now - timedelta(seconds=90)) == []
