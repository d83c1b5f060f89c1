"""Fault plans and scenario files: pure logic, no broker."""

from pathlib import Path

import pytest

from agent.failpoints import Failpoint
from outpost_sim.cli import main
from outpost_sim.faults import DeviceSlot, FaultPlan, plan_faults
from outpost_sim.scenario import DeployStep, ScenarioError, load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parents[2]
SLOTS = [DeviceSlot(i, "a" if i < 60 else "b") for i in range(100)]

FAULTS = [
    {"kind": "connection_drops", "rate_per_min": 3, "devices": "10%"},
    {"kind": "offline", "at_s": 5, "for_s": 10, "devices": 4},
    {"kind": "crash", "at": "after_unpack", "devices": 2, "group": "b"},
    {"kind": "health_fail", "devices": 3},
    {"kind": "malformed", "count": 3, "devices": 1},
]


def _plan(seed: int, faults: list[dict[str, object]] = FAULTS) -> FaultPlan:
    scenario = parse_scenario(
        {"fleet": [{"group": "a", "count": 60}, {"group": "b", "count": 40}], "faults": faults}
    )
    return plan_faults(scenario.faults, SLOTS, seed=seed, horizon_s=120)


def test_same_seed_gives_the_same_schedule_and_another_seed_another() -> None:
    first, again, other = _plan(7), _plan(7), _plan(8)
    assert first == again
    assert first.fingerprint() == again.fingerprint()
    assert first.fingerprint() != other.fingerprint()


def test_adding_a_fault_does_not_move_the_faults_before_it() -> None:
    base = _plan(7)
    more = _plan(7, [*FAULTS, {"kind": "clock_skew", "offset_s": 3600, "devices": 5}])
    for index, faults in base.devices.items():
        assert more.devices[index].drops_at == faults.drops_at
        assert more.devices[index].offline == faults.offline


def test_plan_picks_the_counts_and_groups_asked_for() -> None:
    plan = _plan(7)
    assert plan.counts() == {
        "connection_drops": 10,
        "crash": 2,
        "health_fail": 3,
        "malformed": 1,
        "offline": 4,
    }
    crashed = [i for i, f in plan.devices.items() if f.crash_at]
    assert all(SLOTS[i].group == "b" for i in crashed)
    assert all(plan.devices[i].crash_at is Failpoint.AFTER_UNPACK for i in crashed)
    for faults in plan.devices.values():
        assert all(0 < t < 120 for t in faults.drops_at), "drops stay inside the horizon"
        assert faults.drops_at == sorted(faults.drops_at)
    malformed = [f for f in plan.devices.values() if f.malformed_at]
    assert [f.malformed_at for f in malformed] == [[0.0, 1.0, 2.0]]


def test_yaml_and_toml_scenarios_read_the_same(tmp_path: Path) -> None:
    yaml_file = tmp_path / "s.yaml"
    yaml_file.write_text(
        "name: both\nseed: 3\nfleet:\n  - {group: plant-1, count: 5, profile: {tags: {site: p1}}}\n"
        "faults:\n  - {kind: slow_link, kbps: 500, devices: 2}\n"
        "steps:\n  - {do: deploy, model: iris}\n  - {do: idle, for_s: 1}\n"
    )
    toml_file = tmp_path / "s.toml"
    toml_file.write_text(
        'name = "both"\nseed = 3\n[[fleet]]\ngroup = "plant-1"\ncount = 5\n'
        '[fleet.profile.tags]\nsite = "p1"\n[[faults]]\nkind = "slow_link"\nkbps = 500\n'
        'devices = 2\n[[steps]]\ndo = "deploy"\nmodel = "iris"\n[[steps]]\ndo = "idle"\n'
        "for_s = 1\n"
    )
    assert load_scenario(yaml_file) == load_scenario(toml_file)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"fleet": []}, "fleet: List should have at least 1 item"),
        ({"fleet": [{"count": 0}]}, "fleet.0.count"),
        ({"fleet": [{"count": 1}], "faults": [{"kind": "meteor"}]}, "faults.0"),
        ({"fleet": [{"count": 1}], "faults": [{"kind": "crash", "at": "mid_air"}]}, "at"),
        ({"fleet": [{"count": 1}], "faults": [{"kind": "health_fail", "group": "x"}]}, "'x'"),
        ({"fleet": [{"count": 1}], "faults": [{"kind": "health_fail", "devices": "120%"}]}, "%"),
        (
            {"fleet": [{"count": 1}], "steps": [{"do": "deploy", "model": "m", "groups": ["z"]}]},
            "z",
        ),
        ({"fleet": [{"count": 1}, {"count": 2}]}, "distinct names"),
        ({"fleet": [{"count": 1}], "surprise": 1}, "surprise"),
        (
            {
                "fleet": [{"count": 1}],
                "steps": [{"do": "deploy", "model": "m", "policy": {"wave_sise": 3}}],
            },
            "steps.0.deploy.policy.wave_sise",
        ),
        (
            {"fleet": [{"count": 1}], "steps": [{"do": "deploy", "model": "m", "expect": "done"}]},
            "steps.0.deploy.expect",
        ),
        (
            {"fleet": [{"count": 1}], "faults": [{"kind": "health_fail", "versions": []}]},
            "versions",
        ),
    ],
)
def test_bad_scenarios_are_refused_naming_the_field(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ScenarioError, match="scenario: ") as caught:
        parse_scenario(raw)
    assert message in str(caught.value)


def test_unreadable_scenario_files_get_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("fleet: [unclosed")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(bad)
    with pytest.raises(ScenarioError, match=r"end in \.yaml"):
        load_scenario(tmp_path / "s.json")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ScenarioError, match="mapping"):
        load_scenario(listed)


def test_plan_command_prints_the_same_schedule_for_the_same_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "s.yaml"
    scenario.write_text(
        "name: p\nseed: 11\nfleet: [{count: 30}]\n"
        "faults: [{kind: connection_drops, rate_per_min: 2, devices: 5}]\n"
    )
    assert main(["plan", str(scenario)]) == 0
    first = capsys.readouterr().out
    assert main(["plan", str(scenario)]) == 0
    assert capsys.readouterr().out == first
    assert "connection_drops: 5 devices" in first
    assert main(["plan", str(scenario), "--seed", "12"]) == 0
    assert capsys.readouterr().out.splitlines()[0] != first.splitlines()[0]
    assert main(["plan", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read scenario" in capsys.readouterr().err


@pytest.mark.parametrize(
    "path", sorted((ROOT / "device-sim" / "scenarios").glob("*.*")), ids=lambda p: p.name
)
def test_the_example_scenarios_are_valid(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.devices > 0
    assert scenario.steps


def test_the_staged_rollout_example_sends_its_policy_to_the_hub_as_written() -> None:
    scenario = load_scenario(ROOT / "device-sim" / "scenarios" / "staged-rollout.yaml")
    first, staged = (s for s in scenario.steps if isinstance(s, DeployStep))
    assert first.body(["d1"]) == {"model": "iris", "version": 1, "devices": ["d1"]}
    # Canary, waves, soak and a failure threshold; unset fields are left to the hub.
    assert staged.body(["d1", "d2"]) == {
        "model": "iris",
        "version": 2,
        "devices": ["d1", "d2"],
        "policy": {
            "canary_percent": 5,
            "wave_percent": 25,
            "soak_s": 10,
            "max_failure_ratio": 0.2,
            "min_devices": 20,
            "rollback_on_abort": True,
        },
        "device_timeout_s": 120,
    }
    assert (first.expect, staged.expect) == ("completed", "completed")
    plan = plan_faults(
        scenario.faults,
        [DeviceSlot(i, "plant-1") for i in range(scenario.devices)],
        seed=scenario.seed,
        horizon_s=scenario.horizon_s(),
    )
    failing = [f for f in plan.devices.values() if f.health_fail]
    assert [f.health_fail_versions for f in failing] == [[2]] * 4


def test_health_fail_versions_add_up_on_one_device() -> None:
    faults: list[dict[str, object]] = [
        {"kind": "health_fail", "versions": [2], "devices": "all"},
        {"kind": "health_fail", "versions": [3, 2], "devices": "all"},
    ]
    plan = _plan(1, faults)
    assert all(f.health_fail_versions == [2, 3] for f in plan.devices.values())
    everything = _plan(1, [*faults, {"kind": "health_fail", "devices": "all"}])
    assert all(f.health_fail_versions is None for f in everything.devices.values())
