"""A deployment's target: devices named by id, devices chosen by a tag selector, and named
groups of devices."""

from collections.abc import Sequence

from sqlmodel import Session, col, select

from hub.deployments.schemas import DeploymentCreate
from hub.devices.models import Device
from hub.devices.service import parse_tag_filter, select_device_ids
from hub.errors import InvalidInput


def parse_selector(selector: str) -> list[tuple[str, str]]:
    return parse_tag_filter([part.strip() for part in selector.split(",") if part.strip()])


def target_ids(
    *, session: Session, devices: Sequence[str], selector: str | None, groups: Sequence[str]
) -> list[str]:
    """The named devices, then those the selector matches, then the groups' members, each
    once (the order waves are cut from when the policy keeps the listed order)."""
    selected: list[str] = []
    if selector:
        selected = select_device_ids(session=session, tags=parse_selector(selector))
    members: list[str] = []
    if groups:
        members = list(
            session.exec(
                select(Device.id)
                .where(col(Device.group).in_(list(groups)))
                .order_by(col(Device.enrolled_at))
            ).all()
        )
    return list(dict.fromkeys([*devices, *selected, *members]))


def resolve_targets(*, session: Session, body: DeploymentCreate) -> list[str]:
    """``target_ids`` of a request; a selector or group that matches nothing is an error
    unless the deployment is continuous (its devices may come later)."""
    found = target_ids(
        session=session, devices=body.devices, selector=body.selector, groups=body.groups
    )
    if not found and not body.continuous:
        what = " and ".join(
            part
            for part in (
                f"the selector {body.selector!r}" if body.selector else "",
                f"the groups {', '.join(body.groups)}" if body.groups else "",
            )
            if part
        )
        raise InvalidInput(f"no device matches {what}")
    return found
