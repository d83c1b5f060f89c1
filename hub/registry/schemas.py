"""Registry API shapes."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class ModelFilePublic(BaseModel):
    path: str
    sha256: str
    size: int


class ModelVersionPublic(BaseModel):
    name: str
    version: int
    framework: str
    description: str
    tags: dict[str, str]
    signature: dict[str, Any]
    model_file: str
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
