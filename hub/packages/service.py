"""Building (once) and reading the package of a model version."""

import logging
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from agent.protocol.documents import (
    FileEntry,
    Framework,
    HealthCheck,
    Manifest,
    ModelInfo,
    ModelSignature,
    document_dict,
)
from agent.protocol.package import DEFAULT_CHUNK_BYTES, plan_chunks
from hub.atomic import write_atomic
from hub.blobs import BlobStore
from hub.database import utcnow
from hub.errors import NotFound, TooLarge
from hub.packages.builder import build_archive, sha256_hex
from hub.packages.models import Package
from hub.registry.models import ModelVersion
from hub.registry.service import device_classes_of, inference_of, list_files
from hub.signing.keystore import KeyStore

logger = logging.getLogger(__name__)


def package_path(packages_dir: Path, digest: str) -> Path:
    return packages_dir / f"{digest}.tar"


def ensure_package(
    *,
    session: Session,
    keys: KeyStore,
    blobs: BlobStore,
    packages_dir: Path,
    model_version: ModelVersion,
    max_package_bytes: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Package:
    """The package of ``model_version``, built and signed with the release key the first time.

    Later deployments reuse it, so they work while the release key is offline.
    """
    assert model_version.id is not None
    existing = session.exec(
        select(Package).where(Package.model_version_id == model_version.id)
    ).first()
    if existing is not None and package_path(packages_dir, existing.digest).exists():
        return existing

    files = {
        f.path: blobs.read(f.sha256)
        for f in list_files(session=session, model_version_id=model_version.id)
    }
    manifest = Manifest(
        model=ModelInfo(
            name=model_version.name,
            version=model_version.version,
            framework=Framework(model_version.framework),
        ),
        runtime=inference_of(model_version).runtime_spec(model_version.model_file),
        signature=ModelSignature.model_validate(model_version.signature),
        files=[
            FileEntry(path=path, size=len(data), sha256=sha256_hex(data))
            for path, data in sorted(files.items())
        ],
        health_check=HealthCheck(
            input=model_version.sample_input, expected_output=model_version.expected_output
        ),
        device_classes=device_classes_of(model_version),
        created_at=model_version.created_at,
    )
    signature = keys.sign_release(document_dict(manifest))
    archive = build_archive(manifest, [signature], files)
    if len(archive) > max_package_bytes:
        raise TooLarge(
            f"package of {model_version.name}:{model_version.version} is {len(archive)} bytes, "
            f"over the limit of {max_package_bytes}"
        )
    digest = sha256_hex(archive)
    write_atomic(package_path(packages_dir, digest), archive)
    if existing is not None:
        # The row survived but the file was lost (restored backup?): same manifest, same bytes.
        return existing
    plan = plan_chunks(archive, chunk_bytes)
    row = Package(
        digest=digest,
        model_version_id=model_version.id,
        model=model_version.name,
        version=model_version.version,
        size=plan.size,
        chunk_bytes=plan.chunk_bytes,
        chunks=list(plan.chunks),
        release_keyid=signature.keyid,
        created_at=utcnow(),
    )
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        # Another request packaged the same version concurrently; use theirs.
        session.rollback()
        theirs = session.exec(
            select(Package).where(Package.model_version_id == model_version.id)
        ).one()
        return theirs
    session.refresh(row)
    logger.info(
        "built package",
        extra={"model": row.model, "version": row.version, "digest": digest, "size": row.size},
    )
    return row


def get_package(*, session: Session, digest: str) -> Package:
    row = session.get(Package, digest)
    if row is None:
        raise NotFound(f"package {digest} not found")
    return row
