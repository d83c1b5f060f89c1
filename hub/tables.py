"""Imports every table module so ``SQLModel.metadata`` is complete (for Alembic and tests)."""

from sqlmodel import SQLModel

from hub.auth import models as auth_models
from hub.commands import models as commands_models
from hub.deployments import models as deployments_models
from hub.devices import models as devices_models
from hub.packages import models as packages_models
from hub.registry import models as registry_models
from hub.telemetry import models as telemetry_models

__all__ = [
    "auth_models",
    "commands_models",
    "deployments_models",
    "devices_models",
    "metadata",
    "packages_models",
    "registry_models",
    "telemetry_models",
]

metadata = SQLModel.metadata
