"""Entry scripts in a worker process: real ``score.py`` files, real worker processes, the real
iris ONNX model; crashes, hangs and crash loops injected by the scripts themselves."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from agent.core import Agent
from agent.errors import HealthCheckError, IncompatibleError, ModelCallError, ModelLoadError
from agent.jsonvalues import JsonText
from agent.protocol.canonical import canonical_bytes
from agent.protocol.documents import (
    DetachedSignatures,
    FileEntry,
    Framework,
    HealthCheck,
    Manifest,
    ModelInfo,
    ModelSignature,
    PackageRef,
    RuntimeSpec,
    TensorSpec,
    document_dict,
)
from agent.protocol.messages import Reason, Step
from agent.protocol.package import FILES_DIR, MANIFEST_NAME, SIGNATURE_NAME
from agent.runtimes import load_runtime
from agent.runtimes.health import check_health
from agent.runtimes.options import ScriptOptions
from agent.runtimes.script import (
    IN_PLACE_WAIT_S,
    QUICK_REPLY_S,
    ScriptRuntime,
    Supervision,
    WorkerState,
    WorkerStats,
)
from agent.runtimes.script_worker import (
    FRAME_HEADER,
    MAX_FRAME_BYTES,
    FrameReader,
    FrameTooLarge,
    take_frame,
    whole_frame,
)
from agent.telemetry import ModelCalls
from tests.support.agents import DEVICE, AgentThread, fast_settings, running_agent
from tests.support.fake_hub import FakeHub
from tests.support.repository import BuiltPackage, RepositorySimulator, regular, tar_bytes
from tests.support.waiting import wait_until

if TYPE_CHECKING:
    from collections.abc import Iterator

    from examples.build_example_model import IrisModel

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "score_iris"
FAST = Supervision(backoff_first_s=0.01, backoff_max_s=0.05)
IRIS_ROWS = [
    {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2},
    {"sepal_length": 6.9, "sepal_width": 3.2, "petal_length": 5.7, "petal_width": 2.3},
]


def manifest(
    *,
    entry: str | None = "score.py",
    requirements: list[str] | None = None,
    options: dict[str, str | int | bool | list[str]] | None = None,
    signature: ModelSignature | None = None,
) -> Manifest:
    return Manifest(
        model=ModelInfo(name="scripted", version=1, framework=Framework.ONNX),
        runtime=RuntimeSpec(
            kind="script",
            model_file="model.onnx",
            entry_script=entry,
            requirements=requirements or [],
            options=options or {},
        ),
        signature=signature or ModelSignature(),
        files=[],
        health_check=HealthCheck(input="sample_input.json", expected_output="expected_output.json"),
        created_at=datetime(2024, 1, 1, tzinfo=UTC),
    )


def write_script(directory: Path, source: str, name: str = "score.py") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(textwrap.dedent(source), encoding="utf-8")
    return directory


class Runtimes:
    """Starts runtimes for a test and closes every one of them at its end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[ScriptRuntime] = []

    def start(
        self,
        source: str,
        *,
        supervision: Supervision = FAST,
        timeout_ms: int = 5000,
        init_timeout_ms: int = 20_000,
        files: Path | None = None,
    ) -> ScriptRuntime:
        directory = files or write_script(self.tmp_path / f"files-{len(self.started)}", source)
        options = ScriptOptions(timeout_ms=timeout_ms, init_timeout_ms=init_timeout_ms)
        runtime = ScriptRuntime.start(directory, manifest(), options, supervision)
        self.started.append(runtime)
        return runtime


@pytest.fixture
def runtimes(tmp_path: Path) -> Iterator[Runtimes]:
    made = Runtimes(tmp_path)
    yield made
    for runtime in made.started:
        runtime.close()


def alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def call(runtime: ScriptRuntime, data: Any) -> Any:
    return runtime.run_raw(json.dumps({"data": data}).encode(), "application/json")


# -- serving ------------------------------------------------------------------------------------


@pytest.fixture
def iris_files(iris_model: IrisModel, tmp_path: Path) -> Path:
    """The example score.py beside the iris model, as a package's files folder holds them."""
    files = tmp_path / "iris-files"
    files.mkdir()
    shutil.copy(iris_model.model, files / "model.onnx")
    for name in ("score.py", "sample_input.json", "expected_output.json"):
        shutil.copy(EXAMPLE / name, files / name)
    return files


def test_the_example_script_pre_and_post_processes_around_the_onnx_model(
    iris_files: Path, runtimes: Runtimes
) -> None:
    runtime = runtimes.start("", files=iris_files)
    result = call(runtime, IRIS_ROWS)
    assert result["species"] == ["setosa", "virginica"]
    assert result["probabilities"][0]["setosa"] > 0.9
    assert set(result["probabilities"][1]) == {"setosa", "versicolor", "virginica"}
    # Plain rows in the model's order work too, and a bad row is the script's 500.
    assert call(runtime, [[5.0, 2.0, 3.5, 1.0]])["species"] == ["versicolor"]
    with pytest.raises(ModelCallError) as raised:
        call(runtime, [{"sepal_length": 1}])
    assert raised.value.status == 500
    assert "score.py raised ValueError: a row lacks sepal_width" in raised.value.detail


def test_load_runtime_warms_up_and_the_health_check_passes_through_the_script(
    iris_files: Path,
) -> None:
    runtime = load_runtime(iris_files, manifest(options={"warmup": 2, "timeout_ms": 3000}))
    try:
        assert isinstance(runtime, ScriptRuntime)
        check_health(runtime, iris_files, manifest().health_check)
        (iris_files / "expected_output.json").write_text('{"species": ["setosa", "x", "y"]}')
        with pytest.raises(HealthCheckError, match="species"):
            check_health(runtime, iris_files, manifest().health_check)
    finally:
        runtime.close()


def test_the_worker_gets_the_model_folder_in_both_variables_and_first_on_its_path(
    runtimes: Runtimes, tmp_path: Path
) -> None:
    files = write_script(
        tmp_path / "env",
        """
        import os, sys
        import helper  # a module of the package, beside the script

        def init():
            pass

        def run(raw_data):
            return {
                "outpost": os.environ["OUTPOST_MODEL_DIR"],
                "azure": os.environ["AZUREML_MODEL_DIR"],
                "cwd": os.getcwd(),
                "path0": sys.path[0],
                "helper": helper.VALUE,
                "raw_type": type(raw_data).__name__,
            }
        """,
    )
    (files / "helper.py").write_text("VALUE = 42\n")
    runtime = runtimes.start("", files=files)
    got = call(runtime, [1])
    assert got["outpost"] == got["azure"] == got["cwd"] == got["path0"] == str(files)
    assert (got["helper"], got["raw_type"]) == (42, "str")
    assert not (files / "__pycache__").exists(), "the verified folder is left as it was"


def test_json_bodies_arrive_as_text_and_binary_bodies_as_bytes(runtimes: Runtimes) -> None:
    runtime = runtimes.start(
        """
        def init():
            pass

        def run(raw_data):
            return [type(raw_data).__name__, len(raw_data)]
        """
    )
    assert runtime.run_raw('{"data": "é"}'.encode(), "application/json") == ["str", 13]
    assert runtime.run_raw(b"\x00\xff\x10", "application/octet-stream") == ["bytes", 3]
    assert runtime.run_raw(b"plain", "") == ["str", 5]
    with pytest.raises(ModelCallError) as raised:
        runtime.run_raw(b"\xff\xfe", "application/json")
    assert raised.value.status == 400


def test_print_and_c_level_writes_do_not_break_the_protocol(runtimes: Runtimes) -> None:
    runtime = runtimes.start(
        """
        import os, sys

        def init():
            print("loading")

        def run(raw_data):
            print("a line on stdout", raw_data)
            os.write(1, b"bytes straight to fd 1\\n")
            sys.stdout.flush()
            return "answer"
        """
    )
    for _ in range(3):
        assert call(runtime, [1, 2]) == "answer"


def test_numpy_results_are_converted_and_predict_keys_outputs(runtimes: Runtimes) -> None:
    runtime = runtimes.start(
        """
        import json
        import numpy as np

        def init():
            pass

        def run(raw_data):
            data = json.loads(raw_data)["data"]
            if data == "dict":
                return {"scores": np.arange(3, dtype=np.float32), "best": np.int64(2)}
            if data == "text":
                return json.dumps({"label": [1]})
            return np.array(data) * 2
        """
    )
    assert runtime.predict([1, 2]) == {"result": [2, 4]}
    assert runtime.predict("dict") == {"scores": [0.0, 1.0, 2.0], "best": 2}
    # A script that returns JSON text, as Azure samples do, is compared by its value.
    assert runtime.predict("text") == {"label": [1]}
    assert call(runtime, "text") == '{"label": [1]}'


def test_the_signature_is_the_manifests(tmp_path: Path) -> None:
    declared = ModelSignature(inputs=[TensorSpec(name="rows", dtype="float32", shape=[None, 4])])
    files = write_script(tmp_path / "sig", "def init(): pass\ndef run(raw_data): return 1\n")
    runtime = ScriptRuntime.start(files, manifest(signature=declared), ScriptOptions(), FAST)
    try:
        assert runtime.signature() == declared
    finally:
        runtime.close()


def test_concurrent_callers_are_served_one_at_a_time(runtimes: Runtimes) -> None:
    runtime = runtimes.start(
        """
        import json, os, time

        busy = False

        def init():
            pass

        def run(raw_data):
            global busy
            assert not busy, "two calls at once"
            busy = True
            time.sleep(0.002)
            busy = False
            return json.loads(raw_data)["data"]
        """
    )
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def caller(n: int) -> None:
        try:
            for i in range(10):
                results[n * 100 + i] = call(runtime, n * 100 + i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert results == {key: key for key in results}
    assert len(results) == 60


# -- failing scripts ----------------------------------------------------------------------------


def test_an_exception_in_run_is_a_500_naming_it_and_the_worker_serves_on(
    runtimes: Runtimes,
) -> None:
    runtime = runtimes.start(
        """
        import json

        def init():
            pass

        def run(raw_data):
            if json.loads(raw_data)["data"] == "bad":
                raise ValueError("no such flower")
            return "fine"
        """
    )
    pid = runtime.worker_pid
    with pytest.raises(ModelCallError) as raised:
        call(runtime, "bad")
    assert raised.value.status == 500
    assert raised.value.detail == (
        "score.py raised ValueError: no such flower (score.py, line 9, in run)"
    )
    assert call(runtime, "good") == "fine"
    assert runtime.worker_pid == pid
    assert runtime.stats().crashes == 0


def test_a_result_json_cannot_hold_is_a_500(runtimes: Runtimes) -> None:
    runtime = runtimes.start("def init(): pass\ndef run(raw_data): return {1, 2}\n")
    with pytest.raises(ModelCallError) as raised:
        call(runtime, 1)
    assert raised.value.status == 500
    assert "set is not JSON serializable" in raised.value.detail


HANGS_ON_REQUEST = """
    import json, time

    def init():
        pass

    def run(raw_data):
        if json.loads(raw_data)["data"] == "hang":
            while True:
                time.sleep(1)
        return "ok"
    """


def test_a_hung_call_is_a_504_within_the_limit_and_the_worker_is_replaced(
    runtimes: Runtimes,
) -> None:
    runtime = runtimes.start(HANGS_ON_REQUEST, timeout_ms=300)
    first_pid = runtime.worker_pid
    assert first_pid is not None
    started = time.monotonic()
    with pytest.raises(ModelCallError) as raised:
        call(runtime, "hang")
    took_s = time.monotonic() - started
    assert raised.value.status == 504
    assert "did not answer within 300 ms" in raised.value.detail
    assert 0.3 <= took_s < 3.0
    assert not alive(first_pid), "the hung worker was killed"
    wait_until(lambda: runtime.stats().state is WorkerState.OK, 10, "the restart")
    assert call(runtime, "fine") == "ok"
    assert runtime.worker_pid not in (None, first_pid)
    stats = runtime.stats()
    assert (stats.timeouts, stats.restarts, stats.crashes) == (1, 1, 0)


def test_callers_waiting_behind_a_hung_call_are_told_busy(runtimes: Runtimes) -> None:
    runtime = runtimes.start(HANGS_ON_REQUEST, timeout_ms=500)
    outcomes: list[int] = []

    def hang() -> None:
        with pytest.raises(ModelCallError) as raised:
            call(runtime, "hang")
        outcomes.append(raised.value.status)

    hanging = threading.Thread(target=hang)
    hanging.start()
    wait_until(lambda: runtime._call_lock.locked(), 5, "the hung call to start")
    with pytest.raises(ModelCallError) as raised:
        call(runtime, "fine")
    hanging.join(10)
    assert raised.value.status == 503  # busy, or the restart under way
    assert outcomes == [504]


@pytest.mark.parametrize(
    ("crash", "words"),
    [("os._exit(3)", "exited with code 3"), ("os.kill(os.getpid(), 11)", "was killed by SIGSEGV")],
)
def test_a_worker_that_dies_in_a_call_is_a_503_and_comes_back(
    runtimes: Runtimes, crash: str, words: str
) -> None:
    runtime = runtimes.start(
        f"""
        import json, os, sys

        def init():
            pass

        def run(raw_data):
            if json.loads(raw_data)["data"] == "die":
                print("about to go", file=sys.stderr, flush=True)
                {crash}
            return "alive"
        """
    )
    with pytest.raises(ModelCallError) as raised:
        call(runtime, "die")
    assert raised.value.status == 503
    assert f"score.py's worker {words} during the call" in raised.value.detail
    assert "about to go" in raised.value.detail
    wait_until(lambda: runtime.stats().state is WorkerState.OK, 10, "the restart")
    assert call(runtime, "live") == "alive"
    assert runtime.stats().crashes == 1


def test_a_worker_that_dies_between_calls_is_restarted_before_the_next_one(
    runtimes: Runtimes, tmp_path: Path
) -> None:
    files = write_script(
        tmp_path / "between",
        """
        import os, threading

        def init():
            if os.path.exists("die-soon"):
                os.remove("die-soon")
                threading.Timer(0.2, os._exit, args=(4,)).start()

        def run(raw_data):
            return os.getpid()
        """,
    )
    (files / "die-soon").touch()
    runtime = runtimes.start("", files=files)
    first = runtime.worker_pid
    wait_until(lambda: runtime.stats().crashes == 1, 10, "the worker's death to be noticed")
    wait_until(lambda: runtime.stats().state is WorkerState.OK, 10, "the restart")
    assert call(runtime, None) not in (None, first)


def test_repeated_failures_are_a_crash_loop_that_refuses_calls_at_once(
    runtimes: Runtimes, caplog: pytest.LogCaptureFixture
) -> None:
    loop = Supervision(
        backoff_first_s=0.01, backoff_max_s=60, crash_loop_failures=3, crash_loop_window_s=60
    )
    runtime = runtimes.start(
        "import os\ndef init(): pass\ndef run(raw_data): os._exit(9)\n", supervision=loop
    )
    for _ in range(3):
        wait_until(lambda: runtime.stats().state is not WorkerState.RESTARTING, 10, "restart")
        with pytest.raises(ModelCallError) as raised:
            call(runtime, 1)
        assert raised.value.status == 503
    stats = runtime.stats()
    assert stats.state is WorkerState.CRASH_LOOP
    assert stats.crashes == 3
    started = time.monotonic()
    with pytest.raises(ModelCallError) as raised:
        call(runtime, 1)
    assert time.monotonic() - started < 0.5, "refused at once, no worker involved"
    assert raised.value.status == 503
    assert "crash loop (3 failures within 60 s" in raised.value.detail
    assert "exited with code 9" in raised.value.detail
    errors = [r for r in caplog.records if r.levelname == "ERROR" and "crash loop" in r.message]
    assert len(errors) == 1


def test_a_crash_loop_ends_when_its_failures_leave_the_window(runtimes: Runtimes) -> None:
    window = Supervision(
        backoff_first_s=0.01, backoff_max_s=0.05, crash_loop_failures=2, crash_loop_window_s=2.0
    )
    runtime = runtimes.start(HANGS_ON_REQUEST, supervision=window, timeout_ms=100)
    for _ in range(2):
        wait_until(lambda: runtime.stats().state is WorkerState.OK, 10, "restart")
        with pytest.raises(ModelCallError):
            call(runtime, "hang")
    assert runtime.stats().state is WorkerState.CRASH_LOOP
    wait_until(lambda: runtime.stats().state is WorkerState.OK, 10, "the window to pass")
    assert call(runtime, "fine") == "ok"
    assert runtime.stats().timeouts == 2


# -- starting -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "def init():\n    raise RuntimeError('no weights')\ndef run(raw_data): pass\n",
            "init() raised RuntimeError: no weights (score.py, line 2, in init)",
        ),
        ("def init(): pass\n", "score.py defines no run(raw_data) function"),
        ("def run(raw_data): pass\n", "score.py defines no init() function"),
        (
            "import surely_not_a_module\n",
            "importing score.py raised ModuleNotFoundError: No module named 'surely_not_a_module'",
        ),
        ("def init(:\n", "importing score.py raised SyntaxError"),
        (
            "import os\ndef init():\n    print('bye')\n    os._exit(7)\ndef run(raw_data): pass\n",
            "score.py's worker exited with code 7 before init() finished (its last output: bye)",
        ),
    ],
)
def test_a_script_that_cannot_start_is_a_model_load_error(
    tmp_path: Path, source: str, message: str
) -> None:
    files = write_script(tmp_path / "bad", source)
    with pytest.raises(ModelLoadError) as raised:
        ScriptRuntime.start(files, manifest(), ScriptOptions(), FAST)
    assert message in raised.value.detail


def test_an_init_past_its_limit_is_a_model_load_error_and_leaves_no_process(
    tmp_path: Path,
) -> None:
    files = write_script(
        tmp_path / "slow",
        """
        import os, time
        def init():
            with open("pid", "w") as f:
                f.write(str(os.getpid()))
            time.sleep(60)
        def run(raw_data): pass
        """,
    )
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"init\(\) did not finish within 300 ms"):
        ScriptRuntime.start(files, manifest(), ScriptOptions(init_timeout_ms=300), FAST)
    assert time.monotonic() - started < 5
    assert not alive(int((files / "pid").read_text()))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (None, "names no entry_script"),
        ("missing.py", "'missing.py' is not among the package's files"),
        ("../score.py", "outside the package's files"),
    ],
)
def test_a_missing_entry_script_is_a_model_load_error(
    tmp_path: Path, entry: str | None, message: str
) -> None:
    files = write_script(tmp_path / "files", "def init(): pass\ndef run(raw_data): pass\n")
    write_script(tmp_path, "def init(): pass\ndef run(raw_data): pass\n")
    with pytest.raises(ModelLoadError, match=message):
        ScriptRuntime.start(files, manifest(entry=entry), ScriptOptions(), FAST)


def test_unmet_requirements_refuse_the_package_before_any_worker_starts(tmp_path: Path) -> None:
    files = write_script(tmp_path / "req", "open('started', 'w')\ndef init(): pass\n")
    needs = ["surely-not-installed-pkg>=1", "numpy>=999", "numpy>=1", "pywin32; os_name == 'nt'"]
    with pytest.raises(IncompatibleError) as raised:
        ScriptRuntime.start(files, manifest(requirements=needs), ScriptOptions(), FAST)
    assert raised.value.detail.startswith(
        "score.py needs surely-not-installed-pkg>=1 (not installed); numpy>=999 ("
    )
    assert raised.value.detail.endswith(" installed)")
    assert not (files / "started").exists()


# -- ending -------------------------------------------------------------------------------------


def test_close_kills_the_worker_and_its_children_and_refuses_later_calls(
    runtimes: Runtimes,
) -> None:
    runtime = runtimes.start(
        """
        import subprocess, sys

        child = None

        def init():
            global child
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

        def run(raw_data):
            return child.pid
        """
    )
    worker = runtime.worker_pid
    assert worker is not None
    child = call(runtime, None)
    assert alive(worker)
    assert alive(child)
    runtime.close()
    assert not alive(worker)
    wait_until(lambda: not alive(child), 5, "the script's own child to be killed")
    with pytest.raises(ModelCallError) as raised:
        call(runtime, None)
    assert (raised.value.status, "stopped serving" in raised.value.detail) == (503, True)
    runtime.close()  # again: nothing left to do, and no error
    assert runtime.stats().state is WorkerState.CLOSED


def test_close_lets_a_call_in_flight_finish(runtimes: Runtimes) -> None:
    runtime = runtimes.start(
        """
        import time
        def init(): pass
        def run(raw_data):
            time.sleep(0.3)
            return "finished"
        """
    )
    answers: list[Any] = []
    caller = threading.Thread(target=lambda: answers.append(call(runtime, None)))
    caller.start()
    wait_until(lambda: runtime._call_lock.locked(), 5, "the call to start")
    runtime.close()
    caller.join(5)
    assert answers == ["finished"]


def test_workers_die_with_their_agent_even_while_user_code_hangs(tmp_path: Path) -> None:
    """The lifeline: an agent killed with SIGKILL closes nothing, yet no worker is left."""
    files = write_script(
        tmp_path / "orphan",
        """
        import time
        def init(): pass
        def run(raw_data):
            while True:
                time.sleep(1)
        """,
    )
    agent = textwrap.dedent(
        f"""
        import os, sys, threading
        from pathlib import Path
        from agent.runtimes.options import ScriptOptions
        from agent.runtimes.script import ScriptRuntime
        from tests.agent.test_runtime_script import manifest

        runtime = ScriptRuntime.start(Path({str(files)!r}), manifest(), ScriptOptions())
        threading.Thread(target=runtime.run_raw, args=(b"{{}}", ""), daemon=True).start()
        print(runtime.worker_pid, flush=True)
        sys.stdin.read()  # until the test kills this process
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", agent],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
        text=True,
    )
    try:
        assert proc.stdout is not None
        worker = int(proc.stdout.readline())
        assert alive(worker)
        proc.kill()
        proc.wait(10)
        wait_until(lambda: not alive(worker), 10, "the orphaned worker to exit")
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdin is not None:
            proc.stdin.close()
        if proc.stdout is not None:
            proc.stdout.close()


# -- in the agent: replaced, rolled back, refused, uninstalled, stopped ------------------------

AGENT_SCRIPT = b"""
import json, os

scale = None

def init():
    global scale
    with open(os.path.join(os.environ["OUTPOST_MODEL_DIR"], "weights.json")) as f:
        scale = json.load(f)["scale"]

def run(raw_data):
    data = json.loads(raw_data)["data"]
    if data == "die":
        os._exit(5)
    return {"scaled": [x * scale for x in data], "pid": os.getpid()}
"""


def script_package(
    repo: RepositorySimulator,
    iris: IrisModel,
    *,
    version: int,
    scale: int = 2,
    expected: bytes = b'{"scaled": [2, 4]}',
    requirements: list[str] | None = None,
) -> BuiltPackage:
    """A signed package whose runtime is the entry script above (the simulator builds built-in
    ones only)."""
    files = {
        "score.py": AGENT_SCRIPT,
        "model.onnx": iris.model.read_bytes(),  # checked for external data like any ONNX model
        "weights.json": json.dumps({"scale": scale}).encode(),
        "sample_input.json": b"[1, 2]",
        "expected_output.json": expected,
    }
    manifest = Manifest(
        model=ModelInfo(name="scripted", version=version, framework=Framework.ONNX),
        runtime=RuntimeSpec(
            kind="script",
            model_file="model.onnx",
            entry_script="score.py",
            requirements=requirements or [],
            options={"timeout_ms": 2000},
        ),
        files=[
            FileEntry(path=p, size=len(d), sha256=hashlib.sha256(d).hexdigest())
            for p, d in sorted(files.items())
        ],
        health_check=HealthCheck(input="sample_input.json", expected_output="expected_output.json"),
        created_at=repo.now,
    )
    doc = document_dict(manifest)
    signature = DetachedSignatures(signatures=[repo.release.sign(doc)])
    members = [
        regular(MANIFEST_NAME, canonical_bytes(doc)),
        regular(SIGNATURE_NAME, signature.model_dump_json().encode()),
        *(regular(f"{FILES_DIR}/{p}", d) for p, d in sorted(files.items())),
    ]
    data = tar_bytes(members)
    return BuiltPackage(data, repo.ref_for(data, manifest), manifest)


def workers_of(state_dir: Path) -> set[int]:
    """The live worker processes running a script from this agent's state directory."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ours = any(b"script_worker" in a for a in argv) and any(
            str(state_dir).encode() in a for a in argv
        )
        if ours and alive(int(proc.name)):
            found.add(int(proc.name))
    return found


def served_pid(runner: AgentThread) -> int | None:
    model = runner.call(lambda: runner.agent.get("scripted"))  # type: ignore[union-attr]
    if model is None:
        return None
    return model.runtime.worker_pid  # type: ignore[no-any-return]


def steps(hub: FakeHub, ref: PackageRef) -> list[Step]:
    return [
        e.step
        for _, e in hub.events
        if e.digest == ref.digest and e.deployment_id == ref.deployment_id
    ]


@pytest.mark.integration
def test_no_worker_outlives_its_version_replaced_rolled_back_refused_uninstalled_or_stopped(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: IrisModel
) -> None:
    v1, v2 = (
        script_package(repo, iris_model, version=1),
        script_package(repo, iris_model, version=2, scale=3, expected=b'{"scaled": [3, 6]}'),
    )
    broken = script_package(repo, iris_model, version=3, expected=b'{"scaled": [0, 0]}')
    hub.offer(v1, v2, broken)
    hub.desired[DEVICE] = repo.desired_message([v1.ref])
    with running_agent(state_dir) as (runner, _):
        hub.wait_for(lambda: Step.ACTIVE in steps(hub, v1.ref))
        first = served_pid(runner)
        assert workers_of(state_dir) == {first}

        hub.publish_desired(DEVICE, repo.desired_message([v2.ref]))  # replaced
        hub.wait_for(lambda: Step.ACTIVE in steps(hub, v2.ref))
        second = served_pid(runner)
        wait_until(lambda: workers_of(state_dir) == {second}, 10, "v1's worker to end")

        back = v1.ref.model_copy(update={"deployment_id": v2.ref.deployment_id})
        hub.publish_desired(DEVICE, repo.desired_message([back]))  # rolled back, from disk
        hub.wait_for(lambda: Step.ACTIVE in steps(hub, back))
        third = served_pid(runner)
        wait_until(lambda: workers_of(state_dir) == {third}, 10, "v2's worker to end")

        hub.publish_desired(DEVICE, repo.desired_message([broken.ref]))  # fails its check
        hub.wait_for(lambda: Step.FAILED in steps(hub, broken.ref))
        assert served_pid(runner) == third
        assert workers_of(state_dir) == {third}, "the refused version's worker is gone"

        hub.publish_desired(DEVICE, repo.desired_message([]))  # uninstalled
        wait_until(lambda: served_pid(runner) is None, 20, "the uninstall")
        wait_until(lambda: workers_of(state_dir) == set(), 10, "the last worker to end")

        hub.publish_desired(DEVICE, repo.desired_message([v2.ref]))
        hub.wait_for(
            lambda: steps(hub, v2.ref).count(Step.ACTIVE) >= 1 and served_pid(runner) is not None
        )
        last = served_pid(runner)
    # Stopped: the agent closed what it served.
    assert last is not None
    assert not alive(last)
    assert workers_of(state_dir) == set()
    for pid in (first, second, third):
        assert pid is not None
        assert not alive(pid)


@pytest.mark.integration
def test_unmet_requirements_fail_the_install_as_incompatible(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: IrisModel
) -> None:
    needy = script_package(
        repo, iris_model, version=1, requirements=["surely-not-installed-pkg>=1"]
    )
    hub.offer(needy)
    hub.desired[DEVICE] = repo.desired_message([needy.ref])
    with running_agent(state_dir):
        hub.wait_for(lambda: Step.FAILED in steps(hub, needy.ref))
    (failed,) = [e for _, e in hub.events if e.step is Step.FAILED]
    assert failed.reason is Reason.INCOMPATIBLE
    assert failed.detail == "score.py needs surely-not-installed-pkg>=1 (not installed)"
    assert workers_of(state_dir) == set()


def fast_loader(files_dir: Path, manifest: Manifest) -> Any:
    """load_runtime, with restarts quick enough for a test and a crash loop after 3 crashes."""
    if manifest.runtime.kind != "script":
        return load_runtime(files_dir, manifest)
    loop = Supervision(backoff_first_s=0.01, backoff_max_s=60, crash_loop_failures=3)
    return ScriptRuntime.start(files_dir, manifest, ScriptOptions(timeout_ms=2000), loop)


@pytest.mark.integration
def test_a_crash_loop_makes_the_device_degraded_and_is_reported_in_telemetry(
    hub: FakeHub, repo: RepositorySimulator, state_dir: Path, iris_model: IrisModel
) -> None:
    package = script_package(repo, iris_model, version=1)
    hub.offer(package)
    hub.desired[DEVICE] = repo.desired_message([package.ref])
    settings = fast_settings(state_dir, telemetry={"interval_s": 3600})
    runner = AgentThread(
        lambda: Agent(settings=settings, load_runtime=fast_loader, check_health=check_health)
    )
    agent = runner.start()
    try:
        hub.wait_for(lambda: Step.ACTIVE in steps(hub, package.ref))
        runtime = runner.call(lambda: agent.get("scripted")).runtime
        assert runner.call(agent.health) == "ok"
        for _ in range(3):
            wait_until(lambda: runtime.stats().state is not WorkerState.RESTARTING, 10, "restart")
            with pytest.raises(ModelCallError):
                call(runtime, "die")
        assert runner.call(agent.health) == "degraded"
        runner.run(agent.record_telemetry())
        hub.wait_for(lambda: len(hub.telemetry) >= 1)
        (record,) = hub.telemetry.values()
        assert record.health == "degraded"
        (stats,) = record.models
        assert (stats.model, stats.worker, stats.crashes, stats.restarts) == (
            "scripted",
            "crash_loop",
            3,
            2,
        )
    finally:
        runner.stop()
    assert workers_of(state_dir) == set()


def test_worker_totals_become_each_intervals_figures_and_builtin_models_carry_none() -> None:
    calls = ModelCalls(random.Random(0))
    key = ("scripted", 1)
    (first,) = calls.take([key], {key: WorkerStats(WorkerState.OK, 2, 1, 1)})
    assert (first.worker, first.restarts, first.timeouts, first.crashes) == ("ok", 2, 1, 1)
    (second,) = calls.take([key], {key: WorkerStats(WorkerState.CRASH_LOOP, 3, 1, 2)})
    assert (second.worker, second.restarts, second.timeouts, second.crashes) == (
        "crash_loop",
        1,
        0,
        1,
    )
    # Reinstalled: a new runtime counts from zero again.
    (third,) = calls.take([key], {key: WorkerStats(WorkerState.OK, 0, 0, 0)})
    assert (third.restarts, third.timeouts, third.crashes) == (0, 0, 0)
    (builtin,) = calls.take([("iris", 1)])
    assert builtin.worker is None
    assert "worker" not in builtin.model_dump_json(), "other models' telemetry is unchanged"


# -- calls from the event loop --------------------------------------------------------------------

SLOW_ECHO = """
import json, time

def init():
    pass

def run(raw_data):
    data = json.loads(raw_data)["data"]
    time.sleep(data.get("sleep", 0))
    return {"echo": data["n"]}
"""


def _nowait(runtime: ScriptRuntime, data: Any) -> Any:
    return runtime.run_raw_nowait(json.dumps({"data": data}).encode(), "application/json")


async def _settle(pending: JsonText | asyncio.Future[JsonText]) -> Any:
    """The value of a call from the loop, answered in place or not."""
    return (pending if isinstance(pending, JsonText) else await pending).value()


def test_a_call_from_the_event_loop_is_taken_at_once_when_the_worker_is_free(
    runtimes: Runtimes,
) -> None:
    runtime = runtimes.start(SLOW_ECHO)

    async def main() -> None:
        pending = _nowait(runtime, {"n": 1})
        assert pending is not None
        assert await _settle(pending) == {"echo": 1}
        # Taken by a thread's call: the loop does not wait for it, it says so (None).
        threaded = asyncio.create_task(asyncio.to_thread(call_in_thread))
        await asyncio.to_thread(wait_until, runtime._call_lock.locked, timeout_s=10)
        assert _nowait(runtime, {"n": 3}) is None
        assert await threaded == {"echo": 2}
        # Then the loop's call works again.
        pending = _nowait(runtime, {"n": 4})
        assert pending is not None
        assert await _settle(pending) == {"echo": 4}

    def call_in_thread() -> Any:
        return call(runtime, {"n": 2, "sleep": 0.3})

    asyncio.run(main())


def test_a_quick_script_is_answered_in_place_and_a_slow_one_through_the_loop(
    runtimes: Runtimes,
) -> None:
    """A script that answered its last call within QUICK_REPLY_S is waited for in place: its
    answer itself is returned. A slow answer sends the next call through the loop (a pending
    future) until an answer is quick again."""
    runtime = runtimes.start(SLOW_ECHO)
    slow_s = 0.05  # well past QUICK_REPLY_S, and past IN_PLACE_WAIT_S
    assert slow_s > IN_PLACE_WAIT_S > QUICK_REPLY_S

    async def in_place(first: int) -> tuple[int, Any]:
        """(n, answer) of the first of a few calls answered in place (the answer returned)."""
        for n in range(first, first + 50):
            pending = _nowait(runtime, {"n": n})
            assert pending is not None
            if isinstance(pending, JsonText):
                return n, pending.value()
            await pending  # e.g. the worker's first call, which may be slow
        raise AssertionError("a quick script was never answered in place")

    async def main() -> None:
        n, answer = await in_place(1)
        assert answer == {"echo": n}
        assert not runtime._call_lock.locked()

        slow = _nowait(runtime, {"n": 10, "sleep": slow_s})
        # Waited for in place at most IN_PLACE_WAIT_S, then through the loop.
        assert isinstance(slow, asyncio.Future)
        assert not slow.done()
        assert (await slow).value() == {"echo": 10}
        after_slow = _nowait(runtime, {"n": 11})
        # Not waited for in place: the last call was slow.
        assert isinstance(after_slow, asyncio.Future)
        assert not after_slow.done()
        assert (await after_slow).value() == {"echo": 11}
        n, answer = await in_place(12)  # in place again once an answer was quick
        assert answer == {"echo": n}

    asyncio.run(main())


def test_errors_from_the_loop_are_the_same_as_from_a_thread(runtimes: Runtimes) -> None:
    """A script that raises is a 500 and a worker that dies mid-call a 503, both answered
    through the loop (a failed call need not be quick); the next calls are answered in place
    again."""
    runtime = runtimes.start(
        """
        import json, os

        def init():
            pass

        def run(raw_data):
            what = json.loads(raw_data)["data"]
            if what == "raise":
                raise ValueError("asked to")
            if what == "die":
                os._exit(7)
            return what
        """
    )

    async def quick(data: Any) -> Any:
        for _ in range(50):  # until answered in place (the first calls may be slow)
            pending = _nowait(runtime, data)
            assert pending is not None
            if isinstance(pending, JsonText):
                return pending.value()
            await asyncio.wait([pending])
        raise AssertionError("never answered in place")

    async def main() -> None:
        assert await quick("fine") == "fine"
        raising = _nowait(runtime, "raise")
        assert raising is not None
        with pytest.raises(ModelCallError) as raised:
            await raising
        assert raised.value.status == 500
        assert "score.py raised ValueError: asked to" in raised.value.detail
        assert await quick("fine") == "fine"
        died = _nowait(runtime, "die")
        assert died is not None
        with pytest.raises(ModelCallError) as crashed:
            await died
        assert crashed.value.status == 503
        assert "exited with code 7" in crashed.value.detail
        await asyncio.to_thread(
            wait_until, lambda: runtime.stats().state is WorkerState.OK, timeout_s=10
        )
        assert await asyncio.to_thread(call, runtime, "back") == "back"
        assert await quick("fine") == "fine"
        assert runtime.stats().crashes == 1

    asyncio.run(main())


def test_a_frame_is_taken_only_whole_and_an_oversized_one_is_refused() -> None:
    """The framing both ends read through: part of a frame stays buffered; a header announcing
    more than the bound is refused before anything is read or allocated for it."""
    frame = FRAME_HEADER.pack(3) + b"abc"
    buffer = bytearray(frame[:5])
    assert take_frame(buffer) is None
    assert buffer == frame[:5]
    buffer += frame[5:] + b"\x00"
    assert take_frame(buffer) == b"abc"
    assert buffer == b"\x00"
    with pytest.raises(FrameTooLarge) as refused:
        take_frame(bytearray(FRAME_HEADER.pack(MAX_FRAME_BYTES + 1)))
    assert refused.value.size == MAX_FRAME_BYTES + 1


def test_the_worker_reads_whole_frames_however_the_pipe_splits_them() -> None:
    """Several frames in one read, a frame split across reads, an empty frame; then the end."""
    read_fd, write_fd = os.pipe()
    try:
        frames = [b"t" + b"x" * 100_000, b"", b"b\x00\x01", b"t{}"]
        stream = b"".join(FRAME_HEADER.pack(len(f)) + f for f in frames)

        def write_in_pieces() -> None:
            for at in range(0, len(stream), 7_777):
                os.write(write_fd, stream[at : at + 7_777])
            os.close(write_fd)

        writer = threading.Thread(target=write_in_pieces)
        writer.start()
        reader = FrameReader(read_fd)
        assert [reader.next() for _ in frames] == frames
        assert reader.next() is None
        writer.join()
    finally:
        os.close(read_fd)


def test_a_read_holding_exactly_one_frame_is_taken_without_the_buffer() -> None:
    """The usual case both ends take a short cut for; anything else is left to the buffer."""
    frame = FRAME_HEADER.pack(3) + b"abc"
    assert whole_frame(frame) == b"abc"
    assert whole_frame(FRAME_HEADER.pack(0)) == b""
    assert whole_frame(frame[:5]) is None  # part of a frame
    assert whole_frame(frame + frame) is None  # more than one
    assert whole_frame(frame[:3]) is None  # part of a header


def test_the_worker_reads_single_frames_and_runs_of_them_in_any_order() -> None:
    """A frame alone in the pipe, then two in one write, then one alone again: the short cut
    and the buffer take turns without losing or reordering a frame."""
    read_fd, write_fd = os.pipe()
    try:
        reader = FrameReader(read_fd)
        for writes in ([b"t1"], [b"t2", b"b3"], [b"t4"], [b"", b"t5"], [b"t6"]):
            os.write(write_fd, b"".join(FRAME_HEADER.pack(len(f)) + f for f in writes))
            assert [reader.next() for _ in writes] == writes
        os.close(write_fd)
        assert reader.next() is None
    finally:
        os.close(read_fd)


def test_a_call_from_the_event_loop_past_its_time_limit_is_a_504_and_the_next_one_works(
    runtimes: Runtimes,
) -> None:
    runtime = runtimes.start(SLOW_ECHO, timeout_ms=300)

    async def main() -> None:
        pending = _nowait(runtime, {"n": 1, "sleep": 30})
        assert pending is not None
        started = time.monotonic()
        with pytest.raises(ModelCallError) as raised:
            await pending
        assert raised.value.status == 504
        assert time.monotonic() - started < 5
        # The worker restarts in the background.
        await asyncio.to_thread(
            wait_until, lambda: runtime.stats().state is WorkerState.OK, timeout_s=10
        )
        # The killed worker waits to be reaped by the next caller, which may have to wait for
        # it: that call goes through a thread (None here), and the loop's calls work after it.
        assert _nowait(runtime, {"n": 2}) is None
        assert await asyncio.to_thread(call, runtime, {"n": 2}) == {"echo": 2}
        again = _nowait(runtime, {"n": 3})
        assert again is not None
        assert await _settle(again) == {"echo": 3}

    asyncio.run(main())


def test_a_caller_that_goes_away_leaves_no_reply_behind_for_the_next(
    runtimes: Runtimes,
) -> None:
    """Through the endpoint: the first caller hangs up mid-call; the call still owns the
    worker to its end, so the second caller gets its own answer, not the first one's."""
    from agent.runtimes.base import ActiveModel
    from agent.scoring import ScoringServer

    runtime = runtimes.start(SLOW_ECHO)
    model = ActiveModel("echo", 1, "e" * 64, manifest(), runtime, None)

    class One:
        def get(self, name: str | None = None) -> ActiveModel | None:
            return model

        def names(self) -> list[str]:
            return ["echo"]

    async def main() -> None:
        server = ScoringServer(models=One(), keys=lambda: ["k"])
        await server.start()
        try:
            body = json.dumps({"data": {"n": 1, "sleep": 2}}).encode()
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(
                b"POST /score HTTP/1.1\r\nHost: x\r\nx-api-key: k\r\ncontent-type: "
                b"application/json\r\ncontent-length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            await writer.drain()
            await asyncio.to_thread(wait_until, runtime._call_lock.locked, timeout_s=10)
            # The first caller goes away mid-call: a reset, not a half-close (after which the
            # server would still answer), so the server drops its request.
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            deadline = time.monotonic() + 10
            while server._http.connections:  # until the server has seen it go
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            assert runtime._call_lock.locked()  # the first call is still running
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
                r = await client.post(
                    "/score", json={"data": {"n": 2}}, headers={"x-api-key": "k"}, timeout=10
                )
            assert r.status_code == 200, r.text
            assert r.json()["result"] == {"echo": 2}
        finally:
            await server.stop()

    asyncio.run(main())


def test_the_scripts_json_reaches_the_caller_as_the_worker_wrote_it(runtimes: Runtimes) -> None:
    """The answer is passed on as the worker's JSON text, not read and written again: an
    integer past 64 bits stays exact (orjson alone could not write it), and its value is read
    only for whoever asks (data collection, the health check)."""
    from agent.jsonvalues import JsonText, plain
    from agent.runtimes.base import ActiveModel
    from agent.scoring import ScoringCall, ScoringServer

    runtime = runtimes.start(
        """
        def init():
            pass

        def run(raw_data):
            return {"big": 2 ** 70, "pi": 3.25, "text": "é"}
        """
    )
    model = ActiveModel("big", 1, "b" * 64, manifest(), runtime, None)
    seen: list[ScoringCall] = []

    class One:
        def get(self, name: str | None = None) -> ActiveModel | None:
            return model

        def names(self) -> list[str]:
            return ["big"]

        def scored(self, call: ScoringCall) -> None:
            seen.append(call)

    async def main() -> list[bytes]:
        server = ScoringServer(models=One(), keys=lambda: ["k"])
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
                answers = []
                for call_from in ("loop", "in place", "in place", "thread"):
                    if call_from == "thread":  # as when the worker is busy with another call
                        runtime.run_raw_nowait = lambda *_: None  # type: ignore[method-assign]
                    r = await client.post("/score", json={"data": 1}, headers={"x-api-key": "k"})
                    assert r.status_code == 200, r.text
                    answers.append(r.content)
                return answers
        finally:
            await server.stop()

    for body in asyncio.run(main()):
        assert body == (
            b'{"result":{"big": 1180591620717411303424, "pi": 3.25, "text": "\\u00e9"},'
            b'"model":{"name":"big","version":1}}'
        )
    outputs = seen[-1].outputs
    assert outputs is not None
    answer = outputs["result"]
    assert isinstance(answer, JsonText)
    assert answer.value() == {"big": 2**70, "pi": 3.25, "text": "é"}
    assert plain(outputs)["result"]["pi"] == 3.25  # as data collection records it
    assert call(runtime, None) == {"big": 2**70, "pi": 3.25, "text": "é"}
