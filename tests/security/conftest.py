"""Fixtures of the adversarial suite: the hub's signing code in a simulator, a device's model
store with the real runtime, and a summary writer for the figures SECURITY.md quotes.

Summaries are printed (run pytest with ``-s`` to see them) and written as JSON to
``$OUTPOST_SECURITY_REPORT_DIR`` (default ``<tmp>/outpost-security``).
"""

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.archive import ArchiveLimits
from agent.install import ModelStore, TrustContext
from agent.runtimes import load_runtime
from agent.runtimes.health import check_health
from agent.trust import verify_keyring
from tests.support.agents import DEVICE
from tests.support.package_simulator import PackageRepoSimulator
from tests.support.repository import iris_files

DEVICE_CLASS = "generic"
AGENT_VERSION = "0.1.0"


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> PackageRepoSimulator:
    """One set of hub keys per module: key generation and the key store's files cost more
    than a thousand verifications."""
    return PackageRepoSimulator(tmp_path_factory.mktemp("hub-keys"), device_id=DEVICE)


@pytest.fixture(scope="module")
def files(iris_model: Any) -> dict[str, bytes]:
    return iris_files(iris_model.directory)


@pytest.fixture(scope="module")
def trust(sim: PackageRepoSimulator) -> TrustContext:
    keyring = verify_keyring(
        sim.keyring(), root_public_b64=sim.root_public_b64, current=None, now=None
    )
    return TrustContext(keyring, DEVICE_CLASS, AGENT_VERSION)


@pytest.fixture
def quiet_agent() -> Iterator[None]:
    """A thousand refusals each log a warning; the figures say more than those lines."""
    logger = logging.getLogger("agent")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def make_store(root: Path, **limits: int) -> ModelStore:
    """A device's model store with the real ONNX runtime and health check."""
    return ModelStore(
        root, load_runtime=load_runtime, check_health=check_health, limits=ArchiveLimits(**limits)
    )


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (files, directories, links) with its content hash: two
    snapshots differ when anything was written, removed or replaced."""
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            found[name] = "link:" + str(path.readlink())
        elif path.is_file():
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[name] = "dir" if path.is_dir() else "other"
    return found


def report_dir() -> Path:
    default = Path(tempfile.gettempdir()) / "outpost-security"
    return Path(os.environ.get("OUTPOST_SECURITY_REPORT_DIR", default))


def write_report(name: str, summary: dict[str, Any], table: str) -> Path:
    """Print ``table`` and write ``summary`` to ``<report dir>/<name>.json``."""
    out = report_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"\n{table}\n(summary written to {path})")
    return path


def reason_table(
    title: str, rows: dict[str, dict[str, int]], extra: Callable[[str], str] | None = None
) -> str:
    """Mutation class by rejection reason, one line per class."""
    reasons = sorted({r for counts in rows.values() for r in counts})
    head = f"{'class':<22}{'tried':>7}  " + "  ".join(f"{r:>15}" for r in reasons)
    lines = [title, head]
    for name, counts in sorted(rows.items()):
        tried = sum(counts.values())
        cells = "  ".join(f"{counts.get(r, 0):>15}" for r in reasons)
        lines.append(f"{name:<22}{tried:>7}  {cells}" + (extra(name) if extra else ""))
    return "\n".join(lines)
