"""THREATS.md A2 for desired states: sign-then-mutate fuzzing through the agent's own handler.

A real ``Agent`` (its state directory, identity and keyring as enrolment leaves them; the MQTT
link built but not connected) receives each variant exactly as a message on its desired
topic (``Agent._on_message``, what the MQTT adapter calls). A desired state signed by the
hub's director key is changed after signing, re-signed by the wrong key, given mutated
signatures or key ids, or replayed; every variant must be refused with a reason, none may
change what the device has accepted, and the genuine one is accepted at the end.
"""

import base64
import copy
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.core import Agent
from agent.protocol.documents import PackageRef, Signed
from agent.protocol.keys import Signature, SigningKey
from agent.protocol.topics import Channel, Topics
from agent.runtimes import load_runtime
from agent.runtimes.health import check_health
from tests.security.conftest import reason_table, tree, write_report
from tests.support.agents import DEVICE, fast_settings, write_identity
from tests.support.package_simulator import PackageRepoSimulator

SEED = 20261204
PER_CLASS = 90
ACCEPTED_COUNTER = 5
VERIFY_BOUND_S = 5.0
TOPIC = Topics("outpost").device(DEVICE, Channel.DESIRED)


@dataclass
class Bases:
    sim: PackageRepoSimulator
    refs: list[PackageRef]
    attacker_ref: PackageRef
    genuine: Signed  # counter 6, signed by the director: the one that must get through
    older: list[Signed]  # genuinely signed, counters below the accepted one
    second_director: SigningKey
    strangers: list[SigningKey]


@dataclass(frozen=True)
class Variant:
    what: str
    payload: bytes


def _tampered(b: Bases, change: Callable[[dict[str, Any]], str]) -> Variant:
    """The genuine document changed after signing, the director's signature kept."""
    doc = copy.deepcopy(b.genuine.signed)
    what = change(doc)
    signed = Signed(signed=doc, signatures=b.genuine.signatures)
    return Variant(what, b.sim.desired_message(signed))


def device_id(rng: random.Random, b: Bases) -> Variant:
    other = rng.choice(
        ["dev-000000000002", DEVICE.upper(), DEVICE + " ", "", "+", "#", DEVICE[:-1], "*"]
    )

    def change(doc: dict[str, Any]) -> str:
        doc["device_id"] = other
        return f"device_id -> {other!r}"

    return _tampered(b, change)


def counter(rng: random.Random, b: Bases) -> Variant:
    value = rng.choice([7, 6 + rng.randint(1, 10**6), 5, 4, 0, -1, 2**63, "6", 6.0, None])

    def change(doc: dict[str, Any]) -> str:
        doc["counter"] = value
        return f"counter -> {value!r}"

    return _tampered(b, change)


def expiry(rng: random.Random, b: Bases) -> Variant:
    later = datetime.now(UTC) + timedelta(days=rng.randint(8, 4000))
    value = rng.choice(
        [
            later.strftime("%Y-%m-%dT%H:%M:%SZ"),
            later.isoformat(),
            "9999-12-31T23:59:59Z",
            b.genuine.signed["expires_at"].replace("Z", "+00:00"),
        ]
    )

    def change(doc: dict[str, Any]) -> str:
        doc["expires_at"] = value
        return f"expires_at -> {value}"

    return _tampered(b, change)


def package_digest(rng: random.Random, b: Bases) -> Variant:
    index = rng.randrange(len(b.refs))
    digest = b.refs[index].digest
    kind = rng.randrange(3)
    if kind == 0:
        i = rng.randrange(len(digest))
        new = digest[:i] + rng.choice([c for c in "0123456789abcdef" if c != digest[i]])
        new += digest[i + 1 :]
    elif kind == 1:
        new = b.attacker_ref.digest
    else:
        new = digest.upper()

    def change(doc: dict[str, Any]) -> str:
        doc["packages"][index]["digest"] = new
        return f"package {index} digest mutated ({kind})"

    return _tampered(b, change)


def added_package(rng: random.Random, b: Bases) -> Variant:
    extra = b.attacker_ref.model_dump(mode="json")
    extra["deployment_id"] = f"evil-{rng.randrange(10**6)}"

    def change(doc: dict[str, Any]) -> str:
        doc["packages"].insert(rng.randint(0, len(doc["packages"])), extra)
        return "attacker package added"

    return _tampered(b, change)


def package_fields(rng: random.Random, b: Bases) -> Variant:
    index = rng.randrange(len(b.refs))
    field, value = rng.choice(
        [
            ("version", rng.randint(1, 99)),
            ("size", rng.randint(1, 10**9)),
            ("chunks", [b.attacker_ref.digest]),
            ("deployment_id", "dep-replayed"),
            ("model", "other-model"),
            ("collect", {"sample_rate": 1.0}),
            (None, None),
        ]
    )

    def change(doc: dict[str, Any]) -> str:
        if field is None:
            del doc["packages"][index]
            return f"package {index} removed"
        doc["packages"][index][field] = value
        return f"package {index} {field} changed"

    return _tampered(b, change)


def _flip(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def signature_bytes(rng: random.Random, b: Bases) -> Variant:
    sig = b.genuine.signatures[0]
    raw = base64.b64decode(sig.sig)
    kind = rng.randrange(4)
    if kind == 0:
        mutated = _flip(raw, rng)
    elif kind == 1:
        mutated = raw[: rng.randrange(len(raw))]
    elif kind == 2:
        mutated = raw + rng.randbytes(rng.randint(1, 8))
    else:
        mutated = rng.randbytes(len(raw))
    signed = Signed(
        signed=b.genuine.signed,
        signatures=[Signature(keyid=sig.keyid, sig=base64.b64encode(mutated).decode())],
    )
    return Variant(f"signature bytes mutated ({kind})", b.sim.desired_message(signed))


def key_id(rng: random.Random, b: Bases) -> Variant:
    sig = b.genuine.signatures[0]
    kind = rng.randrange(5)
    kid = [
        sig.keyid[:-1] + ("0" if sig.keyid[-1] != "0" else "1"),
        sig.keyid.upper(),
        b.sim.release.keyid,
        rng.randbytes(32).hex(),
        "",
    ][kind]
    signed = Signed(signed=b.genuine.signed, signatures=[Signature(keyid=kid, sig=sig.sig)])
    return Variant(f"key id mutated ({kind})", b.sim.desired_message(signed))


def duplicated_signature(rng: random.Random, b: Bases) -> Variant:
    """The director signature repeated to "reach" a keyring's threshold of two directors."""
    keyring = b.sim.custom_keyring(
        version=2,
        release=[b.sim.release],
        director=[b.sim.director, b.second_director],
        director_threshold=2,
    )
    sig = b.genuine.signatures[0]
    kind = rng.randrange(2)
    if kind == 0:
        sigs = [sig] * rng.randint(2, 6)
    else:
        sigs = [sig, Signature(keyid=b.second_director.keyid, sig=sig.sig)]
    signed = Signed(signed=b.genuine.signed, signatures=sigs)
    return Variant(f"duplicated signature ({kind})", b.sim.desired_message(signed, keyring=keyring))


def wrong_key(rng: random.Random, b: Bases) -> Variant:
    name, key = rng.choice(
        [("release", b.sim.release), ("root", b.sim.root)]
        + [(f"stranger{i}", k) for i, k in enumerate(b.strangers)]
    )
    own = key.sign(b.genuine.signed)
    kid = rng.choice([own.keyid, b.sim.director.keyid])
    signed = Signed(signed=b.genuine.signed, signatures=[Signature(keyid=kid, sig=own.sig)])
    return Variant(f"signed by the {name} key", b.sim.desired_message(signed))


def keyring_tamper(rng: random.Random, b: Bases) -> Variant:
    """The keyring that comes with the message changed so an attacker's key signs."""
    attacker = rng.choice(b.strangers)
    signed_keyring = b.sim.keyring()
    doc = copy.deepcopy(signed_keyring.signed)
    kind = rng.randrange(3)
    if kind == 0:
        doc["keys"][attacker.keyid] = {"scheme": "ed25519", "public": attacker.public_b64}
        doc["roles"]["director"]["keyids"] = [attacker.keyid]
        keyring = Signed(signed=doc, signatures=signed_keyring.signatures)
    elif kind == 1:
        doc["version"] = doc["version"] + rng.randint(1, 100)
        keyring = Signed(signed=doc, signatures=signed_keyring.signatures)
    else:
        doc["keys"][attacker.keyid] = {"scheme": "ed25519", "public": attacker.public_b64}
        doc["roles"]["director"]["keyids"] = [attacker.keyid]
        doc["version"] = 2
        keyring = Signed(signed=doc, signatures=[attacker.sign(doc)])  # a forged root
    desired = Signed(signed=b.genuine.signed, signatures=[attacker.sign(b.genuine.signed)])
    return Variant(f"keyring tampered ({kind})", b.sim.desired_message(desired, keyring=keyring))


def stale(rng: random.Random, b: Bases) -> Variant:
    """Genuinely signed by the director, but old, expired or for another device."""
    kind = rng.randrange(4)
    if kind == 0:
        signed = rng.choice(b.older)
        what = "an older desired state replayed"
    elif kind == 1:
        signed = b.sim.desired([], counter=ACCEPTED_COUNTER)  # same counter, other content
        what = "a second desired state with the accepted counter"
    elif kind == 2:
        signed = b.sim.desired(b.refs, counter=6, expires_in=timedelta(seconds=-1))
        what = "expired"
    else:
        signed = b.sim.desired(b.refs, counter=6, device_id="dev-000000000002")
        what = "for another device"
    return Variant(what, b.sim.desired_message(signed))


CLASSES: dict[str, Callable[[random.Random, Bases], Variant]] = {
    "device_id": device_id,
    "counter": counter,
    "expiry": expiry,
    "package_digest": package_digest,
    "added_package": added_package,
    "package_fields": package_fields,
    "signature_bytes": signature_bytes,
    "key_id": key_id,
    "duplicated_signature": duplicated_signature,
    "wrong_key": wrong_key,
    "keyring_tamper": keyring_tamper,
    "validly_signed_stale": stale,
}


def _agent(state_dir: Path, sim: PackageRepoSimulator) -> Agent:
    write_identity(
        state_dir,
        device_id=DEVICE,
        host="127.0.0.1",
        port=1,  # never connected: messages are handed to the agent directly
        password="unused",
        root_public_key=sim.root_public_b64,
        keyring=sim.keyring(),
    )
    return Agent(
        settings=fast_settings(state_dir, logs={"enabled": False}),
        load_runtime=load_runtime,
        check_health=check_health,
    )


@pytest.mark.usefixtures("quiet_agent")
def test_a_thousand_mutated_desired_states_are_all_refused_with_a_reason(
    tmp_path: Path, sim: PackageRepoSimulator, files: dict[str, bytes]
) -> None:
    v1, v2 = (sim.package(files, version=v) for v in (1, 2))
    attacker = sim.package({**files, "model.onnx": b"attacker"}, version=3)
    second_model = sim.package(files, model="digits", version=1)
    refs = [v2.ref, second_model.ref]
    bases = Bases(
        sim=sim,
        refs=refs,
        attacker_ref=attacker.ref,
        genuine=sim.desired(refs, counter=6),
        older=[sim.desired([v1.ref], counter=c) for c in range(1, ACCEPTED_COUNTER)],
        second_director=SigningKey.generate(),
        strangers=[SigningKey.generate() for _ in range(3)],
    )
    state_dir = tmp_path / "agent"
    agent = _agent(state_dir, sim)
    agent._on_message(TOPIC, sim.desired_message(sim.desired([v1.ref], counter=ACCEPTED_COUNTER)))
    assert agent.state.load_progress().desired_counter == ACCEPTED_COUNTER
    accepted_desired = (state_dir / "desired.json").read_bytes()
    before = {k: v for k, v in tree(state_dir).items() if k != "progress.json"}

    reasons: dict[str, Counter[str]] = {name: Counter() for name in CLASSES}
    crashes: list[str] = []
    unreasoned: list[str] = []
    slowest = 0.0
    started = time.perf_counter()
    for name, mutate in CLASSES.items():
        rng = random.Random(f"{SEED}:{name}")
        for index in range(PER_CLASS):
            variant = mutate(rng, bases)
            rejections = agent.rejections.copy()
            malformed = agent.malformed_received
            t0 = time.perf_counter()
            try:
                agent._on_message(TOPIC, variant.payload)
            except Exception as exc:
                crashes.append(f"{name} #{index} ({variant.what}): {type(exc).__name__}: {exc}")
                continue
            finally:
                slowest = max(slowest, time.perf_counter() - t0)
            new = agent.rejections - rejections
            if sum(new.values()) == 1 and agent.last_rejection:
                reasons[name].update(new)
            elif agent.malformed_received > malformed:
                unreasoned.append(f"{name} #{index} ({variant.what}): dropped as malformed")
            # Anything else is an acceptance, judged below from what the device stored.
    total_s = time.perf_counter() - started

    tried = PER_CLASS * len(CLASSES)
    refused = sum(sum(c.values()) for c in reasons.values())
    summary = {
        "seed": SEED,
        "variants": tried,
        "refused_with_reason": refused,
        "accepted": tried - refused - len(crashes) - len(unreasoned),
        "crashes": len(crashes),
        "dropped_without_reason": len(unreasoned),
        "reasons_by_class": {k: dict(v) for k, v in reasons.items()},
        "verify_s": {"max": round(slowest, 4), "bound": VERIFY_BOUND_S},
        "wall_s": round(total_s, 2),
    }
    write_report(
        "fuzz_desired",
        summary,
        reason_table(
            f"A2 desired states: {tried} variants (seed {SEED}), refused {refused}, "
            f"crashes {len(crashes)}, slowest {slowest * 1000:.1f} ms, {total_s:.1f} s",
            {k: dict(v) for k, v in reasons.items()},
        ),
    )
    assert tried >= 1000
    assert not crashes, crashes[:10]
    assert not unreasoned, unreasoned[:10]
    assert refused == tried, f"{tried - refused} variants were not refused"
    assert slowest < VERIFY_BOUND_S
    # Nothing the device accepted changed: counter, stored desired state, keyring, files.
    assert agent.state.load_progress().desired_counter == ACCEPTED_COUNTER
    assert (state_dir / "desired.json").read_bytes() == accepted_desired
    assert {k: v for k, v in tree(state_dir).items() if k != "progress.json"} == before

    # The harness can accept: the genuine counter-6 state gets through the same handler.
    agent._on_message(TOPIC, sim.desired_message(bases.genuine))
    assert agent.state.load_progress().desired_counter == 6


@pytest.mark.usefixtures("quiet_agent")
def test_the_fuzz_catches_an_agent_that_skips_the_signature_check(
    tmp_path: Path,
    sim: PackageRepoSimulator,
    files: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """THREATS.md F5: with the director signature check taken out, variants changed after
    signing are taken as new orders, so the refusals above are the check's doing."""
    monkeypatch.setattr("agent.trust._check_role", lambda *args, **kwargs: None)
    v2 = sim.package(files, version=2)
    genuine = sim.desired([v2.ref], counter=6)
    agent = _agent(tmp_path / "agent", sim)
    doc = dict(genuine.signed, counter=7)
    agent._on_message(TOPIC, sim.desired_message(Signed(signed=doc, signatures=[])))
    assert agent.rejections == {}
    assert agent.state.load_progress().desired_counter == 7
