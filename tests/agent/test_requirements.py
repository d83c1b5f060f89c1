"""An entry script's PEP 508 requirements checked against this interpreter's distributions."""

import importlib.metadata

import pytest

from agent.errors import IncompatibleError
from agent.protocol.messages import Reason
from agent.runtimes.requirements import check_requirements, parse_requirement, unmet_requirements

NUMPY = importlib.metadata.version("numpy")
PACKAGING = importlib.metadata.version("packaging")


def test_installed_distributions_in_range_are_met() -> None:
    assert unmet_requirements(["numpy", f"numpy=={NUMPY}", "packaging>=20,<1000", "NumPy>=1"]) == []


def test_a_missing_distribution_is_named() -> None:
    assert unmet_requirements(["surely-not-installed-pkg>=1"]) == [
        "surely-not-installed-pkg>=1 (not installed)"
    ]


def test_a_distribution_too_old_names_the_installed_version() -> None:
    assert unmet_requirements(["numpy>=999", "packaging<1"]) == [
        f"numpy>=999 ({NUMPY} installed)",
        f"packaging<1 ({PACKAGING} installed)",
    ]


def test_requirements_whose_marker_does_not_apply_here_are_skipped() -> None:
    assert (
        unmet_requirements(
            [
                "surely-not-installed-pkg; sys_platform == 'win32'",
                "surely-not-installed-pkg; python_version < '3'",
                "surely-not-installed-pkg; extra == 'gpu'",
            ]
        )
        == []
    )
    # A marker that does apply makes the requirement count.
    assert unmet_requirements(["surely-not-installed-pkg; python_version >= '3'"]) == [
        'surely-not-installed-pkg; python_version >= "3" (not installed)'
    ]


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("numpy >=", "is not a PEP 508 requirement"),
        ("", "is not a PEP 508 requirement"),
        ("pkg @ https://example.com/pkg.whl", "names a URL"),
    ],
)
def test_malformed_strings_are_refused_and_reported(spec: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_requirement(spec)
    (problem,) = unmet_requirements([spec])
    assert why in problem


def test_check_raises_incompatible_naming_every_unmet_requirement() -> None:
    check_requirements(["numpy>=1"], needed_by="score.py")
    with pytest.raises(IncompatibleError) as raised:
        check_requirements(
            ["pillow-surely-not>=10", "numpy>=1", "numpy>=999"], needed_by="score.py"
        )
    assert raised.value.reason is Reason.INCOMPATIBLE
    assert raised.value.detail == (
        f"score.py needs pillow-surely-not>=10 (not installed); numpy>=999 ({NUMPY} installed)"
    )
