"""Model registration: versions, immutability, the ONNX check, storage, migrations, PostgreSQL."""

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Engine
from sqlmodel import Session

from examples.build_tflite_model import committed_model
from hub.blobs import BlobStore
from hub.database import make_engine
from hub.errors import InvalidInput, ModelCheckFailed
from hub.migrations.runner import upgrade
from hub.registry import service
from hub.tables import metadata
from tests.support.postgres import pg_available, pg_schema

from .conftest import RunningHub

if TYPE_CHECKING:
    from examples.build_example_model import IrisModel


def test_register_records_signature_and_files(
    running_hub: RunningHub, iris_model: "IrisModel"
) -> None:
    response = running_hub.register_iris(
        iris_model, tags=["team=vision", "stage=dev"], description="iris"
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["name"], body["version"], body["framework"]) == ("iris", 1, "onnx")
    assert body["tags"] == {"team": "vision", "stage": "dev"}
    assert body["signature"]["inputs"] == [
        {"name": "input", "dtype": "float32", "shape": [None, 4]}
    ]
    assert [o["name"] for o in body["signature"]["outputs"]] == ["label", "probabilities"]
    by_path = {f["path"]: f for f in body["files"]}
    assert set(by_path) == {"model.onnx", "sample_input.json", "expected_output.json"}
    model_bytes = iris_model.model.read_bytes()
    assert by_path["model.onnx"]["size"] == len(model_bytes)
    stored = BlobStore(running_hub.settings.models_dir).path(by_path["model.onnx"]["sha256"])
    assert stored.read_bytes() == model_bytes

    downloaded = running_hub.client.get("/api/v1/models/iris/1/files/model.onnx")
    assert downloaded.status_code == 200
    assert downloaded.content == model_bytes


def test_second_register_makes_v2_and_leaves_v1_unchanged(
    running_hub: RunningHub, iris_model: "IrisModel"
) -> None:
    v1 = running_hub.register_iris(iris_model, description="first").json()
    v2 = running_hub.register_iris(iris_model, description="second").json()
    assert (v1["version"], v2["version"]) == (1, 2)
    assert running_hub.client.get("/api/v1/models/iris/1").json() == v1
    latest = running_hub.client.get("/api/v1/models/iris/latest").json()
    assert latest["version"] == 2
    listing = running_hub.client.get("/api/v1/models").json()
    assert listing[0]["versions"] == [1, 2]
    # No route changes a registered version.
    assert running_hub.client.put("/api/v1/models/iris/1", json={}).status_code == 405
    assert running_hub.client.patch("/api/v1/models/iris/1", json={}).status_code == 405


def test_wrong_expected_output_is_refused_with_the_reason(
    running_hub: RunningHub, iris_model: "IrisModel", tmp_path: Path
) -> None:
    expected = json.loads(iris_model.expected_output.read_text())
    expected["probabilities"][0][0] += 0.1
    bad = tmp_path / "bad_expected.json"
    bad.write_text(json.dumps(expected))
    with (
        iris_model.model.open("rb") as m,
        iris_model.sample_input.open("rb") as s,
        bad.open("rb") as e,
    ):
        response = running_hub.client.post(
            "/api/v1/models",
            data={"name": "iris", "framework": "onnx"},
            files=[("files", ("model.onnx", m)), ("sample_input", s), ("expected_output", e)],
        )
    assert response.status_code == 422
    assert "probabilities" in response.json()["detail"]
    assert "differ" in response.json()["detail"]
    assert running_hub.client.get("/api/v1/models").json() == []


def test_garbage_model_is_refused(session: Session, tmp_path: Path) -> None:
    with pytest.raises(ModelCheckFailed, match="cannot load"):
        service.register_model(
            session=session,
            blobs=BlobStore(tmp_path / "models"),
            name="junk",
            framework="onnx",
            files=[service.UploadedFile("model.onnx", b"not a model")],
            sample_input=b"[[1,2,3,4]]",
            expected_output=b"[0]",
            max_bytes=10_000,
        )


@pytest.mark.parametrize("name", ["Iris", "-iris", "", "a" * 64, "iris/1", "ir is"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidInput):
        service.check_name(name)


def test_admin_token_is_required(running_hub: RunningHub) -> None:
    anonymous = running_hub.client.get("/api/v1/models", headers={"Authorization": ""})
    assert anonymous.status_code == 401
    wrong = running_hub.client.get("/api/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert running_hub.client.get("/healthz", headers={"Authorization": ""}).status_code == 200


def _register_tflite(session: Session, blobs: BlobStore, name: str) -> int:
    # The committed TFLite example: checked on the hub in milliseconds, fast enough for a race.
    tflite = committed_model()
    row = service.register_model(
        session=session,
        blobs=blobs,
        name=name,
        framework="tflite",
        files=[service.UploadedFile("model.tflite", tflite.model.read_bytes())],
        sample_input=tflite.sample_input.read_bytes(),
        expected_output=tflite.expected_output.read_bytes(),
        max_bytes=10_000,
    )
    return row.version


def test_concurrent_registrations_get_distinct_versions(engine: Engine, tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "models")
    versions: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def register() -> None:
        try:
            with Session(engine) as s:
                v = _register_tflite(s, blobs, "race")
            with lock:
                versions.append(v)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=register) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(versions) == list(range(1, 9))


def test_migration_creates_the_models_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    assert diff == []


@pytest.mark.skipif(not pg_available(), reason="no PostgreSQL at 127.0.0.1:5432")
def test_registry_on_postgresql(tmp_path: Path) -> None:
    with pg_schema() as url:
        upgrade(url)
        engine = make_engine(url)
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        blobs = BlobStore(tmp_path / "models")
        with Session(engine) as s:
            assert _register_tflite(s, blobs, "pg-model") == 1
            assert _register_tflite(s, blobs, "pg-model") == 2
            row = service.get_version(session=s, name="pg-model", version="latest")
            assert row.version == 2
            assert row.created_at.tzinfo is not None
            assert [m.latest_version for m in service.list_models(session=s)] == [2]
        engine.dispose()
