"""Registry API shapes."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class ModelFilePublic(BaseModel):
    path: str
    sha256: str
    size: int


class RuntimeConfigPublic(BaseModel):
    """How devices run the version: ``builtin`` (the framework's runtime) or ``script``."""

    kind: str
    entry_script: str | None
    requirements: list[str]
    options: dict[str, Any]


class ModelVersionPublic(BaseModel):
    name: str
    version: int
    framework: str
    description: str
    tags: dict[str, str]
    signature: dict[str, Any]
    model_file: str
    runtime: RuntimeConfigPublic
    sample_input: str
    expected_output: str
    created_at: datetime
    files: list[ModelFilePublic]


class ModelSummary(BaseModel):
    name: str
    latest_version: int
    versions: list[int]
    framework: str
    description: str
    tags: dict[str, str]
    updated_at: datetime
