"""A TFLite model end to end on real parts: registered on the hub (checked there with LiteRT),
deployed over MQTT to a real agent (verified, loaded with LiteRT, health-checked), then scored
through the agent's own HTTP endpoint, a batch and a wrong request included."""

import json
from typing import Any

import httpx
import numpy as np
import pytest

from agent.main import scoring_server
from agent.settings import ScoringSettings
from examples.build_tflite_model import committed_model
from tests.support.live_hub import LiveHub

pytestmark = pytest.mark.e2e

TFLITE = committed_model()


def _register(hub: LiveHub) -> dict[str, Any]:
    with hub.api as client:
        response = client.post(
            "/api/v1/models",
            data={"name": "iris-lite", "framework": "tflite"},
            files=[
                ("files", ("model.tflite", TFLITE.model.read_bytes())),
                ("sample_input", ("sample_input.json", TFLITE.sample_input.read_bytes())),
                ("expected_output", ("expected_output.json", TFLITE.expected_output.read_bytes())),
            ],
        )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def test_a_tflite_model_deploys_and_scores_through_the_agent_endpoint(
    live_hub: LiveHub,
) -> None:
    registered = _register(live_hub)
    assert registered["signature"]["inputs"] == [
        {"name": "input", "dtype": "float32", "shape": [None, 4]}
    ]
    runner = live_hub.start_agent("lite")
    agent = runner.agent
    assert agent is not None
    result = live_hub.cli("deploy", "iris-lite:1", "--device", agent.device_id, "--wait")
    assert result.exit_code == 0, result.output
    assert "all 1 succeeded" in result.output

    # The endpoint as `outpost-agent run` serves it, with the device's own key.
    server = scoring_server(ScoringSettings(port=0), models=agent, state=agent.state)
    runner.run(server.start())
    key = agent.state.scoring_keys().primary
    sample = json.loads(TFLITE.sample_input.read_text())
    expected = json.loads(TFLITE.expected_output.read_text())
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{server.port}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        ) as scoring:
            answer = scoring.post("/score", json={"data": sample})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["model"] == {"name": "iris-lite", "version": 1}
            assert body["result"] == expected["label"] == [0, 1, 2]
            np.testing.assert_allclose(
                body["outputs"]["probabilities"], expected["probabilities"], rtol=1e-6
            )

            batch = scoring.post("/score", json={"data": sample * 20})
            assert batch.status_code == 200, batch.text
            assert batch.json()["result"] == [0, 1, 2] * 20

            wrong = scoring.post("/score", json={"data": [[5.1, 3.5, 1.4]]})
            assert wrong.status_code == 400, wrong.text
            assert (
                "'input' expects float32 of shape [N, 4]; got shape [1, 3]"
                in (wrong.json()["error"])
            )
    finally:
        runner.run(server.stop())

    # The hub learnt what the device runs, and that it can run TFLite.
    live_hub.wait_until(
        lambda: (live_hub.device(agent.device_id).get("reported_state") or {}).get("active"),
        what="reported state",
    )
    reported = live_hub.device(agent.device_id)["reported_state"]
    assert [(m["model"], m["version"]) for m in reported["active"]] == [("iris-lite", 1)]
    assert "tflite" in reported["runtimes"]
