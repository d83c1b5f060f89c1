"""The runtime port: what the installer and the scoring endpoint need from a loaded model."""

from dataclasses import dataclass
from typing import Any, Protocol

from agent.protocol.documents import Manifest


class Runtime(Protocol):
    """A loaded model. ``predict`` takes the JSON ``data`` of a scoring request."""

    def predict(self, data: Any) -> dict[str, Any]:
        """Run the model; returns each output by name as JSON-ready lists.

        Raises ``agent.errors.InputError`` when ``data`` does not fit the model's inputs.
        """
        ...


@dataclass(frozen=True)
class ActiveModel:
    """A model the device is serving now."""

    name: str
    version: int
    digest: str
    manifest: Manifest
    runtime: Runtime


class ActiveModels(Protocol):
    """What the scoring endpoint asks for; the agent core implements it."""

    def get(self, name: str | None = None) -> ActiveModel | None:
        """The named active model, or the default one when ``name`` is None."""
        ...

    def names(self) -> list[str]: ...
