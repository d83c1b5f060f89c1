"""Package table: one signed archive per model version, stored as data_dir/packages/{digest}.tar."""

from datetime import datetime

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from hub.database import UTCDateTime, utcnow


class Package(SQLModel, table=True):
    __tablename__ = "package"

    digest: str = Field(primary_key=True, max_length=64)
    # Unique: a version is packaged (and signed) once and the package reused by every deployment.
    model_version_id: int = Field(foreign_key="model_version.id", unique=True)
    model: str = Field(index=True, max_length=63)
    version: int
    size: int
    chunk_bytes: int
    chunks: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    release_keyid: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
