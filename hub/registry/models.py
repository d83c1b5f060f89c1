"""Registry tables: a model version and its files. Rows are written once and never updated."""

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, UniqueConstraint
from sqlmodel import Field, SQLModel

from hub.database import UTCDateTime, utcnow

# The version column is a 32-bit integer on PostgreSQL; a larger number names no version, and
# SQLite cannot even bind one past 64 bits (found by schemathesis as a 500).
MAX_VERSION = 2**31 - 1


class ModelVersion(SQLModel, table=True):
    __tablename__ = "model_version"
    # The constraint, not a lock, is what keeps concurrent registrations from sharing a number.
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_version_name_version"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, max_length=63)
    version: int
    framework: str = Field(max_length=16)
    description: str = ""
    tags: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    signature: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    model_file: str  # path of the model among the files
    # The inference config (agent.protocol.documents.RuntimeSpec): the framework's built-in
    # runtime, or an entry script among the files with the PEP 508 requirements the device's
    # Python must meet; options as checked by agent.runtimes.options, typed.
    runtime_kind: str = Field(default="builtin", max_length=16)
    entry_script: str | None = Field(default=None, max_length=255)
    requirements: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    runtime_options: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column(JSON, nullable=False)
    )
    sample_input: str
    expected_output: str
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class ModelFile(SQLModel, table=True):
    __tablename__ = "model_file"
    __table_args__ = (UniqueConstraint("model_version_id", "path", name="uq_model_file_path"),)

    id: int | None = Field(default=None, primary_key=True)
    model_version_id: int = Field(foreign_key="model_version.id", index=True)
    path: str = Field(max_length=255)
    sha256: str = Field(max_length=64)
    size: int
