"""``outpost-agent``: enrol a device, run it, show its scoring key and status. Wiring only."""

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from agent import __version__
from agent.core import Agent, utc_now
from agent.enroll import enroll
from agent.errors import AgentError
from agent.failpoints import ENV_VAR as FAILPOINT_ENV
from agent.failpoints import FailpointError
from agent.runtimes import load_runtime
from agent.runtimes.base import ActiveModels
from agent.runtimes.health import check_health
from agent.runtimes.trial import TrialLoader
from agent.scoring import ScoringServer
from agent.scoring_keys import ScoringKeyFile
from agent.settings import AgentSettings, ScoringSettings
from agent.state import ScoringKeyName, StateDir

logger = logging.getLogger("outpost.agent")


def _settings(args: argparse.Namespace) -> AgentSettings:
    overrides: dict[str, Any] = {}
    if args.state_dir is not None:
        overrides["state_dir"] = args.state_dir
    if getattr(args, "device_class", None):
        overrides["device_class"] = args.device_class
    return AgentSettings.load(args.config, **overrides)


def scoring_server(
    settings: ScoringSettings, *, models: ActiveModels, state: StateDir
) -> ScoringServer:
    """The local endpoint; its keys are re-read when `outpost-agent key rotate` replaces the
    key file, so a rotation needs no restart."""
    return ScoringServer(
        models=models,
        keys=ScoringKeyFile(state),
        host=settings.host,
        port=settings.port,
        max_body_bytes=settings.max_body_bytes,
    )


async def _run(settings: AgentSettings) -> None:
    load = (
        TrialLoader(load_runtime, timeout_s=settings.models.trial_timeout_s)
        if settings.models.trial_load
        else load_runtime
    )
    agent = Agent(settings=settings, load_runtime=load, check_health=check_health)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server: ScoringServer | None = None
    if settings.scoring.enabled:
        server = scoring_server(settings.scoring, models=agent, state=agent.state)
        await server.start()
        logger.info("scoring endpoint on http://%s:%s/score", settings.scoring.host, server.port)
    logger.info("agent %s running as %s", __version__, agent.device_id)
    try:
        await agent.run(stop)
    finally:
        if server is not None:
            await server.stop()


def _cmd_enroll(args: argparse.Namespace) -> int:
    settings = _settings(args)
    identity = enroll(
        hub_url=args.hub,
        token=args.token,
        state=StateDir(settings.state_dir),
        now=utc_now(),
        device_class=settings.device_class,
        name=args.name,
        root_fingerprint=args.root_fingerprint,
    )
    print(f"enrolled as {identity.device_id}; state in {settings.state_dir}")
    if args.certificate:
        return _cmd_certificate(args)
    return 0


def _cmd_certificate(args: argparse.Namespace) -> int:
    state = StateDir(_settings(args).state_dir)
    # Imported here: X.509 costs the running daemon ~15 MB of memory it never uses.
    from agent.certificate import request_certificate

    endpoint = request_certificate(state=state)
    print(f"certificate in {state.root / 'tls'}; TLS listener {endpoint.host}:{endpoint.port}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    asyncio.run(_run(_settings(args)))
    return 0


def _cmd_key(args: argparse.Namespace) -> int:
    state = StateDir(_settings(args).state_dir)
    which = ScoringKeyName.SECONDARY if args.secondary else ScoringKeyName.PRIMARY
    if args.action == "rotate":
        if not (args.primary or args.secondary):
            print("outpost-agent: key rotate needs --primary or --secondary", file=sys.stderr)
            return 2
        state.rotate_scoring_key(which)
        print(f"new {which} key (the other key still works):", file=sys.stderr)
    keys = state.scoring_keys()
    print(keys.secondary if which is ScoringKeyName.SECONDARY else keys.primary)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    state = StateDir(_settings(args).state_dir)
    identity = state.load_identity()
    progress = state.load_progress()
    print(f"device {identity.device_id} (class {identity.device_class})")
    print(f"broker {identity.broker.host}:{identity.broker.port}, hub {identity.hub_url}")
    print(f"desired state counter {progress.desired_counter}")
    for pointer_file in sorted(state.models.glob("*/active.json")):
        print(f"model {pointer_file.parent.name}: {pointer_file.read_text()}")
    for digest, bad in sorted(progress.bad.items()):
        print(f"bad {digest[:16]} ({bad.reason}, deployment {bad.deployment_id})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outpost-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--config", type=Path, help="TOML config file")
    parser.add_argument("--state-dir", type=Path, help="state directory (default var/agent)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("enroll", help="enrol this device with a hub")
    p.add_argument("--hub", required=True, help="hub URL, e.g. http://127.0.0.1:8780")
    p.add_argument("--token", required=True, help="enrolment token from `outpost-hub device token`")
    p.add_argument("--name", help="a human name for the device")
    p.add_argument("--device-class", help="device class (default: generic)")
    p.add_argument("--root-fingerprint", help="expected root key id prefix, to pin it")
    p.add_argument(
        "--certificate", action="store_true", help="then request a TLS client certificate"
    )
    p.set_defaults(func=_cmd_enroll)

    p = sub.add_parser(
        "certificate", help="request or renew the TLS client certificate (hub broker.tls)"
    )
    p.set_defaults(func=_cmd_certificate)

    p = sub.add_parser("run", help="run the agent until Ctrl-C")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "key",
        help="print or rotate the scoring endpoint's key",
        description="Print a scoring key, or `rotate` one: rotate the key clients do not "
        "use, move them to it, then rotate the other; a running agent picks the new key "
        "up on the next request.",
    )
    p.add_argument("action", nargs="?", choices=["show", "rotate"], default="show")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--primary", action="store_true", help="the primary key (default)")
    which.add_argument("--secondary", action="store_true", help="the secondary key")
    p.set_defaults(func=_cmd_key)

    p = sub.add_parser("status", help="show identity and installed models")
    p.set_defaults(func=_cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.func(args)
    except AgentError as exc:
        print(f"outpost-agent: {exc}", file=sys.stderr)
        return 2
    except FailpointError as exc:
        print(f"outpost-agent: {exc} (from {FAILPOINT_ENV})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
