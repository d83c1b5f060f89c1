"""The import rules of CONVENTIONS.md, checked on the source (no import side effects).

- ``agent.protocol`` imports nothing else of the project;
- ``hub`` may import ``agent.protocol`` only, never the rest of the agent or the simulator;
  the exceptions are the registration checks, so the hub refuses what a device would, in its
  words: ``hub.registry.inspection`` runs a model with the agent's own runtimes and health
  check, and ``hub.registry.inference`` checks runtime options and requirement strings with
  the agent's own parsers;
- ``agent`` never imports ``hub`` or the simulator;
- the simulator never imports ``hub``;
- pure modules (verification) never import adapters (MQTT, HTTP, runtimes).
"""

import ast
from collections.abc import Iterator
from importlib.util import resolve_name
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "agent": ROOT / "agent",
    "hub": ROOT / "hub",
    "outpost_sim": ROOT / "device-sim/outpost_sim",
}
PURE_MODULES = {"agent.trust", "agent.archive", "agent.download", "agent.atomic"}
ADAPTERS = (
    "agent.mqtt",
    "agent.scoring",
    "agent.httpserver",
    "agent.core",
    "agent.runtimes",
    "paho",
    "httptools",
    "onnxruntime",
)


def _modules() -> Iterator[tuple[str, Path]]:
    for package, directory in PACKAGES.items():
        for path in sorted(directory.rglob("*.py")):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join([package, *parts]), path


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                names.add(resolve_name("." * node.level + (node.module or ""), package))
            elif node.module:
                names.add(node.module)
    return names


# (importing module under, may not import under, unless under)
RULES = [
    ("agent.protocol", "agent", "agent.protocol"),
    ("agent.protocol", "hub", None),
    ("agent", "hub", None),
    ("agent", "outpost_sim", None),
    ("hub", "agent", "agent.protocol"),
    ("hub", "outpost_sim", None),
    ("outpost_sim", "hub", None),
]


# The hub modules that check a model version at registration as a device would, in the
# device's words, and the parts of the agent each may use for it (see the docstring).
HUB_CHECKS_AS_DEVICE = {
    "hub.registry.inspection": ("agent.runtimes", "agent.errors", "agent.external_data"),
    "hub.registry.inference": ("agent.runtimes.options", "agent.runtimes.requirements"),
}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _violations(module: str, imported: set[str]) -> list[str]:
    bad: set[str] = set()
    for name in imported:
        for source, forbidden, allowed in RULES:
            exempt = allowed is not None and _under(name, allowed)
            if any(_under(name, u) for u in HUB_CHECKS_AS_DEVICE.get(module, ())):
                exempt = True
            if _under(module, source) and _under(name, forbidden) and not exempt:
                bad.add(name)
        if module in PURE_MODULES and any(_under(name, a) for a in ADAPTERS):
            bad.add(name)
    return sorted(bad)


MODULES = list(_modules())


def test_every_package_has_modules() -> None:
    found = {m.split(".")[0] for m, _ in MODULES}
    assert {"agent", "hub"} <= found


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_import_rules(module: str, path: Path) -> None:
    assert _violations(module, _imports(module, path)) == []


@pytest.mark.parametrize(
    ("module", "imported"),
    [
        ("agent.protocol.messages", "agent.core"),
        ("hub.deployments.service", "agent.trust"),
        ("hub.registry.service", "agent.runtimes"),
        ("hub.registry.inspection", "agent.core"),
        ("hub.registry.inference", "agent.runtimes.script"),
        ("agent.core", "hub.main"),
        ("outpost_sim.fleet", "hub.devices"),
        ("agent.trust", "agent.mqtt"),
    ],
)
def test_the_checker_catches_violations(module: str, imported: str) -> None:
    assert _violations(module, {imported}) == [imported]
