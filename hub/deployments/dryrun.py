"""Dry run: which devices a deployment would reach, which it would skip and why, and how many
bytes it would move, read from the registry and the devices' reported state. Nothing is built,
signed, published or written."""

from typing import Any

from sqlmodel import Session, col, select

from hub.deployments.schemas import DryRunDevice, DryRunPublic
from hub.devices.models import Device
from hub.packages.models import Package
from hub.registry.models import ModelFile
from hub.registry.service import get_version

# A tar archive adds a 512-byte header per member and pads it to 512 bytes; the estimate for a
# version not packaged yet adds that and the manifest's few kilobytes.
_TAR_OVERHEAD_PER_FILE = 1024
_MANIFEST_ESTIMATE = 4096


def dry_run(
    *, session: Session, model: str, version: int | None, devices: list[str]
) -> DryRunPublic:
    model_version = get_version(
        session=session, name=model, version=version if version is not None else "latest"
    )
    package = session.exec(
        select(Package).where(Package.model_version_id == model_version.id)
    ).first()
    if package is not None:
        size = package.size
    else:
        files = session.exec(
            select(ModelFile).where(ModelFile.model_version_id == model_version.id)
        ).all()
        size = _MANIFEST_ESTIMATE + sum(f.size + _TAR_OVERHEAD_PER_FILE for f in files)
    wanted = list(dict.fromkeys(devices))
    rows = {d.id: d for d in session.exec(select(Device).where(col(Device.id).in_(wanted)))}
    targeted: list[DryRunDevice] = []
    skipped: list[DryRunDevice] = []
    for device_id in wanted:
        device = rows.get(device_id)
        if device is None:
            skipped.append(DryRunDevice(device_id=device_id, why="unknown device"))
            continue
        reported: dict[str, Any] = device.reported_state or {}
        running = [m for m in reported.get("active", []) if m.get("model") == model_version.name]
        if running and running[0].get("version") == model_version.version:
            skipped.append(
                DryRunDevice(device_id=device_id, why=f"already runs v{model_version.version}")
            )
            continue
        notes = []
        if package is not None and package.digest in reported.get("bad", []):
            notes.append("this version failed there before; a new deployment tries it again")
        if not device.online:
            notes.append("offline: it gets the package when it connects")
        targeted.append(DryRunDevice(device_id=device_id, why="; ".join(notes)))
    return DryRunPublic(
        model=model_version.name,
        version=model_version.version,
        package_digest=package.digest if package is not None else None,
        package_bytes=size,
        targeted=targeted,
        skipped=skipped,
        bytes_from_hub=size if targeted else 0,
        bytes_to_devices=size * len(targeted),
    )
