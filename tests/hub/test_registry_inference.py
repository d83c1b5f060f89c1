"""The inference config at registration: entry script, PEP 508 requirements and runtime options,
checked as a device will check them, stored with the version, shown by the API and CLI, and
carried by the package's manifest."""

import io
import json
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from alembic import command as alembic_command
from click.testing import CliRunner
from sqlalchemy import text
from sqlmodel import Session, select

from agent.protocol.documents import Manifest
from hub.cli import main
from hub.database import make_engine
from hub.migrations.runner import alembic_config, upgrade
from hub.packages.service import ensure_package, package_path
from hub.registry.models import ModelVersion

from .conftest import RunningHub, ServedHub

if TYPE_CHECKING:
    from examples.build_example_model import IrisModel

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "score_iris"
# Registering must not run or import it: if the hub did, this would leave a file behind.
POISON = b"open('/tmp/outpost-hub-ran-user-code', 'w').write('ran')\ndef init(): pass\n"


def register(
    hub: RunningHub,
    iris: "IrisModel",
    *,
    script: tuple[str, bytes] | None = ("score.py", (EXAMPLE / "score.py").read_bytes()),
    requirements: list[str] | None = None,
    options: list[str] | None = None,
    framework: str = "onnx",
    sample: bytes | None = None,
    expected: bytes | None = None,
) -> Any:
    files: list[tuple[str, tuple[str, bytes]]] = [
        ("files", ("model.onnx", iris.model.read_bytes())),
        (
            "sample_input",
            ("sample_input.json", sample or (EXAMPLE / "sample_input.json").read_bytes()),
        ),
        (
            "expected_output",
            ("expected_output.json", expected or (EXAMPLE / "expected_output.json").read_bytes()),
        ),
    ]
    if script is not None:
        files.append(("entry_script", script))
    data: dict[str, Any] = {"name": "iris-script", "framework": framework}
    if requirements:
        data["requirements"] = requirements
    if options:
        data["options"] = options
    return hub.client.post("/api/v1/models", data=data, files=files)


def test_an_entry_script_model_is_stored_with_its_config_and_not_run_on_the_hub(
    running_hub: RunningHub, iris_model: "IrisModel"
) -> None:
    marker = Path("/tmp/outpost-hub-ran-user-code")
    marker.unlink(missing_ok=True)
    response = register(
        running_hub,
        iris_model,
        script=("score.py", POISON),
        requirements=["numpy>=1.26", "onnxruntime >= 1.17 ; python_version >= '3.11'"],
        options=["timeout_ms=2000", "init_timeout_ms = 30000"],
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["runtime"] == {
        "kind": "script",
        "entry_script": "score.py",
        "requirements": ["numpy>=1.26", 'onnxruntime>=1.17; python_version >= "3.11"'],
        "options": {"timeout_ms": 2000, "init_timeout_ms": 30000},
    }
    assert body["signature"] == {"inputs": [], "outputs": []}
    assert body["model_file"] == "model.onnx"
    assert {f["path"] for f in body["files"]} == {
        "model.onnx",
        "score.py",
        "sample_input.json",
        "expected_output.json",
    }
    assert not marker.exists(), "the hub ran the entry script"
    shown = running_hub.client.get("/api/v1/models/iris-script/1").json()
    assert shown["runtime"] == body["runtime"]


def test_options_of_a_builtin_runtime_are_typed_and_checked(
    running_hub: RunningHub, iris_model: "IrisModel"
) -> None:
    response = running_hub.register_iris(
        iris_model, options=["threads=2", "providers=CUDAExecutionProvider,CPUExecutionProvider"]
    )
    assert response.status_code == 201, response.text
    assert response.json()["runtime"] == {
        "kind": "builtin",
        "entry_script": None,
        "requirements": [],
        "options": {"threads": 2, "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]},
    }
    # The built-in runtime's model is still checked on the hub.
    assert response.json()["signature"]["inputs"][0]["name"] == "input"


@pytest.mark.parametrize(
    ("form", "words"),
    [
        (
            {"options": ["timeout=5"]},
            "it takes init_timeout_ms, timeout_ms, warmup",
        ),
        ({"options": ["timeout_ms=soon"]}, "timeout_ms: Input should be a valid integer"),
        ({"options": ["timeout_ms=0"]}, "timeout_ms: Input should be greater than or equal to 1"),
        ({"options": ["timeout_ms"]}, "invalid runtime option 'timeout_ms': use key=value"),
        ({"options": ["warmup=1", "warmup=2"]}, "runtime option 'warmup' given twice"),
        ({"requirements": ["numpy >="]}, "invalid requirement: 'numpy >=' is not a PEP 508"),
        ({"requirements": ["pkg @ https://example.com/p.whl"]}, "names a URL"),
        ({"script": ("score.txt", b"x")}, "the entry script must be a .py file"),
        ({"script": ("model.onnx", b"x")}, "file 'model.onnx' given twice"),
        ({"script": ("sample_input.json", b"x")}, "reserved for the health check"),
        (
            {"script": None, "requirements": ["numpy"]},
            "requirements are those of an entry script",
        ),
        ({"script": None, "options": ["timeout_ms=5"]}, "it takes providers, threads, warmup"),
    ],
)
def test_a_bad_inference_config_is_a_422_that_says_what_is_wrong(
    running_hub: RunningHub, iris_model: "IrisModel", form: dict[str, Any], words: str
) -> None:
    response = register(running_hub, iris_model, **form)
    assert response.status_code == 422, response.text
    assert words in response.json()["detail"]
    assert running_hub.client.get("/api/v1/models").json() == []


def test_the_package_manifest_carries_the_runtime_spec(
    running_hub: RunningHub, iris_model: "IrisModel"
) -> None:
    response = register(
        running_hub, iris_model, requirements=["numpy>=1.26"], options=["timeout_ms=1500"]
    )
    assert response.status_code == 201, response.text
    ctx = running_hub.ctx
    with Session(ctx.engine) as session:
        row = session.exec(select(ModelVersion).where(ModelVersion.name == "iris-script")).one()
        package = ensure_package(
            session=session,
            keys=ctx.keys,
            blobs=ctx.blobs,
            packages_dir=ctx.settings.packages_dir,
            model_version=row,
            max_package_bytes=10_000_000,
        )
        archive = package_path(ctx.settings.packages_dir, package.digest).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        manifest = Manifest.model_validate_json(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        script = tar.extractfile("files/score.py").read()  # type: ignore[union-attr]
    assert manifest.runtime.kind == "script"
    assert manifest.runtime.model_file == "model.onnx"
    assert manifest.runtime.entry_script == "score.py"
    assert manifest.runtime.requirements == ["numpy>=1.26"]
    assert manifest.runtime.options == {"timeout_ms": 1500}
    assert script == (EXAMPLE / "score.py").read_bytes()


def _cli(hub: ServedHub, *args: str) -> Any:
    return CliRunner().invoke(
        main,
        list(args),
        env={"OUTPOST_HUB_URL": hub.url, "OUTPOST_HUB_TOKEN": hub.token},
        catch_exceptions=False,
    )


def test_the_cli_registers_an_entry_script_and_shows_its_config(
    served_hub: ServedHub, iris_model: "IrisModel", tmp_path: Path
) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# what score.py imports\nnumpy>=1.26  # arrays\n\nonnxruntime\n")
    helper = tmp_path / "labels.json"
    helper.write_text(json.dumps(["setosa", "versicolor", "virginica"]))
    result = _cli(
        served_hub,
        "model",
        "register",
        str(iris_model.model),
        str(helper),
        "--name",
        "iris-script",
        "--framework",
        "onnx",
        "--sample-input",
        str(EXAMPLE / "sample_input.json"),
        "--expected-output",
        str(EXAMPLE / "expected_output.json"),
        "--entry-script",
        str(EXAMPLE / "score.py"),
        "--requirements-file",
        str(requirements),
        "--requirement",
        "packaging>=23",
        "--option",
        "timeout_ms=2000",
        "--option",
        "warmup=1",
    )
    assert result.exit_code == 0, result.output
    assert "registered iris-script:1 (script score.py (timeout_ms=2000 warmup=1))" in result.output
    shown = _cli(served_hub, "model", "show", "iris-script")
    assert shown.exit_code == 0, shown.output
    assert "  runtime script score.py (timeout_ms=2000 warmup=1)" in shown.output
    for spec in ("packaging>=23", "numpy>=1.26", "onnxruntime"):
        assert f"  needs  {spec}" in shown.output
    assert "file   labels.json" in shown.output

    bad = _cli(
        served_hub,
        "model",
        "register",
        str(iris_model.model),
        "--name",
        "iris-script",
        "--framework",
        "onnx",
        "--sample-input",
        str(EXAMPLE / "sample_input.json"),
        "--expected-output",
        str(EXAMPLE / "expected_output.json"),
        "--option",
        "timeout_ms=5",
    )
    assert bad.exit_code != 0
    assert "it takes providers, threads, warmup" in bad.output
    requirements.write_text("-r other.txt\n")
    pip_option = _cli(
        served_hub,
        "model",
        "register",
        str(iris_model.model),
        "--name",
        "x",
        "--framework",
        "onnx",
        "--sample-input",
        "a",
        "--expected-output",
        "b",
        "--entry-script",
        str(EXAMPLE / "score.py"),
        "--requirements-file",
        str(requirements),
    )
    assert pip_option.exit_code == 2
    assert "requirements.txt:1: '-r other.txt': only requirements" in pip_option.output


def test_the_migration_gives_earlier_versions_the_builtin_runtime(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url, "0009")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO model_version (name, version, framework, description, tags,"
                " signature, model_file, sample_input, expected_output, created_at)"
                " VALUES ('old', 1, 'onnx', '', '{}', '{}', 'model.onnx', 's.json', 'e.json',"
                " '2026-12-01 00:00:00')"
            )
        )
    upgrade(url, "0010")
    with Session(engine) as session:
        row = session.get(ModelVersion, 1)
        assert row is not None
        assert (row.runtime_kind, row.entry_script, row.requirements, row.runtime_options) == (
            "builtin",
            None,
            [],
            {},
        )
    alembic_command.downgrade(alembic_config(url), "0009")
    with engine.connect() as conn:
        columns = [r[1] for r in conn.execute(text("PRAGMA table_info(model_version)"))]
    assert "runtime_kind" not in columns
    engine.dispose()
