"""The runtime port: what the installer and the scoring endpoint need from a loaded model."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from agent.protocol.documents import Manifest, ModelSignature


class Runtime(Protocol):
    """A loaded model. ``predict`` takes the JSON ``data`` of a scoring request."""

    def predict(self, data: Any) -> dict[str, Any]:
        """Run the model; returns each output by name: a NumPy array or a JSON value.

        Raises ``agent.errors.InputError`` when ``data`` does not fit the model's inputs, and
        ``agent.errors.ModelCallError`` when the model could not answer (a script that raised,
        hung or crashed).
        """
        ...

    def signature(self) -> ModelSignature:
        """The inputs and outputs requests are checked against (empty when not known)."""
        ...

    def close(self) -> None:
        """Release what the runtime holds (a worker process); called once it stops serving."""
        ...


@runtime_checkable
class RawBodyRuntime(Protocol):
    """A runtime handed the request body as it came, as an entry script's ``run(raw_data)`` is.

    Its calls may take long (user code in a worker process), so the endpoint makes them off the
    event loop; they must be safe to call from several threads.
    """

    def run_raw(self, body: bytes, content_type: str) -> Any:
        """The JSON-ready value ``run`` returned; raises ``ModelCallError`` when it failed.

        A runtime may also offer ``run_json(body, content_type)``, the same call answering
        ``agent.jsonvalues.JsonText`` (written out as it is), and ``run_raw_nowait(body,
        content_type)``, made on the event loop when the call can be taken at once: the
        ``JsonText`` itself when the answer is there at once, else an awaitable of either
        kind of answer; None when the call cannot be taken at once. A future that is already
        done is answered without a task too.
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
    files_dir: Path | None = None  # the package's files (the self-description reads the sample)

    def signature(self) -> ModelSignature:
        """The signature requests are described by: the one the package declares, else the
        one the runtime reads from the model."""
        declared = self.manifest.signature
        if declared.inputs or declared.outputs:
            return declared
        return self.runtime.signature()


class ActiveModels(Protocol):
    """What the scoring endpoint asks for; the agent core implements it."""

    def get(self, name: str | None = None) -> ActiveModel | None:
        """The named active model, or the default one when ``name`` is None."""
        ...

    def names(self) -> list[str]: ...
