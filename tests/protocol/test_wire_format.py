"""Golden files pin the wire format: a change here is a contract change (hub, agent and
simulator together). Regenerate deliberately with OUTPOST_UPDATE_GOLDEN=1."""

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.canonical import CanonicalizationError, canonical_bytes
from agent.protocol.documents import (
    Command,
    CommandAction,
    DesiredState,
    FileEntry,
    Framework,
    HealthCheck,
    Keyring,
    Manifest,
    ModelInfo,
    PackageRef,
    PublicKey,
    Role,
    RoleKeys,
    RuntimeSpec,
    document_dict,
)
from agent.protocol.messages import (
    AckBody,
    ChunkRequestBody,
    CollectedRecord,
    CommandResultBody,
    DataBody,
    DesiredRequestBody,
    EventBody,
    LogEntry,
    LogsResult,
    MessageError,
    ModelStats,
    ModelStatus,
    Reason,
    StateBody,
    StatusBody,
    Step,
    TelemetryBody,
    TelemetryRecord,
    decode,
    encode,
)
from agent.protocol.topics import Channel, TopicError, Topics

GOLDEN = Path(__file__).parent / "golden"
T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
DIGEST = "ab" * 32

REF = PackageRef(
    model="iris",
    version=3,
    digest=DIGEST,
    size=10,
    chunk_bytes=8,
    chunks=["01" * 32, "02" * 32],
    deployment_id="dep-1",
)

DOCUMENTS: dict[str, Any] = {
    "keyring": Keyring(
        version=2,
        expires_at=T0,
        keys={"k1": PublicKey(public="AAAA")},
        roles={Role.RELEASE: RoleKeys(keyids=["k1"]), Role.DIRECTOR: RoleKeys(keyids=["k1"])},
    ),
    "desired": DesiredState(
        device_id="dev-1", counter=7, issued_at=T0, expires_at=T0, packages=[REF]
    ),
    "command": Command(
        device_id="dev-1",
        seq=3,
        command_id="c0ffee",
        action=CommandAction.LOGS,
        args={"tail": 50, "since": "2026-11-25T11:00:00Z", "level": "warning"},
        issued_at=T0,
        expires_at=T0,
    ),
    "manifest": Manifest(
        model=ModelInfo(name="iris", version=3, framework=Framework.ONNX),
        runtime=RuntimeSpec(model_file="model.onnx"),
        files=[FileEntry(path="model.onnx", size=4, sha256="00" * 32)],
        health_check=HealthCheck(input="sample_input.json", expected_output="expected_output.json"),
        created_at=T0,
    ),
}

MESSAGES: dict[str, Any] = {
    "state": StateBody(
        seq=4,
        agent_version="0.1.0",
        device_class="generic",
        desired_counter=7,
        active=[ModelStatus(model="iris", version=3, digest=DIGEST, deployment_id="dep-1")],
        runtimes=["onnx"],
    ),
    "status": StatusBody(online=False, reason="connection lost"),
    "event": EventBody(
        seq=9,
        deployment_id="dep-1",
        model="iris",
        version=3,
        digest=DIGEST,
        step=Step.FAILED,
        reason=Reason.HEALTH_CHECK,
        detail="label differs",
    ),
    "desired_request": DesiredRequestBody(have_counter=6),
    "chunk_request": ChunkRequestBody(digest=DIGEST, chunks=[0, 1]),
    "ack": AckBody(stream="evt", seq=9),
    "telemetry": TelemetryBody(
        first_kept=41,
        records=[
            TelemetryRecord(
                seq=42,
                at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
                interval_s=60,
                uptime_s=3600.5,
                cpu_percent=12.5,
                memory_bytes=52_428_800,
                disk_free_bytes=1_073_741_824,
                temperature_c=48.0,
                reconnects=1,
                outbox_backlog=3,
                outbox_dropped=0,
                models=[
                    ModelStats(
                        model="iris",
                        version=3,
                        inferences=120,
                        errors=1,
                        p50_ms=1.5,
                        p95_ms=4.25,
                        p99_ms=9.0,
                    )
                ],
            )
        ],
    ),
    "command_result": CommandResultBody(
        command_id="c0ffee",
        seq=3,
        ok=True,
        result=LogsResult(
            entries=[
                LogEntry(at=T0, level="WARNING", logger="agent.core", message="disk almost full")
            ],
            more=True,
        ).model_dump(mode="json"),
    ),
    "data": DataBody(
        first_kept=7,
        records=[
            CollectedRecord(
                seq=7,
                at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
                model="iris",
                version=3,
                deployment_id="dep-1",
                correlation_id="req-77",
                latency_ms=1.75,
                inputs={"data": [[5.1, 3.5, 1.4, 0.2]]},
                outputs={"label": [0]},
            )
        ],
    ),
}


def _check_golden(name: str, actual: bytes) -> None:
    path = GOLDEN / f"{name}.json"
    if os.environ.get("OUTPOST_UPDATE_GOLDEN"):
        path.write_bytes(actual + b"\n")
    assert path.read_bytes().rstrip(b"\n") == actual, f"wire format of {name} changed"


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_signed_documents_have_stable_canonical_bytes(name: str) -> None:
    _check_golden(f"doc-{name}", canonical_bytes(document_dict(DOCUMENTS[name])))


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_messages_have_stable_wire_format(name: str) -> None:
    payload = encode(MESSAGES[name], now=T0, msg_id="m-1")
    _check_golden(f"msg-{name}", payload)
    assert decode(payload).body == MESSAGES[name]


def test_unknown_fields_are_ignored_so_older_agents_accept_newer_hubs() -> None:
    raw = json.loads(encode(MESSAGES["ack"], now=T0, msg_id="m"))
    raw["future"] = 1
    raw["body"]["also_future"] = {"x": 1}
    assert decode(json.dumps(raw).encode()).body == MESSAGES["ack"]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xff\xfe",
        b"[]",
        b'{"v": 2, "kind": "ack"}',
        b'{"v": 1, "kind": "ack", "msg_id": "m", "sent_at": "2026-01-01T00:00:00Z",'
        b' "body": {"kind": "nope"}}',
        b'{"v": 1, "kind": "status", "msg_id": "m", "sent_at": "2026-01-01T00:00:00Z",'
        b' "body": {"kind": "ack", "stream": "evt", "seq": 1}}',
        b"[" * 100_000,
        b'{"v": 1, "kind": "ack", "msg_id": "m", "sent_at": "yesterday",'
        b' "body": {"kind": "ack", "stream": "evt", "seq": 1}}',
    ],
)
def test_malformed_messages_raise_message_error(payload: bytes) -> None:
    with pytest.raises(MessageError):
        decode(payload)


def test_oversized_message_is_refused_before_parsing() -> None:
    with pytest.raises(MessageError, match="exceeds"):
        decode(b" " * 2_000_000)


def test_canonical_bytes_refuse_nan() -> None:
    with pytest.raises(CanonicalizationError):
        canonical_bytes({"x": float("nan")})


def test_topics_build_and_parse() -> None:
    topics = Topics("outpost")
    topic = topics.device("dev-1ab", Channel.EVT)
    assert topic == "outpost/d/dev-1ab/evt"
    parsed = topics.parse_device(topic)
    assert (parsed.device_id, parsed.channel) == ("dev-1ab", Channel.EVT)
    chunk = topics.chunk(DIGEST, 5)
    assert topics.parse_chunk(chunk).index == 5
    assert topics.device_wildcard(Channel.STATE) == "outpost/d/+/state"


@pytest.mark.parametrize(
    "topic",
    [
        "outpost/d/+/evt",
        "outpost/d/#/evt",
        "outpost/d/dev-1ab/nope",
        "other/d/dev-1ab/evt",
        "outpost/d/dev-1ab/evt/extra",
        "outpost/d/DEV/evt",
    ],
)
def test_topic_parser_refuses_what_is_not_in_the_contract(topic: str) -> None:
    with pytest.raises(TopicError):
        Topics("outpost").parse_device(topic)


@pytest.mark.parametrize("device_id", ["+", "#", "a/+", "a/#", "", "ab", "A-b-c"])
def test_device_ids_with_wildcards_or_separators_are_refused(device_id: str) -> None:
    with pytest.raises(TopicError):
        Topics().device(device_id, Channel.STATE)


def test_a_state_from_an_agent_that_does_not_report_runtimes_still_decodes() -> None:
    # Agents before 0.2 sent no "runtimes"; the hub then judges no runtime compatibility.
    old = (GOLDEN / "msg-state.json").read_bytes().replace(b',"runtimes":["onnx"]', b"")
    assert b"runtimes" not in old
    body = decode(old).body
    assert isinstance(body, StateBody)
    assert body.runtimes == []
