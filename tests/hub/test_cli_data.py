"""``outpost-hub data export`` against a served hub holding collected records, read back from
each format; and ``deploy --collect`` reaching the deployment's data-collection policy."""

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq  # type: ignore[import-untyped]
from sqlmodel import Session

from agent.protocol.messages import MAX_BATCH_RECORDS, CollectedRecord, DataBody
from hub.deployments.models import Deployment
from hub.messaging.handlers import handle_batch
from hub.telemetry import ingest

from .conftest import ServedHub
from .test_cli import _enroll, _env, _register, _run

if TYPE_CHECKING:
    from examples.build_example_model import IrisModel


def _collect(hub: ServedHub, device_id: str, count: int) -> None:
    now = datetime.now(UTC)
    records = [
        CollectedRecord(
            seq=seq,
            at=now - timedelta(seconds=count - seq),
            model="iris",
            version=1,
            deployment_id="dep-1",
            correlation_id=f"req-{seq}",
            latency_ms=1.5,
            inputs={"data": [[5.1, 3.5, 1.4, 0.2]]},
            outputs={"label": [seq % 3]},
        )
        for seq in range(1, count + 1)
    ]
    with Session(hub.ctx.engine) as session:
        for start in range(0, count, MAX_BATCH_RECORDS):
            body = DataBody(first_kept=1, records=records[start : start + MAX_BATCH_RECORDS])
            handle_batch(
                session=session,
                publisher=hub.publisher,
                topics=hub.ctx.topics,
                batch=ingest.prepare(device_id, body),
            )


def test_collected_records_export_as_csv_jsonl_and_parquet(
    served_hub: ServedHub, tmp_path: Path
) -> None:
    device_id = _enroll(served_hub)
    _collect(served_hub, device_id, 1500)  # more than one page
    env = _env(served_hub)
    exported: dict[str, list[str]] = {}
    for name in ("iris.csv", "iris.jsonl", "iris.parquet"):
        out = tmp_path / name
        result = _run(["data", "export", "--out", str(out), "--model", "iris"], env=env)
        assert result.exit_code == 0, result.output
        assert f"wrote 1500 record(s) to {out}" in result.output
        assert not out.with_name(name + ".partial").exists()
        if name.endswith(".csv"):
            with out.open(newline="") as stream:
                rows = list(csv.DictReader(stream))
            assert json.loads(rows[0]["inputs"]) == {"data": [[5.1, 3.5, 1.4, 0.2]]}
        elif name.endswith(".jsonl"):
            rows = [json.loads(line) for line in out.read_text().splitlines()]
            assert rows[0]["outputs"] == {"label": [1500 % 3]}
        else:
            rows = pq.read_table(out).to_pylist()
            assert json.loads(rows[0]["outputs"]) == {"label": [1500 % 3]}
        exported[name] = [str(r["correlation_id"]) for r in rows]
    # Newest first, every record once, the same in each format.
    expected = [f"req-{seq}" for seq in range(1500, 0, -1)]
    assert exported == {name: expected for name in exported}

    none = _run(["data", "export", "--out", str(tmp_path / "x.jsonl"), "--model", "other"], env=env)
    assert "wrote 0 record(s)" in none.output
    unknown = _run(["data", "export", "--out", str(tmp_path / "x.txt")], env=env)
    assert unknown.exit_code == 2
    assert "--format" in unknown.output
    lonely = _run(["data", "export", "--out", str(tmp_path / "x.csv"), "--version", "1"], env=env)
    assert lonely.exit_code == 2
    assert "--version needs --model" in lonely.output


def test_deploy_collect_sets_the_deployment_s_collection_policy(
    served_hub: ServedHub, iris_model: "IrisModel"
) -> None:
    assert _register(served_hub, iris_model).exit_code == 0
    device_id = _enroll(served_hub)
    env = _env(served_hub)
    result = _run(
        [
            "deploy",
            "iris:1",
            "--device",
            device_id,
            "--collect",
            "0.25",
            "--collect-per-minute",
            "5",
        ],
        env=env,
    )
    assert result.exit_code == 0, result.output
    deployment_id = result.output.split()[1].rstrip(":")
    shown = _run(["deployment", "list"], env=env)
    assert deployment_id in shown.output
    with Session(served_hub.ctx.engine) as session:
        deployment = session.get(Deployment, deployment_id)
        assert deployment is not None
        assert deployment.data_collection == {
            "sample_rate": 0.25,
            "max_per_minute": 5,
            "max_bytes_per_day": 10 * 1024 * 1024,
        }
    refused = _run(["deploy", "iris:1", "--device", device_id, "--collect", "2"], env=env)
    assert refused.exit_code == 2
    assert "--collect" in refused.output
