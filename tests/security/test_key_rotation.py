"""THREATS.md A9 (key rotation) and A3 (duplicate signatures) on a real agent's keyring update.

Table-driven after python-tuf's ``test_updater_key_rotations``: each case is a keyring version
the hub might send with a desired state, given as the root keys it names, their threshold and
the root keys that sign it. The agent (real ``Agent``, fed through its MQTT message handler)
must adopt it exactly when the rules allow (version current+1, a threshold of the current root
keys AND of the new root keys, each key once, not expired) and otherwise keep its keyring file
byte-identical. One end-to-end case rotates the director with the CLI on a live hub.
"""

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from agent.core import Agent
from agent.errors import TrustError
from agent.protocol.canonical import canonical_bytes
from agent.protocol.documents import (
    DesiredState,
    DetachedSignatures,
    FileEntry,
    Framework,
    HealthCheck,
    Keyring,
    Manifest,
    ModelInfo,
    PublicKey,
    Role,
    RoleKeys,
    RuntimeSpec,
    Signed,
    document_dict,
)
from agent.protocol.keys import SigningKey
from agent.protocol.messages import DesiredBody, Reason, encode
from agent.runtimes import load_runtime
from agent.runtimes.health import check_health
from agent.trust import verify_keyring, verify_manifest
from hub.cli import main as hub_cli
from tests.support.agents import fast_settings, write_identity
from tests.support.live_hub import LiveHub, live_hub_with

DEVICE = "dev-000000000001"
NOW = datetime.now(UTC).replace(microsecond=0)
ROOTS = [SigningKey.generate() for _ in range(5)]  # a pool; cases name keys by index
OLD_DIRECTOR, NEW_DIRECTOR, RELEASE = (SigningKey.generate() for _ in range(3))
FIGURES: dict[str, int] = {"cases": 0, "accepted": 0, "refused": 0, "file_unchanged": 0}


def _keyring(
    *,
    version: int,
    roots: tuple[int, ...],
    threshold: int,
    director: SigningKey,
    expires_in: timedelta = timedelta(days=30),
    root_ids: list[str] | None = None,
) -> dict[str, Any]:
    keys = {k.keyid: PublicKey(public=k.public_b64) for k in (director, RELEASE)}
    keys.update({ROOTS[i].keyid: PublicKey(public=ROOTS[i].public_b64) for i in roots})
    return document_dict(
        Keyring(
            version=version,
            expires_at=NOW + expires_in,
            keys=keys,
            roles={
                Role.ROOT: RoleKeys(
                    keyids=root_ids or [ROOTS[i].keyid for i in roots], threshold=threshold
                ),
                Role.RELEASE: RoleKeys(keyids=[RELEASE.keyid]),
                Role.DIRECTOR: RoleKeys(keyids=[director.keyid]),
            },
        )
    )


def _signed(doc: dict[str, Any], signers: tuple[int, ...]) -> Signed:
    return Signed(signed=doc, signatures=[ROOTS[i].sign(doc) for i in signers])


def _desired(counter: int, director: SigningKey) -> Signed:
    doc = document_dict(
        DesiredState(
            device_id=DEVICE,
            counter=counter,
            issued_at=NOW,
            expires_at=NOW + timedelta(days=1),
            packages=[],
        )
    )
    return Signed(signed=doc, signatures=[director.sign(doc)])


@dataclass(frozen=True)
class Trusted:
    """The device's keyring before the update: version 1 naming ``roots`` (pinned: the first)."""

    roots: tuple[int, ...] = (0,)
    threshold: int = 1


@dataclass(frozen=True)
class MdVersion:
    """One keyring update: the root keys it names, their threshold, who signs it, and the
    expected outcome (None: accepted; else the refusal's reason)."""

    roots: tuple[int, ...]
    threshold: int
    sigs: tuple[int, ...]
    result: Reason | None
    version: int = 2
    director: SigningKey = NEW_DIRECTOR
    expires_in: timedelta = timedelta(days=30)
    trusted: Trusted = Trusted()
    root_ids: tuple[str, ...] | None = None  # raw key id list, for a key listed twice


CASES: dict[str, MdVersion] = {
    # (a) root K0 -> K1 signed by the old and the new root.
    "root rotated, old+new sign": MdVersion((1,), 1, (0, 1), None),
    # (b) (c) one side only.
    "root rotated, only new signs": MdVersion((1,), 1, (1,), Reason.UNKNOWN_KEY),
    "root rotated, only old signs": MdVersion((1,), 1, (0,), Reason.UNKNOWN_KEY),
    # (d) a version gap, the same version again, a stale version.
    "version gap N+2": MdVersion((1,), 1, (0, 1), Reason.REPLAY, version=3),
    "same version, other content": MdVersion((1,), 1, (0, 1), Reason.REPLAY, version=1),
    "expired": MdVersion((1,), 1, (0, 1), Reason.EXPIRED, expires_in=timedelta(seconds=-1)),
    # Director rotation: the root stays, the current root signs.
    "director rotated, root signs": MdVersion((0,), 1, (0,), None),
    "director rotated, unsigned": MdVersion((0,), 1, (), Reason.UNKNOWN_KEY),
    "director rotated, stranger signs": MdVersion((0,), 1, (4,), Reason.UNKNOWN_KEY),
    # A3: thresholds count each key once.
    "new 2-of-2 root, one new key signs twice": MdVersion((1, 2), 2, (0, 1, 1), Reason.THRESHOLD),
    "new 2-of-2 root, both sign": MdVersion((1, 2), 2, (0, 1, 2), None),
    "new root lists one key twice for 2-of-2": MdVersion(
        (1,), 2, (0, 1, 1), Reason.MALFORMED, root_ids=(ROOTS[1].keyid, ROOTS[1].keyid)
    ),
    "2-of-3 old root, one old key signs twice": MdVersion(
        (3,), 1, (0, 0, 3), Reason.THRESHOLD, trusted=Trusted((0, 1, 2), 2)
    ),
    "2-of-3 old root, two old keys sign": MdVersion(
        (3,), 1, (0, 2, 3), None, trusted=Trusted((0, 1, 2), 2)
    ),
    "2-of-3 old root, one old key signs": MdVersion(
        (3,), 1, (1, 3), Reason.THRESHOLD, trusted=Trusted((0, 1, 2), 2)
    ),
    "new root unsatisfiable (3 of 1)": MdVersion((1,), 3, (0, 1), Reason.MALFORMED),
}


def _device(tmp_path: Path, trusted: Trusted) -> Agent:
    doc = _keyring(
        version=1, roots=trusted.roots, threshold=trusted.threshold, director=OLD_DIRECTOR
    )
    write_identity(
        tmp_path,
        device_id=DEVICE,
        host="127.0.0.1",
        port=1,  # never connected: messages are fed to the handler directly
        password="x",
        root_public_key=ROOTS[trusted.roots[0]].public_b64,
        keyring=_signed(doc, trusted.roots),
    )
    return Agent(
        settings=fast_settings(tmp_path), load_runtime=load_runtime, check_health=check_health
    )


def _deliver(agent: Agent, keyring: Signed, desired: Signed) -> None:
    topic = f"outpost/d/{DEVICE}/desired"
    agent._on_message(topic, encode(DesiredBody(keyring=keyring, desired=desired)))


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_keyring_update(tmp_path: Path, case: MdVersion) -> None:
    agent = _device(tmp_path, case.trusted)
    keyring_file = tmp_path / "keyring.json"
    before = keyring_file.read_bytes()
    trusted = agent._keyring
    assert trusted is not None
    assert trusted.version == 1
    doc = _keyring(
        version=case.version,
        roots=case.roots,
        threshold=case.threshold,
        director=case.director,
        expires_in=case.expires_in,
        root_ids=list(case.root_ids) if case.root_ids else None,
    )
    _deliver(agent, _signed(doc, case.sigs), _desired(1, case.director))
    FIGURES["cases"] += 1

    if case.result is not None:
        assert agent.rejections == {str(case.result): 1}, agent.last_rejection
        assert keyring_file.read_bytes() == before  # byte-identical trust file
        assert agent._keyring == trusted
        FIGURES["refused"] += 1
        FIGURES["file_unchanged"] += 1
        # The device still takes desired states under the keyring it kept.
        _deliver(agent, Signed.model_validate_json(before), _desired(2, OLD_DIRECTOR))
        assert agent._desired is not None
        assert agent._desired.counter == 2
        return

    assert not agent.rejections, agent.last_rejection
    assert agent._keyring is not None
    assert agent._keyring.version == case.version
    assert json.loads(keyring_file.read_bytes())["signed"] == doc
    FIGURES["accepted"] += 1
    # Later desired states: the old director is refused, the new one accepted.
    kept = Signed.model_validate_json(keyring_file.read_bytes())
    _deliver(agent, kept, _desired(2, OLD_DIRECTOR))
    assert agent.rejections == {str(Reason.UNKNOWN_KEY): 1}
    _deliver(agent, kept, _desired(3, NEW_DIRECTOR))
    assert agent._desired is not None
    assert agent._desired.counter == 3
    # A restart reads the adopted keyring back (after a root rotation the pinned key no
    # longer signs it alone).
    again = Agent(
        settings=fast_settings(tmp_path), load_runtime=load_runtime, check_health=check_health
    )
    assert again._keyring == agent._keyring


def test_kept_keyring_needs_no_new_signatures(tmp_path: Path) -> None:
    """Sending the kept keyring again (every desired state carries it) changes nothing."""
    agent = _device(tmp_path, Trusted())
    before = (tmp_path / "keyring.json").read_bytes()
    kept = Signed.model_validate_json(before)
    _deliver(agent, kept, _desired(1, OLD_DIRECTOR))
    assert not agent.rejections
    assert (tmp_path / "keyring.json").read_bytes() == before


def test_two_rotations_in_a_row_then_restart(tmp_path: Path) -> None:
    """K0 -> K1 -> K2: each step signed by its old and new root; the restarted agent trusts
    the last one although the key pinned at enrolment signs neither of the later ones."""
    agent = _device(tmp_path, Trusted())
    v2 = _signed(_keyring(version=2, roots=(1,), threshold=1, director=NEW_DIRECTOR), (0, 1))
    _deliver(agent, v2, _desired(1, NEW_DIRECTOR))
    v3 = _signed(_keyring(version=3, roots=(2,), threshold=1, director=NEW_DIRECTOR), (1, 2))
    _deliver(agent, v3, _desired(2, NEW_DIRECTOR))
    # The old root K0 alone can no longer issue anything.
    v4 = _signed(_keyring(version=4, roots=(0,), threshold=1, director=OLD_DIRECTOR), (0,))
    _deliver(agent, v4, _desired(3, OLD_DIRECTOR))
    assert agent.rejections == {str(Reason.UNKNOWN_KEY): 1}
    assert agent._keyring is not None
    assert agent._keyring.version == 3
    again = Agent(
        settings=fast_settings(tmp_path), load_runtime=load_runtime, check_health=check_health
    )
    assert again._keyring == agent._keyring


def test_expiry_is_judged_once_per_update_against_one_time(tmp_path: Path) -> None:
    """TUF's fixed update start time: the keyring and the desired state of one update are
    judged against one clock reading, even if the clock moves while the update is checked."""
    readings: list[datetime] = []

    def clock() -> datetime:
        # The first reading is the update's start; any later one is a day on.
        at = NOW + timedelta(days=len(readings))
        readings.append(at)
        return at

    write_identity(
        tmp_path,
        device_id=DEVICE,
        host="127.0.0.1",
        port=1,
        password="x",
        root_public_key=ROOTS[0].public_b64,
        keyring=_signed(_keyring(version=1, roots=(0,), threshold=1, director=OLD_DIRECTOR), (0,)),
    )
    agent = Agent(
        settings=fast_settings(tmp_path),
        load_runtime=load_runtime,
        check_health=check_health,
        clock=clock,
    )
    # Both expire within the hour: only a second, later reading would refuse either.
    v2 = _signed(
        _keyring(
            version=2,
            roots=(0,),
            threshold=1,
            director=NEW_DIRECTOR,
            expires_in=timedelta(hours=1),
        ),
        (0,),
    )
    _deliver(agent, v2, _desired(1, NEW_DIRECTOR))
    assert not agent.rejections, agent.last_rejection
    assert len(readings) == 1
    # The next update reads the clock once more (a day on): both are expired then.
    _deliver(agent, v2, _desired(2, NEW_DIRECTOR))
    assert agent.rejections == {str(Reason.EXPIRED): 1}
    assert len(readings) == 2


def test_report_rotation_figures() -> None:
    """Prints the figures of the table above (run with -s); runs last in this module."""
    if FIGURES["cases"] == 0:
        pytest.skip("the table did not run in this session")
    print(f"\nkey rotation cases: {FIGURES}")
    assert FIGURES["cases"] == len(CASES)
    assert FIGURES["refused"] == FIGURES["file_unchanged"]


@pytest.fixture
def live_hub(tmp_path: Path) -> Iterator[LiveHub]:
    with live_hub_with(tmp_path) as hub:
        yield hub


@pytest.mark.e2e
def test_director_rotated_with_the_cli_reaches_a_live_agent(
    live_hub: LiveHub, iris_model: Any
) -> None:
    """The real path: `outpost-hub keys rotate --role director` on the hub's data directory,
    the running hub publishes the new keyring, the agent adopts it, the old director key is
    refused from then on, and a deployment afterwards still works."""
    live_hub.register(iris_model)
    runner = live_hub.start_agent("a")
    agent = runner.agent
    assert agent is not None
    assert (
        live_hub.cli(
            "deploy", "iris:1", "--wait", "--timeout", "60", "--device", agent.device_id
        ).exit_code
        == 0
    )
    old_director = SigningKey.from_pem((live_hub.settings.keys_dir / "director.pem").read_bytes())
    data_dir = str(live_hub.settings.data_dir)

    rotated = live_hub.cli("keys", "rotate", "--role", "director", "--data-dir", data_dir)
    assert rotated.exit_code == 0, rotated.output
    assert "keyring version 2 in force" in rotated.output
    assert "published keyring version 2 to 1 devices" in rotated.output
    live_hub.wait_until(
        lambda: runner.call(lambda: agent._keyring.version) == 2,  # type: ignore[union-attr]
        what="the agent to adopt keyring version 2",
    )
    new_director = SigningKey.from_pem((live_hub.settings.keys_dir / "director.pem").read_bytes())
    assert new_director.keyid != old_director.keyid
    kept = Signed.model_validate_json((runner.agent.state.root / "keyring.json").read_bytes())  # type: ignore[union-attr]
    assert Keyring.model_validate(kept.signed).roles[Role.DIRECTOR].keyids == [new_director.keyid]

    # A desired state signed by the old director (a stolen or retired key) is refused now.
    refused_before = runner.call(lambda: agent.rejections[str(Reason.UNKNOWN_KEY)])
    counter = runner.call(lambda: agent._progress.desired_counter)
    stale = _desired_for(agent.device_id, counter + 100, old_director)
    assert live_hub.ctx.publisher is not None
    live_hub.ctx.publisher.publish(
        f"outpost/d/{agent.device_id}/desired",
        encode(DesiredBody(keyring=kept, desired=stale)),
        qos=1,
        retain=False,
    )
    live_hub.wait_until(
        lambda: runner.call(lambda: agent.rejections[str(Reason.UNKNOWN_KEY)]) > refused_before,
        what="the old director's desired state to be refused",
    )

    # Deployments go on under the new keyring.
    live_hub.register(iris_model)
    deployed = live_hub.cli(
        "deploy", "iris:2", "--wait", "--timeout", "60", "--device", agent.device_id
    )
    assert deployed.exit_code == 0, deployed.output
    assert runner.call(lambda: agent.get("iris").version) == 2  # type: ignore[union-attr]

    # Two rotations, the first never published (the root, then the director): the device
    # walks v2 -> v3 -> v4 from the chain that comes with its desired state.
    d = ("--data-dir", data_dir)
    assert live_hub.cli("keys", "rotate", "--role", "root", "--no-publish", *d).exit_code == 0
    rotated = live_hub.cli("keys", "rotate", "--role", "director", *d)
    assert "published keyring version 4 to 1 devices" in rotated.output, rotated.output
    live_hub.wait_until(
        lambda: runner.call(lambda: agent._keyring.version) == 4,  # type: ignore[union-attr]
        what="the agent to walk to keyring version 4",
    )
    live_hub.register(iris_model)
    deployed = live_hub.cli(
        "deploy", "iris:3", "--wait", "--timeout", "60", "--device", agent.device_id
    )
    assert deployed.exit_code == 0, deployed.output


def _desired_for(device_id: str, counter: int, director: SigningKey) -> Signed:
    now = datetime.now(UTC)
    doc = document_dict(
        DesiredState(
            device_id=device_id,
            counter=counter,
            issued_at=now,
            expires_at=now + timedelta(hours=1),
            packages=[],
        )
    )
    return Signed(signed=doc, signatures=[director.sign(doc)])


# -- the offline workflow through the CLI ----------------------------------------------------


def _cli(*args: str) -> Result:
    return CliRunner().invoke(hub_cli, list(args), catch_exceptions=False)


def _kept(data: Path) -> Keyring:
    return Keyring.model_validate(
        json.loads((data / "keys" / "keyring.json").read_bytes())["signed"]
    )


def test_offline_release_and_root_rotations_round_trip_with_every_error(tmp_path: Path) -> None:
    """Root key offline: a release rotation becomes a signing request, signed on "another
    machine" by `sign-request` (no data directory), imported back; wrong key, edited request,
    a signature for another version and a forged one are each refused with a clear error.
    Then a root rotation the same way. An agent walks v1 -> v2 -> v3 with the result."""
    data = tmp_path / "hub"
    offline = tmp_path / "offline"
    offline.mkdir()
    d = ("--data-dir", str(data))
    assert _cli("keys", "init", *d).exit_code == 0
    v1 = Signed.model_validate_json((data / "keys" / "keyring.json").read_bytes())
    pinned = (data / "keys" / "root.pub").read_text().strip()
    assert (
        _cli("keys", "export", "--role", "root", "--out", str(offline / "root.pem"), *d).exit_code
        == 0
    )
    assert _cli("keys", "remove", "--role", "root", *d).exit_code == 0

    refused = _cli("keys", "rotate", "--role", "release", "--no-publish", *d)
    assert refused.exit_code == 2
    assert "--offline" in refused.output
    request = tmp_path / "req-v2.json"
    made = _cli(
        "keys",
        "rotate",
        "--role",
        "release",
        "--offline",
        "--out",
        str(request),
        "--no-publish",
        *d,
    )
    assert made.exit_code == 0, made.output
    assert "waiting for signatures by: 1 of" in made.output
    assert "waiting for signatures: keyring version 2" in _cli("keys", "show", *d).output
    busy = _cli("keys", "rotate", "--role", "director", "--no-publish", *d)
    assert busy.exit_code == 2
    assert "already waiting" in busy.output
    assert _kept(data).version == 1  # nothing in force yet

    # The wrong key: the release key is not a root key.
    (offline / "release.pem").write_bytes((data / "keys" / "release.pem").read_bytes())
    wrong = _cli(
        "keys",
        "sign-request",
        str(request),
        "--key",
        str(offline / "release.pem"),
        "--out",
        str(offline / "x.sig"),
    )
    assert wrong.exit_code == 2
    assert "is not one this request asks for" in wrong.output
    assert not (offline / "x.sig").exists()

    # An edited request (a key swapped in its document) is caught by its digest...
    raw = json.loads(request.read_text())
    stranger = SigningKey.generate()
    edited = dict(raw)
    doc = json.loads(json.dumps(raw["document"]))
    doc["keys"][stranger.keyid] = {"scheme": "ed25519", "public": stranger.public_b64}
    edited["document"] = doc
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    damaged = _cli(
        "keys",
        "sign-request",
        str(tmp_path / "edited.json"),
        "--key",
        str(offline / "root.pem"),
        "--out",
        str(offline / "e.sig"),
    )
    assert damaged.exit_code == 2
    assert "was changed after it was exported" in damaged.output
    # ... and with the digest recomputed too, the hub refuses the signature: it judges it
    # against its own copy of the request.
    edited["sha256"] = hashlib.sha256(canonical_bytes(doc)).hexdigest()
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    assert (
        _cli(
            "keys",
            "sign-request",
            str(tmp_path / "edited.json"),
            "--key",
            str(offline / "root.pem"),
            "--out",
            str(offline / "e.sig"),
        ).exit_code
        == 0
    )
    tampered = _cli("keys", "import-signature", str(offline / "e.sig"), "--no-publish", *d)
    assert tampered.exit_code == 2
    assert "sha256 differs" in tampered.output
    # A forged signature under the right key id.
    good = offline / "v2.sig"
    signed = _cli(
        "keys", "sign-request", str(request), "--key", str(offline / "root.pem"), "--out", str(good)
    )
    assert signed.exit_code == 0, signed.output
    assert "signing: keyring version 2: new release key" in signed.output
    forged = json.loads(good.read_text())
    forged["signature"]["sig"] = stranger.sign(raw["document"]).sig
    (offline / "forged.sig").write_text(json.dumps(forged))
    bad = _cli("keys", "import-signature", str(offline / "forged.sig"), "--no-publish", *d)
    assert bad.exit_code == 2
    assert "does not verify" in bad.output
    assert _kept(data).version == 1

    done = _cli("keys", "import-signature", str(good), "--no-publish", *d)
    assert done.exit_code == 0, done.output
    assert "keyring version 2 in force: new release key" in done.output
    assert "waiting" not in _cli("keys", "show", *d).output

    # The agent takes it as the next version after the one it had.
    current = verify_keyring(v1, root_public_b64=pinned, current=None, now=NOW)
    v2 = Signed.model_validate_json((data / "keys" / "keyring.json").read_bytes())
    current = verify_keyring(v2, root_public_b64=pinned, current=current, now=NOW)
    assert current.version == 2

    # A root rotation: the new root (made on the hub) signs at once, the old one offline.
    root_request = tmp_path / "req-v3.json"
    made = _cli(
        "keys",
        "rotate",
        "--role",
        "root",
        "--offline",
        "--out",
        str(root_request),
        "--no-publish",
        *d,
    )
    assert made.exit_code == 0, made.output
    assert "(current root)" in made.output
    assert "(new root)" not in made.output  # signed already
    # The v2 signature is an answer to another request.
    stale = _cli("keys", "import-signature", str(good), "--no-publish", *d)
    assert stale.exit_code == 2
    assert "for keyring version 2, the pending request is for keyring version 3" in stale.output
    v3_sig = offline / "v3.sig"
    assert (
        _cli(
            "keys",
            "sign-request",
            str(root_request),
            "--key",
            str(offline / "root.pem"),
            "--out",
            str(v3_sig),
        ).exit_code
        == 0
    )
    done = _cli("keys", "import-signature", str(v3_sig), "--no-publish", *d)
    assert done.exit_code == 0, done.output
    assert "keyring version 3 in force: new root key" in done.output
    new_pinned = (data / "keys" / "root.pub").read_text().strip()
    assert new_pinned != pinned
    v3 = Signed.model_validate_json((data / "keys" / "keyring.json").read_bytes())
    assert len(v3.signatures) == 2
    # A device enrolled before (pinned: the old root) moves on; one enrolled now pins the new.
    assert verify_keyring(v3, root_public_b64=pinned, current=current, now=NOW).version == 3
    assert verify_keyring(v3, root_public_b64=new_pinned, current=None, now=NOW).version == 3
    # A device that missed v2 cannot jump to v3.
    with pytest.raises(TrustError) as info:
        verify_keyring(
            v3,
            root_public_b64=pinned,
            current=verify_keyring(v1, root_public_b64=pinned, current=None, now=NOW),
            now=NOW,
        )
    assert info.value.reason is Reason.REPLAY


# -- a device that missed rotations -----------------------------------------------------------


def _chain() -> list[Signed]:
    """v1 (root K0) -> v2 (root K1) -> v3 (director rotated) -> v4 (root K2), each proper."""
    return [
        _signed(_keyring(version=1, roots=(0,), threshold=1, director=OLD_DIRECTOR), (0,)),
        _signed(_keyring(version=2, roots=(1,), threshold=1, director=OLD_DIRECTOR), (0, 1)),
        _signed(_keyring(version=3, roots=(1,), threshold=1, director=NEW_DIRECTOR), (1,)),
        _signed(_keyring(version=4, roots=(2,), threshold=1, director=NEW_DIRECTOR), (1, 2)),
    ]


def _deliver_with_chain(agent: Agent, final: Signed, earlier: list[Signed], counter: int) -> None:
    body = DesiredBody(keyring=final, keyrings=earlier, desired=_desired(counter, NEW_DIRECTOR))
    agent._on_message(f"outpost/d/{DEVICE}/desired", encode(body))


def test_a_device_behind_walks_the_chain_one_version_at_a_time(tmp_path: Path) -> None:
    agent = _device(tmp_path, Trusted())
    v1, v2, v3, v4 = _chain()
    # Sent in any order, with versions it already has.
    _deliver_with_chain(agent, v4, [v3, v1, v2], 1)
    assert not agent.rejections, agent.last_rejection
    assert agent._keyring is not None
    assert agent._keyring.version == 4
    assert Signed.model_validate_json((tmp_path / "keyring.json").read_bytes()) == v4


@pytest.mark.parametrize(
    ("name", "earlier", "reason"),
    [
        # v4 is signed by roots v1 does not trust: refused on that before its version.
        ("a missing step", [1, 3], Reason.UNKNOWN_KEY),
        ("no chain at all", [], Reason.UNKNOWN_KEY),
        ("a missing step, root kept", [1, 2], Reason.REPLAY),
        ("a step signed only by its new root", ["v2-new-only", 3], Reason.UNKNOWN_KEY),
    ],
)
def test_a_broken_chain_is_refused_and_nothing_is_kept(
    tmp_path: Path, name: str, earlier: list[Any], reason: Reason
) -> None:
    agent = _device(tmp_path, Trusted())
    before = (tmp_path / "keyring.json").read_bytes()
    chain = _chain()
    bad_v2 = _signed(_keyring(version=2, roots=(1,), threshold=1, director=OLD_DIRECTOR), (1,))
    steps = [bad_v2 if e == "v2-new-only" else chain[e - 1] for e in earlier]
    _deliver_with_chain(agent, chain[3], steps, 1)
    assert agent.rejections == {str(reason): 1}, agent.last_rejection
    assert (tmp_path / "keyring.json").read_bytes() == before
    assert agent._keyring is not None
    assert agent._keyring.version == 1


def test_after_a_release_rotation_only_the_new_release_key_releases(tmp_path: Path) -> None:
    """A9 for packages: once the device adopted a keyring naming a new release key, a manifest
    signed by the old release key is not released any more; one by the new key is."""
    new_release = SigningKey.generate()
    agent = _device(tmp_path, Trusted())
    doc = _keyring(version=2, roots=(0,), threshold=1, director=OLD_DIRECTOR)
    doc["keys"] = {k: v for k, v in doc["keys"].items() if k != RELEASE.keyid}
    doc["keys"][new_release.keyid] = {"scheme": "ed25519", "public": new_release.public_b64}
    doc["roles"]["release"] = {"keyids": [new_release.keyid], "threshold": 1}
    _deliver(agent, _signed(doc, (0,)), _desired(1, OLD_DIRECTOR))
    assert not agent.rejections, agent.last_rejection
    keyring = agent._keyring
    assert keyring is not None
    assert keyring.version == 2
    manifest = document_dict(
        Manifest(
            model=ModelInfo(name="iris", version=1, framework=Framework.ONNX),
            runtime=RuntimeSpec(model_file="model.onnx"),
            files=[FileEntry(path="model.onnx", size=1, sha256="0" * 64)],
            health_check=HealthCheck(input="in.json", expected_output="out.json"),
            created_at=NOW,
        )
    )

    def check(signer: SigningKey) -> None:
        sigs = DetachedSignatures(signatures=[signer.sign(manifest)]).model_dump_json().encode()
        verify_manifest(
            canonical_bytes(manifest), sigs, keyring=keyring, device_class="g", agent_version="1"
        )

    with pytest.raises(TrustError) as info:
        check(RELEASE)
    assert info.value.reason is Reason.NOT_RELEASED
    check(new_release)
