"""Simulated devices without a hub: state directories holding an identity, as enrolment leaves.

The identity names a root key nobody signs with: with no hub these devices never get a desired
state, so they connect, ask for one, heartbeat and otherwise idle, which is what the scale and
storm benchmarks want from them.
"""

from pathlib import Path

from agent.protocol.keys import SigningKey
from agent.state import BrokerCredentials, Identity, StateDir
from outpost_sim.fleet import device_dirs


def device_id_of(state_dir: Path) -> str:
    """A device's id is its directory's name (``sim-00001``), a valid device id."""
    return state_dir.name


def planned_dirs(base_dir: Path, count: int) -> list[Path]:
    return device_dirs(base_dir, count)


def provision(
    state_dirs: list[Path], *, host: str, port: int, password: str, topic_root: str = "outpost"
) -> None:
    """Write each device's identity (broker account = device id, one shared password)."""
    root_public_key = SigningKey.generate().public_b64
    for state_dir in state_dirs:
        device_id = device_id_of(state_dir)
        state = StateDir(state_dir)
        state.create()
        state.save_identity(
            Identity(
                device_id=device_id,
                hub_url="http://127.0.0.1:9",  # never used: these devices are not enrolled
                broker=BrokerCredentials(
                    host=host, port=port, username=device_id, password=password
                ),
                topic_root=topic_root,
                root_public_key=root_public_key,
                device_class="generic",
            )
        )
