"""Each benchmark's main run at tiny sizes, so the benches cannot rot.

These check that a bench runs end to end and that its figures are sane (every device got there,
ratios are positive), never how fast anything was: benchmarks print figures, tests do not time.
Nothing is written to bench/RESULTS.md (``--no-record``, and the results path points at a
temporary file that must stay absent).
"""

import math
from pathlib import Path

import pytest

from bench import ingest, rollout, scale, scoring, scoring_stages, storm, waves
from bench.results import RESULTS_PATH, Report
from hub.broker import MosquittoNotFoundError, find_mosquitto


@pytest.fixture(autouse=True)
def _needs_mosquitto() -> None:
    try:
        find_mosquitto()
    except MosquittoNotFoundError as exc:
        pytest.skip(f"mosquitto is not installed: {exc}")


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return tmp_path / "RESULTS.md"


def _unrecorded(report: Report, results: Path, before: str | None) -> Report:
    assert not results.exists()
    after = RESULTS_PATH.read_text(encoding="utf-8") if RESULTS_PATH.exists() else None
    assert after == before, "a smoke run must not touch bench/RESULTS.md"
    return report


def _results_now() -> str | None:
    return RESULTS_PATH.read_text(encoding="utf-8") if RESULTS_PATH.exists() else None


@pytest.mark.integration
def test_scale_connects_every_device_on_both_sides_and_measures_heartbeats(
    results: Path, tmp_path: Path
) -> None:
    before = _results_now()
    argv = ["--devices", "20", "--duration-s", "2.5", "--heartbeat-s", "1", "--no-record"]
    report = _unrecorded(
        scale.main([*argv, "--work-dir", str(tmp_path)], results_path=results), results, before
    )
    connected = report.figure("devices connected")
    assert (connected.project, connected.floor) == (20, 20)
    for name in ("connect rate", "memory per device", "CPU per heartbeat"):
        figure = report.figure(name)
        assert (figure.ratio or 0) > 0, name
    beats = report.figure("heartbeats in the window")
    assert beats.project > 0
    assert (beats.floor or 0) > 0
    assert report.figure("disconnects in the window").project == 0


@pytest.mark.integration
def test_storm_brings_every_device_back_with_and_without_jitter(
    results: Path, tmp_path: Path
) -> None:
    before = _results_now()
    argv = ["--devices", "20", "--settle-s", "0", "--reconnect-timeout-s", "30", "--no-record"]
    report = _unrecorded(
        storm.main([*argv, "--work-dir", str(tmp_path)], results_path=results), results, before
    )
    back = report.figure("devices reconnected")
    assert (back.project, back.floor) == (20, 20)
    peak = report.figure("peak reconnects per second")
    assert (peak.ratio or 0) > 0
    t99 = report.figure("time to 99 % reconnected")
    assert not math.isnan(t99.project)
    assert not math.isnan(t99.floor if t99.floor is not None else math.nan)
    assert report.figure("broker outage").project > 0


@pytest.mark.e2e
def test_rollout_activates_every_device_and_times_the_fanout_floor(
    results: Path, tmp_path: Path
) -> None:
    before = _results_now()
    argv = ["--devices", "20", "--mib", "0.25", "--rollout-timeout-s", "90", "--no-record"]
    report = _unrecorded(
        rollout.main([*argv, "--work-dir", str(tmp_path)], results_path=results), results, before
    )
    active = report.figure("devices active / copies hashed")
    assert (active.project, active.floor) == (20, 20)
    assert report.figure("devices failed").project == 0
    total = report.figure("time until every device is active")
    assert (total.ratio or 0) > 0
    assert any(f.name.startswith("download: median") for f in report.figures)


@pytest.mark.e2e
def test_waves_release_a_canary_then_waves_and_compare_with_all_at_once(
    results: Path, tmp_path: Path
) -> None:
    before = _results_now()
    argv = [
        *("--devices", "20", "--mib", "0.25", "--canary", "2", "--wave-percent", "50"),
        *("--max-concurrent", "8", "--rollout-timeout-s", "120", "--no-record"),
    ]
    report = _unrecorded(
        waves.main([*argv, "--work-dir", str(tmp_path)], results_path=results), results, before
    )
    active = report.figure("devices active")
    assert (active.project, active.floor) == (20, 20)
    assert report.figure("devices failed").project == 0
    assert (report.figure("time until every device is active").ratio or 0) > 0
    spans = [f for f in report.figures if f.name.endswith(": span")]
    assert [f.name for f in spans] == [
        "canary (2 devices): span",
        "wave 1 (10 devices): span",
        "wave 2 (8 devices): span",
    ]
    # The cap counts devices fetching the package; installing ones no longer count.
    assert 0 < report.figure("most devices released and not yet active at once").project <= 20
    assert "ended completed: {'succeeded': 20}" in report.notes[1]


@pytest.mark.e2e
def test_ingest_stores_every_record_once_and_times_score_with_and_without_collection(
    results: Path, tmp_path: Path
) -> None:
    before = _results_now()
    argv = [
        *("--devices", "5", "--messages", "200", "--batched-messages", "20"),
        *("--records-per-message", "10", "--score-calls", "40", "--score-warmup", "10"),
        *("--score-rounds", "2", "--pass-timeout-s", "60", "--score-timeout-s", "60"),
        "--no-record",
    ]
    report = _unrecorded(
        ingest.main([*argv, "--work-dir", str(tmp_path)], results_path=results), results, before
    )
    for name in (
        "messages stored durably, 1 record each",
        "records stored durably, 10 per message",
    ):
        figure = report.figure(name)
        assert figure.project > 0, name
        assert (figure.ratio or 0) > 0, name
    assert (
        report.figure("batching: records/s at 10 per message / at 1 per message").ratio or 0
    ) > 0
    assert report.figure("records missing or extra in the database, both passes").project == 0
    assert report.figure("messages dropped at the hub's full queue").project == 0
    for name in ("/score p50, collection on / off", "/score p99, collection on / off"):
        assert (report.figure(name).ratio or 0) > 0, name
    # Two rounds (off, on; on, off) of 10 warm-up and 20 timed calls: 60 calls collected.
    stored = report.figure("collected calls stored by the hub")
    assert (stored.project, stored.target) == (60, "60")


@pytest.mark.e2e
def test_scoring_times_every_runtime_against_its_floor_and_weighs_the_agent(
    results: Path, tmp_path: Path
) -> None:
    before = _results_now()
    argv = ["--calls", "40", "--rounds", "2", "--warmup", "5", "--no-record"]
    report = _unrecorded(
        scoring.main([*argv, "--work-dir", str(tmp_path)], results_path=results), results, before
    )
    for runtime in (
        "ONNX Runtime",
        "LiteRT",
        "score.py",
        "score.py against a floor with a worker process",
    ):
        for quantile in ("p50", "p99"):
            figure = report.figure(f"/score {quantile}, {runtime}")
            assert figure.project > 0
            assert (figure.ratio or 0) > 0, figure.name
    memory = report.figure("memory, ONNX model loaded (RSS)")
    # The agent holds the same session and more, so it cannot weigh less than the floor.
    assert memory.project > memory.floor > 0  # type: ignore[operator]


@pytest.mark.e2e
@pytest.mark.parametrize("runtime", ["tflite", "onnx"])
def test_scoring_stages_time_the_endpoint_cut_at_each_stage(
    runtime: str, results: Path, tmp_path: Path
) -> None:
    before = _results_now()
    argv = ["--runtime", runtime, "--rounds", "2", "--calls", "20", "--no-record"]
    report = _unrecorded(
        scoring_stages.main([*argv, "--work-dir", str(tmp_path)], results_path=results),
        results,
        before,
    )
    assert report.figure("bare loopback HTTP round trip p50").project > 0
    for stage in scoring_stages.STAGES:
        figure = report.figure(f"p50 up to {stage}")
        assert figure.project > 0
        assert (figure.ratio or 0) > 0, figure.name
