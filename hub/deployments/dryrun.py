"""Dry run: which devices a deployment would reach, which it would skip and why, and how many
bytes it would move, read from the registry and the devices' reported state. Nothing is built,
signed, published or written."""

from sqlmodel import Session, select

from hub.deployments.eligibility import Candidate, judge
from hub.deployments.policy import plan_waves
from hub.deployments.schemas import DeploymentCreate, DryRunDevice, DryRunPublic
from hub.packages.models import Package
from hub.registry.models import ModelFile
from hub.registry.service import get_version

# A tar archive adds a 512-byte header per member and pads it to 512 bytes; the estimate for a
# version not packaged yet adds that and the manifest's few kilobytes.
_TAR_OVERHEAD_PER_FILE = 1024
_MANIFEST_ESTIMATE = 4096


def dry_run(*, session: Session, body: DeploymentCreate, devices: list[str]) -> DryRunPublic:
    model_version = get_version(
        session=session, name=body.model, version=body.version if body.version else "latest"
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
    verdicts = judge(
        session=session,
        candidate=Candidate.of(
            model_version,
            package.digest if package is not None else None,
            priority=body.priority,
            retry_bad=body.retry_bad,
        ),
        devices=devices,
    )
    targeted = [DryRunDevice(device_id=v.device_id, why=v.why) for v in verdicts if not v.skip]
    skipped = [DryRunDevice(device_id=v.device_id, why=v.why) for v in verdicts if v.skip]
    return DryRunPublic(
        model=model_version.name,
        version=model_version.version,
        package_digest=package.digest if package is not None else None,
        package_bytes=size,
        targeted=targeted,
        skipped=skipped,
        waves=plan_waves(len(targeted), body.policy),
        bytes_from_hub=size if targeted else 0,
        bytes_to_devices=size * len(targeted),
    )
