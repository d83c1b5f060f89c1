"""Installing a verified package next to the running one, and switching only when it is healthy.

Order (DESIGN.md, "Agent install and rollback"): check every archive entry and the release
signature → unpack into a fresh staging directory, hashing each file → check that an ONNX
model names no file outside the package for its tensor data → rename it to its own
versioned directory → load the model → health check → switch the ``active.json`` pointer by an
atomic rename. The previous version's directory is kept as the rollback target and is never
overwritten by an unverified version. A crash before the pointer rename leaves the old version
active; after it, the new one.

Switching back to the kept previous version (a rollback ordered by the hub) re-verifies, loads
and health-checks that directory and switches the pointer the same way, with nothing fetched.
Uninstalling removes the pointer before the directories, so a crash leaves the model installed
or gone, never a pointer to a missing directory.
"""

import hashlib
import json
import logging
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from agent.archive import ArchiveLimits, check_against_manifest, extract_files, read_entries
from agent.atomic import fsync_dir, write_atomic
from agent.errors import (
    AgentError,
    IncompatibleError,
    InstallError,
    IntegrityError,
    ModelLoadError,
    RejectedError,
    TrustError,
)
from agent.external_data import check_external_data
from agent.failpoints import Failpoint, FailpointCrash, Failpoints
from agent.protocol.documents import Framework, HealthCheck, Keyring, Manifest, PackageRef
from agent.protocol.messages import Reason, Step
from agent.protocol.package import MANIFEST_NAME, SIGNATURE_NAME
from agent.runtimes.base import ActiveModel, Runtime
from agent.trust import verify_manifest

logger = logging.getLogger(__name__)

POINTER_NAME = "active.json"
FILES_SUBDIR = "files"

RuntimeLoader = Callable[[Path, Manifest], Runtime]
HealthChecker = Callable[[Runtime, Path, HealthCheck], None]
StepReporter = Callable[[Step], None]


class Pointer(BaseModel):
    """Which versioned directory of a model is active, and the rollback target."""

    model_config = ConfigDict(frozen=True)

    version: int
    digest: str
    directory: str
    deployment_id: str | None = None
    previous: "Pointer | None" = None


@dataclass(frozen=True)
class TrustContext:
    keyring: Keyring
    device_class: str
    agent_version: str


class ModelStore:
    """The on-disk models of one device: ``<root>/<model>/<version dirs>`` and their pointers."""

    def __init__(
        self,
        root: Path,
        *,
        load_runtime: RuntimeLoader,
        check_health: HealthChecker,
        limits: ArchiveLimits,
        failpoints: Failpoints | None = None,
    ) -> None:
        self.root = root
        self._failpoints = failpoints or Failpoints()
        self._load_runtime = load_runtime
        self._check_health = check_health
        self._limits = limits
        root.mkdir(parents=True, exist_ok=True)

    def pointer(self, model: str) -> Pointer | None:
        path = self.root / model / POINTER_NAME
        try:
            return Pointer.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValidationError:
            logger.error("unreadable pointer, treating model as not installed", extra={"m": model})
            return None

    def models(self) -> list[str]:
        return sorted(p.parent.name for p in self.root.glob(f"*/{POINTER_NAME}"))

    def install(
        self,
        archive_path: Path,
        ref: PackageRef,
        trust: TrustContext,
        report: StepReporter,
    ) -> ActiveModel:
        """Install ``ref`` from a complete archive and make it active; raises on any failure,
        leaving the previous version active and untouched."""
        model_dir = self.root / ref.model
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = model_dir / f".staging-{ref.digest[:16]}"
        final = model_dir / f"v{ref.version}-{ref.digest[:16]}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            manifest = self._unpack(archive_path, ref, trust, staging)
            self._failpoints.hit(Failpoint.AFTER_UNPACK)
            report(Step.VERIFIED)
            report(Step.INSTALLING)
            current = self.pointer(ref.model)
            if current is not None and current.directory == final.name:
                raise InstallError("refusing to replace the directory of the active version")
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
            fsync_dir(model_dir)
            self._failpoints.hit(Failpoint.AFTER_RENAME)
            runtime = self._load_and_check(final, manifest, report)
        except FailpointCrash:
            raise  # a simulated kill: nothing gets cleaned up, as with a real one
        except BaseException:
            # Nothing of a failed install stays; the active version's directory is never this
            # one (checked above), so removing it cannot touch what is serving.
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)
            raise
        previous = self.pointer(ref.model)
        pointer = Pointer(
            version=ref.version,
            digest=ref.digest,
            directory=final.name,
            deployment_id=ref.deployment_id,
            previous=previous.model_copy(update={"previous": None}) if previous else None,
        )
        # The switch: one atomic rename. Everything before it left the old version active.
        self._switch(model_dir, pointer, runtime)
        self._prune(model_dir, keep={pointer.directory, previous.directory if previous else ""})
        return ActiveModel(
            ref.model, ref.version, ref.digest, manifest, runtime, final / FILES_SUBDIR
        )

    def kept_previous(self, ref: PackageRef) -> bool:
        """Whether ``ref`` is this model's rollback target and its directory is still here."""
        current = self.pointer(ref.model)
        if current is None or current.previous is None:
            return False
        previous = current.previous
        return (
            previous.digest == ref.digest and (self.root / ref.model / previous.directory).is_dir()
        )

    def switch_back(
        self, ref: PackageRef, trust: TrustContext, report: StepReporter
    ) -> ActiveModel:
        """Make the kept previous version ``ref`` active again from its directory, without the
        archive; raises on any failure, leaving the current version active and both kept.

        The directory is checked as thoroughly as at start-up (release signature, every file's
        hash), since it has sat on disk since it was installed, then loaded and health-checked
        before the same one atomic pointer write as ``install``.
        """
        model_dir = self.root / ref.model
        current = self.pointer(ref.model)
        if current is None or current.previous is None or current.previous.digest != ref.digest:
            raise InstallError(f"{ref.model} v{ref.version} is not the kept previous version")
        target = model_dir / current.previous.directory
        manifest = self._reverify(target, trust)
        if (manifest.model.name, manifest.model.version) != (ref.model, ref.version):
            raise IncompatibleError(
                f"the kept directory holds {manifest.model.name} v{manifest.model.version},"
                f" the desired state names {ref.model} v{ref.version}"
            )
        report(Step.VERIFIED)
        report(Step.INSTALLING)
        runtime = self._load_and_check(target, manifest, report)
        # The version switched away from becomes the rollback target: it passed its own health
        # check here, and keeping it makes re-promoting it (a rollout resumed) local as well.
        # Both directories are already on disk, so the switch frees and fetches nothing.
        pointer = Pointer(
            version=ref.version,
            digest=ref.digest,
            directory=target.name,
            deployment_id=ref.deployment_id,
            previous=current.model_copy(update={"previous": None}),
        )
        self._switch(model_dir, pointer, runtime)
        self._prune(model_dir, keep={pointer.directory, current.directory})
        return ActiveModel(
            ref.model, ref.version, ref.digest, manifest, runtime, target / FILES_SUBDIR
        )

    def on_disk(self) -> list[str]:
        """Every model with a directory here: installed, or left by an interrupted install or
        uninstall."""
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def uninstall(self, model: str) -> None:
        """Remove a model's pointer, then its directories.

        The pointer goes first, by one atomic unlink made durable before any directory is
        removed: a crash leaves the model installed as it was, or gone with at most directories
        that no pointer names (``remove_leftovers`` and another ``uninstall`` remove those).
        """
        model_dir = self.root / model
        if not model_dir.is_dir():
            return
        (model_dir / POINTER_NAME).unlink(missing_ok=True)
        fsync_dir(model_dir)
        shutil.rmtree(model_dir)
        fsync_dir(self.root)

    def _unpack(
        self, archive_path: Path, ref: PackageRef, trust: TrustContext, staging: Path
    ) -> Manifest:
        try:
            archive = tarfile.open(archive_path, mode="r:")  # noqa: SIM115 - closed below
        except (tarfile.TarError, OSError) as exc:
            raise RejectedError(f"not a package archive: {exc}") from None
        with archive:
            try:
                entries = read_entries(archive, self._limits)
                manifest = verify_manifest(
                    entries.manifest_bytes,
                    entries.signature_bytes,
                    keyring=trust.keyring,
                    device_class=trust.device_class,
                    agent_version=trust.agent_version,
                )
                if (manifest.model.name, manifest.model.version) != (ref.model, ref.version):
                    raise IncompatibleError(
                        f"package holds {manifest.model.name} v{manifest.model.version},"
                        f" the desired state names {ref.model} v{ref.version}"
                    )
                self._check_version_conflict(ref, entries.manifest_bytes)
                check_against_manifest(entries, manifest)
                (staging / FILES_SUBDIR).mkdir(parents=True)
                extract_files(archive, entries, manifest, staging / FILES_SUBDIR)
                if manifest.model.framework is Framework.ONNX:
                    # Before any runtime opens the model: it must not name files outside
                    # the package for its tensors (THREATS.md E6).
                    check_external_data(staging / FILES_SUBDIR, manifest)
            except tarfile.TarError as exc:
                raise RejectedError(f"corrupt package archive: {exc}") from None
            except RecursionError:
                # Python's json gives up on deep nesting with RecursionError, which is not a
                # ValueError: a manifest of a million "[" is malformed, not an agent fault.
                raise RejectedError("a document in the package is nested too deeply") from None
        (staging / MANIFEST_NAME).write_bytes(entries.manifest_bytes)
        (staging / SIGNATURE_NAME).write_bytes(entries.signature_bytes)
        fsync_dir(staging)
        return manifest

    def _check_version_conflict(self, ref: PackageRef, manifest_bytes: bytes) -> None:
        """Refuse a second, different package under a version this device already holds
        (THREATS.md A4b): a version names one release. The same manifest re-signed (a
        release key rotated) is the same release and is let through."""
        pointer = self.pointer(ref.model)
        held = [pointer, pointer.previous] if pointer is not None else []
        for kept in held:
            if kept is None or kept.version != ref.version or kept.digest == ref.digest:
                continue
            try:
                stored = json.loads(
                    (self.root / ref.model / kept.directory / MANIFEST_NAME).read_bytes()
                )
            except (OSError, ValueError):
                continue  # unreadable: that directory no longer verifies and will be replaced
            if stored != json.loads(manifest_bytes):
                raise TrustError(
                    f"{ref.model} v{ref.version} is installed here from another manifest;"
                    " a different package under the same version is refused",
                    reason=Reason.REPLAY,
                )

    def _load_and_check(self, directory: Path, manifest: Manifest, report: StepReporter) -> Runtime:
        """Load the model and health-check it. A runtime that fails here is closed: an entry
        script's worker process must not outlive the attempt. (A simulated crash closes it
        too, as a real one ends the worker through its lifeline.)"""
        runtime = self._load(directory, manifest)
        try:
            self._failpoints.hit(Failpoint.AFTER_LOAD)
            report(Step.HEALTH_CHECK)
            self._check_health(runtime, directory / FILES_SUBDIR, manifest.health_check)
            self._failpoints.hit(Failpoint.AFTER_HEALTH)
        except BaseException:
            runtime.close()
            raise
        return runtime

    def _switch(self, model_dir: Path, pointer: Pointer, runtime: Runtime) -> None:
        """Point the model at ``pointer`` with one atomic write. If that fails the old version
        stays active and the new runtime is closed (after a simulated crash too, as above)."""
        try:
            write_atomic(model_dir / POINTER_NAME, pointer.model_dump_json().encode())
            self._failpoints.hit(Failpoint.AFTER_SWITCH)
        except BaseException:
            runtime.close()
            raise

    def _load(self, directory: Path, manifest: Manifest) -> Runtime:
        try:
            return self._load_runtime(directory / FILES_SUBDIR, manifest)
        except AgentError:
            raise
        except Exception as exc:  # a runtime's own exception types are not ours to know
            raise ModelLoadError(f"{type(exc).__name__}: {exc}") from exc

    def load_active(self, model: str, trust: TrustContext) -> ActiveModel | None:
        """Load the active version at start-up, without the hub; falls back to the previous
        version when the active one no longer verifies."""
        pointer = self.pointer(model)
        while pointer is not None:
            try:
                manifest = self._reverify(self.root / model / pointer.directory, trust)
                runtime = self._load(self.root / model / pointer.directory, manifest)
                files = self.root / model / pointer.directory / FILES_SUBDIR
                return ActiveModel(model, pointer.version, pointer.digest, manifest, runtime, files)
            except AgentError as exc:
                logger.error(
                    "installed model no longer verifies", extra={"m": model, "why": str(exc)}
                )
                pointer = pointer.previous
                if pointer is not None:
                    write_atomic(
                        self.root / model / POINTER_NAME, pointer.model_dump_json().encode()
                    )
        return None

    def _reverify(self, directory: Path, trust: TrustContext) -> Manifest:
        """Check the stored manifest's release signature and every file's hash again.

        Expiry is not judged here: stored metadata that has since expired must not stop a
        device from serving what it verified when it installed it.
        """
        try:
            manifest_bytes = (directory / MANIFEST_NAME).read_bytes()
            signature_bytes = (directory / SIGNATURE_NAME).read_bytes()
        except OSError as exc:
            # A missing directory or manifest is as unusable as a changed file: callers fall
            # back (to the previous version, or to downloading) instead of stopping.
            raise IntegrityError(f"{directory.name}: {exc.strerror}") from None
        manifest = verify_manifest(
            manifest_bytes,
            signature_bytes,
            keyring=trust.keyring,
            device_class=trust.device_class,
            agent_version=trust.agent_version,
        )
        for entry in manifest.files:
            path = directory / FILES_SUBDIR / entry.path
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise IntegrityError(f"{entry.path}: {exc.strerror}") from None
            if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
                raise IntegrityError(f"{entry.path} changed on disk since it was installed")
        return manifest

    def remove_leftovers(self, model: str) -> None:
        """Remove what an interrupted install left: staging directories and version
        directories the pointer names as neither active nor the rollback target."""
        model_dir = self.root / model
        if not model_dir.is_dir():
            return
        pointer = self.pointer(model)
        keep = set()
        if pointer is not None:
            keep.add(pointer.directory)
            if pointer.previous is not None:
                keep.add(pointer.previous.directory)
        for child in model_dir.iterdir():
            if child.is_dir() and child.name.startswith(".staging-"):
                shutil.rmtree(child, ignore_errors=True)
        self._prune(model_dir, keep)

    def _prune(self, model_dir: Path, keep: set[str]) -> None:
        for child in model_dir.iterdir():
            if child.is_dir() and child.name not in keep and not child.name.startswith("."):
                shutil.rmtree(child, ignore_errors=True)
