"""THREATS.md group A, one test per attack (A2 is the fuzz in test_fuzz_*.py, A9 key rotation
is in test_key_rotation.py).

Each test plays the attack against what the agent really runs: A1 and A11 against a real agent
over a real Mosquitto (the hub's side scripted); the desired-state attacks (A4a, A5, A6)
against a real ``Agent`` fed messages as its MQTT adapter feeds them; the package attacks
against the device's ``ModelStore`` and the download's ``ChunkAssembler``. Each asserts the
reason the agent gives, that the version it served before is still active, and that nothing
is left in staging or anywhere else.

Reason codes are the contract's (``agent.protocol.messages.Reason``); where THREATS.md names a
code the contract does not have, the test says which one stands for it.
"""

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.archive import ArchiveLimits
from agent.core import Agent
from agent.download import MAX_CORRUPT_PER_CHUNK, ChunkAssembler
from agent.errors import RejectedError, TooLargeError
from agent.install import ModelStore, TrustContext
from agent.protocol.documents import (
    DetachedSignatures,
    Manifest,
    PackageRef,
    Signed,
    document_dict,
)
from agent.protocol.keys import Signature, SigningKey
from agent.protocol.messages import Reason, Step
from agent.protocol.package import MANIFEST_NAME, SIGNATURE_NAME
from agent.protocol.topics import Channel, Topics
from agent.runtimes import load_runtime
from agent.runtimes.base import Runtime
from agent.runtimes.health import check_health
from agent.trust import verify_keyring
from tests.conftest import BrokerHandle
from tests.security.conftest import AGENT_VERSION, make_store, tree
from tests.support.agents import DEVICE, fast_settings, running_agent, write_identity
from tests.support.fake_hub import FakeHub
from tests.support.package_simulator import PackageRepoSimulator, SimPackage, tar_of

TOPIC = Topics("outpost").device(DEVICE, Channel.DESIRED)


# -- a device's store with v1 active ------------------------------------------------------------


@dataclass
class Store:
    """A device's model store with v1 active, recording what a runtime was asked to do."""

    root: Path
    sim: PackageRepoSimulator
    trust: TrustContext
    store: ModelStore = field(init=False)
    loaded: list[str] = field(default_factory=list)
    health_checked: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.store = ModelStore(
            self.root / "models",
            load_runtime=self._load,
            check_health=self._check,
            limits=ArchiveLimits(),
        )

    def _load(self, model_dir: Path, manifest: Manifest) -> Runtime:
        self.loaded.append(f"{manifest.model.name} v{manifest.model.version}")
        return load_runtime(model_dir, manifest)

    def _check(self, runtime: Runtime, files_dir: Path, check: Any) -> None:
        self.health_checked.append(str(files_dir))
        check_health(runtime, files_dir, check)

    def install(self, data: bytes, ref: PackageRef, trust: TrustContext | None = None) -> Any:
        path = self.root / "incoming.tar"
        path.write_bytes(data)
        try:
            return self.store.install(path, ref, trust or self.trust, lambda _: None)
        finally:
            path.unlink()

    def refused(self, data: bytes, manifest: Manifest, **kwargs: Any) -> RejectedError:
        """Install ``data`` as the director would name it; it must be refused and change
        nothing on the device."""
        before = tree(self.root)
        active = self.store.pointer("iris")
        with pytest.raises(RejectedError) as info:
            self.install(data, self.sim.ref_for(data, manifest), **kwargs)
        assert tree(self.root) == before, "a refused package left files behind"
        assert self.store.pointer("iris") == active
        assert not any(p.name.startswith(".staging") for p in self.root.rglob("*"))
        return info.value


@pytest.fixture
def device(
    tmp_path: Path, sim: PackageRepoSimulator, files: dict[str, bytes], trust: TrustContext
) -> Store:
    device = Store(tmp_path / "device", sim, trust)
    v1 = sim.package(files, version=1)
    device.install(v1.data, v1.ref)
    device.loaded.clear()
    device.health_checked.clear()
    return device


# -- A1 and A11: a real agent over MQTT ---------------------------------------------------------


@pytest.fixture
def mqtt_device(
    tmp_path: Path, mosquitto: BrokerHandle, sim: PackageRepoSimulator
) -> Iterator[tuple[FakeHub, Path]]:
    hub = FakeHub(
        host=mosquitto.host,
        port=mosquitto.port,
        username=mosquitto.hub_username,
        password=mosquitto.hub_password,
    )
    hub.start()
    state_dir = tmp_path / "agent"
    write_identity(
        state_dir,
        device_id=DEVICE,
        host=mosquitto.host,
        port=mosquitto.port,
        password=mosquitto.add_device(DEVICE),
        root_public_key=sim.root_public_b64,
        keyring=sim.keyring(),
    )
    yield hub, state_dir
    hub.stop()


def _last_event(hub: FakeHub, deployment_id: str) -> Any:
    return [e for _, e in hub.events if e.deployment_id == deployment_id][-1]


def _done(hub: FakeHub, deployment_id: str) -> bool:
    return any(
        e.deployment_id == deployment_id and e.step in (Step.ACTIVE, Step.FAILED)
        for _, e in hub.events
    )


def _refused_over_mqtt(
    hub: FakeHub,
    state_dir: Path,
    sim: PackageRepoSimulator,
    files: dict[str, bytes],
    bad: tuple[bytes, PackageRef],
) -> tuple[Any, int]:
    """v1 installed and active, then ``bad`` deployed by the (compromised) director; returns
    the last event of the bad deployment and how many times v1 answered the probe."""
    v1 = sim.package(files, version=1)
    data, ref = bad
    hub.packages.update({v1.ref.digest: v1.data, ref.digest: data})
    hub.desired[DEVICE] = sim.desired_message(sim.desired([v1.ref], counter=1))
    probes = 0
    with running_agent(state_dir) as (runner, agent):
        hub.wait_for(lambda: _done(hub, v1.ref.deployment_id))
        sample = json.loads(files["sample_input.json"])
        expected = json.loads(files["expected_output.json"])["label"]

        def v1_answers() -> bool:
            nonlocal probes
            model = runner.call(lambda: agent.get("iris"))
            assert model.version == 1, "the served model changed during the attack"
            assert model.runtime.predict(sample)["label"].tolist() == expected
            probes += 1
            return True

        hub.publish_desired(DEVICE, sim.desired_message(sim.desired([ref], counter=2)))
        deadline = time.monotonic() + 30
        while not _done(hub, ref.deployment_id):
            v1_answers()
            assert time.monotonic() < deadline, "the bad deployment never ended"
            time.sleep(0.05)
        v1_answers()
        hub.wait_for(lambda: any(ref.digest in s.bad for _, s in hub.states))
    models = state_dir / "models"
    assert not any(p.name.startswith(".staging") for p in models.rglob("*"))
    assert not list((state_dir / "downloads").iterdir()), "refused bytes were kept"
    assert [p.name for p in (models / "iris").iterdir() if p.is_dir()] == [
        f"v1-{v1.ref.digest[:16]}"
    ]
    return _last_event(hub, ref.deployment_id), probes


@pytest.mark.integration
@pytest.mark.parametrize("how", ["no_signature_file", "empty_signature_list"])
def test_a1_unsigned_package_is_refused_before_extraction_and_v1_keeps_serving(
    mqtt_device: tuple[FakeHub, Path],
    sim: PackageRepoSimulator,
    files: dict[str, bytes],
    how: str,
) -> None:
    hub, state_dir = mqtt_device
    v2 = sim.package(files, version=2, signatures=[])
    members = dict(v2.members)
    if how == "no_signature_file":
        del members[SIGNATURE_NAME]
    data = tar_of(members)
    event, probes = _refused_over_mqtt(
        hub, state_dir, sim, files, (data, sim.ref_for(data, v2.manifest))
    )
    # THREATS.md's E_UNSIGNED: no release key vouches for the package.
    assert (event.step, event.reason) == (Step.FAILED, Reason.NOT_RELEASED)
    assert "unsigned" in event.detail or "no signature" in event.detail
    # Refused at verification: the install never reported VERIFIED or a health check.
    steps = [e.step for _, e in hub.events if e.deployment_id == event.deployment_id]
    assert Step.VERIFIED not in steps
    assert Step.HEALTH_CHECK not in steps
    assert probes >= 1


@pytest.mark.integration
@pytest.mark.parametrize("signer", ["director_key", "unknown_key"])
def test_a11_a_compromised_director_cannot_install_a_package_no_release_key_signed(
    mqtt_device: tuple[FakeHub, Path],
    sim: PackageRepoSimulator,
    files: dict[str, bytes],
    signer: str,
) -> None:
    """The attacker holds the online director key: it signs the desired state naming its own
    package's digest (so the download checks pass), and signs that package's manifest with
    the director key or one of its own. The release key is offline and never signed it."""
    hub, state_dir = mqtt_device
    evil = {**files, "model.onnx": files["model.onnx"] + b"\x00"}
    manifest = sim.manifest(evil, version=2)
    key = sim.director if signer == "director_key" else SigningKey.generate()
    package = sim.package(evil, signatures=[key.sign(document_dict(manifest))], manifest=manifest)
    event, probes = _refused_over_mqtt(hub, state_dir, sim, files, (package.data, package.ref))
    assert (event.step, event.reason) == (Step.FAILED, Reason.NOT_RELEASED)
    assert probes >= 1


# -- A3: wrong keys, duplicate signatures -------------------------------------------------------


def _signed_with(
    sim: PackageRepoSimulator, manifest: Manifest, files: dict[str, bytes], sigs: list[Signature]
) -> SimPackage:
    return sim.package(files, signatures=sigs, manifest=manifest)


def test_a3_a_validly_made_signature_by_any_other_key_is_not_a_release(
    device: Store, sim: PackageRepoSimulator, files: dict[str, bytes]
) -> None:
    manifest = sim.manifest(files, version=2)
    doc = document_dict(manifest)
    for key in (sim.director, sim.root, SigningKey.generate()):  # the last: a device's key
        package = _signed_with(sim, manifest, files, [key.sign(doc)])
        error = device.refused(package.data, package.manifest)
        assert error.reason is Reason.NOT_RELEASED, error
        # Claiming the release key's id does not help: the signature does not verify.
        forged = _signed_with(
            sim, manifest, files, [Signature(keyid=sim.release.keyid, sig=key.sign(doc).sig)]
        )
        error = device.refused(forged.data, forged.manifest)
        assert error.reason is Reason.SIGNATURE, error
    assert device.loaded == []


def test_a3_one_key_signing_twice_does_not_reach_a_threshold_of_two(
    device: Store, sim: PackageRepoSimulator, files: dict[str, bytes]
) -> None:
    second = SigningKey.generate()
    keyring = verify_keyring(
        sim.custom_keyring(
            version=2, release=[sim.release, second], director=[sim.director], release_threshold=2
        ),
        root_public_b64=sim.root_public_b64,
        current=None,
        now=None,
    )
    two_of_two = TrustContext(keyring, device.trust.device_class, AGENT_VERSION)
    manifest = sim.manifest(files, version=2)
    doc = document_dict(manifest)
    one = sim.release.sign(doc)
    cases = {
        "the same signature twice": ([one, one], Reason.THRESHOLD),
        "the same signature under the second key's id": (
            [one, Signature(keyid=second.keyid, sig=one.sig)],
            Reason.SIGNATURE,
        ),
    }
    for what, (sigs, reason) in cases.items():
        package = _signed_with(sim, manifest, files, sigs)
        error = device.refused(package.data, package.manifest, trust=two_of_two)
        assert error.reason is reason, (what, error)
    # Both keys really signing is what the threshold asks for.
    both = _signed_with(sim, manifest, files, [one, second.sign(doc)])
    device.install(both.data, both.ref, trust=two_of_two)
    assert device.store.pointer("iris").version == 2  # type: ignore[union-attr]


def test_a3_a_keyring_listing_one_key_under_two_ids_is_refused_and_the_trust_store_kept(
    tmp_path: Path, sim: PackageRepoSimulator
) -> None:
    agent = _offline_agent(tmp_path / "agent", sim)
    keyring_file = tmp_path / "agent" / "keyring.json"
    before = keyring_file.read_bytes()
    signed = sim.custom_keyring(version=2, release=[sim.release], director=[sim.director])
    doc = dict(signed.signed)
    alias = "f" * 64
    doc["keys"] = {**doc["keys"], alias: doc["keys"][sim.release.keyid]}
    doc["roles"] = {
        **doc["roles"],
        "release": {"keyids": [sim.release.keyid, alias], "threshold": 2},
    }
    keyring = Signed(signed=doc, signatures=[sim.root.sign(doc)])
    desired = sim.desired([], counter=1)
    agent._on_message(TOPIC, sim.desired_message(desired, keyring=keyring))
    assert agent.rejections == {str(Reason.MALFORMED): 1}, agent.last_rejection
    assert "wrong id" in agent.last_rejection
    assert keyring_file.read_bytes() == before


# -- A4: rollback -------------------------------------------------------------------------------


def test_a4a_a_replayed_older_desired_state_does_not_take_the_device_back(
    tmp_path: Path, sim: PackageRepoSimulator, files: dict[str, bytes]
) -> None:
    """A man in the middle can only replay what the director signed before. Going back to an
    older version is the director's decision (the hub's rollback), made with a new counter."""
    agent = _offline_agent(tmp_path / "agent", sim)
    v3, v5 = (sim.package(files, version=v) for v in (3, 5))
    old = sim.desired_message(sim.desired([v3.ref], counter=3))
    agent._on_message(TOPIC, sim.desired_message(sim.desired([v5.ref], counter=5)))
    assert agent.state.load_progress().desired_counter == 5
    agent._on_message(TOPIC, old)
    assert agent.rejections == {str(Reason.REPLAY): 1}
    assert agent.state.load_progress().desired_counter == 5
    assert [p.version for p in agent._desired.packages] == [5]  # type: ignore[union-attr]


def test_a4b_a_different_package_under_the_installed_version_is_refused(
    device: Store, sim: PackageRepoSimulator, files: dict[str, bytes]
) -> None:
    """Only the release key can make one, but a version names one release: a second v1 with
    other bytes is refused while v1 serves. (THREATS.md's E_VERSION_CONFLICT is E_REPLAY.)"""
    other = sim.package(
        {**files, "sample_input.json": files["sample_input.json"] + b" "}, version=1
    )
    error = device.refused(other.data, other.manifest)
    assert error.reason is Reason.REPLAY, error
    assert "same version" in error.detail
    assert device.loaded == []
    # The same release re-signed (a rotated release key) is the same v1, not a conflict.
    doc = json.loads(
        device.store.root.joinpath("iris")
        .glob("v1-*")
        .__next__()
        .joinpath(MANIFEST_NAME)
        .read_bytes()
    )
    resigned_key = SigningKey.generate()
    keyring = verify_keyring(
        sim.custom_keyring(version=2, release=[resigned_key], director=[sim.director]),
        root_public_b64=sim.root_public_b64,
        current=None,
        now=None,
    )
    members = {
        MANIFEST_NAME: json.dumps(doc, sort_keys=True, separators=(",", ":")).encode(),
        SIGNATURE_NAME: json.dumps(
            document_dict(DetachedSignatures(signatures=[resigned_key.sign(doc)]))
        ).encode(),
        **{f"files/{p}": d for p, d in files.items()},
    }
    data = tar_of(members)
    manifest = Manifest.model_validate(doc)
    trust = TrustContext(keyring, device.trust.device_class, AGENT_VERSION)
    device.install(data, sim.ref_for(data, manifest), trust=trust)
    assert device.store.pointer("iris").version == 1  # type: ignore[union-attr]


# -- A5: replayed deploy ------------------------------------------------------------------------


def test_a5_a_replayed_desired_state_is_refused_before_and_after_a_restart(
    tmp_path: Path, sim: PackageRepoSimulator, files: dict[str, bytes]
) -> None:
    v1, v2 = (sim.package(files, version=v) for v in (1, 2))
    first = sim.desired_message(sim.desired([v1.ref], counter=1))
    second = sim.desired_message(sim.desired([v2.ref], counter=2))
    agent = _offline_agent(tmp_path / "agent", sim)
    for message in (first, second):
        agent._on_message(TOPIC, message)
    agent._on_message(TOPIC, first)
    assert agent.rejections == {str(Reason.REPLAY): 1}
    # The same state delivered again (a retained message on reconnect) is not a new order.
    agent._on_message(TOPIC, second)
    assert agent.rejections == {str(Reason.REPLAY): 1}

    restarted = _offline_agent(tmp_path / "agent", sim, write=False)
    restarted._on_message(TOPIC, first)
    assert restarted.rejections == {str(Reason.REPLAY): 1}
    progress = restarted.state.load_progress()
    assert progress.desired_counter == 2
    assert [p.version for p in restarted._desired.packages] == [2]  # type: ignore[union-attr]


# -- A6: freeze ---------------------------------------------------------------------------------


def test_a6a_an_expired_desired_state_is_refused_and_v1_keeps_serving(
    tmp_path: Path, sim: PackageRepoSimulator, files: dict[str, bytes]
) -> None:
    """An attacker keeps serving a desired state past its expiry (an indefinite freeze)."""
    v2 = sim.package(files, version=2)
    frozen = sim.desired([v2.ref], counter=5, expires_in=timedelta(days=7))
    agent = _offline_agent(
        tmp_path / "agent",
        sim,
        install=files,
        clock=lambda: datetime.now(UTC) + timedelta(days=8),
    )
    agent._on_message(TOPIC, sim.desired_message(frozen))
    assert agent.rejections == {str(Reason.EXPIRED): 1}
    assert "expired" in agent.last_rejection
    assert agent.state.load_progress().desired_counter == 0
    assert agent.get("iris").version == 1  # type: ignore[union-attr]


def test_a6b_back_after_60_days_offline_it_serves_and_takes_a_fresh_state_without_help(
    tmp_path: Path, sim: PackageRepoSimulator, files: dict[str, bytes]
) -> None:
    """Stored trust and desired state expired while it was off; they are not judged again,
    so it serves at once, and every expiry of one update is judged at one instant."""
    v2 = sim.package(files, version=2)
    _offline_agent(tmp_path / "agent", sim, install=files)
    reads: list[datetime] = []
    offset = timedelta(days=60)

    def clock() -> datetime:
        reads.append(datetime.now(UTC) + offset)
        return reads[-1]

    back = _offline_agent(tmp_path / "agent", sim, write=False, clock=clock)
    assert back.get("iris").version == 1  # type: ignore[union-attr]
    fresh = sim.desired_doc([v2.ref], counter=9, expires_in=offset + timedelta(days=7))
    signed = Signed(signed=fresh, signatures=[sim.keys.sign_director(fresh)])
    keyring = sim.custom_keyring(
        version=2, release=[sim.release], director=[sim.director], expires_in=offset * 2
    )
    reads.clear()
    back._on_message(TOPIC, sim.desired_message(signed, keyring=keyring))
    assert back.rejections == {}, back.last_rejection
    assert back.state.load_progress().desired_counter == 9
    assert len(reads) == 1, "keyring and desired state were judged at different instants"


# -- A7: mix and match, partial bundles ---------------------------------------------------------


def test_a7_mixed_partial_or_padded_bundles_are_refused_whole(
    device: Store, sim: PackageRepoSimulator, files: dict[str, bytes]
) -> None:
    r1 = sim.package(files, version=2)
    r2_files = {k: v + b"\n" for k, v in files.items()}
    r2 = sim.package(r2_files, version=2)
    cases = {
        "R2's model with R1's config under R1's manifest": {
            **r1.members,
            "files/model.onnx": r2.members["files/model.onnx"],
        },
        "R2's manifest over R1's files": {
            **r1.members,
            MANIFEST_NAME: r2.members[MANIFEST_NAME],
            SIGNATURE_NAME: r2.members[SIGNATURE_NAME],
        },
        "a listed file missing": {
            k: v for k, v in r1.members.items() if k != "files/sample_input.json"
        },
        "a file the manifest does not list": {**r1.members, "files/labels.txt": b"setosa\n"},
    }
    for what, members in cases.items():
        error = device.refused(tar_of(members), r1.manifest)
        # THREATS.md's E_BUNDLE_MISMATCH: the bundle does not match its signed manifest's
        # hashes or lengths.
        assert error.reason in (Reason.HASH, Reason.LENGTH), (what, error)
    assert device.loaded == []


# -- A8: endless data ---------------------------------------------------------------------------


def test_a8_endless_or_overlong_data_is_cut_at_the_signed_length(
    tmp_path: Path, sim: PackageRepoSimulator, files: dict[str, bytes]
) -> None:
    package = sim.package(files, version=2)
    ref = package.ref
    downloads = tmp_path / "downloads"
    assembler = ChunkAssembler(ref, downloads, max_package_bytes=1 << 30)
    part = downloads / f"{ref.digest}.part"
    last = len(ref.chunks) - 1
    start = last * ref.chunk_bytes
    # (a) a server that keeps sending: chunks past the end, chunks of endless length.
    for index in (last + 1, last + 1000, -1):
        assert not assembler.add(index, b"\0" * ref.chunk_bytes)
    # (b) L + 1: the last chunk with one byte more, again and again.
    overlong = package.data[start:] + b"\0"
    for _ in range(MAX_CORRUPT_PER_CHUNK - 1):
        assert not assembler.add(last, overlong)
        assert not part.exists() or part.stat().st_size <= ref.size
    with pytest.raises(RejectedError) as info:
        assembler.add(last, overlong)
    assert info.value.reason is Reason.HASH
    assert f"arrived corrupt {MAX_CORRUPT_PER_CHUNK} times" in info.value.detail
    assert not part.exists() or part.stat().st_size <= ref.size
    assembler.discard()
    assert list(downloads.iterdir()) == []
    # A package declared larger than the device takes is refused before a byte is fetched.
    with pytest.raises(TooLargeError):
        ChunkAssembler(ref, tmp_path / "small", max_package_bytes=ref.size - 1)
    assert not list((tmp_path / "small").glob("*"))


def test_a8_an_oversized_manifest_is_refused_without_being_read(
    device: Store, sim: PackageRepoSimulator, files: dict[str, bytes]
) -> None:
    package = sim.package(files, version=2)
    huge = package.members[MANIFEST_NAME][:-1] + b',"pad":"' + b"x" * (2 * 1024 * 1024) + b'"}'
    error = device.refused(tar_of({**package.members, MANIFEST_NAME: huge}), package.manifest)
    assert error.reason is Reason.TOO_LARGE, error


# -- A10: wrong target class --------------------------------------------------------------------


@pytest.mark.parametrize(
    "manifest_args",
    [{"device_classes": ["x86-onnx"]}, {"min_agent_version": "99.0.0"}],
    ids=["other_device_class", "newer_agent"],
)
def test_a10_a_package_for_another_target_is_refused_before_load_or_health_check(
    device: Store, sim: PackageRepoSimulator, files: dict[str, bytes], manifest_args: dict[str, Any]
) -> None:
    trust = TrustContext(device.trust.keyring, "arm64-tflite", AGENT_VERSION)
    package = sim.package(files, version=2, **manifest_args)
    error = device.refused(package.data, package.manifest, trust=trust)
    assert error.reason is Reason.INCOMPATIBLE, error
    assert device.loaded == []
    assert device.health_checked == []


# -- the offline agent --------------------------------------------------------------------------


def _offline_agent(
    state_dir: Path,
    sim: PackageRepoSimulator,
    *,
    write: bool = True,
    install: dict[str, bytes] | None = None,
    clock: Callable[[], datetime] | None = None,
) -> Agent:
    """A real agent on ``state_dir`` whose MQTT link is never connected: messages are handed
    to it as its adapter hands them. ``write`` enrols it first (identity and keyring);
    ``install`` puts v1 of those files in its store, as an earlier deployment would have."""
    if write:
        write_identity(
            state_dir,
            device_id=DEVICE,
            host="127.0.0.1",
            port=1,
            password="unused",
            root_public_key=sim.root_public_b64,
            keyring=sim.keyring(),
        )
    if install is not None:
        v1 = sim.package(install, version=1)
        path = state_dir / "v1.tar"
        path.write_bytes(v1.data)
        keyring = verify_keyring(
            sim.keyring(), root_public_b64=sim.root_public_b64, current=None, now=None
        )
        trust = TrustContext(keyring, "generic", AGENT_VERSION)
        make_store(state_dir / "models").install(path, v1.ref, trust, lambda _: None)
        path.unlink()
    extra: dict[str, Any] = {} if clock is None else {"clock": clock}
    agent = Agent(
        settings=fast_settings(state_dir, logs={"enabled": False}),
        load_runtime=load_runtime,
        check_health=check_health,
        **extra,
    )
    agent.load_installed()
    return agent
