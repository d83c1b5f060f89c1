"""The few hub REST calls a scenario makes: an enrolment token, a deployment, a device list."""

from dataclasses import dataclass
from typing import Any

import httpx

from agent.errors import AgentError


class HubApiError(AgentError):
    """The hub refused a call or could not be reached; the detail says which and why."""


@dataclass
class HubApi:
    url: str
    admin_token: str | None
    timeout_s: float = 60.0

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        if not self.admin_token:
            raise HubApiError(
                f"{method} {path} needs the hub's admin token: set hub.admin_token_file in the"
                " scenario or OUTPOST_SIM_ADMIN_TOKEN"
            )
        headers = {"authorization": f"Bearer {self.admin_token}"}
        try:
            response = httpx.request(
                method,
                self.url.rstrip("/") + path,
                headers=headers,
                timeout=self.timeout_s,
                **kwargs,
            )
        except httpx.HTTPError as exc:
            raise HubApiError(f"cannot reach the hub at {self.url}: {exc}") from None
        if response.status_code >= 400:
            raise HubApiError(
                f"hub refused {method} {path} ({response.status_code}): {response.text[:500]}"
            )
        return response.json()

    def create_enrollment_token(self, uses: int, ttl_s: int = 3600) -> str:
        body = self._call("POST", "/api/v1/enrollment-tokens", json={"uses": uses, "ttl_s": ttl_s})
        return str(body["token"])

    def deploy(self, model: str, version: int | None, devices: list[str]) -> dict[str, Any]:
        body: dict[str, Any] = self._call(
            "POST",
            "/api/v1/deployments",
            json={"model": model, "version": version, "devices": devices},
        )
        return body

    def message_stats(self) -> dict[str, int]:
        body: dict[str, int] = self._call("GET", "/api/v1/messages/stats")
        return body
