"""THREATS.md A2: sign-then-mutate fuzzing of packages through the agent's real receive path.

A package signed by the hub's own code is mutated once per variant (seeded, reproducible) in
one of the classes below, then handed to what the agent runs on a received package:

1. the download check (``ChunkAssembler``) against the digest and chunk hashes the director
   signed for the genuine package, which must refuse every variant; and
2. as if the director itself were compromised and named the mutated bytes' digest, the
   install (``ModelStore.install``: archive checks, release signature, manifest, hashes),
   which must refuse every variant on its own, with a reason, within a time bound, leaving
   the active version serving and nothing in or outside staging.

Mutations are drawn so that each one changes what the package means (a bit flip that leaves
the parsed manifest equal is drawn again): a no-op is not an attack the agent should refuse.
"""

import base64
import io
import json
import random
import tarfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.download import ChunkAssembler
from agent.errors import AgentError, RejectedError
from agent.install import TrustContext
from agent.protocol.documents import DetachedSignatures, document_dict
from agent.protocol.keys import Signature, SigningKey
from agent.protocol.package import MANIFEST_NAME, SIGNATURE_NAME
from agent.trust import verify_keyring
from tests.security.conftest import (
    AGENT_VERSION,
    DEVICE_CLASS,
    make_store,
    reason_table,
    tree,
    write_report,
)
from tests.support.package_simulator import PackageRepoSimulator, SimPackage, tar_of

SEED = 20261203
PER_CLASS = 100
# Generous for a shared 2-core CI machine: a refusal takes about a millisecond.
VERIFY_BOUND_S = 5.0


@dataclass(frozen=True)
class Variant:
    what: str
    data: bytes
    threshold: bool = False  # judged by the keyring that needs two release signatures


@dataclass
class Bases:
    """The genuine v2 package the variants are made from, and what some classes mix in."""

    v2: SimPackage
    other_release: SimPackage  # v3 of the same model, genuinely signed, other bytes
    threshold_v2: SimPackage  # v2 signed by one of the two release keys a threshold needs
    strangers: list[SigningKey]
    director: SigningKey
    root: SigningKey
    second_release: SigningKey


def _flip(data: bytes, rng: random.Random) -> bytes:
    position = rng.randrange(len(data))
    out = bytearray(data)
    out[position] ^= 1 << rng.randrange(8)
    return bytes(out)


def _file_names(members: dict[str, bytes]) -> list[str]:
    return [n for n in members if n.startswith("files/")]


def _sigs(members: dict[str, bytes]) -> list[Signature]:
    return DetachedSignatures.model_validate_json(members[SIGNATURE_NAME]).signatures


def _sig_file(sigs: list[Signature]) -> bytes:
    return json.dumps(document_dict(DetachedSignatures(signatures=sigs))).encode()


def payload_bitflip(rng: random.Random, b: Bases) -> Variant:
    name = rng.choice(_file_names(b.v2.members))
    members = dict(b.v2.members)
    members[name] = _flip(members[name], rng)
    return Variant(f"bit flip in {name}", tar_of(members))


def manifest_bitflip(rng: random.Random, b: Bases) -> Variant:
    original = json.loads(b.v2.members[MANIFEST_NAME])
    while True:
        flipped = _flip(b.v2.members[MANIFEST_NAME], rng)
        try:
            if json.loads(flipped) == original:
                continue  # e.g. "1e-05" -> "1E-05": the same manifest, not a mutation
        except ValueError:
            pass
        return Variant(
            "bit flip in manifest.json", tar_of({**b.v2.members, MANIFEST_NAME: flipped})
        )


def manifest_hostile_json(rng: random.Random, b: Bases) -> Variant:
    """manifest.json replaced by JSON that parsers trip on: deep nesting, NaN, huge numbers,
    duplicate keys, documents that are not objects, bytes that are not UTF-8. (A byte-order
    mark or UTF-16 would be the same document: Python's json reads both.)"""
    genuine = b.v2.members[MANIFEST_NAME]
    depth = rng.randint(1_000, 200_000)
    kind = rng.randrange(9)
    text = [
        b"[" * depth + b"]" * depth,
        b'{"a":' * depth + b"1" + b"}" * depth,
        genuine[:-1] + b',"x":NaN}',
        genuine[:-1] + b',"x":-Infinity}',
        genuine[:-1] + b',"x":' + b"9" * rng.randint(4_301, 100_000) + b"}",
        genuine[:-1] + b',"model":{"name":"iris","version":99,"framework":"onnx"}}',
        rng.choice([b"[]", b'"manifest"', b"null", b"1e999", b""]),
        b"\xff" + genuine,
        genuine[:-1] + b',"x":"\\ud800"}',  # a lone surrogate: JSON allows it, UTF-8 does not
    ][kind]
    return Variant(
        f"manifest.json replaced by hostile JSON ({kind})",
        tar_of({**b.v2.members, MANIFEST_NAME: text}),
    )


def truncation(rng: random.Random, b: Bases) -> Variant:
    data = tar_of(b.v2.members)
    # Cut before the end of the last member's data: the zero padding after it carries nothing.
    cut = rng.randrange(0, _last_data_end(data))
    return Variant(f"truncated to {cut} bytes", data[:cut])


def _last_data_end(data: bytes) -> int:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        last = archive.getmembers()[-1]
        return last.offset_data + last.size


def appended_bytes(rng: random.Random, b: Bases) -> Variant:
    name = rng.choice(list(b.v2.members))
    # No whitespace: JSON after trailing whitespace is the same document.
    alphabet = [c for c in range(256) if c not in b" \t\r\n"]
    extra = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 64)))
    return Variant(
        f"{len(extra)} bytes appended to {name}",
        tar_of({**b.v2.members, name: b.v2.members[name] + extra}),
    )


def swapped_file(rng: random.Random, b: Bases) -> Variant:
    names = _file_names(b.v2.members)
    members = dict(b.v2.members)
    kind = rng.randrange(3)
    if kind == 0:
        first, second = rng.sample(names, 2)
        members[first], members[second] = members[second], members[first]
        what = f"{first} and {second} swapped"
    elif kind == 1:
        name = rng.choice(names)
        members[name] = b.other_release.members[name]
        what = f"{name} taken from the genuine v3 release"
    else:
        # Mix and match: the genuine v3 manifest and signature with v2's files.
        members[MANIFEST_NAME] = b.other_release.members[MANIFEST_NAME]
        members[SIGNATURE_NAME] = b.other_release.members[SIGNATURE_NAME]
        what = "v3's signed manifest with v2's files"
    return Variant(what, tar_of(members))


ADDED_NAMES = [
    "files/extra.bin",
    "files/model.onnx.bak",
    "files/sub/dir/x.json",
    "files/MODEL.onnx",
    "files/../../escape",
    "/tmp/outpost-fuzz-escape",
    "files\\..\\x",
    "manifest.json",
    "evil.sh",
    "files/e\u0301",
]


def added_file(rng: random.Random, b: Bases) -> Variant:
    name = rng.choice(ADDED_NAMES)
    data = rng.randbytes(rng.randint(0, 256))
    members = list(b.v2.members.items())
    members.insert(rng.randint(0, len(members)), (name, data))
    # A list, not tar_of's mapping: an added name may repeat one already there.
    return Variant(f"added {name!r}", _tar_list(members))


def _tar_list(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def removed_file(rng: random.Random, b: Bases) -> Variant:
    name = rng.choice(list(b.v2.members))
    members = {k: v for k, v in b.v2.members.items() if k != name}
    return Variant(f"removed {name}", tar_of(members))


def signature_bytes(rng: random.Random, b: Bases) -> Variant:
    sig = _sigs(b.v2.members)[0]
    raw = base64.b64decode(sig.sig)
    kind = rng.randrange(5)
    if kind == 0:
        mutated = _flip(raw, rng)
    elif kind == 1:
        mutated = raw[: rng.randrange(len(raw))]
    elif kind == 2:
        mutated = raw + rng.randbytes(rng.randint(1, 8))
    elif kind == 3:
        mutated = rng.randbytes(len(raw))
    else:
        mutated = bytes(len(raw))
    text = base64.b64encode(mutated).decode()
    sigs = [Signature(keyid=sig.keyid, sig=text)]
    return Variant(f"signature bytes mutated ({kind})", tar_of(_with_sigs(b, sigs)))


def _with_sigs(b: Bases, sigs: list[Signature], base: SimPackage | None = None) -> dict[str, bytes]:
    return {**(base or b.v2).members, SIGNATURE_NAME: _sig_file(sigs)}


def key_id(rng: random.Random, b: Bases) -> Variant:
    sig = _sigs(b.v2.members)[0]
    kid = sig.keyid
    kind = rng.randrange(6)
    if kind == 0:
        i = rng.randrange(len(kid))
        kid = kid[:i] + rng.choice([c for c in "0123456789abcdef" if c != kid[i]]) + kid[i + 1 :]
    elif kind == 1:
        kid = kid[: rng.randrange(len(kid))]
    elif kind == 2:
        kid = kid.upper()
    elif kind == 3:
        kid = b.director.keyid
    elif kind == 4:
        kid = rng.randbytes(32).hex()
    else:
        kid = ""
    return Variant(
        f"key id mutated ({kind})", tar_of(_with_sigs(b, [Signature(keyid=kid, sig=sig.sig)]))
    )


def duplicated_signature(rng: random.Random, b: Bases) -> Variant:
    """One release key's signature repeated to "reach" a threshold of two."""
    sig = _sigs(b.threshold_v2.members)[0]
    kind = rng.randrange(3)
    if kind == 0:
        sigs = [sig] * rng.randint(2, 6)
        what = f"{len(sigs)} copies of one signature"
    elif kind == 1:
        # The same signature presented under the second release key's id.
        sigs = [sig, Signature(keyid=b.second_release.keyid, sig=sig.sig)]
        what = "one signature under both release key ids"
    else:
        resigned = b.strangers[0].sign(json.loads(b.threshold_v2.members[MANIFEST_NAME]))
        sigs = [sig, sig, Signature(keyid=b.second_release.keyid, sig=resigned.sig)]
        what = "duplicates plus a stranger's signature under the second key's id"
    return Variant(what, tar_of(_with_sigs(b, sigs, b.threshold_v2)), threshold=True)


def wrong_key(rng: random.Random, b: Bases) -> Variant:
    doc = json.loads(b.v2.members[MANIFEST_NAME])
    name, key = rng.choice(
        [("director", b.director), ("root", b.root)]
        + [(f"stranger{i}", k) for i, k in enumerate(b.strangers)]
    )
    own = key.sign(doc)
    claimed = rng.choice([own.keyid, _sigs(b.v2.members)[0].keyid])
    sigs = [Signature(keyid=claimed, sig=own.sig)]
    claim = "its own id" if claimed == own.keyid else "the release key's id"
    return Variant(f"signed by the {name} key under {claim}", tar_of(_with_sigs(b, sigs)))


CLASSES: dict[str, Callable[[random.Random, Bases], Variant]] = {
    "payload_bitflip": payload_bitflip,
    "manifest_bitflip": manifest_bitflip,
    "manifest_hostile_json": manifest_hostile_json,
    "truncation": truncation,
    "appended_bytes": appended_bytes,
    "swapped_file": swapped_file,
    "added_file": added_file,
    "removed_file": removed_file,
    "signature_bytes": signature_bytes,
    "key_id": key_id,
    "duplicated_signature": duplicated_signature,
    "wrong_key": wrong_key,
}


def _bases(sim: PackageRepoSimulator, files: dict[str, bytes]) -> Bases:
    v2 = sim.package(files, version=2)
    other = sim.package({k: v + b"\n" for k, v in files.items()}, version=3)
    second = SigningKey.generate()
    manifest = sim.manifest(files, version=2)
    one = sim.release.sign(document_dict(manifest))
    threshold_v2 = sim.package(files, signatures=[one], manifest=manifest)
    return Bases(
        v2=v2,
        other_release=other,
        threshold_v2=threshold_v2,
        strangers=[SigningKey.generate() for _ in range(3)],
        director=sim.director,
        root=sim.root,
        second_release=second,
    )


def _download_refuses(variant: bytes, genuine: SimPackage, downloads: Path) -> bool:
    """What the device does with bytes that arrive for the genuine ref: every chunk checked
    against the signed chunk hashes, the whole against the signed digest."""
    assembler = ChunkAssembler(genuine.ref, downloads, max_package_bytes=1 << 30)
    size = genuine.ref.chunk_bytes
    try:
        for index in range(0, max(1, -(-len(variant) // size))):
            assembler.add(index, variant[index * size : (index + 1) * size])
        if not assembler.done:
            return True
        assembler.finish()
    except RejectedError:
        return True
    finally:
        assembler.discard()
    return False


@pytest.mark.usefixtures("quiet_agent")
def test_a_thousand_mutated_packages_are_all_refused_with_a_reason(
    tmp_path: Path,
    sim: PackageRepoSimulator,
    files: dict[str, bytes],
    trust: TrustContext,
) -> None:
    bases = _bases(sim, files)
    threshold_keyring = verify_keyring(
        sim.custom_keyring(
            version=2,
            release=[sim.release, bases.second_release],
            director=[sim.director],
            release_threshold=2,
        ),
        root_public_b64=sim.root_public_b64,
        current=None,
        now=None,
    )
    threshold_trust = TrustContext(threshold_keyring, DEVICE_CLASS, AGENT_VERSION)
    device = tmp_path / "device"
    store = make_store(device / "models")
    downloads = device / "downloads"
    downloads.mkdir()
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    v1 = sim.package(files, version=1)
    (incoming / "v1.tar").write_bytes(v1.data)
    store.install(incoming / "v1.tar", v1.ref, trust, lambda _: None)
    (incoming / "v1.tar").unlink()
    before = tree(tmp_path)

    reasons: dict[str, Counter[str]] = {name: Counter() for name in CLASSES}
    download_refused: Counter[str] = Counter()
    accepted: list[str] = []
    crashes: list[str] = []
    slowest = 0.0
    timings: list[float] = []
    started = time.perf_counter()
    for name, mutate in CLASSES.items():
        rng = random.Random(f"{SEED}:{name}")
        for index in range(PER_CLASS):
            variant = mutate(rng, bases)
            genuine = bases.threshold_v2 if variant.threshold else bases.v2
            if _download_refuses(variant.data, genuine, downloads):
                download_refused[name] += 1
            # The director compromised: it names exactly the mutated bytes.
            ref = sim.ref_for(variant.data, genuine.manifest, deployment_id=f"{name}-{index}")
            path = incoming / f"{ref.digest}.tar"
            path.write_bytes(variant.data)
            t0 = time.perf_counter()
            try:
                store.install(
                    path, ref, threshold_trust if variant.threshold else trust, lambda _: None
                )
            except RejectedError as exc:
                if exc.detail:
                    reasons[name][str(exc.reason)] += 1
                else:
                    crashes.append(f"{name} #{index} ({variant.what}): refused without a reason")
            except AgentError as exc:
                crashes.append(f"{name} #{index} ({variant.what}): not refused as such: {exc!r}")
            except Exception as exc:
                crashes.append(f"{name} #{index} ({variant.what}): {type(exc).__name__}: {exc}")
            else:
                accepted.append(f"{name} #{index}: {variant.what}")
            finally:
                elapsed = time.perf_counter() - t0
                timings.append(elapsed)
                slowest = max(slowest, elapsed)
                path.unlink()
    total_s = time.perf_counter() - started

    tried = sum(sum(c.values()) for c in reasons.values()) + len(accepted) + len(crashes)
    timings.sort()
    summary = {
        "seed": SEED,
        "variants": tried,
        "accepted": len(accepted),
        "crashes": len(crashes),
        "refused_at_download_by_signed_digest": sum(download_refused.values()),
        "reasons_by_class": {k: dict(v) for k, v in reasons.items()},
        "install_verify_s": {
            "max": round(slowest, 4),
            "p99": round(timings[int(len(timings) * 0.99) - 1], 4),
            "bound": VERIFY_BOUND_S,
        },
        "wall_s": round(total_s, 2),
    }
    write_report(
        "fuzz_packages",
        summary,
        reason_table(
            f"A2 packages: {tried} variants (seed {SEED}), accepted {len(accepted)}, "
            f"crashes {len(crashes)}, slowest verify {slowest * 1000:.1f} ms, {total_s:.1f} s",
            {k: dict(v) for k, v in reasons.items()},
            extra=lambda name: f"   download refused {download_refused[name]}",
        ),
    )
    assert tried >= 1000
    assert not accepted, accepted[:10]
    assert not crashes, crashes[:10]
    assert sum(download_refused.values()) == tried, "the signed digest let a variant through"
    assert slowest < VERIFY_BOUND_S
    # v1 still active and loadable; nothing left in staging, downloads or anywhere else.
    assert tree(tmp_path) == before
    assert store.pointer("iris").version == 1  # type: ignore[union-attr]
    assert store.load_active("iris", trust) is not None

    # The harness can accept: the same path takes the genuine v2, rebuilt the way variants are.
    rebuilt = tar_of(bases.v2.members)
    ref = sim.ref_for(rebuilt, bases.v2.manifest)
    (incoming / "v2.tar").write_bytes(rebuilt)
    assert not _download_refuses(
        rebuilt, SimPackage(rebuilt, {}, bases.v2.manifest, ref), downloads
    )
    store.install(incoming / "v2.tar", ref, trust, lambda _: None)
    assert store.pointer("iris").version == 2  # type: ignore[union-attr]


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_each_mutation_class_changes_the_package(
    name: str, sim: PackageRepoSimulator, files: dict[str, bytes]
) -> None:
    """The generators are what the fuzz trusts: same seed, same variants; and none is the
    genuine archive."""
    bases = _bases(sim, files)
    first = [CLASSES[name](random.Random(f"{SEED}:{name}"), bases).data for _ in range(1)]
    again = [CLASSES[name](random.Random(f"{SEED}:{name}"), bases).data for _ in range(1)]
    assert first == again
    genuine = tar_of(
        bases.threshold_v2.members if name == "duplicated_signature" else bases.v2.members
    )
    rng = random.Random(f"{SEED}:{name}")
    assert all(CLASSES[name](rng, bases).data != genuine for _ in range(20))


def test_the_fuzz_catches_an_agent_that_skips_the_signature_check(
    tmp_path: Path,
    sim: PackageRepoSimulator,
    files: dict[str, bytes],
    trust: TrustContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """THREATS.md F5: with the release signature check taken out of the agent, the same
    variants get installed, so the refusals above are the check's doing."""
    monkeypatch.setattr("agent.trust._check_role", lambda *args, **kwargs: None)
    bases = _bases(sim, files)
    store = make_store(tmp_path / "models")
    accepted = 0
    for name in ("signature_bytes", "key_id", "wrong_key"):
        rng = random.Random(f"{SEED}:{name}")
        for _ in range(5):
            variant = CLASSES[name](rng, bases)
            ref = sim.ref_for(variant.data, bases.v2.manifest)
            path = tmp_path / f"{ref.digest}.tar"
            path.write_bytes(variant.data)
            store.install(path, ref, trust, lambda _: None)
            accepted += 1
            store.uninstall("iris")  # two draws may give the same bytes
    assert accepted == 15
