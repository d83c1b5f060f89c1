"""The inference config given at registration: the framework's built-in runtime or an entry
script, the script's Python requirements, and runtime options, checked as a device will check
them (``agent.runtimes.options``, ``agent.runtimes.requirements``) so a mistake is a 422 here
rather than a fleet of refused installs.

Options arrive as ``key=value`` strings (repeated form fields, ``--option`` on the CLI) and are
typed by what the runtime's option takes: ``timeout_ms=2000`` becomes a number, ``warmup=0`` too,
``providers=CUDAExecutionProvider,CPUExecutionProvider`` a list, ``true``/``false`` a boolean.
Only the options given are stored; the device applies its defaults to the rest.

The hub neither runs nor imports an entry script: user code stays off the hub. The device runs
the sample input through it at install, as its health check.
"""

import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from agent.protocol.documents import Framework, RuntimeSpec
from agent.runtimes.options import OptionsError, parse_options
from agent.runtimes.requirements import parse_requirement
from hub.errors import InvalidInput

RuntimeKind = Literal["builtin", "script"]
TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0"})
MAX_REQUIREMENTS = 100
MAX_OPTIONS = 32


@dataclass(frozen=True)
class InferenceConfig:
    kind: RuntimeKind = "builtin"
    entry_script: str | None = None
    requirements: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def runtime_spec(self, model_file: str) -> RuntimeSpec:
        """The manifest's ``runtime`` for a version whose model is ``model_file``."""
        return RuntimeSpec(
            kind=self.kind,
            model_file=model_file,
            entry_script=self.entry_script,
            requirements=list(self.requirements),
            options=dict(self.options),
        )


def _is_list(annotation: Any) -> bool:
    if get_origin(annotation) is list:
        return True
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_is_list(arg) for arg in get_args(annotation))
    return False


def _typed(value: str, annotation: Any) -> Any:
    """``value`` as the option's type; left a string when it does not read as one, so the
    option check reports it with the option's own words."""
    if annotation is bool:
        lowered = value.strip().lower()
        if lowered in TRUE_WORDS:
            return True
        if lowered in FALSE_WORDS:
            return False
        return value
    if annotation is int:
        try:
            return int(value.strip())
        except ValueError:
            return value
    if _is_list(annotation):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def parse_option_items(
    framework: Framework, kind: RuntimeKind, items: Sequence[str]
) -> dict[str, Any]:
    """``key=value`` items as the runtime's typed options; ``InvalidInput`` naming the bad ones
    and the keys the runtime takes."""
    if len(items) > MAX_OPTIONS:
        raise InvalidInput(f"{len(items)} runtime options given; at most {MAX_OPTIONS}")
    fields = type(parse_options(framework, kind, {})).model_fields
    raw: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InvalidInput(f"invalid runtime option {item!r}: use key=value")
        if key in raw:
            raise InvalidInput(f"runtime option {key!r} given twice")
        known = fields.get(key)
        raw[key] = _typed(value, known.annotation) if known is not None else value
    try:
        parsed = parse_options(framework, kind, raw)
    except OptionsError as exc:
        raise InvalidInput(str(exc)) from None
    return parsed.model_dump(mode="json", include=set(raw))


def normalised_requirements(specs: Sequence[str]) -> list[str]:
    """The requirement strings, each checked as PEP 508 (normalised as a device reads them)."""
    if len(specs) > MAX_REQUIREMENTS:
        raise InvalidInput(f"{len(specs)} requirements given; at most {MAX_REQUIREMENTS}")
    checked = []
    for spec in specs:
        try:
            checked.append(str(parse_requirement(spec.strip())))
        except ValueError as exc:
            raise InvalidInput(f"invalid requirement: {exc}") from None
    return checked


def inference_config(
    framework: Framework,
    *,
    entry_script: str | None,
    requirements: Sequence[str],
    options: Sequence[str],
) -> InferenceConfig:
    """The inference config of a registration; ``InvalidInput`` saying what is wrong."""
    if entry_script is None:
        if requirements:
            raise InvalidInput(
                "requirements are those of an entry script; give the entry script too"
            )
        return InferenceConfig(options=parse_option_items(framework, "builtin", options))
    if not entry_script.endswith(".py"):
        raise InvalidInput(f"the entry script must be a .py file, not {entry_script!r}")
    return InferenceConfig(
        kind="script",
        entry_script=entry_script,
        requirements=normalised_requirements(requirements),
        options=parse_option_items(framework, "script", options),
    )
