"""A deployment's target: devices named by id, and devices chosen by a tag selector."""

from sqlmodel import Session

from hub.deployments.schemas import DeploymentCreate
from hub.devices.service import parse_tag_filter, select_device_ids
from hub.errors import InvalidInput


def resolve_targets(*, session: Session, body: DeploymentCreate) -> list[str]:
    """The named devices, then those the tag selector matches, each once."""
    selected: list[str] = []
    if body.selector:
        tags = parse_tag_filter([part.strip() for part in body.selector.split(",")])
        selected = select_device_ids(session=session, tags=tags)
        if not selected and not body.devices:
            raise InvalidInput(f"the selector {body.selector!r} matches no device")
    return list(dict.fromkeys([*body.devices, *selected]))
