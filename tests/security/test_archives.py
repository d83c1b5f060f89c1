"""THREATS.md E5: malicious package archives are refused whole, before any write.

Each hostile archive comes twice: validly signed by the release key with the hostile entry
listed in its manifest where it is a file (a compromised build pipeline), and unsigned. The
director is assumed compromised too: it names the hostile archive's exact digest, so only the
agent's own archive checks stand in the way. Around the device's state directory sits a
sentinel tree ("outside", with a secret file the links point at); after every case the whole
tree, sentinel and device alike, must be byte-for-byte what it was, the extraction step must
never have run, and v1 must still be the active, loadable version.
"""

import gzip
import io
import tarfile
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import agent.install
from agent.archive import ArchiveLimits
from agent.archive import extract_files as real_extract
from agent.errors import RejectedError
from agent.install import ModelStore, TrustContext
from agent.protocol.canonical import canonical_bytes
from agent.protocol.documents import DetachedSignatures, document_dict
from agent.protocol.messages import Reason
from agent.protocol.package import MANIFEST_NAME, SIGNATURE_NAME
from tests.security.conftest import make_store, tree, write_report
from tests.support.package_simulator import PackageRepoSimulator

LITERAL_OUTSIDE = Path("/etc/outpost-e5-x")
UNSAFE = {Reason.UNSAFE_PATH}


@dataclass
class Entry:
    name: str
    data: bytes = b"x"
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    mode: int = 0o644
    size: int | None = None  # a declared size other than len(data)

    def info(self) -> tarfile.TarInfo:
        info = tarfile.TarInfo(self.name)
        info.type = self.type
        info.linkname = self.linkname
        info.mode = self.mode
        info.size = len(self.data) if self.type == tarfile.REGTYPE else 0
        if self.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            info.devmajor, info.devminor = 1, 3
        return info


@dataclass
class Case:
    entries: Callable[[Path], list[Entry]]
    reasons: set[Reason] = field(default_factory=lambda: set(UNSAFE))
    raw: Callable[[bytes], bytes] | None = None  # transforms the whole archive


NFC = unicodedata.normalize("NFC", "caf\u00e9.json")
NFD = unicodedata.normalize("NFD", NFC)

CASES: dict[str, Case] = {
    "dotdot_in_files": Case(lambda out: [Entry("files/../../x")]),
    "dotdot_top": Case(lambda out: [Entry("../../x")]),
    "absolute_literal": Case(lambda out: [Entry(str(LITERAL_OUTSIDE))]),
    "absolute_into_sentinel": Case(lambda out: [Entry(str(out / "abs-x"))]),
    "backslash": Case(lambda out: [Entry("files/..\\x"), Entry("..\\x")]),
    "symlink_then_file_through_it": Case(
        lambda out: [
            Entry("files/link", type=tarfile.SYMTYPE, linkname=str(out)),
            Entry("files/link/x", b"written through the link"),
        ]
    ),
    "relative_symlink_out": Case(
        lambda out: [Entry("files/up", type=tarfile.SYMTYPE, linkname="../../../../..")]
    ),
    "hardlink_outside": Case(
        lambda out: [Entry("files/hl", type=tarfile.LNKTYPE, linkname=str(out / "secret"))]
    ),
    "hardlink_inside": Case(
        lambda out: [Entry("files/hl", type=tarfile.LNKTYPE, linkname=MANIFEST_NAME)]
    ),
    "char_device": Case(lambda out: [Entry("files/dev", type=tarfile.CHRTYPE)]),
    "block_device": Case(lambda out: [Entry("files/blk", type=tarfile.BLKTYPE)]),
    "fifo": Case(lambda out: [Entry("files/fifo", type=tarfile.FIFOTYPE)]),
    "directory_entry": Case(lambda out: [Entry("files/sub", type=tarfile.DIRTYPE, mode=0o777)]),
    "setuid": Case(lambda out: [Entry("files/suid", mode=0o4755)]),
    "setgid": Case(lambda out: [Entry("files/sgid", mode=0o2755)]),
    "sticky": Case(lambda out: [Entry("files/sticky", mode=0o1755)]),
    "duplicate_name": Case(lambda out: [Entry("files/model.onnx", b"second copy")]),
    "case_collision": Case(lambda out: [Entry("files/MODEL.onnx")]),
    "unicode_normalisation_collision": Case(
        lambda out: [Entry(f"files/{NFC}", b"{}"), Entry(f"files/{NFD}", b"{}")]
    ),
    "name_4kb": Case(lambda out: [Entry("files/" + "a" * 4096)]),
    "component_300_bytes": Case(lambda out: [Entry("files/" + "b" * 300)]),
    "entry_limit_plus_one": Case(
        lambda out: [Entry(f"files/e{i}", b"") for i in range(ArchiveLimits().max_entries + 1)]
    ),
    # The agent never decompresses: a gzip bomb (8 MiB of zeros packed into some 8 KB; the
    # ratio holds at any size) is not a package archive at all.
    "gzip_bomb": Case(
        lambda out: [Entry("files/zeros.bin", bytes(8 * 1024 * 1024))],
        reasons={Reason.MALFORMED},
        raw=lambda data: gzip.compress(data, compresslevel=9),
    ),
}


def _declared_huge(data: bytes) -> bytes:
    """A member whose header (PAX ``size``) claims 10 GiB, followed by only a few bytes: the
    expansion is refused on the header, before a byte of it is read."""
    info = tarfile.TarInfo("files/huge.bin")
    info.size = 10 * 1024**3
    header = info.tobuf(format=tarfile.PAX_FORMAT)
    body = data[: -2 * 512].rstrip(b"\0")  # the archive without its end blocks
    body += bytes(-len(body) % 512)
    return body + header + b"x" * 512 + bytes(1024)


CASES["declared_size_10_gib"] = Case(lambda out: [], {Reason.TOO_LARGE}, raw=_declared_huge)


def _archive(
    sim: PackageRepoSimulator, files: dict[str, bytes], hostile: list[Entry], *, signed: bool
) -> bytes:
    listed = dict(files)
    for entry in hostile:
        if entry.type == tarfile.REGTYPE and entry.name.startswith("files/"):
            listed[entry.name.removeprefix("files/")] = entry.data
    manifest = sim.manifest(listed, version=2)
    doc = document_dict(manifest)
    members: list[tuple[tarfile.TarInfo, bytes]] = []
    head = {MANIFEST_NAME: canonical_bytes(doc)}
    if signed:
        sigs = DetachedSignatures(signatures=[sim.keys.sign_release(doc)])
        head[SIGNATURE_NAME] = canonical_bytes(document_dict(sigs))
    for name, data in [*head.items(), *((f"files/{p}", d) for p, d in files.items())]:
        members.append((Entry(name, data).info(), data))
    members += [(e.info(), e.data) for e in hostile]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


@pytest.fixture
def device(
    tmp_path: Path, sim: PackageRepoSimulator, files: dict[str, bytes], trust: TrustContext
) -> tuple[ModelStore, Path]:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("the device key\n")
    store = make_store(tmp_path / "device" / "models")
    v1 = sim.package(files, version=1)
    path = tmp_path / "v1.tar"
    path.write_bytes(v1.data)
    store.install(path, v1.ref, trust, lambda _: None)
    path.unlink()
    return store, outside


@pytest.mark.usefixtures("quiet_agent")
def test_hostile_archives_are_refused_before_any_write(
    tmp_path: Path,
    sim: PackageRepoSimulator,
    files: dict[str, bytes],
    trust: TrustContext,
    device: tuple[ModelStore, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, outside = device
    extracted: list[str] = []

    def spy(*args: object, **kwargs: object) -> None:
        extracted.append("called")
        real_extract(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(agent.install, "extract_files", spy)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    before = tree(tmp_path)
    results: dict[str, str] = {}
    changed_outside = 0
    failures: list[str] = []
    for name, case in sorted(CASES.items()):
        for signed in (True, False):
            label = f"{name}/{'signed' if signed else 'unsigned'}"
            data = _archive(sim, files, case.entries(outside), signed=signed)
            if case.raw is not None:
                data = case.raw(data)
            ref = sim.ref_for(data, sim.manifest(files, version=2))
            path = incoming / "hostile.tar"
            path.write_bytes(data)
            try:
                store.install(path, ref, trust, lambda _: None)
            except RejectedError as exc:
                results[label] = str(exc.reason)
                # Unsigned copies of harmless-looking archives are refused for being
                # unsigned; every hostile entry must be refused for what it is.
                allowed = case.reasons | ({Reason.NOT_RELEASED} if not signed else set())
                if exc.reason not in allowed:
                    failures.append(f"{label}: {exc}")
            else:
                results[label] = "ACCEPTED"
                failures.append(f"{label}: accepted")
            path.unlink()
            after = tree(tmp_path)
            changed_outside += sum(
                1 for k in set(before) | set(after) if before.get(k) != after.get(k)
            )
            if after != before:
                failures.append(f"{label}: the tree changed")
                before = after
    write_report(
        "archives",
        {"cases": len(results), "refused": results, "entries_written_or_changed": changed_outside},
        "E5 archives: "
        + f"{len(results)} hostile archives, "
        + f"{sum(r != 'ACCEPTED' for r in results.values())} refused, "
        + f"{changed_outside} files written or changed anywhere, "
        + f"extraction reached {len(extracted)} times\n"
        + "\n".join(f"  {k:<45} {v}" for k, v in sorted(results.items())),
    )
    assert not failures, failures
    assert changed_outside == 0
    assert not extracted, "a hostile archive got as far as extraction"
    assert not LITERAL_OUTSIDE.exists()
    assert store.pointer("iris").version == 1  # type: ignore[union-attr]
    assert store.load_active("iris", trust) is not None


def test_the_harness_accepts_a_clean_archive_built_the_same_way(
    tmp_path: Path,
    sim: PackageRepoSimulator,
    files: dict[str, bytes],
    trust: TrustContext,
    device: tuple[ModelStore, Path],
) -> None:
    """Without a hostile entry the same builder makes a package the agent installs, so the
    refusals above are the entries' doing."""
    store, _ = device
    data = _archive(sim, files, [], signed=True)
    ref = sim.ref_for(data, sim.manifest(files, version=2))
    path = tmp_path / "clean.tar"
    path.write_bytes(data)
    store.install(path, ref, trust, lambda _: None)
    assert store.pointer("iris").version == 2  # type: ignore[union-attr]
