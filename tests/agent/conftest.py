"""Agent fixtures: one device enrolled on the test's Mosquitto, signed for by a repository."""

from pathlib import Path
from typing import Any

import pytest

from agent.install import TrustContext
from agent.trust import verify_keyring
from tests.support.agents import DEVICE, write_identity
from tests.support.repository import NOW, RepositorySimulator, iris_files


@pytest.fixture
def repo() -> RepositorySimulator:
    return RepositorySimulator(device_id=DEVICE)


@pytest.fixture
def files(iris_model: Any) -> dict[str, bytes]:
    """The example iris model's package files."""
    return iris_files(iris_model.directory)


@pytest.fixture
def trust(repo: RepositorySimulator) -> TrustContext:
    """What a device trusts: the repository's keyring, checked against its root key."""
    keyring = verify_keyring(
        repo.keyring(), root_public_b64=repo.root.public_b64, current=None, now=NOW
    )
    return TrustContext(keyring, "generic", "0.1.0")


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
