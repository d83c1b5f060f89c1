"""``GET /metrics``: the Prometheus exposition of the fleet, read from the database at scrape
time, parsed back with prometheus_client's own parser."""

from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families

from hub.messaging.handlers import MessageStats

from .conftest import RunningHub

if TYPE_CHECKING:
    from examples.build_example_model import IrisModel


def _samples(hub: RunningHub) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = hub.client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def test_metrics_count_devices_rollouts_and_messages(
    running_hub: RunningHub, iris_model: "IrisModel"
) -> None:
    assert running_hub.register_iris(iris_model).status_code == 201
    devices = [running_hub.enroll()["device_id"] for _ in range(3)]
    created = running_hub.client.post(
        "/api/v1/deployments",
        json={"model": "iris", "devices": devices, "policy": {"canary": 1}},
    )
    assert created.status_code == 201, created.text
    running_hub.ctx.message_stats = MessageStats(handled=7, malformed=2)

    samples = _samples(running_hub)
    assert samples[("outpost_devices", (("state", "offline"),))] == 3
    assert samples[("outpost_devices", (("state", "online"),))] == 0
    assert samples[("outpost_deployments", (("state", "running"),))] == 1
    assert samples[("outpost_deployments", (("state", "completed"),))] == 0
    assert samples[("outpost_rollout_devices", (("state", "in_progress"),))] == 1
    assert samples[("outpost_rollout_devices", (("state", "pending"),))] == 2
    assert samples[("outpost_device_messages_total", (("result", "handled"),))] == 7
    assert samples[("outpost_device_messages_total", (("result", "malformed"),))] == 2


def test_metrics_need_the_admin_token(running_hub: RunningHub) -> None:
    running_hub.client.headers.pop("Authorization")
    assert running_hub.client.get("/metrics").status_code == 401
