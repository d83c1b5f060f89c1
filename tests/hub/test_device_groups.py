"""Device groups and re-tagging: a group at enrolment, ``PATCH /api/v1/devices/{id}``, the
``?group=`` filter, which deployment each model of a device follows, continuous deployments
picking up re-tagged devices, and the ``outpost-hub device`` commands."""

from typing import TYPE_CHECKING, Any

import pytest
from click.testing import CliRunner, Result
from sqlmodel import Session

from hub.cli import main
from hub.deployments.engine import RolloutEngine

from .conftest import RunningHub, ServedHub

if TYPE_CHECKING:
    from examples.build_example_model import IrisModel


def _enroll(hub: RunningHub, *specs: dict[str, Any]) -> list[str]:
    token = hub.client.post("/api/v1/enrollment-tokens", json={"uses": len(specs)}).json()
    response = hub.client.post(
        "/api/v1/enroll/bulk", json={"token": token["token"], "devices": list(specs)}
    )
    assert response.status_code == 201, response.text
    return [d["device_id"] for d in response.json()["devices"]]


def _ids(response: Any) -> list[str]:
    assert response.status_code == 200, response.text
    return [d["id"] for d in response.json()]


def _tick(hub: RunningHub) -> None:
    """What the message worker does every few seconds (these hubs have none)."""
    with Session(hub.ctx.engine, expire_on_commit=False) as session:
        RolloutEngine(owner="test").tick(session)


def test_a_group_is_set_at_enrolment_and_filters_the_list(running_hub: RunningHub) -> None:
    token = running_hub.client.post("/api/v1/enrollment-tokens", json={}).json()["token"]
    single = running_hub.client.post("/api/v1/enroll", json={"token": token, "group": "line-4"})
    assert single.status_code == 201, single.text
    one = single.json()["device_id"]
    two, three, four = _enroll(
        running_hub,
        {"group": "line-4", "tags": {"site": "a"}},
        {"group": "pilot", "tags": {"site": "a"}},
        {},
    )

    assert running_hub.client.get(f"/api/v1/devices/{one}").json()["group"] == "line-4"
    assert running_hub.client.get(f"/api/v1/devices/{four}").json()["group"] is None
    devices = running_hub.client.get
    assert _ids(devices("/api/v1/devices", params={"group": "line-4"})) == [one, two]
    assert _ids(devices("/api/v1/devices", params={"group": "pilot"})) == [three]
    assert _ids(devices("/api/v1/devices", params={"group": "nobody"})) == []
    both = devices("/api/v1/devices", params={"group": "line-4", "tag": "site=a"})
    assert _ids(both) == [two]
    bad = devices("/api/v1/devices", params={"group": "Line 4"})
    assert bad.status_code == 422
    assert "group" in bad.text


@pytest.mark.parametrize("group", ["Line-4", "-x", "a b", "x" * 64, ""])
def test_a_bad_group_name_is_refused_at_enrolment(running_hub: RunningHub, group: str) -> None:
    token = running_hub.client.post("/api/v1/enrollment-tokens", json={}).json()["token"]
    response = running_hub.client.post("/api/v1/enroll", json={"token": token, "group": group})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "group"]
    # Nothing was spent on a refused request.
    again = running_hub.client.post("/api/v1/enroll", json={"token": token})
    assert again.status_code == 201


def test_patch_sets_and_clears_the_group_and_replaces_the_tags(running_hub: RunningHub) -> None:
    (device,) = _enroll(running_hub, {"group": "pilot", "tags": {"site": "a", "hw": "rpi4"}})
    path = f"/api/v1/devices/{device}"

    moved = running_hub.client.patch(path, json={"group": "line-4"})
    assert moved.status_code == 200, moved.text
    assert (moved.json()["group"], moved.json()["tags"]) == ("line-4", {"site": "a", "hw": "rpi4"})

    retagged = running_hub.client.patch(path, json={"tags": {"site": "b"}})
    assert (retagged.json()["group"], retagged.json()["tags"]) == ("line-4", {"site": "b"})
    assert retagged.json()["follows"] == []

    cleared = running_hub.client.patch(path, json={"group": None, "tags": {}})
    assert (cleared.json()["group"], cleared.json()["tags"]) == (None, {})
    assert running_hub.client.get(path).json()["group"] is None
    assert running_hub.client.patch(path, json={}).status_code == 200


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"group": "Pilot"}, "group"),
        ({"tags": {"Site": "a"}}, "tag key 'Site'"),
        ({"tags": {"site": "a b"}}, "tag 'site' has value"),
        ({"tags": {f"k{i}": "v" for i in range(17)}}, "at most 16 tags"),
        ({"tags": None}, "send {} to remove every tag"),
        ({"name": "renamed"}, "name"),
    ],
)
def test_patch_refuses_bad_input_naming_it(
    running_hub: RunningHub, body: dict[str, Any], where: str
) -> None:
    (device,) = _enroll(running_hub, {"group": "pilot", "tags": {"site": "a"}})
    response = running_hub.client.patch(f"/api/v1/devices/{device}", json=body)
    assert response.status_code == 422
    assert where in response.text
    shown = running_hub.client.get(f"/api/v1/devices/{device}").json()
    assert (shown["group"], shown["tags"]) == ("pilot", {"site": "a"})


def test_patch_needs_a_known_device_and_the_admin_token(running_hub: RunningHub) -> None:
    missing = running_hub.client.patch("/api/v1/devices/dev-000000000000", json={"group": "a"})
    assert missing.status_code == 404
    (device,) = _enroll(running_hub, {})
    anonymous = running_hub.client.patch(
        f"/api/v1/devices/{device}", json={"group": "a"}, headers={"Authorization": ""}
    )
    assert anonymous.status_code == 401


def test_a_device_says_which_deployment_each_model_follows(
    running_hub: RunningHub, iris_model: "IrisModel"
) -> None:
    assert running_hub.register_iris(iris_model).status_code == 201
    assert running_hub.register_iris(iris_model, name="flowers").status_code == 201
    device, other = _enroll(running_hub, {}, {})
    assert running_hub.client.get(f"/api/v1/devices/{device}").json()["follows"] == []

    iris = running_hub.client.post(
        "/api/v1/deployments", json={"model": "iris", "devices": [device, other], "priority": 3}
    ).json()
    flowers = running_hub.client.post(
        "/api/v1/deployments", json={"model": "flowers", "devices": [device]}
    ).json()
    follows = running_hub.client.get(f"/api/v1/devices/{device}").json()["follows"]
    assert follows == [
        {
            "model": "flowers",
            "deployment_id": flowers["id"],
            "version": 1,
            "priority": 0,
            "state": "running",
            "device_state": "in_progress",
        },
        {
            "model": "iris",
            "deployment_id": iris["id"],
            "version": 1,
            "priority": 3,
            "state": "running",
            "device_state": "in_progress",
        },
    ]
    # The list can hold 10,000 devices: it does not look follows up.
    assert all(d["follows"] is None for d in running_hub.client.get("/api/v1/devices").json())

    # v2 replaces v1 and is rolled back: the device follows the same deployment, which now
    # names the version it ran before.
    assert running_hub.register_iris(iris_model).status_code == 201
    v2 = running_hub.client.post(
        "/api/v1/deployments", json={"model": "iris", "devices": [device], "priority": 3}
    ).json()
    rolled = running_hub.client.post(f"/api/v1/deployments/{v2['id']}/rollback")
    assert rolled.status_code == 200, rolled.text
    (iris_now,) = [
        f
        for f in running_hub.client.get(f"/api/v1/devices/{device}").json()["follows"]
        if f["model"] == "iris"
    ]
    assert iris_now == {
        "model": "iris",
        "deployment_id": v2["id"],
        "version": 1,
        "priority": 3,
        "state": "rolled_back",
        "device_state": "rolling_back",
    }


def test_a_continuous_deployment_picks_up_retagged_and_regrouped_devices(
    running_hub: RunningHub, iris_model: "IrisModel"
) -> None:
    assert running_hub.register_iris(iris_model).status_code == 201
    tagged, grouped, later = _enroll(
        running_hub, {"tags": {"site": "b"}}, {"group": "pilot"}, {"tags": {"site": "a"}}
    )
    by_tag = running_hub.client.post(
        "/api/v1/deployments", json={"model": "iris", "selector": "site=b", "continuous": True}
    ).json()
    assert [d["device_id"] for d in by_tag["devices"]] == [tagged]

    assert (
        running_hub.client.patch(
            f"/api/v1/devices/{later}", json={"tags": {"site": "b", "hw": "rpi4"}}
        ).status_code
        == 200
    )
    _tick(running_hub)
    dep = running_hub.client.get(f"/api/v1/deployments/{by_tag['id']}").json()
    assert {d["device_id"]: d["state"] for d in dep["devices"]} == {
        tagged: "in_progress",
        later: "in_progress",
    }
    (follow,) = running_hub.client.get(f"/api/v1/devices/{later}").json()["follows"]
    assert follow["deployment_id"] == by_tag["id"]

    # A group works the same way; its deployment, of higher priority, takes the device over.
    by_group = running_hub.client.post(
        "/api/v1/deployments",
        json={"model": "iris", "groups": ["pilot"], "continuous": True, "priority": 5},
    ).json()
    assert [d["device_id"] for d in by_group["devices"]] == [grouped]
    assert (
        running_hub.client.patch(f"/api/v1/devices/{tagged}", json={"group": "pilot"}).status_code
        == 200
    )
    _tick(running_hub)
    (follow,) = running_hub.client.get(f"/api/v1/devices/{tagged}").json()["follows"]
    assert (follow["deployment_id"], follow["priority"]) == (by_group["id"], 5)
    first = running_hub.client.get(f"/api/v1/deployments/{by_tag['id']}").json()
    assert {d["device_id"]: d["state"] for d in first["devices"]}[tagged] == "superseded"


# -- the device commands -------------------------------------------------------------------------


def _run(hub: ServedHub, *args: str) -> Result:
    env = {"OUTPOST_HUB_URL": hub.url, "OUTPOST_HUB_TOKEN": hub.token}
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def _served_enroll(hub: ServedHub, *specs: dict[str, Any]) -> list[str]:
    import httpx

    token = _run(hub, "device", "token", "--uses", str(len(specs))).output.splitlines()[0]
    response = httpx.post(
        f"{hub.url}/api/v1/enroll/bulk", json={"token": token, "devices": list(specs)}
    )
    assert response.status_code == 201, response.text
    return [d["device_id"] for d in response.json()["devices"]]


def test_device_commands_list_show_and_set(served_hub: ServedHub, iris_model: "IrisModel") -> None:
    a, b, c = _served_enroll(
        served_hub,
        {"name": "cam-a", "group": "line-4", "tags": {"site": "a"}},
        {"name": "cam-b", "group": "line-4", "tags": {"site": "b"}},
        {"name": "cam-c", "tags": {"site": "a"}},
    )

    def ids(result: Result) -> list[str]:
        assert result.exit_code == 0, result.output
        return [line.split()[0] for line in result.output.splitlines()]

    assert ids(_run(served_hub, "device", "list")) == [a, b, c]
    assert ids(_run(served_hub, "device", "list", "--group", "line-4")) == [a, b]
    assert ids(_run(served_hub, "device", "list", "--tag", "site=a")) == [a, c]
    assert ids(_run(served_hub, "device", "list", "--group", "line-4", "--tag", "site=a")) == [a]
    line = _run(served_hub, "device", "list", "--group", "line-4").output.splitlines()[0]
    assert line.split()[:3] == [a, "cam-a", "line-4"]

    moved = _run(
        served_hub, "device", "set", c, "--group", "pilot", "--tag", "site=b", "--tag", "hw=x"
    )
    assert moved.exit_code == 0, moved.output
    assert "group pilot" in moved.output
    assert "tags    hw=x site=b" in moved.output
    assert ids(_run(served_hub, "device", "list", "--group", "pilot")) == [c]
    cleared = _run(served_hub, "device", "set", c, "--no-group", "--no-tags")
    assert cleared.exit_code == 0, cleared.output
    assert "group -" in cleared.output
    assert "tags    -" in cleared.output

    # show: what the device follows.
    assert "follows no deployment" in _run(served_hub, "device", "show", a).output
    assert _run(served_hub, "model", "register", str(iris_model.model), "--name", "iris",
                "--framework", "onnx", "--sample-input", str(iris_model.sample_input),
                "--expected-output", str(iris_model.expected_output)).exit_code == 0  # fmt: skip
    deployed = _run(served_hub, "deploy", "iris", "--group", "line-4", "--priority", "2")
    assert deployed.exit_code == 0, deployed.output
    assert "to 2 device(s)" in deployed.output
    dep_id = deployed.output.split()[1].rstrip(":")
    shown = _run(served_hub, "device", "show", a)
    assert shown.exit_code == 0, shown.output
    assert shown.output.splitlines()[0].startswith(f"{a}  cam-a  class generic  group line-4")
    assert (
        f"  follows iris:1 from {dep_id}  priority 2  running (this device: in_progress)"
        in shown.output
    )
    missing = _run(served_hub, "device", "show", "dev-000000000000")
    assert missing.exit_code == 2
    assert "not found" in missing.output


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--group", "Pilot"], "--group"),
        (["--tag", "site"], "--tag"),
        (["--tag", "Site=a"], "--tag"),
        (["--tag", "site=a", "--tag", "site=b"], "--tag"),
        (["--group", "a", "--no-group"], "--no-group"),
        (["--tag", "site=a", "--no-tags"], "--no-tags"),
        ([], "nothing to change"),
    ],
)
def test_device_set_refuses_bad_options_naming_them(args: list[str], named: str) -> None:
    env = {"OUTPOST_HUB_URL": "http://127.0.0.1:9", "OUTPOST_HUB_TOKEN": "x"}
    result = CliRunner().invoke(
        main, ["device", "set", "dev-000000000001", *args], env=env, catch_exceptions=False
    )
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert "cannot reach" not in result.output


def test_device_list_refuses_a_bad_filter_naming_it() -> None:
    env = {"OUTPOST_HUB_URL": "http://127.0.0.1:9", "OUTPOST_HUB_TOKEN": "x"}
    for args, named in ((["--group", "A"], "--group"), (["--tag", "x"], "--tag")):
        result = CliRunner().invoke(main, ["device", "list", *args], env=env)
        assert result.exit_code == 2, result.output
        assert named in result.output
