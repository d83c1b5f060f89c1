"""Checking an entry script's declared Python requirements against the running interpreter.

A package's ``runtime.requirements`` are PEP 508 strings (``pillow>=10``, ``scipy>=1.10;
python_version >= "3.11"``). The agent installs nothing: the device's Python must already have
them, and a package whose script needs something missing is refused at install with every unmet
requirement named, instead of failing on its first request with an ``ImportError``.

A requirement whose marker does not apply to this interpreter is skipped. Extras
(``pkg[extra]``) are not followed: the named distribution is what is checked.

``packaging`` is imported only when a package declares requirements: most declare none, and it
would hold about 0.7 MB of the agent daemon's memory for nothing.
"""

import importlib.metadata
from collections.abc import Sequence
from typing import TYPE_CHECKING

from agent.errors import IncompatibleError

if TYPE_CHECKING:
    from packaging.requirements import Requirement


def parse_requirement(spec: str) -> "Requirement":
    """``spec`` as a PEP 508 requirement; ``ValueError`` saying why it is not one."""
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        requirement = Requirement(spec)
    except InvalidRequirement as exc:
        raise ValueError(f"{spec!r} is not a PEP 508 requirement: {exc}") from None
    if requirement.url:
        # A URL names what to install, not what must be installed; the device installs nothing.
        raise ValueError(f"{spec!r} names a URL; give a name and version range instead")
    return requirement


def _applies(requirement: "Requirement") -> bool:
    """Whether the marker applies here; ``ValueError`` when it cannot be evaluated."""
    from packaging.markers import UndefinedComparison, UndefinedEnvironmentName

    if requirement.marker is None:
        return True
    try:
        # "extra" is only defined while installing a distribution's extras; here it is empty.
        return requirement.marker.evaluate({"extra": ""})
    except (UndefinedComparison, UndefinedEnvironmentName) as exc:
        raise ValueError(f"{str(requirement)!r}: its marker cannot be evaluated: {exc}") from None


def unmet(requirement: "Requirement") -> str | None:
    """Why this interpreter does not satisfy ``requirement``; None when it does."""
    from packaging.version import InvalidVersion, Version

    try:
        installed = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        return f"{requirement} (not installed)"
    if not requirement.specifier:
        return None
    try:
        version = Version(installed)
    except InvalidVersion:
        return f"{requirement} ({installed} installed, not a version it can be compared with)"
    if requirement.specifier.contains(version, prereleases=True):
        return None
    return f"{requirement} ({installed} installed)"


def unmet_requirements(specs: Sequence[str]) -> list[str]:
    """Every requirement of ``specs`` this interpreter does not satisfy, each with the reason.

    A malformed string is reported as unmet too: a device cannot tell what it asks for.
    """
    problems = []
    for spec in specs:
        try:
            requirement = parse_requirement(spec)
            if not _applies(requirement):
                continue
        except ValueError as exc:
            problems.append(str(exc))
            continue
        reason = unmet(requirement)
        if reason is not None:
            problems.append(reason)
    return problems


def check_requirements(specs: Sequence[str], *, needed_by: str) -> None:
    """Raise ``IncompatibleError`` naming each unmet requirement, e.g. "score.py needs
    pillow>=10 (not installed); scipy>=1.10 (1.9.0 installed)"."""
    problems = unmet_requirements(specs)
    if problems:
        raise IncompatibleError(f"{needed_by} needs {'; '.join(problems)}")
