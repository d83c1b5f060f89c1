"""Registering, listing and reading model versions."""

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from agent.protocol.documents import ANY_DEVICE_CLASS, Framework, ModelSignature
from hub.blobs import BlobStore
from hub.errors import Conflict, InvalidInput, NotFound, TooLarge
from hub.registry.inference import InferenceConfig, inference_config
from hub.registry.inspection import inspect_model
from hub.registry.models import MAX_VERSION, ModelFile, ModelVersion
from hub.registry.schemas import (
    ModelFilePublic,
    ModelSummary,
    ModelVersionPublic,
    RuntimeConfigPublic,
)

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
FILE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
TAG_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]{0,62}$")
SAMPLE_INPUT_FILE = "sample_input.json"
EXPECTED_OUTPUT_FILE = "expected_output.json"
# Each round of racing registrations of one name lets at least one of them win, so this many
# attempts serve that many registrations at the same moment (5 lost a race of 8 under load).
_REGISTER_ATTEMPTS = 20


@dataclass(frozen=True)
class UploadedFile:
    name: str
    data: bytes


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidInput(
            f"invalid model name {name!r}: use 1-63 of a-z 0-9 . _ - starting with a letter or "
            "digit"
        )
    return name


def parse_tags(raw: Sequence[str]) -> dict[str, str]:
    """Tags given as repeated ``k=v``."""
    tags: dict[str, str] = {}
    for item in raw:
        key, sep, value = item.partition("=")
        if not sep or not TAG_KEY_PATTERN.fullmatch(key):
            raise InvalidInput(f"invalid tag {item!r}: use key=value")
        tags[key] = value
    return tags


def _load_json(label: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{label} is not valid JSON: {exc}") from None


def _check_files(files: Sequence[UploadedFile]) -> None:
    if not files:
        raise InvalidInput("at least one model file is required")
    seen: set[str] = set()
    for f in files:
        if not FILE_NAME_PATTERN.fullmatch(f.name):
            raise InvalidInput(f"invalid file name {f.name!r}")
        if f.name in (SAMPLE_INPUT_FILE, EXPECTED_OUTPUT_FILE):
            raise InvalidInput(f"file name {f.name!r} is reserved for the health check")
        if f.name in seen:
            raise InvalidInput(f"file {f.name!r} given twice")
        seen.add(f.name)


def register_model(
    *,
    session: Session,
    blobs: BlobStore,
    name: str,
    framework: str,
    files: Sequence[UploadedFile],
    sample_input: bytes,
    expected_output: bytes,
    tags: dict[str, str] | None = None,
    description: str = "",
    max_bytes: int,
    entry_script: UploadedFile | None = None,
    requirements: Sequence[str] = (),
    options: Sequence[str] = (),
) -> ModelVersion:
    """Check and store a new version of ``name``; the first file is the model the runtime loads.

    With ``entry_script`` the version runs that script (stored among its files) on devices, and
    the hub does not run the model: user code stays off the hub, and the devices' health check
    runs the sample through the script. ``requirements`` (PEP 508) and ``options``
    (``key=value``) are checked as a device will check them.
    """
    check_name(name)
    try:
        fw = Framework(framework)
    except ValueError:
        raise InvalidInput(
            f"unknown framework {framework!r}; use one of {[str(f) for f in Framework]}"
        ) from None
    all_files = [*files, entry_script] if entry_script is not None else list(files)
    if not files:
        raise InvalidInput("at least one model file is required")
    _check_files(all_files)
    config = inference_config(
        fw,
        entry_script=entry_script.name if entry_script is not None else None,
        requirements=requirements,
        options=options,
    )
    total = sum(len(f.data) for f in all_files) + len(sample_input) + len(expected_output)
    if total > max_bytes:
        raise TooLarge(f"model files total {total} bytes, over the limit of {max_bytes}")
    sample = _load_json("sample input", sample_input)
    expected = _load_json("expected output", expected_output)
    if config.kind == "script":
        signature = ModelSignature()
    else:
        signature = inspect_model(fw, files[0].data, sample, expected)

    stored = [(f.name, blobs.put(f.data)) for f in all_files]
    stored.append((SAMPLE_INPUT_FILE, blobs.put(sample_input)))
    stored.append((EXPECTED_OUTPUT_FILE, blobs.put(expected_output)))

    for attempt in range(1, _REGISTER_ATTEMPTS + 1):
        latest = session.exec(
            select(func.max(ModelVersion.version)).where(ModelVersion.name == name)
        ).one()
        row = ModelVersion(
            name=name,
            version=(latest or 0) + 1,
            framework=str(fw),
            description=description,
            tags=dict(tags or {}),
            signature=signature.model_dump(mode="json"),
            model_file=files[0].name,
            runtime_kind=config.kind,
            entry_script=config.entry_script,
            requirements=config.requirements,
            runtime_options=config.options,
            sample_input=SAMPLE_INPUT_FILE,
            expected_output=EXPECTED_OUTPUT_FILE,
        )
        session.add(row)
        try:
            session.flush()
            assert row.id is not None
            for path, blob in stored:
                session.add(
                    ModelFile(
                        model_version_id=row.id, path=path, sha256=blob.sha256, size=blob.size
                    )
                )
            session.commit()
        except IntegrityError:
            # Someone registered the same name at the same moment; take the next number.
            session.rollback()
            logger.info("version taken, retrying", extra={"model": name, "attempt": attempt})
            continue
        session.refresh(row)
        logger.info("registered model", extra={"model": name, "version": row.version})
        return row
    raise Conflict(f"could not allocate a version for {name!r}; too many concurrent registrations")


def get_version(*, session: Session, name: str, version: int | str) -> ModelVersion:
    """A version by number, or the newest for ``"latest"`` / None."""
    check_name(name)
    query = select(ModelVersion).where(ModelVersion.name == name)
    if version in (None, "latest"):
        query = query.order_by(col(ModelVersion.version).desc()).limit(1)
    else:
        try:
            number = int(version)
        except ValueError:
            raise InvalidInput(f"version must be a number or 'latest', not {version!r}") from None
        if not 1 <= number <= MAX_VERSION:
            raise NotFound(f"model {name}:{version} not found")
        query = query.where(ModelVersion.version == number)
    row = session.exec(query).first()
    if row is None:
        raise NotFound(f"model {name}:{version} not found")
    return row


# The model tag that limits a version to some device classes ("rpi4,jetson-nano"); the package
# manifest carries the list, the agent refuses other classes and the hub skips their devices.
DEVICE_CLASSES_TAG = "device_classes"


def device_classes_of(model_version: ModelVersion) -> list[str]:
    raw = model_version.tags.get(DEVICE_CLASSES_TAG, "")
    classes = [c.strip() for c in raw.split(",") if c.strip()]
    return classes or [ANY_DEVICE_CLASS]


def inference_of(model_version: ModelVersion) -> InferenceConfig:
    """The stored inference config of a version (built-in with defaults before it existed)."""
    return InferenceConfig(
        kind="script" if model_version.runtime_kind == "script" else "builtin",
        entry_script=model_version.entry_script,
        requirements=list(model_version.requirements),
        options=dict(model_version.runtime_options),
    )


def list_files(*, session: Session, model_version_id: int) -> list[ModelFile]:
    return list(
        session.exec(
            select(ModelFile)
            .where(ModelFile.model_version_id == model_version_id)
            .order_by(col(ModelFile.path))
        ).all()
    )


def to_public(*, session: Session, row: ModelVersion) -> ModelVersionPublic:
    assert row.id is not None
    files = list_files(session=session, model_version_id=row.id)
    config = inference_of(row)
    return ModelVersionPublic(
        name=row.name,
        version=row.version,
        framework=row.framework,
        description=row.description,
        tags=row.tags,
        signature=row.signature,
        model_file=row.model_file,
        runtime=RuntimeConfigPublic(
            kind=config.kind,
            entry_script=config.entry_script,
            requirements=config.requirements,
            options=config.options,
        ),
        sample_input=row.sample_input,
        expected_output=row.expected_output,
        created_at=row.created_at,
        files=[ModelFilePublic(path=f.path, sha256=f.sha256, size=f.size) for f in files],
    )


def list_models(*, session: Session) -> list[ModelSummary]:
    """One entry per name, described by its newest version."""
    rows = session.exec(
        select(ModelVersion).order_by(col(ModelVersion.name), col(ModelVersion.version))
    ).all()
    by_name: dict[str, list[ModelVersion]] = {}
    for row in rows:
        by_name.setdefault(row.name, []).append(row)
    out = []
    for name, versions in by_name.items():
        newest = versions[-1]
        out.append(
            ModelSummary(
                name=name,
                latest_version=newest.version,
                versions=[v.version for v in versions],
                framework=newest.framework,
                description=newest.description,
                tags=newest.tags,
                updated_at=newest.created_at,
            )
        )
    return out


def file_path(
    *, session: Session, blobs: BlobStore, name: str, version: int | str, path: str
) -> Path:
    """Where the bytes of one file of a version are stored."""
    row = get_version(session=session, name=name, version=version)
    assert row.id is not None
    match = session.exec(
        select(ModelFile).where(ModelFile.model_version_id == row.id, ModelFile.path == path)
    ).first()
    if match is None:
        raise NotFound(f"model {name}:{row.version} has no file {path!r}")
    return blobs.path(match.sha256)
