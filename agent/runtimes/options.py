"""Runtime options of an inference config, checked the same way on the hub and on the device.

A package's ``runtime.options`` is a flat object. Which keys a runtime takes is decided here, so
the hub refuses an unknown or out-of-range option at registration (naming the ones it takes) and
a device refuses it at install with the same words, instead of a runtime ignoring a typo.

    ONNX Runtime   threads (1), providers (["CPUExecutionProvider"]), warmup (0)
    LiteRT         threads (1), warmup (0)
    score.py       timeout_ms (5000), init_timeout_ms (60000), warmup (0)
"""

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.protocol.documents import Framework, RuntimeSpec

CPU_PROVIDER = "CPUExecutionProvider"
MAX_WARMUP_RUNS = 1000


class _Options(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    # Runs of the health-check sample after loading, before the health check and before the
    # model serves: the first calls of a fresh session allocate and are several times slower.
    warmup: int = Field(default=0, ge=0, le=MAX_WARMUP_RUNS)


class OnnxOptions(_Options):
    # One thread: the models a device serves are small, and a second thread costs more in
    # synchronisation than it saves (FLOORS.md).
    threads: int = Field(default=1, ge=1, le=64)
    # In order of preference. Providers this onnxruntime lacks are skipped with a warning, and
    # the CPU is always the last resort, so one package serves a mixed fleet.
    providers: list[str] = Field(default_factory=lambda: [CPU_PROVIDER], min_length=1)


class TfliteOptions(_Options):
    threads: int = Field(default=1, ge=1, le=64)


class ScriptOptions(_Options):
    # Each run(raw_data) call; past it the worker is killed and started again.
    timeout_ms: int = Field(default=5000, ge=1, le=600_000)
    # init() once per worker start.
    init_timeout_ms: int = Field(default=60_000, ge=1, le=3_600_000)


RuntimeOptions = OnnxOptions | TfliteOptions | ScriptOptions


class OptionsError(ValueError):
    """Options a runtime does not take; the message names what it does take."""


def _model_for(
    framework: Framework, kind: str
) -> type[OnnxOptions] | type[TfliteOptions] | type[ScriptOptions]:
    if kind == "script":
        return ScriptOptions
    if framework is Framework.TFLITE:
        return TfliteOptions
    return OnnxOptions


def _describe(model: type[_Options]) -> str:
    return ", ".join(sorted(model.model_fields))


def parse_options(framework: Framework, kind: str, raw: Mapping[str, Any]) -> RuntimeOptions:
    """The options of a runtime, or ``OptionsError`` naming the bad ones and the valid keys."""
    model = _model_for(framework, kind)
    try:
        return model.model_validate(dict(raw))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'options'}: {err['msg']}"
            for err in exc.errors()
        )
        what = "score.py" if kind == "script" else f"the {framework} runtime"
        raise OptionsError(
            f"runtime options for {what}: {problems} (it takes {_describe(model)})"
        ) from None


def options_of(framework: Framework, runtime: RuntimeSpec) -> RuntimeOptions:
    return parse_options(framework, runtime.kind, runtime.options)
