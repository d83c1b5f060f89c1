"""Shared fixtures: real parts started for tests (a Mosquitto broker, the example model).

Keep each fixture small and documented; helpers that only one test file needs stay in that file.
"""

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest

from hub.broker import (
    DEFAULT_HUB_USERNAME,
    BrokerUser,
    EmbeddedBroker,
    MosquittoNotFoundError,
    find_mosquitto,
    hash_password,
)

if TYPE_CHECKING:
    from examples.build_example_model import IrisModel
    from tests.support.fake_hub import FakeHub

# -- Mosquitto ----------------------------------------------------------------------------------


@dataclass
class BrokerHandle:
    """A running embedded Mosquitto with the project's config, and its hub credentials."""

    host: str
    port: int
    hub_username: str
    hub_password: str
    broker: EmbeddedBroker
    _users: dict[str, BrokerUser] = field(default_factory=dict, repr=False)

    def add_device(self, device_id: str) -> str:
        """Give ``device_id`` a broker account (reloading mosquitto); returns its password."""
        return self.add_devices([device_id])[device_id]

    def add_devices(self, device_ids: list[str]) -> dict[str, str]:
        """Broker accounts for many devices in one reload; returns their passwords."""
        passwords = {d: secrets.token_urlsafe(16) for d in device_ids}
        for device_id, password in passwords.items():
            self._users[device_id] = BrokerUser(device_id, hash_password(password))
        self.broker.update_users(self._users.values())
        return passwords


@pytest.fixture
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerHandle]:
    """A fresh Mosquitto per test (it starts in milliseconds; retained messages don't leak)."""
    try:
        binary = find_mosquitto()
    except MosquittoNotFoundError as exc:
        pytest.skip(f"mosquitto is not installed: {exc}")
    hub_password = secrets.token_urlsafe(16)
    broker = EmbeddedBroker(data_dir=tmp_path_factory.mktemp("broker"), mosquitto_bin=binary)
    hub_user = BrokerUser(DEFAULT_HUB_USERNAME, hash_password(hub_password))
    broker.start([hub_user])
    try:
        yield BrokerHandle(
            host=broker.host,
            port=broker.port,
            hub_username=DEFAULT_HUB_USERNAME,
            hub_password=hub_password,
            broker=broker,
            _users={DEFAULT_HUB_USERNAME: hub_user},
        )
    finally:
        broker.stop()


# -- Example model ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def iris_model(tmp_path_factory: pytest.TempPathFactory) -> "IrisModel":
    """The iris ONNX classifier built by examples/build_example_model.py, once per session."""
    # Imported here so test runs that don't need the model don't pay for importing sklearn.
    from examples.build_example_model import build_iris_model

    return build_iris_model(tmp_path_factory.mktemp("iris"))


# -- A scripted hub on the broker ---------------------------------------------------------------


@pytest.fixture
def hub(mosquitto: BrokerHandle) -> Iterator["FakeHub"]:
    """The test-side stand-in for the hub (tests/support/fake_hub.py), connected to the broker."""
    from tests.support.fake_hub import FakeHub

    fake = FakeHub(
        host=mosquitto.host,
        port=mosquitto.port,
        username=mosquitto.hub_username,
        password=mosquitto.hub_password,
    )
    fake.start()
    yield fake
    fake.stop()
