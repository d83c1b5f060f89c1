"""Agent fixtures: one device enrolled on the test's Mosquitto, signed for by a repository."""

from pathlib import Path
from typing import Any

import pytest

from tests.support.agents import DEVICE, write_identity
from tests.support.repository import RepositorySimulator


@pytest.fixture
def repo() -> RepositorySimulator:
    return RepositorySimulator(device_id=DEVICE)


@pytest.fixture
def state_dir(tmp_path: Path, mosquitto: Any, repo: RepositorySimulator) -> Path:
    """The state directory of ``DEVICE``, with its identity, broker account and keyring."""
    password = mosquitto.add_device(DEVICE)
    write_identity(
        tmp_path / "agent",
        device_id=DEVICE,
        host=mosquitto.host,
        port=mosquitto.port,
        password=password,
        root_public_key=repo.root.public_b64,
        keyring=repo.keyring(),
    )
    return tmp_path / "agent"
