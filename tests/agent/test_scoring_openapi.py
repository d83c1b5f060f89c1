"""GET /swagger.json: the device describes its active models, and the description is true.

Schemathesis reads the document and sends the endpoint requests that fit each model's schema
(every one must score: 200) and requests that do not (each must be refused with a 4xx, never a
5xx or a dropped connection), over real HTTP to the real endpoint with the real iris model.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import Case, GenerationMode

from agent.protocol.documents import ModelSignature
from agent.runtimes.base import ActiveModel
from agent.runtimes.onnx import OnnxRuntime
from agent.scoring import ScoringServer

from .test_scoring import KEY, Models, active

if TYPE_CHECKING:
    from examples.build_example_model import IrisModel

AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 40


class ServedInThread:
    """A ScoringServer on its own loop in a thread, for synchronous clients (schemathesis)."""

    def __init__(self, models: Models) -> None:
        self._models = models
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port = 0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        server = ScoringServer(models=self._models, keys=lambda: [KEY])
        await server.start()
        self.port = server.port
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await server.stop()

    def __enter__(self) -> ServedInThread:
        self._thread.start()
        assert self._ready.wait(10), "the scoring server did not start"
        return self

    def __exit__(self, *_: object) -> None:
        assert self._loop is not None
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def iris_active(iris_model: IrisModel, tmp_path: Path) -> ActiveModel:
    files = tmp_path / "files"
    shutil.copytree(iris_model.directory, files)
    model = active("iris", OnnxRuntime(files / "model.onnx"), version=3)
    return ActiveModel(
        model.name,
        model.version,
        model.digest,
        model.manifest.model_copy(
            update={
                "health_check": model.manifest.health_check.model_copy(
                    update={"input": "sample_input.json"}
                )
            }
        ),
        model.runtime,
        files,
    )


@pytest.fixture
def served(iris_active: ActiveModel) -> Iterator[ServedInThread]:
    with ServedInThread(Models(iris_active)) as server:
        yield server


def _document(port: int) -> dict[str, Any]:
    response = httpx.get(f"http://127.0.0.1:{port}/swagger.json", headers=AUTH)
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def test_swagger_describes_each_model_with_its_signature_and_an_example(
    served: ServedInThread, iris_model: IrisModel
) -> None:
    assert httpx.get(f"http://127.0.0.1:{served.port}/swagger.json").status_code == 401
    document = _document(served.port)
    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == {"/healthz", "/models", "/score", "/models/iris/score"}
    operation = document["paths"]["/models/iris/score"]["post"]
    content = operation["requestBody"]["content"]
    assert set(content) == {"application/json", "application/x-npy", "application/x-npz"}
    sample = json.loads(iris_model.sample_input.read_text())
    assert content["application/json"]["example"] == {"data": sample}
    request_schema = document["components"]["schemas"]["IrisRequest"]
    rows = request_schema["properties"]["data"]["oneOf"][0]
    assert rows["type"] == "array"
    assert rows["minItems"] == 1
    row = rows["items"]
    assert (row["minItems"], row["maxItems"]) == (4, 4)
    assert row["items"]["type"] == "number"
    assert row["items"]["format"] == "float32"
    outputs = document["components"]["schemas"]["IrisResponse"]["properties"]["outputs"]
    assert set(outputs["properties"]) == {"label", "probabilities"}

    # The example is a request the endpoint answers.
    scored = httpx.post(
        f"http://127.0.0.1:{served.port}/models/iris/score",
        json=content["application/json"]["example"],
        headers=AUTH,
    )
    assert scored.status_code == 200, scored.text


def test_swagger_prefers_the_declared_signature(iris_active: ActiveModel) -> None:
    declared = ModelSignature.model_validate(
        {"inputs": [{"name": "pixels", "dtype": "uint8", "shape": [None, 2, 2]}], "outputs": []}
    )
    manifest = iris_active.manifest.model_copy(update={"signature": declared})
    model = ActiveModel("declared", 1, "e" * 64, manifest, iris_active.runtime, None)
    with ServedInThread(Models(model)) as server:
        document = _document(server.port)
    rows = document["components"]["schemas"]["DeclaredRequest"]["properties"]["data"]["oneOf"][0]
    cell = rows["items"]["items"]["items"]
    assert cell == {"type": "integer", "format": "uint8", "minimum": 0, "maximum": 255}
    # No files directory: no example rather than a wrong one.
    content = document["paths"]["/models/declared/score"]["post"]["requestBody"]["content"]
    assert "example" not in content["application/json"]


def _fuzz(
    strategy: Any, mode: GenerationMode, statuses: dict[str, Counter[int]], failures: list[str]
) -> None:
    label = "positive" if mode is GenerationMode.POSITIVE else "negative"

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        # The explicit phase sends the document's example, which is valid: only positive.
        phases=[Phase.explicit, Phase.generate] if label == "positive" else [Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Case) -> None:
        if case.media_type != "application/json":
            return  # generated binary bodies are not .npy files; those are tested elsewhere
        try:
            response = case.call(headers=AUTH, timeout=10)
        except Exception as exc:  # a dropped connection is as bad as a 500
            failures.append(f"{label}: dropped: {exc!r}\n{case.as_curl_command()}")
            return
        status = response.status_code
        if status == 500 and "produced NaN or infinity" in response.text:
            # Inputs near float32's limits overflow the model itself (its softmax): a valid
            # request the model cannot answer, said as such, not a fault of the endpoint.
            statuses["model overflowed"][status] += 1
            return
        statuses[label][status] += 1
        if status >= 500 or (label == "positive" and status != 200):
            failures.append(f"{label} -> {status}: {response.text[:300]}\n{case.as_curl_command()}")

    check()


def test_requests_fitting_the_schema_score_and_others_are_refused_without_5xx(
    served: ServedInThread,
) -> None:
    schema = schemathesis.openapi.from_dict(_document(served.port))
    schema.config.update(base_url=f"http://127.0.0.1:{served.port}")
    statuses: dict[str, Counter[int]] = {
        "positive": Counter(),
        "negative": Counter(),
        "model overflowed": Counter(),
    }
    failures: list[str] = []
    operations = [r.ok() for r in schema.get_all_operations()]
    scoring = [op for op in operations if op.method.upper() == "POST"]
    assert len(scoring) == 2
    for operation in scoring:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(operation.as_strategy(generation_mode=mode), mode, statuses, failures)
    print("\nswagger fuzz:", {label: dict(counts) for label, counts in statuses.items()})
    assert failures == [], "\n".join(failures[:10])
    assert statuses["positive"][200] >= 20
    assert sum(statuses["negative"].values()) >= 10
    # Negative cases that mutate only what the endpoint does not check (an extra top-level
    # key, a header) are answered 200; what counts is that none is a 5xx.
    assert statuses["negative"][400] >= 10
