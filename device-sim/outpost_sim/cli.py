"""``outpost-sim``: run a fleet of simulated devices against a hub. Wiring only.

    outpost-sim run scenario.yaml [--json [FILE]]
    outpost-sim run --hub http://127.0.0.1:8780 --token T --devices 200 --state-dir var/sim
    outpost-sim plan scenario.yaml
    outpost-sim run device-sim/scenarios/staged-rollout.yaml   # canary, waves, soak, threshold

``run`` enrols the devices that have no identity yet (one bulk request per 1,000), starts them
over the ramp, does the scenario's steps with a live progress view on stderr, and ends with a
report (``--json`` writes it as JSON, to stdout or a file). A deploy step follows its rollout
through the hub's API until it is done, and the report gives its final state, each wave's
counts and times, and how often each device installed it; the exit code is 1 when a rollout
did not end as its step's ``expect`` says. Without a scenario file it runs one group of
``--devices`` until Ctrl-C, SIGTERM or ``--duration-s``. ``plan`` prints the fault schedule a
scenario and seed expand to, without running anything.
"""

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from agent.errors import AgentError
from outpost_sim.report import RunReport, format_report
from outpost_sim.runner import ScenarioRunner, enroll_scenario, plan_devices
from outpost_sim.scenario import (
    GroupSpec,
    HubSpec,
    Scenario,
    ScenarioError,
    load_scenario,
    parse_scenario,
)
from outpost_sim.view import ProgressView


def _scenario(args: argparse.Namespace) -> Scenario:
    if args.scenario is not None:
        scenario = load_scenario(args.scenario)
        updates: dict[str, object] = {}
        if args.seed is not None:
            updates["seed"] = args.seed
        if args.state_dir is not None:
            updates["state_dir"] = args.state_dir
        if args.hub or args.token:
            hub = scenario.hub.model_copy(
                update={
                    k: v for k, v in {"url": args.hub, "enrollment_token": args.token}.items() if v
                }
            )
            updates["hub"] = hub
        return scenario.model_copy(update=updates)
    if args.devices is None or args.state_dir is None:
        raise ScenarioError("give a scenario file, or --devices and --state-dir")
    group: dict[str, object] = {"group": "sim", "count": args.devices}
    if args.device_class:
        group["profile"] = {"device_class": args.device_class}
    return parse_scenario(
        {
            "name": "adhoc",
            "seed": args.seed or 0,
            "hub": HubSpec(url=args.hub or HubSpec().url, enrollment_token=args.token).model_dump(),
            "state_dir": str(args.state_dir),
            "ramp_s": args.ramp_s,
            "io_threads": args.io_threads,
            "fleet": [GroupSpec.model_validate(group).model_dump()],
        },
        source="command line",
    )


def _write_json(report: RunReport, target: str) -> None:
    text = json.dumps(report.as_dict(), indent=2, sort_keys=True)
    if target == "-":
        print(text)
    else:
        Path(target).write_text(text + "\n", encoding="utf-8")


def _cmd_run(args: argparse.Namespace) -> int:
    scenario = _scenario(args)
    view = ProgressView(sys.stderr)
    enrolled = enroll_scenario(
        scenario, on_progress=lambda done, total: view.write(f"enrolling: {done}/{total}")
    )
    if enrolled is not None:
        view.done()
        print(
            f"enrolled {enrolled.enrolled} devices ({enrolled.skipped} already were)",
            file=sys.stderr,
        )

    async def main() -> RunReport:
        runner = ScenarioRunner(
            scenario, view=view, config_file=args.config, duration_s=args.duration_s
        )
        return await runner.run()

    report = asyncio.run(main())
    if args.json is not None:
        _write_json(report, args.json)
        print(format_report(report), file=sys.stderr)
    else:
        print(format_report(report))
    unexpected = [r for r in report.rollouts if r.as_expected is False]
    return 1 if report.unexpected_errors or unexpected else 0


def _cmd_plan(args: argparse.Namespace) -> int:
    scenario = load_scenario(args.scenario)
    if args.seed is not None:
        scenario = scenario.model_copy(update={"seed": args.seed})
    from outpost_sim.faults import DeviceSlot, describe, plan_faults

    planned = plan_devices(scenario)
    plan = plan_faults(
        scenario.faults,
        [DeviceSlot(p.index, p.group) for p in planned],
        seed=scenario.seed,
        horizon_s=scenario.horizon_s(),
    )
    print(f"scenario {scenario.name}, seed {scenario.seed}, fault plan {plan.fingerprint()}")
    for kind, devices in plan.counts().items():
        print(f"  {kind}: {devices} devices")
    for index, faults in sorted(plan.devices.items()):
        print(f"  {planned[index].state_dir.name}: {describe(faults)}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outpost-sim", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every device's steps")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="enrol what is missing, run the fleet and the scenario")
    p.add_argument("scenario", nargs="?", type=Path, help="scenario file (.yaml or .toml)")
    p.add_argument("--hub", help="hub URL, e.g. http://127.0.0.1:8780 (overrides the scenario)")
    p.add_argument("--token", help="enrolment token with at least as many uses as new devices")
    p.add_argument("--devices", type=_positive, help="number of devices (without a scenario)")
    p.add_argument("--state-dir", type=Path, help="one subdirectory per device")
    p.add_argument("--seed", type=int, help="seed for the fault schedule (overrides)")
    p.add_argument("--ramp-s", type=_seconds, default=10.0, help="spread connects over S s")
    p.add_argument("--duration-s", type=_seconds, help="stop after S s (default: Ctrl-C)")
    p.add_argument("--device-class", help="device class to enrol and run as (default generic)")
    p.add_argument("--config", type=Path, help="agent TOML config applied to every device")
    p.add_argument("--io-threads", type=_positive, default=4, help="install threads")
    p.add_argument(
        "--json", nargs="?", const="-", metavar="FILE", help="write the report as JSON (- stdout)"
    )
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("plan", help="print the fault schedule of a scenario and seed")
    p.add_argument("scenario", type=Path)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=_cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.func(args)
    except (AgentError, ScenarioError) as exc:
        detail = exc.detail if isinstance(exc, AgentError) else str(exc)
        print(f"outpost-sim: {detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`outpost-sim plan ... | head`): not an error of ours.
        # Point stdout at /dev/null so the interpreter's flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
