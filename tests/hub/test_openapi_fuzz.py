"""Schemathesis against the hub's OpenAPI document, over real HTTP to a hub served by uvicorn
on a loopback port, as admin: every operation with inputs that fit its schema and inputs that
do not, a bounded number of each, and not one server error (5xx) or dropped connection.

Generation is derandomized, so a run is repeatable; the examples differ per operation, not per
run. Path parameters are both generated and, in a second pass, fixed to objects that exist
(a device, a model version, a deployment, a token), so handlers past the 404 are reached too.
"""

import contextlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode

from .conftest import RunningHub, ServedHub

if TYPE_CHECKING:
    from examples.build_example_model import IrisModel

# Per operation, per generation mode, per pass: enough to walk each schema's shapes while the
# whole run stays well under a minute on a small machine. OUTPOST_FUZZ_EXAMPLES=200: deeper.
EXAMPLES = int(os.environ.get("OUTPOST_FUZZ_EXAMPLES", "15"))
# OUTPOST_FUZZ_RANDOM=1: new examples each run, to search wider than CI does.
RANDOM = bool(os.environ.get("OUTPOST_FUZZ_RANDOM"))


def _seed(hub: ServedHub, iris: "IrisModel", headers: dict[str, str]) -> dict[str, str]:
    """Real objects for the second pass's path parameters."""
    import httpx

    with httpx.Client(base_url=hub.url, headers=headers, timeout=30) as http:
        with (
            iris.model.open("rb") as model,
            iris.sample_input.open("rb") as sample,
            iris.expected_output.open("rb") as expected,
        ):
            registered = http.post(
                "/api/v1/models",
                data={"name": "iris", "framework": "onnx"},
                files=[
                    ("files", ("model.onnx", model)),
                    ("sample_input", ("sample_input.json", sample)),
                    ("expected_output", ("expected_output.json", expected)),
                ],
            )
        assert registered.status_code == 201, registered.text
        enrolment = http.post("/api/v1/enrollment-tokens", json={"uses": 1}).json()["token"]
        device = http.post("/api/v1/enroll", json={"token": enrolment, "name": "fuzz"}).json()
        deployment = http.post(
            "/api/v1/deployments", json={"model": "iris", "devices": [device["device_id"]]}
        )
        assert deployment.status_code == 201, deployment.text
        made = http.post("/api/v1/tokens", json={"name": "fuzz", "role": "viewer"}).json()
    return {
        "device_id": device["device_id"],
        "name": "iris",
        "version": "1",
        "path": "model.onnx",
        "deployment_id": deployment.json()["id"],
        "token_id": made["id"],
    }


@dataclass
class Findings:
    examples: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)


def _fuzz(label: str, strategy: Any, headers: dict[str, str], found: Findings) -> None:
    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=not RANDOM,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Case) -> None:
        found.examples += 1
        try:
            response = case.call(headers=headers, timeout=30)
        except Exception as exc:  # the hub dropped the connection: as bad as a 500
            found.server_errors.append(f"{label}: {exc!r}\n{case.as_curl_command()}")
            return
        found.statuses[response.status_code] += 1
        if response.status_code >= 500:
            found.server_errors.append(
                f"{label} -> {response.status_code}: {response.text[:300]}\n"
                f"{case.as_curl_command()}"
            )

    # A negative case of an operation without inputs cannot be made: nothing to get wrong.
    with contextlib.suppress(Unsatisfiable):
        run()


def test_no_operation_answers_with_a_server_error(
    served_hub: ServedHub, iris_model: "IrisModel"
) -> None:
    admin = {"Authorization": f"Bearer {served_hub.token}"}
    known = _seed(served_hub, iris_model, admin)
    schema = schemathesis.openapi.from_url(f"{served_hub.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    found = Findings()
    started = time.monotonic()
    for operation in operations:
        names = {p.name for p in operation.path_parameters}
        fixed = {n: known[n] for n in names if n in known}
        for path_parameters in [None, fixed] if fixed else [None]:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                strategy = operation.as_strategy(
                    generation_mode=mode, path_parameters=path_parameters
                )
                _fuzz(operation.label, strategy, admin, found)
    elapsed_s = time.monotonic() - started
    errors_5xx = sum(n for status, n in found.statuses.items() if status >= 500)
    print(
        f"\nschemathesis: {len(operations)} operations, {found.examples} examples in"
        f" {elapsed_s:.1f} s; 5xx: {errors_5xx}, dropped: {len(found.server_errors) - errors_5xx};"
        f" statuses {dict(sorted(found.statuses.items()))}"
    )
    assert len(operations) >= 30
    assert found.examples >= len(operations) * 2
    assert found.server_errors == [], "\n\n".join(found.server_errors[:20])


BIG = 2**70


def test_the_server_errors_schemathesis_found_stay_fixed(running_hub: RunningHub) -> None:
    """Numbers past what the database holds answered 500 (SQLite cannot bind them, a SQL
    LIMIT overflowed); they are refused by the schema now, or name nothing (404)."""
    hub = running_hub
    device = hub.enroll("d")["device_id"]
    target = {"model": "iris", "devices": [device]}
    crowded = {"json": target | {"policy": {"max_concurrent": BIG}}}
    for method, path, kwargs, status in (
        ("GET", "/api/v1/data", {"params": {"model": "iris", "version": BIG}}, 422),
        ("GET", f"/api/v1/models/iris/{BIG}", {}, 404),
        ("GET", f"/api/v1/models/iris/{BIG}/files/model.onnx", {}, 404),
        ("POST", "/api/v1/deployments/dry-run", {"json": target | {"version": BIG}}, 422),
        ("POST", "/api/v1/deployments", {"json": target | {"version": BIG}}, 422),
        ("POST", "/api/v1/deployments", crowded, 422),
        ("POST", "/api/v1/deployments", {"json": target | {"policy": {"canary": BIG}}}, 422),
    ):
        response = hub.client.request(method, path, **kwargs)
        assert response.status_code == status, (method, path, response.text)
